//! The kernel side of a handover (issue 22, docs/upgrade.md): batches of
//! descriptors and their records between the old and the new process over a
//! Unix stream socket.
//!
//! A batch is one frame on the socket:
//!
//! ```text
//! header  magic "c1mB" | payload_len u32 LE | fds u16 LE | reserved u16 (0) | seq u32 LE
//! payload payload_len bytes: `c1m_proto::handover` records
//! ```
//!
//! Its descriptors (at most [`MAX_FDS`], the kernel's SCM_MAX_FD) ride in
//! one SCM_RIGHTS message on the frame's first `sendmsg`, so they arrive
//! with the header's first bytes; the records that take a descriptor
//! ([`Record::fds`]) take them in order ([`pair`]). The receiver never reads
//! past a frame (it asks for exactly the header, then exactly the payload),
//! so two frames' descriptors never meet in one `recvmsg`. Partial writes
//! and reads are continued; EINTR is retried.
//!
//! Everything here blocks: run it on a thread of its own, never on a
//! shard's. A shard hands the thread its records and descriptors by message
//! and goes on serving; the thread answers with the peer's Acks. Set a
//! timeout ([`Channel::set_timeout`]) so that a peer that stops answering
//! is an error, not a hang; a peer that closes is an error at once
//! (UnexpectedEof, or EPIPE on a send: sends use MSG_NOSIGNAL).
//!
//! Received descriptors are close-on-exec (MSG_CMSG_CLOEXEC). A receiver out
//! of descriptors (RLIMIT_NOFILE) gets fewer than were sent and MSG_CTRUNC:
//! that is an error here, the descriptors it did get are closed, and the
//! batch counts as not taken. The sender still holds its own copies (it
//! closes them only on the batch's Ack), so the old process goes on serving
//! those connections; the new one must Abort (and its operator raise its
//! limit: it needs as many descriptors as the old one holds).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use c1m_proto::handover::{self, Record};

/// Most descriptors in one SCM_RIGHTS message (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;
/// Bytes of a batch's header.
pub const FRAME_HEADER: usize = 16;
/// Largest payload a receiver takes: 253 connections with their carried
/// and queued bytes fit many times over.
pub const MAX_PAYLOAD: usize = 256 << 20;
const FRAME_MAGIC: [u8; 4] = *b"c1mB";

/// One end of the handover socket.
#[derive(Debug)]
pub struct Channel {
    sock: UnixStream,
}

/// A batch as it arrived: its number, payload and descriptors.
#[derive(Debug, Default)]
pub struct Batch {
    pub seq: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Channel {
    /// Takes a connected Unix stream socket (blocking).
    pub fn new(sock: UnixStream) -> io::Result<Channel> {
        sock.set_nonblocking(false)?;
        Ok(Channel { sock })
    }

    /// A connected pair (both close-on-exec; clear it on the end a child
    /// inherits).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Channel { sock: a }, Channel { sock: b }))
    }

    /// Bounds every send and receive: past `t` without progress they fail
    /// (WouldBlock / TimedOut). None: wait forever.
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)?;
        self.sock.set_write_timeout(t)
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Another handle on the same socket (its timeouts are the socket's,
    /// shared): one thread receives while another sends.
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(Channel {
            sock: self.sock.try_clone()?,
        })
    }

    /// Sends one batch: `payload` and `fds` (at most [`MAX_FDS`]) in one
    /// frame. Returns once the kernel holds all of it.
    pub fn send(&mut self, seq: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} descriptors in one batch: at most {MAX_FDS}", fds.len()),
            ));
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a handover batch over its payload bound",
            ));
        }
        let mut header = [0u8; FRAME_HEADER];
        header[..4].copy_from_slice(&FRAME_MAGIC);
        header[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[8..10].copy_from_slice(&(fds.len() as u16).to_le_bytes());
        header[12..16].copy_from_slice(&seq.to_le_bytes());
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut sent = 0;
        let total = FRAME_HEADER + payload.len();
        while sent < total {
            let (h, p) = if sent < FRAME_HEADER {
                (&header[sent..], payload)
            } else {
                (&header[..0], &payload[sent - FRAME_HEADER..])
            };
            // The descriptors go with the first bytes only.
            let with = if sent == 0 { &raw[..] } else { &[][..] };
            match sendmsg(self.sock.as_raw_fd(), h, p, with) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Receives one batch into `batch` (its payload buffer reused).
    pub fn recv(&mut self, batch: &mut Batch) -> io::Result<()> {
        self.recv_with(batch, MAX_FDS)
    }

    fn recv_with(&mut self, batch: &mut Batch, cmsg_fds: usize) -> io::Result<()> {
        batch.fds.clear();
        batch.payload.clear();
        let mut cmsg = vec![0u64; cmsg_space(cmsg_fds).div_ceil(8)];
        let mut header = [0u8; FRAME_HEADER];
        let mut got = 0;
        while got < FRAME_HEADER {
            got += self.recv_some(&mut header[got..], &mut cmsg, &mut batch.fds)?;
        }
        if header[..4] != FRAME_MAGIC || header[10..12] != [0, 0] {
            return Err(invalid("a handover batch without its header"));
        }
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
        let nfds = u16::from_le_bytes(header[8..10].try_into().unwrap()) as usize;
        batch.seq = u32::from_le_bytes(header[12..16].try_into().unwrap());
        if len > MAX_PAYLOAD || nfds > MAX_FDS {
            return Err(invalid("a handover batch over its bounds"));
        }
        batch.payload.resize(len, 0);
        let mut got = 0;
        let before = batch.fds.len();
        while got < len {
            got += self.recv_some(&mut batch.payload[got..], &mut cmsg, &mut batch.fds)?;
        }
        if batch.fds.len() != before {
            return Err(invalid("descriptors inside a handover batch's payload"));
        }
        if batch.fds.len() != nfds {
            return Err(invalid(&format!(
                "a handover batch announced {nfds} descriptors and carried {}",
                batch.fds.len()
            )));
        }
        Ok(())
    }

    /// One recvmsg into `buf` (not empty): the bytes read, descriptors
    /// appended to `fds`. End of stream and a truncated control message
    /// are errors.
    fn recv_some(
        &mut self,
        buf: &mut [u8],
        cmsg: &mut [u64],
        fds: &mut Vec<OwnedFd>,
    ) -> io::Result<usize> {
        loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: a zeroed msghdr is valid; its pointers are set below
            // to live buffers of the given lengths.
            let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(cmsg) as _;
            // SAFETY: msg describes buffers we own for the call's duration.
            let n =
                unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // Take what descriptors came (so that they are closed on any
            // error below), then judge.
            // SAFETY: the kernel filled msg's control buffer; the CMSG
            // macros walk it within msg_controllen.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                        let data = libc::CMSG_DATA(c) as *const RawFd;
                        let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                        for i in 0..bytes / std::mem::size_of::<RawFd>() {
                            fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            if msg.msg_flags & libc::MSG_CTRUNC != 0 {
                fds.clear();
                return Err(io::Error::other(
                    "descriptors of a handover batch were cut (MSG_CTRUNC): this process is \
                     out of descriptors (raise RLIMIT_NOFILE to at least the old process's)",
                ));
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the handover peer closed its socket in the middle of a batch",
                ));
            }
            return Ok(n as usize);
        }
    }
}

/// The records of a received batch, each with its descriptor (None for a
/// record that takes none): exactly as many descriptors as records take
/// them, else an error (and the descriptors close).
pub fn pair(
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Vec<(Record<'_>, Option<OwnedFd>)>, handover::Error> {
    let mut fds = fds.into_iter();
    let mut out = Vec::new();
    for rec in handover::records(payload) {
        let rec = rec?;
        let fd = match rec.fds() {
            0 => None,
            _ => Some(fds.next().ok_or(handover::Error::Invalid(
                "a batch with fewer descriptors than records",
            ))?),
        };
        out.push((rec, fd));
    }
    if fds.next().is_some() {
        return Err(handover::Error::Invalid(
            "a batch with more descriptors than records",
        ));
    }
    Ok(out)
}

/// Records and descriptors collected for one batch (the sending side).
/// The descriptors stay open in it until the caller takes them back: the
/// old process must hold its copies until the batch's Ack.
#[derive(Debug, Default)]
pub struct Outbox {
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Outbox {
    /// Adds a record and its descriptor (`Some` exactly when the record
    /// takes one). Fails, adding nothing, on a record that does not encode
    /// or a full batch.
    pub fn push(&mut self, rec: &Record<'_>, fd: Option<OwnedFd>) -> io::Result<()> {
        if rec.fds() != usize::from(fd.is_some()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a record and its descriptor do not pair",
            ));
        }
        if fd.is_some() && self.is_full() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the batch holds its 253 descriptors: flush it first",
            ));
        }
        rec.encode(&mut self.payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.fds.extend(fd);
        Ok(())
    }

    /// No room for another descriptor.
    pub fn is_full(&self) -> bool {
        self.fds.len() == MAX_FDS
    }

    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }

    /// Payload bytes so far (to flush before a batch grows too large).
    pub fn bytes(&self) -> usize {
        self.payload.len()
    }

    /// Sends the batch as number `seq` and empties it; returns its
    /// descriptors (this process's copies) to hold until the Ack.
    pub fn flush(&mut self, ch: &mut Channel, seq: u32) -> io::Result<Vec<OwnedFd>> {
        let borrowed: Vec<BorrowedFd<'_>> = self
            .fds
            .iter()
            .map(|f| {
                // SAFETY: borrowed from OwnedFds that outlive the send.
                unsafe { BorrowedFd::borrow_raw(f.as_raw_fd()) }
            })
            .collect();
        ch.send(seq, &self.payload, &borrowed)?;
        drop(borrowed);
        self.payload.clear();
        Ok(std::mem::take(&mut self.fds))
    }
}

/// CLOCK_MONOTONIC against `Instant`: the handover's times are monotonic
/// nanoseconds (one clock for the whole boot, so they mean the same in both
/// processes), a shard's are `Instant`s. One anchor pair, read together,
/// converts both ways within a microsecond.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    at: Instant,
    ns: u64,
}

impl Clock {
    pub fn now() -> Clock {
        let at = Instant::now();
        Clock {
            at,
            ns: monotonic_ns(),
        }
    }

    /// Monotonic nanoseconds of `t`.
    pub fn ns(&self, t: Instant) -> u64 {
        if t >= self.at {
            self.ns
                .saturating_add(t.duration_since(self.at).as_nanos() as u64)
        } else {
            self.ns
                .saturating_sub(self.at.duration_since(t).as_nanos() as u64)
        }
    }

    /// The `Instant` of monotonic nanoseconds `ns` (clamped to what
    /// `Instant` can hold).
    pub fn instant(&self, ns: u64) -> Instant {
        if ns >= self.ns {
            let d = Duration::from_nanos(ns - self.ns);
            self.at.checked_add(d).unwrap_or(self.at)
        } else {
            let d = Duration::from_nanos(self.ns - ns);
            self.at.checked_sub(d).unwrap_or(self.at)
        }
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds: one clock for every shard and
/// process of a host (the one c1m-server stamps upgrades with).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: arithmetic only.
    unsafe { libc::CMSG_SPACE((fds.max(1) * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// One sendmsg of `a` then `b`, with `fds` as SCM_RIGHTS when not empty.
fn sendmsg(sock: RawFd, a: &[u8], b: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: a.as_ptr() as *mut _,
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_ptr() as *mut _,
            iov_len: b.len(),
        },
    ];
    let mut cmsg = vec![0u64; cmsg_space(fds.len()).div_ceil(8)];
    // SAFETY: as in recv_some: a zeroed msghdr pointed at our buffers.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = 2;
    if !fds.is_empty() {
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len()) as _;
        // SAFETY: the control buffer has CMSG_SPACE for fds.len() fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c) as *mut RawFd,
                fds.len(),
            );
        }
    }
    // SAFETY: msg describes live buffers.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use c1m_proto::conn::Phase;
    use c1m_proto::handover::{ConnRecord, ConnState, Listener, ListenerRole, ShardEnd};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    fn conn_record<'a>(i: u32, id: &'a str, output: &'a [u8]) -> Record<'a> {
        Record::Conn(ConnRecord {
            shard: i % 2,
            key: i,
            gen: 1,
            ticket_key: i,
            since_ns: 10,
            last_heard_ns: 20,
            deadline_ns: 30,
            frame_deadline_ns: 0,
            upgraded: true,
            registered: true,
            id,
            remote: None,
            state: ConnState {
                phase: Phase::Open,
                carry: &[],
                message: None,
            },
            output,
        })
    }

    fn timed_pair() -> (Channel, Channel) {
        let (a, b) = Channel::pair().unwrap();
        a.set_timeout(Some(Duration::from_secs(10))).unwrap();
        b.set_timeout(Some(Duration::from_secs(10))).unwrap();
        (a, b)
    }

    /// 1,000 accepted TCP connections and a listener cross in batches of
    /// at most 253 with their records; on the other side each record names
    /// its socket, and the socket is the device's: bytes go both ways
    /// through the received descriptor.
    #[test]
    fn a_thousand_tcp_connections_cross_and_stay_usable() {
        const N: usize = 1000;
        let lst = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = lst.local_addr().unwrap();
        let mut devices = Vec::new();
        let mut accepted = Vec::new();
        for _ in 0..N {
            devices.push(TcpStream::connect(addr).unwrap());
            accepted.push(OwnedFd::from(lst.accept().unwrap().0));
        }
        let (mut tx, mut rx) = timed_pair();
        let sender = std::thread::spawn(move || {
            let mut out = Outbox::default();
            let (mut seq, mut batches) = (0, Vec::new());
            out.push(
                &Record::Listener(Listener {
                    shard: 0,
                    role: ListenerRole::Plain,
                    addr,
                }),
                Some(OwnedFd::from(lst)),
            )
            .unwrap();
            for (i, fd) in accepted.into_iter().enumerate() {
                if out.is_full() {
                    batches.push(out.flush(&mut tx, seq).unwrap().len());
                    seq += 1;
                }
                let id = format!("dev-{i}");
                let output = format!("queued {i};");
                out.push(&conn_record(i as u32, &id, output.as_bytes()), Some(fd))
                    .unwrap();
            }
            out.push(
                &Record::ShardEnd(ShardEnd {
                    shard: 0,
                    listeners: 1,
                    conns: N as u32,
                }),
                None,
            )
            .unwrap();
            batches.push(out.flush(&mut tx, seq).unwrap().len());
            // The old process's copies close here, after the last batch.
            batches
        });
        let mut taken = Vec::new();
        let mut batch = Batch::default();
        let mut listener = None;
        let mut seqs = Vec::new();
        'recv: loop {
            rx.recv(&mut batch).unwrap();
            seqs.push((batch.seq, batch.fds.len()));
            for (rec, fd) in pair(&batch.payload, std::mem::take(&mut batch.fds)).unwrap() {
                match rec {
                    Record::Listener(l) => {
                        assert_eq!(l.addr, addr);
                        listener = Some(TcpListener::from(fd.unwrap()));
                    }
                    Record::Conn(c) => {
                        assert_eq!(c.id, format!("dev-{}", c.key));
                        assert_eq!(c.output, format!("queued {};", c.key).as_bytes());
                        taken.push((c.key as usize, TcpStream::from(fd.unwrap())));
                    }
                    Record::ShardEnd(s) => {
                        assert_eq!((s.listeners, s.conns), (1, N as u32));
                        break 'recv;
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        let sizes = sender.join().unwrap();
        assert_eq!(sizes, [253, 253, 253, 242]);
        assert_eq!(
            seqs,
            [(0, 253), (1, 253), (2, 253), (3, 242)],
            "batch numbers and descriptor counts"
        );
        assert_eq!(taken.len(), N);
        // The listener still accepts, on the new side.
        let late = TcpStream::connect(addr).unwrap();
        let (mut late_srv, _) = listener.unwrap().accept().unwrap();
        late_srv.write_all(b"hi").unwrap();
        // Every connection works both ways through its new descriptor.
        for (key, s) in &mut taken {
            assert!(cloexec(s.as_raw_fd()), "received descriptors are CLOEXEC");
            s.write_all(format!("to {key}").as_bytes()).unwrap();
        }
        for (i, d) in devices.iter_mut().enumerate() {
            let want = format!("to {i}");
            let mut got = vec![0; want.len()];
            d.read_exact(&mut got).unwrap();
            assert_eq!(got, want.as_bytes());
            d.write_all(b"ping").unwrap();
        }
        for (_, s) in &mut taken {
            let mut got = [0; 4];
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping");
        }
        drop(late);
    }

    fn cloexec(fd: RawFd) -> bool {
        // SAFETY: F_GETFD on a descriptor we hold.
        unsafe { libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
    }

    fn pairs(n: usize) -> (Vec<UnixStream>, Vec<UnixStream>) {
        (0..n).map(|_| UnixStream::pair().unwrap()).unzip()
    }

    /// 253 descriptors go in one batch; a 254th does not: the outbox says
    /// it is full and a send of 254 is refused before the kernel sees it.
    #[test]
    fn a_batch_holds_exactly_253() {
        let (mut tx, mut rx) = timed_pair();
        let (mine, theirs) = pairs(254);
        let mut out = Outbox::default();
        let ids: Vec<String> = (0..254).map(|i| format!("d{i}")).collect();
        let mut theirs = theirs.into_iter();
        for (i, id) in ids.iter().enumerate().take(253) {
            out.push(
                &conn_record(i as u32, id, b""),
                theirs.next().map(OwnedFd::from),
            )
            .unwrap();
        }
        assert!(out.is_full());
        let last = theirs.next().unwrap();
        let e = out
            .push(
                &conn_record(253, &ids[253], b""),
                Some(OwnedFd::from(last.try_clone().unwrap())),
            )
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let borrowed: Vec<_> = (0..254).map(|_| last.as_fd()).collect();
        assert_eq!(
            tx.send(0, b"", &borrowed).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let sent = out.flush(&mut tx, 7).unwrap();
        assert_eq!(sent.len(), 253);
        // The 254th goes in the next batch.
        out.push(&conn_record(253, &ids[253], b""), Some(OwnedFd::from(last)))
            .unwrap();
        out.flush(&mut tx, 8).unwrap();
        drop(sent);

        let mut b = Batch::default();
        rx.recv(&mut b).unwrap();
        assert_eq!((b.seq, b.fds.len()), (7, 253));
        let recs = pair(&b.payload, std::mem::take(&mut b.fds)).unwrap();
        assert_eq!(recs.len(), 253);
        // Each received descriptor is the right socket: write through it.
        for (i, (rec, fd)) in recs.into_iter().enumerate() {
            let Record::Conn(c) = rec else { panic!() };
            assert_eq!(c.key as usize, i);
            UnixStream::from(fd.unwrap()).write_all(&[i as u8]).unwrap();
        }
        for (i, mut m) in mine.into_iter().enumerate().take(253) {
            let mut got = [0];
            m.read_exact(&mut got).unwrap();
            assert_eq!(got[0], i as u8);
        }
        rx.recv(&mut b).unwrap();
        assert_eq!((b.seq, b.fds.len()), (8, 1));
    }

    /// A peer gone before or in the middle of a batch is an error at once.
    #[test]
    fn a_peer_that_closes_mid_batch_is_an_error_not_a_hang() {
        // Closed before anything.
        let (tx, mut rx) = timed_pair();
        drop(tx);
        let e = rx.recv(&mut Batch::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);

        // Inside the header, and inside the payload (after descriptors).
        for cut in [7, FRAME_HEADER + 10] {
            let (tx, mut rx) = timed_pair();
            let (_a, b) = UnixStream::pair().unwrap();
            let mut header = [0u8; FRAME_HEADER];
            header[..4].copy_from_slice(&FRAME_MAGIC);
            header[4..8].copy_from_slice(&100u32.to_le_bytes());
            header[8..10].copy_from_slice(&1u16.to_le_bytes());
            let mut frame = header.to_vec();
            frame.extend_from_slice(&[0; 100]);
            let n = sendmsg(tx.as_raw_fd(), &frame[..cut], &[], &[b.as_raw_fd()]).unwrap();
            assert_eq!(n, cut);
            drop(tx);
            let t = Instant::now();
            let e = rx.recv(&mut Batch::default()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut {cut}");
            assert!(t.elapsed() < Duration::from_secs(2));
        }

        // A sender whose receiver is gone: EPIPE, no SIGPIPE.
        let (mut tx, rx) = timed_pair();
        drop(rx);
        let (_a, b) = UnixStream::pair().unwrap();
        let e = tx.send(0, &vec![0; 1 << 20], &[b.as_fd()]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    /// A peer alive but silent: the timeout turns the wait into an error.
    #[test]
    fn a_silent_peer_times_out() {
        let (_tx, mut rx) = Channel::pair().unwrap();
        rx.set_timeout(Some(Duration::from_millis(100))).unwrap();
        let e = rx.recv(&mut Batch::default()).unwrap_err();
        assert!(matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
    }

    /// Fewer descriptors than the batch carried fit (a receiver out of
    /// descriptors): MSG_CTRUNC is an error, and so is a count that does
    /// not match the header or the records.
    #[test]
    fn truncated_or_mismatched_descriptors_are_errors() {
        let (mut tx, mut rx) = timed_pair();
        let (_mine, theirs) = pairs(10);
        let fds: Vec<_> = theirs.iter().map(|s| s.as_fd()).collect();
        tx.send(0, b"", &fds).unwrap();
        let e = rx.recv_with(&mut Batch::default(), 4).unwrap_err();
        assert!(e.to_string().contains("MSG_CTRUNC"), "{e}");

        // The header says 2, one came.
        let (tx, mut rx) = timed_pair();
        let mut header = [0u8; FRAME_HEADER];
        header[..4].copy_from_slice(&FRAME_MAGIC);
        header[8..10].copy_from_slice(&2u16.to_le_bytes());
        sendmsg(tx.as_raw_fd(), &header, &[], &[fds[0].as_raw_fd()]).unwrap();
        let e = rx.recv(&mut Batch::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        // Two records that take descriptors, one descriptor.
        let mut out = Vec::new();
        conn_record(0, "a", b"").encode(&mut out).unwrap();
        conn_record(1, "b", b"").encode(&mut out).unwrap();
        let one = vec![OwnedFd::from(theirs[0].try_clone().unwrap())];
        assert!(pair(&out, one).is_err());
        let three = (0..3)
            .map(|i| OwnedFd::from(theirs[i].try_clone().unwrap()))
            .collect();
        assert!(pair(&out, three).is_err());
        // Bytes that are not records.
        assert!(pair(b"garbage", Vec::new()).is_err());
    }

    #[test]
    fn the_clock_converts_both_ways() {
        let c = Clock::now();
        let now = monotonic_ns();
        assert!(now >= c.ns && now - c.ns < 1_000_000_000);
        let later = c.at + Duration::from_secs(20);
        assert_eq!(c.ns(later), c.ns + 20_000_000_000);
        assert_eq!(c.instant(c.ns(later)), later);
        let earlier = c.instant(c.ns - 5_000);
        assert_eq!(c.ns(earlier), c.ns - 5_000);
    }
}
