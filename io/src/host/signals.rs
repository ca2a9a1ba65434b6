//! SIGINT and SIGTERM (and SIGUSR2, the hot upgrade's trigger), taken by one thread: blocked before the worker
//! threads start (they inherit the mask), then waited for with a timeout
//! between the thread's other chores (stats lines, children). SIGCHLD is
//! blocked and waited for too, only to end the wait early: a child ended,
//! or one of our threads ([`wake`]) has news for that thread.

use std::time::Duration;

/// SIGINT and SIGTERM, blocked in the thread that made it.
pub struct Signals(libc::sigset_t);

impl Signals {
    /// Blocks SIGINT and SIGTERM in this thread (and the threads it
    /// starts from now on), so that only [`Signals::wait`] sees them.
    pub fn block() -> Result<Signals, String> {
        // SAFETY: sigset operations on a local set; pthread_sigmask on this thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err("cannot block SIGINT/SIGTERM/SIGUSR2/SIGCHLD".into());
            }
            Ok(Signals(set))
        }
    }

    /// [`Signals::block`] and SIGUSR1 too: a `--procs` client parent's
    /// word to its workers (every worker has finished its ramp).
    pub fn block_with_usr1() -> Result<Signals, String> {
        let mut signals = Signals::block()?;
        // SAFETY: sigset operations on our set; pthread_sigmask on this thread.
        unsafe {
            let mut one: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut one);
            libc::sigaddset(&mut one, libc::SIGUSR1);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &one, std::ptr::null_mut()) != 0 {
                return Err("cannot block SIGUSR1".into());
            }
            libc::sigaddset(&mut signals.0, libc::SIGUSR1);
        }
        Ok(signals)
    }

    /// Waits up to `timeout` for SIGINT or SIGTERM; its name if one came.
    /// Returns None at once on SIGCHLD (a child ended, or a [`wake`]).
    pub fn wait(&self, timeout: Duration) -> Option<&'static str> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the set and ts are valid for the call; no siginfo is asked for.
        match unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) } {
            libc::SIGINT => Some("SIGINT"),
            libc::SIGTERM => Some("SIGTERM"),
            libc::SIGUSR2 => Some("SIGUSR2"),
            libc::SIGUSR1 => Some("SIGUSR1"),
            _ => None,
        }
    }
}

/// Ends the signal-waiting thread's [`Signals::wait`] now (its timeout is
/// a poll: a handover or a shard that ended is seen at once, not at the
/// next one). SIGCHLD, blocked in every thread of the process, so only
/// that wait takes it; ignored by default, so harmless anywhere else.
pub fn wake() {
    // SAFETY: kill(2) on our own process with a signal every thread blocks.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGCHLD);
    }
}
