//! The device side of the upgrade (sans-IO): write the request, check the
//! answer. Used by the load generator and the client, so that both speak
//! exactly what the server parses.

use crate::handshake::{accept_key, ACCEPT_END, ACCEPT_HEAD};

/// A Sec-WebSocket-Key: base64 of 16 bytes. Load tests derive it from the
/// connection's number (the server only checks its form); `salt` keeps runs apart.
///
/// Encoded here for its one fixed size (the client computes it twice per
/// connection: for the request and for the check of the answer), in about
/// a fifth of the general encoder's instructions; a test checks it against
/// the crate's encoding.
pub fn key_for(n: u64, salt: u64) -> [u8; 24] {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&n.to_le_bytes());
    raw[8..].copy_from_slice(&salt.to_le_bytes());
    let mut key = *b"AAAAAAAAAAAAAAAAAAAAAA==";
    for (group, out) in raw.chunks_exact(3).zip(key.chunks_exact_mut(4)) {
        let v = u32::from(group[0]) << 16 | u32::from(group[1]) << 8 | u32::from(group[2]);
        for (i, c) in out.iter_mut().enumerate() {
            *c = B64[(v >> (18 - 6 * i) & 63) as usize];
        }
    }
    key[20] = B64[usize::from(raw[15] >> 2)];
    key[21] = B64[usize::from((raw[15] & 3) << 4)];
    key
}

/// Appends `GET /ws?id=<id>` with the upgrade headers to `out`, and
/// `Authorization: Bearer <token>` when given one (see [`crate::auth`]).
pub fn write_request(out: &mut Vec<u8>, host: &str, id: &str, key: &[u8; 24], token: Option<&str>) {
    out.extend_from_slice(b"GET /ws?id=");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(
        b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
    );
    out.extend_from_slice(key);
    if let Some(token) = token {
        out.extend_from_slice(b"\r\nAuthorization: Bearer ");
        out.extend_from_slice(token.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// What the server's answer (so far) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The head has not ended yet.
    Partial,
    /// Upgraded; the first `head_len` bytes were the answer's head, and any
    /// after them are already WebSocket frames.
    Accepted { head_len: usize },
    /// The server refused with this HTTP status.
    Refused { status: u16 },
    /// Not a valid answer to our request (wrong accept key, not HTTP...).
    Invalid(&'static str),
}

/// Checks the server's answer to a request sent with `key`.
///
/// The common answer, c1m's own 101 ([`handshake::write_accept`]'s bytes
/// for `key`), is recognised whole by [`exact_101`]; anything else is
/// parsed by httparse. Both say the same of every answer (property tests
/// check), and the first costs the client about 1,600 instructions fewer
/// per connection (bench/client-cost.sh).
///
/// [`handshake::write_accept`]: crate::handshake::write_accept
pub fn parse_answer(buf: &[u8], key: &[u8; 24]) -> Answer {
    exact_101(buf, key).unwrap_or_else(|| parse_answer_httparse(buf, key))
}

/// Accepted when `buf` begins with c1m's 101 for `key`, byte for byte;
/// None otherwise.
fn exact_101(buf: &[u8], key: &[u8; 24]) -> Option<Answer> {
    let rest = buf.strip_prefix(ACCEPT_HEAD)?;
    let rest = rest.strip_prefix(&accept_key(key)[..])?;
    rest.starts_with(ACCEPT_END).then_some(Answer::Accepted {
        head_len: buf.len() - rest.len() + ACCEPT_END.len(),
    })
}

/// [`parse_answer`] by httparse, for every answer.
fn parse_answer_httparse(buf: &[u8], key: &[u8; 24]) -> Answer {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > 8192 => {
            return Answer::Invalid("answer head over 8 KiB")
        }
        Ok(httparse::Status::Partial) => return Answer::Partial,
        Err(_) => return Answer::Invalid("not an HTTP answer"),
    };
    match resp.code {
        Some(101) => {}
        Some(status) => return Answer::Refused { status },
        None => return Answer::Invalid("no status"),
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.trim_ascii())
    };
    check_101(
        head_len,
        header("upgrade"),
        header("sec-websocket-accept"),
        key,
    )
}

/// Headers an answer may have (httparse's array; more is not an answer).
const MAX_HEADERS: usize = 16;

/// A 101 head of `head_len` bytes with these (first) Upgrade and
/// Sec-WebSocket-Accept values, trimmed: upgraded, or why not.
fn check_101(
    head_len: usize,
    upgrade: Option<&[u8]>,
    accept: Option<&[u8]>,
    key: &[u8; 24],
) -> Answer {
    if !upgrade.is_some_and(|v| v.eq_ignore_ascii_case(b"websocket")) {
        return Answer::Invalid("101 without Upgrade: websocket");
    }
    if accept != Some(&accept_key(key)[..]) {
        return Answer::Invalid("wrong Sec-WebSocket-Accept");
    }
    Answer::Accepted { head_len }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{self, Parsed, Reject};
    use proptest::prelude::*;

    #[test]
    fn our_request_upgrades_on_our_server_and_its_answer_checks_out() {
        let key = key_for(7, 42);
        let mut req = Vec::new();
        write_request(&mut req, "127.0.0.1:9000", "02:00:00:00:00:07", &key, None);
        let Parsed::Upgrade(u) = handshake::parse(&req, 8192) else {
            panic!("server refused our request")
        };
        assert_eq!(u.id, "02:00:00:00:00:07");
        assert_eq!(u.key, key);
        assert_eq!(u.token, None);
        let mut signed = Vec::new();
        write_request(&mut signed, "h", "d", &key, Some("12.abc"));
        let Parsed::Upgrade(s) = handshake::parse(&signed, 8192) else {
            panic!("server refused our signed request")
        };
        assert_eq!(s.token, Some("12.abc"));
        let mut answer = Vec::new();
        handshake::write_accept(&u.key, &mut answer);
        let n = answer.len();
        answer.extend_from_slice(&[0x8a, 0]); // a pong right behind the head
        assert_eq!(
            parse_answer(&answer, &key),
            Answer::Accepted { head_len: n }
        );
        assert_eq!(parse_answer(&answer[..n - 1], &key), Answer::Partial);
        assert_eq!(
            parse_answer(&answer, &key_for(8, 42)),
            Answer::Invalid("wrong Sec-WebSocket-Accept")
        );
    }

    #[test]
    fn refusals_carry_their_status() {
        let mut answer = Vec::new();
        Reject::Full.write(&mut answer);
        assert_eq!(
            parse_answer(&answer, &key_for(1, 1)),
            Answer::Refused { status: 503 }
        );
        assert_eq!(
            parse_answer(b"garbage\r\n\r\n", &key_for(1, 1)),
            Answer::Invalid("not an HTTP answer")
        );
    }

    /// Answers of usual and odd lines (odd cases, bytes, spacing, line
    /// ends, cuts): httparse's ground. The real 101, which the exact
    /// reading takes, is the next test's.
    fn answer_lines() -> impl Strategy<Value = Vec<u8>> {
        let status = prop_oneof![
            Just(b"HTTP/1.1 101 Switching Protocols".to_vec()),
            Just(b"HTTP/1.1 101 ".to_vec()),
            Just(b"HTTP/1.1 101".to_vec()),
            Just(b"HTTP/1.0 101 Switching Protocols".to_vec()),
            Just(b"HTTP/1.1 503 Service Unavailable".to_vec()),
            Just(b"HTTP/1.1 1010 x".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..40),
        ];
        let name = prop_oneof![
            Just(b"Upgrade".to_vec()),
            Just(b"upGRADE".to_vec()),
            Just(b"Connection".to_vec()),
            Just(b"Sec-WebSocket-Accept".to_vec()),
            Just(b"sec-websocket-accept".to_vec()),
            Just(b"X-C1m-Udp-Ticket".to_vec()),
            Just(b"Bad Name".to_vec()),
            Just(b"".to_vec()),
            "[!-~]{1,12}".prop_map(|s| s.into_bytes()),
        ];
        let value = prop_oneof![
            Just(b" websocket".to_vec()),
            Just(b"websocket \t".to_vec()),
            Just(b"WebSocket".to_vec()),
            Just(b" Upgrade".to_vec()),
            Just(accept_key(&key_for(3, 5)).to_vec()),
            Just(
                format!(
                    " {} ",
                    std::str::from_utf8(&accept_key(&key_for(3, 5))).unwrap()
                )
                .into_bytes()
            ),
            proptest::collection::vec(any::<u8>(), 0..20),
        ];
        let header = (name, value, proptest::bool::weighted(0.9)).prop_map(|(n, v, colon)| {
            let mut h = n;
            h.extend_from_slice(if colon { b":" } else { b" " });
            h.extend_from_slice(&v);
            h
        });
        (
            status,
            proptest::collection::vec(header, 0..20),
            prop_oneof![8 => Just(&b"\r\n"[..]), 1 => Just(&b"\n"[..]), 1 => Just(&b"\r"[..])],
            proptest::option::weighted(0.3, 0usize..300),
            proptest::collection::vec(any::<u8>(), 0..4),
        )
            .prop_map(|(status, headers, eol, cut, tail)| {
                let mut a = status;
                for h in headers {
                    a.extend_from_slice(b"\r\n");
                    a.extend_from_slice(&h);
                }
                a.extend_from_slice(b"\r\n");
                a.extend_from_slice(eol);
                a.extend_from_slice(&tail);
                if let Some(cut) = cut {
                    a.truncate(cut);
                }
                a
            })
    }

    proptest::proptest! {
        /// Recognising c1m's 101 whole and httparse agree on
        /// every answer.
        #[test]
        fn the_exact_101_agrees_with_httparse(answer in answer_lines()) {
            let key = key_for(3, 5);
            proptest::prop_assert_eq!(parse_answer(&answer, &key), parse_answer_httparse(&answer, &key));
        }
    }

    proptest::proptest! {
        /// The same on the server's own 101 with one byte changed, and cut.
        #[test]
        fn the_exact_101_agrees_with_httparse_on_a_changed_101(
            n in any::<u64>(), at in any::<usize>(), byte in any::<u8>(), cut in any::<usize>(),
        ) {
            let key = key_for(n, 5);
            let mut answer = Vec::new();
            handshake::write_accept(&key, &mut answer);
            answer.extend_from_slice(&[0x8a, 0]);
            let at = at % answer.len();
            answer[at] = byte;
            for a in [&answer[..], &answer[..cut % answer.len()]] {
                proptest::prop_assert_eq!(parse_answer(a, &key), parse_answer_httparse(a, &key));
            }
        }
    }

    #[test]
    fn the_servers_101_is_recognised_whole() {
        let key = key_for(9, 1);
        let mut answer = Vec::new();
        handshake::write_accept(&key, &mut answer);
        let n = answer.len();
        answer.extend_from_slice(&[0x8a, 0]);
        let accepted = Some(Answer::Accepted { head_len: n });
        assert_eq!(exact_101(&answer, &key), accepted);
        assert_eq!(exact_101(&answer[..n], &key), accepted);
        assert_eq!(exact_101(&answer[..n - 1], &key), None);
        assert_eq!(exact_101(&answer, &key_for(10, 1)), None);
    }

    #[test]
    fn keys_are_the_base64_of_number_and_salt() {
        for (n, salt) in [
            (0, 0),
            (1, 9),
            (u64::MAX, 7),
            (0x0123_4567_89ab_cdef, u64::MAX),
        ]
        .into_iter()
        .chain((0..2000).map(|n| (n * 0x9e37_79b9, n ^ 0x5555)))
        {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&n.to_le_bytes());
            raw[8..].copy_from_slice(&salt.to_le_bytes());
            let mut want = [0u8; 24];
            crate::handshake::base64(&raw, &mut want);
            assert_eq!(key_for(n, salt), want, "{n} {salt}");
        }
    }

    #[test]
    fn keys_are_valid_and_distinct() {
        let a = key_for(1, 9);
        let b = key_for(2, 9);
        assert_ne!(a, b);
        assert!(a.ends_with(b"=="));
        assert!(a[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"+/".contains(c)));
    }
}
