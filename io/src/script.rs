//! A driver with no sockets, for tests of a driver's user (the shard's):
//! events are scripted, and what the user asks of it is recorded.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use socket2::Socket;

use crate::{Close, Driver, Event, Handle, IoStats, Sent, Token};

/// What the fake driver reports next.
pub enum Fake {
    Accept,
    Data(Vec<u8>),
    Flushed,
    AcceptFailed(i32),
}

/// A driver with no sockets: events are scripted, and what the shard
/// asks of it is recorded. Everything is about one connection.
#[derive(Default)]
pub struct Script {
    pub events: VecDeque<Fake>,
    pub token: Option<Token>,
    pub data: Vec<u8>,
    /// Sends answer Queued from here on (output held, as for a device
    /// that stopped reading).
    pub hold_output: bool,
    pub held: bool,
    /// What the next sends answer, in order (recorded in `sent` all the
    /// same): Failed (the peer is gone), Overflow (too much held), Queued.
    /// Empty: as `hold_output` says.
    pub send_results: VecDeque<Sent>,
    /// register fails this many more times (ENOMEM).
    pub register_failures: u32,
    /// What stats() reports.
    pub io_stats: IoStats,
    pub sent: Vec<Vec<u8>>,
    pub closed: Vec<Close>,
    /// resume_accepting fails this many more times.
    pub resume_failures: u32,
    pub resumes: u32,
    /// Times [`Driver::pause_accepting`] was called.
    pub pauses: u32,
    /// Connections handed back by [`Driver::release`].
    pub released: u32,
    /// What [`Driver::reads_after_wait`] answers (as epoll does: true).
    pub reads_after_wait: bool,
    /// [`Driver::release`] answers WouldBlock (as io_uring does until the
    /// recv's cancel completes), and what [`Driver::release_progress`] says.
    pub release_waits: bool,
    pub release_progress: u64,
}

impl Driver for Script {
    fn release_progress(&self) -> u64 {
        self.release_progress
    }

    fn name(&self) -> &'static str {
        "script"
    }
    fn reads_after_wait(&self) -> bool {
        self.reads_after_wait
    }
    fn listen(&mut self, _: Socket) -> io::Result<()> {
        Ok(())
    }
    fn unlisten(&mut self) {}
    fn pause_accepting(&mut self) {
        self.pauses += 1;
    }
    fn resume_accepting(&mut self) -> io::Result<()> {
        self.resumes += 1;
        if self.resume_failures > 0 {
            self.resume_failures -= 1;
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(())
    }
    fn watch_wake(&mut self, _: OwnedFd) -> io::Result<()> {
        Ok(())
    }
    fn register(&mut self, _: OwnedFd, token: Token, _: bool) -> io::Result<Handle> {
        if self.register_failures > 0 {
            self.register_failures -= 1;
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        self.token = Some(token);
        Ok(Handle(0))
    }
    fn send(&mut self, _: Handle, bytes: &[u8]) -> Sent {
        self.sent.push(bytes.to_vec());
        if let Some(r) = self.send_results.pop_front() {
            self.held |= r == Sent::Queued;
            return r;
        }
        if self.hold_output {
            self.held = true;
            return Sent::Queued;
        }
        Sent::Done
    }
    fn is_flushed(&mut self, _: Handle) -> bool {
        !self.held
    }
    fn close(&mut self, _: Handle, how: Close) {
        self.closed.push(how);
    }
    /// Hands back a placeholder descriptor (an eventfd) and what
    /// `hold_output` kept, as the real drivers hand back the socket.
    fn release(&mut self, _: Handle) -> io::Result<(OwnedFd, Vec<u8>)> {
        if self.release_waits {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.released += 1;
        let out = if std::mem::take(&mut self.held) {
            self.sent.last().cloned().unwrap_or_default()
        } else {
            Vec::new()
        };
        // SAFETY: a new eventfd, owned by the OwnedFd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just made, nothing else owns it.
        Ok((unsafe { OwnedFd::from_raw_fd(fd) }, out))
    }
    fn take_listener(&mut self) -> Option<Socket> {
        None
    }
    fn socket_error(&self, _: Handle) -> i32 {
        0
    }
    fn peer_addr(&self, _: Handle) -> Option<std::net::SocketAddr> {
        None
    }
    fn peer_left(&self, _: Handle) -> Option<crate::PeerLeft> {
        None
    }
    fn wait(&mut self, _: Duration) -> io::Result<()> {
        Ok(())
    }
    fn next(&mut self) -> Option<Event<'_>> {
        Some(match self.events.pop_front()? {
            // Any descriptor will do: the shard only hands it back.
            // SAFETY: a new eventfd, owned by the OwnedFd.
            Fake::Accept => Event::Accepted(unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, 0)) }),
            Fake::Data(bytes) => {
                self.data = bytes;
                Event::Data(self.token?, &mut self.data)
            }
            Fake::Flushed => {
                self.held = false;
                Event::Flushed(self.token?)
            }
            Fake::AcceptFailed(errno) => Event::AcceptFailed(io::Error::from_raw_os_error(errno)),
        })
    }
    fn stats(&self) -> IoStats {
        self.io_stats
    }
}
