//! Hot upgrade (issue 22, docs/upgrade.md): the old process hands its
//! listeners and connections to a new binary over a Unix socket, and the
//! new one takes them. `old` is the old side's handover thread, `new` the
//! new side's start and its receiving thread; this file what both share:
//! the environment, the Hello exchange, one record per batch.
//!
//! Single process only in v1: under `--procs` a trigger is refused.

use std::io;
use std::time::Duration;

use c1m_io::handover::{monotonic_ns, Batch, Channel};
use c1m_io::Backend;
use c1m_proto::handover::{self, Hello, Record, Role};

pub mod new;
pub mod old;

/// The descriptor of the handover socket, in the new process only.
pub const ENV_FD: &str = "C1M_HANDOVER_FD";
/// Test-only: makes the new process fail its side of the handover:
/// `hello` (a Hello of another version), `exit` (exits before any),
/// `conns` (exits at the first batch of connections, unacknowledged). Read
/// only by a process started with [`ENV_FD`]; never set it in production.
pub const ENV_TEST_FAIL: &str = "C1M_TEST_HANDOVER_FAIL";
/// How long each side waits for the other's Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a side waits for any other answer before it gives up.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

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
