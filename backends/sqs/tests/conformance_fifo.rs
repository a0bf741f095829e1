//! The conformance suite on SQS FIFO queues (every queue `<name>.fifo`, groups by job key, delays
//! through the delay queues), each scenario against a private moto server of its own on a free
//! loopback port (`cargo test -p stevedore-sqs --test conformance_fifo -- --list`).

#[allow(dead_code)]
mod common;

mod sqs_fifo {
    stevedore_conformance::conformance_tests! {
        backend: || super::common::SqsBackend::start(true),
    }
}
