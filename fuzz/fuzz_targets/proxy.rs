//! The PROXY protocol header parser on arbitrary bytes: never panics; Done
//! never claims more bytes than there are, nor more than the longest
//! header; the verdict on a prefix stands once it is not NeedMore.
#![no_main]
use c1m_proto::proxy::{parse, Proxy, V1_MAX, V2_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Proxy::Done { consumed, .. } = whole {
        assert!(consumed <= data.len() && consumed <= V1_MAX.max(V2_MAX));
    }
    if whole == Proxy::NeedMore {
        assert!(data.len() < V2_MAX);
    }
    // Every shorter prefix either needs more or already said the same.
    for end in 0..data.len() {
        match parse(&data[..end]) {
            Proxy::NeedMore => {}
            Proxy::Invalid(_) => assert!(matches!(whole, Proxy::Invalid(_))),
            done => assert_eq!(done, whole),
        }
    }
});
