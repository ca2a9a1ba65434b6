//! The sans-IO protocol core: plain data, no sockets, tested exhaustively.

pub mod auth;
pub mod client_handshake;
pub mod conn;
pub mod device_id;
pub mod frame;
pub mod handshake;
pub mod proxy;
pub mod ticket;
pub mod wheel;
