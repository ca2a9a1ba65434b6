//! The shards' hand-off to the publisher: one bounded channel per process
//! (std's `sync_channel`, whose slots are allocated once, up front). A shard
//! only ever `try_send`s a fixed-size [`Event`]: when the queue is full
//! (the broker is down or slow) the event is dropped and the shard counts
//! it, and never waits.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use super::event::Event;

/// A shard's end of the queue.
#[derive(Debug, Clone)]
pub struct EventTx {
    tx: SyncSender<Event>,
}

impl EventTx {
    /// Queues `ev`; false when the queue is full or the publisher is gone
    /// (the caller counts it as dropped).
    #[inline]
    pub fn offer(&self, ev: Event) -> bool {
        match self.tx.try_send(ev) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// A queue of `capacity` events: the shards' end and the publisher's.
pub fn channel(capacity: usize) -> (EventTx, Receiver<Event>) {
    let (tx, rx) = mpsc::sync_channel(capacity.max(1));
    (EventTx { tx }, rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::event::Kind;
    use crate::proto::device_id::DeviceId;
    use crate::registry::Location;

    fn ev(n: u32) -> Event {
        Event {
            kind: Kind::Connected,
            id: DeviceId::new("d"),
            at: Location {
                shard: 0,
                key: n,
                gen: 1,
                since: 0,
            },
            remote: None,
            time_ms: 0,
            last_heard_ms: 0,
        }
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_keeps_order() {
        let (tx, rx) = channel(2);
        assert!(tx.offer(ev(1)));
        assert!(tx.offer(ev(2)));
        let t = std::time::Instant::now();
        assert!(!tx.offer(ev(3)), "full: refused");
        assert!(
            t.elapsed() < std::time::Duration::from_millis(50),
            "never waits"
        );
        assert_eq!(rx.try_recv().unwrap().at.key, 1);
        assert!(tx.offer(ev(4)));
        assert_eq!(rx.try_recv().unwrap().at.key, 2);
        assert_eq!(rx.try_recv().unwrap().at.key, 4);
        drop(rx);
        assert!(!tx.offer(ev(5)), "publisher gone: dropped, no panic");
    }
}
