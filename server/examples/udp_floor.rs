//! The floor of a UDP heartbeat (bench/udp-heartbeat.sh): a bare receiver
//! thread pinned to one CPU (epoll + recvmmsg in batches of 64, the same
//! reads as the server's epoll driver) fed by a paced sender thread on
//! another CPU (18-byte datagrams, sendmmsg in batches, as the load client
//! sends). Prints one line: datagrams, receiver CPU per datagram, and
//! system calls per datagram.
//!
//! `cargo run --release --example udp_floor -- RATE SECONDS [RX_CPU TX_CPU]`
//!
//! Or the receiver alone, fed by someone else (the load client's
//! `--udp-to`, so that the floor sees the datagrams exactly as the server
//! does): `udp_floor --listen ADDR SKIP SECONDS [RX_CPU]` binds ADDR and
//! measures the SECONDS after the first SKIP (the fleet's ramp).

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use c1m_io::udp::{send_batch, RecvBatch};

fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; this pins only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is valid for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The receiver thread: reads `rx` until `end`, counting datagrams,
/// system calls and its own CPU from `from` on. Named floor-rx (for
/// `perf stat --per-thread`).
fn receiver(
    rx: UdpSocket,
    cpu: usize,
    from: Instant,
    end: Instant,
) -> std::thread::JoinHandle<(u64, u64, Duration)> {
    std::thread::Builder::new()
        .name("floor-rx".into())
        .spawn(move || {
            pin(cpu);
            // SAFETY: plain epoll calls on descriptors owned here.
            let ep = unsafe { libc::epoll_create1(0) };
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                u64: 1,
            };
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, rx.as_raw_fd(), &mut ev) };
            let mut batch = RecvBatch::default();
            let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
            let (mut got, mut calls) = (0u64, 0u64);
            let mut base: Option<(u64, u64, Duration)> = None;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if base.is_none() && now >= from {
                    base = Some((got, calls, thread_cpu()));
                }
                let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 8, 100) };
                calls += 1;
                if n <= 0 {
                    continue;
                }
                loop {
                    let k = batch.fill(rx.as_raw_fd());
                    calls += 1;
                    got += k as u64;
                    if !batch.was_full() {
                        break;
                    }
                }
            }
            let (g0, c0, t0) = base.unwrap_or((got, calls, thread_cpu()));
            (got - g0, calls - c0, thread_cpu() - t0)
        })
        .expect("receiver thread")
}

fn report(rate: f64, secs: f64, sent: Option<u64>, (got, calls, cpu): (u64, u64, Duration)) {
    let sent = sent.map_or(String::new(), |s| format!(" sent={s}"));
    println!(
        "udp_floor rate={rate} seconds={secs}{sent} received={got} rx_cpu_us_per_datagram={:.2} syscalls_per_datagram={:.2}",
        cpu.as_secs_f64() * 1e6 / got.max(1) as f64,
        calls as f64 / got.max(1) as f64
    );
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: f64| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    if a.first().map(String::as_str) == Some("--listen") {
        let addr = a.get(1).expect("--listen ADDR SKIP SECONDS [RX_CPU]");
        let (skip, secs) = (num(2, 5.0), num(3, 10.0));
        let rx = UdpSocket::bind(addr.as_str()).expect("bind");
        rx.set_nonblocking(true).expect("nonblocking");
        let from = Instant::now() + Duration::from_secs_f64(skip);
        let end = from + Duration::from_secs_f64(secs);
        let r = receiver(rx, num(4, 0.0) as usize, from, end)
            .join()
            .expect("receiver");
        report(r.0 as f64 / secs, secs, None, r);
        return;
    }
    let rate = num(0, 15_000.0);
    let secs = num(1, 10.0);
    let (rx_cpu, tx_cpu) = (num(2, 0.0) as usize, num(3, 1.0) as usize);
    let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
    rx.set_nonblocking(true).expect("nonblocking");
    let to = rx.local_addr().expect("addr");
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let recv = receiver(rx, rx_cpu, start, end + Duration::from_millis(200));
    pin(tx_cpu);
    let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut sent = 0u64;
    let mut queue = Vec::with_capacity(64);
    // Paced in 1 ms steps: what is due is sent in sendmmsg batches.
    while Instant::now() < end {
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let mut t = [0u8; c1m_proto::ticket::LEN];
            t[2..10].copy_from_slice(&sent.to_be_bytes());
            queue.push((t, to));
            sent += 1;
            if queue.len() == 64 {
                send_batch(tx.as_raw_fd(), &queue);
                queue.clear();
            }
        }
        send_batch(tx.as_raw_fd(), &queue);
        queue.clear();
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = recv.join().expect("receiver");
    report(rate, secs, Some(sent), r);
}
