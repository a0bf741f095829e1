//! The RabbitMQ backend on a 3-node cluster this test starts (private nodes on free loopback
//! ports sharing an Erlang cookie, joined with `rabbitmqctl join_cluster`), `url` listing every
//! node. The worker-level failover under load is a cell of the fault table
//! (`tests/e2e/faults.rs`, row rabbitmq, "cluster failover"); this checks, at the broker
//! level, what a node's loss does to each kind of queue.

use std::time::Duration;
use stevedore_conformance::servers::RabbitCluster;
use stevedore_core::{Broker, BrokerError, Envelope, ReceiveOptions};
use stevedore_rabbitmq::{RabbitBroker, RabbitConfig};

fn opts(max: usize, wait: Duration) -> ReceiveOptions {
    ReceiveOptions {
        max,
        wait,
        lease: Duration::from_secs(60),
    }
}

/// Receives until `n` messages came or `limit` passed; acks each.
async fn drain(b: &RabbitBroker, q: &str, n: usize, limit: Duration) -> Vec<String> {
    let t = std::time::Instant::now();
    let mut got = Vec::new();
    while got.len() < n && t.elapsed() < limit {
        match b.receive(q, opts(100, Duration::from_millis(500))).await {
            Ok(batch) => {
                for d in &batch {
                    got.push(String::from_utf8_lossy(&d.envelope.payload).into_owned());
                }
                let receipts: Vec<_> = batch.into_iter().map(|d| d.receipt).collect();
                let _ = b.ack(&receipts).await;
            }
            Err(e) => {
                eprintln!("receive at {:?}: {e}", t.elapsed());
                tokio::time::sleep(Duration::from_millis(200)).await
            }
        }
    }
    got
}

/// The node a handle is connected to (which declared every queue) is killed: the handle
/// reconnects to another node and every message of the (quorum) work queue is still there; a
/// delayed publish while the delay queues' (classic) node is down is refused with a transient
/// error, never accepted and lost; a message delayed before the kill arrives once the node is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_message() -> Result<(), BrokerError> {
    let cluster = tokio::task::spawn_blocking(|| RabbitCluster::start(3))
        .await
        .map_err(|e| BrokerError::permanent(e.to_string()))?
        .map_err(BrokerError::permanent)?;
    let mut cfg = RabbitConfig::new(cluster.urls());
    cfg.key_prefix = "cl.".into();
    let b = RabbitBroker::connect(cfg).await?;
    let q = "work".to_string();
    b.prepare(std::slice::from_ref(&q)).await?;
    let plain: Vec<Envelope> = (0..500)
        .map(|i| Envelope::new("j", format!("plain {i}")))
        .collect();
    b.publish(&q, plain).await?;
    b.publish(
        &q,
        vec![Envelope::new("j", "delayed before").delayed(Duration::from_secs(3))],
    )
    .await?;
    let gen = b.connection_generation();

    // Kill the node the handle is on (the first of the list: it declared every queue).
    let first = cluster.node(0).ok_or(BrokerError::permanent("no node"))?;
    tokio::task::block_in_place(|| first.kill());
    let got = drain(&b, &q, 500, Duration::from_secs(60)).await;
    assert!(
        b.connection_generation() > gen,
        "the handle reconnected to another node"
    );
    let plain_got = got
        .iter()
        .filter(|m| m.starts_with("plain "))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert_eq!(
        plain_got, 500,
        "every message of the quorum work queue survives the node"
    );

    // While the delay queues' node is down: a delayed publish is refused, never accepted and
    // lost.
    let during = b
        .publish(
            &q,
            vec![Envelope::new("j", "delayed during").delayed(Duration::from_secs(1))],
        )
        .await;
    match &during {
        Err(e) => assert!(
            e.is_transient() && e.to_string().contains("delay queues"),
            "a delayed publish while the delay queues' node is down is refused, transiently, \
             saying why: {e}"
        ),
        Ok(()) => panic!("a delayed publish while the delay queues' node is down was accepted"),
    }

    // The node comes back: the delayed message it held arrives (its wait ran on), once.
    tokio::task::block_in_place(|| first.restart(Duration::ZERO))
        .map_err(BrokerError::permanent)?;
    let late = drain(&b, &q, 1, Duration::from_secs(60)).await;
    assert_eq!(
        late,
        ["delayed before"],
        "the message delayed before the kill arrives once its node is back"
    );
    let more = drain(&b, &q, 1, Duration::from_secs(2)).await;
    assert!(more.is_empty(), "nothing else arrives: {more:?}");
    Ok(())
}
