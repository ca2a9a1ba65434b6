//! Heartbeat tickets (`--udp-heartbeat`, sans-IO): the 18 bytes a device
//! sends as one UDP datagram to say "still alive" without touching its
//! WebSocket.
//!
//! ```text
//! offset 0   u16 BE  shard, numbered over the whole server (all --procs workers)
//! offset 2   u32 BE  slab key of the connection in that shard
//! offset 6   u32 BE  generation of that slab slot
//! offset 10  u64 LE  SipHash-2-4 of bytes 0..10 and the device id
//! ```
//!
//! The shard number comes first, as a big-endian u16 at offset 0, so that
//! the classic BPF program on the UDP SO_REUSEPORT group reads it with one
//! `ldh [0]` and returns it as the index of the socket to deliver to
//! (`c1m_io::udp::steer_by_ticket`).
//!
//! The 101 carries it as `C1M-Heartbeat-Ticket: <base64url, no padding>`
//! (24 characters). Nothing of it is stored per connection: the shard
//! recomputes it from the slot (key, generation, id) when it writes the
//! 101, and checks a datagram against the slot it names.
//!
//! Why SipHash-2-4 with a 128-bit key and not truncated HMAC-SHA256:
//! SipHash is a keyed pseudo-random function designed for exactly this,
//! short inputs authenticated under a secret key, and it costs a few tens
//! of nanoseconds for these 10 + 64 bytes, against four SHA-256
//! compressions (about 1 us) for HMAC: at a million heartbeats a second
//! that difference is most of a core. Its 64-bit tag means a forger
//! guesses right once in 2^64 tries, and the server answers no datagram,
//! so a guess cannot even be checked except by watching the device stay
//! up; the key is random per process and leaves it only in a hot upgrade,
//! to the new process (which goes on checking the same tickets).

use siphasher::sip::SipHasher24;
use std::hash::Hasher;

/// Bytes of a ticket (and of a heartbeat datagram).
pub const LEN: usize = 18;
/// Characters of its base64url form (no padding).
pub const TEXT_LEN: usize = 24;
/// The 101's header that carries it.
pub const HEADER: &[u8] = b"C1M-Heartbeat-Ticket: ";
const HEAD: usize = 10;

/// Where a ticket says its connection lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The shard, over the whole server.
    pub shard: u16,
    /// Slab key in that shard.
    pub key: u32,
    /// Generation of the slot.
    pub gen: u32,
}

impl Ticket {
    fn head(&self) -> [u8; HEAD] {
        let mut h = [0u8; HEAD];
        h[0..2].copy_from_slice(&self.shard.to_be_bytes());
        h[2..6].copy_from_slice(&self.key.to_be_bytes());
        h[6..10].copy_from_slice(&self.gen.to_be_bytes());
        h
    }

    /// Reads the fields of a datagram of exactly [`LEN`] bytes (the MAC is
    /// checked by [`Key::verify`]); None for any other length.
    pub fn parse(bytes: &[u8]) -> Option<Ticket> {
        let b: &[u8; LEN] = bytes.try_into().ok()?;
        Some(Ticket {
            shard: u16::from_be_bytes([b[0], b[1]]),
            key: u32::from_be_bytes([b[2], b[3], b[4], b[5]]),
            gen: u32::from_be_bytes([b[6], b[7], b[8], b[9]]),
        })
    }
}

/// The per-process secret tickets are signed with.
#[derive(Clone)]
pub struct Key {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)") // never printed
    }
}

impl Key {
    /// The key of 16 random bytes (the server draws them from the kernel
    /// at start: `c1m_io::host::random_bytes`).
    pub fn from_bytes(b: [u8; 16]) -> Key {
        let (a, c) = b.split_at(8);
        Key {
            k0: u64::from_le_bytes(a.try_into().unwrap_or_default()),
            k1: u64::from_le_bytes(c.try_into().unwrap_or_default()),
        }
    }

    /// Its 16 bytes, as [`Key::from_bytes`] takes them: for a hot upgrade
    /// only, which hands the key to the new process over a Unix socket
    /// pair (SECURITY.md), so that the tickets devices hold stay good.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.k0.to_le_bytes());
        b[8..].copy_from_slice(&self.k1.to_le_bytes());
        b
    }

    fn mac(&self, head: &[u8; HEAD], id: &[u8]) -> u64 {
        let mut h = SipHasher24::new_with_keys(self.k0, self.k1);
        h.write(head);
        h.write(id);
        h.finish()
    }

    /// The ticket of connection `t` of device `id`.
    pub fn seal(&self, t: Ticket, id: &[u8]) -> [u8; LEN] {
        let head = t.head();
        let mut out = [0u8; LEN];
        out[..HEAD].copy_from_slice(&head);
        out[HEAD..].copy_from_slice(&self.mac(&head, id).to_le_bytes());
        out
    }

    /// True when `bytes` is a ticket this key sealed for device `id`.
    pub fn verify(&self, bytes: &[u8], id: &[u8]) -> bool {
        let Ok(b) = <&[u8; LEN]>::try_from(bytes) else {
            return false;
        };
        let mut head = [0u8; HEAD];
        head.copy_from_slice(&b[..HEAD]);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&b[HEAD..]);
        // A timing difference here tells a remote forger nothing: the
        // server never answers a datagram.
        self.mac(&head, id) == u64::from_le_bytes(tag)
    }
}

/// The ticket as the header carries it: base64url without padding.
pub fn to_text(ticket: &[u8; LEN]) -> [u8; TEXT_LEN] {
    use base64::Engine;
    let mut out = [0u8; TEXT_LEN];
    // 18 bytes are exactly 24 characters: the slice always fits.
    let _ = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_slice(ticket, &mut out);
    out
}

/// The ticket's bytes from the header's value; None if it is not one.
pub fn from_text(text: &[u8]) -> Option<[u8; LEN]> {
    use base64::Engine;
    if text.len() != TEXT_LEN {
        return None;
    }
    let mut out = [0u8; LEN + 3]; // the decoder's estimate wants room
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode_slice(text, &mut out)
        .ok()?;
    (n == LEN).then(|| {
        let mut t = [0u8; LEN];
        t.copy_from_slice(&out[..LEN]);
        t
    })
}

/// Adds the ticket header to the 101 at the start of `out` (before the
/// blank line that ends its head). Moves the bytes after it within `out`:
/// no allocation once `out` has room (the shard's reused buffer has).
/// False (and `out` unchanged) if `out` holds no complete head.
pub fn insert_header(out: &mut Vec<u8>, ticket: &[u8; LEN]) -> bool {
    let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let at = end + 2;
    let text = to_text(ticket);
    let add = HEADER.len() + TEXT_LEN + 2;
    let old = out.len();
    out.resize(old + add, 0);
    out.copy_within(at..old, at + add);
    out[at..at + HEADER.len()].copy_from_slice(HEADER);
    out[at + HEADER.len()..at + HEADER.len() + TEXT_LEN].copy_from_slice(&text);
    out[at + add - 2..at + add].copy_from_slice(b"\r\n");
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> Key {
        Key::from_bytes(*b"0123456789abcdef")
    }

    #[test]
    fn siphash_matches_the_reference_vector() {
        // The SipHash paper's vector: key 00..0f, message 00..0e.
        let k = Key::from_bytes(std::array::from_fn(|i| i as u8));
        let msg: Vec<u8> = (0u8..15).collect();
        let mut h = SipHasher24::new_with_keys(k.k0, k.k1);
        h.write(&msg);
        assert_eq!(h.finish(), 0xa129ca6149be45e5);
        // Its bytes come back as they went in: a hot upgrade's new
        // process checks the old one's tickets with them.
        assert_eq!(k.to_bytes(), std::array::from_fn::<u8, 16, _>(|i| i as u8));
        let t = Ticket {
            shard: 3,
            key: 4,
            gen: 5,
        };
        let sealed = key().seal(t, b"dev");
        assert!(Key::from_bytes(key().to_bytes()).verify(&sealed, b"dev"));
    }

    #[test]
    fn the_shard_is_a_big_endian_u16_at_offset_0() {
        let t = key().seal(
            Ticket {
                shard: 0x0102,
                key: 7,
                gen: 9,
            },
            b"aa:bb",
        );
        assert_eq!(&t[..2], &[1, 2]);
        assert_eq!(
            Ticket::parse(&t).map(|t| (t.shard, t.key, t.gen)),
            Some((0x0102, 7, 9))
        );
    }

    #[test]
    fn the_header_goes_inside_the_head_and_frames_after_it_stay() {
        let mut out = Vec::with_capacity(4096);
        crate::handshake::write_accept(b"dGhlIHNhbXBsZSBub25jZQ==", &mut out);
        out.extend_from_slice(&[0x8a, 0]);
        let cap = out.capacity();
        let t = key().seal(
            Ticket {
                shard: 1,
                key: 2,
                gen: 3,
            },
            b"x",
        );
        assert!(insert_header(&mut out, &t));
        assert_eq!(out.capacity(), cap, "no allocation");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("\r\nC1M-Heartbeat-Ticket: "), "{text}");
        assert!(out.ends_with(b"\r\n\r\n\x8a\x00"), "{text}");
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = resp.parse(&out) else {
            panic!("not a head: {text}")
        };
        assert_eq!(n, out.len() - 2);
        let v = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("c1m-heartbeat-ticket"))
            .map(|h| h.value)
            .unwrap();
        assert_eq!(from_text(v), Some(t));
        assert!(!insert_header(&mut b"HTTP/1.1 101".to_vec(), &t));
    }

    proptest! {
        #[test]
        fn round_trip(shard: u16, k: u32, gen: u32, id in "[0-9A-Za-z:._-]{1,64}") {
            let t = Ticket { shard, key: k, gen };
            let sealed = key().seal(t, id.as_bytes());
            prop_assert_eq!(Ticket::parse(&sealed), Some(t));
            prop_assert!(key().verify(&sealed, id.as_bytes()));
            let text = to_text(&sealed);
            prop_assert!(text.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_'));
            prop_assert_eq!(from_text(&text), Some(sealed));
            // Another device's id, or another process's key: rejected.
            let mut other = id.clone().into_bytes();
            other.push(b'x');
            prop_assert!(!key().verify(&sealed, &other));
            prop_assert!(!Key::from_bytes(*b"fedcba9876543210").verify(&sealed, id.as_bytes()));
        }

        #[test]
        fn any_bit_flip_is_rejected(shard: u16, k: u32, gen: u32, bit in 0usize..LEN * 8) {
            let mut t = key().seal(Ticket { shard, key: k, gen }, b"dev-1");
            t[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(!key().verify(&t, b"dev-1"));
        }

        #[test]
        fn truncated_or_extended_is_rejected(shard: u16, k: u32, gen: u32, cut in 0usize..LEN, extra: u8) {
            let t = key().seal(Ticket { shard, key: k, gen }, b"dev-1");
            prop_assert!(!key().verify(&t[..cut], b"dev-1"));
            prop_assert_eq!(Ticket::parse(&t[..cut]), None);
            let mut long = t.to_vec();
            long.push(extra);
            prop_assert!(!key().verify(&long, b"dev-1"));
            prop_assert_eq!(Ticket::parse(&long), None);
            prop_assert_eq!(from_text(&to_text(&t)[..TEXT_LEN - 1]), None);
        }

        #[test]
        fn random_bytes_do_not_verify(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            prop_assert!(!key().verify(&bytes, b"dev-1"));
        }
    }
}
