//! What a core counts and measures, and what it tells the main thread.

use hdrhistogram::Histogram;

/// Why a connection attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// ECONNREFUSED: nothing listens, or the listen queue overflowed.
    Refused,
    /// No upgrade within --connect-timeout.
    Timeout,
    /// ECONNRESET, EPIPE or end of stream before the upgrade.
    Reset,
    /// The server answered with an HTTP status other than 101.
    HttpStatus(u16),
    /// EADDRNOTAVAIL: no free port for this (source IP, server) pair.
    AddrNotAvail,
    /// EMFILE/ENFILE: out of file descriptors.
    OutOfFiles,
    /// The TLS handshake failed (--tls): a certificate not trusted by
    /// --tls-ca, an alert from the server, a server that is not TLS.
    Tls,
    /// Anything else (an answer that is not a valid upgrade, other errnos).
    Other,
}

impl Failure {
    pub fn from_errno(errno: Option<i32>) -> Failure {
        match errno {
            Some(libc::ECONNREFUSED) => Failure::Refused,
            Some(libc::ETIMEDOUT) => Failure::Timeout,
            Some(libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED) => Failure::Reset,
            Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE) => Failure::AddrNotAvail,
            Some(libc::EMFILE | libc::ENFILE) => Failure::OutOfFiles,
            _ => Failure::Other,
        }
    }
}

use c1m_proto::counters::Merge::{Max, Sum};

c1m_proto::counter_table! {
    /// Cumulative counts of one core (or, summed, of the run).
    ///
    /// The table, field by field: its key (in a worker's report line and
    /// `summary.json`), then how two cores' values make one.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Counters: c1m_proto::counters::Merge {
        /// Connection attempts begun.
        attempted: u64 = "attempted", Sum;
        /// Upgrades completed (each attempt at most once).
        established: u64 = "established", Sum;
        /// Upgraded connections open now.
        open: u64 = "open", Sum;
        failed: u64 = "failed", Sum;
        refused: u64 = "failed_refused", Sum;
        timeout: u64 = "failed_timeout", Sum;
        reset: u64 = "failed_reset", Sum;
        http_status: u64 = "failed_http_status", Sum;
        /// The last non-101 status seen (0 if none).
        last_http_status: u64 = "last_http_status", Max;
        addr_not_avail: u64 = "failed_eaddrnotavail", Sum;
        out_of_files: u64 = "failed_emfile", Sum;
        other: u64 = "failed_other", Sum;
        heartbeats: u64 = "heartbeats", Sum;
        /// Pongs (or echoes) received for heartbeats.
        replies: u64 = "heartbeat_replies", Sum;
        /// `--go-silent`'s last heartbeats, all sent at once (not in
        /// `heartbeats`, and their round trips not in the RTT histogram: they
        /// measure a burst, not the fleet's steady state).
        last_beats: u64 = "last_heartbeats", Sum;
        /// Heartbeats the socket could not take (the server is not reading).
        send_blocked: u64 = "heartbeats_blocked", Sum;
        /// Silent connections the server closed: its expiries.
        expired: u64 = "expired", Sum;
        /// ... of which before --server-timeout had passed since their last
        /// message (a server bug if the timeout given is right).
        expired_early: u64 = "expired_early", Sum;
        /// Heartbeating connections the server closed (must be 0).
        false_expiries: u64 = "false_expiries", Sum;
        /// Silent connections still open when the run ended: the server did not
        /// expire them within --server-timeout + --expiry-window.
        unexpired: u64 = "unexpired", Sum;
        /// Frames from the server that break RFC 6455.
        bad_frames: u64 = "bad_server_frames", Sum;
        /// Second connections opened with a device's id while its first was
        /// open (`--reconnect-fraction`), and of those, upgraded.
        reconnects: u64 = "reconnects", Sum;
        /// Connections the server closed with 4000 "replaced": takeovers seen.
        replaced: u64 = "replaced", Sum;
        /// --tls: attempts whose TLS handshake failed (also in `failed`).
        tls_failed: u64 = "failed_tls", Sum;
        /// --tls: upgraded connections, and of them those whose handshake
        /// resumed a session (a ticket from an earlier connection).
        tls_handshakes: u64 = "tls_handshakes", Sum;
        tls_resumed: u64 = "tls_resumed", Sum;
        /// --reconnect-storm: devices reset at the storm; of them, back (upgraded
        /// again) and not back by the end of the hold.
        storm_devices: u64 = "storm_devices", Sum;
        storm_back: u64 = "storm_back", Sum;
        storm_unrecovered: u64 = "storm_unrecovered", Sum;
        /// --reconnect-storm: reconnect attempts begun, and those that failed
        /// (each then backs off and retries), by cause: a 503, a reset or end
        /// of stream, no upgrade within --connect-timeout, ECONNREFUSED, any
        /// other (another status, an errno, TLS).
        storm_attempts: u64 = "storm_attempts", Sum;
        storm_failed_503: u64 = "storm_failed_503", Sum;
        storm_failed_reset: u64 = "storm_failed_reset", Sum;
        storm_failed_timeout: u64 = "storm_failed_timeout", Sum;
        storm_failed_refused: u64 = "storm_failed_refused", Sum;
        storm_failed_other: u64 = "storm_failed_other", Sum;
        /// --redial-on-close: heartbeating devices the server closed with
        /// 1001 (a drain, a hot upgrade's wss close); of them, back (upgraded
        /// again) and not back by the end of the hold; their attempts, and
        /// the failed ones (each then backs off and retries).
        drain_closes: u64 = "drain_closes", Sum;
        drain_back: u64 = "drain_back", Sum;
        drain_unrecovered: u64 = "drain_unrecovered", Sum;
        drain_attempts: u64 = "drain_attempts", Sum;
        drain_failed: u64 = "drain_failed", Sum;
    }
}

impl Counters {
    pub fn fail(&mut self, why: Failure) {
        self.failed += 1;
        match why {
            Failure::Refused => self.refused += 1,
            Failure::Timeout => self.timeout += 1,
            Failure::Reset => self.reset += 1,
            Failure::HttpStatus(s) => {
                self.http_status += 1;
                self.last_http_status = u64::from(s);
            }
            Failure::AddrNotAvail => self.addr_not_avail += 1,
            Failure::OutOfFiles => self.out_of_files += 1,
            Failure::Tls => self.tls_failed += 1,
            Failure::Other => self.other += 1,
        }
    }

    /// (key, value) of every field, in the table's order: for summaries.
    pub fn fields(&self) -> [(&'static str, u64); Counters::LEN] {
        let counts = self.counts();
        std::array::from_fn(|i| (Counters::FIELDS[i].0, counts[i]))
    }

    /// `key=value ...` of every field: how a worker process reports.
    pub fn to_words(&self) -> String {
        let mut s = String::with_capacity(600);
        self.write_words(&mut s);
        s
    }

    /// Reads [`Counters::to_words`] back (other words are skipped, and
    /// values that do not read; of a key given twice, the last).
    pub fn from_words(text: &str) -> Counters {
        let mut c = Counters::default();
        for (k, v) in text.split_whitespace().filter_map(|w| w.split_once('=')) {
            c.set_word(k, v);
        }
        c
    }
}

/// Where a core is in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Opening connections.
    Ramp,
    /// This core's ramp is over; heartbeating while the other cores (and
    /// --procs workers) finish theirs, so that every hold begins together.
    Ramped,
    /// Holding the fleet with heartbeats.
    Hold,
    /// Hold over; waiting for the server to expire the silent devices.
    Expiry,
    /// Closed everything.
    Done,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Ramp => "ramp",
            Phase::Ramped => "ramped",
            Phase::Hold => "hold",
            Phase::Expiry => "expiry",
            Phase::Done => "done",
        }
    }

    pub fn from_name(s: &str) -> Option<Phase> {
        [
            Phase::Ramp,
            Phase::Ramped,
            Phase::Hold,
            Phase::Expiry,
            Phase::Done,
        ]
        .into_iter()
        .find(|p| p.name() == s)
    }
}

/// A core's histograms, in microseconds.
pub struct Measured {
    pub connect: Histogram<u64>,
    pub heartbeat_rtt: Histogram<u64>,
    /// The round trips of the hold alone (every core ramped, the ramp's
    /// connects no longer competing with the heartbeats for the CPU).
    pub heartbeat_rtt_hold: Histogram<u64>,
    /// Devices that fell silent on their own (`--silent`).
    pub expiry_lag: Histogram<u64>,
    /// Devices silenced together by `--go-silent`: the deletion storm.
    pub storm_lag: Histogram<u64>,
    /// --reconnect-storm: each successful reconnect attempt's connect
    /// latency (socket to 101), and each device's time from the storm to
    /// its upgrade again (its p99 and max: the time to 99% and 100% back).
    pub reconnect_connect: Histogram<u64>,
    pub reconnect_back: Histogram<u64>,
    /// --redial-on-close: each device's time from the server's Close 1001
    /// to its upgrade again.
    pub drain_back: Histogram<u64>,
    /// When the server closed a heartbeating device (a Close frame, EOF or
    /// a reset; a false expiry unless the server was draining), in
    /// microseconds since the run's origin: its min and max are the first
    /// and last close of a drain (bench/drain.sh).
    pub server_closes: Histogram<u64>,
}

impl Measured {
    pub fn new() -> Measured {
        Measured {
            connect: crate::hgrm::new_histogram(),
            heartbeat_rtt: crate::hgrm::new_histogram(),
            heartbeat_rtt_hold: crate::hgrm::new_histogram(),
            expiry_lag: crate::hgrm::new_histogram(),
            storm_lag: crate::hgrm::new_histogram(),
            reconnect_connect: crate::hgrm::new_histogram(),
            reconnect_back: crate::hgrm::new_histogram(),
            drain_back: crate::hgrm::new_histogram(),
            server_closes: crate::hgrm::new_histogram(),
        }
    }

    pub fn add(&mut self, o: &Measured) -> Result<(), String> {
        for (a, b) in [
            (&mut self.connect, &o.connect),
            (&mut self.heartbeat_rtt, &o.heartbeat_rtt),
            (&mut self.heartbeat_rtt_hold, &o.heartbeat_rtt_hold),
            (&mut self.expiry_lag, &o.expiry_lag),
            (&mut self.storm_lag, &o.storm_lag),
            (&mut self.reconnect_connect, &o.reconnect_connect),
            (&mut self.reconnect_back, &o.reconnect_back),
            (&mut self.drain_back, &o.drain_back),
            (&mut self.server_closes, &o.server_closes),
        ] {
            a.add(b).map_err(|e| format!("merging histograms: {e:?}"))?;
        }
        Ok(())
    }
}

impl Default for Measured {
    fn default() -> Self {
        Measured::new()
    }
}

/// A core's message to the main thread.
pub enum Report {
    /// Once a second: the counts so far.
    Progress {
        core: usize,
        phase: Phase,
        counters: Counters,
    },
    /// At the end (or when the core fails, with `error`).
    Done {
        core: usize,
        counters: Counters,
        measured: Box<Measured>,
        /// When the core's ramp ended (microseconds since the origin).
        ramp_done_us: Option<u64>,
        error: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_by_reason_and_sum() {
        let mut a = Counters::default();
        a.fail(Failure::from_errno(Some(libc::ECONNREFUSED)));
        a.fail(Failure::from_errno(Some(libc::EADDRNOTAVAIL)));
        a.fail(Failure::HttpStatus(503));
        a.fail(Failure::from_errno(Some(libc::EMFILE)));
        a.fail(Failure::from_errno(None));
        assert_eq!(
            (a.failed, a.refused, a.addr_not_avail, a.http_status),
            (5, 1, 1, 1)
        );
        assert_eq!((a.out_of_files, a.other, a.last_http_status), (1, 1, 503));
        let mut b = Counters {
            established: 3,
            ..a
        };
        b.add(&a);
        assert_eq!((b.failed, b.established, b.last_http_status), (10, 3, 503));
        assert_eq!(b.fields().len(), 40);
        // Every field survives a worker's report line.
        let mut all = Counters::default();
        for (i, (k, _)) in Counters::default().fields().iter().enumerate() {
            assert!(all.set_word(k, &(i as u64 + 1).to_string()), "{k}");
        }
        assert_eq!(
            Counters::from_words(&format!("c1m-progress phase=hold {}", all.to_words())),
            all
        );
        assert!(!all.set_word("nonsense", "1"));
        assert!(!all.set_word("open", "x"));
    }

    #[test]
    fn worker_histograms_merge_through_their_v2_files() {
        let mut parts = Vec::new();
        for w in 0..3u64 {
            let mut m = Measured::new();
            for i in 1..=100 {
                crate::hgrm::record(&mut m.connect, i * 1000 * (w + 1));
                crate::hgrm::record(&mut m.storm_lag, 5_000 + w);
            }
            // As a --procs parent gets them: written, read back, added.
            let mut bytes = Vec::new();
            crate::hgrm::write_v2(&mut bytes, &m.connect).unwrap();
            m.connect = crate::hgrm::read_v2(&bytes[..]).unwrap();
            parts.push(m);
        }
        let mut all = Measured::new();
        for p in &parts {
            all.add(p).unwrap();
        }
        assert_eq!((all.connect.len(), all.storm_lag.len()), (300, 300));
        assert!(all.expiry_lag.is_empty());
        // The merged max is the largest worker's; the median lies between.
        assert_eq!(all.connect.max(), parts[2].connect.max());
        let p50 = all.connect.value_at_quantile(0.5);
        assert!(p50 > parts[0].connect.value_at_quantile(0.5));
        assert!(p50 < parts[2].connect.value_at_quantile(0.5));
    }
}
