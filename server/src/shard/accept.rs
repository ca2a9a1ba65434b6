//! Accepting: the --max-upgrades-per-sec budget (refuse or defer), the
//! backoff after EMFILE, and a new connection's slot.

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use c1m_io::tls::ServerSession;
use c1m_io::{Close, Driver, Token};
use c1m_proto::conn::Conn;
use c1m_proto::device_id::DeviceId;

use c1m_proto::wheel::Entry;

use super::{table, Slot, State};
use crate::admission::{Bucket, Excess, REFUSAL};

/// Connections a shard holds accepted over its budget (`defer`), waiting
/// for it to refill.
/// The accept policy's state.
pub(super) struct Accepting {
    /// When accepting resumes (after a failed accept, or the budget).
    pub(super) resume: Option<Instant>,
    /// --max-upgrades-per-sec: this shard's budget.
    pub(super) budget: Option<Bucket>,
    /// `defer`: connections accepted over the budget (io_uring's multishot
    /// accept takes a burst before its cancel lands), admitted first when
    /// the budget refills; at most [`DEFER_MAX`], 503 past it.
    pub(super) deferred: VecDeque<OwnedFd>,
    /// --max-handshakes: this shard's share (0: no bound), and whether
    /// accepting is paused because it holds that many connections not yet
    /// upgraded (it resumes at half).
    pub(super) max_handshakes: usize,
    pub(super) full: bool,
}

pub(super) const DEFER_MAX: usize = 4096;
/// How long accepting pauses after EMFILE/ENFILE/ENOBUFS.
pub(super) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl State {
    /// `defer`: admits the connections held over the budget while it
    /// lasts; if some are left, accepting stays paused until it is full.
    pub(super) fn admit_deferred(&mut self, io: &mut impl Driver, now: Instant) {
        while !self.accept.deferred.is_empty() {
            let Some(budget) = &mut self.accept.budget else {
                return;
            };
            if !budget.take(now) {
                self.accept.resume = Some(budget.full_at());
                return;
            }
            let fd = self.accept.deferred.pop_front().expect("not empty");
            self.admit_now(io, fd);
        }
    }

    pub(super) fn accept_failed(&mut self, err: io::Error) {
        self.counters.accept_exhausted += 1;
        self.accept.resume = Some(self.clock.now.at + ACCEPT_BACKOFF);
        let held = self.slab.len();
        self.warn(format_args!(
            "accept failed ({err}) while holding {held} sockets: pausing accepts for {ACCEPT_BACKOFF:?}; raise RLIMIT_NOFILE or lower the load (see kernel-tuning/)"
        ));
    }

    /// Connections held that are not open devices: in their handshake (or
    /// ended and flushing their last words, a few).
    pub(super) fn handshaking(&self) -> usize {
        self.slab.len() - self.open as usize
    }

    /// --max-handshakes: past this shard's share of connections in their
    /// handshake, stop accepting: the rest wait in the listen queue (short
    /// by default: docs/storms.md) and past it the kernel drops their SYNs,
    /// rather than the shard holding sockets its devices have not yet
    /// spoken on (at 1M, 350,000 of them, which then hit
    /// --handshake-timeout). Resumed at half ([`State::resume_if_room`]).
    fn pause_if_full(&mut self, io: &mut impl Driver) {
        let max = self.accept.max_handshakes;
        if max > 0 && !self.accept.full && self.handshaking() >= max {
            self.accept.full = true;
            self.counters.admission_paused += 1;
            io.pause_accepting();
        }
    }

    /// Accepts again once the connections in handshake are down to half of
    /// --max-handshakes (and no other pause holds).
    pub(super) fn resume_if_room(&mut self, io: &mut impl Driver) {
        if !self.accept.full || self.drain.deadline.is_some() {
            return;
        }
        if self.handshaking() > self.accept.max_handshakes / 2 {
            return;
        }
        self.accept.full = false;
        if self.accept.resume.is_none() {
            if let Err(err) = io.resume_accepting() {
                self.accept.resume = Some(self.clock.now.at + ACCEPT_BACKOFF);
                self.warn(format_args!(
                    "cannot resume accepting ({err}): trying again in {ACCEPT_BACKOFF:?}; check fs.epoll.max_user_watches and memory (see kernel-tuning/)"
                ));
            }
        }
    }

    pub(super) fn admit(&mut self, io: &mut impl Driver, fd: OwnedFd) {
        if self.drain.deadline.is_some() {
            // Accepted as shutdown began (a completion already on its way
            // when the listener went): dropping it closes it, counted.
            self.counters.admit_dropped += 1;
            return;
        }
        if let Some(budget) = &mut self.accept.budget {
            // Before any work for it: no registration, TLS or parsing.
            let now = self.clock.now.at;
            let admitted = budget.take(now);
            if budget.excess == Excess::Defer && budget.empty() && self.accept.resume.is_none() {
                // The rest wait in the accept queue until the bucket is full.
                self.counters.admission_paused += 1;
                self.accept.resume = Some(budget.full_at());
                io.pause_accepting();
            }
            if !admitted {
                if budget.excess == Excess::Defer && self.accept.deferred.len() < DEFER_MAX {
                    self.accept.deferred.push_back(fd);
                    return;
                }
                self.counters.admission_refused += 1;
                // On a TLS port a plaintext 503 means nothing: a reset.
                let answer = if self.cfg.tls.is_some() {
                    &[][..]
                } else {
                    REFUSAL
                };
                io.refuse(fd, answer);
                return;
            }
        }
        self.admit_now(io, fd);
    }

    /// Takes a new connection in: registered, TLS begun, its handshake
    /// deadline on the wheel.
    pub(super) fn admit_now(&mut self, io: &mut impl Driver, fd: OwnedFd) {
        let gen = self.next_gen;
        // Within the registry entry's bits (2^28, then 1 again).
        self.next_gen = table::next_gen(self.next_gen);
        let key = self.slab.vacant_key();
        // The driver reads the request at once if it came with the
        // connection (under a burst, 9 accepts in 10 find it queued).
        let h = match io.register(fd, Token::pack(key, gen), false) {
            Ok(h) => h,
            Err(err) => {
                self.counters.admit_dropped += 1;
                self.warn(format_args!(
                    "cannot watch a new connection ({err}): dropping new connections; check fs.epoll.max_user_watches and memory (see kernel-tuning/)"
                ));
                return;
            }
        };
        let tls = match &self.cfg.tls {
            None => None,
            Some(config) => match ServerSession::server(config) {
                Ok(s) => Some(Box::new(s)),
                Err(err) => {
                    self.counters.admit_dropped += 1;
                    io.close(h, Close::Abortive);
                    self.warn(format_args!(
                        "cannot start TLS on a new connection ({err}): dropped it"
                    ));
                    return;
                }
            },
        };
        let now = self.clock.now_tick;
        let deadline = now + self.clock.handshake_ticks + 1;
        self.slab.insert(Slot {
            io: h,
            gen,
            ticket_key: key as u32,
            upgraded: false,
            ended: None,
            last_seen: now,
            armed: deadline,
            frame_deadline: 0,
            since: 0,
            conn: if self.cfg.proxy_protocol {
                Conn::new_proxied()
            } else {
                Conn::new()
            },
            id: DeviceId::default(),
            remote: None,
            tls,
        });
        self.wheel.insert(Entry {
            key: key as u32,
            gen,
            deadline,
        });
        self.counters.accepted += 1;
        self.pause_if_full(io);
    }
}
