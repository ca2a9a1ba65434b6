//! Cross-shard messages: each shard has an inbox (a channel) and an eventfd
//! its driver watches; a sender queues a message and wakes the shard. No
//! lock on either side's hot path, and nothing ever waits for an answer.
//!
//! Wake-ups are batched: a shard marks the peers it wrote to during one
//! turn of its loop and writes each one's eventfd once, at the end of the
//! turn ([`Peers::flush`]), so a burst of messages (Replaced, asks) costs one wake-up
//! per peer per turn, not one per device.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use std::net::SocketAddr;

use c1m_proto::device_id::DeviceId;
use c1m_proto::table::Location;

use super::link::Link;
use super::registry::Msg;

/// What a shard can be told.
#[derive(Debug)]
pub enum Mail {
    Registry(Msg),
    /// Stop accepting, close every device with 1001, drain, end.
    Shutdown,
    /// The same after a hot upgrade, for what the handover left here (TLS
    /// devices): their Closes spread over this window (zero: at once),
    /// whatever --drain-rate says.
    ShutdownOver(std::time::Duration),
    /// An operator's question about device `id`: sent to the id's owner,
    /// which forwards it (with `at`) to the shard holding the device; that
    /// shard answers on `reply`. Nobody waits on a shard: the asker waits
    /// on its own channel, with a timeout.
    Ask {
        id: DeviceId,
        ask: Ask,
        at: Option<Location>,
        reply: Reply,
    },
    /// The broker is back (--nats): offer the publisher a presence record
    /// of every device held, a few at a time, so presence lost with the
    /// broker, or dropped while it was away, is written again.
    Present,
    /// Hot upgrade (docs/upgrade.md): from this process's handover thread.
    Handover(crate::shard::handover::Order),
}

/// Where an [`Answer`] goes: a thread of this process waiting on a
/// channel, or the `--procs` parent (over the link), tagged `req`.
#[derive(Debug)]
pub enum Reply {
    Local(Sender<Answer>),
    Remote { req: u64 },
}

/// What an operator asks of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    Lookup,
    /// Send one message: text (valid UTF-8) or binary.
    Push {
        text: bool,
        payload: Vec<u8>,
    },
    /// Close it with 4001 "kicked".
    Kick,
    /// The device connected to another server at `unix_ms`
    /// (--nats-exclusive): close it with 4000 "replaced" if it connected
    /// here before that. Sent with [`NO_REPLY`].
    Supersede {
        unix_ms: u64,
    },
}

/// The `req` of a question nobody waits for: its answer is dropped (by
/// the parent, which asks with no such number, or here, with no link).
pub const NO_REPLY: u64 = u64::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Found(DeviceInfo),
    Delivered,
    Kicked,
    NotConnected,
}

/// A connected device, as `GET /devices/<id>` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Over all workers' shards (see [`Peers::base`]).
    pub shard: u32,
    /// Unix milliseconds.
    pub connected_since_ms: u64,
    pub last_heard_ms: u64,
    pub remote: Option<SocketAddr>,
}

/// A way to reach one shard from any thread.
#[derive(Clone)]
pub struct Peer {
    tx: Sender<Mail>,
    wake: Arc<OwnedFd>,
}

impl Peer {
    /// Queues `mail` and wakes the shard now (for senders outside the
    /// shards: the signal thread, the admin thread).
    pub fn send_now(&self, mail: Mail) {
        if self.tx.send(mail).is_ok() {
            wake(&self.wake);
        }
    }
}

/// A shard's own end: its inbox and the eventfd its driver watches.
pub struct Inbox {
    rx: Receiver<Mail>,
    wake: OwnedFd,
}

impl Inbox {
    /// The next message, if any.
    pub fn next(&self) -> Option<Mail> {
        self.rx.try_recv().ok()
    }

    /// The descriptor for [`c1m_io::Driver::watch_wake`] (a duplicate;
    /// the driver reads it, which resets the count).
    pub fn wake_fd(&self) -> io::Result<OwnedFd> {
        self.wake.try_clone()
    }
}

/// A shard's ends to every shard of the server (itself included), with
/// the batching. Shards are numbered over all `--procs` workers: this
/// process has `base..base + local`, and the rest are reached through the
/// link to the parent.
pub struct Peers {
    peers: Vec<Peer>,
    dirty: Vec<bool>,
    base: usize,
    total: usize,
    link: Option<Link>,
}

impl Peers {
    /// Every shard of the server, over all workers.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// This process's shards.
    pub fn local(&self) -> usize {
        self.peers.len()
    }

    /// The number (over all workers) of this process's shard 0.
    pub fn base(&self) -> usize {
        self.base
    }

    /// Queues `mail` for shard `to` (over all workers); a local shard's
    /// wake-up goes out at [`Peers::flush`], a remote one's through the link.
    pub fn send(&mut self, to: usize, mail: Mail) {
        match to.checked_sub(self.base).filter(|&i| i < self.peers.len()) {
            Some(i) => {
                if self.peers[i].tx.send(mail).is_ok() {
                    self.dirty[i] = true;
                }
            }
            None => match &self.link {
                Some(link) => link.send(to, mail),
                // A shard number past this process with no link: a bug,
                // not a device's doing; said, and the message dropped.
                None => {
                    crate::say!(
                        "server: no shard {to} in this process and no link: dropped {mail:?}"
                    )
                }
            },
        }
    }

    /// Sends an answer where it is awaited.
    pub fn reply(&self, reply: Reply, answer: Answer) {
        match reply {
            Reply::Local(tx) => {
                let _ = tx.send(answer);
            }
            Reply::Remote { req } => {
                if let Some(link) = &self.link {
                    link.answer(req, answer);
                }
            }
        }
    }

    /// Wakes every shard written to since the last flush.
    pub fn flush(&mut self) {
        for (to, dirty) in self.dirty.iter_mut().enumerate() {
            if std::mem::take(dirty) {
                wake(&self.peers[to].wake);
            }
        }
    }
}

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: an 8-byte write to an eventfd we hold. A full counter
    // (EAGAIN) means a wake-up is pending anyway.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// One shard's ends: its inbox and its peers.
pub type Mailbox = (Inbox, Peers);

/// How one process's shards reach the rest of a `--procs` server: the
/// shard numbers it holds, and the link to the parent for the others.
pub struct Span {
    pub base: usize,
    pub total: usize,
    pub link: Option<Link>,
}

impl Span {
    /// A server of one process.
    pub fn alone(n: usize) -> Span {
        Span {
            base: 0,
            total: n,
            link: None,
        }
    }
}

/// Mailboxes for `n` shards, and one more set of peers for the threads
/// outside (signals, admin).
pub fn wire(n: usize) -> io::Result<(Vec<Mailbox>, Vec<Peer>)> {
    wire_span(n, Span::alone(n))
}

/// Peers (without a link) for a thread outside the shards that sends to
/// them in batches: the link's reader.
pub fn local_peers(peers: Vec<Peer>, base: usize, total: usize) -> Peers {
    Peers {
        dirty: vec![false; peers.len()],
        peers,
        base,
        total,
        link: None,
    }
}

/// [`wire`] for `n` shards numbered `span.base..` among `span.total`.
pub fn wire_span(n: usize, span: Span) -> io::Result<(Vec<Mailbox>, Vec<Peer>)> {
    let mut inboxes = Vec::with_capacity(n);
    let mut peers = Vec::with_capacity(n);
    for _ in 0..n {
        // SAFETY: eventfd returns a new descriptor, owned from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let (tx, rx) = mpsc::channel();
        peers.push(Peer {
            tx,
            wake: Arc::new(wake.try_clone()?),
        });
        inboxes.push(Inbox { rx, wake });
    }
    let shards = inboxes
        .into_iter()
        .map(|inbox| {
            (
                inbox,
                Peers {
                    peers: peers.clone(),
                    dirty: vec![false; n],
                    base: span.base,
                    total: span.total,
                    link: span.link.clone(),
                },
            )
        })
        .collect();
    Ok((shards, peers))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::directory::wire::{Body, Frame};

    /// The eventfd's count, read (and so reset); 0 when nothing woke it.
    fn woken(inbox: &Inbox) -> u64 {
        let mut n = 0u64;
        // SAFETY: an 8-byte read from a non-blocking eventfd into a u64.
        let r = unsafe { libc::read(inbox.wake.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
        if r == 8 {
            n
        } else {
            0
        }
    }

    fn replaced(id: &str, key: u32) -> Mail {
        Mail::Registry(Msg::Replaced {
            id: DeviceId::new(id),
            at: Location {
                shard: 1,
                key,
                gen: 1,
            },
        })
    }

    fn key_of(mail: Mail) -> u32 {
        match mail {
            Mail::Registry(Msg::Replaced { at, .. }) => at.key,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mail_to_a_peer_shard_arrives_in_order_and_wakes_it_once_per_flush() {
        let (mut shards, _outside) = wire(2).unwrap();
        let (inbox1, _) = shards.pop().unwrap();
        let (inbox0, mut peers0) = shards.pop().unwrap();
        assert_eq!((peers0.len(), peers0.local(), peers0.base()), (2, 2, 0));
        for key in 0..5 {
            peers0.send(1, replaced("dev", key));
        }
        // Batched: queued, but nobody woken before the flush.
        assert_eq!(woken(&inbox1), 0);
        peers0.flush();
        assert_eq!(woken(&inbox1), 1, "one wake-up for the batch");
        assert_eq!(woken(&inbox0), 0, "the sender is not woken");
        let keys: Vec<u32> = std::iter::from_fn(|| inbox1.next()).map(key_of).collect();
        assert_eq!(keys, [0, 1, 2, 3, 4]);
        assert!(inbox0.next().is_none());
        // A flush with nothing sent wakes nobody.
        peers0.flush();
        assert_eq!(woken(&inbox1), 0);
    }

    #[test]
    fn a_thread_outside_wakes_the_shard_at_once_and_gets_its_answer() {
        let (mut shards, outside) = wire(2).unwrap();
        let (inbox1, peers1) = shards.pop().unwrap();
        let (tx, rx) = mpsc::channel();
        outside[1].send_now(Mail::Ask {
            id: DeviceId::new("dev-1"),
            ask: Ask::Lookup,
            at: None,
            reply: Reply::Local(tx),
        });
        assert_eq!(woken(&inbox1), 1);
        // The shard's wake descriptor is a clone of the same eventfd.
        let clone = inbox1.wake_fd().unwrap();
        outside[1].send_now(Mail::Present);
        let mut n = 0u64;
        // SAFETY: as in woken().
        unsafe { libc::read(clone.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
        assert_eq!(n, 1);
        match inbox1.next() {
            Some(Mail::Ask {
                reply,
                ask: Ask::Lookup,
                ..
            }) => peers1.reply(reply, Answer::NotConnected),
            other => panic!("{other:?}"),
        }
        assert!(matches!(inbox1.next(), Some(Mail::Present)));
        assert_eq!(rx.try_recv().unwrap(), Answer::NotConnected);
    }

    #[test]
    fn mail_for_a_shard_of_another_process_goes_over_the_link() {
        let (link, outbox) = super::super::link::channel();
        let span = Span {
            base: 2,
            total: 4,
            link: Some(link),
        };
        let (mut shards, _) = wire_span(2, span).unwrap();
        let (inbox3, _) = shards.pop().unwrap();
        let (_, mut peers2) = shards.pop().unwrap();
        assert_eq!((peers2.len(), peers2.local(), peers2.base()), (4, 2, 2));
        // Local: shard 3 is index 1 here.
        peers2.send(3, replaced("here", 7));
        peers2.flush();
        assert_eq!(key_of(inbox3.next().unwrap()), 7);
        // Remote: shards 0 and 1 are another worker's.
        peers2.send(0, replaced("there", 9));
        peers2.reply(Reply::Remote { req: 42 }, Answer::Kicked);
        let frames: Vec<Frame> = outbox.queued();
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert_eq!(frames[0].to, 0);
        assert!(matches!(&frames[0].body, Body::Registry(Msg::Replaced { at, .. }) if at.key == 9));
        assert_eq!(
            frames[1].body,
            Body::Answer {
                req: 42,
                answer: Answer::Kicked
            }
        );
        assert!(inbox3.next().is_none());
    }
}
