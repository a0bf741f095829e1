//! The conformance suite on SQS standard queues, against a private moto server this test starts
//! on a free loopback port (`cargo test -p stevedore-sqs --test conformance -- --list`).

#[allow(dead_code)]
mod common;

mod sqs {
    stevedore_conformance::conformance_tests! {
        backend: || super::common::SqsBackend::start(false),
    }
}
