//! c1m: a thread-per-core WebSocket server for IoT fleets.
//!
//! The protocol core is sans-IO: [`handshake`] parses the upgrade request,
//! [`frame`] decodes and encodes frames, [`conn`] is one connection's state
//! machine, [`wheel`] is the hashed timing wheel of heartbeat deadlines.
//! [`shard`] is the thin I/O shell around them: one per core, sharing nothing.

pub mod client_handshake;
pub mod config;
pub mod conn;
pub mod epoll;
pub mod frame;
pub mod handshake;
pub mod limits;
pub mod listener;
pub mod shard;
pub mod socket;
pub mod stats;
pub mod supervisor;
pub mod wheel;
pub mod workers;
