//! The cross-process directory: which connection holds each device id, over
//! every shard of every `--procs` worker, and how shards reach each other.
//!
//! - [`registry`]: the device table in shared memory (a memfd every worker
//!   maps; the table's logic is `c1m_proto::table`), and the sweep of a
//!   dead worker's entries.
//! - [`mailbox`]: the messages shards exchange, and their delivery: in
//!   process through queues and eventfds, to another worker over its link.
//! - [`wire`], [`link`], [`switch`]: those messages between processes: the
//!   frames, a worker's socket to its parent, and the parent's switch
//!   between workers.

pub mod link;
pub mod mailbox;
pub mod registry;
pub mod switch;
pub mod wire;
