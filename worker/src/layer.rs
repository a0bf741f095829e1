//! Layers: your code around every job's handler, without touching the handlers. A tracing span
//! or context, a metric per job, an idempotency check, a tenant guard.
//!
//! A [`Layer`] gets the job's [`JobContext`] and the future of everything inside it (the next
//! layers and the handler) and returns the future to run instead. It may run code before and
//! after, look at the result, change it, or skip the handler entirely by not awaiting `next`.
//! Layers added to a [`Router`](crate::Router) with [`Router::layer`](crate::Router::layer) wrap
//! every route, the first added outermost.
//!
//! Layers run inside the runtime's own supervision: the job's timeout, panic catching (a layer
//! that panics fails the job like a handler would), lease heartbeats and the shutdown deadline
//! cover the whole stack. A timeout or a hard stop drops the stack's future, so a layer that must
//! observe every end uses a drop guard. A router without layers pays nothing for them.
//!
//! ```
//! use std::collections::HashSet;
//! use std::sync::{Arc, Mutex};
//! use stevedore::layer::{JobFuture, Layer};
//! use stevedore::{JobContext, Router};
//!
//! /// Runs each message id at most once per process (a real one would use a shared store).
//! #[derive(Default)]
//! struct Once(Arc<Mutex<HashSet<String>>>);
//!
//! impl Layer for Once {
//!     fn wrap(&self, job: &JobContext, next: JobFuture) -> JobFuture {
//!         let (seen, id) = (self.0.clone(), job.id.clone());
//!         Box::pin(async move {
//!             if seen.lock().map_or(false, |s| s.contains(&id)) {
//!                 return Ok(()); // done before: ack without running it again
//!             }
//!             next.await?;
//!             if let Ok(mut s) = seen.lock() {
//!                 s.insert(id);
//!             }
//!             Ok(())
//!         })
//!     }
//! }
//!
//! async fn send_email() {}
//! let router = Router::new().route("send_email", send_email).layer(Once::default());
//! ```

use crate::error::JobError;
use crate::handler::JobContext;
use futures::future::BoxFuture;

/// The future of one job's run through the layers inside this one and the handler.
pub type JobFuture = BoxFuture<'static, Result<(), JobError>>;

/// Code around every job's handler. See the [module docs](self).
///
/// Thread safety: one layer value serves every job of every queue at once (`Send + Sync`);
/// `wrap` is called once per job run, on the job's task, and must not block.
pub trait Layer: Send + Sync + 'static {
    /// The future to run for this job instead of `next`. Await `next` to run the handler (and the
    /// layers inside this one); return without awaiting it to skip them. The result decides the
    /// job's fate as a handler's would: `Ok` acks, an error retries or dead-letters by its kind.
    fn wrap(&self, job: &JobContext, next: JobFuture) -> JobFuture;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config, Json, MemoryBroker, Router, Worker};
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    type Log = Arc<Mutex<Vec<String>>>;

    fn push(log: &Log, line: String) {
        if let Ok(mut l) = log.lock() {
            l.push(line);
        }
    }

    /// Logs `name>` before and `<name` after the inner stack, with the inner result.
    struct Around {
        name: &'static str,
        log: Log,
    }

    impl Layer for Around {
        fn wrap(&self, job: &JobContext, next: JobFuture) -> JobFuture {
            let (log, name, id) = (self.log.clone(), self.name, job.job.clone());
            Box::pin(async move {
                push(&log, format!("{name}> {id}"));
                let r = next.await;
                push(
                    &log,
                    format!("<{name} {}", if r.is_ok() { "ok" } else { "err" }),
                );
                r
            })
        }
    }

    /// Skips a job whose payload it has seen.
    #[derive(Default)]
    struct Dedup(Arc<Mutex<HashSet<String>>>);

    impl Layer for Dedup {
        fn wrap(&self, job: &JobContext, next: JobFuture) -> JobFuture {
            let key = job.headers.get("x-dedup").cloned().unwrap_or_default();
            let seen = self.0.clone();
            Box::pin(async move {
                if !seen.lock().map(|mut s| s.insert(key)).unwrap_or(true) {
                    return Ok(());
                }
                next.await
            })
        }
    }

    #[tokio::test]
    async fn layers_wrap_every_route_first_added_outermost(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let log: Log = Arc::default();
        let handler_log = log.clone();
        let router = Router::with_state(())
            .route("work", move |Json(n): Json<u32>| {
                let log = handler_log.clone();
                async move {
                    push(&log, format!("handler {n}"));
                    if n == 2 {
                        Err(JobError::permanent("two"))
                    } else {
                        Ok(())
                    }
                }
            })
            .layer(Around {
                name: "outer",
                log: log.clone(),
            })
            .layer(Dedup::default())
            .layer(Around {
                name: "inner",
                log: log.clone(),
            });
        let cfg = config::from_toml_str(
            "[http]\nenabled = false\n[worker]\npoll_wait = \"20ms\"\n\
             [queues.default]\nconcurrency = 1\nretry = { max_attempts = 1 }\n",
            None,
        )?;
        let worker = Worker::new(Arc::new(MemoryBroker::new()), router, cfg)?;
        let client = worker.client();
        let stats = worker.stats();
        for (n, key) in [(1u32, "a"), (1, "a"), (2, "b")] {
            client
                .enqueue("work", &n)
                .header("x-dedup", key)
                .send()
                .await?;
        }
        // Concurrency 1: one job at a time, so the log reads job by job.
        let stop = worker.shutdown_handle();
        let run = tokio::spawn(worker.run());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let done: u64 = stats
                .snapshot()
                .values()
                .map(|s| s.processed + s.dead_lettered)
                .sum();
            if done >= 3 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "jobs did not finish: {log:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.shutdown();
        run.await??;
        let log = log.lock().map_err(|_| "poisoned")?.clone();
        // Each job: outer wraps everything; the duplicate of "a" stops at Dedup (no inner, no
        // handler) yet still acks; the failure travels back out through both layers.
        let runs: Vec<&[String]> = log.split_inclusive(|l| l.starts_with("<outer")).collect();
        assert_eq!(runs.len(), 3, "{log:?}");
        let mut shapes: Vec<Vec<String>> = runs.iter().map(|r| r.to_vec()).collect();
        shapes.sort();
        let want = |lines: &[&str]| lines.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut expected = vec![
            want(&[
                "outer> work",
                "inner> work",
                "handler 1",
                "<inner ok",
                "<outer ok",
            ]),
            want(&["outer> work", "<outer ok"]),
            want(&[
                "outer> work",
                "inner> work",
                "handler 2",
                "<inner err",
                "<outer err",
            ]),
        ];
        expected.sort();
        assert_eq!(shapes, expected);
        Ok(())
    }
}
