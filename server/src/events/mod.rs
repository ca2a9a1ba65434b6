//! Past one server: lifecycle events and pushes through NATS (`--nats`).
//!
//! - [`event`]: the event value, its JSON, the subjects and presence (sans-IO).
//! - [`queue`]: the shards' bounded, non-blocking hand-off to the publisher.
//! - [`publisher`]: the thread with the async-nats client: events, presence
//!   in a JetStream KV bucket, push routing and delivery.
//! - [`tools`]: `server watch-events` and `server push`, for operators,
//!   tests and benchmarks.

pub mod event;
pub mod publisher;
pub mod queue;
pub mod tools;

pub use event::{Event, Kind, Reason};
pub use queue::EventTx;
