//! Property tests of the sans-IO core: any split of the same bytes gives the
//! same result; the wheel never expires early, never misses, never touches a
//! closed connection.

use c1m_proto::conn::{Conn, Limits, Received};
use c1m_proto::frame::{self, Opcode};
use c1m_proto::wheel::{Entry, Wheel};
use proptest::prelude::*;

const UPGRADE: &[u8] = b"GET /ws?id=02:00:00:00:00:01 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// Feeds `input` in the given pieces; returns all output and the summed result.
fn feed(input: &[u8], cuts: &[usize], limits: &Limits) -> (Vec<u8>, Received, usize) {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(0);
    points.push(input.len());
    points.sort_unstable();
    let mut conn = Conn::new();
    let mut out = Vec::new();
    let mut total = Received::default();
    for w in points.windows(2) {
        let mut piece = input[w[0]..w[1]].to_vec();
        let r = conn.receive(
            &mut piece,
            limits,
            &mut c1m_proto::conn::admit_all,
            &mut out,
        );
        total.upgraded |= r.upgraded;
        total.frames += r.frames;
        if r.end.is_some() {
            total.end = r.end;
        }
    }
    (out, total, conn.buffered())
}

fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
    let opcode = prop_oneof![
        Just(Opcode::Text),
        Just(Opcode::Binary),
        Just(Opcode::Continuation),
        Just(Opcode::Ping),
        Just(Opcode::Pong),
        Just(Opcode::Close),
    ];
    (
        opcode,
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..300),
        any::<[u8; 4]>(),
        any::<bool>(),
    )
        .prop_map(|(op, fin, payload, mask, text_ok)| {
            let payload = if text_ok && op == Opcode::Text {
                String::from_utf8_lossy(&payload).into_owned().into_bytes()
            } else {
                payload
            };
            let mut out = Vec::new();
            frame::write_masked_frame(&mut out, op, fin, &payload, mask);
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_split_of_frames_gives_the_same_result(
        frames in prop::collection::vec(arb_frame(), 0..12),
        cuts in prop::collection::vec(any::<usize>(), 0..20),
        echo in any::<bool>(),
    ) {
        let limits = Limits { max_message: 1000, echo, ..Limits::default() };
        let input = [UPGRADE.to_vec(), frames.concat()].concat();
        let whole = feed(&input, &[], &limits);
        let split = feed(&input, &cuts, &limits);
        prop_assert_eq!(&whole, &split);
        prop_assert!(whole.1.upgraded);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_split_the_same(
        prefix in prop::sample::select(vec![&b""[..], UPGRADE]),
        junk in prop::collection::vec(any::<u8>(), 0..2000),
        cuts in prop::collection::vec(any::<usize>(), 0..20),
    ) {
        let limits = Limits { max_head: 512, max_message: 256, echo: true };
        let input = [prefix.to_vec(), junk].concat();
        let whole = feed(&input, &[], &limits);
        let split = feed(&input, &cuts, &limits);
        prop_assert_eq!(&whole, &split);
        // Nothing buffered beyond one head or one frame.
        prop_assert!(whole.2 <= 4096);
    }

    /// Long heads that stay valid for a while, then break (found by fuzz/:
    /// the verdict must not depend on whether the bad byte has arrived).
    #[test]
    fn long_heads_split_the_same(
        path_len in 0usize..1500,
        bad in any::<u8>(),
        cuts in prop::collection::vec(any::<usize>(), 0..10),
    ) {
        let limits = Limits { max_head: 512, max_message: 256, echo: false };
        let mut input = b"GET /".to_vec();
        input.extend(std::iter::repeat_n(b'p', path_len));
        input.push(bad);
        input.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        prop_assert_eq!(feed(&input, &[], &limits), feed(&input, &cuts, &limits));
    }

    #[test]
    fn head_split_byte_by_byte_parses_as_one_read(cut in 0..UPGRADE.len()) {
        let every: Vec<usize> = (0..UPGRADE.len()).collect();
        let one = feed(UPGRADE, &[], &Limits::default());
        prop_assert_eq!(&one, &feed(UPGRADE, &every, &Limits::default()));
        prop_assert_eq!(&one, &feed(UPGRADE, &[cut], &Limits::default()));
        prop_assert!(one.1.upgraded);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// What the encoder writes, the decoder reads back unchanged.
    #[test]
    fn frames_round_trip_through_the_encoder(
        data in any::<bool>(),
        fin in any::<bool>(),
        payload in prop::collection::vec(any::<u8>(), 0..70_000),
        mask in any::<[u8; 4]>(),
    ) {
        let (opcode, fin, payload) = if data {
            (Opcode::Binary, fin, &payload[..])
        } else {
            (Opcode::Ping, true, &payload[..payload.len().min(125)])
        };
        let mut buf = Vec::new();
        frame::write_masked_frame(&mut buf, opcode, fin, payload, mask);
        let f = frame::decode(&mut buf, 1 << 20).unwrap().unwrap();
        prop_assert_eq!((f.opcode, f.fin, f.len), (opcode, fin, buf.len()));
        prop_assert_eq!(&buf[f.payload_start..f.len], payload);
    }
}

/// What a test does to the fleet between ticks.
#[derive(Debug, Clone)]
enum Op {
    Connect,
    Heartbeat(usize),
    Close(usize),
    Advance(u64),
    /// The owner was busy: one pop at `now + step`, as after a stall.
    Stall(u64),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Connect),
        6 => any::<usize>().prop_map(Op::Heartbeat),
        1 => any::<usize>().prop_map(Op::Close),
        4 => (1u64..8).prop_map(Op::Advance),
        1 => (1u64..100).prop_map(Op::Stall),
    ]
}

struct Device {
    gen: u32,
    last_seen: u64,
    armed: u64,
    open: bool,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The owner logic of the shard, driven against a model: a device is
    /// deleted exactly when `now >= last_seen + timeout + 1`, i.e. never
    /// early, never late by more than the step, never after it closed.
    #[test]
    fn wheel_expires_exactly_the_silent(
        timeout in 1u64..20,
        ops in prop::collection::vec(arb_op(), 1..300),
    ) {
        let mut wheel = Wheel::new(timeout + 1, 0);
        // Slab-like: keys are reused after close, with a new generation.
        let mut devices: Vec<Device> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut next_gen = 1;
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Connect => {
                    let key = free.pop().unwrap_or_else(|| { devices.push(Device { gen: 0, last_seen: 0, armed: 0, open: false }); devices.len() - 1 });
                    let deadline = now + timeout + 1;
                    devices[key] = Device { gen: next_gen, last_seen: now, armed: deadline, open: true };
                    wheel.insert(Entry { key: key as u32, gen: next_gen, deadline });
                    next_gen += 1;
                }
                Op::Heartbeat(i) => {
                    let n = devices.len().max(1);
                    if let Some(d) = devices.iter_mut().filter(|d| d.open).nth(i % n) {
                        d.last_seen = now;
                    }
                }
                Op::Close(i) => {
                    let open: Vec<usize> = (0..devices.len()).filter(|&k| devices[k].open).collect();
                    if !open.is_empty() {
                        let key = open[i % open.len()];
                        devices[key].open = false;
                        free.push(key);
                    }
                }
                Op::Advance(_) | Op::Stall(_) => {
                    let (step, stalled) = match op {
                        Op::Advance(s) => (s, false),
                        Op::Stall(s) => (s, true),
                        _ => unreachable!(),
                    };
                    let ticks: Vec<u64> = if stalled { vec![now + step] } else { (now + 1..=now + step).collect() };
                    for t in ticks {
                        while let Some(e) = wheel.pop_due(t) {
                            prop_assert!(e.deadline <= t, "popped early");
                            let d = &mut devices[e.key as usize];
                            if !d.open || d.gen != e.gen || d.armed != e.deadline {
                                continue; // stale: closed, reused or superseded
                            }
                            let due = d.last_seen + timeout + 1;
                            if due <= t {
                                if !stalled {
                                    prop_assert_eq!(due, t, "expired late");
                                }
                                d.open = false;
                                free.push(e.key as usize);
                            } else {
                                d.armed = due;
                                wheel.insert(Entry { deadline: due, ..e });
                            }
                        }
                        // Nobody silent for the whole timeout is still open.
                        for d in devices.iter().filter(|d| d.open) {
                            prop_assert!(d.last_seen + timeout + 1 > t, "missed expiry");
                        }
                    }
                    now += step;
                }
            }
        }
    }

    /// The wheel's `next_due` (how long an idle shard may sleep) is never
    /// later than the earliest entry's deadline, and nothing is due before
    /// it: sleeping until then neither misses nor delays an expiry.
    #[test]
    fn next_due_is_the_earliest_moment_anything_comes_due(
        horizon in 1u64..300,
        start in 0u64..1000,
        deadlines in prop::collection::vec(0u64..2000, 0..40),
        advance in 0u64..500,
    ) {
        let mut wheel = Wheel::new(horizon, start);
        for (i, d) in deadlines.iter().enumerate() {
            wheel.insert(Entry { key: i as u32, gen: 0, deadline: start + d % (horizon + 1) });
        }
        // Drain up to some tick, re-checking at the new cursor.
        let mut left: Vec<u64> = Vec::new();
        while let Some(e) = wheel.pop_due(start + advance) {
            prop_assert!(e.deadline <= start + advance);
        }
        let cursor = wheel.cursor();
        for d in &deadlines {
            let deadline = start + d % (horizon + 1);
            if deadline > start + advance {
                left.push(deadline);
            }
        }
        match wheel.next_due() {
            None => prop_assert!(left.is_empty()),
            Some(t) => {
                let earliest = *left.iter().min().expect("an entry is left");
                prop_assert!(t >= cursor);
                prop_assert!(t <= earliest.max(cursor), "next_due {t} after the earliest deadline {earliest}");
                if t > cursor {
                    prop_assert_eq!(wheel.pop_due(t - 1), None, "something came due before next_due");
                }
            }
        }
    }
}

// ---- PROXY protocol headers (proto/proxy.rs) ----

use c1m_proto::proxy::{self, Proxy};
use std::net::{IpAddr, SocketAddr};

/// A valid header: (bytes, the source it carries).
fn arb_proxy_header() -> impl Strategy<Value = (Vec<u8>, Option<SocketAddr>)> {
    let v4 = (any::<[u8; 4]>(), any::<u16>())
        .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port));
    let v6 = (any::<[u8; 16]>(), any::<u16>())
        .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port));
    let pair = prop_oneof![(v4.clone(), v4), (v6.clone(), v6)];
    let tlv = (any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(t, v)| {
        let mut out = vec![t];
        out.extend_from_slice(&(v.len() as u16).to_be_bytes());
        out.extend(v);
        out
    });
    let tlvs = prop::collection::vec(tlv, 0..6).prop_map(|v| v.concat());
    let unknown_tail = prop::collection::vec(32u8..127, 0..80);
    prop_oneof![
        pair.clone().prop_map(|(s, d)| {
            let mut h = Vec::new();
            proxy::write_v1(s, d, &mut h);
            (h, Some(s))
        }),
        (pair, tlvs).prop_map(|((s, d), t)| {
            let mut h = Vec::new();
            proxy::write_v2(s, d, &t, &mut h);
            (h, Some(s))
        }),
        unknown_tail.prop_map(|tail| {
            let mut h = b"PROXY UNKNOWN".to_vec();
            if !tail.is_empty() {
                h.push(b' ');
                h.extend(tail.iter().take(proxy::V1_MAX - 16));
            }
            h.extend(b"\r\n");
            (h, None)
        }),
        Just({
            let mut h = Vec::new();
            proxy::write_v2_local(&mut h);
            (h, None)
        }),
    ]
}

/// Reads `input` in pieces as the shard does (bytes accumulate until the
/// parser decides); returns the first verdict that is not NeedMore.
fn proxy_in_pieces(input: &[u8], cuts: &[usize]) -> Proxy {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    for &end in &points {
        let v = proxy::parse(&input[..end]);
        if v != Proxy::NeedMore {
            return v;
        }
    }
    Proxy::NeedMore
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any valid header, followed by anything, split over any reads, parses
    /// to the same address and length; no proper prefix of it succeeds or
    /// fails.
    #[test]
    fn proxy_valid_headers_parse_the_same_however_split(
        (header, source) in arb_proxy_header(),
        tail in prop::collection::vec(any::<u8>(), 0..64),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let want = Proxy::Done { source, consumed: header.len() };
        let mut input = header.clone();
        input.extend(&tail);
        prop_assert_eq!(proxy::parse(&input), want);
        prop_assert_eq!(proxy_in_pieces(&input, &cuts), want);
        for i in 0..header.len() {
            prop_assert_eq!(proxy::parse(&header[..i]), Proxy::NeedMore, "prefix {}", i);
        }
    }

    /// Garbage (random bytes, or a valid header with bytes changed) never
    /// panics; once a prefix is rejected every longer input is too; nothing
    /// waits for more than the longest header; Done never claims more bytes
    /// than there are.
    #[test]
    fn proxy_garbage_is_rejected_for_good(
        input in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..1200),
            (arb_proxy_header(), prop::collection::vec((any::<usize>(), any::<u8>()), 1..4))
                .prop_map(|((mut h, _), edits)| {
                    for (i, b) in edits {
                        let n = h.len();
                        h[i % n] = b;
                    }
                    h
                }),
            (arb_proxy_header(), any::<usize>())
                .prop_map(|((h, _), cut)| h[..cut % h.len()].to_vec()),
        ],
    ) {
        let mut rejected = false;
        for end in 0..=input.len() {
            let v = proxy::parse(&input[..end]);
            match v {
                Proxy::Invalid(_) => rejected = true,
                Proxy::NeedMore => {
                    prop_assert!(!rejected, "rejected, then NeedMore at {}", end);
                    prop_assert!(end < proxy::V2_MAX, "still waiting after {} bytes", end);
                }
                Proxy::Done { consumed, .. } => {
                    prop_assert!(!rejected, "rejected, then Done at {}", end);
                    prop_assert!(consumed <= end);
                    // Done is final: more bytes do not change it.
                    prop_assert_eq!(proxy::parse(&input), v);
                    break;
                }
            }
        }
    }

    /// Through the connection: a PROXY header, the upgrade request and a
    /// ping, split anywhere, upgrade the same and carry the same source.
    #[test]
    fn proxy_header_then_upgrade_split_anywhere(
        (header, source) in arb_proxy_header(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut ping = Vec::new();
        frame::write_masked_frame(&mut ping, Opcode::Ping, true, b"hb", [1, 2, 3, 4]);
        let input = [header, UPGRADE.to_vec(), ping].concat();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.push(0);
        points.push(input.len());
        points.sort_unstable();
        let mut conn = Conn::new_proxied();
        let mut out = Vec::new();
        let (mut upgraded, mut frames, mut proxied, mut got) = (false, 0, 0, None);
        for w in points.windows(2) {
            let mut piece = input[w[0]..w[1]].to_vec();
            let r = conn.receive(&mut piece, &Limits::default(), &mut c1m_proto::conn::admit_all, &mut out);
            prop_assert!(r.end.is_none(), "{:?}", r);
            upgraded |= r.upgraded;
            frames += r.frames;
            if r.proxied {
                proxied += 1;
                got = r.source;
            }
        }
        prop_assert!(upgraded);
        prop_assert_eq!(frames, 1);
        prop_assert_eq!(proxied, 1);
        prop_assert_eq!(got, source);
        prop_assert_eq!(conn.buffered(), 0);
    }
}
