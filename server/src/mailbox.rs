//! Cross-shard messages: each shard has an inbox (a channel) and an eventfd
//! its driver watches; a sender queues a message and wakes the shard. No
//! lock on either side's hot path, and nothing ever waits for an answer.
//!
//! Wake-ups are batched: a shard marks the peers it wrote to during one
//! turn of its loop and writes each one's eventfd once, at the end of the
//! turn ([`Peers::flush`]), so a burst of registrations costs one wake-up
//! per peer per turn, not one per device.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use std::net::SocketAddr;

use crate::proto::device_id::DeviceId;
use crate::registry::{Location, Msg};

/// What a shard can be told.
#[derive(Debug)]
pub enum Mail {
    Registry(Msg),
    /// Stop accepting, close every device with 1001, drain, end.
    Shutdown,
    /// An operator's question about device `id`: sent to the id's owner,
    /// which forwards it (with `at`) to the shard holding the device; that
    /// shard answers on `reply`. Nobody waits on a shard: the asker waits
    /// on its own channel, with a timeout.
    Ask {
        id: DeviceId,
        ask: Ask,
        at: Option<Location>,
        reply: Sender<Answer>,
    },
}

/// What an operator asks of a device.
#[derive(Debug)]
pub enum Ask {
    Lookup,
    /// Send one message: text (valid UTF-8) or binary.
    Push {
        text: bool,
        payload: Vec<u8>,
    },
    /// Close it with 4001 "kicked".
    Kick,
}

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

    /// The descriptor for [`crate::io::Driver::watch_wake`] (a duplicate;
    /// the driver reads it, which resets the count).
    pub fn wake_fd(&self) -> io::Result<OwnedFd> {
        self.wake.try_clone()
    }
}

/// A shard's ends to every shard (itself included), with the batching.
pub struct Peers {
    peers: Vec<Peer>,
    dirty: Vec<bool>,
}

impl Peers {
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Queues `mail` for shard `to`; its wake-up goes out at [`Peers::flush`].
    pub fn send(&mut self, to: usize, mail: Mail) {
        if self.peers[to].tx.send(mail).is_ok() {
            self.dirty[to] = true;
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

/// Mailboxes for `n` shards, and one more set of peers for the threads
/// outside (signals, admin).
pub fn wire(n: usize) -> io::Result<(Vec<Mailbox>, Vec<Peer>)> {
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
                },
            )
        })
        .collect();
    Ok((shards, peers))
}
