//! The shard on the scripted driver (c1m_io::script): no sockets.

use c1m_io::script::{Fake, Script};
use c1m_io::Sent;
use c1m_proto::frame::{self, Opcode};

use super::*;
use crate::directory::mailbox::{Answer, Ask, Mail, Reply};

/// The slot is what every idle device costs in user space: what only
/// some connections have (a TLS session, a front's address, a partial
/// frame or message) sits behind optional pointers, 8 bytes each.
/// The registry's entry is 16 bytes (c1m_proto::table's test).
#[test]
fn a_slot_stays_small() {
    let size = std::mem::size_of::<Slot>();
    // As slab stores it: `enum Entry<T> { Vacant(usize), Occupied(T) }`.
    #[allow(dead_code)]
    enum AsInSlab {
        Vacant(usize),
        Occupied(Slot),
    }
    let entry = std::mem::size_of::<AsInSlab>();
    println!("Slot: {size} bytes, {entry} in the slab");
    assert_eq!(std::mem::size_of::<Conn>(), 24);
    assert!(size <= 128, "Slot is {size} bytes");
    assert!(entry <= 128, "a slab entry is {entry} bytes");
}

#[test]
fn a_panic_is_contained_with_its_message() {
    assert_eq!(contain(|| 7), Ok(7));
    assert_eq!(
        contain(|| -> u8 { panic!("bad bytes") }),
        Err("bad bytes".into())
    );
    let n = 3;
    assert_eq!(
        contain(|| -> u8 { panic!("frame {n}") }),
        Err("frame 3".into())
    );
}

/// The wall clock at the shard's start, in the tests: a plain number.
const UNIX0: u64 = 1_800_000_000_000;

impl Shard<Script> {
    /// One turn `ms` milliseconds after the shard began (its tick 0), at
    /// wall-clock time [`UNIX0`] + `ms`: plain times, no sleeping.
    fn turn_at(&mut self, ms: u64) -> Option<Duration> {
        let now = Now {
            at: self.st.clock.start + Duration::from_millis(ms),
            unix_ms: UNIX0 + ms,
        };
        let next = self.turn(now)?;
        Some(next.saturating_duration_since(now.at))
    }
}

fn shard(graceful_expiry: bool, script: Script) -> Shard<Script> {
    shard_and_peers(graceful_expiry, script).0
}

fn shard_and_peers(
    graceful_expiry: bool,
    script: Script,
) -> (Shard<Script>, Vec<crate::directory::mailbox::Peer>) {
    let listener = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let (mut mail, peers) = crate::directory::mailbox::wire(1).unwrap();
    let (tx, _) = std::sync::mpsc::channel();
    let cfg = config(graceful_expiry);
    (
        Shard::new(0, cfg, script, listener, mail.remove(0), tx).unwrap(),
        peers,
    )
}

/// Tick 10 ms, timeout 40 ms, handshake and frame timeouts 500 ms.
fn config(graceful_expiry: bool) -> ShardConfig {
    ShardConfig {
        limits: Limits::default(),
        timeout: Duration::from_millis(40),
        tick: Duration::from_millis(10),
        handshake_timeout: Duration::from_millis(500),
        batch_wait: Duration::ZERO,
        max_handshakes: 0,
        frame_timeout: Duration::from_millis(500),
        max_conns: 10,
        graceful_expiry,
        drain_timeout: Duration::from_secs(1),
        drain_rate: 0.0,
        stats_interval: Duration::from_secs(3600),
        inject_panic: false,
        auth: None,
        proxy_protocol: false,
        trust_forwarded: Vec::new(),
        events: None,
        tls: None,
        registry: Registry::create(64).unwrap(),
        udp: None,
        admission: None,
        takeover: false,
    }
}

/// A device that upgraded at 0 ms on the scripted driver.
fn upgraded(graceful_expiry: bool) -> Shard<Script> {
    let mut s = shard(
        graceful_expiry,
        Script {
            events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
            ..Script::default()
        },
    );
    s.turn_at(0);
    assert!(s.io.sent[0].starts_with(b"HTTP/1.1 101 "));
    s
}

/// A driver that reads as it goes (epoll) may hand a turn bytes that
/// arrived after the turn's clock read: they are stamped with the time
/// they were read, not the turn's, or the device would be deleted before
/// --timeout had passed since they came (a deletion storm's turns run for
/// seconds). Here the turn runs at 0 ms while the ping is read at least
/// 60 ms (6 ticks) after the shard began.
#[test]
fn bytes_read_after_the_turns_clock_read_are_stamped_when_read() {
    for reads_after_wait in [true, false] {
        let mut s = shard(
            false,
            Script {
                events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
                reads_after_wait,
                ..Script::default()
            },
        );
        s.turn_at(0);
        std::thread::sleep(Duration::from_millis(60));
        let mut ping = Vec::new();
        frame::write_masked_frame(&mut ping, Opcode::Ping, true, b"hb", [1, 2, 3, 4]);
        s.io.events.push_back(Fake::Data(ping));
        s.turn_at(0);
        let (_, slot) = s.st.slab.iter().next().expect("the device");
        if reads_after_wait {
            assert!(slot.last_seen >= 6, "stamped at tick {}", slot.last_seen);
        } else {
            assert_eq!(slot.last_seen, 0, "the turn's tick: it came before");
        }
    }
}

/// Expiry on plain times: a device heard at 25 ms (tick 2) is deleted at
/// the start of tick 2 + 4 + 1 (70 ms), within `timeout + tick` of its
/// last frame and not before `timeout`; its wheel entry from the upgrade
/// (due at 50 ms) finds it heard since and is armed again.
#[test]
fn expiry_follows_plain_times() {
    let mut s = upgraded(false);
    let mut ping = Vec::new();
    frame::write_masked_frame(&mut ping, Opcode::Ping, true, b"hb", [1, 2, 3, 4]);
    s.io.events.push_back(Fake::Data(ping));
    s.turn_at(25);
    assert_eq!(s.io.sent[1], [0x8a, 2, b'h', b'b'], "pong");
    for ms in [50, 65, 69] {
        let wait = s.turn_at(ms).unwrap();
        assert_eq!(s.st.counters.expired, 0, "at {ms} ms");
        assert_eq!(wait, Duration::from_millis(70 - ms), "sleeps until 70 ms");
    }
    assert!(s.io.closed.is_empty());
    s.turn_at(70);
    assert_eq!(s.st.counters.expired, 1);
    assert_eq!(s.io.closed, [Close::Abortive], "a reset, not a Close frame");
    assert_eq!(s.io.sent.len(), 2);
    // Due at 20 + 40 ms (the start of its last frame's tick): 10 ms late.
    assert_eq!(s.st.counters.expiry_lag.count(), 1);
    assert!(s.st.slab.is_empty());
}

/// The directory on the scripted driver: a device that connects on
/// another shard claims its id there, displacing this shard's connection;
/// the claimant tells this shard `Replaced` through the mailbox, and the
/// old connection gets Close 4000 "replaced" and closes once it is out.
/// The new one's claim stands.
#[test]
fn a_claim_elsewhere_replaces_the_connection_here_with_close_4000() {
    let registry = Registry::create(64).unwrap();
    let (mail, _peers) = crate::directory::mailbox::wire(2).unwrap();
    let mut shards: Vec<Shard<Script>> = mail
        .into_iter()
        .enumerate()
        .map(|(id, mail)| {
            let cfg = ShardConfig {
                registry: registry.clone(),
                ..config(false)
            };
            let script = Script {
                events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
                ..Script::default()
            };
            let listener = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            let (tx, _) = std::sync::mpsc::channel();
            Shard::new(id, cfg, script, listener, mail, tx).unwrap()
        })
        .collect();
    let id = DeviceId::new("aa:bb");
    shards[0].turn_at(0);
    let first = registry.get(&id).expect("claimed");
    assert_eq!(first.shard, 0);
    shards[1].turn_at(10);
    let second = registry.get(&id).expect("claimed");
    assert_eq!((second.shard, second.key), (1, 0));
    assert!(shards[1].io.sent[0].starts_with(b"HTTP/1.1 101 "));
    let old = &mut shards[0];
    assert_eq!(old.io.sent.len(), 1, "told by mail, not yet read");
    old.st.read_mail(&mut old.io);
    assert_eq!(old.st.counters.replaced, 1);
    assert_eq!(&old.io.sent[1][..4], &[0x88, 10, 0x0f, 0xa0], "Close 4000");
    assert_eq!(&old.io.sent[1][4..], b"replaced");
    assert_eq!(old.io.closed, [Close::Graceful], "closed once it was out");
    assert!(old.st.slab.is_empty());
    // Its release named the old connection: the new claim stands.
    assert_eq!(registry.get(&id), Some(second));
    assert_eq!(shards[1].st.counters.replaced, 0);
    assert!(shards[1].io.closed.is_empty());
}

/// --nats-exclusive's question: a device that connected elsewhere
/// before it connected here stays; one that connected elsewhere later
/// is closed here with 4000 "replaced".
#[test]
fn a_device_is_superseded_only_by_a_later_connect_elsewhere() {
    let mut s = shard(
        false,
        Script {
            events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
            ..Script::default()
        },
    );
    s.turn_at(0);
    assert!(s.io.sent[0].starts_with(b"HTTP/1.1 101 "));
    let no_reply = || Reply::Remote {
        req: crate::directory::mailbox::NO_REPLY,
    };
    let earlier = UNIX0 - 60_000;
    s.st.on_ask(
        &mut s.io,
        DeviceId::new("aa:bb"),
        Ask::Supersede { unix_ms: earlier },
        None,
        no_reply(),
    );
    assert_eq!(s.io.sent.len(), 1, "kept: it connected here later");
    assert_eq!(s.st.counters.replaced, 0);
    s.st.on_ask(
        &mut s.io,
        DeviceId::new("aa:bb"),
        Ask::Supersede {
            unix_ms: UNIX0 + 1_000,
        },
        None,
        no_reply(),
    );
    assert_eq!(s.st.counters.replaced, 1);
    assert_eq!(&s.io.sent[1][..4], &[0x88, 10, 0x0f, 0xa0], "Close 4000");
    // Another id, or none held: nothing happens.
    s.st.on_ask(
        &mut s.io,
        DeviceId::new("cc:dd"),
        Ask::Supersede { unix_ms: u64::MAX },
        None,
        no_reply(),
    );
    assert_eq!(s.st.counters.replaced, 1);
}

/// A push to a device whose Close 1001 is out (a drain under way) is
/// refused: no frame after our Close (RFC 6455 5.5.1).
#[test]
fn a_push_after_our_close_is_refused() {
    let mut s = shard(
        false,
        Script {
            events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
            ..Script::default()
        },
    );
    s.turn_at(0);
    s.st.begin_shutdown(&mut s.io);
    assert_eq!(&s.io.sent[1][..2], &[0x88, 2], "Close 1001");
    let (tx, rx) = std::sync::mpsc::channel();
    let push = Ask::Push {
        text: true,
        payload: b"late".to_vec(),
    };
    let id = DeviceId::new("aa:bb");
    s.st.on_ask(&mut s.io, id, push, None, Reply::Local(tx));
    assert_eq!(rx.recv().unwrap(), Answer::NotConnected);
    assert_eq!(s.io.sent.len(), 2, "a frame after our Close");
}

/// After the broker comes back, the shard offers a presence record of
/// every device it holds; a full queue pauses the walk (the loop comes
/// back within 1 ms) instead of dropping records, and it then goes on.
#[test]
fn a_presence_walk_pauses_on_a_full_queue_and_resumes() {
    let (mut s, peers) = shard_and_peers(
        false,
        Script {
            events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
            ..Script::default()
        },
    );
    let (tx, rx, _bell) = crate::events::queue::channel(1);
    s.st.cfg.events = Some(tx);
    s.turn_at(0);
    let connected = rx.try_recv().expect("the connect's event");
    assert_eq!(connected.kind, Kind::Connected);
    // The queue is full again (a stand-in event) when the walk starts.
    assert!(s.st.cfg.events.as_ref().unwrap().offer(connected.clone()));
    peers[0].send_now(Mail::Present);
    s.st.read_mail(&mut s.io);
    let wait = s.turn_at(0).unwrap();
    assert!(wait <= Duration::from_millis(1), "paused: {wait:?}");
    assert!(s.st.walk.is_some(), "paused, not given up");
    rx.try_recv().unwrap();
    let wait = s.turn_at(0).unwrap();
    assert!(s.st.walk.is_none(), "done");
    assert!(wait > Duration::from_millis(1), "{wait:?}");
    let present = rx.try_recv().expect("the device's presence record");
    assert_eq!(present.kind, Kind::Present);
    assert_eq!(present.id.as_str(), "aa:bb");
    assert_eq!(
        (present.at.shard, present.at.key, present.at.gen),
        (connected.at.shard, connected.at.key, connected.at.gen)
    );
    assert!(rx.try_recv().is_err(), "one record per device");
    assert_eq!(s.st.counters.events_dropped, 0);
}

/// A self-signed certificate for "localhost" and its key, as PEM files
/// in a new directory (cert.pem, key.pem). Made at test time.
fn make_cert(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("c1m-shard-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let paths = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, cert.pem()).unwrap();
    std::fs::write(&paths.1, key.serialize_pem()).unwrap();
    paths
}

/// The PROXY header is parsed by the connection core, behind TLS: the
/// two together are refused at start, in one sentence.
#[test]
fn proxy_protocol_with_tls_is_refused_in_one_sentence() {
    let (cert, key) = make_cert("proxy-with-tls");
    let mut cfg = shard(false, Script::default()).st.cfg.clone();
    cfg.proxy_protocol = true;
    assert!(cfg.validate().is_ok());
    cfg.tls = Some(
        c1m_io::tls::server_config(
            &cert,
            &key,
            c1m_io::tls_tickets::Ticketer::random().unwrap(),
        )
        .unwrap(),
    );
    let _ = std::fs::remove_dir_all(cert.parent().unwrap());
    let err = cfg.validate().unwrap_err();
    assert!(
        err.contains("--proxy-protocol") && err.contains("--tls-cert"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    cfg.proxy_protocol = false;
    assert!(cfg.validate().is_ok());
}

const UPGRADE: &[u8] = b"GET /ws?id=aa:bb HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// Issue 10's read of the loop: `--graceful-expiry` sent its Close with
/// a direct send while pending output might hold part of a frame, so
/// the device could read the Close in the middle of a pong. Now the
/// Close goes after whatever the driver holds, and the socket closes
/// only once that is all out.
#[test]
fn graceful_expiry_queues_its_close_after_held_output_and_waits_for_it() {
    let mut ping = Vec::new();
    frame::write_masked_frame(&mut ping, Opcode::Ping, true, b"hb", [1, 2, 3, 4]);
    let mut s = shard(
        true,
        Script {
            events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
            ..Script::default()
        },
    );
    s.turn_at(0);
    assert!(s.io.sent[0].starts_with(b"HTTP/1.1 101 "));
    // The device stops reading: its pong is held by the driver.
    s.io.hold_output = true;
    s.io.events.push_back(Fake::Data(ping));
    s.turn_at(0);
    assert_eq!(s.io.sent[1], [0x8a, 2, b'h', b'b']);
    // Silent past the timeout: Close 1001 after the pong, no close yet.
    s.turn_at(80);
    assert_eq!(s.st.counters.expired, 1);
    assert_eq!(s.io.sent[2], [0x88, 2, 0x03, 0xe9]);
    assert!(s.io.closed.is_empty(), "closed before its output was out");
    // The output drains: now the FIN.
    s.io.events.push_back(Fake::Flushed);
    s.turn_at(80);
    assert_eq!(s.io.closed, [Close::Graceful]);
    assert_eq!(
        s.st.counters.closed(),
        1,
        "counted once: {:?}",
        s.st.counters
    );
}

/// A held Close that never drains is reset after the frame timeout, and
/// the expiry is still counted once.
#[test]
fn an_expired_device_that_never_reads_its_close_is_reset_once() {
    let mut s = shard(
        true,
        Script {
            events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
            ..Script::default()
        },
    );
    s.turn_at(0);
    s.io.hold_output = true;
    s.turn_at(80);
    assert_eq!(s.st.counters.expired, 1);
    assert!(s.io.closed.is_empty());
    s.turn_at(680);
    assert_eq!(s.io.closed, [Close::Abortive]);
    assert_eq!(s.st.counters.closed(), 1, "{:?}", s.st.counters);
}

/// Issue 10's read of the loop: re-adding the listener after the accept
/// backoff used `?`, so an ENOMEM there stopped the shard and dropped
/// every device it held. Now the shard warns and tries again later.
#[test]
fn a_failed_accept_resume_is_retried_not_fatal() {
    let mut s = shard(
        false,
        Script {
            events: [Fake::AcceptFailed(libc::EMFILE)].into(),
            resume_failures: 1,
            ..Script::default()
        },
    );
    assert!(s.turn_at(0).is_some());
    assert_eq!(s.st.counters.accept_exhausted, 1);
    assert!(s.turn_at(110).is_some(), "the shard goes on");
    assert_eq!(s.io.resumes, 1);
    assert!(s.turn_at(220).is_some());
    assert_eq!(s.io.resumes, 2, "tried again");
    assert!(s.st.accept.resume.is_none(), "accepting again");
}

/// Hot upgrade: a release that waits on the driver (io_uring: its cancel
/// not completed yet) is not given up while releases make progress (a
/// shard short of CPU sees its cancels complete late, and must not lose
/// their devices), only once none has for RELEASE_TIMEOUT and a few turns:
/// then it is reset and counted lost.
#[test]
fn a_waiting_release_is_given_up_only_when_none_makes_progress() {
    use super::handover::{Order, Out, RELEASE_TIMEOUT};
    let (mut mail, _peers) = crate::directory::mailbox::wire(1).unwrap();
    let cfg = ShardConfig {
        timeout: Duration::from_secs(60),
        ..config(false)
    };
    let listener = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let (stx, _) = std::sync::mpsc::channel();
    let script = Script {
        events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
        ..Script::default()
    };
    let mut a = Shard::new(0, cfg, script, listener, mail.remove(0), stx).unwrap();
    a.turn_at(0);
    assert!(a.io.sent[0].starts_with(b"HTTP/1.1 101 "));
    a.io.release_waits = true;
    let (tx, rx) = std::sync::mpsc::channel();
    a.st.on_order(&mut a.io, Order::MoveConns(tx));
    let t = RELEASE_TIMEOUT.as_millis() as u64;
    a.turn_at(10);
    // Progress just before the timeout, then turns up to just under the
    // timeout after it: never given up.
    a.io.release_progress += 1;
    a.turn_at(t - 10);
    a.turn_at(2 * t - 20);
    assert!(rx.try_recv().is_err(), "still under way");
    assert!(a.io.closed.is_empty(), "not given up: progress was made");
    // No progress for the whole timeout, then a few turns (the first
    // after a long gap may not have collected completions yet): reset,
    // counted lost.
    a.turn_at(2 * t);
    assert!(
        a.io.closed.is_empty(),
        "not at the first turn after the gap"
    );
    for ms in 1..10 {
        a.turn_at(2 * t + ms);
    }
    assert!(matches!(
        rx.try_recv(),
        Ok(Out::End {
            moved: 0,
            lost: 1,
            ..
        })
    ));
    assert_eq!(a.io.closed, [Close::Abortive]);
    assert!(a.st.slab.is_empty());
}

/// Hot upgrade on the scripted driver: a shard hands its upgraded device
/// over (released from the driver, no close, no event, its registry entry
/// left for the new process), and a shard of a process started by the
/// upgrade takes it: same id, registered at its new place, silence carried
/// over (last heard at the end of its tick, 20-30 ms), its output sent first.
#[test]
fn a_handed_over_device_leaves_without_a_close_and_is_taken_with_its_silence() {
    use super::handover::{Order, Out};
    let mut a = upgraded(false);
    let mut ping = Vec::new();
    frame::write_masked_frame(&mut ping, Opcode::Ping, true, b"hb", [1, 2, 3, 4]);
    a.io.events.push_back(Fake::Data(ping));
    a.turn_at(25);
    let (tx, rx) = std::sync::mpsc::channel();
    a.st.on_order(&mut a.io, Order::MoveConns(tx));
    a.turn_at(26);
    let Ok(Out::Conns(mut moved)) = rx.try_recv() else {
        panic!("no connection handed over")
    };
    assert!(matches!(
        rx.try_recv(),
        Ok(Out::End {
            moved: 1,
            tls_closed: 0,
            lost: 0,
            ..
        })
    ));
    assert!(a.io.closed.is_empty(), "no close for a device handed over");
    assert!(a.st.slab.is_empty());
    assert_eq!((a.st.open, a.st.counters.handed_over), (0, 1));
    let m = moved.pop().unwrap();
    let registry = a.st.cfg.registry.clone();
    let old = registry
        .get(&m.state.id)
        .expect("still registered, at the old place");
    assert_eq!((old.key, old.gen), (m.state.key, m.state.gen));
    assert!(m.state.upgraded && m.state.registered);
    let c = &a.st.clock;
    assert_eq!(
        m.state.last_heard_ns,
        c.start_ns + 30_000_000 - 1,
        "the end of tick 2"
    );

    let (mut mail, _peers) = crate::directory::mailbox::wire(1).unwrap();
    let cfg = ShardConfig {
        registry: registry.clone(),
        takeover: true,
        ..config(false)
    };
    let listener = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let (stx, _) = std::sync::mpsc::channel();
    let script = Script {
        hold_output: false,
        ..Script::default()
    };
    let mut b = Shard::new(0, cfg, script, listener, mail.remove(0), stx).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut m = m;
    m.state.output = b"queued".to_vec();
    let heard = m.state.last_heard_ns;
    b.st.on_order(&mut b.io, Order::Take(vec![m], tx));
    assert_eq!(rx.try_recv(), Ok(1));
    assert_eq!((b.st.open, b.st.counters.taken_over), (1, 1));
    assert_eq!(b.io.sent, [b"queued".to_vec()], "its output first");
    let (key, slot) = b.st.slab.iter().next().unwrap();
    assert_eq!(slot.last_seen, b.st.tick_of_ns(heard));
    assert_eq!(slot.armed, slot.last_seen + b.st.clock.timeout_ticks + 1);
    let now = registry.get(&slot.id).unwrap();
    assert_eq!(
        (now.key as usize, now.gen),
        (key, slot.gen),
        "re-claimed here"
    );
}

/// `--udp-heartbeat` across a hot upgrade: a connection taken at another
/// slab key than its ticket names keeps its ticket (key and generation),
/// is found by it (its datagrams are heartbeats), and the map forgets it
/// when the connection ends (a datagram then is stale, and nothing stays).
#[test]
fn a_moved_ticket_finds_its_slot_until_the_connection_ends() {
    use super::handover::{Moved, MovedState, Order};
    use c1m_proto::conn::Phase;
    use c1m_proto::handover::ConnState;
    use c1m_proto::ticket::{Key, Ticket};
    let mut b = shard(false, Script::default());
    let key = Key::from_bytes([7; 16]);
    let udp = Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    b.st.cfg.udp = Some(UdpHeartbeat {
        key: key.clone(),
        sockets: std::sync::Arc::new(vec![udp]),
    });
    let open = ConnState {
        phase: Phase::Open,
        carry: &[],
        message: None,
    };
    let state = MovedState {
        shard: 0,
        key: 5,
        gen: 9,
        ticket_key: 5,
        since_ns: 1,
        last_heard_ns: b.st.clock.start_ns,
        deadline_ns: 0,
        frame_deadline_ns: 0,
        upgraded: true,
        registered: false,
        id: DeviceId::new("aa:bb"),
        remote: None,
        conn: Conn::import(&open, true).unwrap(),
        output: Vec::new(),
    };
    let fd = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    b.st.on_order(
        &mut b.io,
        Order::Take(
            vec![Moved {
                fd: fd.into(),
                state,
            }],
            tx,
        ),
    );
    assert_eq!(rx.try_recv(), Ok(1));
    let (k, slot) = b.st.slab.iter().next().unwrap();
    assert_eq!((k, slot.ticket_key, slot.gen), (0, 5, 9));
    assert_eq!(b.st.moved_tickets.len(), 1);
    let t = key.seal(
        Ticket {
            shard: 0,
            key: 5,
            gen: 9,
        },
        b"aa:bb",
    );
    b.st.on_datagram(&t);
    assert_eq!(b.st.counters.udp_heartbeats, 1);
    // Another device's ticket for the same place verifies for no one.
    b.st.on_datagram(&key.seal(
        Ticket {
            shard: 0,
            key: 5,
            gen: 9,
        },
        b"cc:dd",
    ));
    assert_eq!(b.st.counters.udp_bad, 1);
    b.st.close(&mut b.io, 0, Close::Abortive);
    assert_eq!(b.st.moved_tickets.len(), 0, "forgotten with its connection");
    b.st.on_datagram(&t);
    assert_eq!(
        (b.st.counters.udp_heartbeats, b.st.counters.udp_stale),
        (1, 1)
    );
}

/// A shard with one upgraded device ("aa:bb") whose events go to the
/// returned queue; the Connected event is taken.
fn upgraded_with_events(
    graceful_expiry: bool,
) -> (
    Shard<Script>,
    std::sync::mpsc::Receiver<crate::events::Event>,
) {
    let mut s = shard(
        graceful_expiry,
        Script {
            events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
            ..Script::default()
        },
    );
    let (tx, rx, _bell) = crate::events::queue::channel(16);
    s.st.cfg.events = Some(tx);
    s.turn_at(0);
    assert!(s.io.sent[0].starts_with(b"HTTP/1.1 101 "));
    assert_eq!(rx.try_recv().unwrap().kind, Kind::Connected);
    (s, rx)
}

/// The ways the shard ends a device with its last words (a Close frame
/// it sends itself), and what each is counted as.
#[derive(Debug, Clone, Copy)]
enum Path {
    Replace,
    Kick,
    GracefulExpiry,
    Shutdown,
}

impl Path {
    fn run(self, s: &mut Shard<Script>) {
        let id = DeviceId::new("aa:bb");
        match self {
            Path::Replace => {
                let at = s.st.cfg.registry.get(&id).expect("claimed");
                s.st.replaced(&mut s.io, id, at);
            }
            Path::Kick => {
                let (tx, rx) = std::sync::mpsc::channel();
                s.st.on_ask(&mut s.io, id, Ask::Kick, None, Reply::Local(tx));
                assert_eq!(rx.recv().unwrap(), Answer::Kicked);
            }
            Path::GracefulExpiry => {
                s.turn_at(80);
            }
            Path::Shutdown => {
                // Before its expiry (due at 50 ms).
                s.turn_at(30);
                s.st.begin_shutdown(&mut s.io);
                s.turn_at(30);
            }
        }
    }
}

/// Section 3 of issue 20: replace, kick, graceful expiry and shutdown
/// counted their end, then their send of the Close counted the same
/// connection again when it failed (peer_gone) or overflowed
/// (slow_reader), and the event said `reset`. Now every path ends the
/// connection once: one close counted, as the path's own (a drain's
/// Close that cannot go out: the device is gone as the server stops, or
/// it is a slow reader), one reset, one Disconnected event with it.
#[test]
fn every_path_with_a_failing_or_overflowing_send_counts_one_close() {
    for path in [
        Path::Replace,
        Path::Kick,
        Path::GracefulExpiry,
        Path::Shutdown,
    ] {
        for sent in [Sent::Failed, Sent::Overflow] {
            let (mut s, rx) = upgraded_with_events(true);
            s.io.send_results.push_back(sent);
            path.run(&mut s);
            let c = &s.st.counters;
            let (counted, reason) = match (path, sent) {
                (Path::Replace, _) => (c.replaced, Ended::Replaced),
                (Path::Kick, _) => (c.kicked, Ended::Kicked),
                (Path::GracefulExpiry, _) => (c.expired, Ended::Expired),
                (Path::Shutdown, Sent::Failed) => (c.shutdown, Ended::Shutdown),
                (Path::Shutdown, _) => (c.slow_reader, Ended::SlowReader),
            };
            let at = format!("{path:?} with {sent:?}: {c:?}");
            assert_eq!(c.closed(), 1, "{at}");
            assert_eq!(counted, 1, "{at}");
            assert_eq!(s.io.closed, [Close::Abortive], "{at}");
            assert!(s.st.slab.is_empty(), "{at}");
            assert_eq!(s.st.open, 0, "{at}");
            let ev = rx.try_recv().expect("its Disconnected event");
            assert_eq!(ev.kind, Kind::Disconnected(reason), "{at}");
            assert!(rx.try_recv().is_err(), "{at}: one event");
            // Nothing later counts it again: the drain ends, expiry finds nothing.
            s.st.begin_shutdown(&mut s.io);
            s.turn_at(2_000);
            assert_eq!(s.st.counters.closed(), 1, "{at}");
        }
    }
}

/// The same paths when the Close goes out: counted once, as the path's,
/// and closed with a FIN once the output is out (the drain's once the
/// device answers).
#[test]
fn every_path_whose_close_goes_out_counts_one_close() {
    for path in [
        Path::Replace,
        Path::Kick,
        Path::GracefulExpiry,
        Path::Shutdown,
    ] {
        let (mut s, rx) = upgraded_with_events(true);
        path.run(&mut s);
        if let Path::Shutdown = path {
            let mut close = Vec::new();
            frame::write_masked_frame(&mut close, Opcode::Close, true, &[3, 0xe9], [1, 2, 3, 4]);
            s.io.events.push_back(Fake::Data(close));
            s.turn_at(35);
        }
        let c = &s.st.counters;
        let (counted, reason) = match path {
            Path::Replace => (c.replaced, Ended::Replaced),
            Path::Kick => (c.kicked, Ended::Kicked),
            Path::GracefulExpiry => (c.expired, Ended::Expired),
            Path::Shutdown => (c.client_close, Ended::AnsweredDrain),
        };
        assert_eq!((c.closed(), counted), (1, 1), "{path:?}: {c:?}");
        assert_eq!(s.io.closed, [Close::Graceful], "{path:?}");
        let ev = rx.try_recv().expect("its Disconnected event");
        assert_eq!(ev.kind, Kind::Disconnected(reason), "{path:?}");
    }
}

/// RFC 6455 5.5.1 during a drain: a device that breaks the protocol
/// after our Close 1001 gets no second Close, and is counted once.
#[test]
fn a_protocol_error_after_the_drains_close_writes_no_second_close() {
    let (mut s, _rx) = upgraded_with_events(false);
    s.st.begin_shutdown(&mut s.io);
    assert_eq!(&s.io.sent[1][..4], &[0x88, 2, 0x03, 0xe9], "Close 1001");
    // An unmasked frame from a device: 1002.
    s.io.events.push_back(Fake::Data(vec![0x89, 0]));
    s.turn_at(10);
    assert_eq!(
        s.io.sent.len(),
        2,
        "a frame after our Close: {:?}",
        s.io.sent
    );
    assert_eq!(s.st.counters.protocol_error, 1);
    assert_eq!(s.st.counters.closed(), 1, "{:?}", s.st.counters);
}

/// Issue 20: a 101 that fails to send. The claim and the Connected
/// event come before the 101 goes out (claim before the 101), so its end
/// is their pair: one Disconnected event after the Connected, the claim
/// released, counted once (peer_gone). A connection refused before any
/// upgrade whose answer fails has neither: no event, nothing released.
#[test]
fn a_101_that_fails_to_send_ends_as_it_began() {
    let mut s = shard(
        false,
        Script {
            events: [Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
            send_results: [Sent::Failed].into(),
            ..Script::default()
        },
    );
    let (tx, rx, _bell) = crate::events::queue::channel(16);
    s.st.cfg.events = Some(tx);
    s.turn_at(0);
    assert!(s.io.sent[0].starts_with(b"HTTP/1.1 101 "));
    let c = s.st.counters;
    assert_eq!((c.upgraded, c.peer_gone, c.closed()), (1, 1, 1), "{c:?}");
    assert_eq!(rx.try_recv().unwrap().kind, Kind::Connected);
    let gone = rx.try_recv().unwrap();
    assert_eq!(gone.kind, Kind::Disconnected(Ended::PeerGone));
    assert!(rx.try_recv().is_err());
    assert_eq!(s.st.cfg.registry.get(&DeviceId::new("aa:bb")), None);
    assert_eq!((s.st.open, s.st.slab.len()), (0, 0));

    // Refused (404: another path) and its answer fails: no event.
    let refused = UPGRADE.to_vec();
    let refused = String::from_utf8(refused)
        .unwrap()
        .replace("/ws?", "/nope?");
    let mut s = shard(
        false,
        Script {
            events: [Fake::Accept, Fake::Data(refused.into_bytes())].into(),
            send_results: [Sent::Failed].into(),
            ..Script::default()
        },
    );
    let (tx, rx, _bell) = crate::events::queue::channel(16);
    s.st.cfg.events = Some(tx);
    s.turn_at(0);
    assert!(
        s.io.sent[0].starts_with(b"HTTP/1.1 404 "),
        "{:?}",
        s.io.sent
    );
    let c = s.st.counters;
    assert_eq!((c.upgraded, c.rejected, c.closed()), (0, 1, 1), "{c:?}");
    assert!(
        rx.try_recv().is_err(),
        "an event for a connection never upgraded"
    );
    assert_eq!((s.st.open, s.st.slab.len()), (0, 0));
}

/// A socket the driver cannot watch is dropped in admission: counted
/// (admit_dropped, in the stats line and /metrics), not as accepted.
#[test]
fn a_socket_dropped_in_admission_is_counted() {
    let mut s = shard(
        false,
        Script {
            events: [Fake::Accept, Fake::Accept, Fake::Data(UPGRADE.to_vec())].into(),
            register_failures: 1,
            ..Script::default()
        },
    );
    s.turn_at(0);
    let c = s.st.counters;
    assert_eq!(
        (c.admit_dropped, c.accepted, c.upgraded),
        (1, 1, 1),
        "{c:?}"
    );
}

/// A TLS session that cannot be started (rustls refuses the config: here
/// a record size it does not allow) drops the socket in admission: closed
/// abortively, counted in admit_dropped, never accepted or on the wheel.
#[test]
fn a_socket_whose_tls_cannot_start_is_dropped_and_counted() {
    let (cert, key) = make_cert("tls-setup-fails");
    let good = c1m_io::tls::server_config(
        &cert,
        &key,
        c1m_io::tls_tickets::Ticketer::random().unwrap(),
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(cert.parent().unwrap());
    let mut bad = (*good).clone();
    // rustls takes 32..=16,389 and refuses a session on anything else.
    bad.max_fragment_size = Some(1);
    let mut cfg = config(false);
    cfg.tls = Some(std::sync::Arc::new(bad));
    let listener = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let (mut mail, _peers) = crate::directory::mailbox::wire(1).unwrap();
    let (tx, _) = std::sync::mpsc::channel();
    let script = Script {
        events: [Fake::Accept, Fake::Accept].into(),
        ..Script::default()
    };
    let mut s = Shard::new(0, cfg, script, listener, mail.remove(0), tx).unwrap();
    s.turn_at(0);
    let c = s.st.counters;
    assert_eq!((c.admit_dropped, c.accepted), (2, 0), "{c:?}");
    assert_eq!(s.io.closed, [Close::Abortive, Close::Abortive]);
    assert!(s.st.slab.is_empty());
    assert_eq!(s.st.open, 0);
}

/// The stats a shard reports carry the driver's counters: io_uring's
/// submits of a full queue (retries included) reach the stats line and
/// /metrics as sq_full.
#[test]
fn the_drivers_submit_retries_reach_the_report() {
    let listener = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let (mut mail, _peers) = crate::directory::mailbox::wire(1).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut s = Shard::new(
        0,
        config(false),
        Script::default(),
        listener,
        mail.remove(0),
        tx,
    )
    .unwrap();
    s.io.io_stats.sq_full = 7;
    s.io.io_stats.cq_overflows = 2;
    s.turn_at(3_600_000);
    let snap = rx.try_recv().expect("a report");
    assert_eq!(
        (snap.totals.io_sq_full, snap.totals.io_cq_overflows),
        (7, 2)
    );
}

/// Issue 20: a connection whose accept completed just as shutdown began
/// (io_uring's multishot accept can hand one over after the listener is
/// gone) is closed unserved, and counted as dropped in admission.
#[test]
fn a_socket_accepted_as_shutdown_begins_is_counted() {
    let mut s = shard(
        false,
        Script {
            events: [Fake::Accept].into(),
            ..Script::default()
        },
    );
    s.st.begin_shutdown(&mut s.io);
    s.turn_at(0);
    let c = s.st.counters;
    assert_eq!((c.admit_dropped, c.accepted), (1, 0), "{c:?}");
    assert!(s.st.slab.is_empty());
}

/// --max-handshakes: a shard that holds its share of connections not yet
/// upgraded stops accepting (the rest wait in the listen queue), and
/// accepts again once half of them are done, not at the first one.
#[test]
fn a_shard_at_its_handshake_bound_pauses_accepting_until_half_are_done() {
    let mut s = shard(
        false,
        Script {
            events: [Fake::Accept, Fake::Accept, Fake::Accept, Fake::Accept].into(),
            ..Script::default()
        },
    );
    s.st.accept.max_handshakes = 4;
    s.turn_at(0);
    assert_eq!(s.st.handshaking(), 4);
    assert!(s.st.accept.full);
    assert_eq!((s.io.pauses, s.st.counters.admission_paused), (1, 1));
    // One upgrade: 3 still in their handshake, more than half: still paused.
    s.io.events.push_back(Fake::Data(UPGRADE.to_vec()));
    s.turn_at(10);
    assert_eq!(
        (s.st.handshaking(), s.st.accept.full, s.io.resumes),
        (3, true, 0)
    );
    // The handshake timeout ends the other three: accepting resumes, once.
    s.turn_at(2_000);
    assert_eq!(s.st.handshaking(), 0);
    assert!(!s.st.accept.full);
    assert_eq!(s.io.resumes, 1);
    s.turn_at(2_100);
    assert_eq!((s.io.pauses, s.io.resumes), (1, 1));
}
