//! Past one process's descriptor limit: the supervisor and its workers
//! (the generic process plumbing is `c1m_io::host`; the registry and link
//! that make them one server are [`crate::directory`]).

pub mod supervisor;
pub mod workers;
