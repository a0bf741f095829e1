//! Redis stream entries: any fields decode without a panic, and an envelope written as its
//! entry reads back as the shared wire form reads it.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use stevedore_fuzz::{canonical, envelope};
use stevedore_redis::fuzzing;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if bool::arbitrary(&mut u).unwrap_or(false) {
        let id: String = Arbitrary::arbitrary(&mut u).unwrap_or_default();
        let fields: Vec<(Vec<u8>, Vec<u8>)> = Arbitrary::arbitrary(&mut u).unwrap_or_default();
        let _ = fuzzing::decode(&id, fields);
        return;
    }
    let Ok(env) = envelope(&mut u) else { return };
    let (name, value) = fuzzing::encode(&env);
    let (back, redeliveries) = fuzzing::decode("1-0", vec![(name, value)]);
    assert_eq!(redeliveries, 0);
    let mut want = canonical(&env);
    if want.id.is_empty() {
        want.id = back.id.clone();
    }
    assert_eq!(back, want);
});
