//! What this host lets one process hold, and one sentence when a request
//! exceeds it. The arithmetic is plain functions over [`Host`]; only
//! [`Host::read`] looks at the system.

use c1m_proto::table;

/// Descriptors kept for listeners, epoll sets, eventfds, io_uring and stdio.
pub const RESERVED_FDS: u64 = 64;

/// Kernel memory per idle server socket (socket, inode, dentry, epoll item,
/// TCP state), measured on the development machines: ~9.6 KiB of kernel
/// memory per idle loopback connection, client and server sockets together,
/// so about half of it per server socket, rounded up.
pub const KERNEL_BYTES_PER_CONN: u64 = 5 * 1024;

/// User-space memory per idle connection (README: 117-126 B measured; a
/// round figure with room for the wheel's stale entries).
pub const USER_BYTES_PER_CONN: u64 = 256;

/// The limits that bound how many connections one process can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// RLIMIT_NOFILE (soft, after raising it to the hard limit).
    pub nofile: u64,
    /// fs.file-max minus the files open now, system-wide.
    pub files_free: u64,
    /// MemAvailable, bytes.
    pub mem_available: u64,
}

/// What binds a process's connections first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Nofile,
    FileMax,
    Memory,
}

impl Host {
    /// Reads the limits of this process and host (`nofile` as given).
    pub fn read(nofile: u64) -> Host {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        // file-nr: allocated, unused (always 0 now), max.
        let nums: Vec<u64> = read("/proc/sys/fs/file-nr")
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        let files_free = match nums[..] {
            [used, _, max] => max.saturating_sub(used),
            _ => u64::MAX,
        };
        let mem_available = super::meminfo("MemAvailable:").unwrap_or(u64::MAX);
        Host {
            nofile,
            files_free,
            mem_available,
        }
    }

    /// Connections this process can hold, and what binds them.
    pub fn capacity(&self) -> (u64, Bound) {
        [
            (self.nofile.saturating_sub(RESERVED_FDS), Bound::Nofile),
            (self.files_free.saturating_sub(RESERVED_FDS), Bound::FileMax),
            (
                self.mem_available / (KERNEL_BYTES_PER_CONN + USER_BYTES_PER_CONN),
                Bound::Memory,
            ),
        ]
        .into_iter()
        .min_by_key(|&(n, _)| n)
        .expect("three candidates")
    }

    /// Connections one process with `shards` shards holds at most: each
    /// shard's `--max-conns`, or by default its share of what the process
    /// can hold (as the server sizes its shards).
    pub fn per_shard(&self, shards: usize, max_conns: Option<usize>) -> usize {
        // The default stays within what a shard's slab may address (the
        // registry's entry: c1m_proto::table); an explicit one is checked.
        max_conns.unwrap_or(
            (self.capacity().0 / shards.max(1) as u64).clamp(1, table::MAX_KEYS as u64 / 2)
                as usize,
        )
    }

    /// Connections the whole machine can hold (files, memory), whatever
    /// the per-process limit: what a table shared by every `--procs`
    /// worker is sized by at most.
    pub fn machine_capacity(&self) -> u64 {
        self.files_free
            .saturating_sub(RESERVED_FDS)
            .min(self.mem_available / (KERNEL_BYTES_PER_CONN + USER_BYTES_PER_CONN))
    }

    /// One sentence for the operator when `wanted` connections do not fit.
    pub fn advice(&self, wanted: u64) -> Option<String> {
        let (can, bound) = self.capacity();
        if wanted <= can {
            return None;
        }
        Some(match bound {
            Bound::Nofile => format!(
                "this process may open {} files (RLIMIT_NOFILE), so it holds about {can} connections, not {wanted}: raise the limit (kernel-tuning/limits.d, LimitNOFILE=) or run --procs {}",
                self.nofile,
                wanted.div_ceil(can.max(1))
            ),
            Bound::FileMax => format!(
                "the host has room for {} more open files (fs.file-max), so this process holds about {can} connections, not {wanted}: raise fs.file-max (kernel-tuning/sysctl.d)",
                self.files_free
            ),
            Bound::Memory => format!(
                "{} MiB of memory is available, about {} KiB per connection, so this host holds about {can} connections, not {wanted}: free memory or use a bigger host",
                self.mem_available >> 20,
                (KERNEL_BYTES_PER_CONN + USER_BYTES_PER_CONN) / 1024
            ),
        })
    }
}

/// The queue and memory sysctls that do not stop a run but shape it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queues {
    pub somaxconn: u64,
    pub syn_backlog: u64,
    /// net.ipv4.tcp_mem's third value: pages of TCP buffers host-wide.
    pub tcp_mem_max_pages: u64,
}

impl Queues {
    pub fn read() -> Queues {
        let num = |name: &str, i: usize| {
            std::fs::read_to_string(format!("/proc/sys/net/{name}"))
                .ok()
                .and_then(|s| s.split_whitespace().nth(i)?.parse().ok())
                .unwrap_or(u64::MAX)
        };
        Queues {
            somaxconn: num("core/somaxconn", 0),
            syn_backlog: num("ipv4/tcp_max_syn_backlog", 0),
            tcp_mem_max_pages: num("ipv4/tcp_mem", 2),
        }
    }

    /// One sentence per setting that will slow or hurt a client run.
    pub fn warnings(&self, in_flight: u64, sockets: u64) -> Vec<String> {
        let mut w = Vec::new();
        if in_flight > self.somaxconn.min(self.syn_backlog) {
            w.push(format!(
                "{in_flight} upgrades in flight can overflow a listen queue (net.core.somaxconn {}, net.ipv4.tcp_max_syn_backlog {}): expect retransmitted SYNs and slower connects, or raise them (kernel-tuning/)",
                self.somaxconn, self.syn_backlog
            ));
        }
        w.extend(self.memory_warning(sockets));
        w
    }

    /// When `sockets` could not each get a page of TCP buffer at once.
    pub fn memory_warning(&self, sockets: u64) -> Option<String> {
        (sockets > self.tcp_mem_max_pages).then(|| format!(
            "net.ipv4.tcp_mem allows {} pages of TCP buffers for {sockets} sockets: a burst that gives each a page (a push, a reconnect storm) hits memory pressure; raise it (kernel-tuning/)",
            self.tcp_mem_max_pages
        ))
    }

    /// When the kernel will cut a requested listen backlog short.
    pub fn backlog_warning(&self, backlog: u64) -> Option<String> {
        (backlog > self.somaxconn).then(|| format!(
            "--backlog {backlog} is more than net.core.somaxconn {}, which the kernel caps it at: raise somaxconn (kernel-tuning/)",
            self.somaxconn
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: u64 = 1 << 50;

    #[test]
    fn the_tightest_limit_binds() {
        let host = Host {
            nofile: 20_000,
            files_free: BIG,
            mem_available: BIG,
        };
        assert_eq!(host.capacity(), (19_936, Bound::Nofile));
        let host = Host {
            nofile: BIG,
            files_free: 100_064,
            mem_available: BIG,
        };
        assert_eq!(host.capacity(), (100_000, Bound::FileMax));
        let host = Host {
            nofile: BIG,
            files_free: BIG,
            mem_available: 1 << 30,
        };
        assert_eq!(
            host.capacity(),
            ((1 << 30) / (5 * 1024 + 256), Bound::Memory)
        );
    }

    #[test]
    fn advice_says_what_allows_and_what_to_change() {
        let host = Host {
            nofile: 20_000,
            files_free: BIG,
            mem_available: BIG,
        };
        assert_eq!(host.advice(19_936), None);
        let said = host.advice(1_000_000).unwrap();
        assert!(said.contains("20000 files (RLIMIT_NOFILE)"), "{said}");
        assert!(
            said.contains("about 19936 connections, not 1000000"),
            "{said}"
        );
        assert!(said.contains("run --procs 51"), "{said}");
        let host = Host {
            nofile: BIG,
            files_free: BIG,
            mem_available: 1 << 30,
        };
        assert!(host
            .advice(1_000_000)
            .unwrap()
            .contains("1024 MiB of memory"));
    }

    #[test]
    fn this_host_can_be_read() {
        let host = Host::read(20_000);
        assert!(host.files_free > 0 && host.mem_available > 0);
    }

    #[test]
    fn queue_warnings_name_the_setting() {
        let q = Queues {
            somaxconn: 4096,
            syn_backlog: 2048,
            tcp_mem_max_pages: 575_796,
        };
        assert!(q.warnings(512, 20_000).is_empty());
        let w = q.warnings(3_840, 2_000_000);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("tcp_max_syn_backlog 2048"), "{}", w[0]);
        assert!(w[1].contains("575796 pages"), "{}", w[1]);
        assert!(q.backlog_warning(4096).is_none());
        assert!(q.backlog_warning(65535).unwrap().contains("somaxconn 4096"));
        assert!(q.memory_warning(100_000).is_none());
    }
}
