//! `server --procs N`: the parent of N server worker processes, each with
//! its shards pinned round-robin over the chosen CPUs and its listeners in
//! the same SO_REUSEPORT group (the workers run with `--join`). The parent
//! holds no connections: it forwards SIGINT/SIGTERM, restarts a worker that
//! dies (and says so), and prints one stats line for the whole server from
//! its workers' lines, and one `final` line when they have all exited.
//!
//! A hot upgrade (SIGUSR2, `POST /upgrade`) goes worker by worker, up to
//! `--upgrade-parallel` at once ([`Rollout`], docs/upgrade.md): the
//! supervisor starts each new worker from the binary at its path with one
//! end of a handover socket, gives the old worker the other end over its
//! control socket, and adopts the new one once the old one has handed
//! everything over and exited. The supervisor itself stays the binary it
//! was started as.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use c1m_io::handover::Channel;
use c1m_io::host::signals::Signals;
use c1m_io::host::workers::{self, Line};

use crate::directory::registry::Registry;
use crate::directory::switch::{Standby, Switch};
use crate::procs::workers::{spawn_generation, Given, LINK_FD};
use crate::reporter::Reporter;
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
    /// `--admin`: served here, once, for all workers (which never open it),
    /// from their stats lines, and the device endpoints through the switch.
    pub admin: Option<SocketAddr>,
    /// Who may use it (`--admin-token-file`, `--admin-host`).
    pub admin_access: crate::admin::Access,
    /// `--max-message`: the largest push the admin listener takes.
    pub max_message: usize,
    /// --drain-health-delay: on a signal, /healthz says 503 this long
    /// before the workers are told to drain (they get no such delay).
    pub drain_health_delay: Duration,
    /// Connections all the workers can hold together: what the shared
    /// device registry is sized for.
    pub registry_capacity: usize,
    /// `--udp-heartbeat`: the parent binds the UDP group, one socket per
    /// shard of the whole server in global shard order, and hands worker i
    /// the sockets of its shards. It keeps every socket open for its whole
    /// life, so a worker that dies closes none of them: the group's order
    /// never changes, datagrams for the dead worker's shards wait in their
    /// sockets (or overflow them), and its replacement inherits the same
    /// sockets at the same positions. Its new process has a new ticket key,
    /// so its predecessor's tickets count as bad, as its connections are gone.
    pub udp_heartbeat: bool,
    /// `--upgrade-parallel`: how many workers a hot upgrade hands over at
    /// once (at least 1).
    pub upgrade_parallel: usize,
    /// `--tls-cert`: the session-ticket keys every worker is given at its
    /// start (the ratchet's state then), so that a device resumes its TLS
    /// session on whichever worker its reconnect lands on, a restarted or
    /// upgraded one's too.
    pub tls_tickets: Option<std::sync::Arc<c1m_io::tls_tickets::Ticketer>>,
}

/// A worker that dies this soon after starting, this many times in a row,
/// is not restarted again: it would only die again (bad flags, no memory).
const QUICK_DEATH: Duration = Duration::from_secs(2);
const QUICK_DEATHS_TOLERATED: u32 = 3;

struct Worker {
    child: Child,
    cpus: Vec<usize>,
    started: Instant,
    /// Its counts and its dead predecessors'.
    tally: Tally,
    quick_deaths: u32,
    exited: Option<std::process::ExitStatus>,
    /// Our end of its upgrade control socket: a hot upgrade gives it the
    /// handover socket's old end here.
    control: Channel,
    /// The highest generation started for this slot (a failed upgrade's
    /// new worker used one too).
    last_gen: u64,
}

/// How long one worker's handover may take, from its new process's start
/// to its old one's exit, before the new one is killed (the old one's own
/// steps time out well before: 5 s for the hello, 30 s per step).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// What starting a worker needs besides its number.
struct Common<'a> {
    tx: &'a mpsc::Sender<Line>,
    switch: &'a Switch,
    registry: &'a Registry,
    udp: &'a [socket2::Socket],
    /// The binary workers are started from: the file at this path at each
    /// start (resolved once, at the supervisor's start).
    exe: &'a Path,
    tls_tickets: Option<&'a c1m_io::tls_tickets::Ticketer>,
}

/// A hot upgrade under way: workers in order, up to `--upgrade-parallel`
/// of them at once.
struct Rollout {
    began: Instant,
    /// The next worker to start handing over.
    next: usize,
    /// The handovers under way.
    pending: Vec<Pending>,
    /// Worker, old pid, new pid of each worker upgraded so far.
    done: Vec<(usize, u32, u32)>,
    /// Why it stopped early, a clause per failed worker: no more are
    /// started, those under way finish, then one sentence says it all.
    failed: Vec<String>,
}

impl Rollout {
    /// The workers a rollout touches now: their old process's exit is its
    /// to see, not a death to restart.
    fn handing(&self, k: usize) -> bool {
        self.pending.iter().any(|p| p.worker == k)
    }

    /// The workers upgraded so far, in order, as comma lists: their
    /// numbers, old pids and new pids.
    fn lists(&self) -> [String; 3] {
        let mut done = self.done.clone();
        done.sort_unstable();
        let join =
            |f: fn(&(usize, u32, u32)) -> String| done.iter().map(f).collect::<Vec<_>>().join(",");
        [
            join(|d| d.0.to_string()),
            join(|d| d.1.to_string()),
            join(|d| d.2.to_string()),
        ]
    }

    /// What runs the new binary so far, for the sentence that ends it.
    fn upgraded(&self) -> String {
        if self.done.is_empty() {
            return "no worker was upgraded".into();
        }
        let [workers, _, new] = self.lists();
        format!("workers {workers} run the new binary (pids {new})")
    }
}

/// Worker `worker`'s new process, started, taking over from the old one.
struct Pending {
    worker: usize,
    new: Worker,
    /// The old process's link writer: routed to again if the new one fails.
    standby: Standby,
    old_pid: u32,
    began: Instant,
}

/// What one worker slot has counted, over all its incarnations. Pure
/// bookkeeping, kept apart from the processes so that it can be tested.
///
/// A death is seen (by `try_wait`) before its last lines have been read:
/// they may still be in the pipe or in the reader thread when the
/// replacement starts. So a dead incarnation's count stays open to its own
/// late lines until its stdout ends, and only then is banked.
#[derive(Debug, Default)]
struct Tally {
    /// The running incarnation's number: 0 for the first start, +1 per
    /// restart; its lines carry it.
    generation: u64,
    /// Its latest stats.
    latest: Snapshot,
    /// Its `final` totals, once printed.
    last: Option<Counters>,
    /// Its stdout ended: no more lines of it can come.
    ended: bool,
    /// Dead incarnations whose stdout has not ended yet: (generation, what
    /// it counted so far). Their counts are cumulative, so a late line
    /// replaces the entry rather than adding to it.
    dying: Vec<(u64, Counters)>,
    /// Totals of dead incarnations whose output has all been read (their
    /// connections are gone, their counts still happened).
    banked: Counters,
}

impl Tally {
    fn new(worker: usize) -> Tally {
        Tally {
            latest: Snapshot {
                shard: worker,
                ..Snapshot::default()
            },
            ..Tally::default()
        }
    }

    /// What the running incarnation has counted.
    fn counted(&self) -> Counters {
        self.last.unwrap_or(self.latest.totals)
    }

    /// The running incarnation died; `generation` is its replacement.
    fn restart(&mut self, generation: u64) {
        let counted = self.counted();
        if self.ended {
            self.banked.add(&counted);
        } else {
            self.dying.push((self.generation, counted));
        }
        self.generation = generation;
        self.latest = Snapshot {
            shard: self.latest.shard,
            ..Snapshot::default()
        };
        self.last = None;
        self.ended = false;
    }

    /// A stats line (`final` or not) printed by incarnation `generation`.
    fn stats(
        &mut self,
        generation: u64,
        is_final: bool,
        open: u64,
        sockets: u64,
        totals: Counters,
    ) {
        if generation != self.generation {
            // A dead one's: it updates that one's count, nothing current.
            if let Some((_, counted)) = self.dying.iter_mut().find(|(g, _)| *g == generation) {
                *counted = totals;
            }
            return;
        }
        if is_final {
            self.last = Some(totals);
            self.latest.open = 0;
            self.latest.sockets = 0;
        } else {
            self.latest = Snapshot {
                shard: self.latest.shard,
                open,
                sockets,
                totals,
            };
        }
    }

    /// Incarnation `generation`'s stdout ended: no more of its lines.
    fn stdout_ended(&mut self, generation: u64) {
        if generation == self.generation {
            self.ended = true;
        } else if let Some(k) = self.dying.iter().position(|(g, _)| *g == generation) {
            let (_, counted) = self.dying.swap_remove(k);
            self.banked.add(&counted);
        }
    }

    fn total(&self) -> Counters {
        let mut sum = self.banked;
        for (_, counted) in &self.dying {
            sum.add(counted);
        }
        sum.add(&self.counted());
        sum
    }
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
                ("--admin", true),
                ("--admin-token-file", true),
                ("--admin-host", true),
                ("--drain-health-delay", true),
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

    /// Starts worker `i`'s incarnation `generation` (with the new end of a
    /// handover socket: a hot upgrade's new worker) and routes its shards'
    /// messages to it; returns it and the previous incarnation's writer.
    fn start(
        &self,
        i: usize,
        generation: u64,
        c: &Common<'_>,
        handover: Option<&Channel>,
    ) -> Result<(Worker, Standby), String> {
        let cpus = workers::cpus_for(i, self.procs, &self.cpus);
        // The worker's link to the others: a socket pair, the parent's end
        // routed by the switch, the other end the child's alone.
        let (ours, theirs) = UnixStream::pair()
            .map_err(|e| format!("cannot make a socket pair for worker {i}: {e}"))?;
        let (control, their_control) = Channel::pair()
            .map_err(|e| format!("cannot make a control socket for worker {i}: {e}"))?;
        let (base, total) = c.switch.span(i);
        let link = (theirs.as_raw_fd(), format!("{},{base},{total}", LINK_FD));
        let inherit: Vec<i32> = c
            .udp
            .iter()
            .skip(base as usize)
            .take(cpus.len())
            .map(|s| s.as_raw_fd())
            .collect();
        // The ticket keys' state now, in a pipe the child reads at its start
        // (ours closes when this returns).
        let tickets = match c.tls_tickets {
            Some(t) => Some(
                t.to_pipe()
                    .map_err(|e| format!("cannot hand worker {i} the TLS ticket keys: {e}"))?,
            ),
            None => None,
        };
        let mut child = spawn_generation(
            i,
            generation,
            &self.worker_args(&cpus),
            c.tx,
            Given {
                link: Some(link),
                registry: Some(c.registry.fd()),
                udp: &inherit,
                control: Some(their_control.as_raw_fd()),
                handover: handover.map(|h| h.as_raw_fd()),
                tls_tickets: tickets.as_ref().map(|p| p.as_raw_fd()),
                exe: Some(c.exe.to_path_buf()),
            },
        )?;
        // The child has its copies; its exit must end ours.
        drop(theirs);
        drop(their_control);
        let standby = match c.switch.attach(i, ours) {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let worker = Worker {
            child,
            cpus,
            started: Instant::now(),
            tally: Tally::new(i),
            quick_deaths: 0,
            exited: None,
            control,
            last_gen: generation,
        };
        Ok((worker, standby))
    }

    /// Starts the hot upgrade of worker `k`: its new process (from the
    /// binary at the path), the old one given the handover socket's other
    /// end over its control socket, then its SIGUSR2.
    fn begin(&self, k: usize, ws: &mut [Worker], c: &Common<'_>) -> Result<Pending, String> {
        let (old_end, new_end) =
            Channel::pair().map_err(|e| format!("cannot make the handover socket ({e})"))?;
        let generation = ws[k].last_gen + 1;
        let (mut new, standby) = self.start(k, generation, c, Some(&new_end))?;
        drop(new_end);
        ws[k].last_gen = generation;
        let old_pid = ws[k].child.id();
        if let Err(e) = crate::upgrade::give_handover(&mut ws[k].control, &old_end) {
            let _ = new.child.kill();
            let _ = new.child.wait();
            c.switch.restore(k, standby);
            return Err(format!(
                "cannot give its old process (pid {old_pid}) the handover socket ({e})"
            ));
        }
        drop(old_end);
        workers::signal(old_pid, libc::SIGUSR2);
        Ok(Pending {
            worker: k,
            new,
            standby,
            old_pid,
            began: Instant::now(),
        })
    }

    /// One look at a rollout: sees how each handover under way went,
    /// starts the next ones while fewer than `--upgrade-parallel` run, and
    /// returns the sentence that ends it, once it has.
    fn step(
        &self,
        r: &mut Rollout,
        ws: &mut [Worker],
        c: &Common<'_>,
        stopping: bool,
    ) -> Option<String> {
        let n = ws.len();
        let mut i = 0;
        while i < r.pending.len() {
            match look(&mut r.pending[i], ws) {
                None => i += 1,
                Some(outcome) => {
                    let p = r.pending.swap_remove(i);
                    let k = p.worker;
                    match outcome {
                        Outcome::Adopted(status) => {
                            let new_pid = p.new.child.id();
                            let took = p.began.elapsed();
                            let generation = p.new.last_gen;
                            let mut fresh = p.new;
                            fresh.tally = std::mem::take(&mut ws[k].tally);
                            fresh.tally.restart(generation);
                            ws[k] = fresh;
                            // Its writer goes: the old process has ended.
                            drop(p.standby);
                            r.done.push((k, p.old_pid, new_pid));
                            if status.success() {
                                crate::say!(
                                    "server: upgrade: worker {k} ({} of {n}): pid {} handed over to pid {new_pid} in {} ms",
                                    r.done.len(),
                                    p.old_pid,
                                    took.as_millis()
                                );
                            } else {
                                // A stripe it held locked when it died is
                                // repaired; its entries are the new
                                // process's now: none forgotten.
                                let (first, _) = c.switch.span_of(k);
                                c.registry.sweep(p.old_pid, first..first);
                                r.failed.push(format!(
                                    "at worker {k} of {n}: its old process (pid {}) exited ({status}) during the handover, and its new one (pid {new_pid}) serves what it was given",
                                    p.old_pid
                                ));
                            }
                        }
                        Outcome::NewExited(status) => {
                            c.switch.restore(k, p.standby);
                            r.failed.push(format!(
                                "at worker {k} of {n}: its new process (pid {}) exited ({status}) before it took over (the worker's line says why); worker {k} (pid {}) serves as before",
                                p.new.child.id(),
                                p.old_pid
                            ));
                        }
                        Outcome::BothExited(old, new) => {
                            // Both gone: the slot restarts as after any death.
                            drop(p.standby);
                            r.failed.push(format!(
                                "at worker {k} of {n}: its old process (pid {}) and its new one (pid {}) both exited ({old}, {new}); {}",
                                p.old_pid,
                                p.new.child.id(),
                                if stopping {
                                    "the server is stopping"
                                } else {
                                    "it is restarted"
                                }
                            ));
                        }
                    }
                }
            }
        }
        let more = r.failed.is_empty() && !stopping;
        while more && r.next < n && r.pending.len() < self.upgrade_parallel {
            let k = r.next;
            r.next += 1;
            match self.begin(k, ws, c) {
                Ok(p) => r.pending.push(p),
                Err(why) => {
                    r.failed
                        .push(format!("at worker {k} of {n}: {why}; it serves as before"));
                    break;
                }
            }
        }
        if !r.pending.is_empty() {
            return None;
        }
        if !r.failed.is_empty() {
            return Some(format!(
                "upgrade stopped {}; {}",
                r.failed.join("; "),
                r.upgraded()
            ));
        }
        if r.next < n {
            // Only a stop keeps workers from starting.
            return Some(format!(
                "upgrade stopped before worker {} of {n}: the server is stopping; {}",
                r.next,
                r.upgraded()
            ));
        }
        let [_, old, new] = r.lists();
        Some(format!(
            "upgrade: all {n} workers handed over to new processes of {} in {} ms, up to {} at once (pids {old} now {new}); the supervisor (pid {}) stays as it was and starts any worker from that path",
            c.exe.display(),
            r.began.elapsed().as_millis(),
            self.upgrade_parallel.min(n),
            std::process::id(),
        ))
    }

    /// Runs the workers until a signal (taken from `signals`) and their exit.
    pub fn run(self, signals: Signals) -> Result<(), String> {
        if !self.join {
            c1m_io::listener::ensure_free(self.listen).map_err(|e| {
                format!(
                    "cannot listen on {}: {e}; is another server running there? (--join shares the port with it on purpose)",
                    self.listen
                )
            })?;
        }
        // Bound before any worker starts: a taken port is one clear error.
        let shards: Vec<usize> = (0..self.procs)
            .map(|i| workers::cpus_for(i, self.procs, &self.cpus).len())
            .collect();
        let switch = Switch::new(&shards);
        // One table for every worker's shards: each claims and releases
        // ids in it directly; a message crosses only when a claim
        // displaces a connection (crate::directory::registry).
        let registry = Registry::create(self.registry_capacity).map_err(|e| {
            format!("cannot make the shared device registry (memfd, {} connections): {e}; lower --max-conns or check memory", self.registry_capacity)
        })?;
        let udp = if self.udp_heartbeat {
            c1m_io::udp::bind_group(self.listen, shards.iter().sum())
                .and_then(|g| g.into_iter().map(c1m_io::udp::above_low_fds).collect())
                .map_err(|e| {
                    format!(
                        "--udp-heartbeat: cannot bind UDP {}: {e}; is another server running there?",
                        self.listen
                    )
                })?
        } else {
            Vec::new()
        };
        let admin = match self.admin {
            Some(addr) => Some(crate::admin::Admin::start(
                addr,
                "worker",
                Some(crate::admin::Devices {
                    route: crate::admin::Route::Workers(switch.clone()),
                    max_message: self.max_message,
                }),
                self.admin_access.clone(),
            )?),
            None => None,
        };
        // The path workers start from (a hot upgrade's new ones, and
        // restarts after it): resolved now, while /proc/self/exe names it.
        let exe: PathBuf = std::fs::read_link("/proc/self/exe")
            .map_err(|e| format!("cannot resolve /proc/self/exe: {e}"))?;
        let (tx, rx) = mpsc::channel::<Line>();
        let common = Common {
            tx: &tx,
            switch: &switch,
            registry: &registry,
            udp: &udp,
            exe: &exe,
            tls_tickets: self.tls_tickets.as_deref(),
        };
        let mut ws = Vec::with_capacity(self.procs);
        for i in 0..self.procs {
            match self.start(i, 0, &common, None) {
                Ok((w, _)) => ws.push(w),
                Err(e) => {
                    stop_all(&mut ws);
                    return Err(e);
                }
            }
        }
        crate::say!(
            "server: started {} worker processes on CPUs {:?} (one SO_REUSEPORT group on {}); pids {}",
            self.procs,
            self.cpus,
            self.listen,
            ws.iter().map(|w| w.child.id().to_string()).collect::<Vec<_>>().join(",")
        );
        // systemd (Type=notify): the supervisor is the service's process
        // (a hot upgrade keeps it: its pid never changes).
        c1m_io::host::notify::ready_or_warn(None);
        // The workers drain themselves: the parent's stats lines end at
        // the signal. SIGTERM goes to the workers when the drain is due: at
        // the signal, or after --drain-health-delay (the parent's /healthz
        // says 503 meanwhile).
        let mut reporter = Reporter::new(
            signals,
            admin,
            self.stats_interval,
            self.drain_health_delay,
            Duration::from_millis(100),
            false,
        );
        let mut failure: Option<String> = None;
        let mut rollout: Option<Rollout> = None;
        loop {
            let signal = reporter.wait();
            if signal == Some(crate::reporter::UPGRADE_SIGNAL) {
                let refused = if reporter.stopping() {
                    Some("the server is stopping".to_string())
                } else if let Some(r) = &rollout {
                    Some(format!(
                        "one is under way already ({} of {} workers handed over)",
                        r.done.len(),
                        ws.len()
                    ))
                } else {
                    ws.iter()
                        .position(|w| w.exited.is_some())
                        .map(|i| format!("worker {i} is not running"))
                };
                match refused {
                    Some(why) => crate::say!("server: upgrade refused: {why}"),
                    None => {
                        crate::say!(
                            "server: upgrade: handing each of {} workers over to a new process of {}, up to {} at once",
                            ws.len(),
                            exe.display(),
                            self.upgrade_parallel.min(ws.len())
                        );
                        rollout = Some(Rollout {
                            began: Instant::now(),
                            next: 0,
                            pending: Vec::new(),
                            done: Vec::new(),
                            failed: Vec::new(),
                        });
                    }
                }
            } else if signal.is_some() && !self.drain_health_delay.is_zero() {
                crate::say!(
                    "server: stopping: /healthz says 503 for {:?} while the workers serve, then SIGTERM to {} workers",
                    self.drain_health_delay,
                    ws.len()
                );
            }
            if reporter.drain_due() {
                crate::say!(
                    "server: stopping: forwarding SIGTERM to {} workers",
                    ws.len()
                );
                for w in ws.iter().filter(|w| w.exited.is_none()) {
                    workers::signal(w.child.id(), libc::SIGTERM);
                }
                for p in rollout.iter().flat_map(|r| &r.pending) {
                    workers::signal(p.new.child.id(), libc::SIGTERM);
                }
            }
            if let Some(r) = &mut rollout {
                if let Some(said) = self.step(r, &mut ws, &common, reporter.stopping()) {
                    crate::say!("server: {said}");
                    rollout = None;
                }
            }
            let mut fresh = false;
            while let Ok(line) = rx.try_recv() {
                self.on_line(&mut ws, line);
                fresh = true;
            }
            if fresh && reporter.admin() {
                let snaps: Vec<Snapshot> = ws.iter().map(|w| w.tally.latest).collect();
                reporter.publish(&snaps, &total(&ws));
            }
            for i in 0..ws.len() {
                if ws[i].exited.is_some() || rollout.as_ref().is_some_and(|r| r.handing(i)) {
                    continue;
                }
                let Ok(Some(status)) = ws[i].child.try_wait() else {
                    continue;
                };
                if reporter.stopping() {
                    ws[i].exited = Some(status);
                    continue;
                }
                // Died on its own: start it again (its counts are kept).
                let w = &mut ws[i];
                let quick = w.started.elapsed() < QUICK_DEATH;
                let deaths = if quick { w.quick_deaths + 1 } else { 0 };
                crate::say!(
                    "server: worker {i} (pid {}, CPUs {:?}) exited ({status}) with {} devices; {}",
                    w.child.id(),
                    w.cpus,
                    w.tally.latest.open,
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
                    reporter.stop();
                    for w in ws.iter().filter(|w| w.exited.is_none()) {
                        workers::signal(w.child.id(), libc::SIGTERM);
                    }
                    continue;
                }
                let generation = w.last_gen + 1;
                // Everything its shards held is gone: out of the registry
                // with it (and any stripe it held locked, repaired) before
                // its successor claims anything.
                let (first, count) = switch.span_of(i);
                registry.sweep(w.child.id(), first..first + count);
                match self.start(i, generation, &common, None) {
                    Ok((mut fresh, _)) => {
                        fresh.tally = std::mem::take(&mut w.tally);
                        fresh.tally.restart(generation);
                        fresh.quick_deaths = deaths;
                        ws[i] = fresh;
                    }
                    Err(e) => {
                        ws[i].exited = Some(status);
                        failure = Some(e);
                    }
                }
            }
            if reporter.line_due() {
                let snaps: Vec<Snapshot> = ws.iter().map(|w| w.tally.latest).collect();
                let sum = total(&ws);
                let w = reporter.line(sum);
                println!(
                    "{}",
                    stats::grouped_line("workers", w.elapsed, &snaps, &w.prev, &sum, w.secs)
                );
            }
            if reporter.stopping() && rollout.is_none() && ws.iter().all(|w| w.exited.is_some()) {
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
        let tally = &mut ws[line.worker].tally;
        if line.eof {
            // Stats come on stdout only: its end is the last word on them.
            if !line.stderr {
                tally.stdout_ended(line.generation);
            }
            return;
        }
        if line.stderr {
            let text = line.text.strip_prefix("server: ").unwrap_or(&line.text);
            crate::say!("server: worker {}: {text}", line.worker);
            return;
        }
        let Some((open, sockets, totals)) = stats::parse(&line.text) else {
            return;
        };
        let is_final = line.text.starts_with("final ");
        tally.stats(line.generation, is_final, open, sockets, totals);
        if !is_final && self.worker_stats {
            println!("worker {}: {}", line.worker, line.text);
        }
    }
}

/// How a worker's handover ended.
enum Outcome {
    /// The old process exited (with this status) and the new one runs.
    Adopted(std::process::ExitStatus),
    /// The new process exited before the old one: the old one serves on.
    NewExited(std::process::ExitStatus),
    /// Both exited (old, new).
    BothExited(std::process::ExitStatus, std::process::ExitStatus),
}

/// One look at a handover under way: how it ended, if it has (a new
/// process past the timeout is killed, and seen at a later look).
fn look(p: &mut Pending, ws: &mut [Worker]) -> Option<Outcome> {
    let old = ws[p.worker].child.try_wait();
    let new = p.new.child.try_wait();
    match (old, new) {
        (Ok(Some(status)), Ok(None)) => Some(Outcome::Adopted(status)),
        (Ok(None), Ok(Some(status))) => Some(Outcome::NewExited(status)),
        (Ok(Some(old)), Ok(Some(new))) => Some(Outcome::BothExited(old, new)),
        _ => {
            if p.began.elapsed() > HANDOVER_TIMEOUT {
                crate::say!(
                    "server: upgrade: worker {}'s handover has taken over {HANDOVER_TIMEOUT:?}: killing its new process (pid {})",
                    p.worker,
                    p.new.child.id()
                );
                let _ = p.new.child.kill();
            }
            None
        }
    }
}

fn total(ws: &[Worker]) -> Counters {
    let mut sum = Counters::default();
    for w in ws {
        sum.add(&w.tally.total());
    }
    sum
}

fn stop_all(ws: &mut [Worker]) {
    for w in ws.iter_mut() {
        let _ = w.child.kill();
        let _ = w.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(n: u64) -> Counters {
        Counters {
            accepted: n,
            ..Counters::default()
        }
    }

    #[test]
    fn a_dead_incarnations_late_stats_are_not_its_replacements() {
        let mut t = Tally::new(3);
        t.stats(0, false, 7, 8, accepted(10));
        t.restart(1);
        // Generation 0's last line, still in its reader when it was restarted.
        t.stats(0, false, 9, 9, accepted(12));
        assert_eq!(t.latest.open, 0, "the replacement holds nothing yet");
        assert_eq!(t.total().accepted, 12);
        t.stats(1, false, 2, 2, accepted(3));
        assert_eq!((t.latest.shard, t.latest.open), (3, 2));
        assert_eq!(t.latest.totals.accepted, 3);
        assert_eq!(t.total().accepted, 15);
        t.stdout_ended(0);
        assert_eq!(t.total().accepted, 15, "banked once, at its last count");
        t.stats(1, false, 4, 4, accepted(5));
        assert_eq!(t.total().accepted, 17);
    }

    #[test]
    fn a_dead_incarnations_late_final_does_not_pin_its_replacement() {
        let mut t = Tally::new(0);
        t.stats(0, false, 7, 7, accepted(10));
        t.restart(1);
        t.stats(0, true, 0, 0, accepted(12));
        assert_eq!(t.last, None, "the replacement has not ended");
        t.stats(1, false, 1, 1, accepted(3));
        assert_eq!(t.total().accepted, 15);
        t.stats(1, false, 1, 1, accepted(5));
        assert_eq!(t.total().accepted, 17);
        t.stdout_ended(0);
        t.stats(1, true, 0, 0, accepted(6));
        assert_eq!(t.total().accepted, 18);
    }

    #[test]
    fn every_incarnation_is_banked_exactly_once() {
        let mut t = Tally::new(0);
        // Generation 0 ended cleanly before its death was seen.
        t.stats(0, false, 1, 1, accepted(4));
        t.stats(0, true, 0, 0, accepted(5));
        t.stdout_ended(0);
        t.restart(1);
        assert_eq!(t.total().accepted, 5);
        // Generation 1 dies; its output ends only after generation 2 started.
        t.stats(1, false, 1, 1, accepted(7));
        t.restart(2);
        t.stats(2, false, 1, 1, accepted(1));
        t.stats(1, true, 0, 0, accepted(8));
        t.stdout_ended(1);
        t.stdout_ended(1); // (A repeated end changes nothing.)
        assert_eq!(t.total().accepted, 5 + 8 + 1);
        t.restart(3);
        t.stdout_ended(2);
        assert_eq!(t.total().accepted, 5 + 8 + 1);
        assert_eq!(t.latest.totals, Counters::default());
    }
}
