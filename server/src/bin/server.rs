//! `server`: one pinned glommio executor (shard) per core, each with its own
//! SO_REUSEPORT listener, slab of connections and timing wheel.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use c1m::config::{parse_cidr, Cidr};
use c1m::shard::{self, ShardConfig};
use c1m::stats::{self, Counters, Snapshot};
use c1m_io::host::limits::Host;
use c1m_io::host::{allowed_cpus, parse_bytes, parse_cpus, parse_duration, raise_nofile};
use c1m_io::Backend;
use c1m_proto::auth::Keys;
use c1m_proto::conn::Limits;
use glommio::{LocalExecutorBuilder, Placement};

/// A WebSocket server for IoT fleets: devices connect to /ws?id=<device-id>,
/// any frame they send is a heartbeat (pings are answered with pongs), and
/// devices silent for longer than --timeout are deleted.
///
/// Expired devices are reset (SO_LINGER 0) by default: a device that stopped
/// heartbeating is presumed dead or unreachable, so a graceful FIN would only
/// leave an orphaned socket retransmitting to nobody; a reset frees the
/// kernel's memory at once. Use --graceful-expiry to send Close 1001 instead.
#[derive(argh::FromArgs)]
struct Args {
    /// address to listen on (default 127.0.0.1:9000)
    #[argh(option, default = "\"127.0.0.1:9000\".parse().unwrap()")]
    listen: SocketAddr,
    /// CPUs to run one shard each on, e.g. 0-1 or 0,2 (default: all this process may use)
    #[argh(option, from_str_fn(parse_cpus))]
    cores: Option<Vec<usize>>,
    /// silence after which a device is deleted (default 90s)
    #[argh(
        option,
        default = "Duration::from_secs(90)",
        from_str_fn(parse_duration)
    )]
    timeout: Duration,
    /// timing wheel resolution: devices are deleted within timeout + tick of their last frame (default 1s)
    #[argh(
        option,
        default = "Duration::from_secs(1)",
        from_str_fn(parse_duration)
    )]
    tick: Duration,
    /// upgraded connections per shard; more are answered 503 (default: what
    /// RLIMIT_NOFILE, fs.file-max and memory allow, shared by the shards)
    #[argh(option)]
    max_conns: Option<usize>,
    /// largest frame or message, e.g. 64KiB; larger closes with 1009 (default 64KiB)
    #[argh(option, default = "64 * 1024", from_str_fn(parse_bytes))]
    max_message: usize,
    /// largest upgrade request head; larger is answered 431 (default 8KiB)
    #[argh(option, default = "8 * 1024", from_str_fn(parse_bytes))]
    max_head: usize,
    /// time a connection has to complete its upgrade (default 10s)
    #[argh(
        option,
        default = "Duration::from_secs(10)",
        from_str_fn(parse_duration)
    )]
    handshake_timeout: Duration,
    /// time an upgraded device has to finish a frame it began (default 10s)
    #[argh(
        option,
        default = "Duration::from_secs(10)",
        from_str_fn(parse_duration)
    )]
    frame_timeout: Duration,
    /// listen backlog per shard (default: net.core.somaxconn)
    #[argh(option)]
    backlog: Option<i32>,
    /// echo data messages back (for conformance suites)
    #[argh(switch)]
    echo: bool,
    /// send Close 1001 to expired devices instead of resetting the connection
    #[argh(switch)]
    graceful_expiry: bool,
    /// interval of the stats line on stdout; 0 turns it off (default 1s)
    #[argh(
        option,
        default = "Duration::from_secs(1)",
        from_str_fn(parse_duration)
    )]
    stats_interval: Duration,
    /// join servers already listening on --listen (one SO_REUSEPORT group,
    /// e.g. one server per NUMA node on one port); without it a taken address
    /// is an error, so a second server cannot silently take half the traffic
    #[argh(switch)]
    join: bool,
    /// on SIGINT/SIGTERM, how long to wait for devices to answer Close 1001 (default 5s)
    #[argh(
        option,
        default = "Duration::from_secs(5)",
        from_str_fn(parse_duration)
    )]
    drain_timeout: Duration,
    /// on SIGINT/SIGTERM, close devices at this pace, devices per second
    /// over the whole server (Close 1001 "draining: reconnect"), so that a
    /// rolling restart does not send the fleet back all at once; the drain
    /// then lasts devices / rate, plus --drain-timeout (default 0: all at once)
    #[argh(option, default = "0")]
    drain_rate: u32,
    /// on SIGINT/SIGTERM, first answer 503 on /healthz (--admin) for this
    /// long while still serving, so that a front stops sending new devices
    /// here before the drain begins (default 0s)
    #[argh(option, default = "Duration::ZERO", from_str_fn(parse_duration))]
    drain_health_delay: Duration,
    /// admission control: new connections per second over the whole
    /// server (all shards and --procs workers, each shard its share, a
    /// tenth of a second's worth at once); the excess is answered as
    /// --upgrade-excess says, before any work is done for it (default 0:
    /// no budget)
    #[argh(option, default = "0")]
    max_upgrades_per_sec: u32,
    /// what connections over --max-upgrades-per-sec get: defer (the shard
    /// stops accepting until its budget refills: they wait in the accept
    /// queue; faster back and cheaper than 503 in bench/reconnect-storm.sh)
    /// or 503 (answered 503 with Retry-After at once; a reset on a TLS
    /// port) (default defer)
    #[argh(option, default = "c1m::admission::Excess::Defer")]
    upgrade_excess: c1m::admission::Excess,
    /// run this many worker processes, each with its share of --cores and
    /// of the connections, in one SO_REUSEPORT group; for hosts where
    /// RLIMIT_NOFILE cannot be raised (default 1: no workers)
    #[argh(option, default = "1")]
    procs: usize,
    /// with --procs, also print each worker's stats lines (prefixed)
    #[argh(switch)]
    worker_stats: bool,
    /// steer each new connection to the shard on the CPU that received it
    /// (SO_ATTACH_REUSEPORT_CBPF); needs --cores 0..N-1 in order, one
    /// process, and devices whose traffic arrives spread over those CPUs
    #[argh(switch)]
    reuseport_cpu: bool,
    /// the I/O backend, epoll or uring (each shard's own io_uring); epoll
    /// by default because it held 1M devices in less memory and connected
    /// them faster here (README, Benchmarks); where io_uring is unusable
    /// the server says why and runs on epoll (default epoll)
    #[argh(option, default = "Backend::Epoll")]
    io: Backend,
    /// require device tokens (401 without a good one), signed with the
    /// secrets in this file: one per line, the first current, a second
    /// still accepted while rotating (default: no auth); `c1m token`
    /// mints tokens
    #[argh(option)]
    auth_secret_file: Option<PathBuf>,
    /// serve GET /metrics (Prometheus) and /healthz over HTTP on this
    /// address, e.g. 127.0.0.1:9100; never the device port; an address
    /// other than loopback needs --admin-token-file (default: off)
    #[argh(option)]
    admin: Option<SocketAddr>,
    /// every --admin request but /healthz needs `Authorization: Bearer
    /// <token>` with the token on this file's first line (16 bytes or
    /// more), else 401 (default: none, and then --admin must be loopback)
    #[argh(option)]
    admin_token_file: Option<PathBuf>,
    /// a name the --admin port may be reached by (its Host header), besides
    /// its address, e.g. the host name Prometheus scrapes; repeatable
    /// (default: addresses only, and localhost on loopback)
    #[argh(option)]
    admin_host: Vec<String>,
    /// expect a PROXY protocol header (v1 or v2) first on every device
    /// connection, as a front sends with nginx `proxy_protocol on;` or
    /// HAProxy `send-proxy`/`send-proxy-v2`; its source address becomes the
    /// device's (lookup, logs); a connection without a valid one within
    /// --handshake-timeout is closed, counted proxy_bad or proxy_missing
    /// (default: off; turn it on only behind such a front)
    #[argh(switch)]
    proxy_protocol: bool,
    /// believe the upgrade's X-Forwarded-For (its rightmost address) when
    /// the connection comes from this network, e.g. 127.0.0.1/32 for an
    /// nginx http front on the same host; repeatable (default: never)
    #[argh(option, from_str_fn(parse_cidr))]
    trust_forwarded_from: Vec<Cidr>,
    /// publish device lifecycle events and take pushes through the NATS
    /// server at this URL, e.g. nats://127.0.0.1:4222; pushes also need
    /// JetStream there (nats-server -js) for presence (default: off)
    #[argh(option)]
    nats: Option<String>,
    /// NATS credentials file (.creds: JWT and nkey seed)
    #[argh(option)]
    nats_creds: Option<PathBuf>,
    /// file with the NATS user on its first line and password on its second
    #[argh(option)]
    nats_user_file: Option<PathBuf>,
    /// file with a NATS token on its first line
    #[argh(option)]
    nats_token_file: Option<PathBuf>,
    /// subject prefix: events on <prefix>.events.connected|disconnected|snapshot,
    /// pushes on <prefix>.push.<device id> (default c1m)
    #[argh(option, default = "\"c1m\".into()")]
    nats_prefix: String,
    /// lifecycle events held for the publisher at most; past it they are
    /// dropped and counted as events_dropped, the shards never wait (default 16384)
    #[argh(option, default = "16384")]
    nats_queue: usize,
    /// this server's id in events and presence, [0-9A-Za-z:_-] (default <hostname>:<port>)
    #[argh(option)]
    server_id: Option<String>,
    /// with --nats: one connection per id across all servers on the
    /// broker; a device held here that connects to another server is
    /// closed here with 4000 "replaced" (each server reads every connect
    /// event of the fleet)
    #[argh(switch)]
    nats_exclusive: bool,
    /// speak TLS (wss://) on --listen with the certificate chain in this
    /// PEM file (leaf first); needs --tls-key. TLS 1.3 and 1.2, ALPN
    /// http/1.1, resumption by session tickets (default: plaintext ws://)
    #[argh(option)]
    tls_cert: Option<PathBuf>,
    /// the private key of --tls-cert, PEM (PKCS#8, PKCS#1 or SEC1)
    #[argh(option)]
    tls_key: Option<PathBuf>,
    /// also take heartbeats as UDP datagrams on the --listen port: each 101
    /// carries a C1M-Heartbeat-Ticket header, and a datagram holding that
    /// ticket (decoded) refreshes the connection as a frame does; the
    /// kernel steers each datagram to the shard holding its connection
    /// (README, UDP heartbeats) (default: off)
    #[argh(switch)]
    udp_heartbeat: bool,
}

fn main() -> ExitCode {
    match run(argh::from_env()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn nats_auth(
    creds: Option<PathBuf>,
    user_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
) -> c1m::events::publisher::Auth {
    c1m::events::publisher::Auth {
        creds,
        user_file,
        token_file,
    }
}

fn run(args: Args) -> Result<(), String> {
    let cores = args.cores.clone().unwrap_or_else(allowed_cpus);
    if args.procs == 0 {
        return Err("--procs must be at least 1".into());
    }
    if let Some(admin) = args.admin.filter(|&a| c1m::admin::clashes(a, args.listen)) {
        return Err(format!(
            "--admin {admin} is the device port (--listen {}): give the admin listener an address of its own",
            args.listen
        ));
    }
    // Loaded and checked before any worker starts: the token stays in this
    // process (the --procs parent serves the admin port), and an open
    // admin port on a reachable address is refused.
    let admin_access = c1m::admin::Access {
        token: match &args.admin_token_file {
            Some(path) => Some(c1m::admin::Token::load(path)?),
            None => None,
        },
        hosts: args.admin_host.clone(),
    };
    if let Some(admin) = args.admin {
        admin_access.check_bind(admin)?;
    }
    // A push to a device of another --procs worker crosses the link in one
    // frame: the largest message must fit in one.
    if args.max_message > c1m::directory::wire::MAX_MESSAGE {
        return Err(format!(
            "--max-message {} bytes is over {} bytes ({}MiB), the most one push can carry between --procs workers (a link frame holds {}MiB)",
            args.max_message,
            c1m::directory::wire::MAX_MESSAGE,
            c1m::directory::wire::MAX_MESSAGE >> 20,
            c1m::directory::wire::MAX_FRAME >> 20
        ));
    }
    // The wheel and the heartbeat-interval histogram count whole
    // milliseconds per tick.
    if args.tick < Duration::from_millis(1) {
        return Err(format!(
            "--tick {:?} is under 1ms, the finest the wheel and the heartbeat-interval histogram count in",
            args.tick
        ));
    }
    // Loaded here, before any worker starts, so that a bad file is one
    // error; --procs workers get the path (they re-run these arguments),
    // never the secret.
    let auth = match &args.auth_secret_file {
        Some(path) => Some(Arc::new(Keys::load(path)?)),
        None => None,
    };
    // Loaded here too, so that a bad certificate or key is one error
    // before any worker starts; --procs workers re-read the same paths.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(c1m_io::tls::server_config(cert, key)?),
        (None, None) => None,
        (Some(_), None) => {
            return Err("--tls-cert needs --tls-key (the certificate's private key, PEM)".into())
        }
        (None, Some(_)) => {
            return Err("--tls-key needs --tls-cert (the certificate chain, PEM)".into())
        }
    };
    if args.nats_exclusive && args.nats.is_none() {
        return Err("--nats-exclusive needs --nats URL (the broker the servers share)".into());
    }
    if args.procs > 1 {
        // The shared registry holds what every worker can: each sizes its
        // shards as below, from the same limits.
        let host = Host::read(raise_nofile());
        let workers: u64 = (0..args.procs)
            .map(|i| {
                let shards = c1m_io::host::workers::cpus_for(i, args.procs, &cores).len();
                (shards * host.per_shard(shards, args.max_conns)) as u64
            })
            .sum();
        let registry_capacity = workers.min(host.machine_capacity()).max(1) as usize;
        let signals = block_signals();
        return c1m::procs::supervisor::Supervisor {
            procs: args.procs,
            cpus: cores,
            listen: args.listen,
            join: args.join,
            args: std::env::args().skip(1).collect(),
            stats_interval: args.stats_interval,
            worker_stats: args.worker_stats,
            admin: args.admin,
            admin_access,
            max_message: args.max_message,
            registry_capacity,
            udp_heartbeat: args.udp_heartbeat,
            drain_health_delay: args.drain_health_delay,
        }
        .run(|wait| wait_signal(&signals, wait));
    }
    let print_stats = !args.stats_interval.is_zero();
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
    };
    cfg.validate()?;

    if let Some(said) = host.advice((cores.len() as u64).saturating_mul(max_conns as u64)) {
        eprintln!("server: --max-conns asks for more than fits: {said}");
    }
    let backlog = args
        .backlog
        .or_else(c1m_io::listener::somaxconn)
        .unwrap_or(4096);
    // What does not stop the server but shapes it: a listen queue shorter
    // than the backlog asked for, TCP buffer memory short of the sockets.
    let sockets = (cores.len() as u64).saturating_mul(max_conns as u64);
    let queues = c1m_io::host::limits::Queues::read();
    let said = [
        queues.backlog_warning(backlog.max(0) as u64),
        queues.memory_warning(sockets),
    ];
    for w in said.into_iter().flatten() {
        eprintln!("server: warning: {w}");
    }

    let (backend, fallback) = Backend::usable(args.io);
    if let Some(why) = fallback {
        eprintln!("server: {why}");
    }

    // Bind every listener before starting any shard, so a taken port is one
    // clear error rather than a half-started server.
    if !args.join {
        c1m_io::listener::ensure_free(args.listen).map_err(|e| {
            format!(
                "cannot listen on {}: {e}; is another server running there? (--join shares the port with it on purpose)",
                args.listen
            )
        })?;
    }
    let mut listeners = Vec::new();
    for _ in &cores {
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
            Some(s) => s,
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
        let mut random = [0u8; 16];
        c1m_io::host::random_bytes(&mut random)
            .map_err(|e| format!("--udp-heartbeat: cannot draw a random ticket key: {e}"))?;
        let key = c1m_proto::ticket::Key::from_bytes(random);
        Some(shard::UdpHeartbeat {
            key,
            sockets: Arc::new(sockets),
        })
    } else {
        None
    };

    if args.reuseport_cpu {
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
    let signals = block_signals();

    // Bound before any shard starts, like the listeners: a taken admin
    // port is one clear error. It sees only what this thread publishes.
    // Each shard's inbox, its ends to every shard (the device registry's
    // messages), and the ends this thread keeps to stop them (and the admin
    // thread to ask about devices).
    // A --procs worker's shards are numbered over the whole server, and
    // reach the other workers' through the link to the parent.
    let link = c1m::directory::link::from_env()?;
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
    let mut cfg = cfg;
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
    let admin = match args.admin {
        Some(addr) => Some(c1m::admin::Admin::start(
            addr,
            "shard",
            Some(c1m::admin::Devices {
                route: c1m::admin::Route::Local(outside.clone()),
                max_message: args.max_message,
            }),
            admin_access,
        )?),
        None => None,
    };

    let (report_tx, report_rx) = mpsc::channel::<Snapshot>();
    // A shard that ends before it was told to stop (its driver failed, or
    // it panicked outside the parser's containment) says so here: the
    // process then ends whole, never serving on N-1 shards with the ids
    // that shard owned lost from the registry.
    let (died_tx, died_rx) = mpsc::channel::<String>();
    let mut handles = Vec::new();
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
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    shard::run(backend, id, cfg, listener, mail, tx)
                }));
                let cause = match result {
                    Ok(Ok(totals)) => return Ok(totals),
                    Ok(Err(e)) => format!("its I/O loop failed: {e}"),
                    Err(panic) => format!("it panicked: {}", panic_message(&*panic)),
                };
                let msg = format!("shard {id} on CPU {cpu} stopped: {cause}");
                let _ = died.send(msg.clone());
                Err(msg)
            })
            .map_err(|e| format!("cannot start a shard on CPU {cpu}: {e}; check --cores against the CPUs this process may use"))?;
        handles.push(handle);
    }
    drop(report_tx);
    drop(died_tx);
    eprintln!(
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

    let start = Instant::now();
    let mut latest = vec![Snapshot::default(); cores.len()];
    let mut prev = Counters::default();
    let mut prev_at = start;
    let mut next_print = start + args.stats_interval;
    let mut stopping = false;
    // When the shards are told to drain: at the signal, or after
    // --drain-health-delay (while /healthz says 503).
    let mut drain_at: Option<Instant> = None;
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
                eprintln!("server: {why}; ending the whole process (exit 1) so that it is restarted whole (the --procs parent or systemd does it)");
                died = Some((
                    why,
                    Instant::now() + args.drain_timeout + Duration::from_secs(2),
                ));
                if !stopping {
                    stopping = true;
                    for shard in &outside {
                        shard.send_now(c1m::directory::mailbox::Mail::Shutdown);
                    }
                    if let Some(a) = &admin {
                        a.stopping();
                    }
                }
            }
        }
        if drain_at.is_some_and(|t| Instant::now() >= t) {
            drain_at = None;
            for shard in &outside {
                shard.send_now(c1m::directory::mailbox::Mail::Shutdown);
            }
        }
        if let Some((_, by)) = &died {
            if Instant::now() >= *by {
                // A shard that does not drain in time is not waited for.
                std::process::exit(1);
            }
        }
        // Wait for a signal, at most until the next stats line.
        let until_print = if print_stats {
            next_print.saturating_duration_since(Instant::now())
        } else {
            Duration::MAX
        };
        let wait = until_print.min(Duration::from_millis(200));
        if !stopping && wait_signal(&signals, wait) {
            stopping = true;
            if let Some(a) = &admin {
                a.stopping();
            }
            let pace = match args.drain_rate {
                0 => "to every device".to_string(),
                r => format!("at {r} devices/s"),
            };
            if !args.drain_health_delay.is_zero() {
                eprintln!("server: stopping: /healthz says 503 for {:?} while serving, then Close 1001 {pace} (then up to {:?} for answers)", args.drain_health_delay, args.drain_timeout);
                drain_at = Some(Instant::now() + args.drain_health_delay);
            } else {
                eprintln!("server: stopping: no new connections, sending Close 1001 {pace} (then up to {:?} for answers)", args.drain_timeout);
                drain_at = Some(Instant::now());
            }
        } else if stopping {
            std::thread::sleep(wait);
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
        if let Some(a) = admin.as_ref().filter(|_| fresh) {
            let mut sum = Counters::default();
            latest.iter().for_each(|s| sum.add(&s.totals));
            a.publish(&latest, &sum);
        }
        if fresh {
            live.store(
                latest.iter().map(|s| s.open).sum(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let now = Instant::now();
        if print_stats && now >= next_print {
            let mut sum = Counters::default();
            latest.iter().for_each(|s| sum.add(&s.totals));
            let secs = now.duration_since(prev_at).as_secs_f64();
            println!(
                "{}{}",
                stats::line(
                    now.duration_since(start).as_secs_f64(),
                    &latest,
                    &prev,
                    &sum,
                    secs
                ),
                publisher.as_ref().map(nats_stats).unwrap_or_default()
            );
            prev = sum;
            prev_at = now;
            next_print = now + args.stats_interval;
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
    if died.is_some() {
        // Already said in one sentence; the exit status says the rest.
        failed.clear();
    }
    let mut sum = Counters::default();
    latest.iter().for_each(|s| sum.add(&s.totals));
    // The shards have ended (their last events are queued): publish the
    // rest, for at most a couple of seconds.
    let nats_line = publisher.map(|p| {
        let stats = p.stats.clone();
        p.stop();
        nats_counts(&stats)
    });
    println!(
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
        auth: nats_auth(
            args.nats_creds.clone(),
            args.nats_user_file.clone(),
            args.nats_token_file.clone(),
        ),
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
    eprintln!(
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

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set, then masking this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `wait` for SIGINT or SIGTERM; true if one came.
fn wait_signal(set: &libc::sigset_t, wait: Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: set and ts are valid for the call.
    unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) > 0 }
}
