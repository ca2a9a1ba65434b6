//! Past one server: lifecycle events and pushes through NATS (`--nats`).
//!
//! - [`event`]: the event value, its JSON, the subjects and presence (sans-IO).
//! - [`queue`]: the shards' bounded, non-blocking hand-off to the publisher.
//! - [`publisher`]: the thread with the async-nats client: events, presence
//!   in a JetStream KV bucket, push routing and delivery.
//!
//! `c1m watch-events` and `c1m push` (the c1m-tools crate) read and send
//! through these.

pub mod event;
pub mod publisher;
pub mod queue;

pub use event::{Ended, Event, Kind};
pub use queue::EventTx;
