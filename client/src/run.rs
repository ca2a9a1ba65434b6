//! One client process's run: a pinned glommio executor per core, each running
//! its [`Fleet`]; the main thread turns their once-a-second reports into the
//! timeline and the progress line, handles SIGINT/SIGTERM, and gathers the
//! final counts and histograms. Cores share nothing but the stop flag and
//! the report channel.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

use crate::fleet::{self, Plan};
use crate::hgrm;
use crate::host;
use crate::metrics::{Counters, Measured, Phase, Report};
use crate::progress::{self, Progress};
use crate::timeline::Row;

/// One worker process of a `--procs` parent.
pub struct WorkerLaunch {
    /// Its arguments (its share of the devices, its CPUs, `dir`).
    pub args: Vec<String>,
    /// Its results directory, where its histograms are read from.
    pub dir: PathBuf,
}

pub struct Options {
    pub plan: Plan,
    /// One executor per CPU listed (when `workers` is empty).
    pub cpus: Vec<usize>,
    /// Worker processes instead of executors in this process (`--procs`).
    pub workers: Vec<WorkerLaunch>,
    /// This process is a worker: report on stdout in `c1m-progress` lines.
    pub report_lines: bool,
    /// The server's pid, to measure its CPU and memory.
    pub server_pid: Option<u32>,
    /// Print the progress line.
    pub progress: bool,
}

/// Server (or client) CPU and memory at a moment of the run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mark {
    pub t_s: f64,
    pub counters: Counters,
    pub client_cpu_ns: u64,
    pub client_rss: u64,
    pub server_cpu_ns: u64,
    pub server_rss: u64,
    /// Host-wide: kernel slab memory, memory available, TCP sockets in use
    /// and TCP buffer pages (/proc/meminfo, /proc/net/sockstat).
    pub slab: u64,
    pub mem_available: u64,
    pub tcp_inuse: u64,
    pub tcp_mem_pages: u64,
}

pub struct Outcome {
    pub counters: Counters,
    pub measured: Measured,
    pub rows: Vec<Row>,
    /// At the start, when every core had finished its ramp, and when the
    /// first core ended its hold (the main thread's 1 s ticks).
    pub start: Mark,
    pub ramp_end: Option<Mark>,
    pub hold_end: Option<Mark>,
    /// Start to the end of the slowest core's ramp (every device tried and
    /// answered or timed out), in seconds; None if a core never finished it.
    pub ramp_s: Option<f64>,
    pub errors: Vec<String>,
    /// Stopped early by SIGINT/SIGTERM.
    pub interrupted: bool,
    pub elapsed_s: f64,
}

/// Runs the plan to its end (or a signal) and returns what was measured.
pub fn run(opts: Options) -> Result<Outcome, String> {
    let signals = c1m_io::host::signals::Signals::block_with_usr1()?;
    let plan = Arc::new(opts.plan);
    let stop = Arc::new(AtomicBool::new(false));
    // Every core's hold begins together (fleet::State::go): set here once
    // every local core has ramped, or, in a --procs worker, on its
    // parent's SIGUSR1, which the parent sends once every worker has.
    let go = Arc::new(AtomicBool::new(false));
    let mut go_said = false;
    let (tx, rx) = mpsc::channel();
    let me = std::process::id();
    let server_pid = opts.server_pid;
    let mark = |t_s: f64, counters: Counters| {
        // A spawned server is the client's child: its CPU and memory are
        // the server's figures, not also the client's.
        let (client_cpu_ns, client_rss) = host::tree_usage_without(me, server_pid);
        let (server_cpu_ns, server_rss) = server_pid.map_or((0, 0), host::tree_usage);
        let (tcp_inuse, tcp_mem_pages) = host::sockstat();
        Mark {
            t_s,
            counters,
            client_cpu_ns,
            client_rss,
            server_cpu_ns,
            server_rss,
            slab: host::meminfo("Slab:"),
            mem_available: host::meminfo("MemAvailable:"),
            tcp_inuse,
            tcp_mem_pages,
        }
    };
    let start = mark(0.0, Counters::default());

    let mut handles = Vec::new();
    let mut children: Vec<Child> = Vec::new();
    if !opts.workers.is_empty() {
        let (ltx, lrx) = mpsc::channel();
        for (i, w) in opts.workers.iter().enumerate() {
            match c1m_io::host::workers::spawn(i, &w.args, &ltx) {
                Ok(c) => children.push(c),
                Err(e) => {
                    for c in &mut children {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    return Err(e);
                }
            }
        }
        drop(ltx);
        let dirs: Vec<PathBuf> = opts.workers.iter().map(|w| w.dir.clone()).collect();
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("worker-reports".into())
            .spawn(move || translate(lrx, &dirs, &tx))
            .map_err(|e| format!("cannot start the worker report reader: {e}"))?;
    }
    let cpus: &[usize] = if opts.workers.is_empty() {
        &opts.cpus
    } else {
        &[]
    };
    for (core, &cpu) in cpus.iter().enumerate() {
        let (plan, stop, go, tx) = (plan.clone(), stop.clone(), go.clone(), tx.clone());
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("client-{core}"))
            // The fleet's sockets live in its own I/O driver, not in
            // glommio's buffers.
            .io_memory(64 << 10)
            .spawn(move || async move {
                // The fleet builds its driver on this thread, which alone
                // may use an io_uring ring (SINGLE_ISSUER).
                if let Err(e) = fleet::run(core, plan, stop, go, tx.clone()) {
                    let _ = tx.send(Report::Done {
                        core,
                        counters: Counters::default(),
                        measured: Box::default(),
                        ramp_done_us: None,
                        error: Some(format!("core {core}: cannot start: {e}")),
                    });
                }
            })
            .map_err(|e| format!("cannot start an executor on CPU {cpu}: {e}"))?;
        handles.push(h);
    }
    drop(tx);

    let cores = cpus.len() + children.len();
    let mut latest = vec![(Phase::Ramp, Counters::default()); cores];
    let mut measured = Measured::new();
    let mut errors = Vec::new();
    let mut done = 0;
    let mut rows = vec![Row {
        client_rss_bytes: start.client_rss,
        server_rss_bytes: start.server_rss,
        ..Row::default()
    }];
    let mut prev = start;
    let (mut ramp_end, mut hold_end) = (None, None);
    // The last mark taken while every core still held: the hold's end.
    // (The mark at which a core has moved on may already hold the
    // teardown of the whole fleet, which follows the hold at once when no
    // expiry is awaited, and with it a second of closes and their events.)
    let mut holding: Option<Mark> = None;
    let mut interrupted = false;
    let (mut ramp_us, mut ramp_missing) = (None, false);
    let progress = Progress::new();
    // Cores report on whole seconds of the run; read them a little later.
    const READ_AFTER: Duration = Duration::from_millis(100);
    let mut second = 1u64;
    let mut next = plan.origin + Duration::from_secs(1) + READ_AFTER;
    while done < cores {
        let signal = signals.wait(next.saturating_duration_since(Instant::now()));
        if signal == Some("SIGUSR1") {
            // A --procs parent: every worker has ramped.
            go.store(true, Relaxed);
        } else if let Some(sig) = signal {
            if !interrupted {
                interrupted = true;
                stop.store(true, Relaxed);
                for c in &children {
                    c1m_io::host::workers::signal(c.id(), libc::SIGTERM);
                }
                progress.finish();
                eprintln!(
                    "client: signal {sig}: closing connections and writing what was measured"
                );
            } else if !opts.report_lines {
                // (A worker gets both the terminal's SIGINT and its parent's
                // SIGTERM: the first already stopped it.)
                progress.finish();
                eprintln!("client: second signal {sig}: exiting without writing results");
                std::process::exit(130);
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Report::Progress {
                    core,
                    phase,
                    counters,
                }) => latest[core] = (phase, counters),
                Ok(Report::Done {
                    core,
                    counters,
                    measured: m,
                    ramp_done_us,
                    error,
                }) => {
                    ramp_us = ramp_us.max(ramp_done_us);
                    ramp_missing |= ramp_done_us.is_none();
                    latest[core] = (Phase::Done, counters);
                    if let Err(e) = measured.add(&m) {
                        errors.push(e);
                    }
                    errors.extend(error);
                    done += 1;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    if done < cores {
                        errors.push(format!("{} core(s) ended without a report", cores - done));
                        done = cores;
                    }
                    break;
                }
            }
        }
        // Every core (every worker) past its ramp: the holds begin.
        if !go_said && latest.iter().all(|l| l.0 >= Phase::Ramped) {
            go_said = true;
            if !children.is_empty() {
                for c in &children {
                    c1m_io::host::workers::signal(c.id(), libc::SIGUSR1);
                }
            } else if !opts.report_lines {
                go.store(true, Relaxed);
            }
        }
        let now = Instant::now();
        if now < next && done < cores {
            continue;
        }
        let t_s = if done < cores {
            second as f64
        } else {
            now.duration_since(plan.origin).as_secs_f64()
        };
        while next <= now {
            next += Duration::from_secs(1);
            second += 1;
        }
        let mut sum = Counters::default();
        for (_, c) in &latest {
            sum.add(c);
        }
        let min_phase = latest.iter().map(|l| l.0).min().unwrap_or(Phase::Done);
        let max_phase = latest.iter().map(|l| l.0).max().unwrap_or(Phase::Done);
        let m = mark(t_s, sum);
        let dt_ns = ((m.t_s - prev.t_s) * 1e9).max(1.0);
        let row = Row {
            // (Saturating: the tree loses the CPU time of workers that exit.)
            client_cpu_pct: m.client_cpu_ns.saturating_sub(prev.client_cpu_ns) as f64 / dt_ns
                * 100.0,
            client_rss_bytes: m.client_rss,
            server_cpu_pct: m.server_cpu_ns.saturating_sub(prev.server_cpu_ns) as f64 / dt_ns
                * 100.0,
            server_rss_bytes: m.server_rss,
            ..counts_row(t_s, &sum, &prev.counters)
        };
        if ramp_end.is_none() && min_phase >= Phase::Ramped {
            ramp_end = Some(m);
        }
        if hold_end.is_none() && max_phase >= Phase::Expiry {
            hold_end = Some(holding.unwrap_or(m));
        }
        if min_phase >= Phase::Hold && max_phase < Phase::Expiry {
            holding = Some(m);
        }
        if opts.report_lines {
            println!("c1m-progress phase={} {}", min_phase.name(), sum.to_words());
        } else if opts.progress {
            let eta = match min_phase {
                Phase::Ramp if plan.rate_per_core > 0.0 => Some(
                    (plan.devices.saturating_sub(sum.attempted)) as f64
                        / (plan.rate_per_core * cores as f64),
                ),
                Phase::Hold => ramp_end.map(|r| (r.t_s + plan.hold.as_secs_f64() - t_s).max(0.0)),
                _ => None,
            };
            progress.show(&progress::line(&row, &sum, plan.devices, min_phase, eta));
        }
        rows.push(row);
        prev = m;
    }
    if opts.progress {
        progress.finish();
    }
    for h in handles {
        if h.join().is_err() {
            errors.push("a core's executor panicked".into());
        }
    }
    for (i, mut c) in children.into_iter().enumerate() {
        match c.wait() {
            Ok(s) if s.success() || s.code() == Some(2) => {}
            Ok(s) => errors.push(format!("worker {i} exited {s}")),
            Err(e) => errors.push(format!("worker {i}: {e}")),
        }
    }
    let mut counters = Counters::default();
    for (_, c) in &latest {
        counters.add(c);
    }
    Ok(Outcome {
        counters,
        measured,
        rows,
        start,
        ramp_end,
        hold_end,
        ramp_s: ramp_us
            .filter(|_| !ramp_missing)
            .map(|us: u64| us as f64 / 1e6),
        errors,
        interrupted,
        elapsed_s: plan.origin.elapsed().as_secs_f64(),
    })
}

/// A timeline row's counts: the fleet open at `t_s` and what happened since
/// `prev`. Saturating: a sum can go down (a worker's line cut short as it
/// died reads as zeros, a bad line likewise), and a second with less than
/// nothing is a second with nothing, not a wrap to 2^64 or a panic.
fn counts_row(t_s: f64, now: &Counters, prev: &Counters) -> Row {
    Row {
        t_s,
        established: now.open,
        connects_per_s: now.established.saturating_sub(prev.established),
        failures_per_s: now.failed.saturating_sub(prev.failed),
        heartbeats_per_s: now.heartbeats.saturating_sub(prev.heartbeats),
        expiries_per_s: now.expired.saturating_sub(prev.expired),
        false_expiries_per_s: now.false_expiries.saturating_sub(prev.false_expiries),
        ..Row::default()
    }
}

/// Turns worker processes' lines into the reports their executors would
/// have sent: `c1m-progress` each second, `c1m-done` at the end (then their
/// histograms are read from their directories); stderr is passed on.
fn translate(
    lines: mpsc::Receiver<c1m_io::host::workers::Line>,
    dirs: &[PathBuf],
    tx: &mpsc::Sender<Report>,
) {
    let mut last = vec![Counters::default(); dirs.len()];
    let mut done = vec![false; dirs.len()];
    for line in lines {
        let w = line.worker;
        if line.stderr {
            if !line.eof {
                let text = line.text.strip_prefix("client: ").unwrap_or(&line.text);
                eprintln!("client: worker {w}: {text}");
            }
            continue;
        }
        let word = |key: &str| {
            line.text
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
        };
        if line.eof {
            if !done[w] {
                done[w] = true;
                let _ = tx.send(Report::Done {
                    core: w,
                    counters: last[w],
                    measured: Box::default(),
                    ramp_done_us: None,
                    error: Some(format!(
                        "worker {w} ended without its final report (its messages are above)"
                    )),
                });
            }
        } else if line.text.starts_with("c1m-progress ") {
            last[w] = Counters::from_words(&line.text);
            let phase = word("phase")
                .and_then(|p| Phase::from_name(&p))
                .unwrap_or(Phase::Ramp);
            let _ = tx.send(Report::Progress {
                core: w,
                phase,
                counters: last[w],
            });
        } else if line.text.starts_with("c1m-done ") {
            done[w] = true;
            let (measured, error) = match load_measured(&dirs[w]) {
                Ok(m) => (m, None),
                Err(e) => (Measured::new(), Some(format!("worker {w}: {e}"))),
            };
            let _ = tx.send(Report::Done {
                core: w,
                counters: Counters::from_words(&line.text),
                measured: Box::new(measured),
                ramp_done_us: word("ramp_us").and_then(|v| v.parse().ok()),
                error,
            });
        }
    }
}

/// A worker's histograms, from its V2 files.
pub fn load_measured(dir: &Path) -> Result<Measured, String> {
    let read = |name: &str| {
        let p = dir.join(format!("{name}.v2.hdr"));
        let f = std::fs::File::open(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        hgrm::read_v2(f).map_err(|e| format!("{}: {e}", p.display()))
    };
    Ok(Measured {
        connect: read("connect")?,
        heartbeat_rtt: read("heartbeat_rtt")?,
        heartbeat_rtt_hold: read("heartbeat_rtt_hold")?,
        expiry_lag: read("expiry_lag")?,
        storm_lag: read("storm_lag")?,
        reconnect_connect: read("reconnect_connect")?,
        reconnect_back: read("reconnect_back")?,
        drain_back: read("drain_back")?,
        server_closes: read("server_closes")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_that_go_down_give_zero_not_a_wrap() {
        let before = Counters::from_words(
            "c1m-progress phase=hold established=10 open=9 failed=2 heartbeats=50 expired=3 false_expiries=1",
        );
        // The same worker's next line, cut short as it died: the rest reads as 0.
        let cut = Counters::from_words("c1m-progress phase=hold established=12 open=");
        let row = counts_row(2.0, &cut, &before);
        assert_eq!(row.connects_per_s, 2);
        assert_eq!(row.established, 0);
        assert_eq!(
            (
                row.failures_per_s,
                row.heartbeats_per_s,
                row.expiries_per_s,
                row.false_expiries_per_s
            ),
            (0, 0, 0, 0)
        );
        let row = counts_row(3.0, &before, &Counters::default());
        assert_eq!(
            (
                row.t_s,
                row.established,
                row.connects_per_s,
                row.heartbeats_per_s
            ),
            (3.0, 9, 10, 50)
        );
    }
}
