//! The upgrade request (sans-IO): parse a `GET /ws?id=<device-id>` head and
//! answer either `101 Switching Protocols` or a real HTTP error.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::auth::Denied;

/// Most headers one request head may carry; more is answered with 431.
pub const MAX_HEADERS: usize = 32;

/// The longest device id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// What a (possibly incomplete) request head amounts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// The head has not ended yet: read more.
    Partial,
    /// A valid upgrade; `head_len` bytes of the buffer were the head, and
    /// anything after them is already WebSocket data.
    Upgrade(Upgrade<'a>),
    /// Answer with this status, then close.
    Reject(Reject),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade<'a> {
    /// The id, percent-decoded (`aa%3Abb` is `aa:bb`, as Python's
    /// urlencode sends it): borrowed from the request unless it had escapes.
    pub id: Cow<'a, str>,
    /// The Sec-WebSocket-Key, 24 base64 characters.
    pub key: [u8; 24],
    /// The auth token, from `Authorization: Bearer <token>` or else from
    /// `?token=<token>` (checked, if at all, by the caller's `admit`). A
    /// Bearer value that is not UTF-8 is given as `""`, which never verifies.
    pub token: Option<&'a str>,
    /// The rightmost address of the last `X-Forwarded-For` header: the one
    /// the nearest proxy appended. Only to be believed when the socket peer
    /// is a trusted proxy (`--trust-forwarded-from`); the shard decides.
    pub forwarded_for: Option<IpAddr>,
    pub head_len: usize,
}

/// An HTTP error answer: each carries its status and a one-line reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    BadRequest(&'static str),
    NotFound,
    MethodNotAllowed,
    UpgradeRequired,
    HeadTooLarge,
    Full,
    /// Auth is on and the token was missing, bad or expired.
    Unauthorized(Denied),
}

impl Reject {
    pub fn status(self) -> u16 {
        match self {
            Reject::BadRequest(_) => 400,
            Reject::NotFound => 404,
            Reject::MethodNotAllowed => 405,
            Reject::UpgradeRequired => 426,
            Reject::HeadTooLarge => 431,
            Reject::Full => 503,
            Reject::Unauthorized(_) => 401,
        }
    }

    fn reason_phrase(self) -> &'static str {
        match self {
            Reject::BadRequest(_) => "Bad Request",
            Reject::NotFound => "Not Found",
            Reject::MethodNotAllowed => "Method Not Allowed",
            Reject::UpgradeRequired => "Upgrade Required",
            Reject::HeadTooLarge => "Request Header Fields Too Large",
            Reject::Full => "Service Unavailable",
            Reject::Unauthorized(_) => "Unauthorized",
        }
    }

    /// The one-line body: what was wrong and what to send instead.
    pub fn body(self) -> &'static str {
        match self {
            Reject::BadRequest(why) => why,
            Reject::NotFound => "unknown path: connect to /ws?id=<device-id>",
            Reject::MethodNotAllowed => "only GET /ws?id=<device-id> upgrades are served",
            Reject::UpgradeRequired => "this endpoint only speaks WebSocket: send Connection: Upgrade and Upgrade: websocket",
            Reject::HeadTooLarge => "request head too large",
            Reject::Full => "server full: retry later",
            // Never the token itself: bodies may end up in logs.
            Reject::Unauthorized(Denied::Missing) => {
                "missing token: send Authorization: Bearer <token> or ?token=<token>"
            }
            Reject::Unauthorized(Denied::Bad) => "bad token: not signed for this device id",
            Reject::Unauthorized(Denied::Expired) => "expired token: get a new one",
        }
    }

    fn extra_headers(self) -> &'static str {
        match self {
            Reject::MethodNotAllowed => "Allow: GET\r\n",
            Reject::UpgradeRequired => "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            Reject::BadRequest(BAD_VERSION) => "Sec-WebSocket-Version: 13\r\n",
            Reject::Full => "Retry-After: 5\r\n",
            // RFC 9110 15.5.2: a 401 says which scheme to use.
            Reject::Unauthorized(_) => "WWW-Authenticate: Bearer\r\n",
            _ => "",
        }
    }

    /// Appends the full HTTP response (status line, headers, body) to `out`.
    pub fn write(self, out: &mut Vec<u8>) {
        let body = self.body();
        let mut head = String::with_capacity(160 + body.len());
        // Writing to a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\n{}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}\n",
            self.status(),
            self.reason_phrase(),
            self.extra_headers(),
            body.len() + 1,
            body
        );
        out.extend_from_slice(head.as_bytes());
    }
}

const BAD_VERSION: &str = "unsupported Sec-WebSocket-Version: only 13 is served";
const BAD_KEY: &str = "missing or invalid Sec-WebSocket-Key: expected 24 base64 characters";
const BAD_ID: &str = "missing or invalid id: expected ?id= with 1-64 of [0-9A-Za-z:._-]";
const BAD_HTTP: &str = "malformed HTTP request";
const BAD_HTTP_VERSION: &str = "HTTP/1.1 is required for a WebSocket upgrade";

/// Parses the request head at the start of `buf`. `max_head` bounds the head:
/// a longer one, complete or not, is answered with 431.
pub fn parse(buf: &[u8], max_head: usize) -> Parsed<'_> {
    // Look at no more than the limit allows (plus one byte to see it
    // exceeded): the verdict on a long head must not depend on how much of
    // it has arrived, e.g. on a bad byte past the limit (found by fuzz/).
    let buf = &buf[..buf.len().min(max_head.saturating_add(1))];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => n,
        Ok(httparse::Status::Complete(_)) => return Parsed::Reject(Reject::HeadTooLarge),
        Ok(httparse::Status::Partial) if buf.len() > max_head => {
            return Parsed::Reject(Reject::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Reject(Reject::HeadTooLarge),
        Err(_) => return Parsed::Reject(Reject::BadRequest(BAD_HTTP)),
    };
    // httparse fills method, path and version on Complete.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Reject(Reject::BadRequest(BAD_HTTP));
    };
    if method != "GET" {
        return Parsed::Reject(Reject::MethodNotAllowed);
    }
    if version != 1 {
        return Parsed::Reject(Reject::BadRequest(BAD_HTTP_VERSION));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/ws" {
        return Parsed::Reject(Reject::NotFound);
    }

    let mut connection_upgrade = false;
    let mut upgrade_websocket = false;
    let mut version_13 = None;
    let mut key = None;
    let mut bearer = None;
    let mut forwarded_for = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= has_token(h.value, b"upgrade");
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_websocket |= has_token(h.value, b"websocket");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version_13 = Some(trim(h.value) == b"13");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.is_some() {
                return Parsed::Reject(Reject::BadRequest(BAD_KEY));
            }
            key = Some(trim(h.value));
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            // The last header wins: a proxy that appends adds its own line
            // or extends the last one; an unparsable entry counts as none.
            forwarded_for = rightmost_address(h.value);
        } else if name.eq_ignore_ascii_case("authorization") {
            // Another scheme (Basic...) carries no token of ours.
            if let Some(t) = bearer_token(h.value) {
                bearer = Some(std::str::from_utf8(t).unwrap_or(""));
            }
        }
    }
    if !connection_upgrade || !upgrade_websocket {
        return Parsed::Reject(Reject::UpgradeRequired);
    }
    if version_13 != Some(true) {
        return Parsed::Reject(Reject::BadRequest(BAD_VERSION));
    }
    let Some(key) = key.and_then(valid_key) else {
        return Parsed::Reject(Reject::BadRequest(BAD_KEY));
    };
    let Some(id) = device_id(query) else {
        return Parsed::Reject(Reject::BadRequest(BAD_ID));
    };
    let token = bearer.or_else(|| query_param(query, "token="));
    Parsed::Upgrade(Upgrade {
        id,
        key,
        token,
        forwarded_for,
        head_len,
    })
}

/// The rightmost entry of an `X-Forwarded-For` value as an address: a bare
/// IPv4 or IPv6 address, or one with a port (`1.2.3.4:5`, `[::1]:5`).
/// Parsed in place: no allocation.
fn rightmost_address(value: &[u8]) -> Option<IpAddr> {
    let last = trim(value.rsplit(|&b| b == b',').next()?);
    let text = std::str::from_utf8(last).ok()?;
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// The `id` query parameter, percent-decoded, if present and valid.
pub fn device_id(query: &str) -> Option<Cow<'_, str>> {
    let value = percent_decode(query_param(query, "id=")?)?;
    valid_id(&value).then_some(value)
}

/// `s` with its `%XX` escapes decoded (RFC 3986 2.1), borrowed when it has
/// none; None for a malformed escape or bytes that are not UTF-8. A `+` is
/// left as it is (no valid id holds one either way).
pub fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = hex(*bytes.get(i + 1)?)?;
            let lo = hex(*bytes.get(i + 2)?)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// The value of the first query parameter starting with `prefix` (`name=`).
fn query_param<'a>(query: &'a str, prefix: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| pair.strip_prefix(prefix))
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is
/// case-insensitive, RFC 9110 11.1); None for another scheme.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = trim(value);
    let scheme = value.get(..6)?;
    let rest = &value[6..];
    (scheme.eq_ignore_ascii_case(b"bearer") && (rest.is_empty() || rest[0] == b' '))
        .then(|| trim(rest))
}

/// 1 to 64 bytes of `[0-9A-Za-z:._-]`.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'_' | b'-'))
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

/// Whether a comma-separated header value holds `token` (ASCII case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim(t).eq_ignore_ascii_case(token))
}

/// A Sec-WebSocket-Key is the base64 of 16 bytes: 22 characters and `==`.
fn valid_key(key: &[u8]) -> Option<[u8; 24]> {
    let key: [u8; 24] = key.try_into().ok()?;
    let b64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    (key[..22].iter().all(b64) && &key[22..] == b"==").then_some(key)
}

/// Appends the `101 Switching Protocols` answer for `key` to `out`.
pub fn write_accept(key: &[u8; 24], out: &mut Vec<u8>) {
    out.extend_from_slice(ACCEPT_HEAD);
    out.extend_from_slice(&accept_key(key));
    out.extend_from_slice(ACCEPT_END);
}

/// The `101 Switching Protocols` answer up to its accept key, and after it
/// (the client recognises the whole answer by them).
pub(crate) const ACCEPT_HEAD: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ";
pub(crate) const ACCEPT_END: &[u8] = b"\r\n\r\n";

/// Sec-WebSocket-Accept: base64(SHA-1(key + GUID)), computed without allocating.
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    use sha1::Digest;
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha = sha1::Sha1::new();
    sha.update(key);
    sha.update(GUID);
    let mut out = [0; 28];
    base64(&sha.finalize(), &mut out);
    out
}

/// Standard base64 with padding of `input` into `out`, which must be
/// exactly `4 * ceil(len / 3)` bytes long. The crate's encoder, as for the
/// tokens and tickets: 29 ns for the 20 bytes of an accept key where the
/// hand-written one this replaced took 78 (a micro-benchmark, one core).
pub(crate) fn base64(input: &[u8], out: &mut [u8]) {
    use base64::Engine as _;
    let n = base64::engine::general_purpose::STANDARD
        .encode_slice(input, out)
        .expect("base64 output size");
    debug_assert_eq!(n, out.len(), "base64 output size");
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(target: &str, extra: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        )
    }

    #[test]
    fn a_percent_encoded_id_is_decoded_not_refused() {
        for (target, id) in [
            ("/ws?id=aa%3Abb", "aa:bb"),
            ("/ws?id=aa%3abb%3A01", "aa:bb:01"),
            ("/ws?x=1&id=%61b", "ab"),
        ] {
            match parse(request(target, "").as_bytes(), 8192) {
                Parsed::Upgrade(u) => assert_eq!(u.id, id, "{target}"),
                other => panic!("{target}: {other:?}"),
            }
        }
        // Malformed escapes, and escapes of what no id may hold, are 400.
        for target in [
            "/ws?id=aa%3",
            "/ws?id=aa%zz",
            "/ws?id=a%2Fb",
            "/ws?id=%ff",
            "/ws?id=%",
        ] {
            match parse(request(target, "").as_bytes(), 8192) {
                Parsed::Reject(r) => assert_eq!(r.status(), 400, "{target}"),
                other => panic!("{target}: {other:?}"),
            }
        }
        assert_eq!(percent_decode("plain").unwrap(), "plain");
        assert!(matches!(percent_decode("plain"), Some(Cow::Borrowed(_))));
    }

    #[test]
    fn accepts_a_valid_upgrade() {
        let req = request("/ws?id=aa:bb:cc:dd:ee:ff", "");
        match parse(req.as_bytes(), 8192) {
            Parsed::Upgrade(u) => {
                assert_eq!(u.id, "aa:bb:cc:dd:ee:ff");
                assert_eq!(u.head_len, req.len());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn accept_key_matches_rfc_and_tungstenite() {
        assert_eq!(&accept_key(KEY.as_bytes()), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        for key in ["AQIDBAUGBwgJCgsMDQ4PEC==", "x3JJHMbDL1EzLkh9GBhXDw=="] {
            let ours = accept_key(key.as_bytes());
            let theirs = tungstenite::handshake::derive_accept_key(key.as_bytes());
            assert_eq!(std::str::from_utf8(&ours).unwrap(), theirs);
        }
    }

    #[test]
    fn rejects_each_case_with_its_status() {
        let cases: Vec<(String, u16)> = vec![
            (request("/ws", ""), 400),
            (request("/ws?id=", ""), 400),
            (request("/ws?id=bad%20id", ""), 400),
            (request(&format!("/ws?id={}", "a".repeat(65)), ""), 400),
            (request("/other?id=a", ""), 404),
            ("POST /ws?id=a HTTP/1.1\r\nHost: x\r\n\r\n".into(), 405),
            ("GET /ws?id=a HTTP/1.1\r\nHost: x\r\n\r\n".into(), 426),
            (
                "GET /ws?id=a HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".into(),
                400,
            ),
            (
                "GET /ws?id=a HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n".into(),
                400,
            ),
            (request("/ws?id=a", &format!("X-Big: {}\r\n", "b".repeat(9000))), 431),
            ("GARBAGE\r\n\r\n".into(), 400),
        ];
        for (req, status) in cases {
            match parse(req.as_bytes(), 8192) {
                Parsed::Reject(r) => assert_eq!(r.status(), status, "{req:?}"),
                other => panic!("{req:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn partial_head_over_the_limit_is_431() {
        let partial = format!("GET /ws?id=a HTTP/1.1\r\nX: {}", "y".repeat(9000));
        assert_eq!(
            parse(partial.as_bytes(), 8192),
            Parsed::Reject(Reject::HeadTooLarge)
        );
        assert_eq!(parse(b"GET /ws?id=a HTTP/1.1\r\n", 8192), Parsed::Partial);
    }

    #[test]
    fn a_bad_byte_past_the_limit_does_not_change_the_answer() {
        // A long, still-valid prefix, then a byte httparse rejects.
        let mut req = b"GET /".to_vec();
        req.extend(std::iter::repeat_n(b'a', 100));
        req.push(0x01);
        assert_eq!(parse(&req, 50), Parsed::Reject(Reject::HeadTooLarge));
        assert_eq!(parse(&req[..40], 50), Parsed::Partial);
        assert_eq!(
            parse(&req, 500),
            Parsed::Reject(Reject::BadRequest(BAD_HTTP))
        );
    }

    #[test]
    fn too_many_headers_is_431() {
        let extra: String = (0..40).map(|i| format!("X-{i}: v\r\n")).collect();
        let req = request("/ws?id=a", &extra);
        assert_eq!(
            parse(req.as_bytes(), 8192),
            Parsed::Reject(Reject::HeadTooLarge)
        );
    }

    #[test]
    fn error_responses_are_well_formed_http() {
        for r in [
            Reject::BadRequest(BAD_ID),
            Reject::NotFound,
            Reject::UpgradeRequired,
            Reject::HeadTooLarge,
            Reject::Full,
            Reject::Unauthorized(Denied::Missing),
            Reject::Unauthorized(Denied::Bad),
            Reject::Unauthorized(Denied::Expired),
        ] {
            let mut out = Vec::new();
            r.write(&mut out);
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut headers);
            let n = match resp.parse(&out).unwrap() {
                httparse::Status::Complete(n) => n,
                httparse::Status::Partial => panic!("incomplete"),
            };
            assert_eq!(resp.code, Some(r.status()));
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name == "Content-Length")
                .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                .unwrap();
            assert_eq!(out.len() - n, len);
            assert!(out.ends_with(b"\n") && !out[n..out.len() - 1].contains(&b'\n'));
        }
    }

    fn token_of(req: &str) -> Option<String> {
        match parse(req.as_bytes(), 8192) {
            Parsed::Upgrade(u) => u.token.map(String::from),
            other => panic!("{req:?} gave {other:?}"),
        }
    }

    #[test]
    fn the_token_comes_from_bearer_or_the_query() {
        assert_eq!(token_of(&request("/ws?id=a", "")), None);
        assert_eq!(
            token_of(&request("/ws?id=a", "Authorization: Bearer 12.abc\r\n")),
            Some("12.abc".into())
        );
        assert_eq!(
            token_of(&request(
                "/ws?id=a",
                "authorization:   bearer   12.abc  \r\n"
            )),
            Some("12.abc".into())
        );
        assert_eq!(
            token_of(&request("/ws?token=12.q&id=a", "")),
            Some("12.q".into())
        );
        assert_eq!(token_of(&request("/ws?id=a&token=", "")), Some("".into()));
        // The header wins over the query.
        assert_eq!(
            token_of(&request("/ws?id=a&token=q", "Authorization: Bearer h\r\n")),
            Some("h".into())
        );
        // Another scheme carries no token; a bare "Bearer" an empty one.
        assert_eq!(
            token_of(&request(
                "/ws?id=a",
                "Authorization: Basic dXNlcjpwYXNz\r\n"
            )),
            None
        );
        assert_eq!(
            token_of(&request("/ws?id=a", "Authorization: Bearerx\r\n")),
            None
        );
        assert_eq!(
            token_of(&request("/ws?id=a", "Authorization: Bearer\r\n")),
            Some("".into())
        );
        // The id is still found next to a token, and not inside one.
        match parse(request("/ws?token=x&id=dev", "").as_bytes(), 8192) {
            Parsed::Upgrade(u) => assert_eq!(u.id, "dev"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unauthorized_is_401_naming_the_reason() {
        for (f, word) in [
            (Denied::Missing, "missing"),
            (Denied::Bad, "bad"),
            (Denied::Expired, "expired"),
        ] {
            let r = Reject::Unauthorized(f);
            assert_eq!(r.status(), 401);
            assert!(r.body().starts_with(word), "{}", r.body());
            let mut out = Vec::new();
            r.write(&mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
            assert!(text.contains("WWW-Authenticate: Bearer\r\n"), "{text}");
        }
    }

    #[test]
    fn x_forwarded_for_gives_its_rightmost_address() {
        let xff = |extra: &str| match parse(request("/ws?id=a", extra).as_bytes(), 8192) {
            Parsed::Upgrade(u) => u.forwarded_for,
            other => panic!("{other:?}"),
        };
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(xff(""), None);
        assert_eq!(xff("X-Forwarded-For: 192.0.2.7\r\n"), ip("192.0.2.7"));
        assert_eq!(
            xff("x-forwarded-for: 203.0.113.9, 10.1.1.1 ,192.0.2.7 \r\n"),
            ip("192.0.2.7")
        );
        assert_eq!(
            xff("X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2001:db8::7\r\n"),
            ip("2001:db8::7")
        );
        assert_eq!(
            xff("X-Forwarded-For: [2001:db8::7]:443\r\n"),
            ip("2001:db8::7")
        );
        assert_eq!(xff("X-Forwarded-For: 1.2.3.4:5\r\n"), ip("1.2.3.4"));
        assert_eq!(xff("X-Forwarded-For: 1.2.3.4, unknown\r\n"), None);
        assert_eq!(xff("X-Forwarded-For: \r\n"), None);
    }

    #[test]
    fn ids_follow_the_alphabet() {
        assert!(valid_id("02:00:5e:10:00:01"));
        assert!(valid_id("dev_1.a-B"));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
        assert!(!valid_id("a b"));
        assert_eq!(device_id("x=1&id=abc&y=2"), Some(Cow::Borrowed("abc")));
        assert_eq!(device_id("xid=abc"), None);
    }
}
