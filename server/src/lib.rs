//! c1m: a thread-per-core WebSocket server for IoT fleets.
//!
//! - [`proto`]: the sans-IO core: the upgrade parser, the frame codec, one
//!   connection's state machine and the hashed timing wheel of deadlines.
//! - [`io`]: the I/O driver (epoll or io_uring) that owns the sockets and
//!   the system calls; the server's shards and the client's fleets share it.
//! - [`shard`]: one per core, sharing nothing: the decisions around the core.
//! - [`admin`]: the operators' HTTP listener (`--admin`): /metrics, /healthz.
//! - [`procs`]: worker processes past the descriptor limit, and the limits.

pub mod admin;
pub mod config;
pub mod io;
pub mod mailbox;
pub mod procs;
pub mod proto;
pub mod registry;
pub mod shard;
pub mod stats;
pub mod tls;
