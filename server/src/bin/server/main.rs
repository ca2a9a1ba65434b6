//! `server`: one pinned glommio executor (shard) per core, each with its own
//! SO_REUSEPORT listener, slab of connections and timing wheel; with
//! `--procs N`, the parent of N such processes.
//!
//! - [`args`]: the flags and what is checked before anything starts;
//! - [`single`]: one process's shards, its reporting loop and its end;
//! - the `--procs` parent is [`c1m::procs::supervisor`]; both report
//!   through [`c1m::reporter`].

mod args;
mod single;

use std::process::ExitCode;

use c1m_io::host::limits::Host;
use c1m_io::host::raise_nofile;
use c1m_io::host::signals::Signals;

use args::{Args, Checked};

fn main() -> ExitCode {
    match run(argh::from_env()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            c1m::say!("server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let checked = args.check()?;
    if args.procs > 1 {
        supervise(&args, checked)
    } else {
        single::run(args, checked)
    }
}

/// `--procs N`: the parent of N workers, which re-run these arguments.
fn supervise(args: &Args, checked: Checked) -> Result<(), String> {
    let Checked {
        cores,
        admin_access,
        tls_tickets,
        ..
    } = checked;
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
    // Each worker re-runs these arguments; without --backlog it gets its
    // share of the server's listen queue (each would otherwise take a
    // single process's share: 60 workers would queue 60 times as much).
    let mut worker_args: Vec<String> = std::env::args().skip(1).collect();
    if args.backlog.is_none() {
        let listeners = (0..args.procs)
            .map(|i| c1m_io::host::workers::cpus_for(i, args.procs, &cores).len())
            .sum();
        let backlog = c1m_io::listener::default_backlog(listeners, c1m_io::listener::somaxconn());
        worker_args.extend(["--backlog".into(), backlog.to_string()]);
    }
    let signals = Signals::block()?;
    c1m::procs::supervisor::Supervisor {
        procs: args.procs,
        cpus: cores,
        listen: args.listen,
        join: args.join,
        args: worker_args,
        stats_interval: args.stats_interval,
        worker_stats: args.worker_stats,
        admin: args.admin,
        admin_access,
        max_message: args.max_message,
        registry_capacity,
        udp_heartbeat: args.udp_heartbeat,
        drain_health_delay: args.drain_health_delay,
        upgrade_parallel: args.upgrade_parallel,
        tls_tickets,
    }
    .run(signals)
}
