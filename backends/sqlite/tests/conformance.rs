//! The conformance suite against the embedded SQLite store, one named test per scenario
//! (`cargo test -p stevedore-sqlite --test conformance -- --list`).
//!
//! Every [`Backend::connect`] opens the same file anew (its own writer thread and read-only
//! connection), as another process would: competing consumers, crash recovery and the runtime
//! scenarios all run across separately opened stores. The file lives in a temporary directory
//! that goes away with the run.

use std::sync::Arc;
use stevedore_conformance::{async_trait, Backend};
use stevedore_core::{Broker, BrokerError};
use stevedore_sqlite::{SqliteBroker, SqliteConfig};

struct SqliteBackend {
    dir: tempfile::TempDir,
}

impl SqliteBackend {
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("conformance.db")
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
        Ok(Arc::new(
            SqliteBroker::open(SqliteConfig::new(self.path())).await?,
        ))
    }

    async fn store(&self) -> Result<Arc<dyn stevedore_core::store::Store>, String> {
        // The broker's own: the stevedore_kv table in the same file.
        let store = stevedore_sqlite::SqliteStore::open(self.path())
            .await
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(store))
    }

    async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String> {
        // What `sqlite3 conformance.db "INSERT INTO stevedore_jobs (queue, body) VALUES (...)"`
        // does: no headers, no run_at, no id of ours.
        let path = self.path();
        let (queue, body) = (queue.to_string(), body.to_vec());
        tokio::task::spawn_blocking(move || {
            let c = rusqlite::Connection::open(&path).map_err(|e| e.to_string())?;
            c.busy_timeout(std::time::Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            c.execute(
                "INSERT INTO stevedore_jobs (queue, body) VALUES (?1, ?2)",
                rusqlite::params![queue, body],
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// There is no server; what can die is a process holding the file. A `sqlite3` shell opens it,
    /// takes the write lock in the middle of a transaction (a row inserted, not committed), and
    /// is killed with SIGKILL half a second later. Meanwhile the suite's handles wait on the lock
    /// (busy timeout) and then carry on; the dead writer's row must never show.
    async fn restart(&self) -> Result<(), String> {
        let path = self.path();
        tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            let mut shell = std::process::Command::new("sqlite3")
                .arg(&path)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("no sqlite3 shell to hold the file ({e}): install sqlite3"))?;
            let stdin = shell.stdin.as_mut().ok_or("sqlite3 stdin")?;
            writeln!(
                stdin,
                ".timeout 5000\nBEGIN IMMEDIATE;\n\
                 INSERT INTO stevedore_jobs (queue, body) VALUES ('conformance-dead-writer', 'never committed');"
            )
            .map_err(|e| e.to_string())?;
            stdin.flush().map_err(|e| e.to_string())?;
            std::thread::sleep(std::time::Duration::from_millis(500));
            shell.kill().map_err(|e| e.to_string())?;
            shell.wait().map_err(|e| e.to_string())?;
            let c = rusqlite::Connection::open(&path).map_err(|e| e.to_string())?;
            let ghosts: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM stevedore_jobs WHERE queue = 'conformance-dead-writer'",
                    [],
                    |r| r.get(0),
                )
                .map_err(|e| e.to_string())?;
            if ghosts != 0 {
                return Err("the killed writer's uncommitted row is in the store".into());
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

mod sqlite {
    stevedore_conformance::conformance_tests! {
        backend: || std::sync::Arc::new(super::SqliteBackend {
            dir: tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}")),
        }),
    }
}
