//! What the server hands each `--procs` worker besides its arguments: its
//! link to the parent, the shared device registry, its UDP sockets, its
//! upgrade control socket, its TLS ticket keys (and, for a worker started
//! by a hot upgrade, its end of the handover socket), at the descriptors and in the variables
//! the worker looks for them. The starting itself is `c1m_io::host::workers`.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::Child;
use std::sync::mpsc::Sender;

use c1m_io::host::workers::{self, Inherit, Line};

/// The descriptor a worker finds its link to the parent at (see
/// [`crate::directory::link::ENV`]).
pub const LINK_FD: i32 = 3;

/// The descriptor a worker finds the shared device registry at (see
/// [`crate::directory::registry::ENV`]).
pub const REGISTRY_FD: i32 = 4;

/// The descriptor a worker finds its upgrade control socket at (see
/// [`crate::upgrade::ENV_CONTROL`]).
pub const CONTROL_FD: i32 = 5;

/// The descriptor a worker started by a hot upgrade finds its end of the
/// handover socket at (see [`crate::upgrade::ENV_FD`]).
pub const HANDOVER_FD: i32 = 6;

/// The descriptor a worker finds its TLS ticket keys' pipe at (see
/// [`c1m_io::tls_tickets::ENV`]).
pub const TLS_TICKETS_FD: i32 = c1m_io::tls_tickets::FD;

/// What a worker gets besides its arguments.
#[derive(Debug, Default)]
pub struct Given<'a> {
    /// Its link socket and the link's variable.
    pub link: Option<(RawFd, String)>,
    /// The registry's memfd.
    pub registry: Option<RawFd>,
    /// Its UDP sockets (`--udp-heartbeat`).
    pub udp: &'a [RawFd],
    /// Its end of the upgrade control socket.
    pub control: Option<RawFd>,
    /// Its end of the handover socket (a hot upgrade's new worker).
    pub handover: Option<RawFd>,
    /// The read end of a pipe holding the TLS ticket keys (`--tls-cert`).
    pub tls_tickets: Option<RawFd>,
    /// The binary to start (this one's path when None).
    pub exe: Option<PathBuf>,
}

/// [`workers::spawn_generation`] for a server worker: what `given` holds,
/// each where the worker looks.
pub fn spawn_generation(
    worker: usize,
    generation: u64,
    args: &[String],
    lines: &Sender<Line>,
    given: Given<'_>,
) -> Result<Child, String> {
    let mut inherit = Inherit {
        exe: given.exe,
        ..Inherit::default()
    };
    if let Some((_, env)) = &given.link {
        inherit
            .env
            .push((crate::directory::link::ENV.to_string(), env.clone()));
    }
    let placed = [
        (given.registry, REGISTRY_FD, crate::directory::registry::ENV),
        (given.control, CONTROL_FD, crate::upgrade::ENV_CONTROL),
        (given.handover, HANDOVER_FD, crate::upgrade::ENV_FD),
        (given.tls_tickets, TLS_TICKETS_FD, c1m_io::tls_tickets::ENV),
    ];
    for (fd, at, env) in placed {
        if let Some(fd) = fd {
            inherit.env.push((env.to_string(), at.to_string()));
            inherit.place.push((fd, at));
        }
    }
    if !given.udp.is_empty() {
        let list: Vec<String> = given.udp.iter().map(|fd| fd.to_string()).collect();
        inherit
            .env
            .push((c1m_io::udp::ENV.to_string(), list.join(",")));
    }
    inherit
        .place
        .extend(given.link.map(|(fd, _)| (fd, LINK_FD)));
    // Its UDP sockets stay open across exec in this child only: none is at
    // a placed number (see udp::PARENT_FD_MIN).
    inherit.keep = given.udp.to_vec();
    workers::spawn_generation(worker, generation, args, lines, inherit)
}
