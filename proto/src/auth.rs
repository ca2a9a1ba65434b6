//! Device auth (sans-IO): HMAC-SHA256 tokens, minted and checked.
//!
//! A token is `<expiry>.<mac>`: `expiry` is unix seconds in decimal (no
//! sign, no leading zero), `mac` is the unpadded base64url of
//! HMAC-SHA256(secret, `<id>.<expiry>`), 43 characters. Every character is
//! URL-safe, so the same text goes in `Authorization: Bearer <token>` or in
//! `?token=<token>`. The id is not in the token (the request carries it),
//! and expiry has no `.`, so `<id>.<expiry>` splits one way only.
//!
//! A token is good until its expiry (exclusive), for its id only, under
//! either loaded secret (the second is the previous one, while rotating).

use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Secrets a file may hold: the current one and, while rotating, the previous one.
pub const MAX_SECRETS: usize = 2;

/// Shorter secrets are refused: a guessable key would make every token forgeable.
pub const MIN_SECRET_LEN: usize = 16;

/// Characters of the base64url MAC (32 bytes, no padding).
const MAC_CHARS: usize = 43;

/// Longest token: 20 digits of u64, the dot, the MAC.
pub const MAX_TOKEN_LEN: usize = 20 + 1 + MAC_CHARS;

/// Why a device was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The request carried no token.
    Missing,
    /// The token is malformed, or its MAC is not ours for this id.
    Bad,
    /// A genuine token for this id, past its expiry.
    Expired,
}

impl Denied {
    /// One word, for counters and bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Denied::Missing => "missing",
            Denied::Bad => "bad",
            Denied::Expired => "expired",
        }
    }
}

/// The loaded secrets, each as a keyed HMAC state ready to clone.
#[derive(Clone)]
pub struct Keys {
    macs: Vec<HmacSha256>,
}

/// Never prints a secret: only how many there are.
impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys({} secrets)", self.macs.len())
    }
}

impl Keys {
    /// Keys from the text of a secret file: one secret per line, blank
    /// lines and surrounding whitespace ignored, the first line signs.
    /// `name` names the file in errors, which never quote a secret.
    pub fn parse(text: &[u8], name: &str) -> Result<Keys, String> {
        let secrets: Vec<&[u8]> = text
            .split(|&b| b == b'\n')
            .map(<[u8]>::trim_ascii)
            .filter(|l| !l.is_empty())
            .collect();
        if secrets.is_empty() {
            return Err(format!(
                "the auth secret file {name} holds no secret: put one secret per line (e.g. from `openssl rand -base64 32`)"
            ));
        }
        if secrets.len() > MAX_SECRETS {
            return Err(format!(
                "the auth secret file {name} holds {} secrets: at most {MAX_SECRETS}, the current one first and, while rotating, the previous one",
                secrets.len()
            ));
        }
        if let Some(i) = secrets.iter().position(|s| s.len() < MIN_SECRET_LEN) {
            return Err(format!(
                "secret {} in the auth secret file {name} is shorter than {MIN_SECRET_LEN} bytes: use a long random one (e.g. from `openssl rand -base64 32`)",
                i + 1
            ));
        }
        Ok(Keys {
            macs: secrets.into_iter().map(keyed).collect(),
        })
    }

    /// Reads and parses the secret file at `path` (see [`Keys::parse`]).
    pub fn load(path: &Path) -> Result<Keys, String> {
        let text = std::fs::read(path)
            .map_err(|e| format!("cannot read the auth secret file {}: {e}", path.display()))?;
        Keys::parse(&text, &path.display().to_string())
    }

    /// How many secrets are loaded (1, or 2 while rotating).
    pub fn len(&self) -> usize {
        self.macs.len()
    }

    /// Always false: a Keys holds at least one secret.
    pub fn is_empty(&self) -> bool {
        self.macs.is_empty()
    }

    /// The token of device `id` until `expiry` (unix seconds), signed with
    /// the first secret. No allocation: the client signs every device.
    pub fn sign(&self, id: &str, expiry: u64) -> Token {
        let mut digits = [0u8; 20];
        let exp = decimal(expiry, &mut digits);
        let mut mac = self.macs[0].clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(exp);
        let tag = mac.finalize().into_bytes();
        let mut t = Token {
            buf: [0; MAX_TOKEN_LEN],
            len: 0,
        };
        t.buf[..exp.len()].copy_from_slice(exp);
        t.buf[exp.len()] = b'.';
        let at = exp.len() + 1;
        // 32 bytes always fit in 43 characters: the encoder cannot fail here.
        let n = URL_SAFE_NO_PAD
            .encode_slice(tag, &mut t.buf[at..])
            .unwrap_or(0);
        t.len = (at + n) as u8;
        t
    }

    /// Checks `token` (None: the request had none) for device `id` at
    /// `now` (unix seconds). The MAC is checked before the expiry, so a
    /// forged token is `Bad` whatever expiry it claims, and `Expired`
    /// means a token we did issue, worth renewing.
    pub fn verify(&self, id: &str, token: Option<&str>, now: u64) -> Result<(), Denied> {
        let token = token.ok_or(Denied::Missing)?;
        let (exp_text, expiry, tag) = split(token).ok_or(Denied::Bad)?;
        // Every secret is tried, in constant time each (verify_slice).
        let mut genuine = false;
        for keyed in &self.macs {
            let mut mac = keyed.clone();
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(exp_text.as_bytes());
            genuine |= mac.verify_slice(&tag).is_ok();
        }
        if !genuine {
            return Err(Denied::Bad);
        }
        if now >= expiry {
            return Err(Denied::Expired);
        }
        Ok(())
    }
}

fn keyed(secret: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length (longer ones are hashed): this never fails.
    <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!())
}

/// `token` as (expiry text, expiry, 32-byte MAC), if well-formed.
fn split(token: &str) -> Option<(&str, u64, [u8; 32])> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let (exp_text, mac_text) = token.split_once('.')?;
    // Canonical decimal only: "0123" or "+123" would be other texts for the
    // same expiry, so a token would have more than one spelling.
    let canonical = !exp_text.is_empty()
        && exp_text.bytes().all(|b| b.is_ascii_digit())
        && (exp_text == "0" || !exp_text.starts_with('0'));
    if !canonical || mac_text.len() != MAC_CHARS {
        return None;
    }
    let expiry: u64 = exp_text.parse().ok()?;
    // The decoder rejects non-zero trailing bits, so each MAC has one spelling.
    let mut tag = [0u8; 33];
    let n = URL_SAFE_NO_PAD
        .decode_slice(mac_text.as_bytes(), &mut tag)
        .ok()?;
    let tag: [u8; 32] = tag.get(..n)?.try_into().ok()?;
    Some((exp_text, expiry, tag))
}

/// `n` in decimal, written at the end of `buf`; returns the digits.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// A minted token, held inline.
#[derive(Clone, Copy)]
pub struct Token {
    buf: [u8; MAX_TOKEN_LEN],
    len: u8,
}

impl Token {
    pub fn as_str(&self) -> &str {
        // Digits, a dot and base64url: ASCII by construction.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or_default()
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Redacted: a token is a credential (print it with Display, on purpose).
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Parses a time-to-live such as `30d`, `12h`, `90m`, `3600s` or `3600`
/// (seconds) into seconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => 0,
    };
    match digits.parse::<u64>().ok().and_then(|n| n.checked_mul(per)) {
        Some(secs) if secs > 0 && per > 0 => Ok(secs),
        _ => Err(format!(
            "--ttl {s:?} is not a duration above zero such as 30d, 12h, 90m or 3600s"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: &[u8] = b"first-secret-0123456789";
    const B: &[u8] = b"second-secret-abcdefghij";

    fn keys(lines: &[&[u8]]) -> Keys {
        Keys::parse(&lines.join(&b'\n'), "test").unwrap()
    }

    #[test]
    fn a_token_has_the_documented_form_and_mac() {
        let k = keys(&[A]);
        let t = k.sign("aa:bb", 1_900_000_000);
        let (exp, mac) = t.as_str().split_once('.').unwrap();
        assert_eq!(exp, "1900000000");
        assert_eq!(mac.len(), 43);
        // Computed independently of sign(): HMAC(secret, id "." expiry).
        let mut m = <HmacSha256 as Mac>::new_from_slice(A).unwrap();
        m.update(b"aa:bb.1900000000");
        assert_eq!(
            mac,
            URL_SAFE_NO_PAD.encode(m.finalize().into_bytes()).as_str()
        );
        assert!(t
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
    }

    #[test]
    fn outcomes() {
        let k = keys(&[A]);
        let t = k.sign("dev", 100);
        assert_eq!(k.verify("dev", Some(t.as_str()), 99), Ok(()));
        assert_eq!(k.verify("dev", Some(t.as_str()), 100), Err(Denied::Expired));
        assert_eq!(k.verify("dev", None, 0), Err(Denied::Missing));
        assert_eq!(k.verify("dev", Some(""), 0), Err(Denied::Bad));
        assert_eq!(k.verify("other", Some(t.as_str()), 0), Err(Denied::Bad));
        // A forged token is bad, not expired, whatever it claims.
        let forged = format!("50.{}", &t.as_str()[4..]);
        assert_eq!(k.verify("dev", Some(&forged), 60), Err(Denied::Bad));
        // Non-canonical spellings of the same expiry are refused.
        let zero = format!("0{}", t.as_str());
        assert_eq!(k.verify("dev", Some(&zero), 0), Err(Denied::Bad));
        assert_eq!(k.sign("dev", 0).as_str().split_once('.').unwrap().0, "0");
        assert_eq!(
            k.sign("dev", u64::MAX).as_str().len(),
            MAX_TOKEN_LEN,
            "the longest token fits"
        );
    }

    #[test]
    fn rotation_accepts_either_secret_and_signs_with_the_first() {
        let old = keys(&[A]);
        let new = keys(&[B]);
        let both = keys(&[B, A]);
        assert_eq!(both.len(), 2);
        for t in [old.sign("d", 10), new.sign("d", 10)] {
            assert_eq!(both.verify("d", Some(t.as_str()), 5), Ok(()));
        }
        assert_eq!(both.sign("d", 10).as_str(), new.sign("d", 10).as_str());
        assert_eq!(
            new.verify("d", Some(old.sign("d", 10).as_str()), 5),
            Err(Denied::Bad)
        );
    }

    #[test]
    fn secret_files_are_checked_and_never_quoted() {
        let k = Keys::parse(
            b"\n  first-secret-0123456789 \r\n\n\tsecond-secret-abcdefghij\n",
            "f",
        )
        .unwrap();
        assert_eq!(k.len(), 2);
        assert_eq!(
            k.sign("x", 1).as_str(),
            keys(&[A]).sign("x", 1).as_str(),
            "trimmed"
        );
        let cases: [&[u8]; 4] = [
            b"",
            b" \n\n \r\n",
            b"aaaaaaaaaaaaaaaaaa\nbbbbbbbbbbbbbbbbbbbb\ncccccccccccccccccccc\n",
            b"short-secret\n",
        ];
        for text in cases {
            let e = Keys::parse(text, "/etc/c1m/secret").unwrap_err();
            assert!(e.contains("/etc/c1m/secret"), "{e}");
            assert!(!e.contains("short-secret") && !e.contains("aaaa"), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let e = Keys::load(Path::new("/nonexistent/c1m-secret")).unwrap_err();
        assert!(e.starts_with("cannot read the auth secret file /nonexistent/c1m-secret: "));
        assert_eq!(format!("{k:?}"), "Keys(2 secrets)");
        assert_eq!(format!("{:?}", k.sign("x", 1)), "Token(<redacted>)");
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("30d"), Ok(30 * 86_400));
        assert_eq!(parse_ttl("12h"), Ok(43_200));
        assert_eq!(parse_ttl("90m"), Ok(5_400));
        assert_eq!(parse_ttl("45s"), Ok(45));
        assert_eq!(parse_ttl("60"), Ok(60));
        assert_eq!(parse_ttl("2w"), Ok(14 * 86_400));
        for bad in ["", "0d", "d", "5y", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    fn id() -> impl Strategy<Value = String> {
        "[0-9A-Za-z:._-]{1,64}"
    }

    proptest! {
        /// A token verifies for its id only, until its expiry only, under
        /// either of two loaded secrets.
        #[test]
        fn a_token_is_good_for_its_id_until_its_expiry(
            id in id(),
            other in id(),
            expiry in 1u64..u64::MAX,
            before in any::<u64>(),
            rotated in any::<bool>(),
        ) {
            let signer = if rotated { keys(&[B]) } else { keys(&[A]) };
            let server = keys(&[A, B]);
            let t = signer.sign(&id, expiry);
            let now = before % expiry;
            prop_assert_eq!(server.verify(&id, Some(t.as_str()), now), Ok(()));
            prop_assert_eq!(server.verify(&id, Some(t.as_str()), expiry), Err(Denied::Expired));
            prop_assert_eq!(server.verify(&id, Some(t.as_str()), expiry.saturating_add(before)), Err(Denied::Expired));
            if other != id {
                prop_assert_eq!(server.verify(&other, Some(t.as_str()), now), Err(Denied::Bad));
            }
            let stranger = Keys::parse(b"a-third-secret-nobody-has", "t").unwrap();
            prop_assert_eq!(stranger.verify(&id, Some(t.as_str()), now), Err(Denied::Bad));
        }

        /// Any change to a token (a byte replaced, inserted or removed)
        /// makes it fail, even before its expiry.
        #[test]
        fn any_mutation_of_a_token_fails(
            id in id(),
            expiry in 1u64..u64::MAX,
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            how in 0..3u8,
        ) {
            let k = keys(&[A, B]);
            let t = k.sign(&id, expiry);
            let mut m = t.as_str().as_bytes().to_vec();
            let i = at.index(m.len());
            match how {
                0 if m[i] != byte => m[i] = byte,
                0 => m[i] ^= 1,
                1 => m.insert(i, byte),
                _ => { m.remove(i); }
            }
            prop_assume!(m != t.as_str().as_bytes());
            let m = String::from_utf8_lossy(&m);
            prop_assert_ne!(k.verify(&id, Some(&m), 0), Ok(()));
        }

        /// Arbitrary text is refused, never a panic.
        #[test]
        fn garbage_never_verifies_nor_panics(id in id(), token in any::<String>(), now in any::<u64>()) {
            let k = keys(&[A]);
            prop_assert_ne!(k.verify(&id, Some(&token), now), Ok(()));
        }

        /// Tokens shaped like ours but with random MACs and expiries are
        /// bad, never expired (that would need a genuine MAC).
        #[test]
        fn well_formed_forgeries_are_bad(
            id in id(),
            expiry in any::<u64>(),
            mac in "[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]",
            now in any::<u64>(),
        ) {
            let k = keys(&[A, B]);
            let forged = format!("{expiry}.{mac}");
            prop_assert_eq!(k.verify(&id, Some(&forged), now), Err(Denied::Bad));
        }

        /// Secret files of any bytes load or give one sentence, never a panic.
        #[test]
        fn any_secret_file_loads_or_errs(text in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Err(e) = Keys::parse(&text, "f") {
                prop_assert_eq!(e.lines().count(), 1);
            }
        }
    }
}
