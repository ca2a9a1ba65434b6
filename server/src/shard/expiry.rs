//! Expiry: the wheel's due entries, a silent device's deletion, the
//! handshake and frame timeouts, and how a slot keeps its live entry.

use c1m_io::{Close, Driver};
use c1m_proto::conn::Phase;
use c1m_proto::wheel::{Entry, Wheel};

use super::{Slot, State};
use crate::ended::Ended;
use crate::hist::EXPIRY_LAG_MS;

/// Wheel entries handled per loop iteration: a mass expiry is spread over
/// iterations so accepts and heartbeats keep flowing.
pub(super) const EXPIRY_BATCH: usize = 256;

impl Slot {
    /// A frame (or TLS record) begun and not finished must end within the
    /// frame timeout; none pending clears the deadline.
    pub(super) fn track_partial(
        &mut self,
        key: usize,
        partial: bool,
        now: u64,
        frame_ticks: u64,
        wheel: &mut Wheel,
    ) {
        if !partial {
            self.frame_deadline = 0;
        } else if self.frame_deadline == 0 {
            self.frame_deadline = now + frame_ticks + 1;
            self.bring_forward(key, self.frame_deadline, wheel);
        }
    }

    /// Makes sure the connection's wheel entry comes due by `deadline`: a
    /// new entry if the live one is later (which then goes stale).
    pub(super) fn bring_forward(&mut self, key: usize, deadline: u64, wheel: &mut Wheel) {
        if deadline < self.armed {
            self.armed = deadline;
            wheel.insert(Entry {
                key: key as u32,
                gen: self.gen,
                deadline,
            });
        }
    }
}

impl State {
    /// Handles up to one batch of due wheel entries; true if more are due.
    pub(super) fn expire_due(&mut self, io: &mut impl Driver, now: u64) -> bool {
        for _ in 0..EXPIRY_BATCH {
            let Some(e) = self.wheel.pop_due(now) else {
                return false;
            };
            let key = e.key as usize;
            let Some(slot) = self.slab.get_mut(key) else {
                continue;
            };
            if slot.gen != e.gen || slot.armed != e.deadline {
                continue; // closed and reused, or superseded by a later entry
            }
            // Its live entry is spent: whatever follows arms a new one.
            slot.armed = u64::MAX;
            if slot.ended.is_some() {
                // Its final output was never read: counted already.
                self.close(io, key, Close::Abortive);
                continue;
            }
            match slot.conn.phase() {
                Phase::Proxy => {
                    let peer = io.peer_addr(slot.io);
                    self.end(io, key, Ended::ProxyMissing, Close::Abortive);
                    self.warn(format_args!(
                        "closed a connection from {} that sent no PROXY protocol header within --handshake-timeout; --proxy-protocol is on: connect through a front that sends one",
                        peer.map_or("?".into(), |a| a.to_string())
                    ));
                }
                Phase::Handshake => {
                    self.end(io, key, Ended::HandshakeTimeout, Close::Abortive);
                }
                Phase::Done => {
                    // Not reached: a Done connection has ended (above).
                    self.end(io, key, Ended::SlowReader, Close::Abortive);
                }
                Phase::Open | Phase::Closing => {
                    let silent_due = slot.last_seen + self.clock.timeout_ticks + 1;
                    let frame_due = match slot.frame_deadline {
                        0 => u64::MAX,
                        d => d,
                    };
                    if frame_due <= now {
                        self.end(io, key, Ended::FrameTimeout, Close::Abortive);
                    } else if silent_due <= now {
                        // From the start of its last frame's tick: at most a
                        // tick above the true lag.
                        let last_seen = slot.last_seen;
                        let due = self.clock.instant_of(last_seen) + self.cfg.timeout;
                        let lag = self.clock.now.at.saturating_duration_since(due);
                        self.counters
                            .expiry_lag
                            .record(&EXPIRY_LAG_MS, lag.as_millis() as u64);
                        self.expire(io, key);
                    } else {
                        let due = silent_due.min(frame_due);
                        slot.armed = due;
                        self.wheel.insert(Entry { deadline: due, ..e });
                    }
                }
            }
        }
        true
    }

    /// Deletes a silent device: a reset by default (the peer is presumed
    /// dead, so a FIN would only leave an orphan retransmitting into the
    /// void), or Close 1001 and FIN with `--graceful-expiry`. The Close goes
    /// out after any output still pending (which may hold part of a frame),
    /// never in the middle of it.
    pub(super) fn expire(&mut self, io: &mut impl Driver, key: usize) {
        if !self.cfg.graceful_expiry {
            return self.end(io, key, Ended::Expired, Close::Abortive);
        }
        self.out.clear();
        self.slab[key].conn.expire(&mut self.out);
        self.end(io, key, Ended::Expired, Close::Graceful);
    }
}
