//! One server process: its shards (one pinned executor per CPU), the
//! listeners and sockets they get, the publisher and admin threads, and the
//! reporting loop until they have all ended.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use c1m::reporter::Reporter;
use c1m::shard::{self, ShardConfig};
use c1m::stats::{self, Counters, Snapshot};
use c1m_io::host::limits::Host;
use c1m_io::host::raise_nofile;
use c1m_io::host::signals::Signals;
use c1m_io::Backend;
use c1m_proto::conn::Limits;
use glommio::{LocalExecutorBuilder, Placement};

use crate::args::{Args, Checked};

/// Runs this process's shards until a signal, or a shard's death, and
/// their drain.
pub fn run(args: Args, checked: Checked) -> Result<(), String> {
    let Checked {
        cores,
        admin_access,
        auth,
        tls,
        tls_tickets,
    } = checked;
    let print_stats = !args.stats_interval.is_zero();
    // The binary a hot upgrade starts: the file at this path then (resolved
    // now, while /proc/self/exe still names the path and not "(deleted)").
    let exe = std::fs::read_link("/proc/self/exe")
        .map_err(|e| format!("cannot resolve /proc/self/exe: {e}"))?;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // Every connection is a descriptor: past RLIMIT_NOFILE accept fails with
    // EMFILE, so by default the shards stop at their share of it (and answer
    // 503) with a little room kept for the listeners and the executors.
    let nofile = raise_nofile();
    let host = Host::read(nofile);
    let max_conns = host.per_shard(cores.len(), args.max_conns);
    // The device registry: the --procs parent's table, or this server's own.
    let registry = match c1m::directory::registry::Registry::from_env()? {
        Some(shared) => shared,
        None => {
            let capacity = (cores.len() as u64 * max_conns as u64).min(host.machine_capacity());
            c1m::directory::registry::Registry::create(capacity.max(1) as usize).map_err(|e| {
                format!("cannot make the device registry (memfd, {capacity} connections): {e}; lower --max-conns or check memory")
            })?
        }
    };
    let cfg = ShardConfig {
        limits: Limits {
            max_head: args.max_head,
            max_message: args.max_message,
            echo: args.echo,
        },
        timeout: args.timeout,
        tick: args.tick,
        handshake_timeout: args.handshake_timeout,
        batch_wait: args.io_batch_wait,
        max_handshakes: args.max_handshakes,
        frame_timeout: args.frame_timeout,
        max_conns,
        graceful_expiry: args.graceful_expiry,
        drain_timeout: args.drain_timeout,
        drain_rate: args.drain_rate as f64,
        // How often the shards send their snapshots: for the stats line,
        // and at least once a second for /metrics when --admin is on.
        stats_interval: match (print_stats, args.admin.is_some()) {
            (true, false) => args.stats_interval,
            (true, true) => args.stats_interval.min(Duration::from_secs(1)),
            (false, true) => Duration::from_secs(1),
            (false, false) => Duration::from_secs(3600),
        },
        inject_panic: std::env::var_os("C1M_INJECT_PANIC").is_some_and(|v| v == "1"),
        auth: auth.clone(),
        proxy_protocol: args.proxy_protocol,
        trust_forwarded: args.trust_forwarded_from.clone(),
        events: None,
        tls,
        registry,
        udp: None,
        admission: (args.max_upgrades_per_sec > 0).then_some(c1m::admission::Budget {
            per_sec: args.max_upgrades_per_sec as f64,
            excess: args.upgrade_excess,
        }),
        takeover: false,
    };
    cfg.validate()?;

    if let Some(said) = host.advice((cores.len() as u64).saturating_mul(max_conns as u64)) {
        c1m::say!("server: --max-conns asks for more than fits: {said}");
    }
    // By default each shard's share of the server's listen queue (a
    // --procs worker gets its share from the parent as --backlog).
    let backlog = args.backlog.unwrap_or_else(|| {
        c1m_io::listener::default_backlog(cores.len(), c1m_io::listener::somaxconn())
    });
    // What does not stop the server but shapes it: a listen queue shorter
    // than the backlog asked for, TCP buffer memory short of the sockets.
    let sockets = (cores.len() as u64).saturating_mul(max_conns as u64);
    let queues = c1m_io::host::limits::Queues::read();
    let said = [
        queues.backlog_warning(backlog.max(0) as u64),
        queues.memory_warning(sockets),
    ];
    for w in said.into_iter().flatten() {
        c1m::say!("server: warning: {w}");
    }

    let (backend, fallback) = Backend::usable(args.io);
    if let Some(why) = fallback {
        c1m::say!("server: {why}");
    }
    // Started by a hot upgrade: the old process's listeners, not ours.
    let given = c1m::upgrade::new::begin(cores.len(), backend)?;
    let mut cfg = cfg;
    cfg.takeover = given.is_some();

    // Bind every listener before starting any shard, so a taken port is one
    // clear error rather than a half-started server.
    let (given_listeners, given_admin, taking, given_udp, given_key) = match given {
        Some(g) => (
            Some(g.listeners),
            g.admin,
            Some(g.taking),
            g.udp,
            g.ticket_key,
        ),
        None => (None, None, None, Vec::new(), None),
    };
    if !args.join && given_listeners.is_none() {
        c1m_io::listener::ensure_free(args.listen).map_err(|e| {
            format!(
                "cannot listen on {}: {e}; is another server running there? (--join shares the port with it on purpose)",
                args.listen
            )
        })?;
    }
    let mut listeners = given_listeners.unwrap_or_default();
    for _ in listeners.len()..cores.len() {
        listeners.push(c1m_io::listener::bind(args.listen, backlog).map_err(|e| {
            format!(
                "cannot listen on {}: {e}; is another server running there?",
                args.listen
            )
        })?);
    }

    // --udp-heartbeat: one UDP socket per shard, in one SO_REUSEPORT group
    // in shard order (a --procs worker's come from its parent, which bound
    // the whole server's group), kept open until the server exits.
    let udp = if args.udp_heartbeat {
        let sockets = match c1m_io::udp::inherited()? {
            // A --procs worker's (a new one's too: the old one's copies
            // that came with a hot upgrade are the same sockets).
            Some(s) => s,
            // A hot upgrade's: the old process's group, in shard order.
            None if !given_udp.is_empty() => given_udp,
            None if args.join => {
                return Err("--udp-heartbeat with --join is not supported: the kernel steers each datagram by its socket's position in the port's UDP group, which servers started apart cannot agree on; run one server with --procs N instead".into())
            }
            None => c1m_io::udp::bind_group(args.listen, cores.len()).map_err(|e| {
                format!(
                    "--udp-heartbeat: cannot bind UDP {}: {e}; is another server running there?",
                    args.listen
                )
            })?,
        };
        if sockets.len() != cores.len() {
            return Err(format!(
                "--udp-heartbeat: got {} UDP sockets for {} shards",
                sockets.len(),
                cores.len()
            ));
        }
        // A hot upgrade's new process seals and checks with the old one's
        // key, so that the tickets its devices hold stay good.
        let key = match given_key {
            Some(k) => k,
            None => {
                let mut random = [0u8; 16];
                c1m_io::host::random_bytes(&mut random).map_err(|e| {
                    format!("--udp-heartbeat: cannot draw a random ticket key: {e}")
                })?;
                c1m_proto::ticket::Key::from_bytes(random)
            }
        };
        Some(shard::UdpHeartbeat {
            key,
            sockets: Arc::new(sockets),
        })
    } else {
        None
    };

    if args.reuseport_cpu && taking.is_none() {
        // The program returns CPU % N as an index into the group in bind
        // order: right only when shard i is the i-th bound and runs on CPU i.
        if args.join || cores.iter().enumerate().any(|(i, &c)| i != c) {
            return Err(format!(
                "--reuseport-cpu needs --cores 0-{} (shard i on CPU i) and no --join; got --cores {:?}",
                cores.len() - 1,
                cores
            ));
        }
        c1m_io::listener::steer_by_cpu(&listeners[0], listeners.len() as u32).map_err(|e| {
            format!("--reuseport-cpu: cannot attach the CPU program to the listeners: {e}")
        })?;
    }

    // SIGINT and SIGTERM are taken by this thread only (sigtimedwait below);
    // the shard threads inherit the blocked mask (and so does the admin's).
    let signals = Signals::block()?;

    // Bound before any shard starts, like the listeners: a taken admin
    // port is one clear error. It sees only what this thread publishes.
    // Each shard's inbox, its ends to every shard (the device registry's
    // messages), and the ends this thread keeps to stop them (and the admin
    // thread to ask about devices).
    // A --procs worker's shards are numbered over the whole server, and
    // reach the other workers' through the link to the parent.
    let link = c1m::directory::link::from_env()?;
    let worker = link.is_some();
    // A --procs worker's line from its supervisor for hot upgrades.
    let control = c1m::upgrade::control_from_env()?;
    let span = match &link {
        Some((_, base, total, (tx, _))) => c1m::directory::mailbox::Span {
            base: *base,
            total: *total,
            link: Some(tx.clone()),
        },
        None => c1m::directory::mailbox::Span::alone(cores.len()),
    };
    let (base, total) = (span.base, span.total);
    let (mail, outside) = c1m::directory::mailbox::wire_span(cores.len(), span)
        .map_err(|e| format!("cannot make the shards' inboxes (eventfd): {e}"))?;
    if let Some((sock, _, _, (_, outbox))) = link {
        let inbound = c1m::directory::mailbox::local_peers(outside.clone(), base, total);
        c1m::directory::link::run(sock, outbox, inbound)?;
    }
    // --nats: one publisher thread for this process; the shards get the
    // sending end of its bounded queue and never wait on it.
    let live = Arc::new(std::sync::atomic::AtomicU64::new(0));
    cfg.udp = udp;
    let publisher = match &args.nats {
        Some(url) => {
            let (tx, p) = start_publisher(
                &args,
                url,
                outside.clone(),
                (base as u32, total),
                live.clone(),
            )?;
            cfg.events = Some(tx);
            Some(p)
        }
        None => None,
    };
    let devices = Some(c1m::admin::Devices {
        route: c1m::admin::Route::Local(outside.clone()),
        max_message: args.max_message,
    });
    let admin = match (args.admin, given_admin) {
        (Some(_), Some(l)) => Some(c1m::admin::Admin::start_on(
            l,
            "shard",
            devices,
            admin_access,
        )?),
        (Some(addr), None) => Some(c1m::admin::Admin::start(
            addr,
            "shard",
            devices,
            admin_access,
        )?),
        (None, _) => None,
    };
    let admin_listener = admin.as_ref().and_then(|a| a.listener().ok());
    let admin_handed = admin.as_ref().map(|a| a.handed_switch());

    let (report_tx, report_rx) = mpsc::channel::<Snapshot>();
    // A shard that ends before it was told to stop (its driver failed, or
    // it panicked outside the parser's containment) says so here: the
    // process then ends whole, never serving on N-1 shards with the ids
    // that shard owned lost from the registry.
    let (died_tx, died_rx) = mpsc::channel::<String>();
    let mut handles = Vec::new();
    let sched = args.sched;
    for (id, ((&cpu, listener), mail)) in cores.iter().zip(listeners).zip(mail).enumerate() {
        let cfg = cfg.clone();
        let tx = report_tx.clone();
        let died = died_tx.clone();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard{id}"))
            // glommio pins 10 MiB per executor for DMA file I/O by default;
            // shards do no file I/O, and at 60 worker processes that would be
            // gigabytes. 64 KiB is glommio's minimum.
            .io_memory(64 << 10)
            .spawn(move || async move {
                if let Err(e) = sched.apply() {
                    // Served all the same, at the policy it has.
                    c1m::say!("server: shard {id} keeps its scheduling policy: --sched {sched} failed ({e})");
                }
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    shard::run(backend, id, cfg, listener, mail, tx)
                }));
                let ended = match result {
                    Ok(Ok(totals)) => Ok(totals),
                    Ok(Err(e)) => Err(format!("its I/O loop failed: {e}")),
                    Err(panic) => Err(format!("it panicked: {}", panic_message(&*panic))),
                };
                let ended = ended.map_err(|cause| {
                    let msg = format!("shard {id} on CPU {cpu} stopped: {cause}");
                    let _ = died.send(msg.clone());
                    msg
                });
                // Its report sender is gone (and its death said): the main
                // thread sees the end now, not at its next poll.
                c1m_io::host::signals::wake();
                ended
            })
            .map_err(|e| format!("cannot start a shard on CPU {cpu}: {e}; check --cores against the CPUs this process may use"))?;
        handles.push(handle);
    }
    drop(report_tx);
    drop(died_tx);
    // systemd (Type=notify): ready now, unless this process takes over
    // from an old one (it says MAINPID= with READY=1 once it has).
    let takes_over = taking.is_some();
    if let Some(t) = taking {
        let nats = publisher.as_ref().map(|p| p.notices.clone());
        c1m::upgrade::new::serve(t, outside.clone(), nats)?;
    }
    let mut upgrade = Upgrade {
        exe,
        argv,
        running: None,
        admin: admin_listener,
        admin_handed,
        worker,
        control,
        handed: false,
        tls_tickets,
        nats: publisher.as_ref().map(|p| p.notices.clone()),
    };
    c1m::say!(
        "server: listening on {} with {} shards on CPUs {:?}, up to {max_conns} connections each (io {backend}, backlog {backlog}, timeout {:?}, tick {:?}, RLIMIT_NOFILE {nofile}, auth {}, {}{})",
        args.listen,
        cores.len(),
        cores,
        args.timeout,
        args.tick,
        match &auth {
            Some(k) => format!("on, {} secrets", k.len()),
            None => "off".into(),
        },
        match &args.tls_cert {
            Some(cert) => format!("TLS 1.3/1.2 with {} (wss)", cert.display()),
            None => "plaintext (ws)".into(),
        },
        if cfg.udp.is_some() {
            format!(", UDP heartbeats on {}", args.listen)
        } else {
            String::new()
        }
    );

    if !takes_over {
        c1m_io::host::notify::ready_or_warn(None);
    }

    // The shards drain themselves, and their stats lines go on meanwhile.
    let mut reporter = Reporter::new(
        signals,
        admin,
        args.stats_interval,
        args.drain_health_delay,
        Duration::from_millis(200),
        true,
    );
    let shutdown = || {
        for shard in &outside {
            shard.send_now(c1m::directory::mailbox::Mail::Shutdown);
        }
    };
    // After a hot upgrade: the TLS devices left here closed over the window.
    let shutdown_after_upgrade = || {
        for shard in &outside {
            shard.send_now(c1m::directory::mailbox::Mail::ShutdownOver(
                args.upgrade_tls_window,
            ));
        }
    };
    let mut latest = vec![Snapshot::default(); cores.len()];
    // Set when a shard died: what ends the process with a failure, and the
    // moment past which it no longer waits for the others to drain.
    let mut died: Option<(String, Instant)> = None;
    // Every shard holds a sender: the channel disconnects once all have
    // ended, whether they drained, failed or panicked.
    let mut running = true;
    while running {
        if died.is_none() {
            if let Ok(why) = died_rx.try_recv() {
                // One sentence, at once; the others drain as on SIGTERM.
                say_shard_died(&why);
                died = Some((
                    why,
                    Instant::now() + args.drain_timeout + Duration::from_secs(2),
                ));
                if reporter.stop() {
                    shutdown();
                }
            }
        }
        // At the signal, or after --drain-health-delay (while /healthz
        // says 503).
        if reporter.drain_due() {
            shutdown();
        }
        if let Some((_, by)) = &died {
            if Instant::now() >= *by {
                // A shard that does not drain in time is not waited for.
                std::process::exit(1);
            }
        }
        if let Some(done) = upgrade.finished() {
            match done {
                Ok(s) => {
                    c1m::say!(
                        "server: upgrade: handed {} listeners and {} connections to the new process (pid {}) in {} ms (hello {} ms){}{}; this process exits",
                        s.listeners,
                        s.moved,
                        s.pid,
                        s.took.as_millis(),
                        s.hello.as_millis(),
                        if s.tls_closed > 0 { format!(", {} TLS connections closed with 1001 over {:?} (their TLS state does not move)", s.tls_closed, args.upgrade_tls_window) } else { String::new() },
                        if s.lost > 0 { format!(", {} lost", s.lost) } else { String::new() },
                    );
                    if let Some(why) = &s.unconfirmed {
                        c1m::say!("server: upgrade: the new process did not confirm the end of the handover ({why}) but runs: it holds everything now");
                    }
                    // The shards end once their TLS devices (if any) are
                    // closed. /healthz is not turned to 503: its port is
                    // the new process's now.
                    upgrade.handed = true;
                    shutdown_after_upgrade();
                }
                Err(why) => c1m::say!("server: {why}"),
            }
        }
        // Wait for a signal, at most until the next stats line.
        let signal = reporter.wait();
        if signal == Some(c1m::reporter::UPGRADE_SIGNAL) {
            if reporter.stopping() {
                c1m::say!("server: upgrade refused: the server is stopping");
            } else if let Err(why) = upgrade.start(&cfg, &outside, backend, cores.len()) {
                c1m::say!("server: {why}");
            }
        } else if signal.is_some() {
            let pace = match args.drain_rate {
                0 => "to every device".to_string(),
                r => format!("at {r} devices/s"),
            };
            if !args.drain_health_delay.is_zero() {
                c1m::say!("server: stopping: /healthz says 503 for {:?} while serving, then Close 1001 {pace} (then up to {:?} for answers)", args.drain_health_delay, args.drain_timeout);
            } else {
                c1m::say!("server: stopping: no new connections, sending Close 1001 {pace} (then up to {:?} for answers)", args.drain_timeout);
            }
        }
        let mut fresh = false;
        loop {
            match report_rx.try_recv() {
                Ok(s) => {
                    latest[s.shard] = s;
                    fresh = true;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    running = false;
                    break;
                }
            }
        }
        if fresh && reporter.admin() {
            reporter.publish(&latest, &sum(&latest));
        }
        if fresh {
            live.store(
                latest.iter().map(|s| s.open).sum(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        if reporter.line_due() {
            let sum = sum(&latest);
            let w = reporter.line(sum);
            c1m::out!(
                "{}{}",
                stats::line(w.elapsed, &latest, &w.prev, &sum, w.secs),
                publisher.as_ref().map(nats_stats).unwrap_or_default()
            );
        }
    }
    let mut failed = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(format!("a shard panicked: {e:?}")),
        }
    }
    if died.is_none() {
        // The last shard died as the loop saw them all end (its report
        // sender goes before its word): said here, as in the loop.
        if let Ok(why) = died_rx.try_recv() {
            say_shard_died(&why);
            died = Some((why, Instant::now()));
        }
    }
    if died.is_some() {
        // Already said in one sentence; the exit status says the rest.
        failed.clear();
    }
    let sum = sum(&latest);
    // The shards have ended (their last events are queued): publish the
    // rest, for at most a couple of seconds.
    let nats_line = publisher.map(|p| {
        let stats = p.stats.clone();
        p.stop();
        nats_counts(&stats)
    });
    c1m::out!(
        "final {}{}",
        stats::totals(&sum),
        nats_line.unwrap_or_default()
    );
    if died.is_some() {
        std::process::exit(1);
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// A shard died: one sentence, and the process ends whole.
fn say_shard_died(why: &str) {
    c1m::say!("server: {why}; ending the whole process (exit 1) so that it is restarted whole (the --procs parent or systemd does it)");
}

/// The hot upgrade's trigger side: one handover at a time.
struct Upgrade {
    exe: std::path::PathBuf,
    argv: Vec<std::ffi::OsString>,
    running: Option<std::thread::JoinHandle<Result<c1m::upgrade::old::Summary, String>>>,
    admin: Option<std::net::TcpListener>,
    /// Set once the new process serves the admin port.
    admin_handed: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// A --procs worker: upgraded by its supervisor only, which gives it
    /// the handover socket over `control` before its SIGUSR2.
    worker: bool,
    control: Option<c1m_io::handover::Channel>,
    /// The handover is done: this process is ending.
    handed: bool,
    /// `--tls-cert`: the session-ticket keys the new process is given, so
    /// that the wss devices it gets back resume their sessions.
    tls_tickets: Option<Arc<c1m_io::tls_tickets::Ticketer>>,
    /// `--nats`: its pushes stop here before any connection moves.
    nats: Option<c1m::events::publisher::Notices>,
}

impl Upgrade {
    /// Starts a handover, or says in one sentence why not.
    fn start(
        &mut self,
        cfg: &ShardConfig,
        shards: &[c1m::directory::mailbox::Peer],
        backend: Backend,
        n: usize,
    ) -> Result<(), String> {
        // A worker's handover socket first: taken (and dropped, closing
        // it, if refused below) so that none is left for a later trigger.
        let given = match (self.worker, self.control.as_mut()) {
            (false, _) => None,
            (true, None) => return Err("upgrade refused: this --procs worker has no control socket from its supervisor (a supervisor of an older build?); upgrade through the supervisor".into()),
            (true, Some(ctl)) => match c1m::upgrade::take_handover(ctl) {
                Ok(Some(ch)) => Some(ch),
                Ok(None) => return Err("upgrade refused: a --procs worker is upgraded by its supervisor only (send SIGUSR2 to the supervisor, or POST /upgrade on its admin port)".into()),
                Err(why) => return Err(format!("upgrade refused: {why}")),
            },
        };
        if self.running.is_some() {
            return Err("upgrade refused: one is under way already".into());
        }
        if self.handed {
            return Err(
                "upgrade refused: this process has handed everything over and is ending".into(),
            );
        }
        let admin = match &self.admin {
            Some(l) => Some(l.try_clone().map_err(|e| {
                format!("upgrade refused: cannot duplicate the admin listener ({e})")
            })?),
            None => None,
        };
        debug_assert_eq!(shards.len(), n);
        let plan = c1m::upgrade::old::Plan {
            exe: self.exe.clone(),
            args: self.argv.clone(),
            registry_fd: cfg.registry.fd(),
            shards: shards.to_vec(),
            backend,
            tls: cfg.tls.is_some(),
            admin,
            admin_handed: self.admin_handed.clone(),
            udp: cfg.udp.clone(),
            tls_tickets: self.tls_tickets.clone(),
            nats: self.nats.clone(),
            given,
        };
        if plan.given.is_some() {
            c1m::say!("server: upgrade: handing over to the new worker the supervisor started");
        } else {
            c1m::say!(
                "server: upgrade: starting {} with the same arguments",
                self.exe.display()
            );
        }
        self.running = Some(
            c1m::upgrade::old::start(plan)
                .map_err(|e| format!("upgrade refused: cannot start its thread ({e})"))?,
        );
        Ok(())
    }

    /// The handover's outcome, once its thread has ended.
    fn finished(&mut self) -> Option<Result<c1m::upgrade::old::Summary, String>> {
        if !self.running.as_ref()?.is_finished() {
            return None;
        }
        let h = self.running.take()?;
        Some(h.join().unwrap_or_else(|_| {
            Err("upgrade: its thread panicked; this process keeps serving".into())
        }))
    }
}

/// Starts this process's NATS publisher from the flags.
fn start_publisher(
    args: &Args,
    url: &str,
    peers: Vec<c1m::directory::mailbox::Peer>,
    (shard_base, shards_total): (u32, usize),
    live: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(c1m::events::EventTx, c1m::events::publisher::Publisher), String> {
    use c1m::events::event;
    if !event::valid_prefix(&args.nats_prefix) {
        return Err(format!(
            "--nats-prefix {:?} must be NATS subject tokens of [0-9A-Za-z_-] separated by dots",
            args.nats_prefix
        ));
    }
    let server = match &args.server_id {
        Some(id) if event::valid_server_id(id) => id.clone(),
        Some(id) => {
            return Err(format!(
                "--server-id {id:?} must be 1 to 64 of [0-9A-Za-z:_-] (it names a NATS subject)"
            ))
        }
        None => event::default_server_id(&hostname(), args.listen.port()),
    };
    if args.nats_queue == 0 {
        return Err("--nats-queue must be at least 1".into());
    }
    // A --procs worker: its index, from the supervisor.
    let worker = std::env::var("C1M_WORKER")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    let started = c1m::events::publisher::start(c1m::events::publisher::Config {
        url: url.into(),
        auth: c1m::events::publisher::Auth {
            creds: args.nats_creds.clone(),
            user_file: args.nats_user_file.clone(),
            token_file: args.nats_token_file.clone(),
        },
        prefix: args.nats_prefix.clone(),
        origin: event::Origin {
            server: server.clone(),
            worker,
            shard_base,
        },
        queue: args.nats_queue,
        peers,
        max_message: args.max_message,
        exclusive: args.nats_exclusive,
        shards_total,
        live,
    })?;
    c1m::say!(
        "server: NATS {url}: events on {}.events.*, pushes on {}.push.<id>, as server {server} worker {worker}, queue {}",
        args.nats_prefix, args.nats_prefix, args.nats_queue
    );
    Ok(started)
}

/// A panic's message, for the one sentence that says a shard died.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

fn nats_stats(p: &c1m::events::publisher::Publisher) -> String {
    nats_counts(&p.stats)
}

fn nats_counts(s: &c1m::events::publisher::Stats) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    format!(
        " nats_published={} nats_publish_errors={} presence_dropped={} broker_connects={} pushes_routed={} pushes_delivered={} connects_refused={}",
        s.published.load(Relaxed),
        s.publish_errors.load(Relaxed),
        s.presence_dropped.load(Relaxed),
        s.broker_connects.load(Relaxed),
        s.pushes_routed.load(Relaxed),
        s.pushes_delivered.load(Relaxed),
        s.connects_refused.load(Relaxed)
    )
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The shards' totals together.
fn sum(latest: &[Snapshot]) -> Counters {
    let mut sum = Counters::default();
    latest.iter().for_each(|s| sum.add(&s.totals));
    sum
}
