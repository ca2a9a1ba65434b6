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
