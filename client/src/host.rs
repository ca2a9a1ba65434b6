//! Facts about processes and the machine, read from /proc.

use serde_json::{json, Value};

/// CPU time of every thread of `pid` so far, in nanoseconds (schedstat).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// `pid` and its descendants (a `--procs` parent and its workers; a
/// process that runs a server side of several processes, as bench/front.sh
/// does: c1m servers and a proxy with its workers).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() && pids.len() < 100_000 {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", pids[i])) {
            for t in tasks.flatten() {
                let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                pids.extend(
                    kids.split_whitespace()
                        .filter_map(|k| k.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    pids
}

/// CPU time (ns) and RSS (bytes) of `pid` and its children together.
pub fn tree_usage(pid: u32) -> (u64, u64) {
    tree_usage_without(pid, None)
}

/// [`tree_usage`] of `pid` without `other` and its descendants: the
/// client's own usage when the server it measures is its child
/// (`--spawn-server`), which is counted as the server's instead.
///
/// Memory: each process's private resident pages, plus the shared memory
/// (RssShmem) of the process with the most, once: a `--procs` server's
/// workers all map one registry table, which VmRSS counts in every one of
/// them (60 times at 1M: 3,465 B per connection instead of about 300).
pub fn tree_usage_without(pid: u32, other: Option<u32>) -> (u64, u64) {
    let pids = tree_without(pid, other);
    let cpu = pids.iter().map(|&p| cpu_ns(p)).sum();
    let parts: Vec<(u64, u64)> = pids.into_iter().map(rss_parts).collect();
    (cpu, resident(&parts))
}

/// A tree's resident bytes from each process's (private, shared): the
/// private ones summed, the shared counted once (the largest).
fn resident(parts: &[(u64, u64)]) -> u64 {
    let private: u64 = parts.iter().map(|p| p.0).sum();
    private + parts.iter().map(|p| p.1).max().unwrap_or(0)
}

/// `pid` and its descendants but for `other` and its descendants.
pub fn tree_without(pid: u32, other: Option<u32>) -> Vec<u32> {
    let skip = other.map(with_children).unwrap_or_default();
    let mut pids = with_children(pid);
    pids.retain(|p| !skip.contains(p));
    pids
}

/// Resident set size of `pid` in bytes (0 if it is gone).
pub fn rss(pid: u32) -> u64 {
    status_kib(&format!("/proc/{pid}/status"), "VmRSS:") * 1024
}

/// `pid`'s resident bytes apart from its shared memory, and its shared
/// memory (RssShmem): (VmRSS - RssShmem, RssShmem), read at once.
fn rss_parts(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let (rss, shmem) = (kib("VmRSS:") * 1024, kib("RssShmem:") * 1024);
    (rss.saturating_sub(shmem), shmem)
}

fn status_kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A /proc/meminfo field in bytes (e.g. "Slab:", "MemAvailable:"), 0 if unreadable.
pub fn meminfo(key: &str) -> u64 {
    c1m_io::host::meminfo(key).unwrap_or(0)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Kernel socket memory in use: (TCP sockets, TCP memory pages) from
/// /proc/net/sockstat.
pub fn sockstat() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let line = text.lines().find(|l| l.starts_with("TCP:")).unwrap_or("");
    let field = |name: &str| {
        let mut it = line.split_whitespace();
        it.position(|w| w == name)
            .and_then(|_| it.next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("inuse"), field("mem"))
}

/// The machine a run happened on: what its figures depend on.
pub fn facts(nofile: u64) -> Value {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let sys = |name: &str| read(&format!("/proc/sys/{}", name.replace('.', "/")));
    json!({
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "cpu_model": cpu_model,
        "kernel": read("/proc/sys/kernel/osrelease"),
        "mem_total_bytes": meminfo("MemTotal:"),
        "mem_available_bytes": meminfo("MemAvailable:"),
        "rlimit_nofile": nofile,
        "sysctl": {
            "fs.file-max": sys("fs.file-max"),
            "fs.nr_open": sys("fs.nr_open"),
            "net.core.somaxconn": sys("net.core.somaxconn"),
            "net.ipv4.tcp_max_syn_backlog": sys("net.ipv4.tcp_max_syn_backlog"),
            "net.ipv4.ip_local_port_range": sys("net.ipv4.ip_local_port_range"),
            "net.ipv4.tcp_mem": sys("net.ipv4.tcp_mem"),
            "net.ipv4.tcp_rmem": sys("net.ipv4.tcp_rmem"),
            "net.ipv4.tcp_wmem": sys("net.ipv4.tcp_wmem"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_is_counted_once_in_a_tree() {
        // 60 workers, each 3 MB of its own and the same 51 MB table.
        let parts = vec![(3 << 20, 51 << 20); 60];
        assert_eq!(resident(&parts), (180 << 20) + (51 << 20));
        assert_eq!(resident(&[]), 0);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss(me) > 0);
        let spin: u64 = (0..5_000_000u64).fold(0, |a, b| a ^ b.wrapping_mul(31));
        assert!(cpu_ns(me) > 0, "{spin}");
        assert_eq!((rss(u32::MAX), cpu_ns(u32::MAX)), (0, 0));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(with_children(me).contains(&child.id()));
        // Compare only figures that cannot move between two reads: this
        // process's RSS changes while other tests run beside it, a sleeping
        // child's does not. Wait until the child is asleep in `sleep`.
        let kid = child.id();
        let asleep = || {
            std::fs::read_to_string(format!("/proc/{kid}/stat"))
                .is_ok_and(|s| s.contains("(sleep) S"))
        };
        let started = std::time::Instant::now();
        while !asleep() && started.elapsed() < std::time::Duration::from_secs(4) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(asleep(), "the child never went to sleep");
        assert!(rss(kid) > 0);
        assert_eq!(tree_usage(kid), (cpu_ns(kid), rss(kid)));
        assert!(tree_usage(me).1 > rss(kid));
        // A spawned server's usage is its own, not also the client's.
        let own = tree_without(me, Some(kid));
        assert!(own.contains(&me) && !own.contains(&kid));
        assert_eq!(tree_usage_without(kid, Some(kid)), (0, 0));
        child.kill().unwrap();
        child.wait().unwrap();
        let f = facts(1024);
        assert!(f["cores"].as_u64().unwrap() >= 1);
        assert!(!f["kernel"].as_str().unwrap().is_empty());
    }
}
