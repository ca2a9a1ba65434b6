//! The upgrade request parser on arbitrary bytes: never panics, and a head it
//! accepts is within the limit and yields a valid id.
#![no_main]
use c1m_proto::handshake::{parse, valid_id, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Parsed::Upgrade(u) = parse(data, 8192) {
        assert!(u.head_len <= data.len() && u.head_len <= 8192);
        assert!(valid_id(&u.id));
    }
});
