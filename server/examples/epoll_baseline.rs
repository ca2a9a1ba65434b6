//! epoll_baseline: the c1m shard loop on plain pinned threads instead of
//! glommio executors (with either I/O backend, `--io`). A benchmark
//! fixture: it tells what glommio costs around the same loop (its rings,
//! its memory), since the shard never hands its thread back to glommio.
//! (No signals, no stats line: it runs for --lifetime, then exits.)

use std::net::SocketAddr;
use std::time::Duration;

use c1m::shard::{self, ShardConfig};
use c1m_io::Backend;
use c1m_proto::conn::Limits;

/// Baseline: the shard loop without glommio.
#[derive(argh::FromArgs)]
struct Args {
    /// address to listen on (default 127.0.0.1:9000)
    #[argh(option, default = "\"127.0.0.1:9000\".parse().unwrap()")]
    listen: SocketAddr,
    /// CPUs, one thread each (default 0-1)
    #[argh(option, default = "\"0-1\".into()")]
    cores: String,
    /// exit after this long (default 10m)
    #[argh(
        option,
        default = "Duration::from_secs(600)",
        from_str_fn(c1m_io::host::parse_duration)
    )]
    lifetime: Duration,
    /// the I/O backend, uring or epoll (default epoll)
    #[argh(option, default = "Backend::Epoll")]
    io: Backend,
}

fn main() {
    let args: Args = argh::from_env();
    c1m_io::host::raise_nofile();
    let cores = c1m_io::host::parse_cpus(&args.cores).expect("--cores");
    let backlog = c1m_io::listener::somaxconn().unwrap_or(4096);
    let (tx, _rx) = std::sync::mpsc::channel();
    let cfg = ShardConfig {
        limits: Limits::default(),
        timeout: Duration::from_secs(90),
        tick: Duration::from_secs(1),
        handshake_timeout: Duration::from_secs(10),
        batch_wait: Duration::ZERO,
        max_handshakes: 0,
        frame_timeout: Duration::from_secs(10),
        max_conns: 1_000_000,
        graceful_expiry: false,
        drain_timeout: Duration::from_secs(1),
        drain_rate: 0.0,
        stats_interval: Duration::from_secs(3600),
        inject_panic: false,
        auth: None,
        proxy_protocol: false,
        trust_forwarded: Vec::new(),
        events: None,
        tls: None,
        registry: c1m::directory::registry::Registry::create(200_000).expect("registry"),
        udp: None,
        admission: None,
        takeover: false,
    };
    let (io, fallback) = Backend::usable(args.io);
    if let Some(why) = fallback {
        eprintln!("epoll_baseline: {why}");
    }
    let args = Args { io, ..args };
    let (mail, _outside) = c1m::directory::mailbox::wire(cores.len()).expect("eventfd");
    for ((id, &cpu), mail) in cores.iter().enumerate().zip(mail) {
        let listener = c1m_io::listener::bind(args.listen, backlog).expect("bind");
        let (cfg, tx) = (cfg.clone(), tx.clone());
        std::thread::spawn(move || {
            // SAFETY: cpu_set_t is plain data; pin this thread like glommio would.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            let _ = shard::run(args.io, id, cfg, listener, mail, tx);
        });
    }
    std::thread::sleep(args.lifetime);
}
