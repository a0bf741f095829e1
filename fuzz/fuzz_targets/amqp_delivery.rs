//! AMQP deliveries (RabbitMQ): any properties and headers decode without a panic, and an
//! envelope published as its properties reads back as the shared wire form reads it.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use stevedore_fuzz::{canonical, envelope};
use stevedore_rabbitmq::fuzzing;

#[derive(Arbitrary, Debug)]
struct Delivery {
    headers: Vec<(String, u8, Vec<u8>)>,
    message_id: Option<String>,
    app_id: Option<String>,
    kind: Option<String>,
    content_type: Option<String>,
    timestamp: Option<u64>,
    body: Vec<u8>,
    redelivered: bool,
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if bool::arbitrary(&mut u).unwrap_or(false) {
        let Ok(d) = Delivery::arbitrary(&mut u) else {
            return;
        };
        let (_, count) = fuzzing::decode(
            d.headers,
            d.message_id,
            d.app_id,
            d.kind,
            d.content_type,
            d.timestamp,
            d.body,
            d.redelivered,
        );
        assert!(count >= 1);
        return;
    }
    let Ok(env) = envelope(&mut u) else { return };
    let Some(back) = fuzzing::round_trip(&env) else {
        return;
    };
    let mut want = canonical(&env);
    if want.id.is_empty() {
        want.id = back.id.clone();
    }
    assert_eq!(back, want);
});
