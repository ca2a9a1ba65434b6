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
//!
//! A hot upgrade keeps every ticket good: the new process takes the old
//! one's UDP sockets and key, and a connection keeps its generation and
//! the slab key its ticket names (`Slot::ticket_key`); where the new slab
//! put it elsewhere, [`MovedTickets`] maps the ticket to its slot. A
//! datagram looks there only when the slot its ticket names is not its
//! connection, so the common case pays nothing. And no datagram is lost
//! on the way: the old process stops reading the UDP sockets before its
//! first connection moves, and the new one holds a datagram that names
//! a connection not yet here until it arrives ([`State::heard_on_the_way`],
//! the handover's `Waiting`).

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use socket2::Socket;

use c1m_io::Driver;
use c1m_proto::ticket::{self, Key, Ticket};

use super::{Slot, State};
use crate::hist::HEARTBEAT_INTERVAL_MS;
use crate::stats::Counters;

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

/// What a ticket names, as one key: the slab key and generation it was
/// issued for.
pub(super) fn ticket_id(key: u32, gen: u32) -> u64 {
    u64::from(key) << 32 | u64::from(gen)
}

/// The tickets of connections a hot upgrade moved into this shard whose
/// slab key differs from the one their ticket names: (ticket key,
/// generation) to the slot. An entry lives as long as its connection
/// (`State::remove` forgets it), about 32 bytes per moved connection
/// while the server runs with `--udp-heartbeat`; nothing otherwise.
#[derive(Debug, Default)]
pub(super) struct MovedTickets(HashMap<u64, u32>);

impl MovedTickets {
    pub(super) fn insert(&mut self, ticket_key: u32, gen: u32, slot: usize) {
        self.0.insert(ticket_id(ticket_key, gen), slot as u32);
    }

    pub(super) fn forget(&mut self, ticket_key: u32, gen: u32) {
        if !self.0.is_empty() {
            self.0.remove(&ticket_id(ticket_key, gen));
        }
    }

    fn get(&self, ticket_key: u32, gen: u32) -> Option<usize> {
        if self.0.is_empty() {
            return None;
        }
        self.0.get(&ticket_id(ticket_key, gen)).map(|&k| k as usize)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

impl State {
    /// Puts the ticket of the connection in slot `key`, which just
    /// upgraded, into the 101 in `self.out` (before it is sent).
    pub(super) fn add_ticket(&mut self, key: usize) {
        let Some(u) = &self.cfg.udp else { return };
        let slot = &self.slab[key];
        let t = Ticket {
            shard: self.me() as u16,
            key: slot.ticket_key,
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
        let names = |s: &Slot| s.gen == t.gen && s.ticket_key == t.key;
        // The slot the ticket names; else, after a hot upgrade, the one
        // its connection moved to.
        let at = match self.slab.get(t.key as usize) {
            Some(s) if names(s) => Some(t.key as usize),
            _ => self.moved_tickets.get(t.key, t.gen),
        };
        match at.and_then(|k| self.slab.get_mut(k)) {
            Some(slot) if names(slot) && slot.upgraded && slot.ended.is_none() => {
                heard(
                    &mut self.counters,
                    self.clock.tick_ms,
                    &u.key,
                    slot,
                    now,
                    bytes,
                );
            }
            _ => {
                // A hot upgrade's new process: its device may be on its way.
                let held = self
                    .waiting
                    .as_mut()
                    .is_some_and(|w| w.hold_datagram(t.key, t.gen, now, bytes));
                if !held {
                    self.counters.udp_stale += 1;
                }
            }
        }
    }

    /// A connection just handed over into slot `key`: the datagram that
    /// came for it on its way, if any, counts now, at the tick it came.
    pub(super) fn heard_on_the_way(&mut self, key: usize) {
        let (Some(u), Some(w)) = (&self.cfg.udp, &mut self.waiting) else {
            return;
        };
        let slot = &mut self.slab[key];
        let Some((tick, bytes)) = w.take_datagram(slot.ticket_key, slot.gen) else {
            return;
        };
        if !slot.upgraded {
            self.counters.udp_stale += 1;
            return;
        }
        heard(
            &mut self.counters,
            self.clock.tick_ms,
            &u.key,
            slot,
            tick,
            &bytes,
        );
    }
}

/// A datagram that names `slot`'s connection and came at `tick`: if its
/// MAC verifies, the device's heartbeat (its last-heard time moves
/// forward only: a datagram held on the way may be older than a frame).
#[inline]
fn heard(c: &mut Counters, tick_ms: u64, key: &Key, slot: &mut Slot, tick: u64, bytes: &[u8]) {
    if !key.verify(bytes, slot.id.as_str().as_bytes()) {
        c.udp_bad += 1;
        return;
    }
    if tick >= slot.last_seen {
        let ms = (tick - slot.last_seen) * tick_ms;
        c.heartbeat_interval.record(&HEARTBEAT_INTERVAL_MS, ms);
        slot.last_seen = tick;
    }
    c.udp_heartbeats += 1;
}
