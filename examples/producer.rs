//! A producer: how any service enqueues jobs, with the same config file the workers use.
//!
//! ```text
//! cargo run -p stevedore-examples --bin producer -- config/redis.toml 100
//! ```
//!
//! With `broker.kind = "memory"` the queues live in this process only, so this example is useful
//! against a networked broker; the quickstart shows the in-process equivalent.

use serde::Serialize;
use std::process::ExitCode;
use std::time::Duration;
use stevedore::{backend, config, Client, Priority};

#[derive(Serialize)]
struct SendEmail<'a> {
    to: String,
    subject: &'a str,
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "config/default.toml".into());
    let count: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let cfg = match config::load(Some(path.as_ref()), None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let broker = match backend::connect(&cfg).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let client = Client::new(broker);
    for i in 0..count {
        let job = SendEmail {
            to: format!("user{i}@example.com"),
            subject: "Your order shipped",
        };
        let sent = client
            .enqueue("send_email", &job)
            .queue("emails")
            .priority(if i % 10 == 0 {
                Priority::High
            } else {
                Priority::Normal
            })
            .delay(Duration::from_secs(u64::from(i % 3)))
            .key(&format!("customer-{}", i % 4))
            .max_depth(50_000)
            .send()
            .await;
        match sent {
            Ok(id) => println!("enqueued {id}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
