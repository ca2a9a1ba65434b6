//! The shard's own listening socket, built with socket2 (glommio's
//! `TcpListener::bind` fixes the backlog at 1024, far too small for a
//! reconnect storm). Every shard binds the same address with SO_REUSEPORT;
//! the kernel hashes each incoming SYN to one of them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Binds a non-blocking listener on `addr` in the SO_REUSEPORT group.
pub fn bind(addr: SocketAddr, backlog: i32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(backlog)?;
    Ok(socket)
}

/// Fails if something already listens on `addr`. SO_REUSEPORT would
/// otherwise let a second server join the first one's group silently and
/// take half of its new connections. The probe binds without SO_REUSEPORT:
/// that fails with EADDRINUSE exactly when a listener holds the address.
pub fn ensure_free(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&SockAddr::from(addr))
}

/// net.core.somaxconn: the kernel caps any listen backlog at it.
pub fn somaxconn() -> Option<i32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What `accept` said.
pub enum Accepted {
    Socket(RawFd),
    /// Nothing is waiting.
    Empty,
    /// Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    Exhausted(io::Error),
    /// The peer gave up before we took it (ECONNABORTED, EPERM...): try the next.
    Skipped,
}

/// Takes one pending connection, non-blocking, as a non-blocking socket.
pub fn accept(listener: &Socket) -> Accepted {
    // SAFETY: null address pointers are allowed; the fd is owned by the caller.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd >= 0 {
        return Accepted::Socket(fd);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) => Accepted::Empty,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            Accepted::Exhausted(err)
        }
        _ => Accepted::Skipped,
    }
}
