//! The old process's side of a hot upgrade: one thread, started by the
//! trigger (SIGUSR2 or `POST /upgrade`), that starts the new binary, checks
//! its Hello, hands it the listeners and then each shard's connections,
//! and reports how it went. It blocks on the socket; the shards never do
//! (they hand their connections to it by channel).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use socket2::Socket;

use c1m_io::handover::{Batch, Channel, Outbox};
use c1m_io::Backend;
use c1m_proto::handover::{self, ListenerRole, Record, Role, ShardEnd};

use super::{recv_hello, send, send_hello, ENV_FD, HELLO_TIMEOUT, STEP_TIMEOUT};
use crate::directory::mailbox::{Mail, Peer};
use crate::shard::handover::{Moved, Order, Out};

/// How long the old process waits for the pushes it took to be answered
/// before it moves connections (`--nats`; each waits at most 2 s for its
/// holder, and 1 s more while the holder's subject has no responder).
const PUSHES_QUIET: Duration = Duration::from_secs(4);

/// Payload bytes after which a batch goes out even with room for more
/// descriptors (connections carrying output or a fragmented message).
const BATCH_BYTES: usize = 4 << 20;

/// What the trigger needs to run a handover.
pub struct Plan {
    /// This binary's path, resolved from /proc/self/exe at startup (the
    /// file now at that path is what starts).
    pub exe: PathBuf,
    /// The arguments this process started with (without argv[0]).
    pub args: Vec<OsString>,
    /// The registry's memfd: the new process maps the same table.
    pub registry_fd: RawFd,
    /// Every shard, in order.
    pub shards: Vec<Peer>,
    pub backend: Backend,
    /// The listeners serve TLS (their connections are closed, not moved).
    pub tls: bool,
    /// A duplicate of the admin listener, handed over too.
    pub admin: Option<std::net::TcpListener>,
    /// Set once the new process has the admin listener: our admin thread
    /// stops accepting on it (cleared if the handover fails).
    pub admin_handed: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// `--udp-heartbeat`: the UDP sockets (duplicates go over) and the
    /// ticket key, so that the tickets devices hold stay good.
    pub udp: Option<crate::shard::UdpHeartbeat>,
    /// `--tls-cert`: the session-ticket keys, handed to the new process it
    /// starts (a pipe at its start: see `c1m_io::tls_tickets`), so that the
    /// wss devices closed here resume their sessions there. A `--procs`
    /// worker's new worker gets them from the supervisor.
    pub tls_tickets: Option<std::sync::Arc<c1m_io::tls_tickets::Ticketer>>,
    /// `--nats`: this process stops taking pushes before its first
    /// connection moves (the new process takes them all from then on, and
    /// holds those for devices on their way), and takes them again if the
    /// handover fails.
    pub nats: Option<crate::events::publisher::Notices>,
    /// A `--procs` worker's: the handover socket its supervisor gave it,
    /// the new worker (which the supervisor started) at its other end.
    /// None: this process starts the new one itself.
    pub given: Option<Channel>,
}

/// How a handover went.
#[derive(Debug, Default)]
pub struct Summary {
    pub pid: u32,
    pub listeners: usize,
    pub moved: u64,
    pub tls_closed: u64,
    pub lost: u64,
    pub hello: Duration,
    pub took: Duration,
    /// The new process did not answer Done (but lives): why.
    pub unconfirmed: Option<String>,
}

/// Starts the handover on a thread of its own.
pub fn start(plan: Plan) -> std::io::Result<std::thread::JoinHandle<Result<Summary, String>>> {
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            let done = run(plan);
            // The main thread reports it and ends the process now, not at
            // its next poll.
            c1m_io::host::signals::wake();
            done
        })
}

fn run(mut plan: Plan) -> Result<Summary, String> {
    let began = Instant::now();
    let n = plan.shards.len();
    let (mut ch, mut new) = match plan.given.take() {
        // A --procs worker: its supervisor started the new worker.
        Some(ch) => (ch, New::Sibling(None)),
        None => {
            let (ch, theirs) = Channel::pair().map_err(|e| {
                format!(
                    "upgrade refused: cannot make the handover socket ({e}); this process keeps serving"
                )
            })?;
            let child = spawn(&plan, theirs.as_raw_fd())?;
            // Ours is gone: its end closing is the child's EOF.
            drop(theirs);
            (ch, New::Child(child))
        }
    };
    let exe = plan.exe.display().to_string();
    if let Err(e) = ch.set_timeout(Some(HELLO_TIMEOUT)) {
        return Err(new.refuse(&exe, format!("could not be given a timeout ({e})")));
    }
    if let Err(e) = send_hello(&mut ch, Role::Old, n, plan.backend) {
        return Err(new.refuse(
            &exe,
            format!("closed the handover socket before our hello ({e})"),
        ));
    }
    let shards = match recv_hello(&mut ch, Role::New) {
        Ok((their_pid, s)) => {
            if let New::Sibling(pid) = &mut new {
                *pid = Some(their_pid);
            }
            s
        }
        Err(why) => return Err(new.refuse(&exe, why)),
    };
    let pid = new.pid().unwrap_or_default();
    if shards as usize != n {
        return Err(new.refuse(&exe, format!("runs {shards} shards and this one {n}: v1 hands over between equal shard counts only")));
    }
    let hello = began.elapsed();
    if let Err(e) = ch.set_timeout(Some(STEP_TIMEOUT)) {
        return Err(new.refuse(&exe, format!("could not be given a timeout ({e})")));
    }
    let mut h = Handover {
        ch,
        plan: &plan,
        seq: 1,
        in_batch: 0,
        in_flight: VecDeque::new(),
        sum: Summary {
            pid,
            hello,
            ..Summary::default()
        },
    };
    // The child lives on as the server from here: it is not waited for.
    let (tx, rx) = mpsc::channel();
    let socks = match h.take_listeners(&tx, &rx) {
        Ok(s) => s,
        Err(why) => return Err(new.refuse(&exe, why)),
    };
    let moved = socks.iter().filter(|s| s.is_some()).count();
    match h.give_listeners(&socks) {
        Ok(()) => {
            h.sum.listeners = moved;
            h.admin_handed(true);
        }
        Err(why) => {
            h.listen_again(socks);
            return Err(new.refuse(&exe, why));
        }
    }
    // A TLS server moves no connection: its devices stay here until the
    // window closes them, and so does its share of their pushes.
    if let (Some(n), false) = (&plan.nats, plan.tls) {
        if !n.quiet_pushes(PUSHES_QUIET) {
            crate::say!("server: upgrade: the pushes taken here were not all answered within {PUSHES_QUIET:?} (or NATS is away); handing the connections over anyway");
        }
    }
    for shard in 0..n {
        if let Err(why) = h.move_shard(shard, &tx, &rx) {
            // One owner for every socket: the new process goes (if it has
            // not), with the connections it took; this one serves the rest.
            let _ = new.refuse(&exe, String::new());
            h.listen_again(socks);
            return Err(format!(
                "upgrade failed after {} connections went to the new process (pid {pid}), which is killed: they and {} more are lost (their devices reconnect): {why}; this process listens again and serves what it still holds",
                h.sum.moved, h.sum.lost
            ));
        }
    }
    if let Err(why) = h.finish() {
        if new.runs() {
            // It lives and holds everything: the handover stands.
            h.sum.unconfirmed = Some(why);
        } else {
            h.listen_again(socks);
            return Err(format!(
                "upgrade failed at its end: the new process (pid {pid}) ended ({why}) with the {} connections handed over (their devices reconnect); this process listens again",
                h.sum.moved
            ));
        }
    }
    h.sum.took = began.elapsed();
    // This process exits next: the pushes it is routing are answered
    // first (not counted in the handover's time).
    if let Some(n) = &plan.nats {
        if !n.quiet_routing(PUSHES_QUIET) {
            crate::say!("server: upgrade: the pushes this process was routing were not all answered within {PUSHES_QUIET:?} (or NATS is away)");
        }
    }
    Ok(h.sum)
}

/// The new process: our child (a single process), or the supervisor's (a
/// `--procs` worker), whose pid its Hello tells.
enum New {
    Child(Child),
    Sibling(Option<u32>),
}

impl New {
    fn pid(&self) -> Option<u32> {
        match self {
            New::Child(c) => Some(c.id()),
            New::Sibling(pid) => *pid,
        }
    }

    /// Kills it (one owner for every socket), and says why in a sentence.
    fn refuse(&mut self, exe: &str, why: String) -> String {
        let pid = self.pid();
        match self {
            New::Child(child) => {
                // SAFETY: kill(2) on our own child, which we reap just below.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
                let _ = child.wait();
            }
            // The supervisor's child, which it reaps only once it has
            // ended: its pid is not reused before that (and pids are
            // handed out cyclically). Without a Hello there is no pid: our
            // end of the socket closing ends it.
            New::Sibling(Some(pid)) => unsafe {
                // SAFETY: kill(2) on the new worker whose Hello named it.
                libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            },
            New::Sibling(None) => {}
        }
        let pid = pid.map(|p| format!("pid {p}, ")).unwrap_or_default();
        format!("upgrade refused: the new process ({pid}{exe}) {why}; this process keeps serving")
    }

    /// It still runs (a sibling is taken to: its supervisor watches it).
    fn runs(&mut self) -> bool {
        match self {
            New::Child(child) => matches!(child.try_wait(), Ok(None)),
            // SAFETY: kill(2) with signal 0 only checks that it exists.
            New::Sibling(Some(pid)) => unsafe { libc::kill(*pid as libc::pid_t, 0) == 0 },
            New::Sibling(None) => false,
        }
    }
}

/// Starts the binary with our arguments, the handover socket, the
/// registry's memfd and the TLS ticket keys' pipe inherited (in the child
/// only: all stay close-on-exec here), stdout and stderr shared.
fn spawn(plan: &Plan, theirs: RawFd) -> Result<Child, String> {
    let reg = plan.registry_fd;
    let tickets = match &plan.tls_tickets {
        Some(t) => Some(t.to_pipe().map_err(|e| {
            format!("upgrade refused: cannot hand over the TLS ticket keys ({e}); this process keeps serving")
        })?),
        None => None,
    };
    let tickets_fd = tickets.as_ref().map(|p| p.as_raw_fd());
    let mut cmd = Command::new(&plan.exe);
    cmd.args(&plan.args)
        .env(ENV_FD, theirs.to_string())
        .env(crate::directory::registry::ENV, reg.to_string())
        // Ours (if we were given keys) names a descriptor gone by now.
        .env_remove(c1m_io::tls_tickets::ENV)
        .stdin(Stdio::null());
    if let Some(fd) = tickets_fd {
        cmd.env(c1m_io::tls_tickets::ENV, fd.to_string());
    }
    // SAFETY: fcntl in the forked child before exec touches no shared state.
    unsafe {
        cmd.pre_exec(move || {
            for fd in [Some(theirs), Some(reg), tickets_fd].into_iter().flatten() {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| {
        format!(
            "upgrade refused: cannot start {} ({e}); this process keeps serving",
            plan.exe.display()
        )
    })
}

struct Handover<'a> {
    ch: Channel,
    plan: &'a Plan,
    seq: u32,
    sum: Summary,
    /// Connections in the batch being filled: moved once it is acked,
    /// lost if it fails.
    in_batch: u64,
    /// Batches sent and not yet acknowledged, oldest first: at most
    /// [`WINDOW`], so that this side releases and encodes the next while
    /// the new process takes the last.
    in_flight: VecDeque<Sent>,
}

/// A batch sent, awaiting its Ack: our copies of its descriptors close
/// then; its connections are moved once acked, lost if it fails.
struct Sent {
    seq: u32,
    conns: u64,
    fds: Vec<OwnedFd>,
}

/// Batches in flight at once (each up to 253 connections): the new
/// process takes them into its shards while more come, so each round of
/// wake-ups (ours, its shards', its Acks) moves this many. Its bound: the
/// descriptors in flight on Unix sockets count against the sending user's
/// RLIMIT_NOFILE unless privileged (ETOOMANYREFS past it); 8 x 253 = 2,024
/// per handover, 8,096 with `--upgrade-parallel 4`.
const WINDOW: usize = 8;

impl Handover<'_> {
    /// Every shard stops accepting and hands its listener back.
    fn take_listeners(
        &mut self,
        tx: &mpsc::Sender<Out>,
        rx: &Receiver<Out>,
    ) -> Result<Vec<Option<Socket>>, String> {
        let n = self.plan.shards.len();
        for p in &self.plan.shards {
            p.send_now(Mail::Handover(Order::GiveListener(tx.clone())));
        }
        let mut socks: Vec<Option<Socket>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            match rx.recv_timeout(HELLO_TIMEOUT) {
                Ok(Out::Listener { shard, sock }) if shard < n => socks[shard] = sock,
                _ => {
                    self.listen_again(socks);
                    return Err("a shard did not hand its listener over in time".into());
                }
            }
        }
        Ok(socks)
    }

    /// The listeners (duplicates: ours stay open until the end) in one batch.
    fn give_listeners(&mut self, socks: &[Option<Socket>]) -> Result<(), String> {
        let role = if self.plan.tls {
            ListenerRole::Tls
        } else {
            ListenerRole::Plain
        };
        let mut out = Outbox::default();
        let mut put = |shard: usize, role, fd: std::io::Result<OwnedFd>, addr| {
            let fd = fd.map_err(|e| format!("cannot duplicate a listener ({e})"))?;
            let rec = Record::Listener(handover::Listener {
                shard: shard as u32,
                role,
                addr,
            });
            out.push(&rec, Some(fd)).map_err(|e| e.to_string())
        };
        let any = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        for (shard, s) in socks.iter().enumerate() {
            let Some(s) = s else { continue };
            let addr = s
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or(any);
            put(shard, role, s.try_clone().map(OwnedFd::from), addr)?;
        }
        if let Some(a) = &self.plan.admin {
            let addr = a.local_addr().unwrap_or(any);
            put(
                0,
                ListenerRole::Admin,
                a.try_clone().map(OwnedFd::from),
                addr,
            )?;
        }
        if let Some(u) = &self.plan.udp {
            // Ours stay open until we exit, as the listeners do: a socket
            // of the group closing would move another into its place.
            for (shard, s) in u.sockets.iter().enumerate() {
                let addr = s
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .unwrap_or(any);
                put(
                    shard,
                    ListenerRole::Udp,
                    s.try_clone().map(OwnedFd::from),
                    addr,
                )?;
            }
            out.push(&Record::TicketKey(u.key.to_bytes()), None)
                .map_err(|e| e.to_string())?;
        }
        // Acknowledged before any connection moves.
        self.flush(&mut out)?;
        self.settle()
    }

    /// Whether our admin thread leaves the admin port to the new process.
    fn admin_handed(&self, handed: bool) {
        if let Some(h) = &self.plan.admin_handed {
            h.store(handed, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Our listeners back to their shards (the handover failed), the
    /// admin port to our admin thread, and the pushes (`--nats`) here again.
    fn listen_again(&self, socks: Vec<Option<Socket>>) {
        self.admin_handed(false);
        if let Some(n) = &self.plan.nats {
            n.resume_pushes();
        }
        for (shard, s) in socks.into_iter().enumerate() {
            if let Some(s) = s {
                self.plan.shards[shard].send_now(Mail::Handover(Order::Listen(s)));
            }
        }
    }

    /// Sends `out` as the next batch; once [`WINDOW`] are in flight, waits
    /// for the oldest one's Ack.
    fn flush(&mut self, out: &mut Outbox) -> Result<(), String> {
        if out.is_empty() {
            return Ok(());
        }
        let seq = self.seq;
        self.seq += 1;
        let conns = std::mem::take(&mut self.in_batch);
        // Failed: its connections are lost (their sockets close with our
        // copies, or died with the new process), and those in flight.
        let fds = match out.flush(&mut self.ch, seq) {
            Ok(fds) => fds,
            Err(e) => {
                self.sum.lost += conns;
                self.lose_in_flight();
                return Err(format!("cannot send batch {seq} ({e})"));
            }
        };
        self.in_flight.push_back(Sent { seq, conns, fds });
        while self.in_flight.len() >= WINDOW {
            self.settle_oldest()?;
        }
        Ok(())
    }

    /// The handover failed: the batches in flight are lost (their
    /// sockets close with our copies, or died with the new process).
    fn lose_in_flight(&mut self) {
        self.sum.lost += self.in_flight.drain(..).map(|b| b.conns).sum::<u64>();
    }

    /// Waits for every batch in flight to be acknowledged.
    fn settle(&mut self) -> Result<(), String> {
        while !self.in_flight.is_empty() {
            self.settle_oldest()?;
        }
        Ok(())
    }

    /// The oldest batch in flight's Ack: its connections counted moved
    /// (or lost: those the new process could not take, or all of those
    /// in flight if it failed).
    fn settle_oldest(&mut self) -> Result<(), String> {
        let Some(b) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let taken = match self.ack(b.seq) {
            Ok(t) => u64::from(t),
            Err(why) => {
                self.sum.lost += b.conns;
                self.lose_in_flight();
                return Err(why);
            }
        };
        // The new process closed those it could not take: counted.
        let refused = (b.fds.len() as u64).saturating_sub(taken);
        self.sum.lost += refused.min(b.conns);
        self.sum.moved += b.conns - refused.min(b.conns);
        Ok(())
    }

    /// Waits for the Ack of batch `seq`; what the new process took.
    fn ack(&mut self, seq: u32) -> Result<u32, String> {
        let mut batch = Batch::default();
        self.ch
            .recv(&mut batch)
            .map_err(|e| format!("no acknowledgement of batch {seq} ({e})"))?;
        match handover::decode(&batch.payload) {
            Ok((Record::Ack(a), _)) if a.seq == seq => Ok(a.taken),
            Ok((Record::Abort(why), _)) => Err(format!("it gave up: {why}")),
            Ok(_) => Err(format!(
                "it answered batch {seq} with something else than its acknowledgement"
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Shard `shard`'s connections, as it hands them over, in batches.
    fn move_shard(
        &mut self,
        shard: usize,
        tx: &mpsc::Sender<Out>,
        rx: &Receiver<Out>,
    ) -> Result<(), String> {
        let peer = &self.plan.shards[shard];
        peer.send_now(Mail::Handover(Order::MoveConns(tx.clone())));
        let mut out = Outbox::default();
        let mut sent = 0u32;
        loop {
            let got = match rx.recv_timeout(STEP_TIMEOUT) {
                Ok(got) => got,
                Err(_) => {
                    return Err(format!(
                        "shard {shard} did not hand its connections over within {STEP_TIMEOUT:?}"
                    ))
                }
            };
            match got {
                Out::Conns(conns) => {
                    let mut conns = conns.into_iter();
                    while let Some(Moved { fd, state }) = conns.next() {
                        if out.is_full() || out.bytes() >= BATCH_BYTES {
                            if let Err(why) = self.flush(&mut out) {
                                // Those not sent yet stay here.
                                self.take_back(shard, rx, conns.collect());
                                return Err(why);
                            }
                        }
                        match out.push(&Record::Conn(state.record()), Some(fd)) {
                            Ok(()) => {
                                sent += 1;
                                self.in_batch += 1;
                            }
                            Err(_) => self.sum.lost += 1, // closed: its record does not encode
                        }
                    }
                }
                Out::End {
                    moved: _,
                    tls_closed,
                    lost,
                    ..
                } => {
                    self.sum.tls_closed += u64::from(tls_closed);
                    self.sum.lost += u64::from(lost);
                    self.flush(&mut out)?;
                    // A failure shows here, with this shard's part.
                    self.settle()?;
                    let end = Record::ShardEnd(ShardEnd {
                        shard: shard as u32,
                        listeners: 1,
                        conns: sent,
                    });
                    return send(&mut self.ch, 0, &[end])
                        .map_err(|e| format!("cannot end shard {shard}'s part ({e})"));
                }
                Out::Listener { .. } => {}
            }
        }
    }

    /// The handover failed while shard `shard` handed over: it stops, and
    /// what it handed over and is not sent yet goes back to it.
    fn take_back(&self, shard: usize, rx: &Receiver<Out>, mut back: Vec<Moved>) {
        let peer = &self.plan.shards[shard];
        peer.send_now(Mail::Handover(Order::StopMoving));
        loop {
            match rx.recv_timeout(STEP_TIMEOUT) {
                Ok(Out::Conns(more)) => back.extend(more),
                Ok(Out::End { .. }) | Err(_) => break,
                Ok(Out::Listener { .. }) => {}
            }
        }
        if !back.is_empty() {
            let (tx, _rx) = mpsc::channel();
            peer.send_now(Mail::Handover(Order::Take(back, tx)));
        }
    }

    /// Done, and the new process's Done back.
    fn finish(&mut self) -> Result<(), String> {
        self.settle()?;
        send(
            &mut self.ch,
            0,
            &[Record::Done {
                conns: self.sum.moved,
            }],
        )
        .map_err(|e| e.to_string())?;
        let mut batch = Batch::default();
        self.ch.recv(&mut batch).map_err(|e| e.to_string())?;
        match handover::decode(&batch.payload) {
            Ok((Record::Done { .. }, _)) => Ok(()),
            Ok((Record::Abort(why), _)) => Err(format!("it gave up: {why}")),
            _ => Err("it answered our Done with something else".into()),
        }
    }
}
