//! Non-blocking socket calls on raw descriptors, shared by the shard and the
//! load generator.

use std::io;
use std::os::fd::RawFd;

/// One non-blocking send; `Ok(0)` when the socket buffer is full.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for reads of its length.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => return Ok(0),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(err),
        }
    }
}

/// One non-blocking receive; `Ok(0)` is end of stream, and an empty socket
/// is an error of kind `WouldBlock`.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Closes `fd`; `abortive` sets SO_LINGER 0 first, so the kernel resets the
/// connection and frees the socket at once (no FIN_WAIT, no TIME_WAIT).
pub fn close(fd: RawFd, abortive: bool) {
    if abortive {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: fd is the caller's; linger is a valid option value.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as u32,
            );
        }
    }
    // SAFETY: the caller owns fd and gives it up here.
    unsafe { libc::close(fd) };
}
