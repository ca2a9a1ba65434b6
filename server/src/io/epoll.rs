//! A per-shard epoll set: every connection's readiness is armed here once, at
//! accept, and never re-armed or cancelled while the connection lives.
//!
//! Why not a glommio stream per connection: each idle glommio read parks an
//! IORING_OP_POLL_ADD in the executor's ring, and every reactor loop cancels
//! the previous preemption timer with IORING_OP_ASYNC_CANCEL, which walks one
//! bucket of the ring's poll hash table (8 buckets at the default depth). The
//! cost of every loop then grows with the number of idle connections. Here
//! epoll hands back only the sockets that are ready, and an idle shard
//! blocks in [`Epoll::wait`] rather than in glommio's park (see there why).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub const IN: u32 = libc::EPOLLIN as u32;
pub const OUT: u32 = libc::EPOLLOUT as u32;
pub const RDHUP: u32 = libc::EPOLLRDHUP as u32;
pub const ET: u32 = libc::EPOLLET as u32;

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

    /// Fills `events` with ready entries without blocking; returns how many.
    pub fn poll_now(&self, events: &mut [libc::epoll_event]) -> io::Result<usize> {
        self.wait(events, std::time::Duration::ZERO)
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
    /// did the same to 7 of 60 (results/1m-20261126T081605Z). So a shard
    /// never hands its thread back to glommio's reactor: glommio provides
    /// the pinned executor thread, the shard's loop runs on it until the end,
    /// blocking here when idle. A shard is the only task on its executor, so
    /// nothing waits behind it; and the blocking wait measured cheaper (the
    /// `epoll` rows of bench/core.sh).
    pub fn wait(
        &self,
        events: &mut [libc::epoll_event],
        timeout: std::time::Duration,
    ) -> io::Result<usize> {
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

pub fn cvt(r: i32) -> io::Result<i32> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
