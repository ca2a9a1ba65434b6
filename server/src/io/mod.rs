//! The I/O driver.

pub mod epoll;
pub mod listener;
pub mod socket;
