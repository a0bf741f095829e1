//! Private broker servers that tests start, restart and stop themselves, on free loopback ports, so a
//! test can restart "the broker" without touching the machine's shared services.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

fn wait_for_port(port: u16, what: &str) -> Result<(), String> {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "{what} did not listen on 127.0.0.1:{port} within 10s"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A `redis-server` bound to 127.0.0.1 on a free port, persisting every write (`appendonly yes`,
/// `appendfsync always`) in a temporary directory, so a restart keeps the data. Stopped on drop.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl RedisServer {
    /// Starts one; fails with a message saying what is missing.
    pub fn start() -> Result<RedisServer, String> {
        let s = RedisServer {
            port: free_port()?,
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            child: Mutex::new(None),
        };
        s.spawn()?;
        Ok(s)
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Its data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
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
        wait_for_port(self.port, "private redis-server")
    }

    /// Shuts the server down cleanly (it persists on the way out) and waits for it to exit.
    pub fn stop(&self) {
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

    /// Stops it, stays down for `down`, and starts it again on the same port and data.
    pub fn restart(&self, down: Duration) -> Result<(), String> {
        self.stop();
        std::thread::sleep(down);
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
