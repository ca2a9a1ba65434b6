//! c1m: a thread-per-core WebSocket server for IoT fleets.
//!
//! Built on `c1m_proto` (the sans-IO core: the upgrade parser, the frame
//! codec, one connection's state machine, the timing wheel) and `c1m_io`
//! (the I/O driver, epoll or io_uring, that owns the sockets and the system
//! calls; the client's fleets share it).
//!
//! - [`shard`]: one per core, sharing nothing: the decisions around the core.
//! - [`events`]: lifecycle events and pushes through NATS (`--nats`).
//! - [`admin`]: the operators' HTTP listener (`--admin`): /metrics, /healthz.
//! - [`procs`]: worker processes past the descriptor limit: the supervisor
//!   and what the server hands its workers.
//! - [`directory`]: one connection per device id across shards and workers
//!   (the registry in shared memory), the messages shards exchange, and the
//!   link that carries them between worker processes.
//! - [`upgrade`]: the hot upgrade: listeners and connections handed to a
//!   new binary without a disconnect (docs/upgrade.md).

/// `eprintln!`, in one write(2): std writes a line's pieces one system
/// call each, and during a hot upgrade the old and the new process share
/// stderr, so their lines would interleave mid-line (a line under 4 KiB
/// goes to a pipe whole).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut line = format!($($arg)*);
        line.push('\n');
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

/// `println!` in one write(2), for the same reason as [`say!`] (stdout is
/// line-buffered, but a stats line is longer than its buffer).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        let mut line = format!($($arg)*);
        line.push('\n');
        let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), line.as_bytes());
    }};
}

pub mod admin;
pub mod admission;
pub mod config;
pub mod directory;
pub mod ended;
pub mod events;
pub mod hist;
pub mod procs;
pub mod reporter;
pub mod shard;
pub mod stats;
pub mod upgrade;
