//! The conformance suite on SQS standard queues, each scenario against a private moto server of
//! its own on a free loopback port (`cargo test -p stevedore-sqs --test conformance -- --list`).

#[allow(dead_code)]
mod common;

mod sqs {
    stevedore_conformance::conformance_tests! {
        backend: || super::common::SqsBackend::start(false),
    }
}
