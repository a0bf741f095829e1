//! The conformance suite on SQS FIFO queues (every queue `<name>.fifo`, per-key order, delays
//! through the delay queues), against a private moto server this test starts on a free loopback
//! port (`cargo test -p stevedore-sqs --test conformance_fifo -- --list`).

#[allow(dead_code)]
mod common;

mod sqs_fifo {
    stevedore_conformance::conformance_tests! {
        backend: || super::common::SqsBackend::start(true),
    }
}
