//! Hot upgrade (issue 22, docs/upgrade.md): the old process hands its
//! listeners and connections to a new binary over a Unix socket, and the
//! new one takes them. `old` is the old side's handover thread, `new` the
//! new side's start and its receiving thread; this file what both share:
//! the environment, the Hello exchange, one record per batch.
//!
//! Under `--procs` the supervisor upgrades worker by worker
//! ([`crate::procs::supervisor`]): it starts each new worker itself with
//! one end of the handover socket and gives the old worker the other end
//! over that worker's control socket ([`give_handover`], [`take_handover`]);
//! the two workers then run the same handover as a single process.

use std::io;
use std::time::Duration;

use c1m_io::handover::{monotonic_ns, Batch, Channel};
use c1m_io::Backend;
use c1m_proto::handover::{self, Hello, Record, Role};

pub mod new;
pub mod old;

/// The descriptor of the handover socket, in the new process only.
pub const ENV_FD: &str = "C1M_HANDOVER_FD";
/// The descriptor of a `--procs` worker's upgrade control socket: its
/// supervisor gives it the old side's end of a handover socket there.
pub const ENV_CONTROL: &str = "C1M_UPGRADE_CONTROL";
/// Test-only: makes the new process fail its side of the handover:
/// `hello` (a Hello of another version), `exit` (exits before any),
/// `conns` (exits at the first batch of connections, unacknowledged);
/// `MODE@N` fails so in `--procs` worker N only. Read only by a process
/// started with [`ENV_FD`]; never set it in production.
pub const ENV_TEST_FAIL: &str = "C1M_TEST_HANDOVER_FAIL";
/// How long each side waits for the other's Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a side waits for any other answer before it gives up.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// What the control message says (with one descriptor: the handover
/// socket's old end).
const CONTROL_MAGIC: &[u8] = b"c1m-upgrade-control-v1 handover";

/// The control socket the `--procs` supervisor gave this worker, if it is
/// one ([`ENV_CONTROL`]).
pub fn control_from_env() -> Result<Option<Channel>, String> {
    let Some(v) = std::env::var_os(ENV_CONTROL) else {
        return Ok(None);
    };
    let fd: std::os::fd::RawFd = v.to_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
        format!("{ENV_CONTROL} is not a descriptor ({v:?}); it is set by a --procs parent only")
    })?;
    // SAFETY: fcntl on a descriptor number, to see that it is open (and
    // keep it from any child we start).
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(format!(
            "{ENV_CONTROL} names descriptor {fd}, which is not open"
        ));
    }
    // SAFETY: the parent put our end of the control socket at this
    // descriptor for this process (dup2 before exec); nothing else owns it.
    let sock =
        unsafe { <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    Channel::new(sock)
        .map(Some)
        .map_err(|e| format!("{ENV_CONTROL}: the upgrade control socket: {e}"))
}

/// The supervisor's side: gives a worker the old end of a handover socket.
pub fn give_handover(control: &mut Channel, old_end: &Channel) -> io::Result<()> {
    control.set_timeout(Some(HELLO_TIMEOUT))?;
    // SAFETY: the descriptor is `old_end`'s, open for this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(old_end.as_raw_fd()) };
    control.send(0, CONTROL_MAGIC, &[fd])
}

/// The worker's side: the handover socket its supervisor gave it, if one
/// is waiting (it is sent before the supervisor's SIGUSR2). None when
/// nothing waits: a SIGUSR2 that did not come from the supervisor.
pub fn take_handover(control: &mut Channel) -> Result<Option<Channel>, String> {
    control
        .set_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| format!("the upgrade control socket: {e}"))?;
    let mut batch = Batch::default();
    match control.recv(&mut batch) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(format!("the upgrade control socket: {e}")),
    }
    let mut fds = std::mem::take(&mut batch.fds);
    if batch.payload != CONTROL_MAGIC || fds.len() != 1 {
        return Err(
            "the supervisor's control message is not a handover socket (a supervisor of another build?)"
                .into(),
        );
    }
    let sock = std::os::unix::net::UnixStream::from(fds.remove(0));
    Channel::new(sock)
        .map(Some)
        .map_err(|e| format!("the handover socket from the supervisor: {e}"))
}

/// This build's id in the Hello.
pub fn build() -> &'static str {
    concat!("c1m-server-", env!("CARGO_PKG_VERSION"))
}

fn backend(b: Backend) -> handover::Backend {
    match b {
        Backend::Epoll => handover::Backend::Epoll,
        Backend::Uring => handover::Backend::Uring,
    }
}

/// Sends our Hello (as batch 0).
pub fn send_hello(ch: &mut Channel, role: Role, shards: usize, io: Backend) -> io::Result<()> {
    let hello = Record::Hello(Hello {
        role,
        pid: std::process::id(),
        shards: shards as u32,
        backend: backend(io),
        mono_ns: monotonic_ns(),
        build: build(),
    });
    send(ch, 0, &[hello])
}

/// Sends `records` (none of which takes a descriptor) as batch `seq`.
pub fn send(ch: &mut Channel, seq: u32, records: &[Record<'_>]) -> io::Result<()> {
    let mut payload = Vec::new();
    for r in records {
        r.encode(&mut payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    }
    ch.send(seq, &payload, &[])
}

/// Receives the peer's Hello and checks it: the format's version, the
/// role, the peer's clock against ours. Returns the peer's pid and shards.
pub fn recv_hello(ch: &mut Channel, want: Role) -> Result<(u32, u32), String> {
    let mut batch = Batch::default();
    ch.recv(&mut batch).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("sent no hello within {HELLO_TIMEOUT:?}")
        }
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => {
            "closed the handover socket before its hello (did it start?)".into()
        }
        _ => format!("did not send its hello ({e})"),
    })?;
    let (hello, _) = handover::decode_hello(&batch.payload).map_err(|e| {
        if let Ok((Record::Abort(why), _)) = handover::decode(&batch.payload) {
            return format!("refused: {why}");
        }
        format!("answered with a hello this build cannot take ({e})")
    })?;
    if hello.role != want {
        return Err("answered with a hello from the wrong side of the handover".into());
    }
    if hello.mono_ns > monotonic_ns() + 1_000_000_000 {
        return Err(
            "has a CLOCK_MONOTONIC ahead of ours: not the same boot or time namespace".into(),
        );
    }
    Ok((hello.pid, hello.shards))
}
