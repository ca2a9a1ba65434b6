//! c1m: a thread-per-core WebSocket server for IoT fleets.
//!
//! - [`proto`]: the sans-IO core: the upgrade parser, the frame codec, one
//!   connection's state machine and the hashed timing wheel of deadlines.
//! - [`io`]: the I/O driver (epoll or io_uring) that owns the sockets and
//!   the system calls; the server's shards and the client's fleets share it.
//! - [`shard`]: one per core, sharing nothing: the decisions around the core.
//! - [`events`]: lifecycle events and pushes through NATS (`--nats`).
//! - [`admin`]: the operators' HTTP listener (`--admin`): /metrics, /healthz.
//! - [`procs`]: worker processes past the descriptor limit, the limits, and
//!   the link that makes them one server (the registry across workers).
//! - [`registry`], [`mailbox`]: one connection per device id, and the
//!   messages shards exchange.

pub mod admin;
pub mod admission;
pub mod config;
pub mod events;
pub mod hist;
pub mod io;
pub mod mailbox;
pub mod procs;
pub mod proto;
pub mod registry;
pub mod shard;
pub mod stats;
pub mod tls;
