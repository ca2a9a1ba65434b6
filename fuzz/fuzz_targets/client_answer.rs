//! The client's check of a server answer on arbitrary bytes: never panics,
//! and never accepts an answer without the right accept key.
#![no_main]
use c1m_proto::client_handshake::{key_for, parse_answer, Answer};
use c1m_proto::handshake::accept_key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = key_for(1, 2);
    if let Answer::Accepted { head_len } = parse_answer(data, &key) {
        assert!(head_len <= data.len());
        let accept = accept_key(&key);
        assert!(data[..head_len].windows(accept.len()).any(|w| w == accept));
    }
});
