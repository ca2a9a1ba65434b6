//! loadgen: the server-core benchmark's load generator (until the client
//! crate exists). Opens `--conns` WebSockets as fast as `--concurrency`
//! allows, holds them while each pings every `--ping-interval`, and, given
//! `--server-pid`, measures the server's CPU per connection and per heartbeat
//! (from /proc/PID/task/*/schedstat, nanoseconds) and its RSS per connection.
//! Prints one JSON object on stdout; progress goes to stderr.
//!
//! Bounded: the ramp stops after `--ramp-timeout`, the hold after `--hold`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use c1m_io::epoll::{self, Epoll};
use c1m_io::host::{parse_duration, raise_nofile};
use c1m_io::socket;
use c1m_proto::client_handshake::{self, key_for, Answer};
use hdrhistogram::Histogram;

/// Opens WebSocket connections, holds them with pings, reports server cost.
#[derive(argh::FromArgs)]
struct Args {
    /// server address (default 127.0.0.1:9000)
    #[argh(option, default = "\"127.0.0.1:9000\".parse().unwrap()")]
    server: SocketAddr,
    /// connections to open (default 15000)
    #[argh(option, default = "15000")]
    conns: usize,
    /// worker threads (default 2)
    #[argh(option, default = "2")]
    threads: usize,
    /// pin worker thread i to CPU i (so a connection is received on a known
    /// CPU: the fixture for the server's --reuseport-cpu)
    #[argh(switch)]
    pin: bool,
    /// handshakes in flight per thread (default 512)
    #[argh(option, default = "512")]
    concurrency: usize,
    /// source addresses first-last, e.g. 127.0.0.2-127.0.0.11 (default: the kernel's choice)
    #[argh(option)]
    ips: Option<String>,
    /// how long to hold the fleet while it pings (default 10s)
    #[argh(
        option,
        default = "Duration::from_secs(10)",
        from_str_fn(parse_duration)
    )]
    hold: Duration,
    /// each connection pings once per interval during the hold (default 1s)
    #[argh(
        option,
        default = "Duration::from_secs(1)",
        from_str_fn(parse_duration)
    )]
    ping_interval: Duration,
    /// this fraction of connections never pings during the hold, so the server
    /// expires them if the hold outlasts its --timeout (default 0)
    #[argh(option, default = "0.0")]
    silent: f64,
    /// the server's --timeout, to measure how late silent devices are deleted (default 90s)
    #[argh(
        option,
        default = "Duration::from_secs(90)",
        from_str_fn(parse_duration)
    )]
    server_timeout: Duration,
    /// give up the ramp after this long (default 60s)
    #[argh(
        option,
        default = "Duration::from_secs(60)",
        from_str_fn(parse_duration)
    )]
    ramp_timeout: Duration,
    /// pid of the server, to measure its CPU and memory
    #[argh(option)]
    server_pid: Option<u32>,
}

/// Server CPU (ns, all threads) and RSS (bytes) at one moment.
#[derive(Clone, Copy, Default)]
struct Sample {
    cpu_ns: u64,
    rss: u64,
    /// The host's kernel slab (bytes): both ends of every loopback
    /// connection, and what the server's I/O arms in the kernel.
    slab: u64,
}

fn host_slab() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Slab:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn sample(pid: Option<u32>) -> Sample {
    let Some(pid) = pid else {
        return Sample {
            slab: host_slab(),
            ..Sample::default()
        };
    };
    let mut cpu_ns = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                cpu_ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    Sample {
        cpu_ns,
        rss,
        slab: host_slab(),
    }
}

fn parse_ips(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: Ipv4Addr = a.trim().parse().map_err(|_| format!("bad IP {a:?}"))?;
    let b: Ipv4Addr = b.trim().parse().map_err(|_| format!("bad IP {b:?}"))?;
    let (a, b) = (u32::from(a), u32::from(b));
    if a > b {
        return Err(format!("empty IP range {s:?}"));
    }
    Ok((a..=b).map(Ipv4Addr::from).collect())
}

/// A masked, empty Ping; its Pong is the two bytes 0x8a 0x00.
const PING: [u8; 6] = [0x89, 0x80, 1, 2, 3, 4];

#[derive(PartialEq)]
enum State {
    Connecting,
    Upgrading,
    Open,
    Failed,
}

struct Conn {
    fd: RawFd,
    state: State,
    /// When the connect began.
    started: Instant,
    /// When this device last sent anything (for the silent ones: the
    /// upgrade request), the start of the silence the server times.
    last_sent: Instant,
    /// The server's answer so far (only while upgrading).
    answer: Vec<u8>,
}

#[derive(Default)]
struct Totals {
    established: AtomicU64,
    failed: AtomicU64,
    pongs: AtomicU64,
    pings: AtomicU64,
    /// Heartbeating connections the server closed during the hold.
    closed_live: AtomicU64,
    /// Silent connections the server closed during the hold.
    closed_silent: AtomicU64,
    /// Silent connections the server closed before its timeout (must be 0).
    expired_early: AtomicU64,
}

fn main() {
    let args: Args = argh::from_env();
    if let Err(e) = run(args) {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let nofile = raise_nofile();
    if args.conns as u64 + 64 > nofile {
        return Err(format!(
            "this process may open {nofile} files (RLIMIT_NOFILE): {} connections do not fit; lower --conns",
            args.conns
        ));
    }
    let ips = match &args.ips {
        Some(s) => parse_ips(s)?,
        None => Vec::new(),
    };
    let threads = args.threads.max(1);
    let totals = Arc::new(Totals::default());
    // Phases: ramp | measure | hold | close, separated by barriers.
    let barrier = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for t in 0..threads {
        let share = args.conns / threads + usize::from(t < args.conns % threads);
        let my_ips: Vec<Ipv4Addr> = ips.iter().copied().skip(t).step_by(threads).collect();
        let (totals, barrier) = (totals.clone(), barrier.clone());
        let load = Load {
            server: args.server,
            concurrency: args.concurrency,
            ramp_timeout: args.ramp_timeout,
            hold: args.hold,
            interval: args.ping_interval,
            silent: args.silent.clamp(0.0, 1.0),
            server_timeout: args.server_timeout,
        };
        let pin = args.pin;
        handles.push(std::thread::spawn(move || {
            if pin {
                // SAFETY: cpu_set_t is plain data; pins only this thread.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(t, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
            }
            worker(t, share, my_ips, &load, &totals, &barrier)
        }));
    }

    let pid = args.server_pid;
    let before = sample(pid);
    let ramp_start = Instant::now();
    barrier.wait(); // ramp done
    let ramp = ramp_start.elapsed();
    let after_ramp = sample(pid);
    std::thread::sleep(Duration::from_secs(1));
    let settled = sample(pid);
    barrier.wait(); // hold starts
    let hold_start = Instant::now();
    barrier.wait(); // hold done
    let held = hold_start.elapsed();
    let after_hold = sample(pid);
    barrier.wait(); // close
    let mut connect = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut expiry_lag = connect.clone();
    for h in handles {
        let m = h.join().map_err(|_| "a worker panicked".to_string())??;
        connect
            .add(&m.connect)
            .and_then(|_| expiry_lag.add(&m.expiry_lag))
            .map_err(|e| format!("merge histograms: {e}"))?;
    }

    let established = totals.established.load(Relaxed);
    let pongs = totals.pongs.load(Relaxed);
    let per = |num: u64, den: u64| {
        if den == 0 {
            0.0
        } else {
            num as f64 / den as f64
        }
    };
    let json = format!(
        concat!(
            "{{\"conns\":{},\"ping_interval_s\":{},\"established\":{},\"failed\":{},\"ramp_s\":{:.3},\"conn_per_s\":{:.0},",
            "\"connect_p50_us\":{},\"connect_p99_us\":{},\"connect_max_us\":{},",
            "\"server_cpu_per_conn_us\":{:.2},\"server_rss_before\":{},\"server_rss_held\":{},",
            "\"server_rss_per_conn_bytes\":{:.0},\"host_slab_per_conn_bytes\":{:.0},\"hold_s\":{:.3},\"pings\":{},\"pongs\":{},",
            "\"server_cpu_per_heartbeat_us\":{:.2},\"server_cpu_hold_pct\":{:.1},",
            "\"silent_fraction\":{},\"server_closed_silent\":{},\"server_closed_heartbeating\":{},",
            "\"expiry_lag_p50_ms\":{:.1},\"expiry_lag_p99_ms\":{:.1},\"expiry_lag_max_ms\":{:.1},\"expired_early\":{}}}"
        ),
        args.conns,
        args.ping_interval.as_secs_f64(),
        established,
        totals.failed.load(Relaxed),
        ramp.as_secs_f64(),
        per(established, 1) / ramp.as_secs_f64(),
        connect.value_at_quantile(0.5),
        connect.value_at_quantile(0.99),
        connect.max(),
        per(after_ramp.cpu_ns - before.cpu_ns, established) / 1e3,
        before.rss,
        settled.rss,
        per(settled.rss.saturating_sub(before.rss), established),
        per(settled.slab.saturating_sub(before.slab), established),
        held.as_secs_f64(),
        totals.pings.load(Relaxed),
        pongs,
        per(after_hold.cpu_ns - settled.cpu_ns, pongs) / 1e3,
        (after_hold.cpu_ns - settled.cpu_ns) as f64 / held.as_nanos() as f64 * 100.0,
        args.silent,
        totals.closed_silent.load(Relaxed),
        totals.closed_live.load(Relaxed),
        expiry_lag.value_at_quantile(0.5) as f64 / 1e3,
        expiry_lag.value_at_quantile(0.99) as f64 / 1e3,
        expiry_lag.max() as f64 / 1e3,
        totals.expired_early.load(Relaxed),
    );
    println!("{json}");
    Ok(())
}

/// What every worker does.
#[derive(Clone, Copy)]
struct Load {
    server: SocketAddr,
    concurrency: usize,
    ramp_timeout: Duration,
    hold: Duration,
    interval: Duration,
    silent: f64,
    server_timeout: Duration,
}

fn worker(
    id: usize,
    target: usize,
    ips: Vec<Ipv4Addr>,
    load: &Load,
    totals: &Totals,
    barrier: &Barrier,
) -> Result<Measured, String> {
    let Load {
        server,
        concurrency,
        ramp_timeout,
        hold,
        interval,
        silent,
        server_timeout,
    } = *load;
    let ep = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
    let mut conns: Vec<Conn> = Vec::with_capacity(target);
    let mut connect = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut expiry_lag = connect.clone();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = [0u8; 4096];
    let (mut inflight, mut done) = (0usize, 0usize);
    let deadline = Instant::now() + ramp_timeout;
    let mut last_report = Instant::now();

    // Ramp.
    while done < target && Instant::now() < deadline {
        while inflight < concurrency && conns.len() < target {
            let i = conns.len();
            let ip = ips.get(i % ips.len().max(1)).copied();
            match socket::connect_from(server, ip.map(IpAddr::V4)).map(IntoRawFd::into_raw_fd) {
                Ok(fd) => {
                    ep.add(
                        fd,
                        epoll::IN | epoll::OUT | epoll::RDHUP | epoll::ET,
                        i as u64,
                    )
                    .map_err(|e| format!("epoll add: {e}"))?;
                    conns.push(Conn {
                        fd,
                        state: State::Connecting,
                        started: Instant::now(),
                        last_sent: Instant::now(),
                        answer: Vec::new(),
                    });
                    inflight += 1;
                }
                Err(e) => {
                    return Err(format!("connect #{i}: {e}; add source IPs with --ips or widen net.ipv4.ip_local_port_range"));
                }
            }
        }
        let n = wait(&ep, &mut events, 50)?;
        for ev in &events[..n] {
            let i = ev.u64 as usize;
            let c = &mut conns[i];
            let was_in_flight = matches!(c.state, State::Connecting | State::Upgrading);
            if c.state == State::Connecting && ev.events & epoll::OUT != 0 {
                // A locally administered MAC per device: thread, then index.
                let device = format!(
                    "02:00:{id:02x}:{:02x}:{:02x}:{:02x}",
                    i >> 16 & 0xff,
                    i >> 8 & 0xff,
                    i & 0xff
                );
                let mut req = Vec::with_capacity(256);
                client_handshake::write_request(
                    &mut req,
                    "bench",
                    &device,
                    &key_for(i as u64, id as u64),
                    None,
                );
                if socket::so_error(c.fd) != 0 || send_all(c.fd, &req).is_err() {
                    c.state = State::Failed;
                } else {
                    c.state = State::Upgrading;
                    c.last_sent = Instant::now();
                }
            }
            if c.state == State::Upgrading && ev.events & epoll::IN != 0 {
                let r = socket::recv(c.fd, &mut buf);
                if let Ok(n @ 1..) = r {
                    c.answer.extend_from_slice(&buf[..n]);
                    match client_handshake::parse_answer(&c.answer, &key_for(i as u64, id as u64)) {
                        Answer::Partial => {}
                        Answer::Accepted { .. } => {
                            c.state = State::Open;
                            c.answer = Vec::new();
                            let us = c.started.elapsed().as_micros() as u64;
                            let _ = connect.record(us.max(1));
                        }
                        Answer::Refused { .. } | Answer::Invalid(_) => c.state = State::Failed,
                    }
                } else if !r.is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock) {
                    c.state = State::Failed;
                }
            }
            if was_in_flight && matches!(c.state, State::Open | State::Failed) {
                inflight -= 1;
                done += 1;
                let counter = if c.state == State::Open {
                    &totals.established
                } else {
                    &totals.failed
                };
                counter.fetch_add(1, Relaxed);
            }
        }
        if id == 0 && last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "loadgen: established {} failed {}",
                totals.established.load(Relaxed),
                totals.failed.load(Relaxed)
            );
            last_report = Instant::now();
        }
    }
    barrier.wait(); // ramp done
    barrier.wait(); // hold starts

    // Hold: every heartbeating connection pings once per interval, spread
    // over 10 ms slots; the silent ones (every k-th) never do.
    let every = if silent > 0.0 {
        (1.0 / silent).round().max(1.0) as usize
    } else {
        usize::MAX
    };
    let is_silent = |i: usize| every != usize::MAX && i.is_multiple_of(every);
    let open: Vec<RawFd> = conns
        .iter()
        .enumerate()
        .filter(|(i, c)| c.state == State::Open && !is_silent(*i))
        .map(|(_, c)| c.fd)
        .collect();
    let slot = Duration::from_millis(10);
    let per_slot = (open.len() as f64 * slot.as_secs_f64() / interval.as_secs_f64()).max(0.0);
    let (mut owed, mut next) = (0.0f64, 0usize);
    let start = Instant::now();
    let mut next_slot = start;
    let (mut pings, mut pong_bytes) = (0u64, 0u64);
    while start.elapsed() < hold {
        let now = Instant::now();
        if now >= next_slot && !open.is_empty() {
            owed += per_slot;
            while owed >= 1.0 {
                let _ = send_all(open[next], &PING);
                pings += 1;
                next = (next + 1) % open.len();
                owed -= 1.0;
            }
            next_slot += slot;
        }
        let timeout = next_slot
            .saturating_duration_since(Instant::now())
            .as_millis() as i32;
        let n = wait(&ep, &mut events, timeout.max(0))?;
        for ev in &events[..n] {
            let i = ev.u64 as usize;
            let c = &mut conns[i];
            if c.state != State::Open {
                continue;
            }
            loop {
                let r = socket::recv(c.fd, &mut buf);
                if let Ok(n @ 1..) = r {
                    pong_bytes += n as u64;
                    continue;
                }
                if !r.is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock) {
                    // The server closed it: expected only for silent ones.
                    c.state = State::Failed;
                    if is_silent(i) {
                        totals.closed_silent.fetch_add(1, Relaxed);
                        // Silent since it opened: deleted this long after the timeout.
                        match c.last_sent.elapsed().checked_sub(server_timeout) {
                            Some(lag) => {
                                let _ = expiry_lag.record((lag.as_micros() as u64).max(1));
                            }
                            None => {
                                totals.expired_early.fetch_add(1, Relaxed);
                            }
                        }
                    } else {
                        totals.closed_live.fetch_add(1, Relaxed);
                    }
                    let _ = ep.delete(c.fd);
                }
                break;
            }
        }
    }
    totals.pings.fetch_add(pings, Relaxed);
    totals.pongs.fetch_add(pong_bytes / 2, Relaxed);
    barrier.wait(); // hold done
    barrier.wait(); // close
    for c in &conns {
        socket::close(c.fd, true); // no TIME_WAIT left behind
    }
    Ok(Measured {
        connect,
        expiry_lag,
    })
}

/// One worker's histograms (microseconds).
struct Measured {
    connect: Histogram<u64>,
    expiry_lag: Histogram<u64>,
}

fn wait(ep: &Epoll, events: &mut [libc::epoll_event], timeout_ms: i32) -> Result<usize, String> {
    // SAFETY: the kernel writes at most events.len() entries.
    let n = unsafe {
        libc::epoll_wait(
            ep.as_raw_fd(),
            events.as_mut_ptr(),
            events.len() as i32,
            timeout_ms,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(format!("epoll_wait: {e}"))
        };
    }
    Ok(n as usize)
}

/// Sends all of a small buffer or fails (the loadgen never queues output).
fn send_all(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    match socket::send(fd, buf)? {
        n if n == buf.len() => Ok(()),
        _ => Err(io::Error::new(io::ErrorKind::WouldBlock, "short send")),
    }
}
