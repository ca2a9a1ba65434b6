//! Past one process's descriptor limit: the supervisor, its workers and the
//! host's limits they are sized by.

pub mod limits;
pub mod link;
pub mod supervisor;
pub mod switch;
pub mod wire;
pub mod workers;
