//! SQS messages: any body and attributes decode without a panic, and an envelope sent as its
//! body and attributes reads back as the shared wire form reads it.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use stevedore_fuzz::{canonical, envelope};
use stevedore_sqs::fuzzing;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if bool::arbitrary(&mut u).unwrap_or(false) {
        let body: Option<String> = Arbitrary::arbitrary(&mut u).unwrap_or_default();
        let attributes: Vec<(String, String, String)> =
            Arbitrary::arbitrary(&mut u).unwrap_or_default();
        let sent: Option<u64> = Arbitrary::arbitrary(&mut u).unwrap_or_default();
        let _ = fuzzing::decode("m-1", body, attributes, sent);
        return;
    }
    let Ok(env) = envelope(&mut u) else { return };
    let back = fuzzing::round_trip(&env, "m-1");
    let mut want = canonical(&env);
    if want.id.is_empty() {
        want.id = back.id.clone();
    }
    assert_eq!(back, want);
});
