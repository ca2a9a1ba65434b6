//! The command line: the flags, and what is checked (and loaded) from
//! them before anything starts, in the single process or the `--procs`
//! parent alike.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use c1m::config::{parse_cidr, Cidr};
use c1m_io::host::sched::Sched;
use c1m_io::host::{allowed_cpus, parse_bytes, parse_cpus, parse_duration};
use c1m_io::Backend;
use c1m_proto::auth::Keys;

/// A WebSocket server for IoT fleets: devices connect to /ws?id=<device-id>,
/// any frame they send is a heartbeat (pings are answered with pongs), and
/// devices silent for longer than --timeout are deleted.
///
/// Expired devices are reset (SO_LINGER 0) by default: a device that stopped
/// heartbeating is presumed dead or unreachable, so a graceful FIN would only
/// leave an orphaned socket retransmitting to nobody; a reset frees the
/// kernel's memory at once. Use --graceful-expiry to send Close 1001 instead.
#[derive(argh::FromArgs)]
pub struct Args {
    /// address to listen on (default 127.0.0.1:9000)
    #[argh(option, default = "\"127.0.0.1:9000\".parse().unwrap()")]
    pub listen: SocketAddr,
    /// CPUs to run one shard each on, e.g. 0-1 or 0,2 (default: all this process may use)
    #[argh(option, from_str_fn(parse_cpus))]
    pub cores: Option<Vec<usize>>,
    /// silence after which a device is deleted (default 90s)
    #[argh(
        option,
        default = "Duration::from_secs(90)",
        from_str_fn(parse_duration)
    )]
    pub timeout: Duration,
    /// timing wheel resolution: devices are deleted within timeout + tick of their last frame (default 1s)
    #[argh(
        option,
        default = "Duration::from_secs(1)",
        from_str_fn(parse_duration)
    )]
    pub tick: Duration,
    /// upgraded connections per shard; more are answered 503 (default: what
    /// RLIMIT_NOFILE, fs.file-max and memory allow, shared by the shards)
    #[argh(option)]
    pub max_conns: Option<usize>,
    /// largest frame or message, e.g. 64KiB; larger closes with 1009 (default 64KiB)
    #[argh(option, default = "64 * 1024", from_str_fn(parse_bytes))]
    pub max_message: usize,
    /// largest upgrade request head; larger is answered 431 (default 8KiB)
    #[argh(option, default = "8 * 1024", from_str_fn(parse_bytes))]
    pub max_head: usize,
    /// time a connection has to complete its upgrade (default 10s)
    #[argh(
        option,
        default = "Duration::from_secs(10)",
        from_str_fn(parse_duration)
    )]
    pub handshake_timeout: Duration,
    /// time an upgraded device has to finish a frame it began (default 10s)
    #[argh(
        option,
        default = "Duration::from_secs(10)",
        from_str_fn(parse_duration)
    )]
    pub frame_timeout: Duration,
    /// connections in their handshake (accepted, not yet upgraded) over the
    /// whole server, each shard its share: past it a shard stops accepting
    /// until half of its share is done, and new devices wait in the listen
    /// queue (and past it the kernel drops their SYNs) instead of the
    /// server holding sockets their devices cannot yet serve; a slow or
    /// silent handshake holds its place at most --handshake-timeout; 0: no
    /// bound (default 16384)
    #[argh(option, default = "16384")]
    pub max_handshakes: u32,
    /// io_uring: once a completion has come, gather more for up to this long
    /// before handling them (the kernel's min-wait, Linux 6.12+): fewer
    /// wake-ups per heartbeat when many worker processes share few cores,
    /// at the price of up to this much latency; 0 turns it off (default 0s)
    #[argh(option, default = "Duration::ZERO", from_str_fn(parse_duration))]
    pub io_batch_wait: Duration,
    /// the shard threads' scheduling policy: batch (SCHED_BATCH: a shard
    /// woken by a completion does not preempt what runs on its core, and
    /// finds many completions when it runs; docs/benchmarks.md measures
    /// it) or normal (SCHED_OTHER) (default batch)
    #[argh(option, default = "Sched::Batch")]
    pub sched: Sched,
    /// listen backlog per shard (default: each shard's share of 16,384 over
    /// the whole server, all --procs workers included, at least 128 and at
    /// most net.core.somaxconn: about a second of upgrades here, so that a
    /// reconnect storm never queues connections past their devices' patience)
    #[argh(option)]
    pub backlog: Option<i32>,
    /// echo data messages back (for conformance suites)
    #[argh(switch)]
    pub echo: bool,
    /// send Close 1001 to expired devices instead of resetting the connection
    #[argh(switch)]
    pub graceful_expiry: bool,
    /// interval of the stats line on stdout; 0 turns it off (default 1s)
    #[argh(
        option,
        default = "Duration::from_secs(1)",
        from_str_fn(parse_duration)
    )]
    pub stats_interval: Duration,
    /// join servers already listening on --listen (one SO_REUSEPORT group,
    /// e.g. one server per NUMA node on one port); without it a taken address
    /// is an error, so a second server cannot silently take half the traffic
    #[argh(switch)]
    pub join: bool,
    /// on SIGINT/SIGTERM, how long to wait for devices to answer Close 1001 (default 5s)
    #[argh(
        option,
        default = "Duration::from_secs(5)",
        from_str_fn(parse_duration)
    )]
    pub drain_timeout: Duration,
    /// a hot upgrade closes its TLS devices (their TLS state does not
    /// move) with Close 1001 "draining: reconnect" spread over this window,
    /// so that they do not all reconnect to the new process at once; the
    /// old process lives that much longer (at most 60s; 0s: all at once;
    /// default 10s)
    #[argh(
        option,
        default = "Duration::from_secs(10)",
        from_str_fn(parse_duration)
    )]
    pub upgrade_tls_window: Duration,
    /// on SIGINT/SIGTERM, close devices at this pace, devices per second
    /// over the whole server (Close 1001 "draining: reconnect"), so that a
    /// rolling restart does not send the fleet back all at once; the drain
    /// then lasts devices / rate, plus --drain-timeout (default 0: all at once)
    #[argh(option, default = "0")]
    pub drain_rate: u32,
    /// on SIGINT/SIGTERM, first answer 503 on /healthz (--admin) for this
    /// long while still serving, so that a front stops sending new devices
    /// here before the drain begins (default 0s)
    #[argh(option, default = "Duration::ZERO", from_str_fn(parse_duration))]
    pub drain_health_delay: Duration,
    /// admission control: new connections per second over the whole
    /// server (all shards and --procs workers, each shard its share, a
    /// tenth of a second's worth at once); the excess is answered as
    /// --upgrade-excess says, before any work is done for it (default 0:
    /// no budget)
    #[argh(option, default = "0")]
    pub max_upgrades_per_sec: u32,
    /// what connections over --max-upgrades-per-sec get: defer (the shard
    /// stops accepting until its budget refills: they wait in the accept
    /// queue; faster back and cheaper than 503 in bench/reconnect-storm.sh)
    /// or 503 (answered 503 with Retry-After at once; a reset on a TLS
    /// port) (default defer)
    #[argh(option, default = "c1m::admission::Excess::Defer")]
    pub upgrade_excess: c1m::admission::Excess,
    /// run this many worker processes, each with its share of --cores and
    /// of the connections, in one SO_REUSEPORT group; for hosts where
    /// RLIMIT_NOFILE cannot be raised (default 1: no workers)
    #[argh(option, default = "1")]
    pub procs: usize,
    /// with --procs, how many workers a hot upgrade hands over to new
    /// processes at once; the rest serve untouched meanwhile, and at most
    /// this many workers' connections are doubled in memory (default 4:
    /// a worker's handover is mostly waiting, so 4 at once took a third of
    /// one at a time's wall time; 8 was no faster)
    #[argh(option, default = "4")]
    pub upgrade_parallel: usize,
    /// with --procs, also print each worker's stats lines (prefixed)
    #[argh(switch)]
    pub worker_stats: bool,
    /// steer each new connection to the shard on the CPU that received it
    /// (SO_ATTACH_REUSEPORT_CBPF); needs --cores 0..N-1 in order, one
    /// process, and devices whose traffic arrives spread over those CPUs
    #[argh(switch)]
    pub reuseport_cpu: bool,
    /// the I/O backend, uring (each shard's own io_uring) or epoll; uring
    /// by default: at 15,000 and at 1M here it costs less CPU per heartbeat
    /// and deletes a storm faster, for 1.4% more memory per connection
    /// (docs/benchmarks.md); where io_uring is unusable the server says
    /// why and runs on epoll (default uring)
    #[argh(option, default = "Backend::Uring")]
    pub io: Backend,
    /// require device tokens (401 without a good one), signed with the
    /// secrets in this file: one per line, the first current, a second
    /// still accepted while rotating (default: no auth); `c1m token`
    /// mints tokens
    #[argh(option)]
    pub auth_secret_file: Option<PathBuf>,
    /// serve GET /metrics (Prometheus) and /healthz over HTTP on this
    /// address, e.g. 127.0.0.1:9100; never the device port; an address
    /// other than loopback needs --admin-token-file (default: off)
    #[argh(option)]
    pub admin: Option<SocketAddr>,
    /// every --admin request but /healthz needs `Authorization: Bearer
    /// <token>` with the token on this file's first line (16 bytes or
    /// more), else 401 (default: none, and then --admin must be loopback)
    #[argh(option)]
    pub admin_token_file: Option<PathBuf>,
    /// a name the --admin port may be reached by (its Host header), besides
    /// its address, e.g. the host name Prometheus scrapes; repeatable
    /// (default: addresses only, and localhost on loopback)
    #[argh(option)]
    pub admin_host: Vec<String>,
    /// expect a PROXY protocol header (v1 or v2) first on every device
    /// connection, as a front sends with nginx `proxy_protocol on;` or
    /// HAProxy `send-proxy`/`send-proxy-v2`; its source address becomes the
    /// device's (lookup, logs); a connection without a valid one within
    /// --handshake-timeout is closed, counted proxy_bad or proxy_missing
    /// (default: off; turn it on only behind such a front)
    #[argh(switch)]
    pub proxy_protocol: bool,
    /// believe the upgrade's X-Forwarded-For (its rightmost address) when
    /// the connection comes from this network, e.g. 127.0.0.1/32 for an
    /// nginx http front on the same host; repeatable (default: never)
    #[argh(option, from_str_fn(parse_cidr))]
    pub trust_forwarded_from: Vec<Cidr>,
    /// publish device lifecycle events and take pushes through the NATS
    /// server at this URL, e.g. nats://127.0.0.1:4222; pushes also need
    /// JetStream there (nats-server -js) for presence (default: off)
    #[argh(option)]
    pub nats: Option<String>,
    /// NATS credentials file (.creds: JWT and nkey seed)
    #[argh(option)]
    pub nats_creds: Option<PathBuf>,
    /// file with the NATS user on its first line and password on its second
    #[argh(option)]
    pub nats_user_file: Option<PathBuf>,
    /// file with a NATS token on its first line
    #[argh(option)]
    pub nats_token_file: Option<PathBuf>,
    /// subject prefix: events on <prefix>.events.connected|disconnected|snapshot,
    /// pushes on <prefix>.push.<device id> (default c1m)
    #[argh(option, default = "\"c1m\".into()")]
    pub nats_prefix: String,
    /// lifecycle events held for the publisher at most; past it they are
    /// dropped and counted as events_dropped, the shards never wait (default 16384)
    #[argh(option, default = "16384")]
    pub nats_queue: usize,
    /// this server's id in events and presence, [0-9A-Za-z:_-] (default <hostname>:<port>)
    #[argh(option)]
    pub server_id: Option<String>,
    /// with --nats: one connection per id across all servers on the
    /// broker; a device held here that connects to another server is
    /// closed here with 4000 "replaced" (each server reads every connect
    /// event of the fleet)
    #[argh(switch)]
    pub nats_exclusive: bool,
    /// speak TLS (wss://) on --listen with the certificate chain in this
    /// PEM file (leaf first); needs --tls-key. TLS 1.3 and 1.2, ALPN
    /// http/1.1, resumption by session tickets (default: plaintext ws://)
    #[argh(option)]
    pub tls_cert: Option<PathBuf>,
    /// the private key of --tls-cert, PEM (PKCS#8, PKCS#1 or SEC1)
    #[argh(option)]
    pub tls_key: Option<PathBuf>,
    /// also take heartbeats as UDP datagrams on the --listen port: each 101
    /// carries a C1M-Heartbeat-Ticket header, and a datagram holding that
    /// ticket (decoded) refreshes the connection as a frame does; the
    /// kernel steers each datagram to the shard holding its connection
    /// (README, UDP heartbeats) (default: off)
    #[argh(switch)]
    pub udp_heartbeat: bool,
}

/// What the flags name, loaded and checked: one error before anything starts.
pub struct Checked {
    /// `--cores`, or every CPU this process may use.
    pub cores: Vec<usize>,
    /// `--admin-token-file`, `--admin-host`.
    pub admin_access: c1m::admin::Access,
    /// `--auth-secret-file`.
    pub auth: Option<Arc<Keys>>,
    /// `--tls-cert`, `--tls-key`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The session-ticket keys `tls` seals with: the parent's (a `--procs`
    /// worker's, a hot upgrade's new process's), else this process's own;
    /// handed to every process this one starts.
    pub tls_tickets: Option<Arc<c1m_io::tls_tickets::Ticketer>>,
}

impl Args {
    /// Checks the flags against each other and loads the files they name.
    pub fn check(&self) -> Result<Checked, String> {
        let cores = self.cores.clone().unwrap_or_else(allowed_cpus);
        if self.procs == 0 {
            return Err("--procs must be at least 1".into());
        }
        if self.upgrade_parallel == 0 {
            return Err("--upgrade-parallel must be at least 1 (one worker at a time)".into());
        }
        if self.upgrade_tls_window > Duration::from_secs(60) {
            return Err(format!(
                "--upgrade-tls-window {:?} is over 60s: a --procs supervisor gives each worker's handover 120 s in all; use 60s or less",
                self.upgrade_tls_window
            ));
        }
        if let Some(admin) = self.admin.filter(|&a| c1m::admin::clashes(a, self.listen)) {
            return Err(format!(
                "--admin {admin} is the device port (--listen {}): give the admin listener an address of its own",
                self.listen
            ));
        }
        // Loaded and checked before any worker starts: the token stays in this
        // process (the --procs parent serves the admin port), and an open
        // admin port on a reachable address is refused.
        let admin_access = c1m::admin::Access {
            token: match &self.admin_token_file {
                Some(path) => Some(c1m::admin::Token::load(path)?),
                None => None,
            },
            hosts: self.admin_host.clone(),
        };
        if let Some(admin) = self.admin {
            admin_access.check_bind(admin)?;
        }
        // A push to a device of another --procs worker crosses the link in one
        // frame: the largest message must fit in one.
        if self.max_message > c1m::directory::wire::MAX_MESSAGE {
            return Err(format!(
                "--max-message {} bytes is over {} bytes ({}MiB), the most one push can carry between --procs workers (a link frame holds {}MiB)",
                self.max_message,
                c1m::directory::wire::MAX_MESSAGE,
                c1m::directory::wire::MAX_MESSAGE >> 20,
                c1m::directory::wire::MAX_FRAME >> 20
            ));
        }
        // The wheel and the heartbeat-interval histogram count whole
        // milliseconds per tick.
        if self.tick < Duration::from_millis(1) {
            return Err(format!(
                "--tick {:?} is under 1ms, the finest the wheel and the heartbeat-interval histogram count in",
                self.tick
            ));
        }
        // Loaded here, before any worker starts, so that a bad file is one
        // error; --procs workers get the path (they re-run these arguments),
        // never the secret.
        let auth = match &self.auth_secret_file {
            Some(path) => Some(Arc::new(Keys::load(path)?)),
            None => None,
        };
        // Loaded here too, so that a bad certificate or key is one error
        // before any worker starts; --procs workers re-read the same paths.
        // The session-ticket keys: the parent's, or drawn here (a --procs
        // parent hands them to its workers).
        let (tls, tls_tickets) = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let tickets = c1m_io::tls_tickets::Ticketer::inherited_or_new()?;
                let config = c1m_io::tls::server_config(cert, key, tickets.clone())?;
                (Some(config), Some(tickets))
            }
            (None, None) => (None, None),
            (Some(_), None) => {
                return Err(
                    "--tls-cert needs --tls-key (the certificate's private key, PEM)".into(),
                )
            }
            (None, Some(_)) => {
                return Err("--tls-key needs --tls-cert (the certificate chain, PEM)".into())
            }
        };
        if self.nats_exclusive && self.nats.is_none() {
            return Err("--nats-exclusive needs --nats URL (the broker the servers share)".into());
        }
        Ok(Checked {
            cores,
            admin_access,
            auth,
            tls,
            tls_tickets,
        })
    }
}
