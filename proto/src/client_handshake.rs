//! The device side of the upgrade (sans-IO): write the request, check the
//! answer. Used by the load generator and the client, so that both speak
//! exactly what the server parses.

use crate::handshake::{accept_key, base64};

/// A Sec-WebSocket-Key: base64 of 16 bytes. Load tests derive it from the
/// connection's number (the server only checks its form); `salt` keeps runs apart.
pub fn key_for(n: u64, salt: u64) -> [u8; 24] {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&n.to_le_bytes());
    raw[8..].copy_from_slice(&salt.to_le_bytes());
    let mut key = [0u8; 24];
    base64(&raw, &mut key);
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
pub fn parse_answer(buf: &[u8], key: &[u8; 24]) -> Answer {
    let mut headers = [httparse::EMPTY_HEADER; 16];
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
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket")) {
        return Answer::Invalid("101 without Upgrade: websocket");
    }
    if header("sec-websocket-accept") != Some(&accept_key(key)[..]) {
        return Answer::Invalid("wrong Sec-WebSocket-Accept");
    }
    Answer::Accepted { head_len }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{self, Parsed, Reject};

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
