//! The dashboard over real HTTP on loopback, on the memory broker: what each page shows, what each
//! action changes on the broker, and what is refused (read-only, token, CSRF).

use super::*;
use crate::dlq::dead_letter_copy;
use crate::http::{serve, HttpState};
use std::net::SocketAddr;
use stevedore_core::{Envelope, MemoryBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const TOKEN: &str = "0123456789abcdef-token";

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One request over a fresh connection.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if method == "POST" {
        req.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    conn.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .expect("read");
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// The CSRF token a page's forms carry.
fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    page[at..at + 32].to_string()
}

struct Dash {
    addr: SocketAddr,
    broker: Arc<dyn Broker>,
    _stop: watch::Sender<bool>,
}

async fn dashboard(http: &str) -> Dash {
    let toml = format!(
        "[queues.emails]\n[queues.default]\n[queues.urgent]\nweights = {{ high = 3, normal = 1 }}\n[http]\n{http}\n"
    );
    let config = Arc::new(crate::config::from_toml_str(&toml, None).expect("config"));
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let stats = Stats::new();
    let hints = Hints::new();
    let ui = Ui::new(UiParts {
        broker: broker.clone(),
        config,
        jobs: vec!["send".into(), "resize".into()],
        stats: stats.clone(),
        hints: hints.clone(),
        worker_id: "w-1".into(),
        notices: vec!["delay: native".into()],
        runs_jobs: true,
        store: None,
    });
    let (addr, stop) = serve_ui(ui, stats, hints).await;
    Dash {
        addr,
        broker,
        _stop: stop,
    }
}

/// Serves `ui` (and the endpoints beside it) on a free loopback port until the sender drops.
async fn serve_ui(
    ui: Arc<Ui>,
    stats: Arc<Stats>,
    hints: Arc<Hints>,
) -> (SocketAddr, watch::Sender<bool>) {
    let state = HttpState {
        stats,
        hints,
        prometheus: None,
        worker_id: "w-1".into(),
        ui: Some(ui),
        store: None,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, rx) = watch::channel(false);
    tokio::spawn(serve(listener, state, rx));
    (addr, stop)
}

/// Dead letters of `emails`: two `send` jobs that timed out, one `resize` that failed to decode.
async fn seed(b: &Arc<dyn Broker>) -> Vec<String> {
    let mut ids = Vec::new();
    for (job, err) in [
        ("send", "smtp timeout (gave up)"),
        ("send", "SMTP TIMEOUT again"),
        ("resize", "invalid payload: missing field `width`"),
    ] {
        let env = Envelope::new(job, &br#"{"to":"a@b.c"}"#[..]);
        ids.push(env.id.clone());
        let dl = dead_letter_copy(&env, "emails", 3, err, "w-1");
        b.publish(&names::dead_letter("emails"), vec![dl])
            .await
            .expect("publish");
    }
    ids
}

async fn ready(b: &Arc<dyn Broker>, physical: &str) -> u64 {
    b.depth(physical).await.expect("depth").ready
}

#[tokio::test]
async fn pages_show_queues_levels_and_dead_letters_with_safe_headers() {
    let d = dashboard("").await;
    seed(&d.broker).await;
    d.broker
        .publish("emails", vec![Envelope::new("send", "{}")])
        .await
        .expect("publish");
    let r = request(d.addr, "GET", "/ui", &[], "").await;
    assert_eq!(r.status, 200);
    let csp = r.header("content-security-policy").expect("CSP");
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(r.header("x-frame-options").as_deref(), Some("DENY"));
    assert!(
        r.body.contains(r#"<tr class="queue" data-queue="emails">"#),
        "{}",
        r.body
    );
    assert!(r
        .body
        .contains(r#"data-queue="emails" data-level="normal""#));
    assert!(
        r.body.contains(r#"<td data-col="ready">1</td>"#),
        "one ready job"
    );
    assert!(r.body.contains(">3</a>"), "three dead letters, linked");
    assert!(
        r.body.contains("hx-trigger=\"every 2s\""),
        "live part polls"
    );

    for (path, kind, says) in [
        ("/ui/assets/htmx.min.js", "text/javascript", "htmx"),
        ("/ui/assets/app.css", "text/css", "--accent"),
    ] {
        let r = request(d.addr, "GET", path, &[], "").await;
        assert_eq!(r.status, 200);
        assert!(r
            .header("content-type")
            .unwrap_or_default()
            .starts_with(kind));
        assert!(r.body.contains(says));
    }
    let r = request(d.addr, "GET", "/", &[], "").await;
    assert_eq!(
        (r.status, r.header("location").as_deref()),
        (303, Some("/ui"))
    );

    let r = request(d.addr, "GET", "/ui/queues/emails", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("3 dead letter(s)"), "{}", r.body);
    let r = request(d.addr, "GET", "/ui/queues/nope", &[], "").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("No queue &quot;nope&quot;"), "{}", r.body);

    let r = request(d.addr, "GET", "/ui/worker", &[], "").await;
    assert!(r.body.contains("0 job(s) running now"));
    assert!(r.body.contains("delay: native"), "start-up notices");
    assert!(r
        .body
        .contains("# effective configuration (secrets redacted)"));
}

#[tokio::test]
async fn dead_letters_filter_inspect_replay_and_purge() {
    let d = dashboard("").await;
    let ids = seed(&d.broker).await;
    let r = request(
        d.addr,
        "GET",
        "/ui/queues/emails/dead?job=send&error=timeout",
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains(r#"data-count="2""#), "{}", r.body);
    assert!(r.body.contains(&ids[0]) && r.body.contains(&ids[1]) && !r.body.contains(&ids[2]));
    let r = request(
        d.addr,
        "GET",
        "/ui/queues/emails/dead?error=payload",
        &[],
        "",
    )
    .await;
    assert!(r.body.contains(r#"data-count="1""#));

    let one = request(
        d.addr,
        "GET",
        &format!("/ui/queues/emails/dead/{}", ids[2]),
        &[],
        "",
    )
    .await;
    assert_eq!(one.status, 200);
    assert!(one.body.contains("missing field `width`"));
    assert!(
        one.body.contains("&quot;to&quot;: &quot;a@b.c&quot;"),
        "pretty JSON payload"
    );
    let csrf = csrf_of(&one.body);

    // Replay one: back on its queue as a fresh job, gone from the dead letters.
    let body = format!("csrf={csrf}&action=replay&scope=one&id={}", ids[2]);
    let r = request(d.addr, "POST", "/ui/queues/emails/dead", &[], &body).await;
    assert_eq!(r.status, 303, "{}", r.body);
    let to = r.header("location").expect("redirect");
    assert!(to.ends_with("done=replayed&n=1"), "{to}");
    assert_eq!(ready(&d.broker, "emails").await, 1);
    assert_eq!(ready(&d.broker, "emails__dlq").await, 2);

    // Purge the filtered set: both `send` timeouts.
    let body = format!("csrf={csrf}&action=purge&scope=filtered&job=send&error=TIMEOUT");
    let r = request(d.addr, "POST", "/ui/queues/emails/dead", &[], &body).await;
    assert_eq!(r.status, 303);
    assert!(r
        .header("location")
        .unwrap_or_default()
        .contains("done=purged&n=2"));
    assert_eq!(ready(&d.broker, "emails__dlq").await, 0);
    let r = request(d.addr, "GET", &to, &[], "").await;
    assert!(
        r.body.contains("Replayed 1 dead letter(s) to emails."),
        "flash shown"
    );
    // Only the codes are worded: a crafted link shows no text of its own.
    let crafted = "/ui/queues/emails/dead?done=Enter+your+token+at+evil";
    let r = request(d.addr, "GET", crafted, &[], "").await;
    assert!(!r.body.contains("evil") && !r.body.contains("id=\"flash\""));
}

#[tokio::test]
async fn enqueue_form_checks_like_the_cli_and_enqueues() {
    let d = dashboard("").await;
    let page = request(d.addr, "GET", "/ui/enqueue", &[], "").await;
    let csrf = csrf_of(&page.body);
    for (form, says) in [
        (
            "job=ghost&queue=emails&payload=%7B%7D&priority=normal",
            "No handler is registered for job &quot;ghost&quot;",
        ),
        (
            "job=send&queue=nope&payload=%7B%7D&priority=normal",
            "No queue &quot;nope&quot;",
        ),
        (
            "job=send&queue=emails&payload=%7Bnot&priority=normal",
            "not valid JSON",
        ),
        (
            "job=send&queue=emails&payload=%7B%7D&priority=normal&delay=soon",
            "not a duration",
        ),
        (
            "job=send&queue=emails&payload=%7B%7D&priority=normal&delay=300000000000y",
            "longer than the longest allowed",
        ),
        (
            "job=send&queue=emails&payload=%7B%7D&priority=normal&delay=200y",
            "longer than the longest allowed",
        ),
        (
            "job=send&queue=emails&payload=%7B%7D&priority=high",
            "serves only normal",
        ),
    ] {
        let r = request(
            d.addr,
            "POST",
            "/ui/enqueue",
            &[],
            &format!("csrf={csrf}&{form}"),
        )
        .await;
        assert_eq!(r.status, 422, "{form}");
        assert!(r.body.contains(says), "{form}: {}", r.body);
    }
    assert_eq!(
        ready(&d.broker, "emails").await,
        0,
        "nothing enqueued by a refused form"
    );
    let form =
        format!("csrf={csrf}&job=send&queue=urgent&payload=%7B%22to%22%3A1%7D&priority=high");
    let r = request(d.addr, "POST", "/ui/enqueue", &[], &form).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("Enqueued send on urgent as "));
    assert_eq!(ready(&d.broker, "urgent__high").await, 1);
}

#[tokio::test]
async fn read_only_hides_actions_and_refuses_them() {
    let d = dashboard("read_only = true").await;
    let ids = seed(&d.broker).await;
    let r = request(d.addr, "GET", "/ui/queues/emails/dead", &[], "").await;
    assert!(r.body.contains(r#"data-access="read-only""#));
    assert!(!r.body.contains("data-action="), "no action buttons");
    assert!(
        !r.body.contains("method=\"post\""),
        "no forms that change anything"
    );
    let r = request(d.addr, "GET", "/ui/enqueue", &[], "").await;
    assert!(r.body.contains("read-only: it cannot enqueue"));
    let body = format!("csrf=x&action=purge&scope=one&id={}", ids[0]);
    let r = request(d.addr, "POST", "/ui/queues/emails/dead", &[], &body).await;
    assert_eq!(r.status, 403);
    assert!(r.body.contains("read-only"));
    let r = request(
        d.addr,
        "POST",
        "/ui/enqueue",
        &[],
        "csrf=x&job=send&queue=emails&payload=%7B%7D",
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(ready(&d.broker, "emails__dlq").await, 3);
    assert_eq!(ready(&d.broker, "emails").await, 0);
}

#[tokio::test]
async fn a_token_guards_actions_and_csrf_guards_forms() {
    let d = dashboard(&format!("token = \"{TOKEN}\"")).await;
    let ids = seed(&d.broker).await;
    let page = request(d.addr, "GET", "/ui/queues/emails/dead", &[], "").await;
    assert!(page.body.contains(r#"data-access="sign-in""#));
    assert!(
        !page.body.contains("data-action="),
        "no buttons before signing in"
    );
    let login = request(
        d.addr,
        "GET",
        "/ui/login?next=/ui/queues/emails/dead",
        &[],
        "",
    )
    .await;
    let csrf = csrf_of(&login.body);
    let purge = format!("csrf={csrf}&action=purge&scope=one&id={}", ids[0]);

    let r = request(d.addr, "POST", "/ui/queues/emails/dead", &[], &purge).await;
    assert_eq!(r.status, 403, "no token");
    assert!(r.body.contains("sign in first"));
    let wrong = format!("csrf={csrf}&token=wrong-token-0000000&next=/ui");
    let r = request(d.addr, "POST", "/ui/login", &[], &wrong).await;
    assert_eq!(r.status, 403);
    assert!(r.header("set-cookie").is_none());

    // Only a dashboard path is a place to go after signing in.
    let right = format!("csrf={csrf}&token={TOKEN}&next=https://evil.example/");
    let r = request(d.addr, "POST", "/ui/login", &[], &right).await;
    assert_eq!(
        (r.status, r.header("location").as_deref()),
        (303, Some("/ui"))
    );
    let cookie = r.header("set-cookie").expect("cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap_or_default().to_string();
    let signed = [("Cookie", cookie.as_str())];

    let page = request(d.addr, "GET", "/ui/queues/emails/dead", &signed, "").await;
    assert!(page.body.contains(r#"data-access="signed-in""#));
    assert!(page.body.contains(r#"data-action="purge""#));

    // CSRF: a missing or wrong token, or a post from another site, changes nothing.
    let no_csrf = format!("action=purge&scope=one&id={}", ids[0]);
    let r = request(d.addr, "POST", "/ui/queues/emails/dead", &signed, &no_csrf).await;
    assert_eq!(r.status, 403);
    assert!(r.body.contains("CSRF"));
    let cross = [
        ("Cookie", cookie.as_str()),
        ("Origin", "http://evil.example"),
    ];
    let r = request(d.addr, "POST", "/ui/queues/emails/dead", &cross, &purge).await;
    assert_eq!(r.status, 403);
    let cross = [
        ("Cookie", cookie.as_str()),
        ("Sec-Fetch-Site", "cross-site"),
    ];
    let r = request(d.addr, "POST", "/ui/queues/emails/dead", &cross, &purge).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        ready(&d.broker, "emails__dlq").await,
        3,
        "nothing purged yet"
    );

    let origin = format!("http://{}", d.addr);
    let ok = [("Cookie", cookie.as_str()), ("Origin", origin.as_str())];
    let r = request(d.addr, "POST", "/ui/queues/emails/dead", &ok, &purge).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(ready(&d.broker, "emails__dlq").await, 2);
}

#[test]
fn running_jobs_show_on_the_worker_page() {
    let stats = Stats::new();
    let q = stats.queue("emails");
    let _t = q.track("send", "job-42", 2, std::time::Instant::now());
    let html = view::worker_live(&Ui::new(UiParts {
        broker: Arc::new(MemoryBroker::new()),
        config: Arc::new(Config::default()),
        jobs: vec![],
        stats: stats.clone(),
        hints: Hints::new(),
        worker_id: "w".into(),
        notices: vec![],
        runs_jobs: true,
        store: None,
    }))
    .into_string();
    assert!(html.contains("1 job(s) running now"));
    assert!(html.contains(r#"<tr data-id="job-42"><td class="l">emails</td><td class="l">send</td><td class="l">job-42</td><td>2</td>"#), "{html}");
}

#[tokio::test]
async fn a_host_name_not_allowed_is_refused() {
    assert!(!host_allowed("evil.example:9464", &[]));
    assert!(!host_allowed("localhost.evil.example", &[]));
    assert!(host_allowed("127.0.0.1:9464", &[]));
    assert!(host_allowed("[::1]:9464", &[]));
    assert!(host_allowed("localhost:9464", &[]));
    assert!(host_allowed("LocalHost", &[]));
    assert!(host_allowed("10.1.2.3", &[]));
    assert!(host_allowed("jobs.internal:80", &["Jobs.Internal".into()]));
    assert!(host_allowed("anything", &["*".into()]));

    // DNS rebinding: a page on evil.example whose name now points here asks for /ui.
    let d = dashboard("allowed_hosts = [\"jobs.internal\"]").await;
    let r = raw_host(d.addr, "jobs.internal:9464").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = raw_host(d.addr, "evil.example").await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(r.contains("http.allowed_hosts"), "{r}");
}

/// `GET /ui` with exactly the given `Host`.
async fn raw_host(addr: SocketAddr, host: &str) -> String {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET /ui HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.expect("read");
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn helpers() {
    assert_eq!(enc("a b/é"), "a%20b%2F%C3%A9");
    assert_eq!(next_path("/ui/queues/x"), "/ui/queues/x");
    assert_eq!(next_path("//evil"), "/ui");
    assert_eq!(next_path("https://evil/ui"), "/ui");
    assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"ab", b"abc"));
    assert_eq!(view::age(Duration::from_millis(1500)), "1.5s");
    assert_eq!(view::age(Duration::from_secs(200)), "3m 20s");
    assert_eq!(view::age(Duration::from_secs(7500)), "2h 5m");
    let far = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(99_999_999_999_999);
    assert!(
        view::time(far).ends_with("ms after 1970"),
        "no panic past the year 9999"
    );
    let bin = view::payload(&[0, 255, 1]).into_string();
    assert!(bin.contains("(binary; hex)") && bin.contains("00 ff 01"));
    let mut h = HeaderMap::new();
    h.insert(
        header::COOKIE,
        "a=1; stevedore_ui=t0k; b=2".parse().expect("header"),
    );
    assert_eq!(cookie(&h, COOKIE), Some("t0k"));
}

/// The job page finds a status by id, says when there is none, and without a store says so.
#[tokio::test]
async fn the_job_page_shows_a_status_by_id() {
    use stevedore_core::store::{MemoryStore, Store};
    let toml = "[queues.emails]\ntrack_status = true\n[queues.default]\n";
    let config = Arc::new(crate::config::from_toml_str(toml, None).expect("config"));
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let client = crate::Client::new(broker.clone())
        .with_limits_from(&config)
        .with_store(store.clone());
    let id = client
        .enqueue("send", &1)
        .queue("emails")
        .send()
        .await
        .expect("enqueue");
    let parts = |store| UiParts {
        broker: broker.clone(),
        config: config.clone(),
        jobs: vec!["send".into()],
        stats: Stats::new(),
        hints: Hints::new(),
        worker_id: "w".into(),
        notices: vec![],
        runs_jobs: true,
        store,
    };
    let (addr, _stop) = serve_ui(
        Ui::new(parts(Some(store.clone()))),
        Stats::new(),
        Hints::new(),
    )
    .await;
    let empty = request(addr, "GET", "/ui/jobs", &[], "").await;
    assert_eq!(empty.status, 200);
    assert!(
        empty.body.contains("Queues that keep job status: emails."),
        "{}",
        empty.body
    );
    let found = request(addr, "GET", &format!("/ui/jobs?id={id}"), &[], "").await;
    assert_eq!(found.status, 200);
    assert!(
        found.body.contains(r#"<dd data-col="state">queued</dd>"#) && found.body.contains(&id),
        "{}",
        found.body
    );
    let missing = request(addr, "GET", "/ui/jobs?id=nope", &[], "").await;
    assert_eq!(missing.status, 404);
    assert!(missing.body.contains("No status recorded for nope"));
    let (addr, _stop2) = serve_ui(Ui::new(parts(None)), Stats::new(), Hints::new()).await;
    let no_store = request(addr, "GET", &format!("/ui/jobs?id={id}"), &[], "").await;
    assert!(
        no_store.body.contains("no state store"),
        "{}",
        no_store.body
    );
}
