//! The `--procs` parent's router: one Unix socket per worker, frames passed
//! from one worker to another by their destination shard, and the parent's
//! own questions (its admin listener's) sent and answered, so that N
//! worker processes are one server for the device registry.
//!
//! Why a star through the parent and not a mesh between workers: one
//! socket and two threads per worker instead of N - 1 sockets each, and a
//! restarted worker is re-attached in one place. The cost is one more hop
//! (a read and a write in the parent) per message that crosses workers.
//! Per worker the parent runs a reader (routes what the worker sends) and
//! a writer (writes what is routed to it, many frames per write).

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use c1m_proto::device_id::DeviceId;

use super::link::{read_frames, write_batched, Ended};
use super::mailbox::{Answer, Ask};
use super::registry;
use super::wire::{self, Body, Frame, PARENT};

/// A worker's previous writer, replaced by [`Switch::attach`]: its thread
/// (and its end of the socket) lives as long as this value.
#[must_use]
pub struct Standby(Option<Sender<Vec<u8>>>);

#[derive(Clone)]
pub struct Switch {
    inner: Arc<Inner>,
}

struct Inner {
    /// Per worker: its first shard (over the server) and how many it runs.
    ranges: Vec<(u32, u32)>,
    total: u32,
    /// Per worker: the channel to its current incarnation's writer.
    writers: Mutex<Vec<Option<Sender<Vec<u8>>>>>,
    /// The parent's questions awaiting their answers.
    waiting: Mutex<HashMap<u64, Sender<Answer>>>,
    next_req: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps and channels: a panicked holder cannot leave them torn.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Switch {
    /// For workers running `shards[i]` shards each, numbered in order.
    pub fn new(shards: &[usize]) -> Switch {
        let mut ranges = Vec::with_capacity(shards.len());
        let mut first = 0u32;
        for &n in shards {
            ranges.push((first, n as u32));
            first += n as u32;
        }
        Switch {
            inner: Arc::new(Inner {
                ranges,
                total: first,
                writers: Mutex::new(vec![None; shards.len()]),
                waiting: Mutex::new(HashMap::new()),
                next_req: AtomicU64::new(1),
            }),
        }
    }

    /// Worker `i`'s first shard over the server, and the server's shards.
    pub fn span(&self, i: usize) -> (u32, u32) {
        (self.inner.ranges[i].0, self.inner.total)
    }

    /// Worker `i`'s shards: its first (over the server) and how many.
    pub fn span_of(&self, i: usize) -> (u32, u32) {
        self.inner.ranges[i]
    }

    /// The worker running shard `shard`, and that shard's index there.
    pub fn place(&self, shard: u32) -> Option<(usize, u32)> {
        self.inner
            .ranges
            .iter()
            .position(|&(first, n)| (first..first + n).contains(&shard))
            .map(|w| (w, shard - self.inner.ranges[w].0))
    }

    /// Routes for worker `i`'s new incarnation over `sock` (the parent's
    /// end of its socket pair). The previous one's writer is returned: it
    /// lives while that is held (a hot upgrade keeps it to route to the
    /// old process again if the new one fails), and ends when it drops.
    /// The previous one's reader goes on routing what it still sends.
    pub fn attach(&self, i: usize, sock: UnixStream) -> Result<Standby, String> {
        let read_half = sock
            .try_clone()
            .map_err(|e| format!("cannot use the socket to worker {i}: {e}"))?;
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let previous = lock(&self.inner.writers)[i].replace(tx);
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map(|_| ())
                .map_err(|e| format!("cannot start a router thread for worker {i}: {e}"))
        };
        spawn(
            format!("to-worker{i}"),
            Box::new(move || write_all(sock, rx)),
        )?;
        let me = self.clone();
        spawn(
            format!("from-worker{i}"),
            Box::new(move || me.route_all(i, read_half)),
        )?;
        Ok(Standby(previous))
    }

    /// Routes to worker `i` over the writer `attach` returned again (a hot
    /// upgrade whose new process failed: the old one serves on).
    pub fn restore(&self, i: usize, standby: Standby) {
        if let Some(tx) = standby.0 {
            lock(&self.inner.writers)[i] = Some(tx);
        }
    }

    /// Asks the owner shard of `id`, and waits up to `timeout` for the
    /// answer: None if none came (a worker down or restarting).
    pub fn ask(&self, id: DeviceId, ask: Ask, timeout: Duration) -> Option<Answer> {
        let (tx, rx) = mpsc::channel();
        let owner = registry::owner(id.as_str(), self.inner.total as usize) as u32;
        let req = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
        let mut bytes = Vec::new();
        Frame {
            to: owner,
            body: Body::Ask {
                req,
                id,
                ask,
                at: None,
            },
        }
        .encode(&mut bytes);
        lock(&self.inner.waiting).insert(req, tx);
        let answer = if self.forward(owner, bytes) {
            rx.recv_timeout(timeout).ok()
        } else {
            None
        };
        lock(&self.inner.waiting).remove(&req);
        answer
    }

    /// Passes a frame to the worker running shard `to`; false if none.
    fn forward(&self, to: u32, bytes: Vec<u8>) -> bool {
        let Some((w, _)) = self.place(to) else {
            return false;
        };
        match &lock(&self.inner.writers)[w] {
            Some(tx) => tx.send(bytes).is_ok(),
            None => false,
        }
    }

    /// Reads worker `i`'s frames until its socket ends, routing each.
    fn route_all(&self, i: usize, mut sock: UnixStream) {
        let ended = read_frames(&mut sock, |got| {
            if let Some(frame) = got {
                match wire::destination(frame) {
                    Some(PARENT) => self.answered(i, frame),
                    // A worker that is down (restarting) loses what was
                    // for it: its devices are gone (the parent swept them
                    // from the registry).
                    Some(to) => drop(self.forward(to, frame.to_vec())),
                    None => {}
                }
            }
            Ok(())
        });
        match ended {
            // The worker exited; the supervisor restarts it.
            Ended::Closed => {}
            Ended::Failed(e) => crate::say!("server: cannot read from worker {i} ({e}); its registry messages are lost until it restarts"),
            Ended::Malformed(why) => crate::say!("server: worker {i} sent a malformed frame ({why}): its link is closed; please report this"),
        }
    }

    fn answered(&self, i: usize, frame: &[u8]) {
        match Frame::decode(frame) {
            Ok(Some((
                Frame {
                    body: Body::Answer { req, answer },
                    ..
                },
                _,
            ))) => {
                if let Some(tx) = lock(&self.inner.waiting).remove(&req) {
                    let _ = tx.send(answer);
                }
            }
            other => crate::say!(
                "server: worker {i} sent the parent what it should not ({other:?}); ignored"
            ),
        }
    }
}

fn write_all(mut sock: UnixStream, rx: Receiver<Vec<u8>>) {
    // A failed write is a worker that died: its replacement gets a new socket.
    let _ = write_batched(&mut sock, &rx, |bytes, buf| buf.extend_from_slice(&bytes));
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;

    use c1m_proto::table::Location;

    use super::super::link::{read_frames, Ended};

    fn encode(frame: Frame) -> Vec<u8> {
        let mut b = Vec::new();
        frame.encode(&mut b);
        b
    }

    /// The next frame a worker's end receives.
    fn next_frame(sock: &mut UnixStream) -> Frame {
        let mut got = None;
        let _ = read_frames(sock, |f| {
            if let Some(bytes) = f {
                got = Some(Frame::decode(bytes)?.unwrap().0);
                // Stop reading: one frame is enough.
                return Err(wire::Malformed("got one"));
            }
            Ok(())
        });
        got.expect("a frame before the end")
    }

    #[test]
    fn spans_and_places_number_shards_over_the_workers() {
        let s = Switch::new(&[2, 3]);
        assert_eq!(s.span(0), (0, 5));
        assert_eq!(s.span(1), (2, 5));
        assert_eq!(s.span_of(1), (2, 3));
        assert_eq!(s.place(0), Some((0, 0)));
        assert_eq!(s.place(1), Some((0, 1)));
        assert_eq!(s.place(2), Some((1, 0)));
        assert_eq!(s.place(4), Some((1, 2)));
        assert_eq!(s.place(5), None);
    }

    #[test]
    fn a_frame_from_one_worker_reaches_the_worker_of_its_shard_intact() {
        let s = Switch::new(&[1, 2]);
        let (p0, mut w0) = UnixStream::pair().unwrap();
        let (p1, mut w1) = UnixStream::pair().unwrap();
        drop(s.attach(0, p0).unwrap());
        drop(s.attach(1, p1).unwrap());
        let frame = Frame {
            to: 2,
            body: Body::Registry(registry::Msg::Replaced {
                id: DeviceId::new("02:00:5e:00:00:01"),
                at: Location {
                    shard: 2,
                    key: 41,
                    gen: 7,
                },
            }),
        };
        w0.write_all(&encode(frame.clone())).unwrap();
        w1.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(next_frame(&mut w1), frame);
        // And back, to worker 0's shard.
        let back = Frame { to: 0, ..frame };
        w1.write_all(&encode(back.clone())).unwrap();
        w0.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(next_frame(&mut w0), back);
    }

    #[test]
    fn the_parents_question_goes_to_the_owner_and_its_answer_comes_back() {
        let s = Switch::new(&[2, 2]);
        let mut workers = Vec::new();
        for i in 0..2 {
            let (p, w) = UnixStream::pair().unwrap();
            drop(s.attach(i, p).unwrap());
            w.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            workers.push(w);
        }
        let id = DeviceId::new("dev-7");
        let owner = registry::owner(id.as_str(), 4) as u32;
        let (w, _) = s.place(owner).unwrap();
        let mut sock = workers.swap_remove(w);
        let answering = std::thread::spawn(move || {
            let f = next_frame(&mut sock);
            let Body::Ask { req, ask, .. } = f.body else {
                panic!("{f:?}");
            };
            assert_eq!(ask, Ask::Kick);
            sock.write_all(&encode(Frame {
                to: PARENT,
                body: Body::Answer {
                    req,
                    answer: Answer::Kicked,
                },
            }))
            .unwrap();
            (f.to, sock)
        });
        let answer = s.ask(id, Ask::Kick, Duration::from_secs(5));
        let (to, _sock) = answering.join().unwrap();
        assert_eq!(to, owner);
        assert_eq!(answer, Some(Answer::Kicked));
    }

    #[test]
    fn a_question_to_a_worker_that_is_gone_gets_no_answer() {
        let s = Switch::new(&[1]);
        // Never attached: nothing to send to.
        assert_eq!(
            s.ask(DeviceId::new("a"), Ask::Lookup, Duration::from_millis(50)),
            None
        );
        // Attached, then its end closed: the question is lost, not answered.
        let (p, w) = UnixStream::pair().unwrap();
        drop(s.attach(0, p).unwrap());
        drop(w);
        let t = std::time::Instant::now();
        assert_eq!(
            s.ask(DeviceId::new("a"), Ask::Lookup, Duration::from_millis(200)),
            None
        );
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn the_writer_batches_what_is_queued_and_ends_when_the_socket_breaks() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let frames: Vec<Frame> = (0..300)
            .map(|i| Frame {
                to: i,
                body: Body::Answer {
                    req: i as u64,
                    answer: Answer::Delivered,
                },
            })
            .collect();
        for f in &frames {
            tx.send(encode(f.clone())).unwrap();
        }
        drop(tx);
        write_all(a, rx); // returns when the channel is closed
        let mut got = Vec::new();
        let ended = read_frames(&mut b, |f| {
            if let Some(bytes) = f {
                got.push(Frame::decode(bytes)?.unwrap().0);
            }
            Ok(())
        });
        assert!(matches!(ended, Ended::Closed));
        assert!(got == frames);
        // A broken socket: the writer stops rather than spin.
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let (tx, rx) = mpsc::channel();
        tx.send(vec![0; 1024]).unwrap();
        tx.send(vec![0; 1024]).unwrap();
        write_all(a, rx); // returns though tx is still open
        drop(tx);
    }
}
