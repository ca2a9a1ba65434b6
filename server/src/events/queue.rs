//! The shards' hand-off to the publisher: one bounded channel per process
//! (std's `sync_channel`, whose slots are allocated once, up front). A shard
//! only ever `try_send`s a fixed-size [`Event`]: when the queue is full
//! (the broker is down or slow) the event is dropped and the shard counts
//! it, and never waits.
//!
//! The publisher is woken, not polled: when it runs out of events it says
//! so in a [`Doorbell`] and sleeps until a shard rings it. A shard rings
//! only when the publisher sleeps, so a storm of events costs one wake-up
//! per batch, and an idle server costs none.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use tokio::sync::Notify;

use super::event::Event;

/// How the shards wake the sleeping publisher.
#[derive(Debug, Default)]
pub struct Doorbell {
    /// Set by the publisher before it sleeps; cleared by the first ring.
    asleep: AtomicBool,
    /// A permit is kept when nobody waits yet, so no ring is lost.
    notify: Notify,
}

impl Doorbell {
    /// Wakes the publisher if it sleeps (a system call then, at most once
    /// per sleep); a load and a fence otherwise.
    #[inline]
    pub fn ring(&self) {
        // Dekker's pattern with the publisher's `sleep`: the event written
        // into the queue must be visible before `asleep` is read here, as
        // `asleep` is written before the queue is read there.
        fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::Relaxed) && self.asleep.swap(false, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    /// Wakes the publisher whether it sleeps or not (to stop it).
    pub fn ring_always(&self) {
        self.asleep.store(false, Ordering::Release);
        self.notify.notify_one();
    }

    /// The publisher's side, in two steps: `going_to_sleep`, then (if the
    /// queue is still empty) `sleep`.
    pub fn going_to_sleep(&self) {
        self.asleep.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Not sleeping after all: something came in after `going_to_sleep`.
    pub fn awake(&self) {
        self.asleep.store(false, Ordering::Relaxed);
    }

    /// Returns once rung (at once if it was rung since the last wait).
    pub async fn sleep(&self) {
        self.notify.notified().await;
        self.asleep.store(false, Ordering::Relaxed);
    }
}

/// A shard's end of the queue.
#[derive(Debug, Clone)]
pub struct EventTx {
    tx: SyncSender<Event>,
    bell: Arc<Doorbell>,
}

impl EventTx {
    /// Queues `ev`; false when the queue is full or the publisher is gone
    /// (the caller counts it as dropped).
    #[inline]
    pub fn offer(&self, ev: Event) -> bool {
        match self.tx.try_send(ev) {
            Ok(()) => {
                self.bell.ring();
                true
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// A queue of `capacity` events: the shards' end, the publisher's, and
/// the bell between them.
pub fn channel(capacity: usize) -> (EventTx, Receiver<Event>, Arc<Doorbell>) {
    let (tx, rx) = mpsc::sync_channel(capacity.max(1));
    let bell = Arc::new(Doorbell::default());
    (
        EventTx {
            tx,
            bell: bell.clone(),
        },
        rx,
        bell,
    )
}

#[cfg(test)]
mod tests {
    use c1m_proto::device_id::DeviceId;
    use c1m_proto::table::Location;
    use std::time::Duration;

    use super::*;
    use crate::events::event::Kind;

    fn ev(n: u32) -> Event {
        Event {
            kind: Kind::Connected,
            id: DeviceId::new("d"),
            at: Location {
                shard: 0,
                key: n,
                gen: 1,
            },
            remote: None,
            time_ms: 0,
            last_heard_ms: 0,
        }
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_keeps_order() {
        let (tx, rx, _bell) = channel(2);
        assert!(tx.offer(ev(1)));
        assert!(tx.offer(ev(2)));
        let t = std::time::Instant::now();
        assert!(!tx.offer(ev(3)), "full: refused");
        assert!(t.elapsed() < Duration::from_millis(50), "never waits");
        assert_eq!(rx.try_recv().unwrap().at.key, 1);
        assert!(tx.offer(ev(4)));
        assert_eq!(rx.try_recv().unwrap().at.key, 2);
        assert_eq!(rx.try_recv().unwrap().at.key, 4);
        drop(rx);
        assert!(!tx.offer(ev(5)), "publisher gone: dropped, no panic");
    }

    /// The publisher's loop in miniature: drain, say it sleeps, check
    /// again, sleep. Every event offered from other threads is taken, and
    /// a sleeping publisher is always woken (a lost wake-up hangs here).
    #[test]
    fn the_doorbell_never_loses_a_wake_up() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx, bell) = channel(64);
        const PER_THREAD: u32 = 20_000;
        let senders: Vec<_> = (0..2)
            .map(|_| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut sent = 0;
                    while sent < PER_THREAD {
                        if tx.offer(ev(sent)) {
                            sent += 1;
                        } else {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let (mut got, mut sleeps) = (0u32, 0u32);
        rt.block_on(async {
            while got < 2 * PER_THREAD {
                while rx.try_recv().is_ok() {
                    got += 1;
                }
                if got == 2 * PER_THREAD {
                    break;
                }
                bell.going_to_sleep();
                if let Ok(_ev) = rx.try_recv() {
                    bell.awake();
                    got += 1;
                    continue;
                }
                sleeps += 1;
                tokio::time::timeout(Duration::from_secs(10), bell.sleep())
                    .await
                    .expect("a sleeping publisher with events queued was never woken");
            }
        });
        for s in senders {
            s.join().unwrap();
        }
        assert_eq!(got, 2 * PER_THREAD);
        assert!(sleeps > 0);
    }
}
