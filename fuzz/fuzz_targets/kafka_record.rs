//! Kafka records and partition checkpoints: any headers, payload and key decode without a
//! panic; any text either is not a checkpoint or is one whose encoding reads back the same.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use stevedore_kafka::fuzzing;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if bool::arbitrary(&mut u).unwrap_or(false) {
        let text: String = Arbitrary::arbitrary(&mut u).unwrap_or_default();
        if let Some((again, same)) = fuzzing::checkpoint(&text) {
            assert!(
                same,
                "checkpoint {text:?} encodes to {again:?}, which reads differently"
            );
        }
        return;
    }
    let headers: Vec<(String, Option<Vec<u8>>)> = Arbitrary::arbitrary(&mut u).unwrap_or_default();
    let payload: Option<Vec<u8>> = Arbitrary::arbitrary(&mut u).unwrap_or_default();
    let key: Option<Vec<u8>> = Arbitrary::arbitrary(&mut u).unwrap_or_default();
    let offset: i64 = Arbitrary::arbitrary(&mut u).unwrap_or_default();
    let (env, _) = fuzzing::decode(headers, payload, key, offset);
    assert!(!env.id.is_empty(), "a record without an id gets one");
});
