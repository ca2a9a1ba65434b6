//! Whether this host can hold the fleet, checked before the first connect:
//! descriptors per process (RLIMIT_NOFILE, so how many `--procs`), open
//! files host-wide (fs.file-max) and kernel memory for the sockets. Ports
//! per source address are [`crate::ips::check_capacity`]. Each failure is
//! one sentence saying what the host allows and what to change.

pub use c1m_io::host::limits::Queues;
use c1m_io::host::limits::{Host, KERNEL_BYTES_PER_CONN};

/// Descriptors a client process keeps besides its sockets: per core its
/// I/O driver (an io_uring or an epoll set) and glommio's rings; stdio and
/// pipes.
pub fn spare_fds(cores: usize) -> u64 {
    32 + 8 * cores as u64
}

/// Worker processes needed to hold `conns` when each may open `nofile`.
pub fn procs_needed(conns: u64, nofile: u64, spare: u64) -> u64 {
    conns.div_ceil(nofile.saturating_sub(spare).max(1))
}

/// Checks `conns` spread over `procs` processes (`server_too`: a spawned
/// server on this host holds the other end of each).
pub fn check(
    host: &Host,
    conns: u64,
    procs: u64,
    cores_per_proc: usize,
    server_too: bool,
) -> Result<(), String> {
    let spare = spare_fds(cores_per_proc);
    let per_proc = conns.div_ceil(procs.max(1));
    if per_proc + spare > host.nofile {
        let need = procs_needed(conns, host.nofile, spare);
        return Err(format!(
            "this process may open {} files (RLIMIT_NOFILE), so {} connections need --procs {need} here (each worker holds up to {}), or raise the limit: see kernel-tuning/",
            host.nofile,
            conns,
            host.nofile - spare.min(host.nofile)
        ));
    }
    let sockets = if server_too { 2 * conns } else { conns };
    if sockets > host.files_free {
        return Err(format!(
            "the host has room for {} more open files (fs.file-max) and this run needs {sockets}: raise fs.file-max (kernel-tuning/sysctl.d)",
            host.files_free
        ));
    }
    let kernel = sockets.saturating_mul(KERNEL_BYTES_PER_CONN);
    if kernel > host.mem_available {
        return Err(format!(
            "{sockets} sockets need about {} MiB of kernel memory ({} KiB each) and {} MiB is available: lower --conns or free memory",
            kernel >> 20,
            KERNEL_BYTES_PER_CONN / 1024,
            host.mem_available >> 20
        ));
    }
    Ok(())
}

/// Device numbers of worker `i` of `procs`: (first, count).
pub fn share(conns: u64, procs: u64, i: u64) -> (u64, u64) {
    let (base, rem) = (conns / procs, conns % procs);
    (i * base + i.min(rem), base + u64::from(i < rem))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: u64 = 1 << 50;

    fn host(nofile: u64) -> Host {
        Host {
            nofile,
            files_free: BIG,
            mem_available: BIG,
        }
    }

    #[test]
    fn the_fd_limit_says_how_many_procs() {
        assert!(check(&host(20_000), 19_900, 1, 2, false).is_ok());
        let e = check(&host(20_000), 1_000_000, 1, 1, true).unwrap_err();
        assert!(
            e.contains("--procs 51 here") && e.contains("RLIMIT_NOFILE"),
            "{e}"
        );
        assert!(check(&host(20_000), 1_000_000, 51, 1, true).is_ok());
        assert!(check(&host(20_000), 1_000_000, 50, 1, true).is_err());
        assert_eq!(procs_needed(1_000_000, 20_000, 40), 51);
    }

    #[test]
    fn file_max_and_memory_bind_too() {
        let h = Host {
            nofile: BIG,
            files_free: 1_500_000,
            mem_available: BIG,
        };
        assert!(check(&h, 700_000, 1, 2, true).is_ok());
        assert!(check(&h, 800_000, 1, 2, true)
            .unwrap_err()
            .contains("fs.file-max"));
        let h = Host {
            nofile: BIG,
            files_free: BIG,
            mem_available: 1 << 30,
        };
        assert!(check(&h, 100_000, 1, 2, true).is_ok());
        let e = check(&h, 200_000, 1, 2, true).unwrap_err();
        assert!(e.contains("kernel memory"), "{e}");
    }

    #[test]
    fn shares_cover_every_device_once() {
        for (conns, procs) in [(10, 3), (1_000_000, 60), (5, 5), (3, 7)] {
            let mut next = 0;
            for i in 0..procs {
                let (first, n) = share(conns, procs, i);
                assert_eq!(first, next);
                next += n;
            }
            assert_eq!(next, conns);
        }
    }
}
