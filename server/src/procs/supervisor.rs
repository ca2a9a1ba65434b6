//! `server --procs N`: the parent of N server worker processes, each with
//! its shards pinned round-robin over the chosen CPUs and its listeners in
//! the same SO_REUSEPORT group (the workers run with `--join`). The parent
//! holds no connections: it forwards SIGINT/SIGTERM, restarts a worker that
//! dies (and says so), and prints one stats line for the whole server from
//! its workers' lines, and one `final` line when they have all exited.

use std::net::SocketAddr;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::procs::workers::{self, Line};
use crate::stats::{self, Counters, Snapshot};

pub struct Supervisor {
    pub procs: usize,
    pub cpus: Vec<usize>,
    pub listen: SocketAddr,
    pub join: bool,
    /// The parent's own arguments (without the program name).
    pub args: Vec<String>,
    pub stats_interval: Duration,
    /// Also print every worker's own stats lines, prefixed `worker N:`.
    pub worker_stats: bool,
}

/// A worker that dies this soon after starting, this many times in a row,
/// is not restarted again: it would only die again (bad flags, no memory).
const QUICK_DEATH: Duration = Duration::from_secs(2);
const QUICK_DEATHS_TOLERATED: u32 = 3;

struct Worker {
    child: Child,
    cpus: Vec<usize>,
    started: Instant,
    /// The latest stats of the running incarnation.
    latest: Snapshot,
    /// Its `final` totals, once printed.
    last: Option<Counters>,
    /// Totals of incarnations that died (their connections are gone, their
    /// counts still happened).
    banked: Counters,
    quick_deaths: u32,
    exited: Option<std::process::ExitStatus>,
}

impl Supervisor {
    fn worker_args(&self, cpus: &[usize]) -> Vec<String> {
        let mut args = workers::without(
            &self.args,
            &[
                ("--procs", true),
                ("--cores", true),
                ("--join", false),
                ("--worker-stats", false),
                ("--stats-interval", true),
            ],
        );
        args.extend([
            "--cores".into(),
            workers::cpu_list(cpus),
            "--join".into(),
            "--stats-interval".into(),
            // Workers always report: the parent's line is made of theirs.
            match self.stats_interval.as_millis() {
                0 => "1s".into(),
                ms => format!("{}ms", ms.clamp(100, 1000)),
            },
        ]);
        args
    }

    fn start(&self, i: usize, tx: &mpsc::Sender<Line>) -> Result<Worker, String> {
        let cpus = workers::cpus_for(i, self.procs, &self.cpus);
        let child = workers::spawn(i, &self.worker_args(&cpus), tx)?;
        Ok(Worker {
            child,
            cpus,
            started: Instant::now(),
            latest: Snapshot {
                shard: i,
                ..Snapshot::default()
            },
            last: None,
            banked: Counters::default(),
            quick_deaths: 0,
            exited: None,
        })
    }

    /// Runs the workers until a signal (from `wait_signal`) and their exit.
    pub fn run(self, wait_signal: impl Fn(Duration) -> bool) -> Result<(), String> {
        if !self.join {
            crate::io::listener::ensure_free(self.listen).map_err(|e| {
                format!(
                    "cannot listen on {}: {e}; is another server running there? (--join shares the port with it on purpose)",
                    self.listen
                )
            })?;
        }
        let (tx, rx) = mpsc::channel::<Line>();
        let mut ws = Vec::with_capacity(self.procs);
        for i in 0..self.procs {
            match self.start(i, &tx) {
                Ok(w) => ws.push(w),
                Err(e) => {
                    stop_all(&mut ws);
                    return Err(e);
                }
            }
        }
        eprintln!(
            "server: started {} worker processes on CPUs {:?} (one SO_REUSEPORT group on {}); pids {}",
            self.procs,
            self.cpus,
            self.listen,
            ws.iter().map(|w| w.child.id().to_string()).collect::<Vec<_>>().join(",")
        );
        let print_stats = !self.stats_interval.is_zero();
        let start = Instant::now();
        let mut next_print = start + self.stats_interval;
        let (mut prev, mut prev_at) = (Counters::default(), start);
        let mut stopping = false;
        let mut failure: Option<String> = None;
        loop {
            if !stopping && wait_signal(Duration::from_millis(100)) {
                stopping = true;
                eprintln!(
                    "server: stopping: forwarding SIGTERM to {} workers",
                    ws.len()
                );
                for w in ws.iter().filter(|w| w.exited.is_none()) {
                    workers::signal(w.child.id(), libc::SIGTERM);
                }
            } else if stopping {
                std::thread::sleep(Duration::from_millis(50));
            }
            while let Ok(line) = rx.try_recv() {
                self.on_line(&mut ws, line);
            }
            for i in 0..ws.len() {
                if ws[i].exited.is_some() {
                    continue;
                }
                let Ok(Some(status)) = ws[i].child.try_wait() else {
                    continue;
                };
                if stopping {
                    ws[i].exited = Some(status);
                    continue;
                }
                // Died on its own: bank what it counted and start it again.
                let w = &mut ws[i];
                let counted = w.last.unwrap_or(w.latest.totals);
                w.banked.add(&counted);
                let quick = w.started.elapsed() < QUICK_DEATH;
                let deaths = if quick { w.quick_deaths + 1 } else { 0 };
                eprintln!(
                    "server: worker {i} (pid {}, CPUs {:?}) exited ({status}) with {} devices; {}",
                    w.child.id(),
                    w.cpus,
                    w.latest.open,
                    if deaths >= QUICK_DEATHS_TOLERATED {
                        "it keeps dying at start, so the server stops"
                    } else {
                        "restarting it"
                    }
                );
                if deaths >= QUICK_DEATHS_TOLERATED {
                    w.exited = Some(status);
                    failure = Some(format!(
                        "worker {i} died {deaths} times within {QUICK_DEATH:?} of starting ({status})"
                    ));
                    stopping = true;
                    for w in ws.iter().filter(|w| w.exited.is_none()) {
                        workers::signal(w.child.id(), libc::SIGTERM);
                    }
                    continue;
                }
                let banked = w.banked;
                match self.start(i, &tx) {
                    Ok(mut fresh) => {
                        fresh.banked = banked;
                        fresh.quick_deaths = deaths;
                        ws[i] = fresh;
                    }
                    Err(e) => {
                        ws[i].exited = Some(status);
                        failure = Some(e);
                    }
                }
            }
            let now = Instant::now();
            if print_stats && now >= next_print && !stopping {
                let snaps: Vec<Snapshot> = ws.iter().map(|w| w.latest).collect();
                let sum = total(&ws);
                println!(
                    "{}",
                    stats::grouped_line(
                        "workers",
                        now.duration_since(start).as_secs_f64(),
                        &snaps,
                        &prev,
                        &sum,
                        now.duration_since(prev_at).as_secs_f64()
                    )
                );
                (prev, prev_at) = (sum, now);
                next_print = now + self.stats_interval;
            }
            if stopping && ws.iter().all(|w| w.exited.is_some()) {
                break;
            }
        }
        // The readers end at their workers' EOF: take every last line.
        drop(tx);
        for line in rx {
            self.on_line(&mut ws, line);
        }
        println!("final {}", stats::totals(&total(&ws)));
        let failed: Vec<String> = ws
            .iter()
            .enumerate()
            .filter(|(_, w)| w.exited.is_some_and(|s| !s.success()))
            .map(|(i, w)| {
                format!(
                    "worker {i} exited {}",
                    w.exited.map(|s| s.to_string()).unwrap_or_default()
                )
            })
            .collect();
        match failure {
            Some(f) => Err(f),
            None if failed.is_empty() => Ok(()),
            None => Err(failed.join("; ")),
        }
    }

    fn on_line(&self, ws: &mut [Worker], line: Line) {
        let w = &mut ws[line.worker];
        if line.eof {
            return;
        }
        if line.stderr {
            let text = line.text.strip_prefix("server: ").unwrap_or(&line.text);
            eprintln!("server: worker {}: {text}", line.worker);
            return;
        }
        let Some((open, sockets, totals)) = stats::parse(&line.text) else {
            return;
        };
        if line.text.starts_with("final ") {
            w.last = Some(totals);
            w.latest.open = 0;
            w.latest.sockets = 0;
        } else {
            w.latest = Snapshot {
                shard: line.worker,
                open,
                sockets,
                totals,
            };
            if self.worker_stats {
                println!("worker {}: {}", line.worker, line.text);
            }
        }
    }
}

fn total(ws: &[Worker]) -> Counters {
    let mut sum = Counters::default();
    for w in ws {
        sum.add(&w.banked);
        sum.add(&w.last.unwrap_or(w.latest.totals));
    }
    sum
}

fn stop_all(ws: &mut [Worker]) {
    for w in ws.iter_mut() {
        let _ = w.child.kill();
        let _ = w.child.wait();
    }
}
