//! c1m-client: a fleet of WebSocket devices for load-testing c1m.
//!
//! Sans-IO parts: [`ips`] (source addresses, capacity), [`rate`] (token
//! bucket), [`device`] (ids, silent selection, jitter), [`metrics`],
//! [`timeline`], [`hgrm`] (histogram files). [`fleet`] is one core's share of
//! the fleet: sockets in the server's I/O driver (io_uring or epoll) and a
//! timing wheel on a glommio executor.
//! [`run`] starts the cores and gathers their reports; [`output`] writes the
//! results directory.

pub mod device;
pub mod fleet;
pub mod hgrm;
pub mod host;
pub mod ips;
pub mod limits;
pub mod metrics;
pub mod output;
pub mod plots;
pub mod progress;
pub mod rate;
pub mod run;
pub mod spawn;
pub mod summary;
pub mod timeline;
pub mod udp_beat;
