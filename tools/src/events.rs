//! `c1m watch-events` (a small consumer: counts lifecycle events by kind
//! and reason, one totals line per interval) and `c1m push` (an
//! operator's push to one device, or a bounded load of pushes to many).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;

use c1m::events::event::Subjects;
use c1m::events::publisher::{self, Auth};

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a tokio runtime: {e}"))
}

async fn connect(url: &str, auth: &Auth) -> Result<async_nats::Client, String> {
    publisher::connect_options(auth)?
        .connection_timeout(Duration::from_secs(3))
        .max_reconnects(None)
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(url)
        .await
        .map_err(|e| format!("cannot connect to NATS at {url}: {e}; is nats-server running there?"))
}

/// What `watch-events` counts.
#[derive(Debug, Default)]
pub struct Tally {
    pub connected: u64,
    pub disconnected: u64,
    pub snapshots: u64,
    pub reasons: BTreeMap<String, u64>,
    /// Receive time minus event time, milliseconds, of disconnects.
    pub disconnect_lag_ms: Vec<u64>,
    pub unreadable: u64,
}

impl Tally {
    /// Counts the events of one message (one JSON object per line),
    /// received at unix ms `now_ms`.
    pub fn add_message(&mut self, body: &[u8], now_ms: u64) {
        for json in body.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
            self.add(json, now_ms);
        }
    }

    /// Counts one event's JSON, received at unix ms `now_ms`.
    pub fn add(&mut self, json: &[u8], now_ms: u64) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else {
            self.unreadable += 1;
            return;
        };
        match v["event"].as_str() {
            Some("connected") => self.connected += 1,
            Some("disconnected") => {
                self.disconnected += 1;
                let why = v["reason"].as_str().unwrap_or("unknown").to_owned();
                *self.reasons.entry(why).or_default() += 1;
                if let Some(t) = v["time_ms"].as_u64() {
                    self.disconnect_lag_ms.push(now_ms.saturating_sub(t));
                }
            }
            Some("snapshot") => self.snapshots += 1,
            _ => self.unreadable += 1,
        }
    }

    /// One line: `events connected=.. disconnected=.. snapshot=.. <reason>=.. lag_ms_p50=.. lag_ms_p99=.. lag_ms_max=..`.
    pub fn line(&self) -> String {
        let mut s = format!(
            "events connected={} disconnected={} snapshot={}",
            self.connected, self.disconnected, self.snapshots
        );
        for (why, n) in &self.reasons {
            s.push_str(&format!(" {why}={n}"));
        }
        let mut lag = self.disconnect_lag_ms.clone();
        lag.sort_unstable();
        let pct = |p: f64| -> u64 {
            if lag.is_empty() {
                0
            } else {
                lag[((lag.len() - 1) as f64 * p).round() as usize]
            }
        };
        s.push_str(&format!(
            " lag_ms_p50={} lag_ms_p99={} lag_ms_max={} unreadable={}",
            pct(0.5),
            pct(0.99),
            lag.last().copied().unwrap_or(0),
            self.unreadable
        ));
        s
    }
}

/// Subscribes to `<prefix>.events.>` for `duration` (or until `stop_after`
/// events), printing each event with `print` and the totals line every
/// `every` and at the end.
pub fn watch(
    url: &str,
    auth: &Auth,
    prefix: &str,
    duration: Duration,
    every: Duration,
    print: bool,
) -> Result<(), String> {
    runtime()?.block_on(async {
        let client = connect(url, auth).await?;
        let subject = format!("{prefix}.events.>");
        let mut sub = client
            .subscribe(subject.clone())
            .await
            .map_err(|e| format!("cannot subscribe to {subject}: {e}"))?;
        client
            .flush()
            .await
            .map_err(|e| format!("NATS at {url} did not confirm the subscription: {e}"))?;
        eprintln!("watch-events: watching {subject} on {url}");
        let mut tally = Tally::default();
        let end = Instant::now() + duration;
        let mut next = Instant::now() + every;
        let mut out = std::io::stdout().lock();
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            let wait = next.min(end).saturating_duration_since(now);
            match tokio::time::timeout(wait, sub.next()).await {
                Ok(Some(msg)) => {
                    if print {
                        let _ = out.write_all(&msg.payload);
                        let _ = out.write_all(b"\n");
                    }
                    tally.add_message(&msg.payload, c1m_io::host::unix_ms());
                }
                Ok(None) => break,
                Err(_) => {}
            }
            if Instant::now() >= next {
                let _ = writeln!(out, "{}", tally.line());
                let _ = out.flush();
                next += every;
            }
        }
        let _ = writeln!(out, "final {}", tally.line());
        let _ = out.flush();
        Ok(())
    })
}

/// One push: its payload, text or binary.
pub struct Push {
    pub text: bool,
    pub payload: Bytes,
}

/// Sends `push` to each of `ids` (`count` pushes in all, ids taken in a
/// spread order, `concurrency` in flight); with `wait`, asks for a reply
/// and prints one line per push (one id) or a summary (many).
#[allow(clippy::too_many_arguments)]
pub fn push(
    url: &str,
    auth: &Auth,
    prefix: &str,
    ids: &[String],
    count: usize,
    concurrency: usize,
    push: Push,
    wait: bool,
    timeout: Duration,
) -> Result<(), String> {
    if ids.is_empty() {
        return Err("push needs at least one --id (or --ids-file)".into());
    }
    if count == 0 {
        return Err("push --count must be at least 1".into());
    }
    if let Some(bad) = ids.iter().find(|id| !c1m_proto::handshake::valid_id(id)) {
        return Err(format!(
            "{bad:?} is not a device id: 1 to {} of [0-9A-Za-z:._-]",
            c1m_proto::handshake::MAX_ID_LEN
        ));
    }
    let subjects = Subjects::new(prefix);
    runtime()?.block_on(async {
        let client = connect(url, auth).await?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Content-Type",
            if push.text {
                "text/plain; charset=utf-8"
            } else {
                "application/octet-stream"
            },
        );
        if !wait {
            for i in 0..count {
                let id = &ids[pick(i, ids.len())];
                client
                    .publish_with_headers(subjects.push(id), headers.clone(), push.payload.clone())
                    .await
                    .map_err(|e| format!("cannot publish to NATS: {e}"))?;
            }
            client
                .flush()
                .await
                .map_err(|e| format!("NATS did not take the pushes: {e}"))?;
            eprintln!("push: {count} published (no reply asked for)");
            return Ok(());
        }
        let started = Instant::now();
        let answers = futures_util::stream::iter(0..count)
            .map(|i| {
                let (client, headers, subjects) = (&client, headers.clone(), &subjects);
                let id = ids[pick(i, ids.len())].clone();
                let payload = push.payload.clone();
                async move {
                    let t = Instant::now();
                    let req = async_nats::Request::new()
                        .headers(headers)
                        .payload(payload)
                        .timeout(Some(timeout));
                    let answer = match client.send_request(subjects.push(&id), req).await {
                        Ok(r) => String::from_utf8_lossy(&r.payload).into_owned(),
                        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                            "error: no c1m server routes pushes (none connected to this NATS with --nats)".into()
                        }
                        Err(e) => format!("error: {e}"),
                    };
                    (id, answer, t.elapsed())
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        if count == 1 {
            let (id, answer, took) = &answers[0];
            println!("{id} {answer} ({:.1} ms)", took.as_secs_f64() * 1e3);
            return if answer.starts_with("error") {
                Err(format!("the push to {id} failed: {answer}"))
            } else {
                Ok(())
            };
        }
        let mut by: BTreeMap<&str, u64> = BTreeMap::new();
        let mut lat: Vec<f64> = answers
            .iter()
            .map(|(_, a, t)| {
                *by.entry(if a.starts_with("error") { "error" } else { a.as_str() })
                    .or_default() += 1;
                t.as_secs_f64() * 1e3
            })
            .collect();
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
        let mut line = format!(
            "pushes sent={count} in_s={:.2}",
            started.elapsed().as_secs_f64()
        );
        for (k, n) in &by {
            line.push_str(&format!(" {}={n}", k.replace(' ', "_")));
        }
        line.push_str(&format!(
            " latency_ms_p50={:.2} latency_ms_p99={:.2} latency_ms_max={:.2}",
            pct(0.5),
            pct(0.99),
            pct(1.0)
        ));
        println!("{line}");
        if let Some((id, a, _)) = answers.iter().find(|(_, a, _)| a.starts_with("error")) {
            eprintln!("push: e.g. {id}: {a}");
        }
        Ok(())
    })
}

/// The i-th push's id among `n`: a fixed pseudo-random spread (so a load
/// of pushes hits devices all over, on every server).
fn pick(i: usize, n: usize) -> usize {
    let mut x = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((x ^ (x >> 31)) % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_counts_by_kind_and_reason() {
        let mut t = Tally::default();
        t.add(br#"{"event":"connected","id":"a","time_ms":1}"#, 5);
        // Two events in one message, a line each.
        t.add_message(
            concat!(
                r#"{"event":"disconnected","id":"a","reason":"expired","time_ms":10}"#,
                "\n",
                r#"{"event":"disconnected","id":"b","reason":"kicked","time_ms":10}"#,
            )
            .as_bytes(),
            30,
        );
        t.add(br#"{"event":"snapshot"}"#, 0);
        t.add(b"nonsense", 0);
        let line = t.line();
        assert!(
            line.starts_with("events connected=1 disconnected=2 snapshot=1"),
            "{line}"
        );
        assert!(
            line.contains(" expired=1 ") && line.contains(" kicked=1 "),
            "{line}"
        );
        assert!(
            line.contains("lag_ms_max=20") && line.contains("unreadable=1"),
            "{line}"
        );
    }

    #[test]
    fn picks_stay_in_range_and_spread() {
        let mut seen = [0u32; 10];
        for i in 0..1000 {
            seen[pick(i, 10)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
