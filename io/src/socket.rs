//! Non-blocking socket calls on raw descriptors, shared by the shard, the
//! client and the load generator.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

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

/// Sends `answer` on a connection never registered (non-blocking: a fresh
/// socket's buffer takes it), reads once what the peer sent already (so
/// that the close is a FIN after the answer, not a reset that could
/// overtake it) and closes it. An empty `answer`: a reset.
pub fn refuse(fd: OwnedFd, answer: &[u8]) {
    let raw = fd.as_raw_fd();
    if answer.is_empty() {
        set_linger_zero(raw);
    } else {
        let _ = send(raw, answer);
        let mut sink = [0u8; 2048];
        let _ = recv(raw, &mut sink);
    }
    drop(fd);
}

/// Sets SO_LINGER 0: closing the socket then resets the connection and
/// frees the socket at once (no FIN_WAIT, no TIME_WAIT).
pub fn set_linger_zero(fd: RawFd) {
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

/// Clears O_NONBLOCK (io_uring waits for such sockets itself). One
/// ioctl (FIONBIO), not fcntl's get and set: it runs per connection of a
/// hot upgrade.
pub fn set_blocking(fd: RawFd) {
    fionbio(fd, 0);
}

/// Makes `fd` non-blocking (O_NONBLOCK): what the epoll driver's system
/// calls need of a socket that came from io_uring, which keeps them blocking.
pub fn set_nonblocking(fd: RawFd) {
    fionbio(fd, 1);
}

fn fionbio(fd: RawFd, on: libc::c_int) {
    // SAFETY: ioctl FIONBIO on the caller's descriptor with a pointer to a
    // local int, read by the kernel during the call.
    unsafe {
        libc::ioctl(fd, libc::FIONBIO, &on);
    }
}

/// Closes `fd`; `abortive` sets SO_LINGER 0 first ([`set_linger_zero`]).
pub fn close(fd: RawFd, abortive: bool) {
    if abortive {
        set_linger_zero(fd);
    }
    // SAFETY: the caller owns fd and gives it up here.
    unsafe { libc::close(fd) };
}

/// Opens a non-blocking TCP socket (no Nagle) from `source` (any port) and
/// begins connecting it to `server`.
pub fn connect_from(server: SocketAddr, source: Option<IpAddr>) -> io::Result<OwnedFd> {
    // Non-blocking from socket(2) on (SOCK_NONBLOCK): two fcntl calls
    // fewer per connection than set_nonblocking.
    let s = Socket::new(
        Domain::for_address(server),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    s.set_nodelay(true)?;
    if let Some(ip) = source {
        // Let connect() choose the port per 4-tuple rather than bind() per
        // address: each source IP then serves a full port range per server.
        let one: libc::c_int = 1;
        // SAFETY: a valid int option on a socket this function owns.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                4,
            )
        };
        super::cvt(r)?;
        s.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    match s.connect(&SockAddr::from(server)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(s.into())
}

/// Whether the peer of TCP socket `fd` has left, and how: its FIN
/// (TCP_INFO's state CLOSE_WAIT) or its reset (CLOSE) has arrived,
/// whatever bytes are still queued to read. One `getsockopt` copying one
/// byte.
pub fn peer_left(fd: RawFd) -> Option<crate::PeerLeft> {
    // Linux's TCP states (include/net/tcp_states.h).
    const TCP_CLOSE: u8 = 7;
    const TCP_CLOSE_WAIT: u8 = 8;
    let mut state = 0u8;
    let mut len: libc::socklen_t = 1;
    // SAFETY: getsockopt writes at most `len` (1) byte into `state`; the
    // kernel copies min(len, sizeof(struct tcp_info)), the state first.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut state as *mut u8).cast(),
            &mut len,
        )
    };
    match (r, len, state) {
        (0, 1, TCP_CLOSE_WAIT) => Some(crate::PeerLeft::Fin),
        (0, 1, TCP_CLOSE) => Some(crate::PeerLeft::Reset),
        _ => None,
    }
}

/// The socket's pending error (SO_ERROR): 0 once a connect succeeded.
pub fn so_error(fd: RawFd) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = 4u32;
    // SAFETY: err and len are valid for getsockopt(SO_ERROR).
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        err
    }
}

/// The peer's address of `fd` (getpeername), if it still has one.
pub fn peer_addr(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: fd is open for the duration of the call (the caller's).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket()
}
