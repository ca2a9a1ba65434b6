//! UDP heartbeats (`--udp-heartbeat`): the shards' UDP sockets, one per
//! shard in one SO_REUSEPORT group on the device port, with a classic BPF
//! program that sends each datagram to the socket of the shard its ticket
//! names ([`c1m_proto::ticket`]); and the batched system calls both
//! ends use (recvmmsg in the server's epoll driver, sendmmsg in the client).
//!
//! The program returns the big-endian u16 at offset 0 of the payload as an
//! index into the group (offset 0 is the payload's first byte: the kernel
//! has pulled the UDP header before it runs a reuseport program, as this
//! module's test `datagrams_reach_the_socket_their_first_u16_names`
//! checks). The index is a socket's position in the group,
//! which is its join (bind) order as long as no socket of the group closes
//! (a close moves the last socket into the hole). So the group is bound in
//! shard order by one process and every socket stays open until the server
//! exits: the binder keeps a descriptor of each ([`bind_group`]). An index
//! past the group's end makes the kernel fall back to its hash; that shard
//! then counts the datagram as bad.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Largest datagram read whole: longer ones are cut (and are not tickets).
pub const DATAGRAM: usize = 64;
/// Datagrams read per recvmmsg.
pub const BATCH: usize = 64;

/// Receive buffer asked for each shard's UDP socket: datagrams have no
/// flow control, so a burst (a fleet heartbeating at once) waits here
/// until the shard reads it. The default (212,992 B, a few hundred small
/// datagrams) dropped 46,039 of 900,000 last heartbeats in the 1M storm
/// (results/1m-20261206T181725Z-udp). 8 MiB holds about ten thousand.
pub const RCVBUF: usize = 8 << 20;

/// Asks for [`RCVBUF`]: SO_RCVBUFFORCE where the process may (root or
/// CAP_NET_ADMIN), else SO_RCVBUF, which net.core.rmem_max caps. Returns
/// the size the kernel granted (it reports double what it accounts for).
fn size_receive_buffer(s: &Socket) -> io::Result<usize> {
    let want = RCVBUF as libc::c_int;
    // SAFETY: an int option on our own socket.
    let forced = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&want as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if forced != 0 {
        s.set_recv_buffer_size(RCVBUF)?;
    }
    s.recv_buffer_size()
}

/// Binds `n` non-blocking UDP sockets on `addr` in a new SO_REUSEPORT
/// group, socket i at position i, with the ticket program attached. Fails
/// if a UDP socket already holds `addr` (another server's group would
/// otherwise be joined, and positions shift).
pub fn bind_group(addr: SocketAddr, n: usize) -> io::Result<Vec<Socket>> {
    {
        // Bound without SO_REUSEPORT: fails with EADDRINUSE exactly when
        // something holds the address.
        let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        probe.bind(&SockAddr::from(addr))?;
    }
    let mut group = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.set_cloexec(true)?;
        s.bind(&SockAddr::from(addr))?;
        let got = size_receive_buffer(&s)?;
        if got < RCVBUF && group.is_empty() {
            eprintln!(
                "server: warning: --udp-heartbeat's sockets get {} KiB of receive buffer, not {} KiB: net.core.rmem_max caps it (kernel-tuning/ raises it); bursts of heartbeats past it are dropped (RcvbufErrors in /proc/net/snmp) and may expire devices early",
                got >> 10,
                RCVBUF >> 10
            );
        }
        group.push(s);
    }
    if let Some(first) = group.first() {
        steer_by_ticket(first)?;
    }
    Ok(group)
}

/// The environment variable a `--procs` parent names a worker's UDP
/// sockets in: `FD,FD,...`, the worker's shards' in order.
pub const ENV: &str = "C1M_UDP";
/// The lowest descriptor a parent keeps the group's sockets at: above the
/// descriptors a worker's start-up moves (the link goes to 3).
pub const PARENT_FD_MIN: i32 = 10;

/// Moves `s` to a descriptor of at least [`PARENT_FD_MIN`] (close-on-exec).
pub fn above_low_fds(s: Socket) -> io::Result<Socket> {
    if s.as_raw_fd() >= PARENT_FD_MIN {
        return Ok(s);
    }
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor owned from here on.
    let fd =
        super::cvt(unsafe { libc::fcntl(s.as_raw_fd(), libc::F_DUPFD_CLOEXEC, PARENT_FD_MIN) })?;
    Ok(unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The UDP sockets a `--procs` parent bound for this worker, if it is one
/// that got some ([`ENV`]).
pub fn inherited() -> Result<Option<Vec<Socket>>, String> {
    let Some(v) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    let bad = || {
        format!("{ENV} is not a list of descriptors ({v:?}); it is set by a --procs parent only")
    };
    let s = v.to_str().ok_or_else(bad)?;
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let fd: RawFd = part.parse().map_err(|_| bad())?;
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("{ENV} names descriptor {fd}, which is not open"));
        }
        // SAFETY: the parent left it open for this process alone; nothing
        // else here owns it. Close-on-exec again: no child inherits it.
        let sock = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        sock.set_cloexec(true)
            .map_err(|e| format!("{ENV}: descriptor {fd}: {e}"))?;
        out.push(sock);
    }
    Ok(Some(out))
}

/// Attaches the program `ldh [0]; ret a` to the group of `any`.
pub fn steer_by_ticket(any: &Socket) -> io::Result<()> {
    let mut code = [
        // A = the u16 at payload offset 0, big-endian (a datagram shorter
        // than 2 bytes ends the program with 0: socket 0, which drops it)
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        // return A (past the group's end: the kernel's hash decides)
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_A) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    super::listener::attach_reuseport_cbpf(any, &mut code)
}

/// Buffers for one recvmmsg: [`BATCH`] datagrams of up to [`DATAGRAM`]
/// bytes, and the lengths read. 4 KiB, made only when UDP is on.
pub struct RecvBatch {
    bufs: Box<[[u8; DATAGRAM]; BATCH]>,
    lens: [usize; BATCH],
    count: usize,
    cursor: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: Box::new([[0; DATAGRAM]; BATCH]),
            lens: [0; BATCH],
            count: 0,
            cursor: 0,
        }
    }
}

impl RecvBatch {
    /// Reads up to [`BATCH`] datagrams from `fd` without waiting; returns
    /// how many (0: none queued, or an error the next readiness retries).
    pub fn fill(&mut self, fd: RawFd) -> usize {
        // SAFETY: zeroed mmsghdr/iovec are valid (null name and control).
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, (v, h)) in iov.iter_mut().zip(hdrs.iter_mut()).enumerate() {
            v.iov_base = self.bufs[i].as_mut_ptr().cast();
            v.iov_len = DATAGRAM;
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
        }
        let n = loop {
            // SAFETY: every header points at a live iovec over a live buffer.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    hdrs.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break 0;
            }
        };
        for (len, h) in self.lens.iter_mut().zip(&hdrs[..n]) {
            *len = h.msg_len as usize;
        }
        self.count = n;
        self.cursor = 0;
        n
    }

    /// Datagrams of the last fill not yet taken.
    pub fn pending(&self) -> bool {
        self.cursor < self.count
    }

    /// The next datagram of the last [`RecvBatch::fill`].
    pub fn take(&mut self) -> Option<&[u8]> {
        if self.cursor == self.count {
            return None;
        }
        let i = self.cursor;
        self.cursor += 1;
        Some(&self.bufs[i][..self.lens[i].min(DATAGRAM)])
    }

    /// True when a full batch was read: more may be queued.
    pub fn was_full(&self) -> bool {
        self.count == BATCH
    }
}

/// Sends each of `datagrams` (payload, destination) from `fd` with as few
/// sendmmsg calls as it takes ([`BATCH`] per call); returns how many the
/// kernel took (a full socket buffer stops the rest: UDP is best effort).
pub fn send_batch(fd: RawFd, datagrams: &[([u8; c1m_proto::ticket::LEN], SocketAddr)]) -> usize {
    let mut sent = 0;
    for chunk in datagrams.chunks(BATCH) {
        // SAFETY: zeroed structures are valid; filled below.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
        for (i, (bytes, to)) in chunk.iter().enumerate() {
            let addr = SockAddr::from(*to);
            // SAFETY: a SockAddr's storage is a sockaddr_storage of its length.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    addr.as_ptr().cast::<u8>(),
                    (&mut names[i] as *mut libc::sockaddr_storage).cast::<u8>(),
                    addr.len() as usize,
                );
            }
            iov[i].iov_base = bytes.as_ptr() as *mut libc::c_void;
            iov[i].iov_len = bytes.len();
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = addr.len();
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
        }
        let mut off = 0;
        while off < chunk.len() {
            // SAFETY: headers point at live names, iovecs and payloads.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    hdrs[off..].as_mut_ptr(),
                    (chunk.len() - off) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return sent;
            }
            off += n as usize;
            sent += n as usize;
        }
    }
    sent
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    use crate::{Driver, Event};

    /// The datagrams `d` reports within `window`.
    fn read_for(d: &mut impl Driver, window: Duration) -> Vec<Vec<u8>> {
        let end = Instant::now() + window;
        let mut got = Vec::new();
        while Instant::now() < end {
            d.wait(Duration::from_millis(10)).unwrap();
            while let Some(e) = d.next() {
                if let Event::Datagram(b) = e {
                    got.push(b.to_vec());
                }
            }
        }
        got
    }

    /// A driver's `stop_datagrams` (a hot upgrade's old process): what it
    /// read before is reported, nothing after; what comes meanwhile stays
    /// in the socket for its other reader (the new process); and
    /// `resume_datagrams` (a failed upgrade) reads again. Run by each
    /// driver's tests.
    pub(crate) fn a_stopped_driver_leaves_datagrams_to_the_other_reader(d: &mut impl Driver) {
        let rx = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        rx.bind(&SockAddr::from(
            "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
        ))
        .unwrap();
        rx.set_nonblocking(true).unwrap();
        let to = rx.local_addr().unwrap().as_socket().unwrap();
        d.watch_datagrams(rx.try_clone().unwrap()).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();

        tx.send_to(b"before", to).unwrap();
        assert_eq!(
            read_for(d, Duration::from_millis(100)),
            vec![b"before".to_vec()]
        );

        d.stop_datagrams();
        let end = Instant::now() + Duration::from_secs(2);
        while d.stopping_datagrams() {
            assert!(Instant::now() < end, "the stop never took hold");
            assert!(read_for(d, Duration::from_millis(10)).is_empty());
        }
        tx.send_to(b"between", to).unwrap();
        assert!(read_for(d, Duration::from_millis(100)).is_empty());
        let mut buf = [0u8; 16];
        // SAFETY: recv into a valid buffer of its length.
        let n = unsafe {
            libc::recv(
                rx.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        assert_eq!(&buf[..n.max(0) as usize], b"between", "left in the socket");

        d.resume_datagrams().unwrap();
        tx.send_to(b"after", to).unwrap();
        assert_eq!(
            read_for(d, Duration::from_millis(100)),
            vec![b"after".to_vec()]
        );
    }

    /// Each datagram reaches the socket its first two bytes name, over
    /// fresh source ports; an index past the group lands somewhere and is
    /// read whole.
    #[test]
    fn datagrams_reach_the_socket_their_first_u16_names() {
        let free = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let group = bind_group(addr, 3).unwrap();
        assert!(bind_group(addr, 1).is_err(), "a held port is refused");
        let mut out = Vec::new();
        for i in 0..30u16 {
            let mut t = [0u8; c1m_proto::ticket::LEN];
            t[..2].copy_from_slice(&(i % 3).to_be_bytes());
            t[2] = i as u8;
            out.push((t, addr));
        }
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(send_batch(sender.as_raw_fd(), &out), 30);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut b = RecvBatch::default();
        for (k, s) in group.iter().enumerate() {
            assert_eq!(b.fill(s.as_raw_fd()), 10, "socket {k}");
            while let Some(d) = b.take() {
                assert_eq!(d.len(), c1m_proto::ticket::LEN);
                assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, k);
            }
            assert_eq!(b.fill(s.as_raw_fd()), 0);
        }
    }
}
