//! The handover format (sans-IO): what an old server process tells the new
//! one when it hands its listeners and connections over during an upgrade
//! (issue 22, docs/upgrade.md), and what the new one answers.
//!
//! The bytes go over a Unix stream socket in batches whose descriptors ride
//! in SCM_RIGHTS (`c1m_io::handover`); this module knows nothing of that.
//! A batch's payload is a sequence of records; the records that carry a
//! descriptor ([`Record::fds`]: a [`Listener`] or a [`ConnRecord`]) take the
//! batch's descriptors in order, one each.
//!
//! # Wire format (little-endian throughout)
//!
//! ```text
//! record   kind u8 | len u32 | body[len]        (the body is consumed exactly)
//! 1 Hello    magic "c1m-hand" | version u16 | role u8 | pid u32 | shards u32
//!            | backend u8 | mono_ns u64 | build: len u8 + bytes (<= 64, printable)
//! 2 Listener shard u32 | role u8 | addr                                  (1 fd)
//! 3 Conn     shard u32 | key u32 | gen u32 | ticket_key u32 | since_ns u64 | last_heard_ns u64
//!            | deadline_ns u64 | frame_deadline_ns u64 | flags u8 | id: len u8 + bytes
//!            | remote: opt addr | phase u8 | carry: len u32 + bytes
//!            | message: tag u8 (0 none, 1 binary, 2 text)
//!                [ len u64 | utf8 pending: len u8 + bytes | echo: len u32 + bytes ]
//!            | output: len u32 + bytes                                   (1 fd)
//! 4 ShardEnd shard u32 | listeners u32 | conns u32
//! 5 Ack      shard u32 | seq u32 | taken u32
//! 6 Abort    reason: len u16 + UTF-8 (<= 1024)
//! 7 Done     conns u64
//! 8 TicketKey key[16]                    (the UDP ticket key, old to new)
//! addr       tag u8: 4 -> ip[4] port u16; 6 -> ip[16] port u16 flowinfo u32 scope u32
//! opt addr   tag 0 (none) or an addr
//! ```
//!
//! A Hello's kind, magic and version never move: whatever a later version
//! puts after them, a reader of any version answers a peer of another with
//! [`Error::Version`], not a parse error.
//!
//! # Times
//!
//! Every time is nanoseconds of CLOCK_MONOTONIC. On Linux that clock is one
//! clock for the whole boot (not per process), so the new process reads the
//! old one's times directly: a connection last heard 20 s before the
//! handover is still 20 s silent after it. What this relies on: both
//! processes run on one boot of one host and in one time namespace (the
//! new process is the old one's child, spawned without CLONE_NEWTIME). The
//! Hello carries the sender's clock at sending, so the receiver can refuse
//! a peer whose clock is ahead of its own. The driver's side converts a
//! `std::time::Instant` through an anchor pair (`c1m_io::handover::Clock`),
//! so nothing depends on which clock `Instant` uses.
//!
//! # Errors
//!
//! Decoding never panics and never reads past its slice: a truncated
//! record is [`Error::Truncated`], any other malformed one an error naming
//! what is wrong. Encoding checks the same rules, so an encoder never
//! writes what its decoder refuses.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::conn::Phase;
use crate::handshake::valid_id;

/// The first bytes of a Hello's body.
pub const MAGIC: [u8; 8] = *b"c1m-hand";
/// The format this build speaks. Bump it on any change to a record's body.
pub const VERSION: u16 = 2;
/// Bytes of a record's kind and length.
pub const HEADER: usize = 5;
/// Longest build id in a Hello.
pub const MAX_BUILD: usize = 64;
/// Longest reason in an Abort.
pub const MAX_REASON: usize = 1024;

const HELLO: u8 = 1;
const LISTENER: u8 = 2;
const CONN: u8 = 3;
const SHARD_END: u8 = 4;
const ACK: u8 = 5;
const ABORT: u8 = 6;
const DONE: u8 = 7;
const TICKET_KEY: u8 = 8;

const UPGRADED: u8 = 1;
const REGISTERED: u8 = 2;

/// Why bytes are not a handover record (or a record cannot be written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The bytes end inside a record.
    Truncated,
    /// The first record is not a c1m handover Hello.
    Magic,
    /// The peer speaks another version of the format.
    Version { theirs: u16 },
    /// An unknown record kind.
    Kind(u8),
    /// A field out of its range, or fields that contradict each other.
    Invalid(&'static str),
    /// A record's body is longer than its fields.
    Trailing,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated => f.write_str("the handover record is cut short"),
            Error::Magic => f.write_str("the peer did not answer with a c1m handover hello"),
            Error::Version { theirs } => write!(
                f,
                "the peer speaks handover format v{theirs} and this build v{VERSION}"
            ),
            Error::Kind(k) => write!(f, "unknown handover record kind {k}"),
            Error::Invalid(what) => write!(f, "invalid handover record: {what}"),
            Error::Trailing => f.write_str("a handover record is longer than its fields"),
        }
    }
}

impl std::error::Error for Error {}

/// Which side of the handover a Hello comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The running process, offering its connections.
    Old,
    /// The new binary, taking them.
    New,
}

/// The I/O backend a side runs (the two may differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Epoll,
    Uring,
}

/// The version handshake: each side sends one first, and checks the other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello<'a> {
    pub role: Role,
    pub pid: u32,
    /// Shards of the sender (the new process's, from the same arguments).
    pub shards: u32,
    pub backend: Backend,
    /// The sender's CLOCK_MONOTONIC when it sent this.
    pub mono_ns: u64,
    /// The caller's build id (a git hash, a version): printable ASCII, at
    /// most [`MAX_BUILD`] bytes.
    pub build: &'a str,
}

/// What a listening socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerRole {
    /// The plaintext WebSocket port.
    Plain,
    /// The TLS (`wss://`) port.
    Tls,
    /// The UDP heartbeat socket.
    Udp,
    /// The admin port.
    Admin,
}

/// A listening socket (its descriptor rides with the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// The shard that owns it (the admin port: 0).
    pub shard: u32,
    pub role: ListenerRole,
    /// Its local address, as bound.
    pub addr: SocketAddr,
}

/// A fragmented message in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageState<'a> {
    pub text: bool,
    /// Payload bytes received so far.
    pub len: u64,
    /// Text only: the bytes of a character split between two fragments
    /// (a valid, incomplete UTF-8 sequence of 1 to 3 bytes), else empty.
    pub utf8_pending: &'a [u8],
    /// The message so far when the server echoes (`--echo`), else empty.
    pub echo: &'a [u8],
}

/// A [`crate::conn::Conn`]'s protocol state as plain data
/// (`Conn::export` / `Conn::import`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnState<'a> {
    pub phase: Phase,
    /// Bytes of a head or frame that straddled two reads (empty: none).
    pub carry: &'a [u8],
    pub message: Option<MessageState<'a>>,
}

/// One connection (its socket's descriptor rides with the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRecord<'a> {
    /// Where it lived in the old process: shard, slab key and generation,
    /// as its registry entry and its UDP ticket name it.
    pub shard: u32,
    pub key: u32,
    pub gen: u32,
    /// The slab key its UDP ticket names (with `gen`): `key`, unless it
    /// moved in an earlier handover and kept the ticket it had then.
    pub ticket_key: u32,
    /// When it upgraded (its slot's `since`), monotonic ns.
    pub since_ns: u64,
    /// When its last complete frame (or its upgrade) arrived, monotonic ns.
    pub last_heard_ns: u64,
    /// When its wheel entry is due, monotonic ns.
    pub deadline_ns: u64,
    /// By when the frame in progress must be complete, monotonic ns; 0: none.
    pub frame_deadline_ns: u64,
    /// It completed its upgrade.
    pub upgraded: bool,
    /// It holds a claim in the registry table (at shard, key, gen).
    pub registered: bool,
    /// The device id (empty before the upgrade).
    pub id: &'a str,
    /// The device's address when not the socket peer's (PROXY header,
    /// trusted X-Forwarded-For).
    pub remote: Option<SocketAddr>,
    pub state: ConnState<'a>,
    /// Output the driver held and the kernel had not taken, in order: the
    /// new process sends it before anything else.
    pub output: &'a [u8],
}

/// The end of one shard's records, with their counts to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardEnd {
    pub shard: u32,
    pub listeners: u32,
    pub conns: u32,
}

/// The new process took a batch: it owns the `taken` descriptors of batch
/// `seq` of `shard`, and the old process may close its copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub shard: u32,
    pub seq: u32,
    pub taken: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    Hello(Hello<'a>),
    Listener(Listener),
    Conn(ConnRecord<'a>),
    ShardEnd(ShardEnd),
    Ack(Ack),
    /// Either side gives up, saying why in one sentence.
    Abort(&'a str),
    /// Old to new: everything is sent. New to old: everything is armed.
    Done {
        conns: u64,
    },
    /// Old to new, with the listeners (`--udp-heartbeat`): the key its
    /// tickets are sealed with, which the new process seals and checks
    /// with from then on, so that every device's ticket stays good.
    TicketKey([u8; 16]),
}

impl Record<'_> {
    /// Descriptors this record takes from its batch, in order.
    pub fn fds(&self) -> usize {
        match self {
            Record::Listener(_) | Record::Conn(_) => 1,
            _ => 0,
        }
    }

    /// Appends the record to `out` (no other allocation). On an error
    /// nothing is appended.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        self.check()?;
        let start = out.len();
        out.push(self.kind());
        out.extend_from_slice(&[0; 4]);
        match self {
            Record::Hello(h) => {
                out.extend_from_slice(&MAGIC);
                put16(out, VERSION);
                out.push(match h.role {
                    Role::Old => 0,
                    Role::New => 1,
                });
                put32(out, h.pid);
                put32(out, h.shards);
                out.push(match h.backend {
                    Backend::Epoll => 0,
                    Backend::Uring => 1,
                });
                put64(out, h.mono_ns);
                out.push(h.build.len() as u8);
                out.extend_from_slice(h.build.as_bytes());
            }
            Record::Listener(l) => {
                put32(out, l.shard);
                out.push(match l.role {
                    ListenerRole::Plain => 0,
                    ListenerRole::Tls => 1,
                    ListenerRole::Udp => 2,
                    ListenerRole::Admin => 3,
                });
                put_addr(out, &l.addr);
            }
            Record::Conn(c) => {
                for v in [c.shard, c.key, c.gen, c.ticket_key] {
                    put32(out, v);
                }
                for v in [
                    c.since_ns,
                    c.last_heard_ns,
                    c.deadline_ns,
                    c.frame_deadline_ns,
                ] {
                    put64(out, v);
                }
                out.push(
                    if c.upgraded { UPGRADED } else { 0 }
                        | if c.registered { REGISTERED } else { 0 },
                );
                out.push(c.id.len() as u8);
                out.extend_from_slice(c.id.as_bytes());
                match &c.remote {
                    None => out.push(0),
                    Some(a) => put_addr(out, a),
                }
                out.push(phase_byte(c.state.phase));
                put_bytes32(out, c.state.carry);
                match &c.state.message {
                    None => out.push(0),
                    Some(m) => {
                        out.push(if m.text { 2 } else { 1 });
                        put64(out, m.len);
                        out.push(m.utf8_pending.len() as u8);
                        out.extend_from_slice(m.utf8_pending);
                        put_bytes32(out, m.echo);
                    }
                }
                put_bytes32(out, c.output);
            }
            Record::ShardEnd(s) => {
                for v in [s.shard, s.listeners, s.conns] {
                    put32(out, v);
                }
            }
            Record::Ack(a) => {
                for v in [a.shard, a.seq, a.taken] {
                    put32(out, v);
                }
            }
            Record::Abort(why) => {
                put16(out, why.len() as u16);
                out.extend_from_slice(why.as_bytes());
            }
            Record::Done { conns } => put64(out, *conns),
            Record::TicketKey(k) => out.extend_from_slice(k),
        }
        let len = out.len() - start - HEADER;
        if len > u32::MAX as usize {
            out.truncate(start);
            return Err(Error::Invalid("a record over 4 GiB"));
        }
        out[start + 1..start + HEADER].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(())
    }

    fn kind(&self) -> u8 {
        match self {
            Record::Hello(_) => HELLO,
            Record::Listener(_) => LISTENER,
            Record::Conn(_) => CONN,
            Record::ShardEnd(_) => SHARD_END,
            Record::Ack(_) => ACK,
            Record::Abort(_) => ABORT,
            Record::Done { .. } => DONE,
            Record::TicketKey(_) => TICKET_KEY,
        }
    }

    /// The rules the decoder enforces, for the encoder.
    fn check(&self) -> Result<(), Error> {
        match self {
            Record::Hello(h) => check_build(h.build.as_bytes()),
            Record::Conn(c) => check_conn(c),
            Record::Abort(why) if why.len() > MAX_REASON => {
                Err(Error::Invalid("abort reason over 1024 bytes"))
            }
            _ => Ok(()),
        }
    }
}

/// Decodes the record at the start of `buf`: the record and the bytes it
/// took.
pub fn decode(buf: &[u8]) -> Result<(Record<'_>, usize), Error> {
    let Some((&kind, rest)) = buf.split_first() else {
        return Err(Error::Truncated);
    };
    let Some(len) = rest.get(..4) else {
        return Err(Error::Truncated);
    };
    let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
    // A Hello's magic and version are judged before its length, so a peer
    // of another version is told so, whatever its hello's size.
    if kind == HELLO {
        let have = &buf[HEADER..];
        check_magic_version(&have[..have.len().min(len)], have.len() < len)?;
    }
    let body = buf
        .get(HEADER..)
        .and_then(|b| b.get(..len))
        .ok_or(Error::Truncated)?;
    let mut r = Reader(body);
    let rec = match kind {
        HELLO => {
            r.take(MAGIC.len() + 2)?;
            let role = match r.u8()? {
                0 => Role::Old,
                1 => Role::New,
                _ => return Err(Error::Invalid("hello role")),
            };
            let pid = r.u32()?;
            let shards = r.u32()?;
            let backend = match r.u8()? {
                0 => Backend::Epoll,
                1 => Backend::Uring,
                _ => return Err(Error::Invalid("hello backend")),
            };
            let mono_ns = r.u64()?;
            let n = r.u8()? as usize;
            let build = r.take(n)?;
            check_build(build)?;
            Record::Hello(Hello {
                role,
                pid,
                shards,
                backend,
                mono_ns,
                // check_build admitted only printable ASCII.
                build: std::str::from_utf8(build).map_err(|_| Error::Invalid("build id"))?,
            })
        }
        LISTENER => Record::Listener(Listener {
            shard: r.u32()?,
            role: match r.u8()? {
                0 => ListenerRole::Plain,
                1 => ListenerRole::Tls,
                2 => ListenerRole::Udp,
                3 => ListenerRole::Admin,
                _ => return Err(Error::Invalid("listener role")),
            },
            addr: r.addr()?,
        }),
        CONN => {
            let (shard, key, gen, ticket_key) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
            let (since_ns, last_heard_ns) = (r.u64()?, r.u64()?);
            let (deadline_ns, frame_deadline_ns) = (r.u64()?, r.u64()?);
            let flags = r.u8()?;
            if flags & !(UPGRADED | REGISTERED) != 0 {
                return Err(Error::Invalid("unknown connection flags"));
            }
            let n = r.u8()? as usize;
            let id = std::str::from_utf8(r.take(n)?).map_err(|_| Error::Invalid("device id"))?;
            let remote = match r.u8()? {
                0 => None,
                tag => Some(r.addr_tagged(tag)?),
            };
            let phase = match r.u8()? {
                0 => Phase::Proxy,
                1 => Phase::Handshake,
                2 => Phase::Open,
                3 => Phase::Closing,
                4 => Phase::Done,
                _ => return Err(Error::Invalid("connection phase")),
            };
            let carry = r.bytes32()?;
            let message = match r.u8()? {
                0 => None,
                tag @ (1 | 2) => {
                    let len = r.u64()?;
                    let n = r.u8()? as usize;
                    let utf8_pending = r.take(n)?;
                    let echo = r.bytes32()?;
                    Some(MessageState {
                        text: tag == 2,
                        len,
                        utf8_pending,
                        echo,
                    })
                }
                _ => return Err(Error::Invalid("message tag")),
            };
            let output = r.bytes32()?;
            let c = ConnRecord {
                shard,
                key,
                gen,
                ticket_key,
                since_ns,
                last_heard_ns,
                deadline_ns,
                frame_deadline_ns,
                upgraded: flags & UPGRADED != 0,
                registered: flags & REGISTERED != 0,
                id,
                remote,
                state: ConnState {
                    phase,
                    carry,
                    message,
                },
                output,
            };
            check_conn(&c)?;
            Record::Conn(c)
        }
        SHARD_END => Record::ShardEnd(ShardEnd {
            shard: r.u32()?,
            listeners: r.u32()?,
            conns: r.u32()?,
        }),
        ACK => Record::Ack(Ack {
            shard: r.u32()?,
            seq: r.u32()?,
            taken: r.u32()?,
        }),
        ABORT => {
            let n = r.u16()? as usize;
            if n > MAX_REASON {
                return Err(Error::Invalid("abort reason over 1024 bytes"));
            }
            Record::Abort(
                std::str::from_utf8(r.take(n)?).map_err(|_| Error::Invalid("abort reason"))?,
            )
        }
        DONE => Record::Done { conns: r.u64()? },
        TICKET_KEY => Record::TicketKey(r.take(16)?.try_into().map_err(|_| Error::Truncated)?),
        other => return Err(Error::Kind(other)),
    };
    if !r.0.is_empty() {
        return Err(Error::Trailing);
    }
    Ok((rec, HEADER + len))
}

/// Decodes the first record a peer sends, which must be its Hello: any
/// other record (or bytes that are no record) is [`Error::Magic`].
pub fn decode_hello(buf: &[u8]) -> Result<(Hello<'_>, usize), Error> {
    match buf.first() {
        None => return Err(Error::Truncated),
        Some(&HELLO) => {}
        Some(_) => return Err(Error::Magic),
    }
    match decode(buf)? {
        (Record::Hello(h), n) => Ok((h, n)),
        _ => Err(Error::Magic),
    }
}

/// Every record of `buf`, in order; the first error ends the walk (after
/// it the iterator returns None).
pub fn records(buf: &[u8]) -> Records<'_> {
    Records { buf, failed: false }
}

/// The iterator of [`records`].
#[derive(Debug)]
pub struct Records<'a> {
    buf: &'a [u8],
    failed: bool,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, Error>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() || self.failed {
            return None;
        }
        match decode(self.buf) {
            Ok((rec, n)) => {
                self.buf = &self.buf[n..];
                Some(Ok(rec))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Judges a Hello's magic and version from what there is of its body
/// (`cut`: the bytes end before the body does).
fn check_magic_version(body: &[u8], cut: bool) -> Result<(), Error> {
    let n = body.len().min(MAGIC.len());
    if body[..n] != MAGIC[..n] {
        return Err(Error::Magic);
    }
    let Some(v) = body.get(MAGIC.len()..MAGIC.len() + 2) else {
        return Err(if cut {
            Error::Truncated
        } else {
            Error::Invalid("a hello shorter than its magic and version")
        });
    };
    match u16::from_le_bytes([v[0], v[1]]) {
        VERSION => Ok(()),
        theirs => Err(Error::Version { theirs }),
    }
}

fn check_build(b: &[u8]) -> Result<(), Error> {
    if b.len() > MAX_BUILD || !b.iter().all(|c| (0x21..0x7f).contains(c)) {
        return Err(Error::Invalid("build id: at most 64 printable ASCII bytes"));
    }
    Ok(())
}

/// The rules that make a connection record one `Conn::import` and the
/// shard can take.
fn check_conn(c: &ConnRecord<'_>) -> Result<(), Error> {
    if !(c.id.is_empty() || valid_id(c.id)) {
        return Err(Error::Invalid("device id: 1-64 of [0-9A-Za-z:._-]"));
    }
    if c.upgraded == c.id.is_empty() {
        return Err(Error::Invalid(
            "an upgraded connection has an id, and only it",
        ));
    }
    if c.registered && !c.upgraded {
        return Err(Error::Invalid("registered before its upgrade"));
    }
    check_state(&c.state, c.upgraded)
}

/// The rules on a connection's protocol state (also `Conn::import`'s).
pub fn check_state(s: &ConnState<'_>, upgraded: bool) -> Result<(), Error> {
    let open = matches!(s.phase, Phase::Open | Phase::Closing);
    match s.phase {
        Phase::Proxy | Phase::Handshake if upgraded => {
            return Err(Error::Invalid("an upgraded connection in its handshake"))
        }
        Phase::Open | Phase::Closing if !upgraded => {
            return Err(Error::Invalid("frames before the upgrade"))
        }
        Phase::Done if !s.carry.is_empty() => {
            return Err(Error::Invalid("bytes carried by an ended connection"))
        }
        _ => {}
    }
    if s.carry.len() > u32::MAX as usize {
        return Err(Error::Invalid("carry over 4 GiB"));
    }
    let Some(m) = &s.message else {
        return Ok(());
    };
    if !open {
        return Err(Error::Invalid("a message outside the open phases"));
    }
    if m.echo.len() as u64 > m.len || m.echo.len() > u32::MAX as usize {
        return Err(Error::Invalid("more echo than message"));
    }
    let pending_ok = m.utf8_pending.is_empty() || (m.text && incomplete_char(m.utf8_pending));
    if !pending_ok {
        return Err(Error::Invalid(
            "utf8 pending: the start of one character, text only",
        ));
    }
    Ok(())
}

/// `b` is the start of one UTF-8 character, not all of it (1 to 3 bytes).
fn incomplete_char(b: &[u8]) -> bool {
    (1..=3).contains(&b.len())
        && matches!(std::str::from_utf8(b), Err(e) if e.valid_up_to() == 0 && e.error_len().is_none())
}

fn phase_byte(p: Phase) -> u8 {
    match p {
        Phase::Proxy => 0,
        Phase::Handshake => 1,
        Phase::Open => 2,
        Phase::Closing => 3,
        Phase::Done => 4,
    }
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    put32(out, b.len() as u32);
    out.extend_from_slice(b);
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    match a {
        SocketAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            put16(out, a.port());
        }
        SocketAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            put16(out, a.port());
            put32(out, a.flowinfo());
            put32(out, a.scope_id());
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if n > self.0.len() {
            // The record's own length said more than its fields hold.
            return Err(Error::Invalid("a field runs past its record"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        Ok(self.take(N)?.try_into().unwrap())
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bytes32(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn addr(&mut self) -> Result<SocketAddr, Error> {
        let tag = self.u8()?;
        self.addr_tagged(tag)
    }

    fn addr_tagged(&mut self, tag: u8) -> Result<SocketAddr, Error> {
        match tag {
            4 => {
                let ip: [u8; 4] = self.array()?;
                let port = self.u16()?;
                Ok(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
            }
            6 => {
                let ip: [u8; 16] = self.array()?;
                let port = self.u16()?;
                let flow = self.u32()?;
                let scope = self.u32()?;
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(ip),
                    port,
                    flow,
                    scope,
                )))
            }
            _ => Err(Error::Invalid("address family")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{admit_all, Conn, Limits, Received};
    use crate::frame::{self, Opcode};
    use proptest::prelude::*;

    fn hello(build: &str) -> Record<'_> {
        Record::Hello(Hello {
            role: Role::Old,
            pid: 4242,
            shards: 2,
            backend: Backend::Uring,
            mono_ns: 123_456_789,
            build,
        })
    }

    fn enc(r: &Record<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        r.encode(&mut v).unwrap();
        v
    }

    /// Owned fields of a record, as proptest makes them.
    #[derive(Debug, Clone)]
    struct Owned {
        kind: u8,
        a: u32,
        b: u32,
        c: u32,
        t: [u64; 4],
        upgraded: bool,
        registered: bool,
        id: String,
        addr: SocketAddr,
        remote: Option<SocketAddr>,
        phase: Phase,
        carry: Vec<u8>,
        message: Option<(bool, u64, Vec<u8>, Vec<u8>)>,
        output: Vec<u8>,
        text: String,
        sel: u8,
    }

    impl Owned {
        fn record(&self) -> Record<'_> {
            match self.kind % 8 {
                0 => Record::Hello(Hello {
                    role: if self.upgraded { Role::New } else { Role::Old },
                    pid: self.a,
                    shards: self.b,
                    backend: if self.registered {
                        Backend::Uring
                    } else {
                        Backend::Epoll
                    },
                    mono_ns: self.t[0],
                    build: &self.id,
                }),
                1 => Record::Listener(Listener {
                    shard: self.a,
                    role: [
                        ListenerRole::Plain,
                        ListenerRole::Tls,
                        ListenerRole::Udp,
                        ListenerRole::Admin,
                    ][self.sel as usize % 4],
                    addr: self.addr,
                }),
                2 => Record::Conn(self.conn()),
                3 => Record::ShardEnd(ShardEnd {
                    shard: self.a,
                    listeners: self.b,
                    conns: self.c,
                }),
                4 => Record::Ack(Ack {
                    shard: self.a,
                    seq: self.b,
                    taken: self.c,
                }),
                5 => Record::Abort(&self.text),
                6 => Record::Done { conns: self.t[1] },
                _ => {
                    let mut k = [0u8; 16];
                    k[..8].copy_from_slice(&self.t[2].to_le_bytes());
                    k[8..].copy_from_slice(&self.t[3].to_le_bytes());
                    Record::TicketKey(k)
                }
            }
        }

        fn conn(&self) -> ConnRecord<'_> {
            ConnRecord {
                shard: self.a,
                key: self.b,
                gen: self.c,
                ticket_key: self.a ^ self.b,
                since_ns: self.t[0],
                last_heard_ns: self.t[1],
                deadline_ns: self.t[2],
                frame_deadline_ns: self.t[3],
                upgraded: self.upgraded,
                registered: self.registered,
                id: &self.id,
                remote: self.remote,
                state: ConnState {
                    phase: self.phase,
                    carry: &self.carry,
                    message: self.message.as_ref().map(|(text, len, p, e)| MessageState {
                        text: *text,
                        len: *len,
                        utf8_pending: p,
                        echo: e,
                    }),
                },
                output: &self.output,
            }
        }
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::V4(SocketAddrV4::new(ip.into(), p))),
            (any::<[u8; 16]>(), any::<u16>(), any::<u32>(), any::<u32>())
                .prop_map(|(ip, p, f, s)| SocketAddr::V6(SocketAddrV6::new(ip.into(), p, f, s))),
        ]
    }

    /// Valid records of every kind, a connection's fields consistent.
    fn owned() -> impl Strategy<Value = Owned> {
        let pending = prop_oneof![
            Just(vec![]),
            Just(vec![0xC3]),
            Just(vec![0xE2, 0x98]),
            Just(vec![0xF0, 0x9F, 0x98]),
        ];
        (
            (
                any::<u8>(),
                any::<(u32, u32, u32)>(),
                any::<[u64; 4]>(),
                0u8..5,
                any::<bool>(),
                "[0-9A-Za-z:._-]{1,64}",
                addr(),
                proptest::option::of(addr()),
            ),
            (
                proptest::collection::vec(any::<u8>(), 0..300),
                proptest::option::of((
                    any::<bool>(),
                    any::<u32>(),
                    pending,
                    proptest::collection::vec(any::<u8>(), 0..100),
                )),
                proptest::collection::vec(any::<u8>(), 0..300),
                "\\PC{0,40}",
                any::<u8>(),
            ),
        )
            .prop_map(
                |(
                    (kind, (a, b, c), t, phase, reg, id, addr, remote),
                    (carry, message, output, text, sel),
                )| {
                    let phase = [
                        Phase::Proxy,
                        Phase::Handshake,
                        Phase::Open,
                        Phase::Closing,
                        Phase::Done,
                    ][phase as usize];
                    let open = matches!(phase, Phase::Open | Phase::Closing);
                    // Done: upgraded or not, as the selector says.
                    let upgraded = open || (phase == Phase::Done && sel % 2 == 1);
                    let message = message.filter(|_| open).map(|(text, extra, p, e)| {
                        let p = if text { p } else { vec![] };
                        let len = e.len() as u64 + extra as u64;
                        (text, len, p, e)
                    });
                    Owned {
                        kind,
                        a,
                        b,
                        c,
                        t,
                        upgraded,
                        registered: upgraded && reg,
                        id: if upgraded || kind % 8 == 0 {
                            id
                        } else {
                            String::new()
                        },
                        addr,
                        remote,
                        phase,
                        carry: if phase == Phase::Done { vec![] } else { carry },
                        message,
                        output,
                        text,
                        sel,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Every valid record decodes to itself, alone and in a sequence,
        /// and takes exactly its bytes.
        #[test]
        fn records_round_trip(recs in proptest::collection::vec(owned(), 1..6)) {
            let mut buf = Vec::new();
            for o in &recs {
                let before = buf.len();
                o.record().encode(&mut buf).unwrap();
                let (back, n) = decode(&buf[before..]).unwrap();
                prop_assert_eq!(back, o.record());
                prop_assert_eq!(n, buf.len() - before);
                prop_assert_eq!(back.fds(), usize::from(matches!(o.kind % 8, 1 | 2)));
            }
            let all: Vec<_> = records(&buf).collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(all, recs.iter().map(Owned::record).collect::<Vec<_>>());
        }

        /// Every proper prefix of a valid encoding is an error, never a
        /// shorter record.
        #[test]
        fn every_truncation_is_an_error(o in owned()) {
            let v = enc(&o.record());
            for cut in 0..v.len() {
                prop_assert_eq!(decode(&v[..cut]).unwrap_err(), Error::Truncated, "cut {}", cut);
            }
        }

        /// Bytes of any kind never panic the decoder, and what it accepts
        /// encodes back to the same bytes.
        #[test]
        fn random_bytes_never_panic(mut v in proptest::collection::vec(any::<u8>(), 0..400), kind in 0u8..9) {
            if let Some(b) = v.first_mut() { *b = kind; }
            check_any(&v);
        }

        /// A valid record with one byte changed or a length changed: an
        /// error or a valid record, never a panic.
        #[test]
        fn mutated_records_never_panic(o in owned(), at in any::<usize>(), to in any::<u8>(), cut in any::<usize>()) {
            let mut v = enc(&o.record());
            let i = at % v.len();
            v[i] = to;
            check_any(&v);
            v.truncate(cut % (v.len() + 1));
            check_any(&v);
        }

        /// A connection exported at any point of its byte stream goes on in
        /// the new process exactly as it would have in the old: the same
        /// answers, the same counts, the same end.
        #[test]
        fn a_connection_survives_export_at_any_byte(
            stream in conn_stream(), echo in any::<bool>(), cut in any::<usize>(), split in any::<usize>(),
        ) {
            let limits = Limits { echo, ..Limits::default() };
            let cut = cut % (stream.len() + 1);
            let mut old = Conn::new();
            let mut out = Vec::new();
            let mut first = stream[..cut].to_vec();
            let r0 = old.receive(&mut first, &limits, &mut admit_all, &mut out);
            let upgraded = r0.upgraded;
            // Through the wire format, as the handover carries it.
            let id = if upgraded { "dev-1" } else { "" };
            let rec = Record::Conn(ConnRecord {
                shard: 0, key: 7, gen: 3, ticket_key: 7, since_ns: 1, last_heard_ns: 2, deadline_ns: 3,
                frame_deadline_ns: 0, upgraded, registered: upgraded, id, remote: None,
                state: old.export(), output: &out,
            });
            let bytes = enc(&rec);
            let Record::Conn(back) = decode(&bytes).unwrap().0 else { unreachable!() };
            let mut new = Conn::import(&back.state, upgraded).unwrap();
            prop_assert_eq!(new.export(), old.export());
            // The rest, in two reads, to both.
            let rest = &stream[cut..];
            let split = split % (rest.len() + 1);
            let feed = |c: &mut Conn| {
                let mut out = Vec::new();
                let mut rs: Vec<Received> = Vec::new();
                for part in [&rest[..split], &rest[split..]] {
                    if !part.is_empty() && c.phase() != Phase::Done {
                        rs.push(c.receive(&mut part.to_vec(), &limits, &mut admit_all, &mut out));
                    }
                }
                (rs, out, c.phase(), c.buffered())
            };
            prop_assert_eq!(feed(&mut new), feed(&mut old));
        }
    }

    /// Any outcome but a panic; an accepted record re-encodes to its bytes.
    fn check_any(v: &[u8]) {
        if let Ok((rec, n)) = decode(v) {
            assert!(n <= v.len());
            assert_eq!(enc(&rec), v[..n]);
        }
        let _ = decode_hello(v);
        for r in records(v) {
            let _ = r;
        }
    }

    fn masked(out: &mut Vec<u8>, opcode: Opcode, fin: bool, payload: &[u8]) {
        frame::write_masked_frame(out, opcode, fin, payload, [1, 2, 3, 4]);
    }

    /// An upgrade and frames: pings, a text message fragmented inside a
    /// character, binary fragments, and sometimes a close.
    fn conn_stream() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec((0u8..5, proptest::collection::vec(any::<u8>(), 0..40)), 0..6)
            .prop_map(|frames| {
                let mut v = b"GET /ws?id=dev-1 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec();
                for (kind, payload) in frames {
                    match kind {
                        0 => masked(&mut v, Opcode::Ping, true, &payload),
                        1 => {
                            let snow = "a☃😀b".as_bytes();
                            let at = payload.first().map_or(2, |b| *b as usize % snow.len());
                            masked(&mut v, Opcode::Text, false, &snow[..at]);
                            masked(&mut v, Opcode::Ping, true, b"mid");
                            masked(&mut v, Opcode::Continuation, true, &snow[at..]);
                        }
                        2 => {
                            masked(&mut v, Opcode::Binary, false, &payload);
                            masked(&mut v, Opcode::Continuation, true, &payload);
                        }
                        3 => masked(&mut v, Opcode::Binary, true, &payload),
                        _ => masked(&mut v, Opcode::Close, true, &[0x03, 0xe8]),
                    }
                }
                v
            })
    }

    #[test]
    fn a_wrong_magic_or_version_is_refused_clearly() {
        let v = enc(&hello("abc123"));
        assert!(matches!(decode_hello(&v), Ok((h, n)) if h.build == "abc123" && n == v.len()));

        let mut bad = v.clone();
        bad[HEADER] = b'X';
        assert_eq!(decode_hello(&bad).unwrap_err(), Error::Magic);

        // A later version whose hello is longer: still "version", not a
        // parse error, and the sentence names both versions.
        let mut v2 = v.clone();
        v2[HEADER + 8..HEADER + 10].copy_from_slice(&3u16.to_le_bytes());
        v2.extend_from_slice(&[0xAA; 40]);
        let len = (v2.len() - HEADER) as u32;
        v2[1..5].copy_from_slice(&len.to_le_bytes());
        let e = decode_hello(&v2).unwrap_err();
        assert_eq!(e, Error::Version { theirs: 3 });
        assert_eq!(
            e.to_string(),
            "the peer speaks handover format v3 and this build v2"
        );
        // Even with only its magic and version there.
        assert_eq!(
            decode(&v2[..HEADER + 10]).unwrap_err(),
            Error::Version { theirs: 3 }
        );

        // Not a hello at all: an old binary that prints its usage, or
        // another record first.
        assert_eq!(
            decode_hello(b"usage: server [--port]").unwrap_err(),
            Error::Magic
        );
        assert_eq!(
            decode_hello(&enc(&Record::Done { conns: 0 })).unwrap_err(),
            Error::Magic
        );
        assert_eq!(decode(&[9, 0, 0, 0, 0]).unwrap_err(), Error::Kind(9));
        // A complete hello too short for its version.
        assert!(matches!(
            decode(&[HELLO, 3, 0, 0, 0, b'c', b'1', b'm']),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn the_encoder_refuses_what_the_decoder_would() {
        let o = Owned {
            kind: 2,
            a: 0,
            b: 0,
            c: 0,
            t: [0; 4],
            upgraded: true,
            registered: true,
            id: "dev 1".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            remote: None,
            phase: Phase::Open,
            carry: vec![],
            message: None,
            output: vec![],
            text: String::new(),
            sel: 0,
        };
        let cases: Vec<Owned> = vec![
            o.clone(), // bad id
            Owned {
                id: String::new(),
                ..o.clone()
            }, // upgraded, no id
            Owned {
                phase: Phase::Handshake,
                id: "a".into(),
                ..o.clone()
            }, // upgraded in handshake
            Owned {
                upgraded: false,
                registered: true,
                id: String::new(),
                phase: Phase::Handshake,
                ..o.clone()
            },
            Owned {
                id: "a".into(),
                phase: Phase::Done,
                carry: vec![1],
                ..o.clone()
            },
            Owned {
                id: "a".into(),
                message: Some((false, 1, vec![0xC3], vec![])),
                ..o.clone()
            },
            Owned {
                id: "a".into(),
                message: Some((true, 1, vec![b'a'], vec![])),
                ..o.clone()
            },
            Owned {
                id: "a".into(),
                message: Some((true, 1, vec![0xC3, 0xA9], vec![])),
                ..o.clone()
            },
            Owned {
                id: "a".into(),
                message: Some((true, 0, vec![], vec![1])),
                ..o.clone()
            },
            Owned {
                id: "a".into(),
                phase: Phase::Done,
                message: Some((true, 0, vec![], vec![])),
                ..o.clone()
            },
            Owned {
                kind: 0,
                id: "has space".into(),
                ..o.clone()
            },
            Owned {
                kind: 0,
                id: "x".repeat(65),
                ..o.clone()
            },
            Owned {
                kind: 5,
                text: "x".repeat(1025),
                ..o.clone()
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let mut out = vec![7];
            assert!(c.record().encode(&mut out).is_err(), "case {i}");
            assert_eq!(out, [7], "case {i} wrote bytes");
        }
        // Conn::import refuses the same states.
        let bad = ConnState {
            phase: Phase::Open,
            carry: &[],
            message: Some(MessageState {
                text: true,
                len: 1,
                utf8_pending: b"a",
                echo: &[],
            }),
        };
        assert!(Conn::import(&bad, true).is_err());
        assert!(Conn::import(
            &ConnState {
                phase: Phase::Open,
                carry: &[],
                message: None
            },
            false
        )
        .is_err());
    }

    /// The format's bytes are fixed: a change to them must bump VERSION.
    #[test]
    fn the_v2_encoding_is_pinned() {
        let v = enc(&Record::Conn(ConnRecord {
            shard: 1,
            key: 2,
            gen: 3,
            ticket_key: 9,
            since_ns: 4,
            last_heard_ns: 5,
            deadline_ns: 6,
            frame_deadline_ns: 0,
            upgraded: true,
            registered: true,
            id: "ab",
            remote: Some("10.0.0.1:80".parse().unwrap()),
            state: ConnState {
                phase: Phase::Open,
                carry: b"\x82",
                message: None,
            },
            output: b"hi",
        }));
        let mut want = vec![
            CONN, 72, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 9, 0, 0, 0,
        ];
        for t in [4u64, 5, 6, 0] {
            want.extend_from_slice(&t.to_le_bytes());
        }
        want.extend_from_slice(&[3, 2, b'a', b'b', 4, 10, 0, 0, 1, 80, 0, 2]);
        want.extend_from_slice(&[1, 0, 0, 0, 0x82, 0, 2, 0, 0, 0, b'h', b'i']);
        assert_eq!(v, want);
        let h = enc(&hello("g1"));
        assert_eq!(
            &h[..HEADER + 10],
            &[HELLO, 31, 0, 0, 0, b'c', b'1', b'm', b'-', b'h', b'a', b'n', b'd', 2, 0]
        );
        let k: [u8; 16] = std::array::from_fn(|i| i as u8);
        let mut want = vec![TICKET_KEY, 16, 0, 0, 0];
        want.extend_from_slice(&k);
        assert_eq!(enc(&Record::TicketKey(k)), want);
    }
}
