//! SQLite rows: any headers column and body decode without a panic; the headers column's fast
//! path reads what serde reads wherever both accept the text; and an envelope stored as
//! its row reads back as the shared wire form reads it.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use stevedore_fuzz::{canonical, envelope};
use stevedore_sqlite::fuzzing;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if bool::arbitrary(&mut u).unwrap_or(false) {
        let headers: String = Arbitrary::arbitrary(&mut u).unwrap_or_default();
        let body: Vec<u8> = Arbitrary::arbitrary(&mut u).unwrap_or_default();
        if let Some(fast) = fuzzing::plain_pairs(&headers) {
            // Where serde reads it too, the same pairs (the fast path also takes raw control
            // characters, which serde refuses).
            let slow: Result<Vec<(String, String)>, _> = serde_json::from_str(&headers);
            if let Ok(slow) = slow {
                assert_eq!(fast, slow, "fast path and serde differ on {headers:?}");
            }
        }
        let env = fuzzing::decode(7, &headers, body);
        assert!(!env.id.is_empty());
        return;
    }
    let Ok(env) = envelope(&mut u) else { return };
    let (headers, body) = fuzzing::encode(&env);
    let back = fuzzing::decode(7, &headers, body);
    let mut want = canonical(&env);
    if want.id.is_empty() {
        want.id = back.id.clone();
    }
    assert_eq!(back, want);
});
