//! Lease heartbeats: while a handler runs, its delivery's lease is renewed in the background so a
//! long job is never handed to another worker. Only for backends whose leases expire on their own
//! ([`LeaseSupport::Timed`]); session leases (AMQP, Kafka) last as long as the connection.
//!
//! The runtime renews every third of the lease, so two renewals may fail (a broker hiccup) before
//! the lease runs out. A renewal that finds the lease already lost is logged: the job finishes, but
//! another worker may run it too (at-least-once).

use std::time::Duration;
use stevedore_core::{Broker, BrokerError, LeaseSupport, Receipt};

/// Shortest renewal period, so tiny test leases do not spin.
pub(crate) const MIN_BEAT: Duration = Duration::from_millis(50);

/// How often to renew a lease of length `lease`: a third of it, at least [`MIN_BEAT`].
pub(crate) fn beat(lease: Duration) -> Duration {
    (lease / 3).max(MIN_BEAT)
}

/// Whether deliveries of `broker` need heartbeats at all.
pub(crate) fn needs_heartbeat(broker: &dyn Broker) -> bool {
    matches!(broker.capabilities().lease, LeaseSupport::Timed { .. })
}

/// Renews one lease; a failure is logged, never fatal to the job.
pub(crate) async fn renew(broker: &dyn Broker, receipt: &Receipt, lease: Duration) {
    match broker.extend_lease(receipt, lease).await {
        Ok(()) => {}
        Err(BrokerError::LeaseLost { .. }) => {
            tracing::warn!("lease already lost: another worker may run this job too")
        }
        Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying at the next beat"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stevedore_core::{Envelope, MemoryBroker, ReceiveOptions};

    #[test]
    fn beat_is_a_third_of_the_lease_with_a_floor() {
        assert_eq!(beat(Duration::from_secs(30)), Duration::from_secs(10));
        assert_eq!(beat(Duration::from_millis(90)), MIN_BEAT);
    }

    #[tokio::test]
    async fn renewal_keeps_a_delivery_past_its_first_lease() -> Result<(), BrokerError> {
        let b = MemoryBroker::new();
        assert!(needs_heartbeat(&b));
        b.publish("q", vec![Envelope::new("j", "x")]).await?;
        let lease = Duration::from_millis(150);
        let opts = ReceiveOptions {
            max: 1,
            wait: Duration::ZERO,
            lease,
        };
        let d = b.receive("q", opts).await?.remove(0);
        for _ in 0..4 {
            tokio::time::sleep(beat(lease)).await;
            renew(&b, &d.receipt, lease).await;
        }
        // 4 beats of 50 ms = 200 ms > the 150 ms lease, yet nothing came back.
        assert!(b.receive("q", opts).await?.is_empty());
        b.ack(&[d.receipt]).await
    }
}
