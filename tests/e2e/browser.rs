//! The dashboard in a real browser: Debian's Chromium, headless, driven by playwright-core
//! (`tests/browser/dashboard.mjs`) against the real worker binary on the embedded SQLite store.

use super::*;

/// The browser script's folder.
fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/browser")
}

/// Node.js, playwright-core (installed here from the lock file when missing) and Chromium, or a
/// panic that says how to get them.
fn browser_tools() -> PathBuf {
    let dir = browser_dir();
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "Chromium not found at {chromium}: install Debian's chromium package \
         (`apt-get install chromium`; `bash .ci/run` does) or set CHROMIUM to its path"
    );
    if !dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        let ok = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "`npm ci --prefix tests/browser` failed: the browser test needs Node.js, npm and \
             playwright-core from the npm registry"
        );
    }
    dir
}

/// Runs the browser script in `mode`; panics with its report unless it passes.
fn drive(dir: &Path, mode: &str, url: &str, env: &[(&str, &Path)]) {
    let out = Command::new("node")
        .arg(dir.join("dashboard.mjs"))
        .arg(mode)
        .env("DASH_URL", url)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .output()
        .expect("run node (Node.js is needed for the browser test)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("\"ok\":true"),
        "the browser found a problem ({mode}):\n{stderr}\n{stdout}"
    );
}

/// An operator's session: the overview shows a queue and its dead letters; five jobs enqueued
/// with the form are seen running and counted without a reload; dead letters are filtered by
/// job and by error text; one is replayed (after a confirmation) and runs; one is inspected.
/// Then the `dashboard` command, read-only, shows no action and refuses a post. No script error
/// or CSP violation on any page.
#[test]
fn dashboard_in_a_real_browser() {
    let _serial = serial();
    let tools = browser_tools();
    let dir = tempfile::tempdir().expect("temp dir");
    let fail = dir.path().join("fail.flag");
    std::fs::write(&fail, "").expect("fail flag");
    let config = "[worker]\npoll_wait = \"100ms\"\n\n[autoscale]\ninterval = \"250ms\"\n\n\
                  [retry]\nmax_attempts = 1\n\n[queues.default]\nconcurrency = 4\n";
    let run = start_in(
        dir.path(),
        "",
        config,
        0,
        0,
        &[("E2E_FAIL_FILE", fail.to_str().expect("utf-8 path"))],
    );
    let port = run.port;
    wait_until("the worker is ready", Duration::from_secs(30), || {
        get_status(port, "/readyz") == Some(200)
    });
    // Three dead letters: a job no handler serves, a payload that does not decode, and a job
    // that fails while the flag file exists.
    let cfg = dir.path().join("worker.toml");
    for args in [
        &["enqueue", "ghost", "{\"who\":\"ghost\"}", "--force"][..],
        &["enqueue", "work", "{\"bad\":1}"],
        &[
            "enqueue",
            "work",
            "{\"n\":900,\"sleep_ms\":0,\"fail\":true}",
        ],
    ] {
        let (code, _, err) = cli_in(dir.path(), &cfg, args, "");
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
    wait_until("three dead letters", Duration::from_secs(20), || {
        get(port, "/ui/queues/default/dead")
            .1
            .contains("data-count=\"3\"")
    });

    let shot = std::env::var_os("DASHBOARD_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("overview.png"));
    drive(
        &tools,
        "full",
        &format!("http://127.0.0.1:{port}"),
        &[("FAIL_FILE", &fail), ("SCREENSHOT", &shot)],
    );
    let log = stop_cleanly(run);
    let lines = lines(&dir.path().join("out.txt"));
    let done = tally(&lines, "done");
    for n in 500..505 {
        assert_eq!(done.get(&n), Some(&1), "form job {n} ran once: {lines:?}");
    }
    assert_eq!(done.get(&900), Some(&1), "the replayed job ran: {lines:?}");
    assert_eq!(
        tally(&lines, "start").get(&900),
        Some(&2),
        "once failing, once replayed"
    );
    assert!(log.contains("dashboard: dead letters replayed"), "{log}");
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "a screenshot of the overview"
    );

    // The dashboard alone, read-only, on the same store.
    let port = free_port();
    let child = Command::new(WORKER)
        .args(["dashboard", "--config"])
        .arg(&cfg)
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .env("STEVEDORE_HTTP__READ_ONLY", "true")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("dashboard.txt")).expect("log file"))
        .spawn()
        .expect("start the dashboard command");
    let mut child = Reaped(child);
    wait_until("the dashboard serves", Duration::from_secs(30), || {
        get_status(port, "/healthz") == Some(200)
    });
    drive(
        &tools,
        "read-only",
        &format!("http://127.0.0.1:{port}"),
        &[],
    );
    signal(&child, "-TERM");
    wait_until("the dashboard exits", Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    let status = child.wait().expect("status");
    let log = std::fs::read_to_string(dir.path().join("dashboard.txt")).unwrap_or_default();
    assert!(status.success(), "{log}");
    assert!(log.contains("no jobs run in this process"), "{log}");
    assert_eq!(
        dead_letters_by_cli(dir.path(), &cfg),
        2,
        "read-only changed nothing"
    );
}

/// How many dead letters `default` holds, by the CLI.
fn dead_letters_by_cli(dir: &Path, cfg: &Path) -> usize {
    let (code, out, err) = cli_in(dir, cfg, &["dlq", "list", "--json"], "");
    assert_eq!(code, Some(0), "{err}");
    out.lines().filter(|l| l.starts_with('{')).count()
}
