//! RFC 6455 frames (sans-IO): decode one frame in place from a borrowed buffer,
//! encode server (unmasked) and client (masked) frames.

/// Close codes this server sends (RFC 6455 section 7.4.1).
pub mod code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
    /// Application codes (4000-4999): a newer connection took the id.
    pub const REPLACED: u16 = 4000;
    /// An operator closed the device.
    pub const KICKED: u16 = 4001;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation = 0,
    Text = 1,
    Binary = 2,
    Close = 8,
    Ping = 9,
    Pong = 10,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Opcode> {
        Some(match bits {
            0 => Opcode::Continuation,
            1 => Opcode::Text,
            2 => Opcode::Binary,
            8 => Opcode::Close,
            9 => Opcode::Ping,
            10 => Opcode::Pong,
            _ => return None,
        })
    }

    pub fn is_control(self) -> bool {
        self as u8 >= 8
    }
}

/// One decoded frame: its payload is `buf[payload_start..len]`, already unmasked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: Opcode,
    pub payload_start: usize,
    /// Bytes of the buffer this frame took, header and payload.
    pub len: usize,
}

/// Largest control frame payload (RFC 6455 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Decodes the client frame at the start of `buf`, unmasking its payload in
/// place. `Ok(None)`: not all of it is here yet. `Err(code)`: the close code
/// the connection must fail with. A frame longer than `max_payload` fails as
/// soon as its header is seen, so no caller ever buffers more than that.
pub fn decode(buf: &mut [u8], max_payload: usize) -> Result<Option<Frame>, u16> {
    decode_from(buf, max_payload, true)
}

/// Decodes the server frame at the start of `buf` (the device side): as
/// [`decode`], but a server frame must not be masked (RFC 6455 5.1).
pub fn decode_server(buf: &mut [u8], max_payload: usize) -> Result<Option<Frame>, u16> {
    decode_from(buf, max_payload, false)
}

fn decode_from(buf: &mut [u8], max_payload: usize, masked: bool) -> Result<Option<Frame>, u16> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    let fin = b0 & 0x80 != 0;
    if b0 & 0x70 != 0 {
        return Err(code::PROTOCOL_ERROR); // RSV bits without a negotiated extension
    }
    let opcode = Opcode::from_bits(b0 & 0x0f).ok_or(code::PROTOCOL_ERROR)?;
    if (b1 & 0x80 != 0) != masked {
        return Err(code::PROTOCOL_ERROR); // clients must mask, servers must not
    }
    let len7 = (b1 & 0x7f) as usize;
    if opcode.is_control() && (!fin || len7 > MAX_CONTROL_PAYLOAD) {
        return Err(code::PROTOCOL_ERROR);
    }
    let (payload_len, mut pos) = match len7 {
        126 => match buf.get(2..4) {
            Some(b) => (u16::from_be_bytes([b[0], b[1]]) as u64, 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                // Infallible: the slice is 8 bytes long.
                let n = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                if n >> 63 != 0 {
                    return Err(code::PROTOCOL_ERROR);
                }
                (n, 10)
            }
            None => return Ok(None),
        },
        n => (n as u64, 2),
    };
    if payload_len > max_payload as u64 {
        return Err(code::TOO_BIG);
    }
    let payload_len = payload_len as usize;
    let mut mask = None;
    if masked {
        let Some(m) = buf.get(pos..pos + 4) else {
            return Ok(None);
        };
        mask = Some([m[0], m[1], m[2], m[3]]);
        pos += 4;
    }
    let end = pos + payload_len;
    let Some(payload) = buf.get_mut(pos..end) else {
        return Ok(None);
    };
    if let Some(mask) = mask {
        apply_mask(payload, mask);
    }
    Ok(Some(Frame {
        fin,
        opcode,
        payload_start: pos,
        len: end,
    }))
}

/// XORs `data` with the 4-byte mask, a word at a time.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        // Infallible: chunks_exact_mut yields 8-byte chunks.
        let v = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

fn write_header(out: &mut Vec<u8>, opcode: Opcode, fin: bool, len: usize, masked: bool) {
    let mask_bit = if masked { 0x80 } else { 0 };
    out.push((fin as u8) << 7 | opcode as u8);
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends a server frame (unmasked, as RFC 6455 requires of servers).
pub fn write_frame(out: &mut Vec<u8>, opcode: Opcode, payload: &[u8]) {
    write_header(out, opcode, true, payload.len(), false);
    out.extend_from_slice(payload);
}

/// Appends a server Close frame with `code` (no reason text).
pub fn write_close(out: &mut Vec<u8>, code: u16) {
    write_frame(out, Opcode::Close, &code.to_be_bytes());
}

/// Appends a server Close frame with `code` and a short `reason` (at most
/// 123 bytes: a control frame's payload is at most 125).
pub fn write_close_with(out: &mut Vec<u8>, code: u16, reason: &[u8]) {
    let reason = &reason[..reason.len().min(123)];
    write_header(out, Opcode::Close, true, 2 + reason.len(), false);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
}

/// Appends a client frame, masked with `mask`.
pub fn write_masked_frame(
    out: &mut Vec<u8>,
    opcode: Opcode,
    fin: bool,
    payload: &[u8],
    mask: [u8; 4],
) {
    write_header(out, opcode, fin, payload.len(), true);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// A close code a peer may send (RFC 6455 7.4; 1012-1014 registered since).
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Text that is not UTF-8 (closes with 1007).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Validates UTF-8 that arrives in pieces (fragments of one text message),
/// failing as soon as a byte makes the text invalid.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Utf8Stream {
    pending: [u8; 4],
    pending_len: u8,
}

impl Utf8Stream {
    /// Feeds the next piece; `Err` when the text can no longer be valid.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            let have = self.pending_len as usize;
            let want = char_width(self.pending[0]);
            let take = (want - have).min(data.len());
            self.pending[have..have + take].copy_from_slice(&data[..take]);
            let now = have + take;
            match std::str::from_utf8(&self.pending[..now]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_none() => {
                    self.pending_len = now as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
            data = &data[take..];
        }
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &data[e.valid_up_to()..];
                self.pending[..rest.len()].copy_from_slice(rest);
                self.pending_len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Whether the text ended on a whole character.
    pub fn is_complete(&self) -> bool {
        self.pending_len == 0
    }

    /// The bytes of a character begun and not finished (empty when
    /// complete): with `feed` into a new stream, its whole state.
    pub fn pending(&self) -> &[u8] {
        &self.pending[..self.pending_len as usize]
    }
}

/// Width of the UTF-8 sequence a (valid) lead byte starts.
fn char_width(lead: u8) -> usize {
    match lead {
        0xF0.. => 4,
        0xE0.. => 3,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(opcode: Opcode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_masked_frame(&mut out, opcode, fin, payload, [1, 2, 3, 4]);
        out
    }

    #[test]
    fn decodes_masked_frames_of_every_length_class() {
        for len in [0, 1, 125, 126, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = client(Opcode::Binary, true, &payload);
            let f = decode(&mut buf, 1 << 20).unwrap().unwrap();
            assert_eq!(f.len, buf.len());
            assert_eq!(&buf[f.payload_start..f.len], &payload[..]);
            assert_eq!(f.opcode, Opcode::Binary);
            // Every strict prefix is incomplete.
            let mut again = client(Opcode::Binary, true, &payload);
            for cut in [0, 1, 2, f.payload_start - 1, f.len - 1] {
                assert_eq!(
                    decode(&mut again[..cut], 1 << 20),
                    Ok(None),
                    "len {len} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn the_device_side_decodes_server_frames_and_refuses_masked_ones() {
        for len in [0, 2, 125, 126, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = Vec::new();
            write_frame(&mut buf, Opcode::Pong, &payload[..len.min(125)]);
            let f = decode_server(&mut buf, 1 << 20).unwrap().unwrap();
            assert_eq!((f.opcode, f.len), (Opcode::Pong, buf.len()));
            assert_eq!(&buf[f.payload_start..], &payload[..len.min(125)]);
            let mut text = Vec::new();
            write_frame(&mut text, Opcode::Text, &payload);
            let f = decode_server(&mut text, 1 << 20).unwrap().unwrap();
            assert_eq!(&text[f.payload_start..f.len], &payload[..]);
            assert_eq!(decode_server(&mut text[..f.len - 1], 1 << 20), Ok(None));
        }
        let mut masked = client(Opcode::Pong, true, b"x");
        assert_eq!(decode_server(&mut masked, 100), Err(code::PROTOCOL_ERROR));
    }

    #[test]
    fn protocol_violations_close_with_their_codes() {
        let mut unmasked = Vec::new();
        write_frame(&mut unmasked, Opcode::Text, b"hi");
        assert_eq!(decode(&mut unmasked, 100), Err(code::PROTOCOL_ERROR));

        let mut rsv = client(Opcode::Text, true, b"hi");
        rsv[0] |= 0x40;
        assert_eq!(decode(&mut rsv, 100), Err(code::PROTOCOL_ERROR));

        let mut unknown = client(Opcode::Text, true, b"hi");
        unknown[0] = 0x80 | 3;
        assert_eq!(decode(&mut unknown, 100), Err(code::PROTOCOL_ERROR));

        let mut big_ping = client(Opcode::Ping, true, &[0; 126]);
        assert_eq!(decode(&mut big_ping, 1000), Err(code::PROTOCOL_ERROR));

        let mut fragmented_ping = client(Opcode::Ping, false, b"x");
        assert_eq!(decode(&mut fragmented_ping, 100), Err(code::PROTOCOL_ERROR));

        // Too big is known from the header alone.
        let mut too_big = client(Opcode::Binary, true, &[0; 200]);
        assert_eq!(decode(&mut too_big[..4], 100), Err(code::TOO_BIG));
    }

    #[test]
    fn server_frames_are_unmasked_with_minimal_lengths() {
        let mut out = Vec::new();
        write_frame(&mut out, Opcode::Pong, b"abc");
        assert_eq!(out, [0x8a, 3, b'a', b'b', b'c']);
        out.clear();
        write_close(&mut out, code::GOING_AWAY);
        assert_eq!(out, [0x88, 2, 0x03, 0xe9]);
    }

    #[test]
    fn utf8_stream_accepts_splits_and_fails_fast() {
        let text = "héllo wörld ☃ 𝄞".as_bytes();
        for cut in 0..text.len() {
            let mut v = Utf8Stream::default();
            v.feed(&text[..cut]).unwrap();
            v.feed(&text[cut..]).unwrap();
            assert!(v.is_complete());
        }
        let mut v = Utf8Stream::default();
        v.feed(&[0xF0, 0x9D]).unwrap();
        assert!(!v.is_complete());
        assert!(v.feed(&[0x41]).is_err());
        assert!(Utf8Stream::default().feed(&[0xC0, 0x80]).is_err());
        assert!(Utf8Stream::default().feed(&[0xED, 0xA0]).is_err()); // surrogate
    }
}
