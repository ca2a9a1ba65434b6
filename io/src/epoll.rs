//! The epoll backend: every connection is armed once, edge-triggered, when
//! it is registered and never re-armed or cancelled while it lives; reads
//! and sends are non-blocking system calls into one driver-owned buffer.
//!
//! Why not a glommio stream per connection: each idle glommio read parks an
//! IORING_OP_POLL_ADD in the executor's ring, and every reactor loop cancels
//! the previous preemption timer with IORING_OP_ASYNC_CANCEL, which walks one
//! bucket of the ring's poll hash table (8 buckets at the default depth). The
//! cost of every loop then grows with the number of idle connections. Here
//! epoll hands back only the sockets that are ready, and an idle loop blocks
//! in [`Epoll::wait`] rather than in glommio's park (see there why).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Duration;

use slab::Slab;

use super::listener::{self, Accepted};
use super::udp::RecvBatch;
use super::{cvt, socket, Close, Driver, DriverConfig, Event, Handle, IoStats, Sent, Token};

pub const IN: u32 = libc::EPOLLIN as u32;
pub const OUT: u32 = libc::EPOLLOUT as u32;
pub const RDHUP: u32 = libc::EPOLLRDHUP as u32;
pub const ET: u32 = libc::EPOLLET as u32;

/// An epoll set.
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; the fd is owned from here on.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ctl(&self, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev outlives the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) }).map(drop)
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Fills `events` with ready entries, blocking the calling thread up to
    /// `timeout` (rounded up to whole milliseconds) while there are none;
    /// returns how many (0 at the timeout or on a signal).
    ///
    /// One call both sleeps and fetches: blocking in poll(2) on the set and
    /// then fetching with a second epoll_wait cost two system calls per
    /// wake-up, and the kernel polled every ready socket twice.
    ///
    /// Why the executor thread blocks here instead of parking in glommio
    /// (awaiting the set's fd on glommio's ring, racing a glommio timer):
    /// with 120 processes on 2 cores, glommio 0.9's reactor lost its wakeup
    /// and left the executor asleep in io_cqring_wait for good, in 9 of 60
    /// server and 2 of 60 client workers (results/1m-20261126T080203Z); and
    /// after the shards stopped parking there, yielding to glommio when busy
    /// did the same to 7 of 60 (results/1m-20261126T081605Z). So a loop
    /// never hands its thread back to glommio's reactor: glommio provides
    /// the pinned executor thread, the loop runs on it until the end,
    /// blocking in its driver when idle.
    pub fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let max = events.len().min(i32::MAX as usize) as i32;
        // SAFETY: the kernel writes at most `max` entries into `events`.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), max, ms) };
        match cvt(n) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;
const UDP: u64 = u64::MAX - 2;
/// Events taken from epoll per call.
const EVENT_BATCH: usize = 256;
/// Connections accepted per listener event before other work runs.
const ACCEPT_BATCH: usize = 128;
/// Reads from one socket per event before others get their turn.
const READS_PER_EVENT: u32 = 8;
const SCRATCH: usize = 64 * 1024;

/// The peer is gone: no more events for this connection.
const HUNG: u8 = 1;
/// The user waits for an [`Event::Flushed`].
const NOTIFY: u8 = 2;
/// Registered while connecting: the first writable event is the connect's.
const CONNECTING: u8 = 4;
/// The connect's event was writability with no error or hang-up: it
/// succeeded, and [`Driver::socket_error`] says 0 without asking the kernel.
const CONNECTED: u8 = 8;

/// `pending` of a connection that holds no output.
const NO_PENDING: u32 = u32::MAX;

/// 24 bytes (the fd's niche and no `Vec` of its own): an idle connection,
/// the common one, holds nothing else (issue 18).
struct Conn {
    /// Owned, so that a loop that fails or panics still closes its sockets
    /// as it unwinds: their peers see the close.
    fd: OwnedFd,
    gen: u32,
    token: Token,
    /// Index in the driver's `held` of the output the socket did not take
    /// yet, or NO_PENDING (an idle connection holds no Vec, not even an
    /// empty one).
    pending: u32,
    flags: u8,
}

/// A connection being read: its key, generation and reads so far.
#[derive(Clone, Copy)]
struct Reading {
    key: usize,
    gen: u32,
    reads: u32,
}

pub struct EpollDriver {
    epoll: Epoll,
    conns: Slab<Conn>,
    /// Output held for connections whose socket did not take it all
    /// ([`Conn::pending`]).
    held: Slab<Vec<u8>>,
    next_gen: u32,
    listener: Option<socket2::Socket>,
    wake: Option<OwnedFd>,
    events: Vec<libc::epoll_event>,
    ready: usize,
    cursor: usize,
    /// Accepts still to try in this pass.
    accept_left: usize,
    reading: Option<Reading>,
    /// Just registered: read now, their bytes are usually there already.
    fresh: Vec<Reading>,
    /// Reads cut short to be fair; read again next pass.
    again: Vec<Reading>,
    retry: Vec<Reading>,
    scratch: Box<[u8]>,
    max_pending: usize,
    stats: IoStats,
    fault: super::FaultHook,
    /// --udp-heartbeat: the shard's UDP socket and its recvmmsg buffers
    /// (None, and no cost, when off).
    udp: Option<Box<(socket2::Socket, RecvBatch)>>,
    /// The UDP socket is readable (edge-triggered: read it until a batch
    /// comes back short).
    udp_ready: bool,
    /// A full batch was read: read again after the next (non-blocking) wait.
    udp_again: bool,
    /// [`Driver::stop_datagrams`]: out of the epoll set, read no more.
    udp_stopped: bool,
}

impl EpollDriver {
    /// Adds `fd` to the epoll set; `read_now`: read it in this pass
    /// without waiting for its event (an accepted socket's request is
    /// usually there already).
    fn watch(
        &mut self,
        fd: OwnedFd,
        token: Token,
        connecting: bool,
        read_now: bool,
    ) -> io::Result<Handle> {
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let key = self.conns.vacant_key();
        if key >= (UDP & 0xffff_ffff) as usize {
            return Err(io::Error::other("more than 2^32 connections in one loop"));
        }
        let events = if connecting {
            IN | OUT | RDHUP | ET
        } else {
            IN | RDHUP | ET
        };
        self.epoll
            .add(fd.as_raw_fd(), events, Token::pack(key, gen).0)?;
        self.conns.insert(Conn {
            fd,
            gen,
            token,
            pending: NO_PENDING,
            flags: if connecting { CONNECTING } else { 0 },
        });
        if read_now {
            self.fresh.push(Reading { key, gen, reads: 0 });
        }
        Ok(Handle(key as u32))
    }

    pub fn new(cfg: DriverConfig) -> io::Result<EpollDriver> {
        Ok(EpollDriver {
            epoll: Epoll::new()?,
            conns: Slab::new(),
            held: Slab::new(),
            next_gen: 1,
            listener: None,
            wake: None,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENT_BATCH],
            ready: 0,
            cursor: 0,
            accept_left: 0,
            reading: None,
            fresh: Vec::new(),
            again: Vec::new(),
            retry: Vec::new(),
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            max_pending: cfg.max_pending,
            stats: IoStats::default(),
            fault: super::FaultHook::from_env(),
            udp: None,
            udp_ready: false,
            udp_again: false,
            udp_stopped: false,
        })
    }

    fn live(&self, key: usize, gen: u32) -> bool {
        self.conns.get(key).is_some_and(|c| c.gen == gen)
    }

    fn hang_up(&mut self, key: usize) -> Event<'static> {
        let c = &mut self.conns[key];
        c.flags |= HUNG;
        Event::Hangup(c.token)
    }

    /// Sends what `key` holds; Some(event) when that finished something.
    fn flush(&mut self, key: usize) -> Option<Event<'static>> {
        let c = &mut self.conns[key];
        if c.pending == NO_PENDING || c.flags & HUNG != 0 {
            return None;
        }
        let out = &mut self.held[c.pending as usize];
        match socket::send(c.fd.as_raw_fd(), out) {
            Ok(n) if n == out.len() => {
                self.held
                    .remove(std::mem::replace(&mut c.pending, NO_PENDING) as usize);
                let token = Token::pack(key, c.gen).0;
                if self
                    .epoll
                    .modify(c.fd.as_raw_fd(), IN | RDHUP | ET, token)
                    .is_err()
                {
                    return Some(self.hang_up(key));
                }
                if c.flags & NOTIFY != 0 {
                    c.flags &= !NOTIFY;
                    return Some(Event::Flushed(c.token));
                }
                None
            }
            Ok(n) => {
                out.drain(..n);
                None
            }
            Err(_) => Some(self.hang_up(key)),
        }
    }
}

/// Epoll's data for a connection: [`Token::pack`] of its key and the
/// driver's generation (listener, wake and UDP are the top values, which
/// no key reaches).
fn split(data: u64) -> (usize, u32) {
    let t = Token(data);
    (t.key(), t.gen())
}

impl Driver for EpollDriver {
    fn name(&self) -> &'static str {
        "epoll"
    }

    fn reads_after_wait(&self) -> bool {
        true
    }

    fn listen(&mut self, listener: socket2::Socket) -> io::Result<()> {
        self.epoll.add(listener.as_raw_fd(), IN, LISTENER)?;
        self.listener = Some(listener);
        Ok(())
    }

    fn unlisten(&mut self) {
        self.listener = None;
        self.accept_left = 0;
    }

    fn resume_accepting(&mut self) -> io::Result<()> {
        match &self.listener {
            Some(l) => match self.epoll.add(l.as_raw_fd(), IN, LISTENER) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                r => r,
            },
            None => Ok(()),
        }
    }

    fn pause_accepting(&mut self) {
        self.accept_left = 0;
        if let Some(l) = &self.listener {
            let _ = self.epoll.delete(l.as_raw_fd());
        }
    }

    fn watch_wake(&mut self, eventfd: OwnedFd) -> io::Result<()> {
        self.epoll.add(eventfd.as_raw_fd(), IN, WAKE)?;
        self.wake = Some(eventfd);
        Ok(())
    }

    fn watch_datagrams(&mut self, sock: socket2::Socket) -> io::Result<()> {
        self.epoll.add(sock.as_raw_fd(), IN | ET, UDP)?;
        self.udp = Some(Box::new((sock, RecvBatch::default())));
        // Datagrams may be queued already: the edge came before the watch.
        self.udp_ready = true;
        Ok(())
    }

    fn stop_datagrams(&mut self) {
        let Some(u) = &self.udp else { return };
        let _ = self.epoll.delete(u.0.as_raw_fd());
        self.udp_stopped = true;
        self.udp_ready = false;
        self.udp_again = false;
    }

    fn stopping_datagrams(&self) -> bool {
        self.udp_stopped && self.udp.as_ref().is_some_and(|u| u.1.pending())
    }

    fn resume_datagrams(&mut self) -> io::Result<()> {
        let Some(u) = &self.udp else { return Ok(()) };
        if !self.udp_stopped {
            return Ok(());
        }
        self.epoll.add(u.0.as_raw_fd(), IN | ET, UDP)?;
        self.udp_stopped = false;
        // What came meanwhile: the edge came before the watch.
        self.udp_ready = true;
        Ok(())
    }

    fn register(&mut self, fd: OwnedFd, token: Token, connecting: bool) -> io::Result<Handle> {
        self.watch(fd, token, connecting, !connecting)
    }

    fn send(&mut self, h: Handle, bytes: &[u8]) -> Sent {
        let key = h.index();
        let c = &mut self.conns[key];
        if c.flags & HUNG != 0 {
            return Sent::Failed;
        }
        if c.pending != NO_PENDING {
            let out = &mut self.held[c.pending as usize];
            if out.len() + bytes.len() > self.max_pending {
                return Sent::Overflow;
            }
            out.extend_from_slice(bytes);
            c.flags |= NOTIFY;
            return Sent::Queued;
        }
        match socket::send(c.fd.as_raw_fd(), bytes) {
            Ok(n) if n == bytes.len() => Sent::Done,
            Ok(n) => {
                if bytes.len() - n > self.max_pending {
                    return Sent::Overflow;
                }
                c.pending = self.held.insert(bytes[n..].to_vec()) as u32;
                c.flags |= NOTIFY;
                let token = Token::pack(key, c.gen).0;
                match self
                    .epoll
                    .modify(c.fd.as_raw_fd(), IN | OUT | RDHUP | ET, token)
                {
                    Ok(()) => Sent::Queued,
                    Err(_) => Sent::Failed,
                }
            }
            Err(_) => Sent::Failed,
        }
    }

    fn is_flushed(&mut self, h: Handle) -> bool {
        let c = &mut self.conns[h.index()];
        if c.pending == NO_PENDING {
            return true;
        }
        c.flags |= NOTIFY;
        false
    }

    fn close(&mut self, h: Handle, how: Close) {
        let c = self.conns.remove(h.index());
        if c.pending != NO_PENDING {
            self.held.remove(c.pending as usize);
        }
        // Closing the fd also drops it from the epoll set.
        socket::close(c.fd.into_raw_fd(), how == Close::Abortive);
    }

    /// EPOLL_CTL_DEL and the socket back at once: nothing is in flight.
    fn release(&mut self, h: Handle) -> io::Result<(OwnedFd, Vec<u8>)> {
        let c = self.conns.remove(h.index());
        let out = if c.pending != NO_PENDING {
            self.held.remove(c.pending as usize)
        } else {
            Vec::new()
        };
        // Reads queued for its key in this pass check the generation, and
        // the key is free: nothing of it is read again here, even if the
        // delete failed (it cannot for a registered descriptor; an entry
        // left behind would only report a key that no longer lives).
        let _ = self.epoll.delete(c.fd.as_raw_fd());
        Ok((c.fd, out))
    }

    fn take_listener(&mut self) -> Option<socket2::Socket> {
        let l = self.listener.take()?;
        self.accept_left = 0;
        let _ = self.epoll.delete(l.as_raw_fd());
        Some(l)
    }

    /// A socket from io_uring is blocking: made non-blocking first. Not
    /// read at once as an accepted one is (a device handed over is mostly
    /// silent): bytes already waiting make the edge-triggered add report
    /// it ready anyway.
    fn adopt(&mut self, fd: OwnedFd, token: Token) -> io::Result<Handle> {
        socket::set_nonblocking(fd.as_raw_fd());
        self.watch(fd, token, false, false)
    }

    /// 0 without a system call when the connect's event said it
    /// succeeded (one getsockopt fewer per connection of the client).
    fn socket_error(&self, h: Handle) -> i32 {
        let c = &self.conns[h.index()];
        if c.flags & (CONNECTED | HUNG) == CONNECTED {
            return 0;
        }
        socket::so_error(c.fd.as_raw_fd())
    }

    fn peer_addr(&self, h: Handle) -> Option<std::net::SocketAddr> {
        socket::peer_addr(self.conns[h.index()].fd.as_raw_fd())
    }

    fn peer_left(&self, h: Handle) -> Option<crate::PeerLeft> {
        socket::peer_left(self.conns[h.index()].fd.as_raw_fd())
    }

    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        self.fault.fire()?;
        if self.cursor < self.ready || self.reading.is_some() || !self.fresh.is_empty() {
            return Ok(()); // events not taken yet
        }
        // Reads cut short, or a full batch: more is ready now.
        let busy = !self.again.is_empty() || self.ready == self.events.len() || self.udp_again;
        std::mem::swap(&mut self.again, &mut self.retry);
        if self.udp_again {
            self.udp_again = false;
            self.udp_ready = true;
        }
        self.ready = self.epoll.wait(
            &mut self.events,
            if busy { Duration::ZERO } else { timeout },
        )?;
        self.cursor = 0;
        Ok(())
    }

    fn next(&mut self) -> Option<Event<'_>> {
        loop {
            if self.udp.as_ref().is_some_and(|u| u.1.pending()) {
                return self
                    .udp
                    .as_mut()
                    .and_then(|u| u.1.take())
                    .map(Event::Datagram);
            }
            if self.udp_ready {
                self.udp_ready = false;
                if let Some(u) = &mut self.udp {
                    u.1.fill(u.0.as_raw_fd());
                    // A short batch emptied the queue, and edge-triggered
                    // epoll reports what arrives after it; a full one may
                    // have left more: read it after the others had a turn.
                    self.udp_again = u.1.was_full();
                }
                continue;
            }
            if let Some(r) = self.reading.take() {
                if !self.live(r.key, r.gen) || self.conns[r.key].flags & HUNG != 0 {
                    continue;
                }
                let fd = self.conns[r.key].fd.as_raw_fd();
                match socket::recv(fd, &mut self.scratch) {
                    Ok(0) => return Some(self.hang_up(r.key)),
                    Ok(n) => {
                        // A short read means the receive queue was empty, and
                        // edge-triggered epoll reports any byte that arrives
                        // after it; a full one may have left more.
                        if n == self.scratch.len() {
                            let r = Reading {
                                reads: r.reads + 1,
                                ..r
                            };
                            if r.reads < READS_PER_EVENT {
                                self.reading = Some(r);
                            } else {
                                self.again.push(Reading { reads: 0, ..r });
                            }
                        }
                        let token = self.conns[r.key].token;
                        self.fault.saw(&self.scratch[..n]);
                        return Some(Event::Data(token, &mut self.scratch[..n]));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => return Some(self.hang_up(r.key)),
                }
            }
            if let Some(r) = self.fresh.pop().or_else(|| self.retry.pop()) {
                self.reading = Some(r);
                continue;
            }
            if self.accept_left > 0 {
                let Some(l) = &self.listener else {
                    self.accept_left = 0;
                    continue;
                };
                match listener::accept(l) {
                    Accepted::Socket(fd) => {
                        self.accept_left -= 1;
                        // SAFETY: accept4 returned it and nothing else owns it.
                        return Some(Event::Accepted(unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                    Accepted::Empty => self.accept_left = 0,
                    Accepted::Skipped => self.accept_left -= 1,
                    Accepted::Exhausted(err) => {
                        self.accept_left = 0;
                        let _ = self.epoll.delete(l.as_raw_fd());
                        return Some(Event::AcceptFailed(err));
                    }
                }
                continue;
            }
            if self.cursor == self.ready {
                return None;
            }
            let libc::epoll_event { events, u64: data } = self.events[self.cursor];
            self.cursor += 1;
            match data {
                LISTENER => self.accept_left = ACCEPT_BATCH,
                // An event of the last wait may come after a stop.
                UDP => self.udp_ready = !self.udp_stopped,
                WAKE => {
                    if let Some(fd) = &self.wake {
                        let mut buf = [0u8; 8];
                        // SAFETY: eventfd reads are 8 bytes into a valid buffer.
                        unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
                    }
                    return Some(Event::Wake);
                }
                _ => {
                    let (key, gen) = split(data);
                    if !self.live(key, gen) || self.conns[key].flags & HUNG != 0 {
                        continue; // closed earlier in this pass
                    }
                    let c = &mut self.conns[key];
                    if c.flags & CONNECTING != 0 {
                        let done = OUT | libc::EPOLLERR as u32 | libc::EPOLLHUP as u32;
                        if events & done == 0 {
                            continue;
                        }
                        c.flags &= !CONNECTING;
                        // At the harvest epoll polls the socket again: a
                        // connect refused or reset by then shows as an error
                        // or a hang-up here, never as writability alone.
                        if events & (libc::EPOLLERR as u32 | libc::EPOLLHUP as u32) == 0 {
                            c.flags |= CONNECTED;
                        }
                        // Read after the user has answered the connect, if
                        // more than writability was reported: bytes that
                        // come later bring an edge of their own, so a client
                        // whose peer has not spoken yet saves a recv bound
                        // for EAGAIN.
                        if events & !OUT != 0 {
                            self.reading = Some(Reading { key, gen, reads: 0 });
                        }
                        return Some(Event::Connected(c.token));
                    }
                    if events & !OUT != 0 {
                        self.reading = Some(Reading { key, gen, reads: 0 });
                        // Bytes and the peer's FIN (or an error) in one
                        // edge: a short read takes the bytes, and no edge
                        // is left for the end. Read again next pass, where
                        // recv says it.
                        if events & (RDHUP | libc::EPOLLHUP as u32 | libc::EPOLLERR as u32) != 0 {
                            self.again.push(Reading { key, gen, reads: 0 });
                        }
                    }
                    if events & OUT != 0 {
                        if let Some(ev) = self.flush(key) {
                            return Some(ev);
                        }
                    }
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

    fn driver(max_pending: usize) -> EpollDriver {
        EpollDriver::new(DriverConfig { max_pending }).unwrap()
    }

    #[test]
    fn a_stopped_driver_leaves_datagrams_to_the_other_reader() {
        crate::udp::tests::a_stopped_driver_leaves_datagrams_to_the_other_reader(&mut driver(
            1 << 16,
        ));
    }

    /// A connected pair of Unix stream sockets, non-blocking.
    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds is valid for two descriptors.
        assert_eq!(
            unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            },
            0
        );
        // SAFETY: both are new and owned here.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Everything `fd` holds now (non-blocking).
    fn drain(fd: &OwnedFd, into: &mut Vec<u8>) {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = socket::recv(fd.as_raw_fd(), &mut buf) {
            if n == 0 {
                break;
            }
            into.extend_from_slice(&buf[..n]);
        }
    }

    /// The events of one wait, as owned values: (what, token, bytes).
    fn pass(d: &mut EpollDriver, timeout: Duration) -> Vec<(&'static str, u64, Vec<u8>)> {
        d.wait(timeout).unwrap();
        let mut out = Vec::new();
        while let Some(e) = d.next() {
            out.push(match e {
                Event::Data(t, b) => ("data", t.0, b.to_vec()),
                Event::Hangup(t) => ("hangup", t.0, Vec::new()),
                Event::Flushed(t) => ("flushed", t.0, Vec::new()),
                Event::Connected(t) => ("connected", t.0, Vec::new()),
                Event::Wake => ("wake", 0, Vec::new()),
                other => panic!("unexpected {other:?}"),
            });
        }
        out
    }

    #[test]
    fn bytes_already_there_at_register_and_later_ones_are_reported_as_data() {
        let mut d = driver(1 << 16);
        let (a, b) = pair();
        socket::send(b.as_raw_fd(), b"early").unwrap();
        d.register(a, Token(7), false).unwrap();
        assert_eq!(
            pass(&mut d, Duration::ZERO),
            [("data", 7, b"early".to_vec())]
        );
        // Nothing more: an idle connection reports nothing.
        assert_eq!(pass(&mut d, Duration::from_millis(20)), []);
        socket::send(b.as_raw_fd(), b"later").unwrap();
        assert_eq!(
            pass(&mut d, Duration::from_secs(1)),
            [("data", 7, b"later".to_vec())]
        );
    }

    /// An adopted socket is not read at once (a handed-over device is
    /// mostly silent, and each read is a system call per connection of an
    /// upgrade): what waits in it, bytes or the peer's close, comes from
    /// the edge-triggered add's own report, and an idle one costs no read.
    #[test]
    fn an_adopted_socket_reports_what_waits_in_it_without_a_read_at_once() {
        let mut d = driver(1 << 16);
        let (a, b) = pair();
        socket::send(b.as_raw_fd(), b"waiting").unwrap();
        d.adopt(a, Token(8)).unwrap();
        assert!(d.fresh.is_empty(), "an adopted socket is not read at once");
        assert_eq!(
            pass(&mut d, Duration::from_secs(1)),
            [("data", 8, b"waiting".to_vec())]
        );
        let (c, e) = pair();
        drop(e);
        d.adopt(c, Token(9)).unwrap();
        assert_eq!(
            pass(&mut d, Duration::from_secs(1)),
            [("hangup", 9, Vec::new())]
        );
        let (idle, _peer) = pair();
        d.adopt(idle, Token(10)).unwrap();
        assert_eq!(pass(&mut d, Duration::from_millis(20)), []);
    }

    #[test]
    fn a_peer_close_is_a_hangup_and_then_nothing() {
        let mut d = driver(1 << 16);
        let (a, b) = pair();
        let h = d.register(a, Token(3), false).unwrap();
        assert_eq!(pass(&mut d, Duration::ZERO), []);
        socket::send(b.as_raw_fd(), b"last words").unwrap();
        drop(b);
        // The bytes, then the end (in the same pass or the next).
        let mut seen = pass(&mut d, Duration::from_secs(1));
        if seen.len() == 1 {
            seen.extend(pass(&mut d, Duration::from_millis(200)));
        }
        assert_eq!(
            seen,
            [
                ("data", 3, b"last words".to_vec()),
                ("hangup", 3, Vec::new())
            ]
        );
        // Hung up: sends fail, no more events come.
        assert_eq!(d.send(h, b"x"), Sent::Failed);
        assert_eq!(pass(&mut d, Duration::from_millis(20)), []);
        d.close(h, Close::Abortive);
        assert_eq!(d.conns.len(), 0);
    }

    #[test]
    fn a_reset_peer_is_a_hangup() {
        let mut d = driver(1 << 16);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        d.register(OwnedFd::from(s), Token(5), false).unwrap();
        assert_eq!(pass(&mut d, Duration::ZERO), []);
        // Linger 0: the close sends a RST.
        socket::close(peer.into_raw_fd(), true);
        assert_eq!(
            pass(&mut d, Duration::from_secs(1)),
            [("hangup", 5, Vec::new())]
        );
    }

    #[test]
    fn output_the_socket_refuses_is_kept_and_flushed_in_order_when_writable() {
        let mut d = driver(64 << 20);
        let (a, b) = pair();
        let h = d.register(a, Token(11), false).unwrap();
        assert_eq!(pass(&mut d, Duration::ZERO), []);
        // Far more than a socket buffer, in pieces: the first fills the
        // socket, the rest queue behind it.
        let want: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        let mut results = Vec::new();
        for piece in want.chunks(1 << 20) {
            results.push(d.send(h, piece));
        }
        assert_eq!(results[0], Sent::Queued, "{results:?}");
        assert!(results.iter().all(|r| *r == Sent::Queued), "{results:?}");
        assert!(!d.is_flushed(h));
        let mut got = Vec::new();
        let mut flushed = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while flushed == 0 && std::time::Instant::now() < deadline {
            drain(&b, &mut got);
            for (what, token, _) in pass(&mut d, Duration::from_millis(10)) {
                assert_eq!((what, token), ("flushed", 11));
                flushed += 1;
            }
        }
        drain(&b, &mut got);
        assert_eq!(flushed, 1, "one Flushed once all is out");
        assert!(d.is_flushed(h));
        assert_eq!(d.held.len(), 0, "nothing held once flushed");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the bytes arrived out of order");
        // Idle again: a send goes straight out.
        assert_eq!(d.send(h, b"after"), Sent::Done);
        got.clear();
        drain(&b, &mut got);
        assert_eq!(got, b"after");
    }

    #[test]
    fn output_past_max_pending_is_an_overflow_and_close_drops_what_is_held() {
        let mut d = driver(1 << 20);
        let (a, _b) = pair();
        let h = d.register(a, Token(2), false).unwrap();
        let big = vec![7u8; 4 << 20];
        // More than the socket takes plus max_pending.
        assert_eq!(d.send(h, &big), Sent::Overflow);
        let (a, _b2) = pair();
        let h2 = d.register(a, Token(3), false).unwrap();
        let mut results = Vec::new();
        for _ in 0..8 {
            results.push(d.send(h2, &big[..256 << 10]));
        }
        assert!(results.contains(&Sent::Queued), "{results:?}");
        assert_eq!(results.last(), Some(&Sent::Overflow), "{results:?}");
        assert_eq!(d.held.len(), 1, "h2's output is held");
        d.close(h, Close::Abortive);
        d.close(h2, Close::Abortive);
        assert_eq!(d.conns.len(), 0);
        assert_eq!(d.held.len(), 0, "and dropped with it");
    }

    /// Issue 18: the fd's niche and the output out of line keep a
    /// connection's entry at 24 bytes (it was 48 with a Vec in each).
    #[test]
    fn a_connection_entry_is_24_bytes() {
        assert_eq!(std::mem::size_of::<Conn>(), 24);
        assert_eq!(std::mem::size_of::<Option<Conn>>(), 24);
    }

    #[test]
    fn a_stale_event_of_a_closed_connection_never_reaches_its_successor() {
        let mut d = driver(1 << 16);
        let (a, b) = pair();
        let h = d.register(a, Token(1), false).unwrap();
        assert_eq!(pass(&mut d, Duration::ZERO), []);
        socket::send(b.as_raw_fd(), b"for the first").unwrap();
        // The event is taken from epoll, then its connection closes and a
        // new one takes the same slab key before the event is handled.
        d.wait(Duration::from_secs(1)).unwrap();
        assert_eq!(d.ready, 1);
        let old_gen = d.conns[h.index()].gen;
        d.close(h, Close::Abortive);
        let (c, c_peer) = pair();
        let h2 = d.register(c, Token(2), false).unwrap();
        assert_eq!(h2.index(), h.index(), "the key is reused");
        assert_ne!(d.conns[h2.index()].gen, old_gen, "with a new generation");
        let mut seen = Vec::new();
        while let Some(e) = d.next() {
            seen.push(format!("{e:?}"));
        }
        assert!(seen.is_empty(), "{seen:?}");
        // The successor's own bytes are its own.
        socket::send(c_peer.as_raw_fd(), b"for the second").unwrap();
        assert_eq!(
            pass(&mut d, Duration::from_secs(1)),
            [("data", 2, b"for the second".to_vec())]
        );
    }

    /// Hot upgrade: release hands back the socket and the output held,
    /// in order; the driver reads nothing of it after, and the bytes the
    /// kernel holds stay in the socket for its next reader.
    #[test]
    fn release_hands_back_the_socket_and_its_held_output() {
        let mut d = driver(64 << 20);
        let (a, b) = pair();
        let h = d.register(a, Token(4), false).unwrap();
        assert_eq!(pass(&mut d, Duration::ZERO), []);
        let big: Vec<u8> = (0..2 << 20).map(|i: u32| (i % 253) as u8).collect();
        assert_eq!(d.send(h, &big), Sent::Queued);
        socket::send(b.as_raw_fd(), b"unread").unwrap();
        let (fd, held) = d.release(h).unwrap();
        assert!(!held.is_empty() && held.len() < big.len());
        assert_eq!(d.conns.len(), 0);
        assert_eq!(d.held.len(), 0);
        // Nothing more is reported for it, though bytes wait in it.
        socket::send(b.as_raw_fd(), b" and more").unwrap();
        assert_eq!(pass(&mut d, Duration::from_millis(20)), []);
        // The next owner (any driver) reads what the kernel held.
        let mut d2 = driver(1 << 16);
        d2.adopt(fd, Token(5)).unwrap();
        assert_eq!(
            pass(&mut d2, Duration::from_millis(200)),
            [("data", 5, b"unread and more".to_vec())]
        );
        // What the peer got, then the held part: the whole output in order.
        let mut got = Vec::new();
        drain(&b, &mut got);
        got.extend_from_slice(&held);
        assert!(got == big, "the output was cut or reordered");
    }

    #[test]
    fn take_listener_stops_accepting_and_hands_the_socket_back_open() {
        let mut d = driver(1 << 16);
        let l = crate::listener::bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        d.listen(l).unwrap();
        let l = d.take_listener().unwrap();
        assert!(d.take_listener().is_none());
        let _c = std::net::TcpStream::connect(addr).unwrap();
        d.wait(Duration::from_millis(50)).unwrap();
        assert!(d.next().is_none(), "no accept after the hand-back");
        // Still listening: the connection waits in its queue.
        assert!(matches!(listener::accept(&l), Accepted::Socket(_)));
    }

    #[test]
    fn a_connect_is_reported_once_then_data_flows() {
        let mut d = driver(1 << 16);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = socket::connect_from(l.local_addr().unwrap(), None).unwrap();
        let h = d.register(fd, Token(9), true).unwrap();
        let (mut s, _) = l.accept().unwrap();
        assert_eq!(
            pass(&mut d, Duration::from_secs(1)),
            [("connected", 9, Vec::new())]
        );
        assert_eq!(d.socket_error(h), 0);
        assert_eq!(d.send(h, b"hello"), Sent::Done);
        let mut buf = [0u8; 5];
        std::io::Read::read_exact(&mut s, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        std::io::Write::write_all(&mut s, b"back").unwrap();
        assert_eq!(
            pass(&mut d, Duration::from_secs(1)),
            [("data", 9, b"back".to_vec())]
        );
    }
}
