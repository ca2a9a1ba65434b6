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

/// Cumulative counts of one core (or, summed, of the run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connection attempts begun.
    pub attempted: u64,
    /// Upgrades completed (each attempt at most once).
    pub established: u64,
    /// Upgraded connections open now.
    pub open: u64,
    pub failed: u64,
    pub refused: u64,
    pub timeout: u64,
    pub reset: u64,
    pub http_status: u64,
    /// The last non-101 status seen (0 if none).
    pub last_http_status: u64,
    pub addr_not_avail: u64,
    pub out_of_files: u64,
    pub other: u64,
    pub heartbeats: u64,
    /// Pongs (or echoes) received for heartbeats.
    pub replies: u64,
    /// `--go-silent`'s last heartbeats, all sent at once (not in
    /// `heartbeats`, and their round trips not in the RTT histogram: they
    /// measure a burst, not the fleet's steady state).
    pub last_beats: u64,
    /// Heartbeats the socket could not take (the server is not reading).
    pub send_blocked: u64,
    /// Silent connections the server closed: its expiries.
    pub expired: u64,
    /// ... of which before --server-timeout had passed since their last
    /// message (a server bug if the timeout given is right).
    pub expired_early: u64,
    /// Heartbeating connections the server closed (must be 0).
    pub false_expiries: u64,
    /// Silent connections still open when the run ended: the server did not
    /// expire them within --server-timeout + --expiry-window.
    pub unexpired: u64,
    /// Frames from the server that break RFC 6455.
    pub bad_frames: u64,
    /// Second connections opened with a device's id while its first was
    /// open (`--reconnect-fraction`), and of those, upgraded.
    pub reconnects: u64,
    /// Connections the server closed with 4000 "replaced": takeovers seen.
    pub replaced: u64,
    /// --tls: attempts whose TLS handshake failed (also in `failed`).
    pub tls_failed: u64,
    /// --tls: upgraded connections, and of them those whose handshake
    /// resumed a session (a ticket from an earlier connection).
    pub tls_handshakes: u64,
    pub tls_resumed: u64,
    /// --reconnect-storm: devices reset at the storm; of them, back (upgraded
    /// again) and not back by the end of the hold.
    pub storm_devices: u64,
    pub storm_back: u64,
    pub storm_unrecovered: u64,
    /// --reconnect-storm: reconnect attempts begun, and those that failed
    /// (each then backs off and retries), by cause: a 503, a reset or end
    /// of stream, no upgrade within --connect-timeout, ECONNREFUSED, any
    /// other (another status, an errno, TLS).
    pub storm_attempts: u64,
    pub storm_failed_503: u64,
    pub storm_failed_reset: u64,
    pub storm_failed_timeout: u64,
    pub storm_failed_refused: u64,
    pub storm_failed_other: u64,
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

    /// Field-wise sum (`last_http_status`: the larger).
    pub fn add(&mut self, o: &Counters) {
        self.attempted += o.attempted;
        self.established += o.established;
        self.open += o.open;
        self.failed += o.failed;
        self.refused += o.refused;
        self.timeout += o.timeout;
        self.reset += o.reset;
        self.http_status += o.http_status;
        self.last_http_status = self.last_http_status.max(o.last_http_status);
        self.addr_not_avail += o.addr_not_avail;
        self.out_of_files += o.out_of_files;
        self.other += o.other;
        self.heartbeats += o.heartbeats;
        self.replies += o.replies;
        self.last_beats += o.last_beats;
        self.send_blocked += o.send_blocked;
        self.expired += o.expired;
        self.expired_early += o.expired_early;
        self.false_expiries += o.false_expiries;
        self.unexpired += o.unexpired;
        self.bad_frames += o.bad_frames;
        self.reconnects += o.reconnects;
        self.replaced += o.replaced;
        self.tls_failed += o.tls_failed;
        self.tls_handshakes += o.tls_handshakes;
        self.tls_resumed += o.tls_resumed;
        self.storm_devices += o.storm_devices;
        self.storm_back += o.storm_back;
        self.storm_unrecovered += o.storm_unrecovered;
        self.storm_attempts += o.storm_attempts;
        self.storm_failed_503 += o.storm_failed_503;
        self.storm_failed_reset += o.storm_failed_reset;
        self.storm_failed_timeout += o.storm_failed_timeout;
        self.storm_failed_refused += o.storm_failed_refused;
        self.storm_failed_other += o.storm_failed_other;
    }

    /// (name, value) of every field, for summaries and merging.
    pub fn fields(&self) -> [(&'static str, u64); 35] {
        [
            ("attempted", self.attempted),
            ("established", self.established),
            ("open", self.open),
            ("failed", self.failed),
            ("failed_refused", self.refused),
            ("failed_timeout", self.timeout),
            ("failed_reset", self.reset),
            ("failed_http_status", self.http_status),
            ("last_http_status", self.last_http_status),
            ("failed_eaddrnotavail", self.addr_not_avail),
            ("failed_emfile", self.out_of_files),
            ("failed_other", self.other),
            ("heartbeats", self.heartbeats),
            ("heartbeat_replies", self.replies),
            ("last_heartbeats", self.last_beats),
            ("heartbeats_blocked", self.send_blocked),
            ("expired", self.expired),
            ("expired_early", self.expired_early),
            ("false_expiries", self.false_expiries),
            ("unexpired", self.unexpired),
            ("bad_server_frames", self.bad_frames),
            ("reconnects", self.reconnects),
            ("replaced", self.replaced),
            ("failed_tls", self.tls_failed),
            ("tls_handshakes", self.tls_handshakes),
            ("tls_resumed", self.tls_resumed),
            ("storm_devices", self.storm_devices),
            ("storm_back", self.storm_back),
            ("storm_unrecovered", self.storm_unrecovered),
            ("storm_attempts", self.storm_attempts),
            ("storm_failed_503", self.storm_failed_503),
            ("storm_failed_reset", self.storm_failed_reset),
            ("storm_failed_timeout", self.storm_failed_timeout),
            ("storm_failed_refused", self.storm_failed_refused),
            ("storm_failed_other", self.storm_failed_other),
        ]
    }
}

impl Counters {
    /// Sets the field named as in [`Counters::fields`]; false if none is.
    pub fn set(&mut self, name: &str, v: u64) -> bool {
        let f = match name {
            "attempted" => &mut self.attempted,
            "established" => &mut self.established,
            "open" => &mut self.open,
            "failed" => &mut self.failed,
            "failed_refused" => &mut self.refused,
            "failed_timeout" => &mut self.timeout,
            "failed_reset" => &mut self.reset,
            "failed_http_status" => &mut self.http_status,
            "last_http_status" => &mut self.last_http_status,
            "failed_eaddrnotavail" => &mut self.addr_not_avail,
            "failed_emfile" => &mut self.out_of_files,
            "failed_other" => &mut self.other,
            "heartbeats" => &mut self.heartbeats,
            "heartbeat_replies" => &mut self.replies,
            "last_heartbeats" => &mut self.last_beats,
            "heartbeats_blocked" => &mut self.send_blocked,
            "expired" => &mut self.expired,
            "expired_early" => &mut self.expired_early,
            "false_expiries" => &mut self.false_expiries,
            "unexpired" => &mut self.unexpired,
            "bad_server_frames" => &mut self.bad_frames,
            "reconnects" => &mut self.reconnects,
            "replaced" => &mut self.replaced,
            "failed_tls" => &mut self.tls_failed,
            "tls_handshakes" => &mut self.tls_handshakes,
            "tls_resumed" => &mut self.tls_resumed,
            "storm_devices" => &mut self.storm_devices,
            "storm_back" => &mut self.storm_back,
            "storm_unrecovered" => &mut self.storm_unrecovered,
            "storm_attempts" => &mut self.storm_attempts,
            "storm_failed_503" => &mut self.storm_failed_503,
            "storm_failed_reset" => &mut self.storm_failed_reset,
            "storm_failed_timeout" => &mut self.storm_failed_timeout,
            "storm_failed_refused" => &mut self.storm_failed_refused,
            "storm_failed_other" => &mut self.storm_failed_other,
            _ => return false,
        };
        *f = v;
        true
    }

    /// `name=value ...` of every field: how a worker process reports.
    pub fn to_words(&self) -> String {
        self.fields()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Reads [`Counters::to_words`] back (other words are skipped).
    pub fn from_words(text: &str) -> Counters {
        let mut c = Counters::default();
        for (k, v) in text.split_whitespace().filter_map(|w| w.split_once('=')) {
            if let Ok(v) = v.parse() {
                c.set(k, v);
            }
        }
        c
    }
}

/// Where a core is in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Opening connections.
    Ramp,
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
            Phase::Hold => "hold",
            Phase::Expiry => "expiry",
            Phase::Done => "done",
        }
    }

    pub fn from_name(s: &str) -> Option<Phase> {
        [Phase::Ramp, Phase::Hold, Phase::Expiry, Phase::Done]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

/// A core's histograms, in microseconds.
pub struct Measured {
    pub connect: Histogram<u64>,
    pub heartbeat_rtt: Histogram<u64>,
    /// Devices that fell silent on their own (`--silent`).
    pub expiry_lag: Histogram<u64>,
    /// Devices silenced together by `--go-silent`: the deletion storm.
    pub storm_lag: Histogram<u64>,
    /// --reconnect-storm: each successful reconnect attempt's connect
    /// latency (socket to 101), and each device's time from the storm to
    /// its upgrade again (its p99 and max: the time to 99% and 100% back).
    pub reconnect_connect: Histogram<u64>,
    pub reconnect_back: Histogram<u64>,
}

impl Measured {
    pub fn new() -> Measured {
        Measured {
            connect: crate::hgrm::new_histogram(),
            heartbeat_rtt: crate::hgrm::new_histogram(),
            expiry_lag: crate::hgrm::new_histogram(),
            storm_lag: crate::hgrm::new_histogram(),
            reconnect_connect: crate::hgrm::new_histogram(),
            reconnect_back: crate::hgrm::new_histogram(),
        }
    }

    pub fn add(&mut self, o: &Measured) -> Result<(), String> {
        for (a, b) in [
            (&mut self.connect, &o.connect),
            (&mut self.heartbeat_rtt, &o.heartbeat_rtt),
            (&mut self.expiry_lag, &o.expiry_lag),
            (&mut self.storm_lag, &o.storm_lag),
            (&mut self.reconnect_connect, &o.reconnect_connect),
            (&mut self.reconnect_back, &o.reconnect_back),
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
        assert_eq!(b.fields().len(), 35);
        // Every field survives a worker's report line.
        let mut all = Counters::default();
        for (i, (k, _)) in Counters::default().fields().iter().enumerate() {
            assert!(all.set(k, i as u64 + 1), "{k}");
        }
        assert_eq!(
            Counters::from_words(&format!("c1m-progress phase=hold {}", all.to_words())),
            all
        );
        assert!(!all.set("nonsense", 1));
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
