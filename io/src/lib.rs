//! The I/O driver: one event loop under the server's shards and the
//! client's fleets, as mio is under its users.
//!
//! The driver owns the sockets and makes every system call: the listener's
//! accepts, each connection's reads into driver-owned buffers, bounded
//! pending output and its sends, close and reset, wake-ups from other
//! threads, and the wait until the next deadline. Its user keeps only its
//! decisions (the protocol state, the wheel, the policies) and talks to it
//! in [`Token`]s (the user's name for a connection, carried by every
//! [`Event`]) and [`Handle`]s (the driver's name, used to act on one).
//!
//! Two backends behind [`Driver`]:
//! - [`epoll::EpollDriver`]: readiness; every connection armed once,
//!   edge-triggered, and read and written with non-blocking system calls.
//! - [`uring::UringDriver`]: completions on the shard's own io_uring: a
//!   multishot accept, one multishot recv per connection into a provided
//!   buffer ring, sends and closes as SQEs, one `io_uring_enter` per loop,
//!   and never a cancel.
//!
//! Beside the driver, what else both binaries need from the kernel:
//! [`listener`], [`socket`] and [`udp`] (the sockets themselves), [`tls`]
//! (the rustls glue of the shard and the fleet), [`host`] (the process's
//! plumbing: CPUs, limits, worker processes) and [`script`] (a driver with
//! no sockets, for tests of a driver's user).

pub mod epoll;
pub mod handover;
pub mod host;
pub mod listener;
pub mod script;
pub mod socket;
pub mod tls;
pub mod tls_tickets;
pub mod udp;
pub mod uring;

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

/// The user's name for a connection: any 64 bits, handed back in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

impl Token {
    /// The one packing of a slot's key and generation in 64 bits (the
    /// shard's and the fleet's tokens, the epoll driver's epoll data, the
    /// io_uring driver's user data): the generation high, the key low. A
    /// key is below 2^32.
    #[inline]
    pub const fn pack(key: usize, gen: u32) -> Token {
        Token((gen as u64) << 32 | key as u64)
    }

    /// The key of [`Token::pack`].
    #[inline]
    pub const fn key(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    /// The generation of [`Token::pack`].
    #[inline]
    pub const fn gen(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// The driver's name for a connection it holds. Valid from
/// [`Driver::register`] until the user calls [`Driver::close`] on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handle(pub(crate) u32);

impl Handle {
    /// A placeholder for a connection that holds no socket yet.
    pub const NONE: Handle = Handle(u32::MAX);

    fn index(self) -> usize {
        self.0 as usize
    }
}

/// How a connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// FIN after what the kernel already holds.
    Graceful,
    /// SO_LINGER 0: a reset, and the kernel frees the socket at once.
    Abortive,
}

/// What [`Driver::send`] did with the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Handed to the kernel (or to a send the kernel is running).
    Done,
    /// Held back behind earlier output; an [`Event::Flushed`] follows when
    /// it is all out.
    Queued,
    /// Taking them would put more than the bound on pending output: nothing
    /// was taken. The peer is not reading; close it.
    Overflow,
    /// The socket failed: the peer is gone. Close it.
    Failed,
}

/// What happened, as [`Driver::next`] reports it.
#[derive(Debug)]
pub enum Event<'a> {
    /// A new connection from the listener (not yet registered).
    Accepted(OwnedFd),
    /// Accepting failed for lack of descriptors or memory (EMFILE, ENFILE,
    /// ENOBUFS, ENOMEM) or because the listener is broken. The driver
    /// stopped accepting; call [`Driver::resume_accepting`] after a pause.
    AcceptFailed(io::Error),
    /// Bytes from a connection. They are the driver's: valid until the next
    /// call to [`Driver::next`], which gives the buffer back.
    Data(Token, &'a mut [u8]),
    /// End of stream, a reset or a socket error: no more events come for
    /// this connection; close it.
    Hangup(Token),
    /// Output that was [`Sent::Queued`] (or reported by
    /// [`Driver::is_flushed`]) is all out.
    Flushed(Token),
    /// A socket registered while connecting finished connecting: check
    /// [`Driver::socket_error`].
    Connected(Token),
    /// The wake-up descriptor ([`Driver::watch_wake`]) was written.
    Wake,
    /// One datagram from the UDP socket of [`Driver::watch_datagrams`]
    /// (cut at [`udp::DATAGRAM`] bytes). The driver's, as [`Event::Data`]'s.
    Datagram(&'a [u8]),
}

/// Counters of what the driver did, for the stats line and the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoStats {
    /// io_uring: CQEs the kernel had to hold back because the completion
    /// queue was full (FEAT_NODROP keeps them), counted per wait that saw it.
    pub cq_overflows: u64,
    /// io_uring: IORING_OP_ASYNC_CANCEL requests submitted. The design
    /// submits none outside a hot upgrade ([`Driver::release`],
    /// [`Driver::take_listener`]) and admission's pauses; this counter proves it.
    pub cancels: u64,
    /// io_uring: submits of a full submission queue (each try counted;
    /// past a bound the driver gives up and its wait fails).
    pub sq_full: u64,
}

/// One event loop's I/O. The user drives it: [`Driver::wait`], then
/// [`Driver::next`] until it returns None, acting on each event.
pub trait Driver {
    /// Which backend this is ("epoll" or "io_uring").
    fn name(&self) -> &'static str;

    /// True when [`Driver::next`] reads its sockets as it goes (epoll:
    /// `recv` after the wait), so an [`Event::Data`] or
    /// [`Event::Datagram`] may hold bytes that arrived after the wait
    /// returned; false when every byte it reports had arrived by then
    /// (io_uring: completions). A user that stamps bytes with the time it
    /// read before its turn must read the clock again per such event, or
    /// it stamps them early.
    fn reads_after_wait(&self) -> bool {
        false
    }

    /// Lets [`Driver::wait`] gather events for up to `window` once one has
    /// come (io_uring's min-wait, Linux 6.12+), so that a loop woken by a
    /// trickle of heartbeats handles them in batches: one wake-up per batch
    /// rather than per event, at the price of up to `window` of latency.
    /// Returns false where the driver cannot (epoll; older kernels):
    /// nothing changes then.
    fn set_batch_wait(&mut self, window: std::time::Duration) -> bool {
        let _ = window;
        false
    }

    /// Starts accepting on `listener` (a non-blocking listening socket).
    fn listen(&mut self, listener: socket2::Socket) -> io::Result<()>;

    /// Stops accepting for good and closes the listener.
    fn unlisten(&mut self);

    /// Accepts again after an [`Event::AcceptFailed`] pause or
    /// [`Driver::pause_accepting`].
    fn resume_accepting(&mut self) -> io::Result<()>;

    /// Stops accepting until [`Driver::resume_accepting`]: new connections
    /// wait in the listener's queue (admission control, `defer`). A few
    /// accepted before the pause took hold may still be reported.
    fn pause_accepting(&mut self) {}

    /// Answers a connection just accepted with `answer` (if any: it must
    /// fit a fresh socket's buffer) and closes it, without registering it:
    /// admission control's refusal. Without an answer, a reset.
    fn refuse(&mut self, fd: OwnedFd, answer: &[u8]) {
        socket::refuse(fd, answer);
    }

    /// Reports [`Event::Wake`] whenever `eventfd` is written.
    fn watch_wake(&mut self, eventfd: OwnedFd) -> io::Result<()>;

    /// Reads datagrams from `sock` (a bound, non-blocking UDP socket), many
    /// per system call (or per completion batch), each reported as an
    /// [`Event::Datagram`]. Drivers that read none say so.
    fn watch_datagrams(&mut self, sock: socket2::Socket) -> io::Result<()> {
        drop(sock);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this I/O driver reads no datagrams",
        ))
    }

    /// Stops reading the socket of [`Driver::watch_datagrams`] (a hot
    /// upgrade's old process, once its connections start to move: a
    /// datagram it read for one already gone would be lost; the new process
    /// reads the same socket). Datagrams read before are still reported,
    /// until [`Driver::stopping_datagrams`] says false.
    fn stop_datagrams(&mut self) {}

    /// True while a [`Driver::stop_datagrams`] has not taken hold: io_uring's
    /// multishot read not yet ended by its cancel, or epoll's last batch
    /// not yet all reported.
    fn stopping_datagrams(&self) -> bool {
        false
    }

    /// Reads the datagram socket again after [`Driver::stop_datagrams`]
    /// (the upgrade failed: this process serves its devices on).
    fn resume_datagrams(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Takes a connected socket (or, with `connecting`, one whose connect is
    /// in progress: [`Event::Connected`] comes first) and starts reading it.
    /// A socket whose bytes are already there is read in the same pass.
    fn register(&mut self, fd: OwnedFd, token: Token, connecting: bool) -> io::Result<Handle>;

    /// Sends `bytes` on `h` after whatever it already holds for it.
    fn send(&mut self, h: Handle, bytes: &[u8]) -> Sent;

    /// True when nothing of `h`'s output is held or in flight; otherwise
    /// false, and an [`Event::Flushed`] follows once it is all out.
    fn is_flushed(&mut self, h: Handle) -> bool;

    /// Sockets closed by the user whose close is still under way (io_uring:
    /// a last send in flight, or the recv not yet ended). A loop that exits
    /// waits for 0, so that their last words and FIN go out, not a reset.
    fn closing(&self) -> usize {
        0
    }

    /// Closes `h`; no event for it follows, and `h` is not to be used again.
    fn close(&mut self, h: Handle, how: Close);

    /// Hot upgrade (docs/upgrade.md): stops reading `h` for good and hands
    /// back its socket and the output it held and the kernel had not taken
    /// yet, in order (the new owner sends it first); `h` is not to be used
    /// again. Bytes the kernel holds for reading stay in the socket.
    ///
    /// `Err(WouldBlock)`: the stop is under way (io_uring: the recv's
    /// cancel, or a send in flight, has not completed); events for `h` may
    /// still come (bytes that raced the stop: handle them as usual), and
    /// nothing more goes out (output is held for the hand-back). Call again
    /// after the next wait. Any other error: the socket could not be
    /// released; close `h`.
    fn release(&mut self, h: Handle) -> io::Result<(OwnedFd, Vec<u8>)>;

    /// A count that grows whenever a release under way may have become
    /// ready (io_uring: a releasing connection's recv ended or its send
    /// completed). A caller with thousands of releases under way asks
    /// again only when it changed, not every turn for every one.
    fn release_progress(&self) -> u64 {
        0
    }

    /// Hot upgrade: stops accepting and hands back the listening socket
    /// untouched (its queue and its place in the SO_REUSEPORT group go
    /// with it), or None if there is none.
    fn take_listener(&mut self) -> Option<socket2::Socket>;

    /// Hot upgrade: takes a connected socket that another driver (perhaps
    /// of another backend, in another process) read before, putting it in
    /// the mode this driver needs, and starts reading it as [`Driver::register`].
    fn adopt(&mut self, fd: OwnedFd, token: Token) -> io::Result<Handle> {
        self.register(fd, token, false)
    }

    /// SO_ERROR of `h`'s socket: 0 once a connect succeeded. After an
    /// [`Event::Connected`] whose readiness showed no error or hang-up,
    /// both backends answer 0 without asking the kernel.
    fn socket_error(&self, h: Handle) -> i32;

    /// Whether `h`'s peer has left (its FIN or reset arrived), whatever is
    /// still queued to read: for work not worth doing for a peer gone.
    fn peer_left(&self, h: Handle) -> Option<PeerLeft>;

    /// The peer's address of `h`'s socket.
    fn peer_addr(&self, h: Handle) -> Option<std::net::SocketAddr>;

    /// Submits what is queued and blocks until an event is ready or
    /// `timeout` passes (returns at once if events are ready).
    fn wait(&mut self, timeout: Duration) -> io::Result<()>;

    /// The next ready event, or None when there is none left.
    fn next(&mut self) -> Option<Event<'_>>;

    fn stats(&self) -> IoStats;
}

/// How a peer left ([`Driver::peer_left`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLeft {
    /// Its FIN arrived: it sends no more, and may still read.
    Fin,
    /// Its reset arrived: it is gone.
    Reset,
}

/// Which backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Epoll,
    Uring,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "epoll" => Ok(Backend::Epoll),
            "uring" | "io_uring" => Ok(Backend::Uring),
            _ => Err(format!("{s:?} is not an I/O backend: uring or epoll")),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Epoll => "epoll",
            Backend::Uring => "uring",
        })
    }
}

impl Backend {
    /// The backend that can run here: `wanted`, or epoll with the one
    /// sentence that says why when io_uring cannot (old kernel,
    /// kernel.io_uring_disabled, a seccomp filter, a missing feature).
    pub fn usable(wanted: Backend) -> (Backend, Option<String>) {
        match wanted {
            Backend::Epoll => (Backend::Epoll, None),
            Backend::Uring => match uring::probe() {
                Ok(()) => (Backend::Uring, None),
                Err(why) => (
                    Backend::Epoll,
                    Some(format!(
                        "io_uring is not usable here ({why}): running on epoll instead"
                    )),
                ),
            },
        }
    }
}

/// Sizes of a driver.
#[derive(Debug, Clone, Copy)]
pub struct DriverConfig {
    /// Most output bytes held for one connection (a peer that does not read
    /// is closed past it, by the user on [`Sent::Overflow`]).
    pub max_pending: usize,
}

/// Test hook: with `C1M_INJECT_SHARD_FAILURE=error` (or `=panic`) in the
/// environment, a driver that reads [`INJECT_SHARD_FAILURE`] from any
/// connection fails its next [`Driver::wait`] with an error (or panics
/// there, outside any contained parser), as a broken ring or a bug would:
/// the tests of a shard's death use it. Off unless the variable is set;
/// never set it in production.
pub const INJECT_SHARD_FAILURE: &[u8] = b"c1m-inject-shard-failure";

#[derive(Debug, Default)]
pub(crate) struct FaultHook {
    /// Some(true): panic; Some(false): an error; None: off.
    panic: Option<bool>,
    armed: bool,
}

impl FaultHook {
    pub(crate) fn from_env() -> FaultHook {
        let panic = match std::env::var("C1M_INJECT_SHARD_FAILURE").as_deref() {
            Ok("error") => Some(false),
            Ok("panic") => Some(true),
            _ => None,
        };
        FaultHook {
            panic,
            armed: false,
        }
    }

    /// Looks for the marker in bytes read (only when the hook is on).
    pub(crate) fn saw(&mut self, bytes: &[u8]) {
        if self.panic.is_some()
            && bytes
                .windows(INJECT_SHARD_FAILURE.len())
                .any(|w| w == INJECT_SHARD_FAILURE)
        {
            self.armed = true;
        }
    }

    /// Fails as asked once the marker was seen.
    pub(crate) fn fire(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.armed) {
            return Ok(());
        }
        if self.panic == Some(true) {
            panic!("injected panic in the I/O loop (C1M_INJECT_SHARD_FAILURE=panic)");
        }
        Err(io::Error::other(
            "injected driver failure (C1M_INJECT_SHARD_FAILURE=error)",
        ))
    }
}

/// Turns a negative system call result into the error it stands for.
pub fn cvt(r: i32) -> io::Result<i32> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Whether an accept error is one connection's trouble (skip it and accept
/// the next), as accept(2) lists them, rather than the process's or the
/// listener's (out of descriptors or memory, or a broken listener: pause,
/// say so, and try again later, never retry in a tight loop).
fn is_one_connections(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNABORTED
            | libc::EPERM
            | libc::EINTR
            | libc::EAGAIN
            | libc::EPROTO
            | libc::ETIMEDOUT
            | libc::ENETDOWN
            | libc::ENETUNREACH
            | libc::EHOSTDOWN
            | libc::EHOSTUNREACH
            | libc::ENONET
            | libc::ENOPROTOOPT
            | libc::EOPNOTSUPP
    )
}

#[cfg(test)]
mod tests {
    use super::Token;

    /// One packing: key low, generation high, each back whole.
    #[test]
    fn a_token_packs_key_and_generation() {
        for (key, gen) in [(0, 0), (1, 7), (0xffff_fffe, u32::MAX), (12345, 1 << 31)] {
            let t = Token::pack(key, gen);
            assert_eq!((t.key(), t.gen()), (key, gen));
        }
        assert_eq!(Token::pack(2, 1).0, 1 << 32 | 2);
    }
}
