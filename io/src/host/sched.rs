//! The shard threads' scheduling policy.
//!
//! A shard is a pinned event loop. Under SCHED_OTHER its wake-up on a
//! completion preempts whatever runs on its core, so on a core it shares
//! (with a load client on loopback, with other workers under `--procs`)
//! it wakes for each connection or two and sleeps again: 0.66-0.72 sleeps
//! per connection at 15,000 here, a fifth of its CPU in the context
//! switches. SCHED_BATCH (sched(7)) keeps the same fair share but never
//! preempts on wake-up: the shard runs when the core is free or the
//! running task's slice ends, and then finds many completions at once
//! (0.10-0.12 sleeps per connection, bench/switches.sh). On a core of its own it changes
//! nothing: an idle core runs the woken shard at once.

use std::fmt;
use std::io;
use std::str::FromStr;

/// `--sched`: the policy of each shard thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sched {
    /// SCHED_BATCH: no preemption on wake-up (the default).
    Batch,
    /// SCHED_OTHER, as the thread was started.
    Normal,
}

impl FromStr for Sched {
    type Err = String;
    fn from_str(s: &str) -> Result<Sched, String> {
        match s {
            "batch" => Ok(Sched::Batch),
            "normal" | "other" => Ok(Sched::Normal),
            _ => Err(format!(
                "{s:?} is not a scheduling policy for the shards: batch or normal"
            )),
        }
    }
}

impl fmt::Display for Sched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sched::Batch => "batch",
            Sched::Normal => "normal",
        })
    }
}

impl Sched {
    /// Applies the policy to the calling thread (its nice value is kept).
    pub fn apply(self) -> io::Result<()> {
        let policy = match self {
            Sched::Batch => libc::SCHED_BATCH,
            Sched::Normal => libc::SCHED_OTHER,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; param is a valid struct.
        if unsafe { libc::sched_setscheduler(0, policy, &param) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Sched;

    /// The calling thread's policy now, as one of these (None: another).
    fn current() -> Option<Sched> {
        // SAFETY: pid 0 is the calling thread.
        match unsafe { libc::sched_getscheduler(0) } {
            libc::SCHED_BATCH => Some(Sched::Batch),
            libc::SCHED_OTHER => Some(Sched::Normal),
            _ => None,
        }
    }

    /// An unprivileged thread may move between the two (both are
    /// time-sharing, priority 0), and the kernel says it did.
    #[test]
    fn a_thread_takes_batch_and_goes_back() {
        std::thread::spawn(|| {
            Sched::Batch.apply().unwrap();
            assert_eq!(current(), Some(Sched::Batch));
            Sched::Normal.apply().unwrap();
            assert_eq!(current(), Some(Sched::Normal));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn policies_parse_and_print() {
        for s in [Sched::Batch, Sched::Normal] {
            assert_eq!(s.to_string().parse::<Sched>(), Ok(s));
        }
        let err = "fifo".parse::<Sched>().unwrap_err();
        assert!(err.contains("batch or normal"), "{err}");
    }
}
