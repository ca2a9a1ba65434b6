//! `--udp-heartbeat`, the shard's side: the ticket in each 101, and the
//! datagrams that name this shard's connections (a child module of
//! [`crate::shard`], so that it sees the slot; mod.rs only calls in).
//!
//! A valid datagram refreshes its connection's `last_seen` as a WebSocket
//! frame does (and records the same heartbeat-interval histogram); nothing
//! is sent back. Anything else is counted, never logged:
//! - `udp_bad`: not a ticket (wrong length), another shard's (the kernel's
//!   hash delivered it: its shard number is past the group), or its MAC
//!   does not verify for the connection it names (forged, or another
//!   process's: a restarted worker has a new key);
//! - `udp_stale`: it names no live upgraded connection (closed, its slot
//!   reused, replaced by a newer connection of the device, or ending).
//!
//! Off (`ShardConfig::udp` None) the shard has no UDP socket, the driver
//! no buffers for one, and the 101 path one branch on a None.

use std::io;
use std::sync::Arc;

use socket2::Socket;

use c1m_io::Driver;
use c1m_proto::ticket::{self, Key, Ticket};

use super::State;
use crate::hist::HEARTBEAT_INTERVAL_MS;

/// What the shards of one process share for UDP heartbeats.
#[derive(Debug, Clone)]
pub struct UdpHeartbeat {
    /// This process's ticket key (random at start).
    pub key: Key,
    /// The UDP sockets of this process's shards, shard i's at i, in the
    /// port's SO_REUSEPORT group at the position of its global shard
    /// number. Held here until the last shard is gone, so that no socket
    /// of the group closes (which would move another into its position)
    /// while the server runs; each shard's driver reads a duplicate.
    pub sockets: Arc<Vec<Socket>>,
}

/// Gives shard `id` (global number `me`) its UDP socket, when on.
pub(super) fn watch(
    cfg: &Option<UdpHeartbeat>,
    id: usize,
    me: usize,
    io: &mut impl Driver,
) -> io::Result<()> {
    let Some(u) = cfg else { return Ok(()) };
    if me > u16::MAX as usize {
        return Err(io::Error::other(format!(
            "--udp-heartbeat names shards with 16 bits: shard {me} is past it; run fewer shards"
        )));
    }
    let sock = u.sockets.get(id).ok_or_else(|| {
        io::Error::other(format!("--udp-heartbeat: no UDP socket for shard {id}"))
    })?;
    io.watch_datagrams(sock.try_clone()?)
}

impl State {
    /// Puts the ticket of the connection in slot `key`, which just
    /// upgraded, into the 101 in `self.out` (before it is sent).
    pub(super) fn add_ticket(&mut self, key: usize) {
        let Some(u) = &self.cfg.udp else { return };
        let slot = &self.slab[key];
        let t = Ticket {
            shard: self.me() as u16,
            key: key as u32,
            gen: slot.gen,
        };
        let sealed = u.key.seal(t, slot.id.as_str().as_bytes());
        ticket::insert_header(&mut self.out, &sealed);
    }

    /// One datagram from this shard's UDP socket.
    pub(super) fn on_datagram(&mut self, bytes: &[u8]) {
        let Some(u) = &self.cfg.udp else { return };
        let Some(t) = Ticket::parse(bytes).filter(|t| t.shard as usize == self.me()) else {
            self.counters.udp_bad += 1;
            return;
        };
        let now = self.clock.now_tick;
        let key = &u.key;
        match self.slab.get_mut(t.key as usize) {
            Some(slot) if slot.gen == t.gen && slot.upgraded && slot.ended.is_none() => {
                if !key.verify(bytes, slot.id.as_str().as_bytes()) {
                    self.counters.udp_bad += 1;
                    return;
                }
                let ms = (now - slot.last_seen) * self.clock.tick_ms;
                self.counters
                    .heartbeat_interval
                    .record(&HEARTBEAT_INTERVAL_MS, ms);
                slot.last_seen = now;
                self.counters.udp_heartbeats += 1;
            }
            _ => self.counters.udp_stale += 1,
        }
    }
}
