//! The PROXY protocol header (sans-IO), v1 (text) and v2 (binary), as
//! HAProxy's specification (doc/proxy-protocol.txt) defines them: a front
//! (nginx `proxy_protocol on;`, HAProxy `send-proxy`/`send-proxy-v2`) writes
//! it as the first bytes of each connection it opens to a server, carrying
//! the address of the device it proxies.
//!
//! [`parse`] looks at the bytes received so far (a header may arrive one
//! byte at a time) and answers [`Proxy::NeedMore`], [`Proxy::Done`] or
//! [`Proxy::Invalid`]. The answer never depends on how the bytes were split,
//! a truncated header is never `Done`, and bytes that can no longer be the
//! start of a valid header are `Invalid` at once (no waiting for a timeout
//! on garbage). It allocates nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 header, its CRLF included (the specification's bound:
/// `PROXY TCP6` and two full IPv6 addresses and ports).
pub const V1_MAX: usize = 107;

/// The longest v2 header accepted, its 16 fixed bytes included. The
/// specification allows up to 16 + 65,535 bytes; fronts send 16 + 12 (IPv4)
/// or 16 + 36 (IPv6) plus a few TLVs (HAProxy's SSL, ALPN and unique-id
/// TLVs, cloud load balancers' endpoint ids: at most a few hundred bytes).
/// A bound keeps what a connection may hold before it is known to be a
/// device small.
pub const V2_MAX: usize = 1024;

/// The 12-byte signature that opens a v2 header.
pub const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

const V1_PREFIX: &[u8] = b"PROXY ";

/// What the bytes received so far amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    /// A valid header so far, not complete: read more.
    NeedMore,
    /// A complete, valid header of `consumed` bytes; the bytes after it
    /// belong to the proxied connection. `source` is the device's address,
    /// or None when the front says it has none to give (v1 `UNKNOWN`, v2
    /// `LOCAL` such as a health check, or a non-IP family).
    Done {
        source: Option<SocketAddr>,
        consumed: usize,
    },
    /// Not a PROXY header (or not one we accept): close the connection.
    Invalid(&'static str),
}

/// Parses the PROXY header at the start of `buf` (all the bytes received on
/// the connection so far).
pub fn parse(buf: &[u8]) -> Proxy {
    match buf.first() {
        None => Proxy::NeedMore,
        Some(b'P') => v1(buf),
        Some(b'\r') => v2(buf),
        Some(_) => Proxy::Invalid("not a PROXY protocol header"),
    }
}

fn v1(buf: &[u8]) -> Proxy {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Proxy::Invalid("not a PROXY protocol header");
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if buf.len() >= V1_MAX {
            return Proxy::Invalid("PROXY v1 line longer than 107 bytes");
        }
        return match v1_line(&buf[V1_PREFIX.len().min(buf.len())..], false) {
            Ok(_) => Proxy::NeedMore,
            Err(why) => Proxy::Invalid(why),
        };
    };
    // The line ends at the first CR, which must be followed by LF.
    let line = &buf[V1_PREFIX.len().min(cr)..cr];
    if cr < V1_PREFIX.len() {
        return Proxy::Invalid("not a PROXY protocol header");
    }
    let source = match v1_line(line, true) {
        Ok(source) => source,
        Err(why) => return Proxy::Invalid(why),
    };
    match window.get(cr + 1) {
        None if cr + 1 >= V1_MAX => Proxy::Invalid("PROXY v1 line longer than 107 bytes"),
        None => Proxy::NeedMore,
        Some(b'\n') => Proxy::Done {
            source,
            consumed: cr + 2,
        },
        Some(_) => Proxy::Invalid("PROXY v1 line: CR without LF"),
    }
}

/// Checks the fields after `PROXY ` (all of them when `complete`, else a
/// prefix of them, the last one possibly cut); on a complete line returns
/// the source address.
fn v1_line(line: &[u8], complete: bool) -> Result<Option<SocketAddr>, &'static str> {
    const BAD: &str = "malformed PROXY v1 line";
    let mut fields = line.split(|&b| b == b' ');
    let count = line.split(|&b| b == b' ').count();
    let proto = fields.next().unwrap_or(b"");
    let proto_done = complete || count > 1;
    let known = [b"TCP4".as_slice(), b"TCP6", b"UNKNOWN"];
    if proto_done {
        if proto == b"UNKNOWN" {
            // Anything may follow UNKNOWN up to the CRLF; it is ignored.
            return Ok(None);
        }
        if proto != b"TCP4" && proto != b"TCP6" {
            return Err("PROXY v1: protocol must be TCP4, TCP6 or UNKNOWN");
        }
    } else {
        return if known.iter().any(|k| k.starts_with(proto)) {
            Ok(None)
        } else {
            Err("PROXY v1: protocol must be TCP4, TCP6 or UNKNOWN")
        };
    }
    let v6 = proto == b"TCP6";
    if count > 5 {
        return Err(BAD);
    }
    if complete && count < 5 {
        return Err(BAD);
    }
    let mut addrs: [Option<IpAddr>; 2] = [None, None];
    let mut ports: [u16; 2] = [0, 0];
    for (i, field) in fields.enumerate() {
        let last = i + 2 == count;
        let whole = complete || !last;
        if whole && field.is_empty() {
            return Err(BAD);
        }
        match i {
            0 | 1 => {
                let ok = if v6 {
                    field.len() <= 45
                        && field
                            .iter()
                            .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
                } else {
                    field.len() <= 15 && field.iter().all(|b| b.is_ascii_digit() || *b == b'.')
                };
                if !ok {
                    return Err("PROXY v1: bad address");
                }
                if whole {
                    let text = std::str::from_utf8(field).map_err(|_| BAD)?;
                    let ip: IpAddr = if v6 {
                        text.parse::<Ipv6Addr>()
                            .map_err(|_| "PROXY v1: bad address")?
                            .into()
                    } else {
                        text.parse::<Ipv4Addr>()
                            .map_err(|_| "PROXY v1: bad address")?
                            .into()
                    };
                    addrs[i] = Some(ip);
                }
            }
            _ => {
                if field.len() > 5 || !field.iter().all(u8::is_ascii_digit) {
                    return Err("PROXY v1: bad port");
                }
                if whole {
                    let port = std::str::from_utf8(field)
                        .ok()
                        .and_then(|t| t.parse::<u16>().ok())
                        .ok_or("PROXY v1: bad port")?;
                    ports[i - 2] = port;
                }
            }
        }
    }
    if !complete {
        return Ok(None);
    }
    Ok(addrs[0].map(|ip| SocketAddr::new(ip, ports[0])))
}

fn v2(buf: &[u8]) -> Proxy {
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] != V2_SIG[..n] {
        return Proxy::Invalid("not a PROXY protocol header");
    }
    // Version 2, command LOCAL (0) or PROXY (1).
    let Some(&ver_cmd) = buf.get(12) else {
        return Proxy::NeedMore;
    };
    if ver_cmd >> 4 != 2 {
        return Proxy::Invalid("PROXY v2: unsupported version");
    }
    let local = match ver_cmd & 0xf {
        0 => true,
        1 => false,
        _ => return Proxy::Invalid("PROXY v2: unknown command"),
    };
    let Some(&fam) = buf.get(13) else {
        return Proxy::NeedMore;
    };
    // Address block size by family and transport: UNSPEC, TCP over IPv4,
    // TCP over IPv6, UNIX stream. Datagram families are not this listener's.
    let addr_len = match fam {
        0x00 => 0,
        0x11 => 12,
        0x21 => 36,
        0x31 => 216,
        0x12 | 0x22 | 0x32 => return Proxy::Invalid("PROXY v2: datagram family on a TCP listener"),
        _ => return Proxy::Invalid("PROXY v2: unknown address family"),
    };
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Proxy::NeedMore;
    };
    let len = u16::from_be_bytes([hi, lo]) as usize;
    let total = 16 + len;
    if total > V2_MAX {
        return Proxy::Invalid("PROXY v2 header longer than this server accepts (1024 bytes)");
    }
    if len < addr_len {
        return Proxy::Invalid("PROXY v2: length shorter than its address block");
    }
    // TLVs (type, 16-bit length, value) fill the rest exactly: each is
    // checked as soon as its own header has arrived.
    let mut pos = 16 + addr_len;
    while pos < total {
        if total - pos < 3 {
            return Proxy::Invalid("PROXY v2: truncated TLV");
        }
        let (Some(&hi), Some(&lo)) = (buf.get(pos + 1), buf.get(pos + 2)) else {
            return Proxy::NeedMore;
        };
        let tlv_len = u16::from_be_bytes([hi, lo]) as usize;
        if pos + 3 + tlv_len > total {
            return Proxy::Invalid("PROXY v2: TLV longer than the header");
        }
        pos += 3 + tlv_len;
    }
    if buf.len() < total {
        return Proxy::NeedMore;
    }
    let a = &buf[16..16 + addr_len];
    let source = match fam {
        _ if local => None,
        0x11 => Some(SocketAddr::new(
            Ipv4Addr::new(a[0], a[1], a[2], a[3]).into(),
            u16::from_be_bytes([a[8], a[9]]),
        )),
        0x21 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            Some(SocketAddr::new(
                Ipv6Addr::from(ip).into(),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        _ => None,
    };
    Proxy::Done {
        source,
        consumed: total,
    }
}

/// Writes a v1 header for `src` -> `dst` (both the same family): what a
/// front sends; for tests, the fuzzer and test clients.
pub fn write_v1(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    use std::io::Write as _;
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    let _ = write!(
        out,
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    );
}

/// Writes a v2 PROXY-command header for `src` -> `dst` (both the same
/// family), followed by `tlvs` (already encoded as type, length, value).
pub fn write_v2(src: SocketAddr, dst: SocketAddr, tlvs: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(V2_SIG);
    out.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&((12 + tlvs.len()) as u16).to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V6(ip) => ip,
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
            };
            out.push(0x21);
            out.extend_from_slice(&((36 + tlvs.len()) as u16).to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out.extend_from_slice(tlvs);
}

/// A v2 LOCAL header (what HAProxy's health checks send): no address.
pub fn write_v2_local(out: &mut Vec<u8>) {
    out.extend_from_slice(V2_SIG);
    out.extend_from_slice(&[0x20, 0x00, 0, 0]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn done(buf: &[u8]) -> (Option<SocketAddr>, usize) {
        match parse(buf) {
            Proxy::Done { source, consumed } => (source, consumed),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 9000\r\nGET /";
        assert_eq!(done(h), (Some(addr("192.0.2.7:51000")), h.len() - 5));
        let h = b"PROXY TCP6 2001:db8::7 ::1 51000 9000\r\n";
        assert_eq!(done(h), (Some(addr("[2001:db8::7]:51000")), h.len()));
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), (None, 15));
        assert_eq!(done(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"), (None, 35));
        // The specification's longest line is accepted.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.extend(b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n");
        assert_eq!(long.len(), V1_MAX);
        assert_eq!(done(&long).1, V1_MAX);
    }

    #[test]
    fn v1_rejections() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.400 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
            b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
            b"PROXY\r\n",
            b"PROXYTCP4",
        ] {
            assert!(
                matches!(parse(bad), Proxy::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Over 107 bytes without a CRLF.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX, b'x');
        assert!(matches!(parse(&long), Proxy::Invalid(_)));
        assert_eq!(parse(&long[..V1_MAX - 1]), Proxy::NeedMore);
    }

    #[test]
    fn v1_prefixes_need_more() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 9000\r\n";
        for i in 0..h.len() {
            assert_eq!(parse(&h[..i]), Proxy::NeedMore, "{i}");
        }
        // Garbage is rejected as soon as it cannot be a header.
        assert!(matches!(parse(b"PROXY TCP4 1.2.x"), Proxy::Invalid(_)));
        assert!(matches!(parse(b"PROXY TX"), Proxy::Invalid(_)));
        assert!(matches!(parse(b"PRO "), Proxy::Invalid(_)));
    }

    #[test]
    fn v2_addresses_local_and_tlvs() {
        let mut h = Vec::new();
        write_v2(addr("192.0.2.7:51000"), addr("10.0.0.1:9000"), &[], &mut h);
        assert_eq!(done(&h), (Some(addr("192.0.2.7:51000")), 28));
        h.clear();
        write_v2(addr("[2001:db8::7]:5"), addr("[::1]:9000"), &[], &mut h);
        assert_eq!(done(&h), (Some(addr("[2001:db8::7]:5")), 52));
        h.clear();
        write_v2_local(&mut h);
        assert_eq!(done(&h), (None, 16));
        // TLVs: ALPN "h2" and an empty NOOP.
        h.clear();
        let tlvs = [0x01, 0, 2, b'h', b'2', 0x04, 0, 0];
        write_v2(addr("1.2.3.4:5"), addr("6.7.8.9:10"), &tlvs, &mut h);
        assert_eq!(done(&h), (Some(addr("1.2.3.4:5")), 16 + 12 + 8));
        for i in 0..h.len() {
            assert_eq!(parse(&h[..i]), Proxy::NeedMore, "{i}");
        }
    }

    #[test]
    fn v2_rejections() {
        let mut ok = Vec::new();
        write_v2(addr("1.2.3.4:5"), addr("6.7.8.9:10"), &[], &mut ok);
        let with = |i: usize, b: u8| {
            let mut h = ok.clone();
            h[i] = b;
            h
        };
        for bad in [
            with(3, b'x'),  // signature
            with(12, 0x11), // version 1
            with(12, 0x22), // command 2
            with(13, 0x12), // UDP
            with(13, 0x51), // unknown family
            with(15, 4),    // shorter than the IPv4 block
            with(14, 0x10), // longer than V2_MAX
        ] {
            assert!(matches!(parse(&bad), Proxy::Invalid(_)), "{bad:?}");
        }
        // A TLV that overruns the header, and 2 stray bytes at the end.
        let mut h = Vec::new();
        write_v2(addr("1.2.3.4:5"), addr("6.7.8.9:10"), &[1, 0, 9, 0], &mut h);
        assert!(matches!(parse(&h), Proxy::Invalid(_)));
        assert!(matches!(parse(&h[..h.len() - 1]), Proxy::Invalid(_)));
        h.clear();
        write_v2(addr("1.2.3.4:5"), addr("6.7.8.9:10"), &[1, 0], &mut h);
        // Known to be bad as soon as the length is in: 2 bytes cannot be a TLV.
        assert!(matches!(parse(&h[..16]), Proxy::Invalid(_)));
        assert!(matches!(parse(&h[..15]), Proxy::NeedMore));
    }
}
