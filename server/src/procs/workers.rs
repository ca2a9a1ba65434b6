//! What the server hands each `--procs` worker besides its arguments: its
//! link to the parent, the shared device registry and its UDP sockets, at
//! the descriptors and in the variables the worker looks for them. The
//! starting itself is `c1m_io::host::workers`.

use std::os::fd::RawFd;
use std::process::Child;
use std::sync::mpsc::Sender;

use c1m_io::host::workers::{self, Inherit, Line};

/// The descriptor a worker finds its link to the parent at (see
/// [`crate::directory::link::ENV`]).
pub const LINK_FD: i32 = 3;

/// The descriptor a worker finds the shared device registry at (see
/// [`crate::directory::registry::ENV`]).
pub const REGISTRY_FD: i32 = 4;

/// [`workers::spawn_generation`] for a server worker: its link socket
/// (with the link's variable), the registry's memfd and its UDP sockets
/// (`--udp-heartbeat`), each where the worker looks.
pub fn spawn_generation(
    worker: usize,
    generation: u64,
    args: &[String],
    lines: &Sender<Line>,
    link: Option<(RawFd, String)>,
    registry: Option<RawFd>,
    inherit: &[RawFd],
) -> Result<Child, String> {
    let mut given = Inherit::default();
    if let Some((_, env)) = &link {
        given
            .env
            .push((crate::directory::link::ENV.to_string(), env.clone()));
    }
    if registry.is_some() {
        given.env.push((
            crate::directory::registry::ENV.to_string(),
            REGISTRY_FD.to_string(),
        ));
    }
    if !inherit.is_empty() {
        let list: Vec<String> = inherit.iter().map(|fd| fd.to_string()).collect();
        given
            .env
            .push((c1m_io::udp::ENV.to_string(), list.join(",")));
    }
    given.place.extend(registry.map(|fd| (fd, REGISTRY_FD)));
    given.place.extend(link.map(|(fd, _)| (fd, LINK_FD)));
    // Its UDP sockets stay open across exec in this child only: none is at
    // LINK_FD or REGISTRY_FD (see udp::PARENT_FD_MIN).
    given.keep = inherit.to_vec();
    workers::spawn_generation(worker, generation, args, lines, given)
}
