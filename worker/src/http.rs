//! The worker's HTTP endpoints: Prometheus metrics, liveness, readiness, autoscale hints and stats.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition; 404 when metrics are disabled |
//! | `GET /healthz` | `200 ok` while the process serves HTTP (liveness) |
//! | `GET /readyz` | `200 ready` when [`Stats::is_ready`], else `503 not ready` (starting or draining) |
//! | `GET /scale` | JSON array of every queue's [`Hint`] |
//! | `GET /scale/{queue}` | one [`Hint`] as a flat JSON object (KEDA `metrics-api`: `valueLocation: desired_workers`); 404 `{"error": ...}` for a queue without a hint |
//! | `GET /stats` | JSON `{"worker_id", "ready", "queues": {name: QueueSnapshot}}` |
//! | `GET /ui` ... | the web dashboard (`http.ui`, on by default; see `ui`) |
//!
//! Other paths answer 404, other methods 405.

use crate::autoscale::{wait_for_shutdown, Hint, Hints};
use crate::stats::{QueueSnapshot, Stats};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the endpoints read. Cheap to clone (all shared).
#[derive(Clone)]
pub(crate) struct HttpState {
    /// Live counters and the readiness flag.
    pub stats: Arc<Stats>,
    /// Latest autoscale hints.
    pub hints: Arc<Hints>,
    /// Renders `/metrics`; `None` when metrics are disabled (the route then answers 404).
    pub prometheus: Option<PrometheusHandle>,
    /// This worker's id, reported by `/stats`.
    pub worker_id: String,
    /// The dashboard, when `http.ui` is on.
    pub ui: Option<Arc<crate::ui::Ui>>,
    /// The state store, for `GET /jobs/{id}` (job status).
    pub store: Option<Arc<dyn stevedore_core::store::Store>>,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("worker_id", &self.worker_id)
            .field("ready", &self.stats.is_ready())
            .field("prometheus", &self.prometheus.is_some())
            .finish_non_exhaustive()
    }
}

/// The body of `GET /stats`.
#[derive(serde::Serialize)]
struct StatsBody {
    worker_id: String,
    ready: bool,
    queues: BTreeMap<String, QueueSnapshot>,
}

/// The router of every endpoint (what [`serve`] serves); for embedding in another axum app.
pub(crate) fn router(state: HttpState) -> Router {
    let ui = state.ui.clone();
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/scale", get(scale_all))
        .route("/scale/{queue}", get(scale_one))
        .route("/stats", get(stats))
        .route("/jobs/{id}", get(job_status))
        .with_state(state);
    match ui {
        Some(ui) => api.merge(crate::ui::router(ui)),
        None => api,
    }
}

/// Serves the endpoints on `listener` (HTTP/1.1) until `shutdown` turns `true` (or its sender is
/// dropped), then stops accepting, lets requests in progress finish, and returns. Errors are those
/// of the underlying server (accept errors are retried by axum, so in practice this returns `Ok`).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "HTTP endpoints listening");
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { wait_for_shutdown(&mut shutdown).await })
        .await
}

async fn metrics(State(state): State<HttpState>) -> Response {
    match &state.prometheus {
        Some(handle) => {
            ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], handle.render()).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            "metrics are disabled in this worker's configuration\n",
        )
            .into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.stats.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn scale_all(State(state): State<HttpState>) -> Json<Vec<Hint>> {
    Json(state.hints.all())
}

async fn scale_one(State(state): State<HttpState>, Path(queue): Path<String>) -> Response {
    match state.hints.get(&queue) {
        Some(hint) => Json(hint).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "error": format!("no autoscale hint for queue {queue:?} (unknown queue, or not sampled yet)")
            })),
        )
            .into_response(),
    }
}

/// `GET /jobs/{id}`: the job's [`crate::JobStatus`] as JSON; 404 with `{"error": ...}` when
/// none is recorded (its queue does not track status, unknown id, expired, or no state store
/// here); 503 when the store does not answer.
async fn job_status(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    let error = |code: StatusCode, message: String| {
        (
            code,
            Json(serde_json::json!({ "id": id, "error": message })),
        )
            .into_response()
    };
    let Some(store) = &state.store else {
        return error(
            StatusCode::NOT_FOUND,
            "job status is not kept here: this process has no state store ([store])".into(),
        );
    };
    match crate::effects::timed(store.get(&crate::status::key(&id))).await {
        Ok(Some(bytes)) => match crate::JobStatus::decode(&bytes) {
            Some(status) => Json(status).into_response(),
            None => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the stored status is not readable".into(),
            ),
        },
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "no status recorded for this job: its queue does not track status (track_status), the id is unknown, or its status expired".into(),
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the state store did not answer: {e}"),
        ),
    }
}

async fn stats(State(state): State<HttpState>) -> Json<StatsBody> {
    Json(StatsBody {
        worker_id: state.worker_id.clone(),
        ready: state.stats.is_ready(),
        queues: state.stats.snapshot(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{prometheus_builder, JobResult};
    use std::net::SocketAddr;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// One `GET` over a fresh connection: (status, content-type, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut raw))
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
        let content_type = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-type")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        (status, content_type, body.to_string())
    }

    fn hint(queue: &str, desired: u32) -> Hint {
        Hint {
            queue: queue.into(),
            ready: 42,
            in_flight: 3,
            delayed: Some(1),
            oldest_age_seconds: Some(2.5),
            arrival_rate: 10.0,
            completion_rate: 9.5,
            desired_workers: desired,
            busy: true,
        }
    }

    struct Server {
        addr: SocketAddr,
        shutdown: watch::Sender<bool>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn start(state: HttpState) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, state, rx));
        Server {
            addr,
            shutdown,
            task,
        }
    }

    impl Server {
        async fn stop(self) {
            self.shutdown.send(true).expect("signal");
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("stops on shutdown")
                .expect("no panic")
                .expect("serve ok");
        }
    }

    fn state(prometheus: Option<PrometheusHandle>) -> HttpState {
        HttpState {
            stats: Stats::new(),
            hints: Hints::new(),
            prometheus,
            worker_id: "worker-7".into(),
            ui: None,
            store: None,
        }
    }

    /// `GET /jobs/{id}`: the status a client's enqueue recorded, 404 for an unknown id or
    /// without a store, 503 when the store fails.
    #[tokio::test]
    async fn jobs_endpoint_answers_a_status_or_says_why_not() {
        use stevedore_core::store::{MemoryStore, Store};
        let server = start(state(None)).await;
        let (code, _, body) = get(server.addr, "/jobs/abc").await;
        assert_eq!(code, 404);
        assert!(body.contains("no state store"), "{body}");
        server.stop().await;

        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let cfg = crate::config::from_toml_str("[queues.q]\ntrack_status = true\n", None)
            .expect("config");
        let client = crate::Client::new(Arc::new(stevedore_core::MemoryBroker::new()))
            .with_limits_from(&cfg)
            .with_store(store.clone());
        let id = client
            .enqueue("send", &1)
            .queue("q")
            .send()
            .await
            .expect("enqueue");
        let untracked = client
            .enqueue("send", &1)
            .queue("other")
            .send()
            .await
            .expect("enqueue");
        let mut st = state(None);
        st.store = Some(store.clone());
        let server = start(st).await;
        let (code, content_type, body) = get(server.addr, &format!("/jobs/{id}")).await;
        assert_eq!((code, content_type.as_str()), (200, "application/json"));
        let status: crate::JobStatus = serde_json::from_str(&body).expect("a status");
        assert_eq!(
            (
                status.id.as_str(),
                status.state,
                status.attempt,
                status.queue.as_str()
            ),
            (id.as_str(), crate::JobState::Queued, 0, "q")
        );
        assert_eq!(client.status(&id).await.expect("status"), Some(status));
        let (code, _, body) = get(server.addr, &format!("/jobs/{untracked}")).await;
        assert_eq!(code, 404, "a queue without track_status keeps none: {body}");
        assert_eq!(client.status(&untracked).await.expect("status"), None);
        server.stop().await;
    }

    #[tokio::test]
    async fn health_and_readiness() {
        let st = state(None);
        let stats = Arc::clone(&st.stats);
        let server = start(st).await;
        assert_eq!(
            get(server.addr, "/healthz").await,
            (200, "text/plain; charset=utf-8".into(), "ok".into())
        );
        let (status, _, body) = get(server.addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "not ready"));
        stats.set_ready(true);
        let (status, _, body) = get(server.addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ready"));
        stats.set_ready(false);
        assert_eq!(get(server.addr, "/readyz").await.0, 503, "draining");
        assert_eq!(get(server.addr, "/nope").await.0, 404);
        server.stop().await;
    }

    #[tokio::test]
    async fn metrics_renders_prometheus_text_or_404() {
        let recorder = prometheus_builder().expect("builder").build_recorder();
        let st = state(Some(recorder.handle()));
        let q = st.stats.queue("emails");
        metrics::with_local_recorder(&recorder, || {
            q.started();
            q.finished("send", JobResult::Succeeded, Duration::from_millis(5));
        });
        let server = start(st).await;
        let (status, content_type, body) = get(server.addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        assert!(
            body.contains(r#"stevedore_jobs_processed_total{queue="emails",job="send"} 1"#),
            "{body}"
        );
        server.stop().await;

        let server = start(state(None)).await;
        let (status, _, body) = get(server.addr, "/metrics").await;
        assert_eq!(status, 404);
        assert!(body.contains("metrics are disabled"), "{body}");
        server.stop().await;
    }

    #[tokio::test]
    async fn scale_lists_hints_and_serves_one_flat_object() {
        let st = state(None);
        st.hints.insert(hint("emails", 4));
        st.hints.insert(hint("reports", 1));
        let server = start(st).await;

        let (status, content_type, body) = get(server.addr, "/scale").await;
        assert_eq!(status, 200);
        assert_eq!(content_type, "application/json");
        let all: serde_json::Value = serde_json::from_str(&body).expect("json");
        let queues: Vec<_> = all
            .as_array()
            .expect("array")
            .iter()
            .map(|h| h["queue"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(queues, ["emails", "reports"]);

        let (status, _, body) = get(server.addr, "/scale/emails").await;
        assert_eq!(status, 200);
        let one: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            one["desired_workers"], 4,
            "top-level number for KEDA valueLocation"
        );
        assert_eq!(one["ready"], 42);
        assert_eq!(one["in_flight"], 3);
        assert_eq!(one["delayed"], 1);
        assert_eq!(one["oldest_age_seconds"], 2.5);
        assert_eq!(one["arrival_rate"], 10.0);
        assert_eq!(one["completion_rate"], 9.5);
        assert_eq!(one["busy"], true);
        assert_eq!(one["queue"], "emails");

        let (status, content_type, body) = get(server.addr, "/scale/missing").await;
        assert_eq!(status, 404);
        assert_eq!(content_type, "application/json");
        let err: serde_json::Value = serde_json::from_str(&body).expect("json error");
        assert!(
            err["error"]
                .as_str()
                .is_some_and(|e| e.contains("\"missing\"")),
            "{body}"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn stats_reports_worker_readiness_and_queues() {
        let st = state(None);
        let q = st.stats.queue("emails");
        q.started();
        q.started();
        q.finished("send", JobResult::Retried, Duration::from_millis(1));
        st.stats.set_ready(true);
        let server = start(st).await;
        let (status, _, body) = get(server.addr, "/stats").await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["worker_id"], "worker-7");
        assert_eq!(v["ready"], true);
        assert_eq!(v["queues"]["emails"]["in_flight"], 1);
        assert_eq!(v["queues"]["emails"]["failed"], 1);
        assert_eq!(v["queues"]["emails"]["retried"], 1);
        assert_eq!(v["queues"]["emails"]["processed"], 0);
        server.stop().await;
    }

    #[tokio::test]
    async fn shuts_down_with_an_idle_keep_alive_connection_open() {
        let server = start(state(None)).await;
        let mut conn = TcpStream::connect(server.addr).await.expect("connect");
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 512];
        let n = conn.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        server.stop().await;
        let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
            .await
            .expect("server closed the connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "connection closed after shutdown");
    }

    #[tokio::test]
    async fn stops_when_the_shutdown_sender_is_dropped() {
        let server = start(state(None)).await;
        drop(server.shutdown);
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("serve ok");
    }
}
