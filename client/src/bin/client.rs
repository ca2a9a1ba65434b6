//! client: a fleet of WebSocket devices against a c1m server (or several),
//! spread over local source addresses, heartbeating on a timing wheel, a
//! fraction of them silent on purpose; writes histograms, a timeline, a
//! summary and plots to a results directory.
//!
//! Exit status: 0 the run completed; 2 it completed and the server
//! misbehaved (false, early or missed expiries); 1 it could not run.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use c1m_client::fleet::{HeartbeatKind, Plan};
use c1m_client::run::WorkerLaunch;
use c1m_client::run::{self, Options};
use c1m_client::spawn::{self, SpawnedServer};
use c1m_client::{device, host, ips, limits, output, summary};
use c1m_io::host::{parse_cpus, parse_duration, raise_nofile};
use c1m_io::Backend;
use serde_json::json;

/// A fleet of WebSocket devices for load-testing a c1m server.
#[derive(argh::FromArgs, Debug)]
struct Args {
    /// server address:port; repeat or comma-separate to spread the fleet
    /// over several (default 127.0.0.1:9000)
    #[argh(option)]
    server: Vec<String>,
    /// source addresses, e.g. 127.0.0.2-127.0.0.41 or 10.0.0.2,10.0.0.3
    /// (default: the kernel's choice, one address)
    #[argh(option)]
    ips: Option<String>,
    /// devices to connect (default 10000)
    #[argh(option, default = "10_000")]
    conns: u64,
    /// connections per second for the whole client; 0 = as fast as the
    /// concurrency allows (default 0)
    #[argh(option, default = "0.0")]
    rate: f64,
    /// connect the whole fleet over this long instead of --rate, e.g. 30s
    #[argh(option, from_str_fn(parse_duration))]
    ramp: Option<Duration>,
    /// upgrades in flight per core (default 256)
    #[argh(option, default = "256")]
    concurrency: usize,
    /// heartbeat interval of each device, +-10% jitter (default 30s)
    #[argh(
        option,
        default = "Duration::from_secs(30)",
        from_str_fn(parse_duration)
    )]
    heartbeat: Duration,
    /// ping (the Pong gives the round trip), text or binary (default ping)
    #[argh(option, default = "HeartbeatKind::Ping")]
    heartbeat_kind: HeartbeatKind,
    /// heartbeat with the UDP datagram the server's 101 offers
    /// (C1M-Heartbeat-Ticket, a server run with --udp-heartbeat), sent in
    /// batches; the WebSocket stays open and silent (default: off)
    #[argh(switch)]
    udp_heartbeat: bool,
    /// with --udp-heartbeat, also send a WebSocket heartbeat every N
    /// datagrams, as a device behind a NAT would (default 0: never)
    #[argh(option, default = "0")]
    udp_heartbeat_every: u32,
    /// with --udp-heartbeat, send the datagrams to this address:port
    /// instead of the server's (a bare receiver, to measure the floor fed
    /// by this same client: bench/udp-heartbeat.sh); the server then hears
    /// none of them (default: the server's)
    #[argh(option)]
    udp_to: Option<std::net::SocketAddr>,
    /// fraction of devices that stop heartbeating (from their upgrade, or
    /// from --silent-after), so the server must expire them (default 0)
    #[argh(option, default = "0.0")]
    silent: f64,
    /// the silent fraction heartbeats until this long into the hold, then
    /// stops (default: silent from its upgrade on)
    #[argh(option, from_str_fn(parse_duration))]
    silent_after: Option<Duration>,
    /// this fraction of the heartbeating devices opens a second connection
    /// with its own id as soon as its first is up, while the first is still
    /// open; the server should close the first with 4000, counted here as
    /// replaced (default 0)
    #[argh(option, default = "0.0")]
    reconnect_fraction: f64,
    /// this long into the hold, every open device resets its connection
    /// (SO_LINGER 0) at once and reconnects with exponential backoff and
    /// full jitter, retrying after each failure (refused, 503, reset,
    /// timeout); the summary gives the time until 99% and 100% are back,
    /// the reconnects' connect latency and the failures by cause
    /// (default: no storm)
    #[argh(option, from_str_fn(parse_duration))]
    reconnect_storm: Option<Duration>,
    /// a heartbeating device the server closes with 1001 (a paced drain, a
    /// hot upgrade's wss close) reconnects after the backoff below, as
    /// firmware does, instead of ending; the summary counts them
    /// (drain_closes, drain_back) and how long they were away
    #[argh(switch)]
    redial_on_close: bool,
    /// with --reconnect-storm or --redial-on-close: the first backoff's ceiling; attempt k waits
    /// a uniform random time in [0, min(cap, base * 2^k)] (default 100ms)
    #[argh(
        option,
        default = "Duration::from_millis(100)",
        from_str_fn(parse_duration)
    )]
    backoff_base: Duration,
    /// with --reconnect-storm or --redial-on-close: the longest backoff
    /// (default 30s)
    #[argh(
        option,
        default = "Duration::from_secs(30)",
        from_str_fn(parse_duration)
    )]
    backoff_cap: Duration,
    /// the server's --timeout, to measure expiry lag (default 90s, or the
    /// --timeout in --server-flags)
    #[argh(option, from_str_fn(parse_duration))]
    server_timeout: Option<Duration>,
    /// how long to keep the fleet once it is up (default 60s)
    #[argh(
        option,
        default = "Duration::from_secs(60)",
        from_str_fn(parse_duration)
    )]
    hold: Duration,
    /// how long past --server-timeout to wait for silent devices to be
    /// expired before calling them missed (default 10s)
    #[argh(
        option,
        default = "Duration::from_secs(10)",
        from_str_fn(parse_duration)
    )]
    expiry_window: Duration,
    /// give up on a connection not upgraded within this (default 10s)
    #[argh(
        option,
        default = "Duration::from_secs(10)",
        from_str_fn(parse_duration)
    )]
    connect_timeout: Duration,
    /// text before each device id (ids are locally administered MACs)
    #[argh(option, default = "String::new()")]
    id_prefix: String,
    /// CPUs to run on, one executor each, e.g. 0-1 (default: all allowed)
    #[argh(option, from_str_fn(parse_cpus))]
    cores: Option<Vec<usize>>,
    /// results directory (default results/<UTC timestamp>-<conns>/)
    #[argh(option)]
    out: Option<PathBuf>,
    /// start the server binary on the first --server address for this run
    #[argh(switch)]
    spawn_server: bool,
    /// flags for the spawned server, e.g. "--timeout 10s --tick 100ms"
    #[argh(option, default = "String::new()")]
    server_flags: String,
    /// server binary for --spawn-server (default: `server` beside this binary)
    #[argh(option)]
    server_bin: Option<PathBuf>,
    /// pid of a server started elsewhere on this machine, to measure its
    /// CPU and memory
    #[argh(option)]
    server_pid: Option<u32>,
    /// no progress line
    #[argh(switch)]
    quiet: bool,
    /// after the hold, every device sends one last heartbeat at once, then
    /// nothing; the run waits for the server to delete the whole fleet
    #[argh(switch)]
    go_silent: bool,
    /// devices neither answer nor act on the server's Close: each keeps its
    /// connection, heartbeating, until the server ends it, so a draining
    /// server runs to its --drain-timeout (default: a Close ends the device)
    #[argh(switch)]
    ignore_close: bool,
    /// run this many worker processes, each with its share of the devices
    /// and of --cores, for hosts where RLIMIT_NOFILE cannot be raised; one
    /// merged results directory, each worker's own in worker-N/ (default 1)
    #[argh(option, default = "1")]
    procs: u64,
    /// internal: set by a --procs parent, this process is its worker N
    #[argh(option)]
    worker: Option<u64>,
    /// the I/O backend, epoll or uring (each core's own io_uring), as the
    /// server's; where io_uring is unusable the client says why and runs on
    /// epoll (default epoll)
    #[argh(option, default = "Backend::Epoll")]
    io: Backend,
    /// sign each device's token with the first secret in this file (the
    /// server's --auth-secret-file) and send it as Authorization: Bearer
    /// (default: no token)
    #[argh(option)]
    auth_secret_file: Option<PathBuf>,
    /// speak wss:// (TLS 1.3 or 1.2, ALPN http/1.1) to a server started
    /// with --tls-cert/--tls-key; needs --tls-ca (default: plaintext ws://)
    #[argh(switch)]
    tls: bool,
    /// with --tls: trust the CA certificates in this PEM file (the server's
    /// certificate or the CA that signed it)
    #[argh(option)]
    tls_ca: Option<PathBuf>,
    /// with --tls: the name the server's certificate must carry, sent as
    /// SNI (default localhost)
    #[argh(option, default = "\"localhost\".into()")]
    tls_server_name: String,
    /// with --tls: keep no session tickets, so that every handshake is a
    /// full one (by default a device keeps the ticket its connection got,
    /// and its reconnects resume with it)
    #[argh(switch)]
    tls_no_resume: bool,
    /// with --tls: a device's first connection resumes too, with the
    /// newest ticket any device of the process got (not what devices do:
    /// for a ramp of resumed handshakes to measure); by default only a
    /// reconnect resumes, with a ticket of its own
    #[argh(switch)]
    tls_share_tickets: bool,
}

fn main() {
    let args: Args = argh::from_env();
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("client: {e}");
            std::process::exit(1);
        }
    }
}

/// The command lines of a `--procs` parent's workers: its own arguments
/// minus what only the parent does, plus each worker's index, CPUs, results
/// directory and I/O backend.
fn worker_launches(
    args: &Args,
    dir: &std::path::Path,
    cpus: &[usize],
    server_timeout: Duration,
    io: Backend,
) -> Vec<WorkerLaunch> {
    let own: Vec<String> = std::env::args().skip(1).collect();
    let kept = c1m_io::host::workers::without(
        &own,
        &[
            ("--procs", true),
            ("--worker", true),
            ("--cores", true),
            ("--out", true),
            ("--spawn-server", false),
            ("--server-flags", true),
            ("--server-bin", true),
            ("--server-pid", true),
            ("--server-timeout", true),
            ("--quiet", false),
            ("--io", true),
        ],
    );
    (0..args.procs)
        .map(|i| {
            let wdir = dir.join(format!("worker-{i}"));
            let mut a = kept.clone();
            a.extend([
                "--procs".to_string(),
                args.procs.to_string(),
                "--worker".into(),
                i.to_string(),
                "--cores".into(),
                c1m_io::host::workers::cpu_list(&c1m_io::host::workers::cpus_for(
                    i as usize,
                    args.procs as usize,
                    cpus,
                )),
                "--server-timeout".into(),
                format!("{}ms", server_timeout.as_millis()),
                "--quiet".into(),
                "--out".into(),
                wdir.display().to_string(),
                // The backend this parent found usable: a worker that falls
                // back does not say so again.
                "--io".into(),
                io.to_string(),
            ]);
            WorkerLaunch { args: a, dir: wdir }
        })
        .collect()
}

fn run(args: Args) -> Result<i32, String> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let default_server = ["127.0.0.1:9000".to_string()];
    let servers = ips::parse_servers(if args.server.is_empty() {
        &default_server
    } else {
        &args.server
    })?;
    let sources = match &args.ips {
        Some(s) => ips::parse_ips(s)?,
        None => Vec::new(),
    };
    if let Some(bad) = sources
        .iter()
        .find(|ip| servers.iter().any(|s| s.is_ipv4() != ip.is_ipv4()))
    {
        return Err(format!(
            "--ips {bad} and the --server addresses are not all of one family (IPv4 or IPv6)"
        ));
    }
    if !(0.0..=1.0).contains(&args.silent) {
        return Err(format!(
            "--silent {} is not a fraction between 0 and 1",
            args.silent
        ));
    }
    if args.conns == 0 || args.conns > device::MAX_DEVICES {
        return Err(format!(
            "--conns {} is not between 1 and {}",
            args.conns,
            device::MAX_DEVICES
        ));
    }
    if args.heartbeat < Duration::from_millis(10) {
        return Err("--heartbeat must be at least 10ms".into());
    }
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if args.tls_share_tickets && args.tls_no_resume {
        return Err("--tls-share-tickets and --tls-no-resume contradict: sharing tickets needs them kept; pick one".into());
    }
    if args.redial_on_close && args.ignore_close {
        return Err("--redial-on-close and --ignore-close contradict: a device either acts on the server's Close 1001 by reconnecting or ignores it; pick one".into());
    }
    let rate = match args.ramp {
        Some(r) if r.is_zero() => return Err("--ramp must be longer than 0s".into()),
        Some(r) => args.conns as f64 / r.as_secs_f64(),
        None if args.rate < 0.0 || !args.rate.is_finite() => {
            return Err(format!(
                "--rate {} must be 0 (unlimited) or more",
                args.rate
            ))
        }
        None => args.rate,
    };

    if args.procs == 0 || args.procs > args.conns {
        return Err(format!(
            "--procs {} must be between 1 and --conns",
            args.procs
        ));
    }
    if args.worker.is_some_and(|w| w >= args.procs) {
        return Err("--worker is set by a --procs parent, below --procs".into());
    }
    let nofile = raise_nofile();
    let cpus = args
        .cores
        .clone()
        .unwrap_or_else(c1m_io::host::allowed_cpus);
    let parent = args.procs > 1 && args.worker.is_none();
    if args.worker.is_none() {
        let per_proc = if parent {
            c1m_io::host::workers::cpus_for(0, args.procs as usize, &cpus).len()
        } else {
            cpus.len()
        };
        let host = c1m_io::host::limits::Host::read(nofile);
        limits::check(&host, args.conns, args.procs, per_proc, args.spawn_server)?;
        let in_flight = args.concurrency as u64 * cpus.len().max(args.procs as usize) as u64;
        let sockets = args.conns * if args.spawn_server { 2 } else { 1 };
        for w in limits::Queues::read().warnings(in_flight, sockets) {
            eprintln!("client: warning: {w}");
        }
    }
    ips::check_capacity(args.conns, sources.len(), &servers, ips::local_port_range())?;
    // Read before anything starts, so that a bad file is one error.
    let auth = match &args.auth_secret_file {
        Some(path) => Some(std::sync::Arc::new(c1m_proto::auth::Keys::load(path)?)),
        None => None,
    };
    // One config per process: its in-memory ticket store (a ticket per
    // device of this process, its share of --conns) is what lets a
    // reconnect resume.
    let tls = match (args.tls, &args.tls_ca) {
        (true, Some(ca)) => Some((
            {
                let devices = args.conns.div_ceil(args.procs.max(1)) as usize;
                c1m_io::tls::fleet_configs(
                    ca,
                    match (args.tls_no_resume, args.tls_share_tickets) {
                        (true, _) => c1m_io::tls::Resume::Off,
                        (false, true) => c1m_io::tls::Resume::Shared(devices),
                        (false, false) => c1m_io::tls::Resume::PerDevice(devices),
                    },
                )?
            },
            c1m_io::tls::server_name(&args.tls_server_name)?,
        )),
        (true, None) => {
            return Err(
                "--tls needs --tls-ca PEM: the CA (or the server's own certificate) to trust"
                    .into(),
            )
        }
        (false, Some(_)) => return Err("--tls-ca is for --tls: add --tls to speak wss://".into()),
        (false, None) => None,
    };
    let (io, fallback) = Backend::usable(args.io);
    if let Some(why) = fallback {
        eprintln!("client: {why}");
    }

    let flags: Vec<String> = args
        .server_flags
        .split_whitespace()
        .map(String::from)
        .collect();
    let server_timeout = match (args.server_timeout, spawn::timeout_in(&flags)) {
        (Some(t), _) => t,
        (None, Some(t)) if args.spawn_server => parse_duration(&t)?,
        _ => Duration::from_secs(90),
    };
    if args.spawn_server && servers.len() != 1 {
        return Err("--spawn-server starts one server: give one --server address".into());
    }

    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| output::default_dir(args.conns));
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create the results directory {}: {e}", dir.display()))?;
    std::fs::write(dir.join("command.txt"), format!("{command}\n"))
        .map_err(|e| format!("cannot write into {}: {e}", dir.display()))?;

    let spawned = if args.spawn_server {
        let bin = match &args.server_bin {
            Some(b) => b.clone(),
            None => spawn::default_binary()?,
        };
        let s = SpawnedServer::start(&bin, servers[0], &flags, &dir)?;
        eprintln!(
            "client: started {} (pid {}) on {}",
            bin.display(),
            s.pid(),
            servers[0]
        );
        Some(s)
    } else {
        None
    };
    let server_pid = spawned.as_ref().map(SpawnedServer::pid).or(args.server_pid);

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let run_tag = (now as u64 ^ u64::from(std::process::id()).rotate_left(17)) as u16;
    // A worker takes its share of the devices and of the rate; a parent
    // plans for all of them, spread over its workers.
    let (first_device, devices) = match args.worker {
        Some(w) => limits::share(args.conns, args.procs, w),
        None => (0, args.conns),
    };
    let units = if parent {
        args.procs as usize
    } else {
        cpus.len()
    };
    let rate = rate * devices as f64 / args.conns as f64;
    let plan = Plan {
        servers: servers.clone(),
        sources: sources.clone(),
        first_device,
        devices,
        cores: units,
        rate_per_core: rate / units as f64,
        concurrency: args.concurrency,
        heartbeat: args.heartbeat,
        kind: args.heartbeat_kind,
        udp_heartbeat: args.udp_heartbeat,
        udp_heartbeat_every: args.udp_heartbeat_every,
        udp_to: args.udp_to,
        silent: args.silent,
        server_timeout,
        hold: args.hold,
        expiry_window: args.expiry_window,
        connect_timeout: args.connect_timeout,
        go_silent: args.go_silent,
        ignore_close: args.ignore_close,
        silent_after: args.silent_after,
        reconnect: args.reconnect_fraction.clamp(0.0, 1.0),
        reconnect_storm: args.reconnect_storm,
        redial_on_close: args.redial_on_close,
        backoff_base: args.backoff_base,
        backoff_cap: args.backoff_cap.max(args.backoff_base),
        id_prefix: args.id_prefix.clone(),
        run_tag,
        origin: Instant::now(),
        io,
        auth: auth.clone(),
        tls: tls.clone(),
    };
    let sockstat_before = host::sockstat();
    let workers = if parent {
        worker_launches(&args, &dir, &cpus, server_timeout, io)
    } else {
        Vec::new()
    };
    let outcome = run::run(Options {
        plan,
        cpus: cpus.clone(),
        workers,
        report_lines: args.worker.is_some(),
        server_pid,
        progress: !args.quiet,
    });
    let sockstat_end = host::sockstat();
    let server = spawned.map(|s| s.stop(Duration::from_secs(15)));
    let outcome = outcome?;

    let config = json!({
        "servers": servers.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "ips": sources.iter().map(IpAddr::to_string).collect::<Vec<_>>(),
        "conns": args.conns,
        "rate": rate,
        "ramp_s": args.ramp.map(|r| r.as_secs_f64()),
        "concurrency_per_core": args.concurrency,
        "cores": cpus,
        "heartbeat_s": args.heartbeat.as_secs_f64(),
        "heartbeat_kind": format!("{:?}", args.heartbeat_kind).to_lowercase(),
        "silent": args.silent,
        "server_timeout_s": server_timeout.as_secs_f64(),
        "hold_s": args.hold.as_secs_f64(),
        "expiry_window_s": args.expiry_window.as_secs_f64(),
        "connect_timeout_s": args.connect_timeout.as_secs_f64(),
        "go_silent": args.go_silent,
        "ignore_close": args.ignore_close,
        "redial_on_close": args.redial_on_close,
        "reconnect_storm_s": args.reconnect_storm.map(|d| d.as_secs_f64()),
        "backoff_base_s": args.backoff_base.as_secs_f64(),
        "backoff_cap_s": args.backoff_cap.as_secs_f64(),
        "silent_after_s": args.silent_after.map(|d| d.as_secs_f64()),
        "procs": args.procs,
        "worker": args.worker,
        "io": io.to_string(),
        // Whether devices signed tokens; never the secret or a token.
        "auth": auth.is_some(),
        "first_device": first_device,
        "devices": devices,
        "id_prefix": args.id_prefix,
        "run_tag": format!("{run_tag:04x}"),
        "spawn_server": args.spawn_server,
        "server_flags": flags,
        "local_port_range": ips::local_port_range(),
    });
    let mut doc = serde_json::Map::new();
    doc.insert("command".into(), json!(command));
    doc.insert("config".into(), config);
    doc.insert("machine".into(), host::facts(nofile));
    doc.insert(
        "kernel_tcp".into(),
        json!({"sockets_before": sockstat_before.0, "mem_pages_before": sockstat_before.1,
               "sockets_at_end": sockstat_end.0, "mem_pages_at_end": sockstat_end.1}),
    );
    if let Some((status, last)) = &server {
        doc.insert("server".into(), json!({"exit": status, "final": last}));
    }
    let (figures, md) =
        output::write(&dir, &outcome, doc, &command, devices, server_pid.is_some())?;
    if args.worker.is_some() {
        // The parent reads this line, then the histograms in `dir`.
        let ramp = outcome.ramp_s.map(|s| format!("ramp_us={:.0} ", s * 1e6));
        println!(
            "c1m-done {}{}",
            ramp.unwrap_or_default(),
            outcome.counters.to_words()
        );
        return Ok(0);
    }
    println!("{md}");
    if let Some((status, last)) = &server {
        println!(
            "Spawned server: {status}; {}",
            last.as_deref().unwrap_or("no final line")
        );
    }
    println!("results: {}", dir.display());
    let faults = summary::faults(&figures);
    for f in &faults {
        eprintln!("client: {f}");
    }
    Ok(if faults.is_empty() && outcome.errors.is_empty() {
        0
    } else {
        2
    })
}
