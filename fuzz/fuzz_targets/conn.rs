//! A connection fed arbitrary bytes after a valid upgrade (or none), split at
//! points the input chooses: never panics, buffers at most one head or frame,
//! and gives exactly the result of one unsplit read.
#![no_main]
use c1m_proto::conn::{Conn, Limits, Received};
use libfuzzer_sys::fuzz_target;

const UPGRADE: &[u8] = b"GET /ws?id=fuzz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

fn feed(input: &[u8], cuts: &[usize], limits: &Limits) -> (Vec<u8>, Received, usize) {
    let mut conn = Conn::new();
    let mut out = Vec::new();
    let mut total = Received::default();
    let mut at = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        let cut = cut.clamp(at, input.len());
        let mut piece = input[at..cut].to_vec();
        let r = conn.receive(&mut piece, limits, &mut c1m_proto::conn::admit_all, &mut out);
        total.upgraded |= r.upgraded;
        total.frames += r.frames;
        total.end = total.end.or(r.end);
        at = cut;
    }
    (out, total, conn.buffered())
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else { return };
    let limits = Limits { max_head: 1024, max_message: 512, echo: ctl & 1 != 0 };
    let input = if ctl & 2 != 0 { [UPGRADE, rest].concat() } else { rest.to_vec() };
    let mut cuts: Vec<usize> = rest.iter().take(8).map(|&b| b as usize * input.len() / 256).collect();
    cuts.sort_unstable();
    let whole = feed(&input, &[], &limits);
    let split = feed(&input, &cuts, &limits);
    assert_eq!(whole, split);
    assert!(whole.2 <= 1024 + 512 + 14);
});
