//! The handover decoder on arbitrary bytes: never panics; a record it
//! accepts takes no more bytes than there are and encodes back to exactly
//! them; a connection record it accepts rebuilds a Conn.
#![no_main]
use c1m_proto::conn::Conn;
use c1m_proto::handover::{decode, decode_hello, records, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((rec, n)) = decode(data) {
        assert!(n <= data.len());
        let mut again = Vec::new();
        rec.encode(&mut again).expect("a decoded record encodes");
        assert_eq!(again, data[..n]);
        if let Record::Conn(c) = rec {
            Conn::import(&c.state, c.upgraded).expect("a decoded state imports");
        }
    }
    let _ = decode_hello(data);
    for r in records(data) {
        let _ = r;
    }
});
