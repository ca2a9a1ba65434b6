//! c1m's sans-IO core: plain data, no sockets, no system calls, tested
//! exhaustively. The server's shards and the client's fleets drive it with
//! the I/O of `c1m_io`.
//!
//! - [`handshake`], [`client_handshake`]: the upgrade, both sides.
//! - [`frame`], [`conn`]: the frame codec and one connection's state machine.
//! - [`wheel`]: the hashed timing wheel of deadlines.
//! - [`auth`], [`ticket`], [`proxy`], [`device_id`]: tokens, UDP heartbeat
//!   tickets, the PROXY protocol header, device ids.
//! - [`handover`]: the versioned format an upgrade hands connections over in.
//! - [`table`]: the device table's logic (striped linear probing over a
//!   memory region the caller maps).

pub mod auth;
pub mod carry;
pub mod client_handshake;
pub mod conn;
pub mod counters;
pub mod device_id;
pub mod frame;
pub mod handover;
pub mod handshake;
pub mod proxy;
pub mod table;
pub mod ticket;
pub mod wheel;
