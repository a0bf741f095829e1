//! Quickstart: a worker with a few realistic handlers and an in-process producer, on the embedded
//! SQLite store (`stevedore.db` in the working directory; no server). Run it from the repository
//! root:
//!
//! ```text
//! cargo run -p stevedore-examples --bin quickstart -- run --config config/default.toml
//! ```
//!
//! It enqueues a mix of jobs every second and prints a live summary; Ctrl-C drains and exits. From
//! a second terminal, `enqueue`, `stats` and `dlq list` (same binary, same `--config`) see the
//! running worker's queues.
//! - `send_email` fails now and then (a flaky SMTP server): watch the retries.
//! - `resize_image` is slow (up to a second).
//! - `send_reminder` is enqueued with a delay and runs when due.
//! - `charge_card` refuses negative amounts permanently: those land in the dead-letter queue.

use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::time::Duration;
use stevedore::{App, Client, JobContext, JobError, Json, Priority, Router};

#[derive(Serialize, Deserialize)]
struct SendEmail {
    to: String,
    subject: String,
}

#[derive(Serialize, Deserialize)]
struct ResizeImage {
    path: String,
    width: u32,
}

#[derive(Serialize, Deserialize)]
struct ChargeCard {
    customer: u64,
    cents: i64,
}

#[derive(Serialize, Deserialize)]
struct Reminder {
    user: u64,
}

async fn send_email(Json(mail): Json<SendEmail>, ctx: JobContext) -> Result<(), JobError> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    if rand::random::<f64>() < 0.25 {
        return Err(JobError::retry(format!(
            "SMTP server busy while mailing {}",
            mail.to
        )));
    }
    tracing::debug!(
        attempt = ctx.attempt,
        "mailed {}: {}",
        mail.to,
        mail.subject
    );
    Ok(())
}

async fn resize_image(Json(img): Json<ResizeImage>) -> Result<(), JobError> {
    let ms = 200 + rand::random::<u64>() % 800;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    tracing::debug!("resized {} to {}px in {ms}ms", img.path, img.width);
    Ok(())
}

async fn charge_card(Json(c): Json<ChargeCard>) -> Result<(), JobError> {
    if c.cents < 0 {
        return Err(JobError::permanent(format!(
            "refusing to charge a negative amount ({} cents)",
            c.cents
        )));
    }
    Ok(())
}

async fn send_reminder(Json(r): Json<Reminder>, ctx: JobContext) {
    let late = std::time::SystemTime::now()
        .duration_since(ctx.enqueued_at)
        .unwrap_or_default();
    tracing::info!(
        user = r.user,
        "reminder sent {:.1}s after it was enqueued",
        late.as_secs_f64()
    );
}

/// Enqueues a realistic mix every second until shutdown.
async fn produce(client: Client) {
    let mut n: u64 = 0;
    loop {
        n += 1;
        let result = async {
            for i in 0..5 {
                let priority = if i == 0 {
                    Priority::High
                } else {
                    Priority::Normal
                };
                let mail = SendEmail {
                    to: format!("user{}@example.com", n * 10 + i),
                    subject: "Welcome".into(),
                };
                client
                    .enqueue("send_email", &mail)
                    .queue("emails")
                    .priority(priority)
                    .send()
                    .await?;
            }
            let img = ResizeImage {
                path: format!("/uploads/{n}.png"),
                width: 640,
            };
            client.enqueue("resize_image", &img).send().await?;
            let cents = if n.is_multiple_of(7) { -500 } else { 1999 };
            client
                .enqueue("charge_card", &ChargeCard { customer: n, cents })
                .send()
                .await?;
            if n % 5 == 1 {
                client
                    .enqueue("send_reminder", &Reminder { user: n })
                    .delay(Duration::from_secs(3))
                    .send()
                    .await?;
            }
            Ok::<(), stevedore::EnqueueError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "producer could not enqueue");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let router = Router::new()
        .route("send_email", send_email)
        .route("resize_image", resize_image)
        .route("charge_card", charge_card)
        .route("send_reminder", send_reminder);
    App::new(router)
        .on_start(|client, _stats, shutdown| async move {
            tokio::select! {
                _ = produce(client) => {}
                _ = async { let _ = shutdown.subscribe().wait_for(|s| *s).await; } => {}
            }
        })
        .live_summary(Duration::from_secs(2))
        .run()
        .await
}
