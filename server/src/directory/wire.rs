//! What crosses between `--procs` workers (through the parent, over Unix
//! sockets) so that N processes are one server: a displaced connection's
//! Replaced, operators' questions and their answers. (Claims and releases
//! of ids go through the shared table, super::registry, not here.) Sans-IO: frames to and from
//! bytes, nothing else.
//!
//! A frame is `len: u32` (of what follows), `to: u32` (a shard over all
//! workers, or [`PARENT`]), `kind: u8`, then the body.
//! Integers are little-endian. Bodies are fixed fields plus at most one id
//! (a length byte and its bytes) and one payload (a u32 length).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use c1m_proto::device_id::DeviceId;
use c1m_proto::handshake::valid_id;
use c1m_proto::table::Location;

use super::mailbox::{Answer, Ask, DeviceInfo};
use super::registry::Msg;

/// `to` of a frame for the parent (an answer to its admin listener).
pub const PARENT: u32 = u32::MAX;

/// The largest `--max-message`: 16 MiB, as Autobahn's largest cases (and
/// the conformance run, conformance/autobahn.sh) need.
pub const MAX_MESSAGE: usize = 16 << 20;

/// The largest frame accepted: a push of [`MAX_MESSAGE`] with its id and
/// the fixed fields always fits. Longer is a broken peer, not a big message.
pub const MAX_FRAME: usize = MAX_MESSAGE + (64 << 10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Registry(Msg),
    /// An operator's question (from the parent's admin listener), tagged
    /// `req` for its answer.
    Ask {
        req: u64,
        id: DeviceId,
        ask: Ask,
        at: Option<Location>,
    },
    Answer {
        req: u64,
        answer: Answer,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub to: u32,
    pub body: Body,
}

/// Why bytes are not a frame: the peer is broken (or not ours).
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

// Kinds 1, 2 and 6 (register, unregister, resync) went with the shared
// table; their numbers are not reused.
const REPLACED: u8 = 3;
const ASK: u8 = 4;
const ANSWER: u8 = 5;

impl Frame {
    /// Appends the frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.to.to_le_bytes());
        match &self.body {
            Body::Registry(Msg::Replaced { id, at }) => {
                out.push(REPLACED);
                put_id(out, id);
                put_loc(out, at);
            }
            Body::Ask { req, id, ask, at } => {
                out.push(ASK);
                out.extend_from_slice(&req.to_le_bytes());
                put_id(out, id);
                match at {
                    Some(at) => {
                        out.push(1);
                        put_loc(out, at);
                    }
                    None => out.push(0),
                }
                match ask {
                    Ask::Lookup => out.push(0),
                    Ask::Kick => out.push(1),
                    Ask::Supersede { unix_ms } => {
                        out.push(3);
                        out.extend_from_slice(&unix_ms.to_le_bytes());
                    }
                    Ask::Push { text, payload } => {
                        out.push(2);
                        out.push(*text as u8);
                        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                        out.extend_from_slice(payload);
                    }
                }
            }
            Body::Answer { req, answer } => {
                out.push(ANSWER);
                out.extend_from_slice(&req.to_le_bytes());
                match answer {
                    Answer::Found(d) => {
                        out.push(0);
                        out.extend_from_slice(&d.shard.to_le_bytes());
                        out.extend_from_slice(&d.connected_since_ms.to_le_bytes());
                        out.extend_from_slice(&d.last_heard_ms.to_le_bytes());
                        put_addr(out, d.remote);
                    }
                    Answer::Delivered => out.push(1),
                    Answer::Kicked => out.push(2),
                    Answer::NotConnected => out.push(3),
                }
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// The first frame in `buf` and the bytes it took, None if `buf`
    /// holds only part of one.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, Malformed> {
        let Some(len) = buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if !(5..=MAX_FRAME).contains(&len) {
            return Err(Malformed("frame length out of range"));
        }
        let Some(frame) = buf.get(4..4 + len) else {
            return Ok(None);
        };
        let mut r = Reader(frame);
        let to = r.u32()?;
        let body = match r.u8()? {
            REPLACED => Body::Registry(Msg::Replaced {
                id: r.id()?,
                at: r.loc()?,
            }),
            ASK => {
                let req = r.u64()?;
                let id = r.id()?;
                let at = match r.u8()? {
                    0 => None,
                    1 => Some(r.loc()?),
                    _ => return Err(Malformed("bad location flag")),
                };
                let ask = match r.u8()? {
                    0 => Ask::Lookup,
                    1 => Ask::Kick,
                    2 => {
                        let text = match r.u8()? {
                            0 => false,
                            1 => true,
                            _ => return Err(Malformed("bad text flag")),
                        };
                        let n = r.u32()? as usize;
                        Ask::Push {
                            text,
                            payload: r.take(n)?.to_vec(),
                        }
                    }
                    3 => Ask::Supersede { unix_ms: r.u64()? },
                    _ => return Err(Malformed("unknown question")),
                };
                Body::Ask { req, id, ask, at }
            }
            ANSWER => {
                let req = r.u64()?;
                let answer = match r.u8()? {
                    0 => Answer::Found(DeviceInfo {
                        shard: r.u32()?,
                        connected_since_ms: r.u64()?,
                        last_heard_ms: r.u64()?,
                        remote: r.addr()?,
                    }),
                    1 => Answer::Delivered,
                    2 => Answer::Kicked,
                    3 => Answer::NotConnected,
                    _ => return Err(Malformed("unknown answer")),
                };
                Body::Answer { req, answer }
            }
            _ => return Err(Malformed("unknown frame kind")),
        };
        if !r.0.is_empty() {
            return Err(Malformed("bytes after the frame's body"));
        }
        Ok(Some((Frame { to, body }, 4 + len)))
    }
}

/// Where frame `to` of frame bytes `buf` (a whole frame) is going, for a
/// router that does not decode the rest.
pub fn destination(buf: &[u8]) -> Option<u32> {
    let b = buf.get(4..8)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The length of the whole frame starting `buf`, once its length is in.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, Malformed> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if !(5..=MAX_FRAME).contains(&len) {
        return Err(Malformed("frame length out of range"));
    }
    Ok(Some(4 + len))
}

fn put_id(out: &mut Vec<u8>, id: &DeviceId) {
    let s = id.as_str().as_bytes();
    // Ids are at most 64 bytes (the handshake's check): a byte holds it.
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

fn put_loc(out: &mut Vec<u8>, at: &Location) {
    out.extend_from_slice(&at.shard.to_le_bytes());
    out.extend_from_slice(&at.key.to_le_bytes());
    out.extend_from_slice(&at.gen.to_le_bytes());
}

fn put_addr(out: &mut Vec<u8>, a: Option<SocketAddr>) {
    match a {
        None => out.push(0),
        Some(SocketAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_le_bytes());
        }
        Some(SocketAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_le_bytes());
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed("frame body too short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        let b = self.take(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn id(&mut self) -> Result<DeviceId, Malformed> {
        let n = self.u8()? as usize;
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| Malformed("id not UTF-8"))?;
        if !valid_id(s) {
            return Err(Malformed("not a device id"));
        }
        Ok(DeviceId::new(s))
    }

    fn loc(&mut self) -> Result<Location, Malformed> {
        Ok(Location {
            shard: self.u32()?,
            key: self.u32()?,
            gen: self.u32()?,
        })
    }

    fn addr(&mut self) -> Result<Option<SocketAddr>, Malformed> {
        Ok(match self.u8()? {
            0 => None,
            4 => {
                let b = self.take(4)?;
                let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
                Some(SocketAddr::new(IpAddr::V4(ip), self.u16()?))
            }
            6 => {
                let mut o = [0; 16];
                o.copy_from_slice(self.take(16)?);
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), self.u16()?))
            }
            _ => return Err(Malformed("bad address family")),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn loc() -> impl Strategy<Value = Location> {
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(shard, key, gen)| Location {
            shard,
            key,
            gen,
        })
    }

    fn id() -> impl Strategy<Value = DeviceId> {
        "[0-9A-Za-z:._-]{1,64}".prop_map(|s| DeviceId::new(&s))
    }

    fn addr() -> impl Strategy<Value = Option<SocketAddr>> {
        prop_oneof![
            Just(None),
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(o, p)| Some(SocketAddr::new(IpAddr::V4(o.into()), p))),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(o, p)| Some(SocketAddr::new(IpAddr::V6(o.into()), p))),
        ]
    }

    fn body() -> impl Strategy<Value = Body> {
        let ask = prop_oneof![
            Just(Ask::Lookup),
            Just(Ask::Kick),
            any::<u64>().prop_map(|unix_ms| Ask::Supersede { unix_ms }),
            (
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(text, payload)| Ask::Push { text, payload }),
        ];
        let answer = prop_oneof![
            Just(Answer::Delivered),
            Just(Answer::Kicked),
            Just(Answer::NotConnected),
            (any::<u32>(), any::<u64>(), any::<u64>(), addr()).prop_map(|(shard, c, l, remote)| {
                Answer::Found(DeviceInfo {
                    shard,
                    connected_since_ms: c,
                    last_heard_ms: l,
                    remote,
                })
            }),
        ];
        prop_oneof![
            (id(), loc()).prop_map(|(id, at)| Body::Registry(Msg::Replaced { id, at })),
            (any::<u64>(), id(), ask, proptest::option::of(loc()))
                .prop_map(|(req, id, ask, at)| Body::Ask { req, id, ask, at }),
            (any::<u64>(), answer).prop_map(|(req, answer)| Body::Answer { req, answer }),
        ]
    }

    proptest! {
        /// Frames come back as they went, back to back, whatever the
        /// stream is cut into; a prefix is never mistaken for a frame.
        #[test]
        fn frames_round_trip_through_any_cut(
            frames in proptest::collection::vec((any::<u32>(), body()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let frames: Vec<Frame> = frames.into_iter().map(|(to, body)| Frame { to, body }).collect();
            let mut bytes = Vec::new();
            for f in &frames {
                f.encode(&mut bytes);
            }
            let cut = cut.index(bytes.len());
            let mut got = Vec::new();
            let mut buf: Vec<u8> = bytes[..cut].to_vec();
            let mut rest = &bytes[cut..];
            loop {
                match Frame::decode(&buf).unwrap() {
                    Some((f, n)) => {
                        prop_assert_eq!(destination(&buf), Some(f.to));
                        prop_assert_eq!(frame_len(&buf).unwrap(), Some(n));
                        got.push(f);
                        buf.drain(..n);
                    }
                    None if rest.is_empty() => break,
                    None => {
                        buf.extend_from_slice(rest);
                        rest = &[];
                    }
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, frames);
        }

        /// Garbage never panics the decoder.
        #[test]
        fn garbage_is_an_error_or_a_frame_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::decode(&bytes);
            let _ = frame_len(&bytes);
        }
    }

    #[test]
    fn the_largest_push_fits_in_one_frame() {
        let mut b = Vec::new();
        let frame = Frame {
            to: u32::MAX - 1,
            body: Body::Ask {
                req: u64::MAX,
                id: DeviceId::new(&"a".repeat(64)),
                ask: Ask::Push {
                    text: false,
                    payload: vec![7; MAX_MESSAGE],
                },
                at: Some(Location {
                    shard: u32::MAX,
                    key: u32::MAX,
                    gen: u32::MAX,
                }),
            },
        };
        frame.encode(&mut b);
        assert!(b.len() <= 4 + MAX_FRAME, "{} bytes", b.len());
        assert_eq!(Frame::decode(&b).unwrap(), Some((frame, b.len())));
    }

    #[test]
    fn a_bad_id_or_a_huge_length_is_malformed() {
        let mut b = Vec::new();
        Frame {
            to: 1,
            body: Body::Registry(Msg::Replaced {
                id: DeviceId::new("ok"),
                at: Location {
                    shard: 0,
                    key: 0,
                    gen: 0,
                },
            }),
        }
        .encode(&mut b);
        let mut bad = b.clone();
        bad[10] = b' '; // inside the id
        assert_eq!(
            Frame::decode(&bad).unwrap_err(),
            Malformed("not a device id")
        );
        let mut huge = b;
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Frame::decode(&huge).is_err());
    }
}
