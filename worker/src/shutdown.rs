//! Graceful shutdown. The first SIGTERM or SIGINT (Ctrl-C) asks the worker to stop fetching and drain;
//! the runtime waits for in-flight jobs up to `worker.shutdown_timeout`, then releases the unfinished
//! ones so another worker gets them at once, flushes acks and exits 0. A second signal exits at once
//! with status 130 (the broker returns unacked messages after their lease).

use tokio::sync::watch;

/// Asks a running worker to shut down. Cheap to clone; thread safe; calling it twice is harmless.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    tx: watch::Sender<bool>,
}

impl ShutdownHandle {
    /// A handle not yet triggered.
    pub fn new() -> Self {
        ShutdownHandle {
            tx: watch::Sender::new(false),
        }
    }

    /// Begins the graceful shutdown.
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        *self.tx.borrow()
    }

    /// A receiver that turns true when shutdown begins.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

impl Default for ShutdownHandle {
    fn default() -> Self {
        Self::new()
    }
}

/// Listens for SIGTERM and SIGINT: the first triggers `handle`, the second exits the process at
/// once with status 130.
pub fn listen_for_signals(handle: ShutdownHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            if wait_for_signal().await.is_err() {
                tracing::warn!("cannot listen for shutdown signals; stop the worker with SIGKILL");
                return;
            }
            seen += 1;
            if seen == 1 {
                tracing::info!(
                    "shutdown requested: finishing in-flight jobs (signal again to exit at once)"
                );
                handle.shutdown();
            } else {
                tracing::warn!("second signal: exiting now; unacked jobs return after their lease");
                std::process::exit(130);
            }
        }
    })
}

#[cfg(unix)]
async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_reaches_every_subscriber_and_is_idempotent() {
        let h = ShutdownHandle::new();
        let mut a = h.subscribe();
        let clone = h.clone();
        assert!(!h.is_shutting_down());
        let waiter = tokio::spawn(async move { a.wait_for(|s| *s).await.map(|v| *v) });
        clone.shutdown();
        clone.shutdown();
        assert_eq!(waiter.await.ok().and_then(Result::ok), Some(true));
        assert!(h.is_shutting_down());
        // A late subscriber sees it too.
        assert!(*h.subscribe().borrow());
    }
}
