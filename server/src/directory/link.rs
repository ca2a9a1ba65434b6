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
            Mail::Shutdown | Mail::ShutdownOver(_) | Mail::Present | Mail::Handover(_) => return,
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
    crate::say!("server: {why}: this worker ends so that the parent restarts it whole");
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
        other => crate::say!(
            "server: the --procs parent sent a worker what it should not ({other:?}); ignored"
        ),
    }
}

/// For the tests of the shards' side ([`super::mailbox`]): what is queued
/// for the link now.
#[cfg(test)]
impl Outbox {
    pub(super) fn queued(&self) -> Vec<Frame> {
        self.rx.try_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use c1m_proto::device_id::DeviceId;
    use c1m_proto::table::Location;

    use crate::directory::mailbox::Ask;
    use crate::directory::registry::Msg;

    fn replaced(id: &str, key: u32) -> Mail {
        Mail::Registry(Msg::Replaced {
            id: DeviceId::new(id),
            at: Location {
                shard: 3,
                key,
                gen: 2,
            },
        })
    }

    /// Every frame read from `sock` until it ends, and how it ended.
    fn read_everything(mut sock: UnixStream) -> (Vec<Frame>, Ended) {
        let mut frames = Vec::new();
        let ended = read_frames(&mut sock, |got| {
            if let Some(bytes) = got {
                let (frame, used) = Frame::decode(bytes)?.expect("a whole frame");
                assert_eq!(used, bytes.len());
                frames.push(frame);
            }
            Ok(())
        });
        (frames, ended)
    }

    #[test]
    fn frames_cross_the_socket_intact_and_in_order_then_the_close_is_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        let (link, outbox) = channel();
        let writer = std::thread::spawn(move || write_all(a, outbox));
        let reader = std::thread::spawn(move || read_everything(b));
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        for key in 0..1000 {
            link.send(key as usize % 7, replaced(&format!("dev-{key}"), key));
        }
        link.send(
            5,
            Mail::Ask {
                id: DeviceId::new("big"),
                ask: Ask::Push {
                    text: false,
                    payload: payload.clone(),
                },
                at: None,
                reply: Reply::Remote { req: 77 },
            },
        );
        link.answer(78, Answer::Delivered);
        // Said only inside a process: never sent.
        link.send(1, Mail::Shutdown);
        link.send(1, Mail::Present);
        drop(link);
        writer.join().unwrap(); // the channel closed: the writer ends, closing `a`
        let (frames, ended) = reader.join().unwrap();
        assert!(matches!(ended, Ended::Closed));
        assert_eq!(frames.len(), 1002);
        for (key, f) in frames[..1000].iter().enumerate() {
            assert_eq!(f.to as usize, key % 7);
            match &f.body {
                Body::Registry(Msg::Replaced { id, at }) => {
                    assert_eq!(id.as_str(), format!("dev-{key}"));
                    assert_eq!((at.key, at.shard, at.gen), (key as u32, 3, 2));
                }
                other => panic!("{other:?}"),
            }
        }
        match &frames[1000].body {
            Body::Ask {
                req: 77,
                ask:
                    Ask::Push {
                        text: false,
                        payload: p,
                    },
                ..
            } => assert!(*p == payload),
            other => panic!("{other:?}"),
        }
        assert_eq!(frames[1000].to, 5);
        assert_eq!(frames[1001].to, PARENT);
        assert_eq!(
            frames[1001].body,
            Body::Answer {
                req: 78,
                answer: Answer::Delivered
            }
        );
    }

    #[test]
    fn a_frame_split_across_reads_is_whole_and_each_read_ends_with_a_flush() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut bytes = Vec::new();
        Frame {
            to: 2,
            body: Body::Answer {
                req: 1,
                answer: Answer::Kicked,
            },
        }
        .encode(&mut bytes);
        let writer = std::thread::spawn(move || {
            for b in &bytes {
                a.write_all(std::slice::from_ref(b)).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        let mut frames = 0;
        let mut flushes = 0;
        let ended = read_frames(&mut b, |got| {
            match got {
                Some(f) => {
                    assert!(Frame::decode(f)?.is_some());
                    frames += 1;
                }
                None => flushes += 1,
            }
            Ok(())
        });
        writer.join().unwrap();
        assert!(matches!(ended, Ended::Closed));
        assert_eq!(frames, 1);
        assert!(flushes >= 2, "a flush per read: {flushes}");
    }

    #[test]
    fn garbage_on_the_link_is_reported_malformed() {
        let (mut a, b) = UnixStream::pair().unwrap();
        // A length far past MAX_FRAME: no frame of ours.
        a.write_all(&[0xff; 16]).unwrap();
        let (frames, ended) = read_everything(b);
        assert!(frames.is_empty());
        assert!(matches!(ended, Ended::Malformed(_)), "not reported");
    }

    #[test]
    fn a_local_question_that_strays_onto_the_link_is_answered_not_sent() {
        let (link, outbox) = channel();
        let (tx, rx) = mpsc::channel();
        link.send(
            3,
            Mail::Ask {
                id: DeviceId::new("x"),
                ask: Ask::Kick,
                at: None,
                reply: Reply::Local(tx),
            },
        );
        assert_eq!(rx.try_recv().unwrap(), Answer::NotConnected);
        assert!(outbox.rx.try_recv().is_err(), "nothing queued");
    }
}
