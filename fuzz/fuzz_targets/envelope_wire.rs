//! The shared wire form (`stevedore_core::wire`): any headers and body decode without a panic,
//! and an envelope's wire form reads back as the same envelope, and is stable (a second trip
//! changes nothing).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use stevedore_core::wire;
use stevedore_fuzz::{canonical, envelope};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if bool::arbitrary(&mut u).unwrap_or(false) {
        let headers: Vec<(String, String)> = Arbitrary::arbitrary(&mut u).unwrap_or_default();
        let body: Vec<u8> = Arbitrary::arbitrary(&mut u).unwrap_or_default();
        let env = wire::from_wire(headers, body.into(), "fallback");
        let again = canonical(&env);
        assert!(again == canonical(&again), "not stable: {again:?}");
        return;
    }
    let Ok(env) = envelope(&mut u) else { return };
    let back = canonical(&env);
    let mut want = env.clone();
    if want.id.is_empty() {
        // A message without an id of ours takes the fallback (here "").
        want.id = String::new();
    }
    assert_eq!(back, want, "the wire form lost something");
});
