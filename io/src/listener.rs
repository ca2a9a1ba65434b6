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

/// Steers each new connection to the listener of the CPU that received it:
/// a classic BPF program on the SO_REUSEPORT group returns the receiving
/// CPU modulo `listeners`, an index into the group in bind order. With
/// shard i bound i-th and pinned to CPU i, a device's packets and its shard
/// then share a core (no cross-CPU wake-up per heartbeat). The kernel falls
/// back to its hash if the index is out of range.
pub fn steer_by_cpu(any_listener: &Socket, listeners: u32) -> io::Result<()> {
    const SKF_AD_OFF: i32 = -0x1000;
    const SKF_AD_CPU: i32 = 36;
    let mut code = [
        // A = the CPU this packet was received on
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: (SKF_AD_OFF + SKF_AD_CPU) as u32,
        },
        // A %= listeners
        libc::sock_filter {
            code: (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: listeners.max(1),
        },
        // return A
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_A) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    attach_reuseport_cbpf(any_listener, &mut code)
}

/// Attaches the classic BPF program `code` to the SO_REUSEPORT group of
/// `any` (one of its sockets): it picks the socket of each connection or
/// datagram (TCP listeners by CPU, UDP heartbeats by ticket).
pub fn attach_reuseport_cbpf(any: &Socket, code: &mut [libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: prog points at `code`, alive for the call; the kernel copies it.
    let r = unsafe {
        libc::setsockopt(
            any.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as u32,
        )
    };
    super::cvt(r).map(drop)
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

/// The listen queue of the whole server by default, split over its
/// listeners (every shard of every `--procs` worker): about a second of
/// upgrades on the box these figures come from (15,000-30,000 a second).
/// A connection that waits longer than that in a storm is one whose device
/// may already have given up (its attempt timeout, often 10 s, counts the
/// SYN retries too), and the server would then serve the dead first: with
/// somaxconn (65,535) per listener, 60 workers queued 3.9M connections
/// (docs/storms.md). Past the queue the kernel drops the SYN, which the
/// device retries: a wait that costs the server nothing.
pub const LISTEN_QUEUE_TOTAL: usize = 16_384;

/// The least backlog a listener gets, however many share the total.
pub const MIN_BACKLOG: i32 = 128;

/// The default backlog of each of `listeners` listeners: its share of
/// [`LISTEN_QUEUE_TOTAL`], at least [`MIN_BACKLOG`], at most `somaxconn`
/// (the kernel's cap, which it would apply silently).
pub fn default_backlog(listeners: usize, somaxconn: Option<i32>) -> i32 {
    let share = (LISTEN_QUEUE_TOTAL / listeners.max(1)).min(i32::MAX as usize) as i32;
    let cap = somaxconn.unwrap_or(4096).max(MIN_BACKLOG);
    share.clamp(MIN_BACKLOG, cap)
}

/// What `accept` said.
pub enum Accepted {
    Socket(RawFd),
    /// Nothing is waiting.
    Empty,
    /// Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), or
    /// a broken listener: pause.
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
        Some(e) if super::is_one_connections(e) => Accepted::Skipped,
        _ => Accepted::Exhausted(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_backlog_is_a_share_of_the_servers_queue() {
        // One process, 2 shards: half each, under a tuned somaxconn.
        assert_eq!(default_backlog(2, Some(65_535)), 8_192);
        // ...and never past somaxconn (this box's default 4,096).
        assert_eq!(default_backlog(2, Some(4_096)), 4_096);
        // 60 workers of one shard: 273 each, 16,380 in all.
        assert_eq!(default_backlog(60, Some(65_535)), 273);
        // Many listeners: at least the floor.
        assert_eq!(default_backlog(1_000, Some(65_535)), MIN_BACKLOG);
        assert_eq!(default_backlog(0, None), 4_096);
    }
}
