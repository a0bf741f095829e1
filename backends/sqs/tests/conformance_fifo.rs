//! The conformance suite on SQS FIFO queues (every queue `<name>.fifo`, groups by job key, delays
//! through the delay queues), against a private moto server this test starts on a free loopback
//! port: `cargo test -p stevedore-sqs --features fifo-conformance --test conformance_fifo`. Opt
//! in: moto cannot serve all its scenarios at once within their time limits on 2 cores (see the
//! feature's note in Cargo.toml).

#[allow(dead_code)]
mod common;

mod sqs_fifo {
    stevedore_conformance::conformance_tests! {
        backend: || super::common::SqsBackend::start(true),
    }
}
