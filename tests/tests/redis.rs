//! The conformance suite against real Redis servers:
//! - every scenario against the machine's Redis on 127.0.0.1:6379 (`REDIS_URL` overrides);
//! - scenario 16 (broker restart mid-run) against a private `redis-server` this test starts on a free
//!   loopback port with `appendonly yes`, so a restart keeps the data, and restarts it. The shared
//!   server is never restarted (it keeps nothing on disk, and other work may be using it).

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use stevedore_conformance::{async_trait, run, Backend};
use stevedore_core::{Broker, BrokerError};
use stevedore_redis::{RedisBroker, RedisConfig};

struct RedisBackend {
    url: String,
    server: Option<Private>,
}

struct Private {
    port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Private {
    fn start() -> Result<Private, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let p = Private {
            port: free_port(),
            dir,
            child: Mutex::new(None),
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server (is it installed? .ci/run installs it): {e}")
            })?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if t.elapsed() > Duration::from_secs(10) {
                return Err("private redis-server did not start in 10s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn stop(&self) {
        let _ = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        self.stop();
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
        Ok(Arc::new(
            RedisBroker::connect(RedisConfig::new(self.url.clone())).await?,
        ))
    }

    async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String> {
        // Exactly what `redis-cli XADD <queue> * payload '<body>'` sends.
        let client = redis::Client::open(self.url.as_str()).map_err(|e| e.to_string())?;
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let _: String = redis::cmd("XADD")
            .arg(queue)
            .arg("*")
            .arg("payload")
            .arg(body)
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn restart(&self) -> Result<(), String> {
        let Some(p) = &self.server else {
            return Err("the machine's shared Redis (no persistence) is never restarted by tests; scenario 16 runs in redis_restart against a private persistent redis-server".into());
        };
        p.stop();
        tokio::time::sleep(Duration::from_millis(500)).await;
        p.spawn()
    }
}

fn machine_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_conformance() {
    let backend = Arc::new(RedisBackend {
        url: machine_url(),
        server: None,
    });
    let report = run(backend, None).await;
    println!("{}", report.table());
    eprintln!("{}", report.table());
    report.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart() {
    let server = match Private::start() {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let url = format!("redis://127.0.0.1:{}/0", server.port);
    let backend = Arc::new(RedisBackend {
        url,
        server: Some(server),
    });
    let report = run(backend, Some(&[16])).await;
    println!("{}", report.table());
    eprintln!("{}", report.table());
    report.assert_ok();
}
