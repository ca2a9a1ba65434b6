//! A `--procs` worker's line to the rest of the server: one Unix socket to
//! the parent, which routes frames between workers ([`super::switch`]).
//!
//! Shards never touch the socket. They queue [`Frame`]s on a channel (a
//! send that never waits) and two threads of the worker do the I/O: the
//! writer encodes and writes whatever is queued, many frames per write;
//! the reader decodes what arrives and hands it to the local shards, one
//! wake-up per shard per read.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};

use super::mailbox::{Answer, Mail, Peers, Reply};
use super::wire::{frame_len, Body, Frame, Malformed, PARENT};

/// The shards' end of the link: clone it into each shard's peers.
#[derive(Clone)]
pub struct Link {
    tx: Sender<Frame>,
}

/// What the link's writer takes from the shards.
pub struct Outbox {
    rx: Receiver<Frame>,
}

/// The link's two ends, before the socket is running.
pub fn channel() -> (Link, Outbox) {
    let (tx, rx) = mpsc::channel();
    (Link { tx }, Outbox { rx })
}

impl Link {
    /// Queues `mail` for shard `to` of another worker.
    pub fn send(&self, to: usize, mail: Mail) {
        let body = match mail {
            Mail::Registry(msg) => Body::Registry(msg),
            Mail::Ask {
                id,
                ask,
                at,
                reply: Reply::Remote { req },
            } => Body::Ask { req, id, ask, at },
            // A question from a thread of this process only ever goes to
            // shards of this process (a parent asks over the link): if
            // one strays, it is answered rather than left to time out.
            Mail::Ask {
                reply: Reply::Local(tx),
                ..
            } => {
                let _ = tx.send(Answer::NotConnected);
                return;
            }
            // Said to a process's own shards, never across.
            Mail::Shutdown | Mail::Present => return,
        };
        // A closed channel means the writer ended (the parent is gone, and
        // this worker is being stopped): nothing left to tell.
        let _ = self.tx.send(Frame {
            to: to as u32,
            body,
        });
    }

    /// Sends an answer to the parent's question `req`.
    pub fn answer(&self, req: u64, answer: Answer) {
        let _ = self.tx.send(Frame {
            to: PARENT,
            body: Body::Answer { req, answer },
        });
    }
}

/// The environment variable a `--procs` parent gives each worker:
/// `FD,BASE,TOTAL`: its socket, its first shard's number and the server's
/// shard count.
pub const ENV: &str = "C1M_LINK";

/// The link the parent set up for this worker, if it is one: (its socket,
/// its first shard's number, the server's shard count, the link's ends).
#[allow(clippy::type_complexity)]
pub fn from_env() -> Result<Option<(UnixStream, usize, usize, (Link, Outbox))>, String> {
    let Some(v) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    let bad = || format!("{ENV} is not FD,BASE,TOTAL ({v:?}); it is set by a --procs parent only");
    let s = v.to_str().ok_or_else(bad)?;
    let n: Vec<usize> = s
        .split(',')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let [fd, base, total] = n[..] else {
        return Err(bad());
    };
    // SAFETY: the parent put the socket at this descriptor for this
    // process alone (dup2 before exec); nothing else here owns it.
    let fd = fd as std::os::fd::RawFd;
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("{ENV} names descriptor {fd}, which is not open"));
    }
    let sock = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: FD_CLOEXEC on our own descriptor: no child inherits it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Some((sock, base, total, channel())))
}

/// Runs the link over `sock`: a writer for `outbox`, a reader delivering
/// to `shards` (this worker's, numbered over the whole server).
pub fn run(sock: UnixStream, outbox: Outbox, shards: Peers) -> Result<(), String> {
    let read_half = sock
        .try_clone()
        .map_err(|e| format!("cannot use the link to the --procs parent: {e}"))?;
    spawn("link-out", move || write_all(sock, outbox))?;
    spawn("link-in", move || read_all(read_half, shards))?;
    Ok(())
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(|e| format!("cannot start the {name} thread: {e}"))
}

/// Frames per write, at most about this many bytes (a burst of
/// registrations goes out in few system calls).
const BATCH: usize = 64 << 10;

fn write_all(mut sock: UnixStream, outbox: Outbox) {
    if let Err(e) = write_batched(&mut sock, &outbox.rx, |frame, buf| frame.encode(buf)) {
        end_worker(&format!("cannot write to the --procs parent ({e})"));
    }
}

/// Writes what `rx` brings to `sock` until the channel closes, for the
/// link and the parent's switch alike: what queued up meanwhile goes out
/// in the same write, up to about [`BATCH`] bytes. Ends at the first
/// failed write, with its error.
pub fn write_batched<T>(
    sock: &mut UnixStream,
    rx: &Receiver<T>,
    encode: impl Fn(T, &mut Vec<u8>),
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(BATCH);
    while let Ok(first) = rx.recv() {
        buf.clear();
        encode(first, &mut buf);
        while buf.len() < BATCH {
            match rx.try_recv() {
                Ok(more) => encode(more, &mut buf),
                Err(_) => break,
            }
        }
        sock.write_all(&buf)?;
    }
    Ok(())
}

fn read_all(mut sock: UnixStream, mut shards: Peers) {
    let ended = read_frames(&mut sock, |got| {
        match got {
            Some(bytes) => match Frame::decode(bytes)? {
                Some((frame, _)) => deliver(&mut shards, frame),
                None => return Err(Malformed("a frame cut short")),
            },
            None => shards.flush(),
        }
        Ok(())
    });
    match ended {
        Ended::Closed => end_worker("the --procs parent closed the link"),
        Ended::Failed(e) => end_worker(&format!("cannot read from the --procs parent ({e})")),
        Ended::Malformed(why) => end_worker(&format!(
            "the --procs parent sent a malformed frame ({why}); please report this"
        )),
    }
}

/// A worker without its link is half a server (its devices' ids unknown to
/// the others, theirs to it): it ends at once, non-zero, in one sentence,
/// and the parent starts it again whole.
fn end_worker(why: &str) -> ! {
    eprintln!("server: {why}: this worker ends so that the parent restarts it whole");
    std::process::exit(1)
}

/// Why a link's reading stopped.
pub enum Ended {
    /// The other end closed it.
    Closed,
    Failed(std::io::Error),
    Malformed(&'static str),
}

/// Reads whole frames from `sock` until it ends, for the link and the
/// parent's switch alike: `on(Some(frame))` for each frame's bytes, then
/// `on(None)` once the frames of one read are done.
pub fn read_frames(
    sock: &mut UnixStream,
    mut on: impl FnMut(Option<&[u8]>) -> Result<(), Malformed>,
) -> Ended {
    let mut buf: Vec<u8> = Vec::with_capacity(BATCH);
    let mut chunk = vec![0u8; BATCH];
    loop {
        let n = match sock.read(&mut chunk) {
            Ok(0) => return Ended::Closed,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Ended::Failed(e),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        loop {
            let len = match frame_len(&buf[used..]) {
                Ok(Some(len)) if buf.len() - used >= len => len,
                Ok(_) => break,
                Err(e) => return Ended::Malformed(e.0),
            };
            if let Err(e) = on(Some(&buf[used..used + len])) {
                return Ended::Malformed(e.0);
            }
            used += len;
        }
        buf.drain(..used);
        if let Err(e) = on(None) {
            return Ended::Malformed(e.0);
        }
    }
}

fn deliver(shards: &mut Peers, frame: Frame) {
    let to = frame.to as usize;
    match frame.body {
        Body::Registry(msg) => shards.send(to, Mail::Registry(msg)),
        Body::Ask { req, id, ask, at } => shards.send(
            to,
            Mail::Ask {
                id,
                ask,
                at,
                reply: Reply::Remote { req },
            },
        ),
        other => eprintln!(
            "server: the --procs parent sent a worker what it should not ({other:?}); ignored"
        ),
    }
}
