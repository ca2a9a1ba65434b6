//! The publisher: one thread per process with a tokio current-thread
//! runtime and one async-nats client. Woken by the shards' doorbell, it
//! drains their queue in batches, publishes the events a few hundred to a
//! NATS message (one JSON object per line) and flushes once per batch; it keeps device presence in a JetStream KV bucket; it routes
//! pushes (`<prefix>.push.<id>`) to the server holding the device and
//! delivers the ones for its own devices to their shards by message. The
//! shards never wait on any of it.
//!
//! Bounded everywhere: the shards' queue (`--nats-queue`, full: dropped and
//! counted by the shard), the presence queue (full: dropped, counted here),
//! async-nats's own command queue while the broker is away
//! ([`CLIENT_CAPACITY`]: when it is full the publisher waits, the shards'
//! queue fills and the shards drop), pushes in flight ([`PUSHES_IN_FLIGHT`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_nats::jetstream::kv;
use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use c1m_proto::device_id::DeviceId;

use super::event::{self, Batcher, Event, Kind, Origin, Presence, Subjects, Topic, Upgrade};
use super::queue::{self, Doorbell, EventTx};
use crate::directory::mailbox::{Answer, Ask, Mail, Peer, Reply};

/// Events taken from the queue per batch (one flush each).
const BATCH: usize = 4096;
/// Bytes of events per NATS message (about 300 events; NATS's default
/// max_payload is 1 MiB).
const MESSAGE_BYTES: usize = 64 * 1024;
/// How long the publisher lets events gather once woken: it bounds its
/// wake-ups to 200 a second under any load, and adds at most this to an
/// event's delivery.
const LINGER: Duration = Duration::from_millis(5);
/// Commands async-nats holds at most while the broker is away (or slow):
/// `--nats-queue` up to this; past it the publisher waits and the shards'
/// queue takes the overflow.
pub const CLIENT_CAPACITY: usize = 8192;
/// Pushes being routed or delivered at once by this process.
const PUSHES_IN_FLIGHT: usize = 1024;
/// How long a push waits for the holder (and the holder for its shard).
const PUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// A push whose holder's subject has no responder is asked again this
/// many times, this far apart, before it is answered "not connected" (so
/// a push to a device of a server that died takes a second to say so).
const NO_RESPONDERS_RETRIES: u32 = 10;
const NO_RESPONDERS_PAUSE: Duration = Duration::from_millis(100);
/// The queue group of a worker's deliver subject (see [`deliver_pushes`]),
/// and that of every server's routing of `<prefix>.push.>`.
const DELIVER_GROUP: &str = "c1m-deliver";
const ROUTE_GROUP: &str = "c1m-push";
/// How long the publisher works on after the shards have stopped.
const FINAL_GRACE: Duration = Duration::from_secs(2);

/// How to reach the broker, from the server's flags.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// A NATS .creds file (JWT and nkey seed).
    pub creds: Option<PathBuf>,
    /// A file: the user name on the first line, the password on the second.
    pub user_file: Option<PathBuf>,
    /// A file holding a token on its first line.
    pub token_file: Option<PathBuf>,
}

#[derive(Clone)]
pub struct Config {
    pub url: String,
    pub auth: Auth,
    pub prefix: String,
    pub origin: Origin,
    /// Events the shards' queue holds at most.
    pub queue: usize,
    /// Every shard of this process (to deliver pushes).
    pub peers: Vec<Peer>,
    pub max_message: usize,
    /// --nats-exclusive: close devices here that connect to another server.
    pub exclusive: bool,
    /// Shards over the whole server (all `--procs` workers), to find an
    /// id's owner.
    pub shards_total: usize,
    /// Upgraded connections held by this process (for the snapshot marker),
    /// kept up to date by the main thread from the shards' reports.
    pub live: Arc<AtomicU64>,
}

/// What the publisher counts (read by the main thread for the stats line).
#[derive(Debug, Default)]
pub struct Stats {
    pub published: AtomicU64,
    pub publish_errors: AtomicU64,
    pub presence_dropped: AtomicU64,
    pub broker_connects: AtomicU64,
    pub pushes_routed: AtomicU64,
    pub pushes_delivered: AtomicU64,
    /// --nats-exclusive: connect events refused for a time too far ahead
    /// ([`MAX_CLOCK_SKEW_MS`]).
    pub connects_refused: AtomicU64,
}

/// What other threads of the process ask the publisher to say (not the
/// shards' events, which have their queue): a hot upgrade's event.
#[derive(Clone)]
pub struct Notices {
    upgrades: Arc<Mutex<Vec<Upgrade>>>,
    bell: Arc<Doorbell>,
    pushes: Arc<PushGate>,
    routing: Arc<PushGate>,
}

/// Whether this process takes pushes for its devices (or routes pushes),
/// and the word that it has stopped. A hot upgrade's old process stops before it moves any
/// connection: the deliver subject is a queue group, so from then on the
/// new process (the other member, which holds an ask for a device on its
/// way until it arrives) takes each push, and no push is delivered twice
/// or answered "not connected" by the process that handed its device over.
struct PushGate {
    take: watch::Sender<bool>,
    /// Set by [`PushGate::quiet`]; the gate's subscription says so once
    /// it has left and no push it took is in flight.
    quiet: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// Its subscription is up (else there is nothing to wait for).
    live: AtomicBool,
}

impl Notices {
    /// Publishes `u` on `<prefix>.events.upgrade` (once the broker is
    /// reached; never waits).
    pub fn upgrade(&self, u: Upgrade) {
        self.upgrades
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(u);
        self.bell.ring_always();
    }

    fn take(&self) -> Vec<Upgrade> {
        std::mem::take(&mut *self.upgrades.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Stops taking pushes for this process's devices (a hot upgrade's
    /// old process, before it moves a connection): leaves the deliver
    /// queue group and waits, at most `timeout`, until the pushes it took
    /// have been answered. False if that did not happen in time (or the
    /// subscription was not up: then there is nothing to wait for).
    pub fn quiet_pushes(&self, timeout: Duration) -> bool {
        self.pushes.quiet(timeout)
    }

    /// Stops routing pushes (a hot upgrade's old process, once it has
    /// handed everything over and before it exits): a push it was routing
    /// would go unanswered. Not before: a route may wait on the new
    /// process for a device still on its way.
    pub fn quiet_routing(&self, timeout: Duration) -> bool {
        self.routing.quiet(timeout)
    }

    /// Takes and routes pushes again (the upgrade failed).
    pub fn resume_pushes(&self) {
        self.pushes.take.send_replace(true);
        self.routing.take.send_replace(true);
    }
}

impl PushGate {
    fn new() -> PushGate {
        PushGate {
            take: watch::channel(true).0,
            quiet: Mutex::new(None),
            live: AtomicBool::new(false),
        }
    }

    fn quiet(&self, timeout: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.quiet.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        self.take.send_replace(false);
        if !self.live.load(Ordering::Acquire) {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
    }
}

/// The running publisher.
pub struct Publisher {
    stop: Arc<AtomicBool>,
    bell: Arc<Doorbell>,
    pub notices: Notices,
    stopping: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<Stats>,
}

impl Publisher {
    /// Asks it to publish what is queued and stop; waits for it (at most
    /// [`FINAL_GRACE`] and a little more).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        self.bell.ring_always();
        self.stopping.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Options for async-nats from the auth flags: files read now, so a bad
/// one is one error at start-up.
pub fn connect_options(auth: &Auth) -> Result<async_nats::ConnectOptions, String> {
    let mut opts = async_nats::ConnectOptions::new();
    if let Some(path) = &auth.creds {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --nats-creds {}: {e}", path.display()))?;
        opts = async_nats::ConnectOptions::with_credentials(&text).map_err(|e| {
            format!(
                "--nats-creds {} is not a NATS credentials file: {e}",
                path.display()
            )
        })?;
    }
    if let Some(path) = &auth.user_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --nats-user-file {}: {e}", path.display()))?;
        let mut lines = text.lines();
        match (lines.next(), lines.next()) {
            (Some(u), Some(p)) if !u.trim().is_empty() => {
                opts = opts.user_and_password(u.trim().into(), p.trim_end().into());
            }
            _ => {
                return Err(format!(
                    "--nats-user-file {} must hold the user on its first line and the password on its second",
                    path.display()
                ))
            }
        }
    }
    if let Some(path) = &auth.token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --nats-token-file {}: {e}", path.display()))?;
        match text.lines().next().map(str::trim) {
            Some(t) if !t.is_empty() => opts = opts.token(t.into()),
            _ => {
                return Err(format!(
                    "--nats-token-file {} is empty: put the token on its first line",
                    path.display()
                ))
            }
        }
    }
    Ok(opts)
}

/// Starts the publisher thread; returns the shards' end of the queue.
pub fn start(cfg: Config) -> Result<(EventTx, Publisher), String> {
    let opts = connect_options(&cfg.auth)?;
    let (tx, rx, bell) = queue::channel(cfg.queue);
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the NATS publisher's runtime: {e}"))?;
    let stopping = Arc::new(Notify::new());
    let notices = Notices {
        upgrades: Arc::new(Mutex::new(Vec::new())),
        bell: bell.clone(),
        pushes: Arc::new(PushGate::new()),
        routing: Arc::new(PushGate::new()),
    };
    let thread = {
        let (stop, stats, bell, stopping, notices) = (
            stop.clone(),
            stats.clone(),
            bell.clone(),
            stopping.clone(),
            notices.clone(),
        );
        std::thread::Builder::new()
            .name("nats".into())
            .spawn(move || {
                rt.block_on(async move {
                    let stopped = async {
                        stopping.notified().await;
                        tokio::time::sleep(FINAL_GRACE).await;
                    };
                    tokio::select! {
                        _ = run(cfg, opts, rx, bell, stop, stats, notices) => {}
                        _ = stopped => crate::say!("server: NATS: stopped without the broker's confirmation of the last events (it is away or slow); they may be lost"),
                    }
                });
            })
            .map_err(|e| format!("cannot start the NATS publisher thread: {e}"))?
    };
    Ok((
        tx,
        Publisher {
            stop,
            bell,
            notices,
            stopping,
            thread: Some(thread),
            stats,
        },
    ))
}

/// A presence put, made in reused buffers: the subject
/// `$KV.<bucket>.<hex of the id>` and the value
/// `<server> <worker> <shard> <slot> <generation>`.
struct PresencePut {
    subject: String,
    head: usize,
    value: String,
    origin: Origin,
}

impl PresencePut {
    fn new(bucket: &str, origin: &Origin) -> PresencePut {
        let subject = format!("$KV.{bucket}.");
        PresencePut {
            head: subject.len(),
            subject,
            value: String::with_capacity(96),
            origin: origin.clone(),
        }
    }

    fn of(&mut self, ev: &Event) -> (Subject, Bytes) {
        self.subject.truncate(self.head);
        event::push_presence_key(&mut self.subject, ev.id.as_str());
        self.value.clear();
        event::write_presence_value(
            &mut self.value,
            &self.origin.server,
            self.origin.worker,
            &ev.at,
        );
        (
            Subject::from(self.subject.as_str()),
            Bytes::copy_from_slice(self.value.as_bytes()),
        )
    }
}

async fn run(
    cfg: Config,
    opts: async_nats::ConnectOptions,
    rx: Receiver<Event>,
    bell: Arc<Doorbell>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    notices: Notices,
) {
    let (connected_tx, mut connected_rx) = mpsc::unbounded_channel::<()>();
    let url = cfg.url.clone();
    let opts = opts
        .name(format!("c1m {} worker {}", cfg.origin.server, cfg.origin.worker))
        // The client's own buffer while the broker is away: as large as
        // the shards' queue (up to CLIENT_CAPACITY), so about twice
        // --nats-queue events wait in all, then the shards drop.
        .client_capacity(cfg.queue.clamp(64, CLIENT_CAPACITY))
        .subscription_capacity(PUSHES_IN_FLIGHT * 4)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * attempts as u64).min(2000))
        })
        .event_callback(move |ev| {
            let tx = connected_tx.clone();
            let url = url.clone();
            async move {
                match ev {
                    async_nats::Event::Connected => {
                        let _ = tx.send(());
                    }
                    async_nats::Event::Disconnected => crate::say!(
                        "server: NATS {url}: disconnected; reconnecting by itself, events wait in a bounded queue (dropped past it, counted as events_dropped)"
                    ),
                    async_nats::Event::SlowConsumer(_) => crate::say!(
                        "server: NATS {url}: pushes arrive faster than this server handles them; some were dropped by the client"
                    ),
                    _ => {}
                }
            }
        });
    let client = match opts.connect(cfg.url.as_str()).await {
        Ok(c) => c,
        Err(e) => {
            crate::say!(
                "server: --nats {}: {e}; no events will be published (they are counted as events_dropped)",
                cfg.url
            );
            return;
        }
    };
    {
        // Said once if the broker is not there at start: async-nats keeps
        // trying by itself.
        let (client, url) = (client.clone(), cfg.url.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            if client.connection_state() != async_nats::connection::State::Connected {
                crate::say!(
                    "server: NATS {url}: not reachable; the server serves its devices as usual and keeps trying; events wait in a bounded queue and past it are dropped (events_dropped)"
                );
            }
        });
    }
    let subjects = Subjects::new(&cfg.prefix);
    let connected = Subject::from(subjects.connected.as_str());
    let disconnected = Subject::from(subjects.disconnected.as_str());

    // Presence: a KV bucket, once JetStream answers.
    let (kv_tx, kv_rx) = watch::channel::<Option<kv::Store>>(None);
    let (ensure_tx, ensure_rx) = mpsc::channel::<()>(1);
    let bucket = bucket_name(&cfg.prefix);
    tokio::spawn(keep_bucket(
        client.clone(),
        bucket.clone(),
        ensure_rx,
        kv_tx,
        cfg.peers.clone(),
    ));
    let mut put = PresencePut::new(&bucket, &cfg.origin);
    tokio::spawn(route_pushes(
        client.clone(),
        subjects.clone(),
        kv_rx,
        stats.clone(),
        notices.routing.clone(),
    ));
    tokio::spawn(deliver_pushes(
        client.clone(),
        subjects.clone(),
        cfg.clone(),
        stats.clone(),
        notices.pushes.clone(),
    ));
    if cfg.exclusive {
        tokio::spawn(supersede_elsewhere(
            client.clone(),
            subjects.clone(),
            cfg.clone(),
            stats.clone(),
        ));
    }

    let mut batch = Batcher::new(MESSAGE_BYTES);
    let mut pending: Option<Event> = None;
    let mut reconnected = 0;
    loop {
        while connected_rx.try_recv().is_ok() {
            reconnected += 1;
        }
        for _ in 0..std::mem::take(&mut reconnected) {
            let n = stats.broker_connects.fetch_add(1, Ordering::Relaxed) + 1;
            if n > 1 {
                // Presence may be gone with the broker, or dropped while it
                // was away: see `keep_bucket`. (Full: one is pending.)
                let _ = ensure_tx.try_send(());
            }
            let body = event::snapshot_json(
                &cfg.origin,
                cfg.live.load(Ordering::Relaxed),
                c1m_io::host::unix_ms(),
                n,
            );
            if client
                .publish(subjects.snapshot.clone(), body.into())
                .await
                .is_err()
            {
                stats.publish_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let said = notices.take();
        for u in &said {
            let body = event::upgrade_json(&cfg.origin, u);
            match client.publish(subjects.upgrade.clone(), body.into()).await {
                Ok(()) => stats.published.fetch_add(1, Ordering::Relaxed),
                Err(_) => stats.publish_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
        if !said.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
        }
        let mut n = 0;
        let mut ended = false;
        while n < BATCH {
            let ev = match pending.take().map_or_else(|| rx.try_recv(), Ok) {
                Ok(ev) => ev,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    ended = true;
                    break;
                }
            };
            n += 1;
            if ev.kind != Kind::Present {
                if let Some(msg) = batch.add(&ev, &cfg.origin) {
                    publish(&client, &connected, &disconnected, msg, &stats).await;
                }
            }
            // Presence is written on connects (and walks), never deleted:
            // see `keep_bucket`.
            if let Kind::Connected | Kind::Present = ev.kind {
                let (subject, value) = put.of(&ev);
                if client.publish(subject, value).await.is_err() {
                    stats.presence_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if let Some(msg) = batch.take() {
            publish(&client, &connected, &disconnected, msg, &stats).await;
        }
        if n > 0 {
            // One flush per batch: an expiry storm is a few large writes.
            let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
        }
        if ended || (n == 0 && stop.load(Ordering::Acquire)) {
            break;
        }
        if n == BATCH {
            continue;
        }
        // Out of events: sleep until a shard rings (or the broker comes
        // back), instead of polling: an idle server's publisher never
        // wakes. The queue is read once more after saying so, so an event
        // offered meanwhile is never left waiting for the next one.
        bell.going_to_sleep();
        match rx.try_recv() {
            Ok(ev) => {
                bell.awake();
                pending = Some(ev);
                continue;
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        tokio::select! {
            _ = bell.sleep() => {
                // Let a storm's events gather into few large messages (and
                // few wake-ups of this thread).
                tokio::time::sleep(LINGER).await;
            }
            Some(()) = connected_rx.recv() => {
                bell.awake();
                reconnected += 1;
            }
        }
    }
    let _ = tokio::time::timeout(FINAL_GRACE, client.flush()).await;
}

/// Publishes one message of events to its topic's subject.
async fn publish(
    client: &Client,
    connected: &Subject,
    disconnected: &Subject,
    (topic, body, events): (Topic, Bytes, usize),
    stats: &Stats,
) {
    let subject = match topic {
        Topic::Connected => connected.clone(),
        Topic::Disconnected => disconnected.clone(),
    };
    match client.publish(subject, body).await {
        Ok(()) => stats.published.fetch_add(events as u64, Ordering::Relaxed),
        Err(_) => stats
            .publish_errors
            .fetch_add(events as u64, Ordering::Relaxed),
    };
}

/// The KV bucket of a prefix: `c1m` -> `c1m_presence`.
pub fn bucket_name(prefix: &str) -> String {
    format!("{}_presence", prefix.replace('.', "_"))
}

/// Presence: where each device was last seen connecting, one KV entry per
/// device, written on every connect (a plain publish to the bucket's
/// subject: one message, no ack) and never deleted by a disconnect. A push
/// routed by a stale entry reaches the old holder, which answers `not
/// connected` (its shard checks the connection), or nobody, which is `not
/// connected` too. So a disconnect costs the broker nothing, and no
/// disconnect can delete the entry of a newer connection elsewhere.
///
/// This task keeps the bucket: it opens it (making it if need be), and
/// again each time the broker comes back; each time, once the bucket is
/// there, every shard walks its devices and offers their presence anew
/// (`Mail::Present`), so presence lost with the broker's storage, or
/// dropped while it was away, is written again.
async fn keep_bucket(
    client: Client,
    bucket: String,
    mut ensure: mpsc::Receiver<()>,
    kv_tx: watch::Sender<Option<kv::Store>>,
    peers: Vec<Peer>,
) {
    let js = async_nats::jetstream::new(client);
    loop {
        let store = open_bucket(&js, &bucket).await;
        let _ = kv_tx.send(Some(store));
        for peer in &peers {
            peer.send_now(Mail::Present);
        }
        if ensure.recv().await.is_none() {
            return;
        }
    }
}

/// The presence bucket, made if it is not there; retried every 2 s until
/// JetStream answers (said once).
async fn open_bucket(js: &async_nats::jetstream::Context, bucket: &str) -> kv::Store {
    let mut warned = false;
    loop {
        let found = match js.get_key_value(bucket).await {
            Ok(s) => Ok(s),
            Err(_) => create_bucket(js, bucket).await,
        };
        match found {
            Ok(s) => return s,
            Err(e) => {
                if !warned {
                    crate::say!(
                        "server: NATS: cannot open the presence bucket {bucket} ({e}); pushes need JetStream (nats-server -js); retrying, events are unaffected"
                    );
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Makes the KV bucket's stream as `create_key_value` would, by hand:
/// async-nats 0.51 checks the account first, and cannot read the account
/// info of nats-server 2.9 (Debian's), which lacks `reserved_memory`.
async fn create_bucket(
    js: &async_nats::jetstream::Context,
    bucket: &str,
) -> Result<kv::Store, String> {
    use async_nats::jetstream::stream;
    js.create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    js.get_key_value(bucket).await.map_err(|e| e.to_string())
}

/// Every server takes `<prefix>.push.>` in one queue group: each push is
/// handled once, by any server, which finds the holder in presence and
/// forwards it there.
async fn route_pushes(
    client: Client,
    subjects: Subjects,
    mut kv_rx: watch::Receiver<Option<kv::Store>>,
    stats: Arc<Stats>,
    gate: Arc<PushGate>,
) {
    // Only once presence is readable: until then another server routes.
    let store = loop {
        if let Some(s) = kv_rx.borrow().clone() {
            break s;
        }
        if kv_rx.changed().await.is_err() {
            return;
        }
    };
    let c = client.clone();
    let subject = subjects.push_wildcard.clone();
    serve_gated(c, subject, ROUTE_GROUP, gate, move |msg| {
        let (client, subjects, store, stats) = (
            client.clone(),
            subjects.clone(),
            store.clone(),
            stats.clone(),
        );
        async move {
            let answer = route_one(&client, &subjects, &store, &msg).await;
            stats.pushes_routed.fetch_add(1, Ordering::Relaxed);
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, Bytes::from_static(answer)).await;
            }
        }
    })
    .await;
}

/// Takes `subject` in queue group `group` while the gate is open, each
/// message handled by a task of its own (at most [`PUSHES_IN_FLIGHT`] at
/// once). When the gate closes (a hot upgrade's old process): leaves the
/// group (confirmed by the broker, so nothing more comes here), waits for
/// every task, says so to the gate, and waits for it to open again (the
/// upgrade failed).
async fn serve_gated<H, F>(
    client: Client,
    subject: String,
    group: &'static str,
    gate: Arc<PushGate>,
    handle: H,
) where
    H: Fn(async_nats::Message) -> F,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(PUSHES_IN_FLIGHT));
    let mut take = gate.take.subscribe();
    loop {
        while !*take.borrow_and_update() {
            if take.changed().await.is_err() {
                return;
            }
        }
        let mut sub = match client.queue_subscribe(subject.clone(), group.into()).await {
            Ok(s) => s,
            Err(e) => {
                crate::say!("server: NATS: cannot subscribe to {subject}: {e}; pushes cannot reach this server's devices (or be routed by it)");
                return;
            }
        };
        gate.live.store(true, Ordering::Release);
        loop {
            let msg = tokio::select! {
                m = sub.next() => match m {
                    Some(m) => m,
                    None => return,
                },
                _ = take.changed() => {
                    if *take.borrow_and_update() {
                        continue;
                    }
                    break;
                }
            };
            if !dispatch(&limit, &handle, msg).await {
                return;
            }
        }
        let _ = sub.unsubscribe().await;
        // What the client took in for us before the broker had the
        // unsubscribe is still ours: handled, not dropped unanswered.
        let rest = async {
            while let Some(msg) = sub.next().await {
                if !dispatch(&limit, &handle, msg).await {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(PUSH_TIMEOUT, rest).await;
        let _ = client.flush().await;
        drop(sub);
        if let Ok(all) = limit.acquire_many(PUSHES_IN_FLIGHT as u32).await {
            drop(all);
        }
        gate.live.store(false, Ordering::Release);
        if let Some(tx) = gate
            .quiet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = tx.send(());
        }
    }
}

/// Runs `handle(msg)` as a task of its own holding one of `limit`'s
/// permits (waiting for one); false if the semaphore is closed.
async fn dispatch<H, F>(limit: &Arc<Semaphore>, handle: &H, msg: async_nats::Message) -> bool
where
    H: Fn(async_nats::Message) -> F,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let Ok(permit) = limit.clone().acquire_owned().await else {
        return false;
    };
    let work = handle(msg);
    tokio::spawn(async move {
        work.await;
        drop(permit);
    });
    true
}

/// How far in the future another server's connect event may claim to be
/// (its clock ahead of ours): past it the event is refused, not obeyed.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;

/// Whether a connect event stamped `time_ms` is within the skew of `now_ms`.
pub fn believable(time_ms: u64, now_ms: u64) -> bool {
    time_ms <= now_ms.saturating_add(MAX_CLOCK_SKEW_MS)
}

/// --nats-exclusive: one connection per id across servers. Every server
/// reads the other servers' connect events; a device held here that
/// connected there later is closed here with 4000 "replaced" (its owner
/// shard finds it and compares the times: `Ask::Supersede`). The cost is
/// that every server reads every connect of the fleet.
///
/// Under `--procs` every worker reads them all and acts on the ids whose
/// owner shard is its own (the owner reaches the holder in any worker);
/// events of this server's other workers are skipped, as the registry
/// across workers has already done the same.
async fn supersede_elsewhere(client: Client, subjects: Subjects, cfg: Config, stats: Arc<Stats>) {
    let mut sub = match client.subscribe(subjects.connected.clone()).await {
        Ok(s) => s,
        Err(e) => {
            crate::say!(
                "server: NATS: cannot subscribe to {}: {e}; --nats-exclusive cannot close devices that connect elsewhere",
                subjects.connected
            );
            return;
        }
    };
    let base = cfg.origin.shard_base as usize;
    let mine = base..base + cfg.peers.len();
    let mut peers =
        crate::directory::mailbox::local_peers(cfg.peers.clone(), base, cfg.shards_total);
    while let Some(msg) = sub.next().await {
        for line in msg.payload.split(|&c| c == b'\n') {
            let Some(c) = event::Connect::parse(line) else {
                continue;
            };
            if c.server == cfg.origin.server {
                continue;
            }
            if !believable(c.time_ms, c1m_io::host::unix_ms()) {
                // A clock far ahead, or a forged event: it would close
                // every later connection of that id too.
                stats.connects_refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let owner = crate::directory::registry::owner(&c.id, cfg.shards_total);
            if !mine.contains(&owner) {
                continue;
            }
            peers.send(
                owner,
                Mail::Ask {
                    id: DeviceId::new(&c.id),
                    ask: Ask::Supersede { unix_ms: c.time_ms },
                    at: None,
                    reply: Reply::Remote {
                        req: crate::directory::mailbox::NO_REPLY,
                    },
                },
            );
        }
        peers.flush();
    }
}

pub const DELIVERED: &[u8] = b"delivered";
pub const NOT_CONNECTED: &[u8] = b"not connected";

async fn route_one(
    client: &Client,
    subjects: &Subjects,
    store: &kv::Store,
    msg: &async_nats::Message,
) -> &'static [u8] {
    let Some(id) = subjects.push_id(msg.subject.as_str()) else {
        return b"error: the subject does not end in a valid device id";
    };
    let held = match store.get(event::presence_key(id)).await {
        Ok(Some(v)) => Presence::parse(&v),
        Ok(None) => None,
        Err(_) => return b"error: presence lookup failed (is JetStream up?)",
    };
    let Some(p) = held else {
        return NOT_CONNECTED;
    };
    let mut headers = HeaderMap::new();
    headers.insert("C1m-Id", id);
    headers.insert("C1m-At", event::at_header(&p.at));
    if let Some(ct) = msg.headers.as_ref().and_then(|h| h.get("Content-Type")) {
        headers.insert("Content-Type", ct.as_str());
    }
    let subject = subjects.deliver(&p.server, p.worker);
    let mut tries = 0;
    let answer = loop {
        let req = async_nats::Request::new()
            .headers(headers.clone())
            .payload(msg.payload.clone())
            .timeout(Some(PUSH_TIMEOUT));
        match client.send_request(subject.clone(), req).await {
            // Nobody on the holder's subject: its server is gone, or a hot
            // upgrade is between its old process leaving the subject and
            // its new one joining (milliseconds). Asked again for a while.
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && tries < NO_RESPONDERS_RETRIES =>
            {
                tries += 1;
                tokio::time::sleep(NO_RESPONDERS_PAUSE).await;
            }
            r => break r,
        }
    };
    match answer {
        Ok(r) if r.payload.as_ref() == DELIVERED => DELIVERED,
        Ok(r) if r.payload.as_ref() == NOT_CONNECTED => NOT_CONNECTED,
        Ok(_) => b"error: the holder could not deliver it",
        // The holder is gone (its presence is stale): not connected.
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => NOT_CONNECTED,
        Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
            b"error: the holder did not answer in time"
        }
        Err(_) => b"error: cannot reach the holder",
    }
}

/// This worker's own subject: pushes for its devices, handed to the shard
/// holding each by message (`Mail::Ask` with its location), answered from
/// the shard's reply without ever blocking the runtime. A queue group of
/// one, but for a hot upgrade's old and new process: then each push goes
/// to one of them, and the old one leaves the group ([`PushGate`]).
async fn deliver_pushes(
    client: Client,
    subjects: Subjects,
    cfg: Config,
    stats: Arc<Stats>,
    gate: Arc<PushGate>,
) {
    let subject = subjects.deliver(&cfg.origin.server, cfg.origin.worker);
    let peers = Arc::new(cfg.peers);
    let (max_message, shard_base) = (cfg.max_message, cfg.origin.shard_base);
    let c = client.clone();
    serve_gated(c, subject, DELIVER_GROUP, gate, move |msg| {
        let (client, peers, stats) = (client.clone(), peers.clone(), stats.clone());
        async move {
            let answer = deliver_one(&peers, shard_base, max_message, &msg).await;
            if answer == DELIVERED {
                stats.pushes_delivered.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, Bytes::from_static(answer)).await;
            }
        }
    })
    .await;
}

async fn deliver_one(
    peers: &[Peer],
    shard_base: u32,
    max_message: usize,
    msg: &async_nats::Message,
) -> &'static [u8] {
    let h = msg.headers.as_ref();
    let header = |name: &str| h.and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
    let Some(id) = header("C1m-Id").filter(|id| c1m_proto::handshake::valid_id(id)) else {
        return b"error: no device id";
    };
    let Some(at) = header("C1m-At").and_then(|a| event::parse_at_header(&a)) else {
        return b"error: no location";
    };
    // Locations name shards over the whole server; `peers` are this
    // worker's.
    let local = at.shard.wrapping_sub(shard_base) as usize;
    let Some(peer) = peers.get(local) else {
        return NOT_CONNECTED;
    };
    if msg.payload.len() > max_message {
        return b"error: over --max-message";
    }
    let text = header("Content-Type").is_some_and(|ct| ct.starts_with("text/"));
    if text && std::str::from_utf8(&msg.payload).is_err() {
        return b"error: text is not UTF-8";
    }
    let (tx, rx) = std::sync::mpsc::channel();
    peer.send_now(Mail::Ask {
        id: DeviceId::new(&id),
        ask: Ask::Push {
            text,
            payload: msg.payload.to_vec(),
        },
        at: Some(at),
        reply: Reply::Local(tx),
    });
    // The shard answers on a std channel: polled, never waited on.
    let deadline = tokio::time::Instant::now() + PUSH_TIMEOUT;
    let mut pause = Duration::from_micros(200);
    loop {
        match rx.try_recv() {
            Ok(Answer::Delivered) => return DELIVERED,
            Ok(_) => return NOT_CONNECTED,
            Err(TryRecvError::Disconnected) => return NOT_CONNECTED,
            Err(TryRecvError::Empty) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return b"error: the shard did not answer in time";
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use c1m_proto::device_id::DeviceId;
    use c1m_proto::table::Location;

    use super::*;

    #[test]
    fn a_connect_event_from_too_far_ahead_is_not_believed() {
        let now = 1_700_000_000_000;
        assert!(believable(now - 5_000, now));
        assert!(believable(now + MAX_CLOCK_SKEW_MS, now));
        assert!(!believable(now + MAX_CLOCK_SKEW_MS + 1, now));
        assert!(!believable(u64::MAX, now));
        assert!(believable(u64::MAX, u64::MAX));
    }

    /// The reused buffers make the same subject and value as the plain
    /// functions the router reads them with, event after event.
    #[test]
    fn presence_puts_match_the_key_and_value_the_router_reads() {
        let origin = Origin {
            server: "edge-1:9000".into(),
            worker: 3,
            shard_base: 4,
        };
        let mut put = PresencePut::new(&bucket_name("acme.c1m"), &origin);
        for (n, id) in ["02:00:5e:00:00:01", "a.b", "x"].iter().enumerate() {
            let at = Location {
                shard: 5,
                key: n as u32 * 1000,
                gen: 7 + n as u32,
            };
            let ev = Event {
                kind: Kind::Present,
                id: DeviceId::new(id),
                at,
                remote: None,
                time_ms: 0,
                last_heard_ms: 0,
            };
            let (subject, value) = put.of(&ev);
            assert_eq!(
                subject.as_str(),
                format!("$KV.acme_c1m_presence.{}", event::presence_key(id))
            );
            let p = Presence::parse(&value).expect("a value the router reads");
            assert_eq!((p.server.as_str(), p.worker), ("edge-1:9000", 3));
            assert_eq!((p.at.shard, p.at.key, p.at.gen), (5, at.key, at.gen));
        }
    }
}
