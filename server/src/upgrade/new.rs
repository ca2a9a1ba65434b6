//! The new process's side of a hot upgrade: started with
//! [`super::ENV_FD`], it answers the old process's Hello, takes the
//! listeners before its shards start (it binds none), then takes the
//! connections on a thread of its own, each batch into the shards named
//! by its records as it comes; a second thread acknowledges each batch,
//! in order, once the shards hold it.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use socket2::Socket;

use c1m_io::handover::{pair, Batch, Channel};
use c1m_io::Backend;
use c1m_proto::handover::{self, Ack, ListenerRole, Record, Role};

use super::{recv_hello, send, send_hello, ENV_FD, ENV_TEST_FAIL, HELLO_TIMEOUT};
use crate::directory::mailbox::{Mail, Peer};
use crate::shard::handover::{Moved, MovedState, Order};

/// How long the new process waits for the old one's next batch.
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// What the old process gave before the shards start.
pub struct Given {
    /// One per shard, in order.
    pub listeners: Vec<Socket>,
    pub admin: Option<std::net::TcpListener>,
    /// `--udp-heartbeat`: the old process's UDP sockets, one per shard in
    /// order (empty when it had none), and its ticket key.
    pub udp: Vec<Socket>,
    pub ticket_key: Option<c1m_proto::ticket::Key>,
    pub taking: Taking,
}

/// The socket to the old process, for the connections.
pub struct Taking {
    ch: Channel,
    old_pid: u32,
    began: Instant,
}

/// Whether this process was started by a hot upgrade; then the Hello
/// exchange and the listeners. None when it was not.
pub fn begin(shards: usize, io: Backend) -> Result<Option<Given>, String> {
    let Some(v) = std::env::var_os(ENV_FD) else {
        return Ok(None);
    };
    let began = Instant::now();
    let fd: RawFd = v.to_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
        format!("{ENV_FD} is not a descriptor ({v:?}); it is set by an upgrading server only")
    })?;
    // SAFETY: fcntl on a descriptor number, to see that it is open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(format!("{ENV_FD} names descriptor {fd}, which is not open"));
    }
    // SAFETY: the old process put our end of the handover socket here for
    // this process; nothing else owns it.
    let sock = unsafe { UnixStream::from_raw_fd(fd) };
    let mut ch = Channel::new(sock).map_err(|e| format!("upgrade: the handover socket: {e}"))?;
    ch.set_timeout(Some(HELLO_TIMEOUT))
        .map_err(|e| format!("upgrade: the handover socket: {e}"))?;
    match test_fail().as_deref() {
        Some("exit") => {
            crate::say!("server: {ENV_TEST_FAIL}=exit (test only): exiting before the hello");
            std::process::exit(3);
        }
        Some("hello") => {
            crate::say!(
                "server: {ENV_TEST_FAIL}=hello (test only): answering with a hello of format v999"
            );
            // As a build of another version would: the old one's hello
            // first, then ours.
            let _ = ch.recv(&mut Batch::default());
            bad_hello(&mut ch, shards, io);
            std::process::exit(3);
        }
        _ => {}
    }
    let (old_pid, _) =
        recv_hello(&mut ch, Role::Old).map_err(|e| format!("upgrade: the old process: {e}"))?;
    send_hello(&mut ch, Role::New, shards, io)
        .map_err(|e| format!("upgrade: cannot answer the old process's hello: {e}"))?;
    ch.set_timeout(Some(BATCH_TIMEOUT))
        .map_err(|e| format!("upgrade: the handover socket: {e}"))?;
    let mut batch = Batch::default();
    ch.recv(&mut batch)
        .map_err(|e| format!("upgrade: the listeners did not come from the old process ({e})"))?;
    let fds = std::mem::take(&mut batch.fds);
    let records =
        pair(&batch.payload, fds).map_err(|e| format!("upgrade: the listeners' batch: {e}"))?;
    let mut listeners: Vec<Option<Socket>> = (0..shards).map(|_| None).collect();
    let mut udp: Vec<Option<Socket>> = (0..shards).map(|_| None).collect();
    let mut admin = None;
    let mut ticket_key = None;
    let mut taken = 0;
    for (rec, fd) in records {
        let (l, fd) = match (rec, fd) {
            (Record::Listener(l), Some(fd)) => (l, fd),
            (Record::TicketKey(k), None) => {
                ticket_key = Some(c1m_proto::ticket::Key::from_bytes(k));
                continue;
            }
            _ => {
                return Err(
                    "upgrade: the old process sent something else than its listeners".into(),
                )
            }
        };
        taken += 1;
        let at = match l.role {
            ListenerRole::Plain | ListenerRole::Tls => listeners.get_mut(l.shard as usize),
            ListenerRole::Udp => udp.get_mut(l.shard as usize),
            ListenerRole::Admin => {
                admin = Some(std::net::TcpListener::from(fd));
                continue;
            }
        };
        let Some(at) = at else {
            return Err(format!(
                "upgrade: a listener for shard {} of {shards}",
                l.shard
            ));
        };
        *at = Some(Socket::from(fd));
    }
    let listeners: Vec<Socket> = listeners.into_iter().flatten().collect();
    if listeners.len() != shards {
        return Err(format!(
            "upgrade: the old process gave {} listeners for {shards} shards",
            listeners.len()
        ));
    }
    let udp: Vec<Socket> = udp.into_iter().flatten().collect();
    if !udp.is_empty() && (udp.len() != shards || ticket_key.is_none()) {
        return Err(format!(
            "upgrade: the old process gave {} UDP sockets for {shards} shards{}",
            udp.len(),
            if ticket_key.is_none() {
                " and no ticket key"
            } else {
                ""
            }
        ));
    }
    let ack = Record::Ack(Ack {
        shard: 0,
        seq: batch.seq,
        taken,
    });
    send(&mut ch, 0, &[ack])
        .map_err(|e| format!("upgrade: cannot acknowledge the listeners: {e}"))?;
    crate::say!(
        "server: upgrade: took {} listeners{}{} from the old process (pid {old_pid}); accepting",
        listeners.len(),
        if admin.is_some() {
            " and the admin port"
        } else {
            ""
        },
        if udp.is_empty() {
            ""
        } else {
            ", its UDP sockets and ticket key"
        }
    );
    Ok(Some(Given {
        listeners,
        admin,
        udp,
        ticket_key,
        taking: Taking { ch, old_pid, began },
    }))
}

/// Test only: the failure [`ENV_TEST_FAIL`] asks of this process: its
/// value, or `MODE@N` for `--procs` worker N only (the others upgrade).
fn test_fail() -> Option<String> {
    let v = std::env::var(ENV_TEST_FAIL).ok()?;
    match v.split_once('@') {
        None => Some(v),
        Some((mode, worker)) => {
            let me = std::env::var("C1M_WORKER").ok()?;
            (me == worker).then(|| mode.to_string())
        }
    }
}

/// Test only: a Hello of format v999 (the version right after the magic).
fn bad_hello(ch: &mut Channel, shards: usize, io: Backend) {
    let mut payload = Vec::new();
    let hello = Record::Hello(handover::Hello {
        role: Role::New,
        pid: std::process::id(),
        shards: shards as u32,
        backend: super::backend(io),
        mono_ns: c1m_io::handover::monotonic_ns(),
        build: super::build(),
    });
    if hello.encode(&mut payload).is_ok() {
        let at = handover::HEADER + handover::MAGIC.len();
        payload[at..at + 2].copy_from_slice(&999u16.to_le_bytes());
        let _ = ch.send(0, &payload, &[]);
    }
}

/// Takes the connections on a thread of its own until the old process's
/// Done (or its end).
pub fn serve(
    t: Taking,
    shards: Vec<Peer>,
    nats: Option<crate::events::publisher::Notices>,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || take_all(t, shards, nats))
        .map(drop)
        .map_err(|e| format!("cannot start the handover thread: {e}"))
}

fn take_all(mut t: Taking, shards: Vec<Peer>, nats: Option<crate::events::publisher::Notices>) {
    let taken = take_batches(&mut t, &shards);
    // --nats: one `upgrade` event, once every connection is here (none
    // for the devices themselves: for presence nothing changed).
    if let (Some(n), Some(connections)) = (&nats, taken) {
        n.upgrade(crate::events::event::Upgrade {
            old_pid: t.old_pid,
            pid: std::process::id(),
            connections,
            took_ms: t.began.elapsed().as_millis() as u64,
            time_ms: c1m_io::host::unix_ms(),
        });
    }
    // However it ended: the asks the shards held for devices in transit
    // are answered now (those whose device came already were).
    for s in &shards {
        s.send_now(Mail::Handover(Order::Taken));
    }
}

/// Every batch until the old process's Done: the connections taken (None
/// if the handover ended early). Batches are read as they come and handed
/// to their shards at once; the Acks go from a thread of their own, in
/// order, as the shards report each batch held. (Waiting here for each
/// batch's shards cost a round of wake-ups per 253 connections: on a box
/// busy with a fleet's heartbeats, seconds per worker.)
fn take_batches(t: &mut Taking, shards: &[Peer]) -> Option<u64> {
    let n = shards.len();
    let acks = match t.ch.try_clone() {
        Ok(ch) => Acks::start(ch),
        Err(e) => {
            crate::say!("server: upgrade: cannot share the handover socket with the acknowledging thread ({e}); stopping the handover");
            return None;
        }
    };
    let acks = match acks {
        Ok(a) => a,
        Err(e) => {
            crate::say!("server: upgrade: cannot start the acknowledging thread ({e}); stopping the handover");
            return None;
        }
    };
    let mut batch = Batch::default();
    loop {
        let got = t.ch.recv(&mut batch);
        if let Err(e) = got {
            let total = acks.finish().unwrap_or_else(|t| t);
            crate::say!(
                "server: upgrade: the old process (pid {}) ended the handover early ({e}): serving the {total} connections taken",
                t.old_pid
            );
            return None;
        }
        if acks.failed() {
            // Said by the acknowledging thread; the old process gives up.
            let _ = acks.finish();
            return None;
        }
        match test_fail().as_deref() {
            Some("conns") => {
                crate::say!("server: {ENV_TEST_FAIL}=conns (test only): exiting at the first batch of connections");
                std::process::exit(3);
            }
            // Not a failure: each batch taken late, so that a test's
            // pushes land while devices are in transit.
            Some("slow") => std::thread::sleep(Duration::from_millis(150)),
            _ => {}
        }
        let fds = std::mem::take(&mut batch.fds);
        let records = match pair(&batch.payload, fds) {
            Ok(r) => r,
            Err(e) => {
                let total = acks.finish().unwrap_or_else(|t| t);
                let why = format!("batch {} does not decode: {e}", batch.seq);
                crate::say!("server: upgrade: {why}; stopping the handover, serving the {total} connections taken");
                let _ = send(&mut t.ch, 0, &[Record::Abort(&why)]);
                return None;
            }
        };
        let mut per: Vec<Vec<Moved>> = (0..n).map(|_| Vec::new()).collect();
        let (mut conns, mut done, mut bad) = (0u32, false, 0u32);
        let mut shard_of = 0;
        for (rec, fd) in records {
            match (rec, fd) {
                (Record::Conn(c), Some(fd)) => {
                    conns += 1;
                    shard_of = c.shard;
                    match MovedState::from_record(&c) {
                        Ok(state) => per[c.shard as usize % n].push(Moved { fd, state }),
                        Err(_) => bad += 1, // its socket closes here
                    }
                }
                (Record::Done { .. }, _) => done = true,
                _ => {} // ShardEnd: counts only
            }
        }
        if conns > 0 {
            let (tx, rx) = mpsc::channel();
            let mut asked = 0;
            for (i, group) in per.into_iter().enumerate() {
                if !group.is_empty() {
                    shards[i].send_now(Mail::Handover(Order::Take(group, tx.clone())));
                    asked += 1;
                }
            }
            acks.owe(Owed {
                seq: batch.seq,
                shard: shard_of,
                asked,
                bad,
                held: rx,
            });
        }
        if done {
            // Every batch's Ack first: the old process counts them.
            let total = match acks.finish() {
                Ok(total) => total,
                Err(_) => return None, // said by the acknowledging thread
            };
            // systemd follows the service to this process before the old
            // one, told Done, exits (Type=notify, NotifyAccess=all).
            c1m_io::host::notify::ready_or_warn(Some(std::process::id()));
            let _ = send(&mut t.ch, 0, &[Record::Done { conns: total }]);
            crate::say!(
                "server: upgrade: took over {total} connections from the old process (pid {}) in {} ms",
                t.old_pid,
                t.began.elapsed().as_millis()
            );
            return Some(total);
        }
    }
}

/// A batch handed to its shards: its Ack is owed once they hold it.
struct Owed {
    seq: u32,
    /// The shard its last record named (the Ack names it).
    shard: u32,
    /// Shards asked to take a part (each answers how many it took).
    asked: usize,
    /// Records that did not decode (their sockets closed here).
    bad: u32,
    held: mpsc::Receiver<u32>,
}

/// The acknowledging thread: Acks in the order batches came.
struct Acks {
    owed: mpsc::Sender<Owed>,
    failed: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<u64, u64>>,
}

impl Acks {
    fn start(ch: Channel) -> std::io::Result<Acks> {
        let (owed, rx) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        let thread = std::thread::Builder::new()
            .name("handover-ack".into())
            .spawn(move || acknowledge(ch, rx, &flag))?;
        Ok(Acks {
            owed,
            failed,
            thread,
        })
    }

    fn owe(&self, o: Owed) {
        // Its thread ends only once `owed` is dropped (or an Ack failed,
        // which `failed` says): a lost one only loses an Ack.
        let _ = self.owed.send(o);
    }

    /// An Ack could not be sent: the handover is over.
    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits for every Ack owed to go; the connections the shards took:
    /// Ok if every Ack went, Err (with the same count) if one failed.
    fn finish(self) -> Result<u64, u64> {
        drop(self.owed);
        // A panic there (none is expected) counts as a failed Ack.
        self.thread.join().unwrap_or(Err(0))
    }
}

fn acknowledge(
    mut ch: Channel,
    owed: mpsc::Receiver<Owed>,
    failed: &AtomicBool,
) -> Result<u64, u64> {
    let mut total = 0u64;
    let mut ok = true;
    for o in owed {
        let mut taken = 0;
        for _ in 0..o.asked {
            match o.held.recv_timeout(BATCH_TIMEOUT) {
                Ok(k) => taken += k,
                Err(_) => break,
            }
        }
        total += u64::from(taken);
        if o.bad > 0 {
            crate::say!(
                "server: upgrade: {} connection records of batch {} were invalid: closed",
                o.bad,
                o.seq
            );
        }
        if !ok {
            continue; // what the shards took still counts
        }
        let ack = Record::Ack(Ack {
            shard: o.shard,
            seq: o.seq,
            taken,
        });
        if let Err(e) = send(&mut ch, 0, &[ack]) {
            crate::say!(
                "server: upgrade: cannot acknowledge batch {} ({e}); stopping the handover, serving the connections taken",
                o.seq
            );
            ok = false;
            failed.store(true, Ordering::Relaxed);
        }
    }
    if ok {
        Ok(total)
    } else {
        Err(total)
    }
}
