//! The io_uring backend: one ring per loop, created on the loop's thread
//! with SINGLE_ISSUER and DEFER_TASKRUN (COOP_TASKRUN where the kernel
//! lacks it), its own fd registered.
//!
//! - One multishot accept on the loop's SO_REUSEPORT listener.
//! - One multishot recv per connection into a provided buffer ring shared
//!   by the loop's connections: a buffer goes back to the ring as soon as
//!   the user has its bytes (the next call to [`Driver::next`]), so an idle
//!   connection owns no buffer.
//! - Sends are SQEs from loop-owned buffers (reused, not allocated per
//!   send), one in flight per connection, the rest held and bounded.
//! - One `io_uring_enter` per loop iteration submits everything queued and
//!   waits for a completion or the next deadline (EXT_ARG's timeout: no
//!   timeout SQE, so nothing to cancel).
//! - Never IORING_OP_ASYNC_CANCEL: the kernel's cancel walks a hash bucket
//!   holding every armed request, which made stock glommio's heartbeat
//!   dearer with every idle connection. A connection's multishot recv is
//!   ended by `shutdown(SHUT_RD)` (which sends nothing to the peer; a system
//!   call, see [`shutdown`] why not an SQE); after its last completion the
//!   socket is closed by a Close SQE, after SO_LINGER 0 when the close is
//!   abortive, so a batch of deletions' closes costs one enter.
//! - The completion queue is sized for bursts; with FEAT_NODROP the kernel
//!   holds what does not fit, and every wait that sees that is counted.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Submitter};
use slab::Slab;

use super::{cvt, is_one_connections, socket, Close, Driver, DriverConfig, Event, Handle, IoStats};
use super::{Sent, Token};

const SQ_ENTRIES: u32 = 1024;
/// Completions a loop can take at once: a burst of arrivals, accepts and
/// deletions between two waits. More waits in the kernel (FEAT_NODROP).
/// 128 KiB of ring per shard.
const CQ_ENTRIES: u32 = 8 * 1024;
/// Provided buffers: the arrivals of one wait (with DEFER_TASKRUN the
/// kernel fills them only while the loop is in io_uring_enter); past it a
/// recv ends with ENOBUFS and is re-armed. A fixed cost per shard that
/// every page of is touched (the ring hands them out in turn), and that
/// matters at 120 shards (1M devices under --procs 60), so small:
/// - Linux 6.12+: incremental consumption (IOU_PBUF_RING_INC), 16 buffers
///   of 8 KiB, 128 KiB per shard; a recv takes only the bytes it got, so
///   a wait's heartbeats (tens of bytes each) fill thousands, not 16.
/// - Before: one recv per buffer, 512 of 1 KiB, 512 KiB per shard.
const INC_BUFS: u16 = 16;
const INC_BUF_LEN: usize = 8 * 1024;
const BUFS: u16 = 512;
const BUF_LEN: usize = 1024;
const BGID: u16 = 7;
/// IOU_PBUF_RING_INC (not exported by the io-uring crate).
const PBUF_RING_INC: u16 = 2;
/// --udp-heartbeat: the datagrams' own buffer ring (made only then), 256
/// buffers of 128 bytes: the 16-byte io_uring_recvmsg_out, then the
/// payload (longer datagrams are cut, and are not tickets anyway).
const UDP_BUFS: u16 = 256;
const UDP_BUF_LEN: usize = 128;
const UDP_BGID: u16 = 8;
/// io_uring_recvmsg_out: namelen, controllen, payloadlen, flags (u32s).
const RECVMSG_OUT: usize = 16;
/// A send buffer larger than this is freed, not kept for reuse.
const KEEP_SEND_BUF: usize = 4096;
const KEEP_SEND_BUFS: usize = 1024;
/// Submits tried for one SQE while the submission queue stays full before
/// the driver gives up (its next wait fails, and with it the shard): about
/// a second when the kernel answers EAGAIN (out of memory) every time.
const PUSH_TRIES: u32 = 1000;
/// Completions moved out of the kernel's queue at most while submits are
/// refused (EBUSY: the completion queue is backed up).
const BACKLOG_MAX: usize = 64 * 1024;

/// What a completion is about: the top byte of its user_data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Recv,
    Send,
    Connect,
    Wake,
    Close,
    Udp,
}

impl Op {
    /// [`Token::pack`] of the index and the op.
    fn data(self, index: usize) -> u64 {
        Token::pack(index, self as u32).0
    }

    fn of(data: u64) -> Option<(Op, usize)> {
        let t = Token(data);
        let op = match t.gen() {
            1 => Op::Accept,
            2 => Op::Recv,
            3 => Op::Send,
            4 => Op::Connect,
            5 => Op::Wake,
            6 => Op::Close,
            7 => Op::Udp,
            _ => return None,
        };
        Some((op, t.key()))
    }
}

// Connection flags.
/// A multishot recv is armed (its last completion has not come).
const RECV_ARMED: u16 = 1;
/// The connect's writability poll is armed.
const CONNECTING: u16 = 2;
/// The user closed it: no more events; the driver finishes the close.
const CLOSING: u16 = 4;
/// Hangup reported: no more events.
const HUNG: u16 = 8;
/// The user waits for an [`Event::Flushed`].
const NOTIFY: u16 = 16;
/// shutdown(2) submitted.
const SHUT: u16 = 32;
/// Closing with a reset.
const ABORTIVE: u16 = 64;
/// Being released for a hot upgrade ([`Driver::release`]): its recv was
/// cancelled and is not re-armed; once no send is in flight, output is
/// held for the hand-back ([`HOLD`]), not sent.
const RELEASING: u16 = 128;
/// The connect's poll completed with writability alone (no error, no
/// hang-up): it succeeded, and [`Driver::socket_error`] says 0 without a
/// system call.
const CONNECTED: u16 = 256;

const NO_SEND: u32 = u32::MAX;
/// `inflight` of a connection being released with no send in flight: sends
/// take the held path (nothing more goes out), at no cost to `send`'s
/// common path, which tests `inflight` anyway.
const HOLD: u32 = u32::MAX - 1;

/// 24 bytes, and so is its slab entry (OwnedFd's niche holds the vacant
/// tag): every byte here is paid per connection slot.
struct Conn {
    /// Closed by a Close SQE (its number taken out first), or on drop.
    fd: OwnedFd,
    /// Index of the send in flight in `sends`, or NO_SEND.
    inflight: u32,
    /// Index in `held` of the output waiting for the send in flight, or
    /// NO_SEND (an idle connection holds no Vec, not even an empty one).
    pending: u32,
    flags: u16,
    token: Token,
}

impl Conn {
    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The provided buffer ring: `BUFS` entries of {addr, len, bid} that the
/// kernel takes buffers from, and the buffers themselves.
///
/// Both are mappings of their own, not the allocator's: a freed mmapped
/// chunk of malloc's (the probe's ring dropped) raises glibc's dynamic mmap
/// threshold past it, and then every slab that grows later (slots, conns)
/// is reallocated by copying inside the thread's arena, leaving the old
/// copies resident: that was 1.4 MB at 15,000 connections on 2 shards,
/// 90 B per connection.
struct BufRing {
    ring: *mut libc::c_void,
    ring_bytes: usize,
    mem: *mut u8,
    tail: u16,
    /// Buffers (a power of two) and the bytes of each.
    count: u16,
    len: usize,
    /// Registered with IOU_PBUF_RING_INC: the kernel fills a buffer in
    /// pieces, and `used[bid]` is where its next piece starts. The kernel
    /// moves past a buffer exactly when it is full, and only then does it
    /// come back to the ring.
    used: Option<Box<[u32]>>,
}

impl BufRing {
    fn new(count: u16, len: usize) -> io::Result<BufRing> {
        let ring_bytes = count as usize * 16;
        let ring = map(ring_bytes)?;
        let mem = match map(count as usize * len) {
            Ok(mem) => mem.cast(),
            Err(e) => {
                // SAFETY: mapped just above, not used.
                unsafe { libc::munmap(ring, ring_bytes) };
                return Err(e);
            }
        };
        let mut b = BufRing {
            ring,
            ring_bytes,
            mem,
            tail: 0,
            count,
            len,
            used: None,
        };
        for bid in 0..count {
            b.put(bid);
        }
        b.publish();
        Ok(b)
    }

    /// Writes buffer `bid` at the tail (not yet visible to the kernel).
    fn put(&mut self, bid: u16) {
        let slot = (self.tail & (self.count - 1)) as usize;
        let addr = self.mem as u64 + bid as u64 * self.len as u64;
        // SAFETY: slot < count, and the mapping holds count entries of 16
        // bytes: {u64 addr, u32 len, u16 bid, u16 resv}.
        unsafe {
            let e = (self.ring as *mut u8).add(slot * 16);
            (e as *mut u64).write(addr);
            (e.add(8) as *mut u32).write(self.len as u32);
            (e.add(12) as *mut u16).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers put so far visible: the tail is the u16 at byte 14.
    fn publish(&self) {
        // SAFETY: byte 14 of the mapping is the ring's tail, a u16 the
        // kernel reads with acquire semantics.
        let tail = unsafe { &*((self.ring as *mut u8).add(14) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    fn give_back(&mut self, bid: u16) {
        self.put(bid);
        self.publish();
    }

    fn bytes(&mut self, bid: u16, len: usize) -> &mut [u8] {
        self.bytes_at(bid, 0, len)
    }

    /// `len` bytes of buffer `bid` from `offset`.
    fn bytes_at(&mut self, bid: u16, offset: usize, len: usize) -> &mut [u8] {
        assert!(bid < self.count, "a provided buffer id out of range");
        let offset = offset.min(self.len);
        // SAFETY: the range is inside buffer `bid`, inside the mapping of
        // count * len bytes, and it is ours (its completion came).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.mem.add(bid as usize * self.len + offset),
                len.min(self.len - offset),
            )
        }
    }

    /// Takes the `res` bytes a recv completion put in buffer `bid`: where
    /// they start, and whether the kernel is done with the buffer (then it
    /// goes back to the ring once the bytes are used).
    fn take(&mut self, bid: u16, res: usize) -> (usize, bool) {
        let Some(used) = &mut self.used else {
            return (0, true);
        };
        let Some(u) = used.get_mut(bid as usize) else {
            return (0, true);
        };
        let start = *u as usize;
        let end = start + res;
        if end >= self.len {
            *u = 0;
            (start, true)
        } else {
            *u = end as u32;
            (start, false)
        }
    }

    /// A recv completion on `bid` whose bytes nobody wants.
    fn discard(&mut self, bid: u16, res: i32) {
        if self.used.is_none() {
            self.give_back(bid);
        } else if res > 0 && self.take(bid, res as usize).1 {
            // Incremental: a failed recv consumed nothing of the buffer.
            self.give_back(bid);
        }
    }
}

/// An anonymous private mapping of `bytes` (page-aligned, zeroed).
fn map(bytes: usize) -> io::Result<*mut libc::c_void> {
    // SAFETY: a new anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p)
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mappings made in new(); the ring was unregistered
        // first, so the kernel no longer writes into the buffers.
        unsafe {
            libc::munmap(self.ring, self.ring_bytes);
            libc::munmap(self.mem.cast(), self.count as usize * self.len);
        }
    }
}

/// The UDP side (--udp-heartbeat): one multishot recvmsg into its own
/// provided buffers, each completion one datagram.
struct Udp {
    sock: socket2::Socket,
    bufs: BufRing,
    /// Only msg_namelen and msg_controllen count (both 0: no address, no
    /// control data); the kernel reads it while the request lives.
    msghdr: libc::msghdr,
}

/// With a batch wait, how many completions end a wait before its window
/// has passed (a batch that large is worth a wake-up at once).
const BATCH_WANT: usize = 64;

pub struct UringDriver {
    /// The ring, leaked so that `submitter` (which borrows it and alone
    /// remembers the registered ring fd) can live beside it; freed in Drop.
    ring: &'static IoUring,
    submitter: Submitter<'static>,
    conns: Slab<Conn>,
    /// Buffers of the sends in flight, and spare ones for the next sends.
    sends: Slab<Vec<u8>>,
    /// Output held behind a send in flight ([`Conn::pending`]).
    held: Slab<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    bufs: BufRing,
    /// The buffer of the last [`Event::Data`], given back on the next call.
    lent: Option<u16>,
    /// --udp-heartbeat: the UDP socket, its buffer ring and the msghdr its
    /// multishot recvmsg reads its layout from (none when off).
    udp: Option<Box<Udp>>,
    /// The buffer of the last [`Event::Datagram`], given back on the next call.
    lent_udp: Option<u16>,
    /// The multishot recvmsg is in the kernel; and whether
    /// [`Driver::stop_datagrams`] asked it to end (not re-armed then).
    udp_armed: bool,
    udp_stopped: bool,
    listener: Option<socket2::Socket>,
    accept_armed: bool,
    accept_paused: bool,
    /// The listener was handed over ([`Driver::take_listener`]): a
    /// connection its cancelled accept still took is reported, not dropped
    /// (the loop hands it over too).
    listener_handed: bool,
    wake: Option<OwnedFd>,
    max_pending: usize,
    stats: IoStats,
    /// [`Driver::release_progress`].
    release_progress: u64,
    fault: super::FaultHook,
    /// Completions taken from the ring while a full submission queue could
    /// not be submitted; handed out first.
    backlog: VecDeque<cqueue::Entry>,
    /// Why the ring cannot go on: the next wait returns it.
    stuck: Option<String>,
    /// [`Driver::set_batch_wait`]: the min-wait of a wait, in microseconds
    /// (0: off), and whether the kernel has it (IORING_FEAT_MIN_TIMEOUT).
    batch_wait_us: u32,
    min_timeout: bool,
    /// Connections closed by the user and still in `conns` (see
    /// [`Driver::closing`]).
    closing: usize,
    /// Tests: every submit fails with this errno.
    #[cfg(test)]
    fail_submits: Option<i32>,
}

/// Whether io_uring has what this backend needs here: a ring with the
/// features, a provided buffer ring, and a multishot recv that delivers.
/// The error says what is missing.
pub fn probe() -> Result<(), String> {
    if std::env::var_os("C1M_IO_URING_PROBE_FAIL").is_some_and(|v| v == "1") {
        return Err("C1M_IO_URING_PROBE_FAIL=1 is set".into());
    }
    let mut d = UringDriver::new(DriverConfig { max_pending: 1024 }).map_err(|e| e.to_string())?;
    let mut fds = [0; 2];
    // SAFETY: fds is valid for two descriptors.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })
    .map_err(|e| format!("socketpair: {e}"))?;
    // SAFETY: socketpair returned both and nothing else owns them.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let h = d
        .register(a, Token(1), false)
        .map_err(|e| format!("multishot recv: {e}"))?;
    for round in 0..2 {
        socket::send(b.as_raw_fd(), b"probe").map_err(|e| e.to_string())?;
        d.wait(Duration::from_millis(500))
            .map_err(|e| format!("io_uring_enter: {e}"))?;
        match d.next() {
            Some(Event::Data(Token(1), bytes)) if bytes == b"probe" => {}
            other => {
                return Err(format!(
                "multishot recv with provided buffers did not deliver (round {round}: {other:?})"
            ))
            }
        }
        while d.next().is_some() {}
    }
    d.close(h, Close::Abortive);
    Ok(())
}

impl UringDriver {
    pub fn new(cfg: DriverConfig) -> io::Result<UringDriver> {
        UringDriver::with_bufs(cfg, true)
    }

    /// `incremental`: try IOU_PBUF_RING_INC first (the tests turn it off
    /// to cover what kernels before 6.12 get).
    fn with_bufs(cfg: DriverConfig, incremental: bool) -> io::Result<UringDriver> {
        let mut builder = IoUring::builder();
        builder
            .setup_cqsize(CQ_ENTRIES)
            .setup_single_issuer()
            .setup_defer_taskrun();
        let ring = match builder.build(SQ_ENTRIES) {
            Ok(r) => r,
            // Before 6.1 there is no DEFER_TASKRUN; COOP_TASKRUN (5.19)
            // still keeps task work from interrupting the loop.
            Err(_) => IoUring::builder()
                .setup_cqsize(CQ_ENTRIES)
                .setup_coop_taskrun()
                .build(SQ_ENTRIES)?,
        };
        let params = ring.params();
        let min_timeout = params.is_feature_min_timeout();
        if !params.is_feature_nodrop() || !params.is_feature_ext_arg() {
            return Err(io::Error::other(
                "the kernel's io_uring lacks FEAT_NODROP or FEAT_EXT_ARG (Linux 5.11+)",
            ));
        }
        let ring: &'static IoUring = Box::leak(Box::new(ring));
        let mut submitter = ring.submitter();
        // Saves a descriptor lookup on every enter; optional (5.18+).
        let _ = submitter.register_ring_fd();
        let mut registered = Err(io::Error::other("not tried"));
        let mut bufs = None;
        for (count, len, flags) in [(INC_BUFS, INC_BUF_LEN, PBUF_RING_INC), (BUFS, BUF_LEN, 0)] {
            if flags != 0 && !incremental {
                continue;
            }
            let mut b = match BufRing::new(count, len) {
                Ok(b) => b,
                Err(e) => {
                    registered = Err(e);
                    break;
                }
            };
            // SAFETY: the ring memory lives in `bufs` until unregistered in Drop.
            registered = unsafe {
                submitter.register_buf_ring_with_flags(b.ring as u64, count, BGID, flags)
            };
            if registered.is_ok() {
                if flags != 0 {
                    b.used = Some(vec![0; count as usize].into_boxed_slice());
                }
                bufs = Some(b);
                break;
            }
        }
        let (true, Some(bufs)) = (registered.is_ok(), bufs) else {
            let e = registered
                .err()
                .unwrap_or_else(|| io::Error::other("no buffer ring"));
            // SAFETY: leaked just above and not shared.
            drop(unsafe { Box::from_raw(ring as *const IoUring as *mut IoUring) });
            return Err(io::Error::new(
                e.kind(),
                format!("provided buffer ring (Linux 5.19+): {e}"),
            ));
        };
        Ok(UringDriver {
            ring,
            submitter,
            conns: Slab::new(),
            sends: Slab::new(),
            held: Slab::new(),
            spare: Vec::new(),
            bufs,
            lent: None,
            udp: None,
            lent_udp: None,
            udp_armed: false,
            udp_stopped: false,
            listener: None,
            accept_armed: false,
            accept_paused: false,
            listener_handed: false,
            wake: None,
            max_pending: cfg.max_pending,
            stats: IoStats::default(),
            release_progress: 0,
            fault: super::FaultHook::from_env(),
            backlog: VecDeque::new(),
            stuck: None,
            batch_wait_us: 0,
            min_timeout,
            closing: 0,
            #[cfg(test)]
            fail_submits: None,
        })
    }

    /// Queues one SQE, submitting first if the queue is full. Every SQE
    /// passes here, so the cancel count is the whole truth.
    ///
    /// A full queue is submitted (counted in `sq_full`); while the kernel
    /// refuses (EBUSY: completions backed up; EAGAIN: no memory) the
    /// completions are moved out of its way between tries, and after
    /// [`PUSH_TRIES`] the driver gives up: the SQE is dropped and the next
    /// [`Driver::wait`] fails, in one sentence, never a spin.
    fn push(&mut self, e: squeue::Entry) {
        if e.get_opcode() == opcode::AsyncCancel::CODE as u32 {
            self.stats.cancels += 1;
        }
        if self.stuck.is_some() {
            return;
        }
        let mut last = None;
        for _ in 0..PUSH_TRIES {
            // SAFETY: this is the only SubmissionQueue alive (single thread,
            // dropped at the end of the block), and every buffer an SQE
            // points to lives until its completion.
            let pushed = unsafe { self.ring.submission_shared().push(&e).is_ok() };
            if pushed {
                return;
            }
            self.stats.sq_full += 1;
            match self.submit() {
                Ok(_) => {}
                Err(err) => {
                    match err.raw_os_error() {
                        Some(libc::EINTR) => {}
                        Some(libc::EBUSY) => self.drain_completions(),
                        Some(libc::EAGAIN) => {
                            self.drain_completions();
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        _ => {
                            last = Some(err);
                            break;
                        }
                    }
                    last = Some(err);
                }
            }
        }
        self.stuck = Some(format!(
            "io_uring: the submission queue stayed full through {PUSH_TRIES} submits ({}): the ring is stuck",
            last.map_or_else(|| "the kernel took nothing".into(), |e| e.to_string())
        ));
    }

    fn submit(&mut self) -> io::Result<usize> {
        #[cfg(test)]
        if let Some(errno) = self.fail_submits {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.submitter.submit()
    }

    /// Moves what the completion queue holds into the backlog (up to
    /// [`BACKLOG_MAX`]), so that the kernel can post the completions it
    /// holds back and take submissions again.
    fn drain_completions(&mut self) {
        // SAFETY: the only CompletionQueue alive; dropped (publishing the
        // new head) at the end of this function.
        let cq = unsafe { self.ring.completion_shared() };
        let room = BACKLOG_MAX.saturating_sub(self.backlog.len());
        self.backlog.extend(cq.take(room));
    }

    fn arm_accept(&mut self) {
        if self.accept_armed || self.accept_paused {
            return;
        }
        let Some(l) = &self.listener else { return };
        // Accepted sockets stay blocking: io_uring waits for them itself,
        // and no system call of ours ever reads or writes them.
        let e = opcode::AcceptMulti::new(types::Fd(l.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(Op::Accept.data(0));
        self.accept_armed = true;
        self.push(e);
    }

    /// Cancels the operation whose user data is `target` (its completions
    /// say when it has ended; the cancel's own is not looked at).
    fn cancel(&mut self, target: u64) {
        self.push(opcode::AsyncCancel::new(target).build().user_data(0));
    }

    fn arm_udp(&mut self) {
        let Some(u) = &self.udp else { return };
        if self.udp_stopped {
            return;
        }
        self.udp_armed = true;
        let e = opcode::RecvMsgMulti::new(types::Fd(u.sock.as_raw_fd()), &u.msghdr, UDP_BGID)
            .build()
            .user_data(Op::Udp.data(0));
        self.push(e);
    }

    fn arm_recv(&mut self, index: usize) {
        let c = &mut self.conns[index];
        c.flags |= RECV_ARMED;
        let e = opcode::RecvMulti::new(types::Fd(c.raw()), BGID)
            .build()
            .user_data(Op::Recv.data(index));
        self.push(e);
    }

    /// Starts a send of `buf` (which becomes the driver's until done).
    fn start_send(&mut self, index: usize, buf: Vec<u8>) {
        let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
        let slot = self.sends.insert(buf);
        let c = &mut self.conns[index];
        c.inflight = slot as u32;
        // MSG_WAITALL: the kernel sends all of it (retrying partial sends
        // itself) or fails; one completion either way.
        let e = opcode::Send::new(types::Fd(c.raw()), ptr, len)
            .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
            .build()
            .user_data(Op::Send.data(index));
        self.push(e);
    }

    fn recycle_send(&mut self, slot: u32) {
        let mut buf = self.sends.remove(slot as usize);
        if buf.capacity() <= KEEP_SEND_BUF && self.spare.len() < KEEP_SEND_BUFS {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Takes the close of `index` one step further: wait for the send in
    /// flight (unless abortive), send what is held (graceful), end the recv
    /// with shutdown(2), and once nothing is in flight, close the socket.
    fn advance_close(&mut self, index: usize) {
        let c = &mut self.conns[index];
        let abortive = c.flags & ABORTIVE != 0;
        if c.inflight != NO_SEND {
            if abortive && c.flags & SHUT == 0 {
                // A send stuck on a peer that does not read ends only when
                // the socket's write side does.
                c.flags |= SHUT;
                shutdown(c.raw(), libc::SHUT_RDWR);
            }
            return;
        }
        if c.pending != NO_SEND {
            let buf = self.take_pending(index);
            return self.start_send(index, buf);
        }
        if c.flags & (RECV_ARMED | CONNECTING) != 0 {
            if c.flags & SHUT == 0 {
                c.flags |= SHUT;
                shutdown(c.raw(), libc::SHUT_RD);
            }
            return;
        }
        let fd = self.conns.remove(index).fd.into_raw_fd();
        self.closing -= 1;
        let e = opcode::Close::new(types::Fd(fd))
            .build()
            .user_data(Op::Close.data(0));
        self.push(e);
    }

    fn hang_up(&mut self, index: usize) -> Event<'static> {
        self.take_pending(index);
        let c = &mut self.conns[index];
        c.flags |= HUNG;
        Event::Hangup(c.token)
    }

    /// The output held for `index` (empty if none), no longer held.
    fn take_pending(&mut self, index: usize) -> Vec<u8> {
        let slot = std::mem::replace(&mut self.conns[index].pending, NO_SEND);
        if slot == NO_SEND {
            return Vec::new();
        }
        self.held.remove(slot as usize)
    }

    fn next_cqe(&mut self) -> Option<cqueue::Entry> {
        if let Some(e) = self.backlog.pop_front() {
            return Some(e);
        }
        // SAFETY: the only CompletionQueue alive; dropped (publishing the
        // new head) at the end of this function.
        unsafe { self.ring.completion_shared() }.next()
    }
}

/// shutdown(2) as a system call, not an SQE: IORING_OP_SHUTDOWN is always
/// punted to an io-wq worker thread (REQ_F_FORCE_ASYNC), which costs a
/// thread hop per deletion and resolves the descriptor only when the worker
/// runs: by then the descriptor may have been closed and reused. (It was:
/// the probe's deferred shutdown hit a freshly bound listener of the same
/// number, and that shard's accepts failed with EINVAL forever after.)
fn shutdown(fd: RawFd, how: i32) {
    // SAFETY: a descriptor this driver owns; shutdown does not close it.
    unsafe { libc::shutdown(fd, how) };
}

impl Drop for UringDriver {
    fn drop(&mut self) {
        // The multishot accept in the ring holds the listener past our
        // close, and the ring's teardown may finish only after the process
        // has exited: meanwhile the listener would stay in the port's
        // SO_REUSEPORT group, taking connections it then resets (a worker
        // restarted at once after a shard's death showed it). Shut down,
        // it leaves the group now. (Ours alone: a hot upgrade takes it out
        // of the driver before it hands a duplicate over.)
        if let Some(l) = &self.listener {
            let _ = l.shutdown(std::net::Shutdown::Read);
        }
        // Hand the kernel what is queued (the Close SQEs of connections
        // already gone from `conns`), then close every socket left, as an
        // owned descriptor would: a loop that fails or panics still lets
        // its peers see the close.
        let _ = self.submitter.submit();
        // A graceful close under way (the loop gave up waiting for it)
        // still ends with a FIN; the rest with a reset.
        for (_, c) in std::mem::take(&mut self.conns) {
            let graceful = c.flags & (CLOSING | ABORTIVE) == CLOSING;
            // Closed abortively by the user: SO_LINGER 0 is set already
            // (one setsockopt fewer per device when a client's fleet ends).
            socket::close(c.fd.into_raw_fd(), !graceful && c.flags & ABORTIVE == 0);
        }
        let _ = self.submitter.unregister_buf_ring(BGID);
        if self.udp.is_some() {
            let _ = self.submitter.unregister_buf_ring(UDP_BGID);
        }
        // The registration holds the ring in this thread's table until then.
        let _ = self.submitter.unregister_ring_fd();
        // Sends the kernel may still hold point into these buffers: they
        // go with the process, not before the ring.
        std::mem::forget(std::mem::take(&mut self.sends));
        // SAFETY: leaked in new(); nothing uses the ring after this, and
        // `submitter` only holds references that are not used again.
        drop(unsafe { Box::from_raw(self.ring as *const IoUring as *mut IoUring) });
    }
}

impl Driver for UringDriver {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn listen(&mut self, listener: socket2::Socket) -> io::Result<()> {
        self.listener = Some(listener);
        self.accept_armed = false;
        self.accept_paused = false;
        self.arm_accept();
        Ok(())
    }

    fn unlisten(&mut self) {
        if let Some(l) = self.listener.take() {
            // Ends the multishot accept without a cancel; the request holds
            // the socket until its last completion.
            // SAFETY: a valid descriptor owned by `l`.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RD) };
        }
    }

    fn resume_accepting(&mut self) -> io::Result<()> {
        self.accept_paused = false;
        self.arm_accept();
        Ok(())
    }

    /// Ends the multishot accept with a cancel (counted in `cancels`, as
    /// every cancel is: at most one per pause, and admission control pauses
    /// at most ten times a second); its last completion says ECANCELED.
    fn pause_accepting(&mut self) {
        if self.accept_paused {
            return;
        }
        self.accept_paused = true;
        if self.accept_armed {
            self.cancel(Op::Accept.data(0));
        }
    }

    fn watch_wake(&mut self, eventfd: OwnedFd) -> io::Result<()> {
        let e = opcode::PollAdd::new(types::Fd(eventfd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(Op::Wake.data(0));
        self.wake = Some(eventfd);
        self.push(e);
        Ok(())
    }

    fn watch_datagrams(&mut self, sock: socket2::Socket) -> io::Result<()> {
        if self.udp.is_some() {
            return Err(io::Error::other("a loop reads one UDP socket"));
        }
        let bufs = BufRing::new(UDP_BUFS, UDP_BUF_LEN)?;
        // SAFETY: the ring memory lives in `bufs` (kept in self.udp) until
        // unregistered in Drop.
        unsafe {
            self.submitter
                .register_buf_ring_with_flags(bufs.ring as u64, UDP_BUFS, UDP_BGID, 0)?
        };
        // SAFETY: a zeroed msghdr is valid: no name, no control, no iovec.
        let msghdr: libc::msghdr = unsafe { std::mem::zeroed() };
        // Boxed: the kernel reads the msghdr at its address.
        self.udp = Some(Box::new(Udp { sock, bufs, msghdr }));
        self.arm_udp();
        Ok(())
    }

    /// Ends the multishot recvmsg with one cancel (counted in `cancels`);
    /// the datagrams it completed before are still reported.
    fn stop_datagrams(&mut self) {
        if self.udp.is_none() || self.udp_stopped {
            return;
        }
        self.udp_stopped = true;
        if self.udp_armed {
            self.cancel(Op::Udp.data(0));
        }
    }

    fn stopping_datagrams(&self) -> bool {
        self.udp_stopped && self.udp_armed
    }

    fn resume_datagrams(&mut self) -> io::Result<()> {
        if !self.udp_stopped {
            return Ok(());
        }
        self.udp_stopped = false;
        // Still armed: its cancel is on its way, and the completion that
        // ends it re-arms.
        if !self.udp_armed {
            self.arm_udp();
        }
        Ok(())
    }

    fn register(&mut self, fd: OwnedFd, token: Token, connecting: bool) -> io::Result<Handle> {
        if self.conns.vacant_key() >= u32::MAX as usize {
            return Err(io::Error::other("more than 2^32 connections in one loop"));
        }
        let index = self.conns.insert(Conn {
            fd,
            inflight: NO_SEND,
            pending: NO_SEND,
            flags: 0,
            token,
        });
        if connecting {
            let c = &mut self.conns[index];
            c.flags |= CONNECTING;
            let e = opcode::PollAdd::new(types::Fd(c.raw()), libc::POLLOUT as u32)
                .build()
                .user_data(Op::Connect.data(index));
            self.push(e);
        } else {
            self.arm_recv(index);
        }
        Ok(Handle(index as u32))
    }

    fn send(&mut self, h: Handle, bytes: &[u8]) -> Sent {
        let index = h.index();
        let c = &mut self.conns[index];
        if c.flags & HUNG != 0 {
            return Sent::Failed;
        }
        if c.inflight != NO_SEND {
            if c.pending == NO_SEND {
                if bytes.len() > self.max_pending {
                    return Sent::Overflow;
                }
                c.pending = self.held.insert(bytes.to_vec()) as u32;
            } else {
                let held = &mut self.held[c.pending as usize];
                if held.len() + bytes.len() > self.max_pending {
                    return Sent::Overflow;
                }
                held.extend_from_slice(bytes);
            }
            c.flags |= NOTIFY;
            return Sent::Queued;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.extend_from_slice(bytes);
        self.start_send(index, buf);
        Sent::Done
    }

    fn closing(&self) -> usize {
        self.closing
    }

    fn is_flushed(&mut self, h: Handle) -> bool {
        let c = &mut self.conns[h.index()];
        if c.inflight == NO_SEND && c.pending == NO_SEND {
            return true;
        }
        c.flags |= NOTIFY;
        false
    }

    fn close(&mut self, h: Handle, how: Close) {
        let index = h.index();
        let c = &mut self.conns[index];
        if c.inflight == HOLD {
            c.inflight = NO_SEND; // a release given up: nothing is in flight
        }
        c.flags |= CLOSING;
        self.closing += 1;
        if how == Close::Abortive {
            c.flags |= ABORTIVE;
            socket::set_linger_zero(c.raw());
            self.take_pending(index);
        }
        self.advance_close(index);
    }

    /// Cancels the multishot recv (IORING_OP_ASYNC_CANCEL by its user
    /// data, counted in `cancels`) and waits for its last completion and
    /// for any send in flight: until then `WouldBlock`, and bytes that
    /// raced the cancel are reported as usual. Then the socket and the
    /// output held back are the caller's.
    fn release(&mut self, h: Handle) -> io::Result<(OwnedFd, Vec<u8>)> {
        let index = h.index();
        let c = &mut self.conns[index];
        if c.flags & RELEASING == 0 {
            c.flags |= RELEASING;
            if c.flags & RECV_ARMED != 0 {
                self.cancel(Op::Recv.data(index));
            }
        }
        let c = &mut self.conns[index];
        if c.inflight == NO_SEND {
            c.inflight = HOLD; // from now on output is held
        }
        if c.flags & (RECV_ARMED | CONNECTING) != 0 || c.inflight != HOLD {
            // A bare kind: no allocation (the shard asks again each turn
            // for every release under way, thousands at once).
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let out = self.take_pending(index);
        Ok((self.conns.remove(index).fd, out))
    }

    fn release_progress(&self) -> u64 {
        self.release_progress
    }

    /// Ends the multishot accept with a cancel (counted), never with
    /// shutdown(2): the socket goes on listening for its next owner.
    fn take_listener(&mut self) -> Option<socket2::Socket> {
        let l = self.listener.take()?;
        self.listener_handed = true;
        if self.accept_armed && !self.accept_paused {
            self.cancel(Op::Accept.data(0));
        }
        self.accept_paused = true;
        Some(l)
    }

    /// io_uring waits for a socket itself: one from epoll is made blocking.
    fn adopt(&mut self, fd: OwnedFd, token: Token) -> io::Result<Handle> {
        socket::set_blocking(fd.as_raw_fd());
        self.register(fd, token, false)
    }

    /// 0 without a system call when the connect's poll said it succeeded
    /// (one getsockopt fewer per connection of the client).
    fn socket_error(&self, h: Handle) -> i32 {
        let c = &self.conns[h.index()];
        if c.flags & (CONNECTED | HUNG) == CONNECTED {
            return 0;
        }
        socket::so_error(c.raw())
    }

    fn peer_addr(&self, h: Handle) -> Option<std::net::SocketAddr> {
        socket::peer_addr(self.conns[h.index()].raw())
    }

    fn peer_left(&self, h: Handle) -> Option<crate::PeerLeft> {
        socket::peer_left(self.conns[h.index()].raw())
    }

    fn set_batch_wait(&mut self, window: Duration) -> bool {
        if !self.min_timeout {
            return false;
        }
        self.batch_wait_us = window.as_micros().min(u32::MAX as u128) as u32;
        true
    }

    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        self.fault.fire()?;
        if let Some(why) = &self.stuck {
            return Err(io::Error::other(why.clone()));
        }
        // SAFETY: short-lived views; no other queue view is alive.
        let (ready, overflow) = unsafe {
            let sq = self.ring.submission_shared();
            let cq = self.ring.completion_shared();
            (!cq.is_empty() || !self.backlog.is_empty(), sq.cq_overflow())
        };
        if overflow {
            self.stats.cq_overflows += 1;
        }
        let ts = types::Timespec::from(if ready { Duration::ZERO } else { timeout });
        let args = types::SubmitArgs::new().timespec(&ts);
        // --io-batch-wait: once a completion has come, wait up to the
        // window for BATCH of them (then at once), but never past `timeout`.
        let batch =
            !ready && self.batch_wait_us > 0 && timeout.as_micros() > self.batch_wait_us as u128;
        let (want, args) = match (ready, batch) {
            (true, _) => (0, args),
            (false, true) => (BATCH_WANT, args.min_wait_usec(self.batch_wait_us)),
            (false, false) => (1, args),
        };
        match self.submitter.submit_with_args(want, &args) {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                // The timeout, a signal, or a backed-up CQ (drained next).
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => Ok(()),
                _ => Err(e),
            },
        }
    }

    fn next(&mut self) -> Option<Event<'_>> {
        if let Some(bid) = self.lent.take() {
            self.bufs.give_back(bid);
        }
        if let Some(bid) = self.lent_udp.take() {
            if let Some(u) = &mut self.udp {
                u.bufs.give_back(bid);
            }
        }
        loop {
            let cqe = self.next_cqe()?;
            let (res, flags) = (cqe.result(), cqe.flags());
            let Some((op, index)) = Op::of(cqe.user_data()) else {
                continue;
            };
            let more = cqueue::more(flags);
            match op {
                Op::Accept => {
                    if !more {
                        self.accept_armed = false;
                    }
                    if res >= 0 {
                        // SAFETY: the kernel installed this descriptor for us.
                        let fd = unsafe { OwnedFd::from_raw_fd(res) };
                        if self.listener.is_none() {
                            if self.listener_handed {
                                // Taken just before the cancel: served here.
                                return Some(Event::Accepted(fd));
                            }
                            continue; // accepted as the listener stopped
                        }
                        self.arm_accept();
                        return Some(Event::Accepted(fd));
                    }
                    if self.listener.is_none() {
                        continue;
                    }
                    if -res == libc::ECANCELED {
                        // Ended by pause_accepting: armed again unless
                        // still paused.
                        self.arm_accept();
                        continue;
                    }
                    if !is_one_connections(-res) {
                        self.accept_paused = true;
                        return Some(Event::AcceptFailed(io::Error::from_raw_os_error(-res)));
                    }
                    self.arm_accept();
                }
                Op::Recv => {
                    let bid = cqueue::buffer_select(flags);
                    let c = &mut self.conns[index];
                    if !more {
                        c.flags &= !RECV_ARMED;
                        if c.flags & RELEASING != 0 {
                            self.release_progress += 1;
                        }
                    }
                    if c.flags & (CLOSING | HUNG) != 0 {
                        if let Some(b) = bid {
                            self.bufs.discard(b, res);
                        }
                        if c.flags & CLOSING != 0 && !more {
                            self.advance_close(index);
                        }
                        continue;
                    }
                    if res > 0 {
                        let Some(b) = bid else {
                            continue; // cannot happen: a recv with data names its buffer
                        };
                        let token = c.token;
                        if !more && c.flags & RELEASING == 0 {
                            // Ended with data (the kernel's choice): re-arm.
                            self.arm_recv(index);
                        }
                        let (start, done) = self.bufs.take(b, res as usize);
                        if done {
                            self.lent = Some(b);
                        }
                        let len = res as usize;
                        self.fault.saw(self.bufs.bytes_at(b, start, len));
                        return Some(Event::Data(token, self.bufs.bytes_at(b, start, len)));
                    }
                    if let Some(b) = bid {
                        self.bufs.discard(b, res);
                    }
                    let releasing = self.conns[index].flags & RELEASING != 0;
                    if res == -libc::ENOBUFS {
                        // Every buffer was taken by this wait's arrivals.
                        if !more && !releasing {
                            self.arm_recv(index);
                        }
                        continue;
                    }
                    if releasing && res == -libc::ECANCELED {
                        continue; // the release's cancel: its last completion
                    }
                    return Some(self.hang_up(index)); // end of stream or an error
                }
                Op::Send => {
                    let c = &mut self.conns[index];
                    if c.flags & RELEASING != 0 {
                        self.release_progress += 1;
                    }
                    let slot = std::mem::replace(&mut c.inflight, NO_SEND);
                    let failed = res < 0 || self.sends[slot as usize].len() != res as usize;
                    self.recycle_send(slot);
                    let c = &mut self.conns[index];
                    if c.flags & CLOSING != 0 {
                        if failed {
                            self.take_pending(index);
                        }
                        self.advance_close(index);
                        continue;
                    }
                    if c.flags & HUNG != 0 {
                        continue;
                    }
                    if failed {
                        return Some(self.hang_up(index));
                    }
                    if c.pending != NO_SEND {
                        let buf = self.take_pending(index);
                        self.start_send(index, buf);
                        continue;
                    }
                    if c.flags & NOTIFY != 0 {
                        c.flags &= !NOTIFY;
                        return Some(Event::Flushed(c.token));
                    }
                }
                Op::Connect => {
                    let c = &mut self.conns[index];
                    c.flags &= !CONNECTING;
                    let bad = (libc::POLLERR | libc::POLLHUP) as i32;
                    if res > 0 && res & bad == 0 {
                        c.flags |= CONNECTED;
                    }
                    if c.flags & CLOSING != 0 {
                        self.advance_close(index);
                        continue;
                    }
                    let token = c.token;
                    // From here io_uring waits for the socket itself.
                    socket::set_blocking(c.raw());
                    self.arm_recv(index);
                    return Some(Event::Connected(token));
                }
                Op::Wake => {
                    let Some(fd) = &self.wake else { continue };
                    let mut buf = [0u8; 8];
                    // SAFETY: eventfd reads are 8 bytes into a valid buffer.
                    unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
                    if !more {
                        let e =
                            opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
                                .multi(true)
                                .build()
                                .user_data(Op::Wake.data(0));
                        self.push(e);
                    }
                    return Some(Event::Wake);
                }
                Op::Close => {}
                Op::Udp => {
                    let bid = cqueue::buffer_select(flags);
                    if !more {
                        // ENOBUFS (every buffer was taken by this wait's
                        // datagrams) or the kernel's choice: re-arm (not
                        // after a stop: its cancel ended it).
                        self.udp_armed = false;
                        self.arm_udp();
                    }
                    let Some(b) = bid else { continue };
                    if res < RECVMSG_OUT as i32 {
                        if let Some(u) = &mut self.udp {
                            u.bufs.give_back(b);
                        }
                        continue;
                    }
                    self.lent_udp = Some(b);
                    return self
                        .udp
                        .as_mut()
                        .map(|u| Event::Datagram(&u.bufs.bytes(b, res as usize)[RECVMSG_OUT..]));
                }
            }
        }
    }

    fn stats(&self) -> IoStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver() -> Option<UringDriver> {
        match probe() {
            Ok(()) => Some(
                UringDriver::new(DriverConfig {
                    max_pending: 1 << 16,
                })
                .unwrap(),
            ),
            Err(why) => {
                eprintln!("io_uring unusable here, test skipped: {why}");
                None
            }
        }
    }

    #[test]
    fn a_stopped_driver_leaves_datagrams_to_the_other_reader() {
        let Some(mut d) = driver() else { return };
        crate::udp::tests::a_stopped_driver_leaves_datagrams_to_the_other_reader(&mut d);
    }

    /// --io-batch-wait: a wait that asks for a batch still returns a lone
    /// event (after the window, not at the wait's timeout), and says so
    /// where the kernel cannot batch.
    #[test]
    fn a_batch_wait_still_returns_a_lone_event() {
        let Some(mut d) = driver() else { return };
        if !d.set_batch_wait(Duration::from_millis(20)) {
            eprintln!("no IORING_FEAT_MIN_TIMEOUT here (Linux 6.12+): batch wait untested");
            return;
        }
        // SAFETY: a new eventfd, owned below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(efd >= 0);
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let raw = efd.as_raw_fd();
        d.watch_wake(efd).unwrap();
        d.wait(Duration::ZERO).unwrap(); // the poll is armed
        let one = 1u64.to_ne_bytes();
        // SAFETY: 8 bytes to an eventfd we own.
        assert_eq!(unsafe { libc::write(raw, one.as_ptr().cast(), 8) }, 8);
        let began = std::time::Instant::now();
        // A minute's timeout: a wait that held out for its batch of 64
        // would sit here that long (a liveness bound, not a speed figure).
        d.wait(Duration::from_secs(60)).unwrap();
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "waited for a batch that never came"
        );
        assert!(matches!(d.next(), Some(Event::Wake)));
    }

    #[test]
    fn the_cancel_counter_sees_a_cancel_sqe() {
        let Some(mut d) = driver() else { return };
        assert_eq!(d.stats().cancels, 0);
        d.push(opcode::AsyncCancel::new(12345).build().user_data(0));
        assert_eq!(d.stats().cancels, 1);
    }

    #[test]
    fn a_full_queue_the_kernel_keeps_refusing_is_given_up_in_one_sentence() {
        let Some(mut d) = driver() else { return };
        d.fail_submits = Some(libc::EBUSY);
        let nop = || opcode::Nop::new().build().user_data(0);
        // More than the queue holds: before, push() retried forever.
        for _ in 0..SQ_ENTRIES + 2 {
            d.push(nop());
        }
        assert_eq!(d.stats().sq_full, PUSH_TRIES as u64, "counted, bounded");
        let err = d.wait(Duration::ZERO).unwrap_err().to_string();
        assert!(err.contains("stayed full through 1000 submits"), "{err}");
        assert!(err.contains("busy"), "{err}");
        // Given up: nothing more is tried, the wait keeps failing.
        d.push(nop());
        assert_eq!(d.stats().sq_full, PUSH_TRIES as u64);
        assert!(d.wait(Duration::ZERO).is_err());
        d.fail_submits = None;
    }

    #[test]
    fn completions_drained_while_submits_are_refused_are_still_delivered() {
        let Some(mut d) = driver() else { return };
        let mut fds = [0; 2];
        // SAFETY: fds is valid for two descriptors.
        assert_eq!(
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) },
            0
        );
        // SAFETY: both are new and owned here.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        d.register(a, Token(4), false).unwrap();
        d.wait(Duration::ZERO).unwrap();
        while d.next().is_some() {}
        socket::send(b.as_raw_fd(), b"held").unwrap();
        // The recv completes in the kernel's next enter; refuse submits
        // after it so that push() drains it into the backlog.
        d.wait(Duration::from_millis(200)).unwrap();
        d.fail_submits = Some(libc::EBUSY);
        for _ in 0..SQ_ENTRIES + 1 {
            d.push(opcode::Nop::new().build().user_data(0));
        }
        assert_eq!(d.backlog.len(), 1, "the completion moved aside");
        match d.next() {
            Some(Event::Data(Token(4), bytes)) => assert_eq!(bytes, b"held"),
            other => panic!("{other:?}"),
        }
        d.fail_submits = None;
    }

    /// A stream several times the buffer ring, in writes of odd sizes
    /// from 1 byte to past a buffer, arrives whole and in order, on the
    /// incremental ring (6.12+) and on the one-recv-per-buffer ring.
    #[test]
    fn a_stream_larger_than_the_buffer_ring_arrives_in_order() {
        if driver().is_none() {
            return;
        }
        for incremental in [true, false] {
            let mut d = UringDriver::with_bufs(
                DriverConfig {
                    max_pending: 1 << 16,
                },
                incremental,
            )
            .unwrap();
            if !incremental {
                assert!(d.bufs.used.is_none());
            }
            let mut fds = [0; 2];
            // SAFETY: fds is valid for two descriptors.
            assert_eq!(
                unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) },
                0
            );
            // SAFETY: both are new and owned here.
            let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            let total = 5 * (INC_BUFS as usize * INC_BUF_LEN).max(BUFS as usize * BUF_LEN) / 2;
            let want: Vec<u8> = (0..total).map(|i| (i * 7 + i / 251) as u8).collect();
            let writer = {
                let want = want.clone();
                std::thread::spawn(move || {
                    let mut at = 0;
                    let mut size = 1;
                    while at < want.len() {
                        let end = (at + size).min(want.len());
                        // SAFETY: a blocking write from a valid buffer.
                        let n = unsafe {
                            libc::write(b.as_raw_fd(), want[at..end].as_ptr().cast(), end - at)
                        };
                        assert!(n > 0, "{}", io::Error::last_os_error());
                        at += n as usize;
                        size = size * 3 % 9001 + 1;
                    }
                    b
                })
            };
            let h = d.register(a, Token(3), false).unwrap();
            let mut got = Vec::with_capacity(total);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while got.len() < total && std::time::Instant::now() < deadline {
                d.wait(Duration::from_millis(100)).unwrap();
                while let Some(e) = d.next() {
                    match e {
                        Event::Data(Token(3), bytes) => got.extend_from_slice(bytes),
                        other => panic!("{other:?}"),
                    }
                }
            }
            let _b = writer.join().unwrap();
            assert_eq!(got.len(), total, "incremental={incremental}");
            assert!(
                got == want,
                "the bytes arrived out of order (incremental={incremental})"
            );
            d.close(h, Close::Abortive);
            d.wait(Duration::ZERO).unwrap();
            while d.next().is_some() {}
            assert_eq!(d.stats().cancels, 0);
        }
    }

    fn socketpair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds is valid for two descriptors.
        assert_eq!(
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) },
            0
        );
        // SAFETY: both are new and owned here.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Hot upgrade: release cancels the recv (one cancel, counted), waits
    /// for its last completion, and hands back the socket; bytes that
    /// raced the cancel were reported as Data first, the rest stay in the
    /// socket: together, every byte once, in order. Output sent during the
    /// release is held and handed back, not sent. The release's progress
    /// count says when to ask again.
    #[test]
    fn release_cancels_the_recv_and_every_byte_is_read_once() {
        let Some(mut d) = driver() else { return };
        for round in 0..20u8 {
            let (a, b) = socketpair();
            let h = d.register(a, Token(round as u64), false).unwrap();
            d.wait(Duration::ZERO).unwrap();
            while d.next().is_some() {}
            let sent: Vec<u8> = (0..200).map(|i| round.wrapping_add(i as u8)).collect();
            socket::send(b.as_raw_fd(), &sent[..100]).unwrap();
            let mut got = Vec::new();
            let mut tries = 0;
            // Asked again only when the driver has news, as a shard does.
            let mut seen = None;
            let (fd, held) = loop {
                if seen != Some(d.release_progress()) {
                    seen = Some(d.release_progress());
                    match d.release(h) {
                        Ok(x) => break x,
                        Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
                    }
                }
                if tries == 0 {
                    // Bytes racing the cancel, and output during it.
                    socket::send(b.as_raw_fd(), &sent[100..]).unwrap();
                    assert_eq!(d.send(h, b"pong"), Sent::Queued);
                }
                tries += 1;
                assert!(tries < 100, "the release never completed");
                d.wait(Duration::from_millis(50)).unwrap();
                while let Some(e) = d.next() {
                    match e {
                        Event::Data(t, bytes) => {
                            assert_eq!(t, Token(round as u64));
                            got.extend_from_slice(bytes);
                        }
                        other => panic!("{other:?}"),
                    }
                }
            };
            assert_eq!(held, b"pong", "held, not sent");
            assert!(tries >= 1, "io_uring cannot release at once");
            // The rest is in the socket.
            socket::set_nonblocking(fd.as_raw_fd());
            let mut buf = [0u8; 512];
            while let Ok(n) = socket::recv(fd.as_raw_fd(), &mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, sent, "round {round}");
            // Nothing was sent to the peer during the release.
            socket::set_nonblocking(b.as_raw_fd());
            assert!(socket::recv(b.as_raw_fd(), &mut buf).is_err());
        }
        assert_eq!(d.conns.len(), 0);
        assert_eq!(d.stats().cancels, 20, "one cancel per release");
    }

    /// A send in flight completes before the socket is handed back.
    #[test]
    fn release_waits_for_the_send_in_flight() {
        let Some(mut d) = driver() else { return };
        let (a, b) = socketpair();
        let h = d.register(a, Token(1), false).unwrap();
        assert_eq!(d.send(h, b"in flight"), Sent::Done);
        assert!(d.release(h).is_err());
        let fd = loop {
            d.wait(Duration::from_millis(50)).unwrap();
            while d.next().is_some() {}
            if let Ok((fd, held)) = d.release(h) {
                assert!(held.is_empty());
                break fd;
            }
        };
        let mut buf = [0u8; 16];
        let n = socket::recv(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"in flight");
        drop(fd);
    }

    /// The two sides of an upgrade may run different backends: a socket
    /// released by io_uring is read by epoll after `adopt`, and back.
    #[test]
    fn a_socket_moves_between_backends_both_ways() {
        let Some(mut u) = driver() else { return };
        let mut e = crate::epoll::EpollDriver::new(DriverConfig {
            max_pending: 1 << 16,
        })
        .unwrap();
        let (a, b) = socketpair();
        let h = u.register(a, Token(1), false).unwrap();
        let fd = loop {
            match u.release(h) {
                Ok((fd, _)) => break fd,
                Err(_) => {
                    u.wait(Duration::from_millis(20)).unwrap();
                    while u.next().is_some() {}
                }
            }
        };
        let read = |d: &mut dyn Driver| -> Vec<u8> {
            let mut got = Vec::new();
            for _ in 0..20 {
                d.wait(Duration::from_millis(20)).unwrap();
                while let Some(ev) = d.next() {
                    if let Event::Data(_, bytes) = ev {
                        got.extend_from_slice(bytes);
                    }
                }
                if !got.is_empty() {
                    break;
                }
            }
            got
        };
        socket::send(b.as_raw_fd(), b"to epoll").unwrap();
        let h = e.adopt(fd, Token(2)).unwrap();
        assert_eq!(read(&mut e), b"to epoll");
        let (fd, _) = e.release(h).unwrap();
        socket::send(b.as_raw_fd(), b"to uring").unwrap();
        u.adopt(fd, Token(3)).unwrap();
        assert_eq!(read(&mut u), b"to uring");
    }

    #[test]
    fn take_listener_cancels_the_accept_and_leaves_the_socket_listening() {
        let Some(mut d) = driver() else { return };
        let l = crate::listener::bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        d.listen(l).unwrap();
        d.wait(Duration::ZERO).unwrap();
        while d.next().is_some() {}
        let l = d.take_listener().unwrap();
        d.wait(Duration::from_millis(20)).unwrap();
        while d.next().is_some() {}
        assert_eq!(d.stats().cancels, 1);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        d.wait(Duration::from_millis(50)).unwrap();
        assert!(d.next().is_none(), "no accept after the hand-back");
        l.set_nonblocking(true).unwrap();
        assert!(l.accept().is_ok(), "still listening, the connection queued");
    }

    #[test]
    fn a_socketpair_round_trip_sends_reads_and_hangs_up() {
        let Some(mut d) = driver() else { return };
        let mut fds = [0; 2];
        // SAFETY: fds is valid for two descriptors.
        assert_eq!(
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) },
            0
        );
        // SAFETY: both are new and owned here.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let h = d.register(a, Token(9), false).unwrap();
        assert_eq!(d.send(h, b"to b"), Sent::Done);
        d.wait(Duration::from_millis(200)).unwrap();
        while d.next().is_some() {}
        let mut buf = [0u8; 16];
        // SAFETY: reads into a valid buffer.
        let n = unsafe { libc::read(b.as_raw_fd(), buf.as_mut_ptr().cast(), 16) };
        assert_eq!(&buf[..n as usize], b"to b");
        drop(b);
        d.wait(Duration::from_millis(200)).unwrap();
        assert!(matches!(d.next(), Some(Event::Hangup(Token(9)))));
        d.close(h, Close::Abortive);
        d.wait(Duration::ZERO).unwrap();
        while d.next().is_some() {}
        assert_eq!(d.conns.len(), 0, "the close finished");
        assert_eq!(d.stats().cancels, 0);
    }
}
