//! One device connection's protocol state (sans-IO): bytes in, bytes out, and
//! whether to close. The shard feeds it whatever a read returned; the split of
//! the bytes never changes the outcome.
//!
//! An idle open connection holds no buffer: `carry` is empty (and unallocated)
//! unless a request head or a frame straddles two reads, and `message` exists
//! only while a fragmented message is in progress.

use std::net::SocketAddr;

use crate::carry::Carry;
use crate::frame::{self, code, Opcode, Utf8Stream};
use crate::handover::{self, ConnState, MessageState};
use crate::handshake::{self, Parsed, Reject, Upgrade};
use crate::proxy::{self, Proxy};

/// An `admit` for [`Conn::receive`] that lets every upgrade through.
pub fn admit_all(_: &Upgrade<'_>) -> Result<(), Reject> {
    Ok(())
}

/// Protocol limits, the same for every connection of a shard.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request head; longer is answered with 431.
    pub max_head: usize,
    /// Largest frame payload and largest reassembled message; over it: 1009.
    pub max_message: usize,
    /// Echo data messages back (for conformance suites).
    pub echo: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_head: 8192,
            max_message: 64 * 1024,
            echo: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the PROXY protocol header a front sends first
    /// (`--proxy-protocol`); then the upgrade request.
    Proxy,
    /// Waiting for the upgrade request.
    Handshake,
    /// Upgraded: frames flow.
    Open,
    /// We sent a Close (shutdown) and wait for the peer's.
    Closing,
    /// Nothing more to read: close the socket once the output is sent.
    Done,
}

/// Why a connection ends, as the stats count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The device sent a Close frame (or answered ours).
    ClientClose,
    /// A protocol violation; we sent a Close with this code.
    ProtocolError(u16),
    /// The upgrade was refused with this HTTP status.
    Rejected(u16),
    /// The PROXY protocol header was malformed (why); closed without an answer.
    BadProxy(&'static str),
}

/// What one call to [`Conn::receive`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The upgrade completed in this call.
    pub upgraded: bool,
    /// Complete frames decoded (each is a heartbeat).
    pub frames: u32,
    /// Set when the connection must close after its output is sent.
    pub end: Option<End>,
    /// The PROXY header completed in this call.
    pub proxied: bool,
    /// With `proxied`: the device's address the header carried (None for
    /// a header without one: v1 UNKNOWN, v2 LOCAL).
    pub source: Option<SocketAddr>,
}

#[derive(Debug)]
struct Message {
    text: bool,
    len: usize,
    utf8: Utf8Stream,
    /// The message so far, kept only with `Limits::echo`.
    echo: Vec<u8>,
}

#[derive(Debug)]
pub struct Conn {
    phase: Phase,
    /// Bytes carried to the next read: none (no allocation, 8 bytes in
    /// the slot) unless a head or frame straddles two reads.
    carry: Carry,
    message: Option<Box<Message>>,
}

impl Default for Conn {
    fn default() -> Conn {
        Conn::new()
    }
}

impl Conn {
    pub fn new() -> Conn {
        Conn {
            phase: Phase::Handshake,
            carry: Carry::default(),
            message: None,
        }
    }

    /// A connection from a front that first sends a PROXY protocol header
    /// (v1 or v2); it is consumed, and the rest of the bytes go on to the
    /// upgrade parser.
    pub fn new_proxied() -> Conn {
        Conn {
            phase: Phase::Proxy,
            ..Conn::new()
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// An upgraded connection is in the middle of a frame (part of it read).
    pub fn has_partial_frame(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Closing) && !self.carry.is_empty()
    }

    /// Bytes held between reads (a partial head or frame, a fragmented message).
    pub fn buffered(&self) -> usize {
        self.carry.len() + self.message.as_ref().map_or(0, |m| m.echo.len())
    }

    /// The whole protocol state as plain data, borrowed: what a handover
    /// carries to another process ([`crate::handover`]).
    pub fn export(&self) -> ConnState<'_> {
        ConnState {
            phase: self.phase,
            carry: self.carry.as_slice(),
            message: self.message.as_deref().map(|m| MessageState {
                text: m.text,
                len: m.len as u64,
                utf8_pending: m.utf8.pending(),
                echo: &m.echo,
            }),
        }
    }

    /// Rebuilds a connection from [`Conn::export`]'s data (`upgraded`:
    /// whether it completed its upgrade); the same bytes then have the
    /// same outcome as in the original.
    pub fn import(s: &ConnState<'_>, upgraded: bool) -> Result<Conn, handover::Error> {
        handover::check_state(s, upgraded)?;
        let message = match &s.message {
            None => None,
            Some(m) => {
                let mut utf8 = Utf8Stream::default();
                if utf8.feed(m.utf8_pending).is_err() || utf8.pending() != m.utf8_pending {
                    return Err(handover::Error::Invalid("utf8 pending"));
                }
                Some(Box::new(Message {
                    text: m.text,
                    len: usize::try_from(m.len)
                        .map_err(|_| handover::Error::Invalid("message length"))?,
                    utf8,
                    echo: m.echo.to_vec(),
                }))
            }
        };
        Ok(Conn {
            phase: s.phase,
            carry: {
                let mut carry = Carry::default();
                carry.push(s.carry);
                carry
            },
            message,
        })
    }

    /// Processes bytes just read. Answers (101, pongs, closes, echoes) are
    /// appended to `out`. `admit` decides a well-formed upgrade request
    /// before it is answered: Ok for 101, or the refusal to answer with
    /// (503 when the shard is full, 401 without a valid token); it is where
    /// the owner learns the device's id.
    // Inlined into the shard's read path (per heartbeat): left to the
    // compiler, the choice flipped with unrelated shard code (callgrind:
    // +54 instructions per ping, results/20261207T160616Z-budget-profile).
    #[inline]
    pub fn receive(
        &mut self,
        data: &mut [u8],
        limits: &Limits,
        admit: &mut impl FnMut(&Upgrade<'_>) -> Result<(), Reject>,
        out: &mut Vec<u8>,
    ) -> Received {
        let mut r = Received::default();
        let mut carry = std::mem::take(&mut self.carry);
        let Ok(()) = carry.consume(data, |buf| {
            let used = self.process(buf, limits, admit, out, &mut r);
            // A connection that is done keeps nothing.
            Ok::<_, std::convert::Infallible>(match self.phase {
                Phase::Done => buf.len(),
                _ => used,
            })
        });
        self.carry = carry;
        r
    }

    /// Starts a server-side close (shutdown): sends Close 1001 and waits for
    /// the peer's Close. A connection still in its handshake just ends.
    pub fn start_close(&mut self, out: &mut Vec<u8>) {
        self.start_close_with(out, b"");
    }

    /// [`Conn::start_close`] with a reason (a paced drain's reconnect hint).
    pub fn start_close_with(&mut self, out: &mut Vec<u8>, reason: &[u8]) {
        match self.phase {
            Phase::Open => {
                frame::write_close_with(out, code::GOING_AWAY, reason);
                self.phase = Phase::Closing;
            }
            Phase::Proxy | Phase::Handshake => self.phase = Phase::Done,
            Phase::Closing | Phase::Done => {}
        }
    }

    /// Ends a silent connection gracefully: Close 1001, and no wait for the
    /// peer's answer (it is presumed gone).
    pub fn expire(&mut self, out: &mut Vec<u8>) {
        self.end(out, code::GOING_AWAY, b"");
    }

    /// Ends the connection from this side with Close `close_code` and
    /// `reason`, without waiting for the peer's answer.
    pub fn end(&mut self, out: &mut Vec<u8>, close_code: u16, reason: &[u8]) {
        if self.phase == Phase::Open {
            frame::write_close_with(out, close_code, reason);
        }
        self.phase = Phase::Done;
        self.carry.clear();
        self.message = None;
    }

    fn finish(&mut self, r: &mut Received, end: End) {
        self.phase = Phase::Done;
        self.carry.clear();
        self.message = None;
        r.end = Some(end);
    }

    fn fail(&mut self, r: &mut Received, out: &mut Vec<u8>, close_code: u16) {
        // In Closing our Close went out already: RFC 6455 5.5.1, no frame
        // after it, a second Close included.
        if self.phase == Phase::Open {
            frame::write_close(out, close_code);
        }
        self.finish(r, End::ProtocolError(close_code));
    }

    /// Consumes complete units (the head, then frames) from `buf`; returns
    /// how many bytes were used.
    fn process(
        &mut self,
        buf: &mut [u8],
        limits: &Limits,
        admit: &mut impl FnMut(&Upgrade<'_>) -> Result<(), Reject>,
        out: &mut Vec<u8>,
        r: &mut Received,
    ) -> usize {
        let mut pos = 0;
        loop {
            match self.phase {
                Phase::Proxy => match proxy::parse(&buf[pos..]) {
                    Proxy::NeedMore => return pos,
                    Proxy::Invalid(why) => {
                        self.finish(r, End::BadProxy(why));
                        return buf.len();
                    }
                    Proxy::Done { source, consumed } => {
                        pos += consumed;
                        r.proxied = true;
                        r.source = source;
                        self.phase = Phase::Handshake;
                    }
                },
                Phase::Handshake => match handshake::parse(&buf[pos..], limits.max_head) {
                    Parsed::Partial => return pos,
                    Parsed::Reject(reject) => {
                        reject.write(out);
                        self.finish(r, End::Rejected(reject.status()));
                        return buf.len();
                    }
                    Parsed::Upgrade(u) => {
                        if let Err(reject) = admit(&u) {
                            reject.write(out);
                            self.finish(r, End::Rejected(reject.status()));
                            return buf.len();
                        }
                        handshake::write_accept(&u.key, out);
                        pos += u.head_len;
                        self.phase = Phase::Open;
                        r.upgraded = true;
                    }
                },
                Phase::Open | Phase::Closing => {
                    let f = match frame::decode(&mut buf[pos..], limits.max_message) {
                        Ok(Some(f)) => f,
                        Ok(None) => return pos,
                        Err(close_code) => {
                            self.fail(r, out, close_code);
                            return buf.len();
                        }
                    };
                    let payload = &buf[pos + f.payload_start..pos + f.len];
                    pos += f.len;
                    r.frames += 1;
                    if let Err(close_code) = self.on_frame(f, payload, limits, out, r) {
                        self.fail(r, out, close_code);
                        return buf.len();
                    }
                }
                Phase::Done => return buf.len(),
            }
        }
    }

    fn on_frame(
        &mut self,
        f: frame::Frame,
        payload: &[u8],
        limits: &Limits,
        out: &mut Vec<u8>,
        r: &mut Received,
    ) -> Result<(), u16> {
        let open = self.phase == Phase::Open;
        match f.opcode {
            Opcode::Ping => {
                if open {
                    frame::write_frame(out, Opcode::Pong, payload);
                }
            }
            Opcode::Pong => {}
            Opcode::Close => {
                let reply = close_reply(payload)?;
                if open {
                    frame::write_frame(out, Opcode::Close, reply);
                }
                self.finish(r, End::ClientClose);
            }
            Opcode::Text | Opcode::Binary => {
                if self.message.is_some() {
                    return Err(code::PROTOCOL_ERROR); // a new message inside a fragmented one
                }
                let text = f.opcode == Opcode::Text;
                let mut utf8 = Utf8Stream::default();
                if text {
                    utf8.feed(payload).map_err(|_| code::INVALID_PAYLOAD)?;
                }
                if f.fin {
                    if text && !utf8.is_complete() {
                        return Err(code::INVALID_PAYLOAD);
                    }
                    if limits.echo && open {
                        frame::write_frame(out, f.opcode, payload);
                    }
                } else {
                    self.message = Some(Box::new(Message {
                        text,
                        len: payload.len(),
                        utf8,
                        echo: if limits.echo {
                            payload.to_vec()
                        } else {
                            Vec::new()
                        },
                    }));
                }
            }
            Opcode::Continuation => {
                let Some(m) = self.message.as_mut() else {
                    return Err(code::PROTOCOL_ERROR); // nothing to continue
                };
                m.len += payload.len();
                if m.len > limits.max_message {
                    return Err(code::TOO_BIG);
                }
                if m.text {
                    m.utf8.feed(payload).map_err(|_| code::INVALID_PAYLOAD)?;
                }
                if limits.echo {
                    m.echo.extend_from_slice(payload);
                }
                if f.fin {
                    if m.text && !m.utf8.is_complete() {
                        return Err(code::INVALID_PAYLOAD);
                    }
                    if limits.echo && open {
                        let opcode = if m.text { Opcode::Text } else { Opcode::Binary };
                        frame::write_frame(out, opcode, &m.echo);
                    }
                    self.message = None;
                }
            }
        }
        Ok(())
    }
}

/// The payload of our answer to a peer's Close: its code echoed (RFC 6455
/// 5.5.1), or an error code when the Close itself is malformed.
fn close_reply(payload: &[u8]) -> Result<&[u8], u16> {
    match payload {
        [] => Ok(&[]),
        [_] => Err(code::PROTOCOL_ERROR),
        [hi, lo, reason @ ..] => {
            if !frame::valid_close_code(u16::from_be_bytes([*hi, *lo])) {
                return Err(code::PROTOCOL_ERROR);
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(code::INVALID_PAYLOAD);
            }
            Ok(&payload[..2])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const UPGRADE: &[u8] = b"GET /ws?id=aa:bb HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    fn masked(opcode: Opcode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        frame::write_masked_frame(&mut v, opcode, fin, payload, [9, 8, 7, 6]);
        v
    }

    fn run(input: &[u8], limits: &Limits) -> (Received, Vec<u8>, Conn) {
        let mut c = Conn::new();
        let mut out = Vec::new();
        let mut data = input.to_vec();
        let r = c.receive(&mut data, limits, &mut admit_all, &mut out);
        (r, out, c)
    }

    #[test]
    fn upgrade_then_ping_gets_pong() {
        let mut input = UPGRADE.to_vec();
        input.extend(masked(Opcode::Ping, true, b"hb"));
        let (r, out, c) = run(&input, &Limits::default());
        assert!(r.upgraded);
        assert_eq!(r.frames, 1);
        assert!(out.starts_with(b"HTTP/1.1 101 "));
        assert!(out.ends_with(&[0x8a, 2, b'h', b'b']));
        assert_eq!(c.phase(), Phase::Open);
        assert_eq!(c.buffered(), 0);
    }

    #[test]
    fn full_shard_answers_503() {
        let mut c = Conn::new();
        let mut out = Vec::new();
        let r = c.receive(
            &mut UPGRADE.to_vec(),
            &Limits::default(),
            &mut |_: &Upgrade<'_>| Err(Reject::Full),
            &mut out,
        );
        assert_eq!(r.end, Some(End::Rejected(503)));
        assert!(out.starts_with(b"HTTP/1.1 503 "));
    }

    #[test]
    fn close_is_echoed_and_ends() {
        let mut input = UPGRADE.to_vec();
        input.extend(masked(Opcode::Close, true, &[0x03, 0xe8, b'b', b'y', b'e']));
        let (r, out, c) = run(&input, &Limits::default());
        assert_eq!(r.end, Some(End::ClientClose));
        assert!(out.ends_with(&[0x88, 2, 0x03, 0xe8]));
        assert_eq!(c.phase(), Phase::Done);
    }

    #[test]
    fn violations_close_with_1002_1007_1009() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (masked(Opcode::Continuation, true, b"x"), 1002),
            (masked(Opcode::Text, true, &[0xff, 0xfe]), 1007),
            (masked(Opcode::Binary, true, &vec![0; 70_000]), 1009),
            (masked(Opcode::Close, true, &[3]), 1002),
            (masked(Opcode::Close, true, &[0x03, 0xed]), 1002), // 1005 may not be sent
            (
                [
                    masked(Opcode::Text, false, b"a"),
                    masked(Opcode::Text, true, b"b"),
                ]
                .concat(),
                1002,
            ),
            (
                [
                    masked(Opcode::Binary, false, &vec![0; 40_000]),
                    masked(Opcode::Continuation, true, &vec![0; 40_000]),
                ]
                .concat(),
                1009,
            ),
        ];
        for (frames, close_code) in cases {
            let input = [UPGRADE.to_vec(), frames].concat();
            let (r, out, _) = run(&input, &Limits::default());
            assert_eq!(r.end, Some(End::ProtocolError(close_code)));
            let mut expect = Vec::new();
            frame::write_close(&mut expect, close_code);
            assert!(out.ends_with(&expect), "code {close_code}");
        }
    }

    #[test]
    fn fragmented_text_is_reassembled_for_echo() {
        let limits = Limits {
            echo: true,
            ..Limits::default()
        };
        let snow = "☃".as_bytes();
        let input = [
            UPGRADE.to_vec(),
            masked(Opcode::Text, false, &snow[..1]),
            masked(Opcode::Ping, true, b""),
            masked(Opcode::Continuation, true, &snow[1..]),
        ]
        .concat();
        let (r, out, c) = run(&input, &limits);
        assert_eq!(r.frames, 3);
        assert_eq!(r.end, None);
        let mut expect = Vec::new();
        frame::write_frame(&mut expect, Opcode::Pong, b"");
        frame::write_frame(&mut expect, Opcode::Text, snow);
        assert!(out.ends_with(&expect));
        assert_eq!(c.buffered(), 0);
    }

    #[test]
    fn a_proxy_header_and_the_request_in_one_read() {
        let src: SocketAddr = "192.0.2.7:51000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:9000".parse().unwrap();
        for v2 in [false, true] {
            let mut input = Vec::new();
            if v2 {
                proxy::write_v2(src, dst, &[], &mut input);
            } else {
                proxy::write_v1(src, dst, &mut input);
            }
            input.extend(UPGRADE);
            input.extend(masked(Opcode::Ping, true, b"hb"));
            let mut c = Conn::new_proxied();
            assert_eq!(c.phase(), Phase::Proxy);
            let mut out = Vec::new();
            let r = c.receive(&mut input, &Limits::default(), &mut admit_all, &mut out);
            assert!(r.proxied && r.upgraded, "{r:?}");
            assert_eq!(r.source, Some(src));
            assert_eq!(r.frames, 1);
            assert!(out.starts_with(b"HTTP/1.1 101 "));
        }
    }

    #[test]
    fn a_connection_without_its_proxy_header_ends_silently() {
        let mut c = Conn::new_proxied();
        let mut out = Vec::new();
        let r = c.receive(
            &mut UPGRADE.to_vec(),
            &Limits::default(),
            &mut admit_all,
            &mut out,
        );
        assert!(matches!(r.end, Some(End::BadProxy(_))), "{r:?}");
        assert!(!r.upgraded && out.is_empty());
        assert_eq!(c.phase(), Phase::Done);
    }

    #[test]
    fn shutdown_close_waits_for_the_peer() {
        let (_, _, mut c) = run(UPGRADE, &Limits::default());
        let mut out = Vec::new();
        c.start_close(&mut out);
        assert_eq!(out, [0x88, 2, 0x03, 0xe9]);
        assert_eq!(c.phase(), Phase::Closing);
        out.clear();
        let r = c.receive(
            &mut masked(Opcode::Close, true, &[0x03, 0xe9]),
            &Limits::default(),
            &mut admit_all,
            &mut out,
        );
        assert_eq!(r.end, Some(End::ClientClose));
        assert!(out.is_empty(), "no second Close after ours");
    }

    /// A protocol error while our Close awaits its answer ends the
    /// connection without a second Close (RFC 6455 5.5.1).
    #[test]
    fn a_protocol_error_in_closing_sends_no_second_close() {
        let (_, _, mut c) = run(UPGRADE, &Limits::default());
        let mut out = Vec::new();
        c.start_close(&mut out);
        out.clear();
        // An unmasked frame from a client is a protocol error (1002).
        let r = c.receive(
            &mut [0x81, 0x01, b'x'],
            &Limits::default(),
            &mut admit_all,
            &mut out,
        );
        assert_eq!(r.end, Some(End::ProtocolError(1002)));
        assert!(out.is_empty(), "a second Close: {out:?}");
    }
}
