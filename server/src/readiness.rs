//! Await readability of one pollable fd (the shard's epoll set) on glommio's
//! own io_uring, with glommio's public API only.
//!
//! glommio 0.9 has no public "await readiness of this fd". Its streams,
//! though, arm IORING_OP_POLL_ADD for readability when built from a raw fd
//! and try the read only once that poll completes. Built over a dup of an
//! epoll fd, the read then fails with ENOTSOCK: that failure is the signal
//! that the set has ready entries. One poll per wait; the dup is closed when
//! the stream drops (dropping a pending wait cancels its poll). This relies on
//! glommio 0.9.0's stream internals, which is why the workspace pins it.

use std::io;
use std::os::fd::{FromRawFd, RawFd};

use futures_lite::AsyncReadExt;

/// Resolves when `fd` is readable.
pub async fn readable(fd: RawFd) -> io::Result<()> {
    // SAFETY: dup of a valid fd; the stream owns (and closes) the copy.
    let dup = crate::epoll::cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    let mut stream = unsafe { glommio::net::UnixStream::from_raw_fd(dup) };
    let mut byte = [0u8; 1];
    match stream.read(&mut byte).await {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => Ok(()),
        Err(e) => Err(e),
        Ok(_) => Err(io::Error::other(
            "readiness: read on a non-socket unexpectedly succeeded",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Guards the glommio behaviour this module relies on: the wait resolves
    /// when the fd becomes readable, not before.
    #[test]
    fn resolves_when_the_fd_becomes_readable_not_before() {
        // SAFETY: a new eventfd, closed at the end of the test.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(efd >= 0);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let one: u64 = 1;
            // SAFETY: an 8-byte write to the eventfd.
            unsafe { libc::write(efd, (&one as *const u64).cast(), 8) };
        });
        let ex = glommio::LocalExecutorBuilder::default()
            .make()
            .expect("a glommio executor");
        let waited = ex.run(async move {
            let start = Instant::now();
            readable(efd).await.expect("readable");
            start.elapsed()
        });
        writer.join().unwrap();
        assert!(
            waited >= Duration::from_millis(90),
            "resolved early: {waited:?}"
        );
        assert!(waited < Duration::from_secs(5), "resolved late: {waited:?}");
        // SAFETY: closing the eventfd made above.
        unsafe { libc::close(efd) };
    }
}
