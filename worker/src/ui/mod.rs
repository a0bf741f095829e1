//! The web dashboard, served under `/ui` by the worker's HTTP server (and by the `dashboard`
//! command, which runs no jobs).
//!
//! Server-rendered HTML (maud) with htmx for live parts and forms; htmx and the stylesheet are
//! embedded in the binary, and nothing is fetched from elsewhere. Pages:
//!
//! | route | page |
//! |---|---|
//! | `GET /ui` | every queue and level: ready, in flight, delayed, dead, oldest age, rates, autoscale hint, busy, a chart of the last samples |
//! | `GET /ui/queues/{q}` | one queue by level, this worker's counters, its newest dead letters |
//! | `GET /ui/queues/{q}/dead?job=&error=` | dead letters, filtered by job name (exact) and error text (any case) |
//! | `GET /ui/queues/{q}/dead/{id}` | one dead letter: payload, headers, error, attempts, times, origin |
//! | `POST /ui/queues/{q}/dead` | replay or purge one, or every one matching a filter (all with no filter) |
//! | `GET /ui/worker` | this worker: jobs running now (age, attempt), start-up notices, the config with secrets redacted |
//! | `GET,POST /ui/enqueue` | a form that enqueues a job |
//! | `GET,POST /ui/login`, `POST /ui/logout` | sign in with `http.token` |
//!
//! Safety: the server binds where `http.bind` says (loopback by default). `http.read_only = true`
//! hides every action and makes their endpoints answer 403. With `http.token` set, actions need
//! the token (kept, once entered, in an HttpOnly, SameSite=Strict cookie scoped to `/ui`). Every
//! form carries a per-process CSRF token, and a POST whose `Origin` or `Sec-Fetch-Site` names
//! another site is refused. Responses forbid framing and scripts from anywhere but `/ui/assets`.

use crate::autoscale::Hints;
use crate::config::Config;
use crate::dlq::{self, DeadLetter, Select};
use crate::stats::Stats;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::Markup;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::{names, Broker, Depth, Priority};

mod view;

/// Dead letters read per listing, filter or filtered action (the oldest first where the broker
/// keeps order); the page says when there may be more.
const SCAN: usize = 1_000;
/// Most dead letters one "all" action touches.
const ALL: usize = 100_000;
/// The sign-in cookie.
const COOKIE: &str = "stevedore_ui";

const HTMX: &str = include_str!("assets/htmx.min.js");
const CSS: &str = include_str!("assets/app.css");

/// What the dashboard reads and acts on. Shared by every request.
pub(crate) struct Ui {
    broker: Arc<dyn Broker>,
    config: Arc<Config>,
    jobs: Vec<String>,
    stats: Arc<Stats>,
    hints: Arc<Hints>,
    worker_id: String,
    notices: Vec<String>,
    /// `false` for the `dashboard` command: no jobs run here, so there is no "this worker".
    runs_jobs: bool,
    /// The per-process CSRF token every form carries.
    csrf: String,
    /// The state store, for the job status page.
    store: Option<Arc<dyn stevedore_core::store::Store>>,
}

/// How to build a [`Ui`].
pub(crate) struct UiParts {
    pub broker: Arc<dyn Broker>,
    pub config: Arc<Config>,
    pub jobs: Vec<String>,
    pub stats: Arc<Stats>,
    pub hints: Arc<Hints>,
    pub worker_id: String,
    pub notices: Vec<String>,
    pub runs_jobs: bool,
    pub store: Option<Arc<dyn stevedore_core::store::Store>>,
}

impl Ui {
    pub(crate) fn new(p: UiParts) -> Arc<Ui> {
        let bytes: [u8; 16] = rand::random();
        let csrf = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Arc::new(Ui {
            broker: p.broker,
            config: p.config,
            jobs: p.jobs,
            stats: p.stats,
            hints: p.hints,
            worker_id: p.worker_id,
            notices: p.notices,
            runs_jobs: p.runs_jobs,
            csrf,
            store: p.store,
        })
    }

    fn queue_names(&self) -> Vec<String> {
        self.config.effective_queues().into_keys().collect()
    }

    fn access(&self, headers: &HeaderMap) -> Access {
        if self.config.http.read_only {
            return Access::ReadOnly;
        }
        match &self.config.http.token {
            None => Access::Open,
            Some(token) => match cookie(headers, COOKIE) {
                Some(given) if ct_eq(given.as_bytes(), token.as_bytes()) => Access::SignedIn,
                _ => Access::SignInFirst,
            },
        }
    }

    /// Refuses an action that is not allowed, not signed in, or not from this dashboard's own form.
    fn check_action(&self, headers: &HeaderMap, csrf: &str) -> Result<Access, Refusal> {
        let access = self.access(headers);
        match access {
            Access::ReadOnly => Err(Box::new(self.refuse(
                headers,
                "This dashboard is read-only (http.read_only = true): nothing can be changed here.",
            ))),
            Access::SignInFirst => Err(Box::new(self.refuse(
                headers,
                "Actions need the dashboard token (http.token): sign in first.",
            ))),
            Access::Open | Access::SignedIn => {
                self.check_form(headers, csrf)?;
                Ok(access)
            }
        }
    }

    /// CSRF: the form's token, and no cross-site `Origin` or `Sec-Fetch-Site`.
    fn check_form(&self, headers: &HeaderMap, csrf: &str) -> Result<(), Refusal> {
        if !same_origin(headers) || !ct_eq(csrf.as_bytes(), self.csrf.as_bytes()) {
            return Err(Box::new(self.refuse(
                headers,
                "This form is stale or was not sent by this dashboard (CSRF check): reload the page and try again.",
            )));
        }
        Ok(())
    }

    fn refuse(&self, headers: &HeaderMap, why: &str) -> Response {
        let access = self.access(headers);
        page(
            StatusCode::FORBIDDEN,
            view::layout(self, access, "Not allowed", "", view::refused(why, access)),
        )
    }

    async fn queue_view(&self, name: &str, levels: &[Priority]) -> view::QueueView {
        let mut rows = Vec::new();
        for p in levels {
            let d = self.depth(&names::physical(name, *p)).await;
            rows.push((p.as_str(), d));
        }
        view::QueueView {
            name: name.to_string(),
            levels: rows,
            dead: self.depth(&names::dead_letter(name)).await,
            hint: self.hints.get(name),
            history: self.hints.history(name),
            counters: self.stats.snapshot().remove(name).unwrap_or_default(),
        }
    }

    async fn depth(&self, physical: &str) -> Result<Depth, String> {
        match tokio::time::timeout(Duration::from_secs(5), self.broker.depth(physical)).await {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the broker did not answer within 5s".into()),
        }
    }

    async fn all_queues(&self) -> Vec<view::QueueView> {
        let mut out = Vec::new();
        for (name, q) in self.config.effective_queues() {
            let levels = q.levels();
            out.push(self.queue_view(&name, &levels).await);
        }
        out
    }

    /// The dead letters of `queue` (up to [`SCAN`]) that match `filter`, and how many were read.
    async fn dead_letters(
        &self,
        queue: &str,
        filter: &Filter,
    ) -> Result<(Vec<DeadLetter>, usize), String> {
        let all = dlq::list(&self.broker, queue, SCAN)
            .await
            .map_err(|e| e.to_string())?;
        let read = all.len();
        Ok((
            all.into_iter().filter(|d| filter.matches(d)).collect(),
            read,
        ))
    }
}

/// What the visitor may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// `http.read_only`: look only.
    ReadOnly,
    /// A token is configured and this browser has not given it.
    SignInFirst,
    /// A token is configured and this browser gave it.
    SignedIn,
    /// No token configured: actions are open (the bind address is the boundary).
    Open,
}

impl Access {
    fn can_act(self) -> bool {
        matches!(self, Access::Open | Access::SignedIn)
    }
}

/// A dead-letter filter: job name (exact) and error text (substring, any case). Empty means any.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub(crate) struct Filter {
    #[serde(default)]
    job: String,
    #[serde(default)]
    error: String,
    /// What an action did: `replayed`, `purged` or `nothing` (a code: the page words it).
    #[serde(default)]
    done: String,
    /// How many it did that to.
    #[serde(default)]
    n: usize,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.job.is_empty() && self.error.is_empty()
    }

    fn matches(&self, d: &DeadLetter) -> bool {
        (self.job.is_empty() || d.envelope.job.as_deref().unwrap_or("-") == self.job)
            && (self.error.is_empty()
                || d.error
                    .to_lowercase()
                    .contains(&self.error.trim().to_lowercase()))
    }

    /// The message for [`Filter::done`], if it is one of the codes.
    fn done_message(&self, queue: &str) -> Option<String> {
        let n = self.n;
        match self.done.as_str() {
            "replayed" => Some(format!("Replayed {n} dead letter(s) to {queue}.")),
            "purged" => Some(format!("Purged {n} dead letter(s) of {queue}.")),
            "nothing" => Some("Nothing matched: nothing changed.".into()),
            _ => None,
        }
    }

    fn query(&self, done: &str, n: usize) -> String {
        let mut q = vec![];
        if !self.job.is_empty() {
            q.push(format!("job={}", enc(&self.job)));
        }
        if !self.error.is_empty() {
            q.push(format!("error={}", enc(&self.error)));
        }
        if !done.is_empty() {
            q.push(format!("done={}&n={n}", enc(done)));
        }
        if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        }
    }
}

/// The routes of the dashboard, for merging into the worker's HTTP router.
pub(crate) fn router(ui: Arc<Ui>) -> Router {
    let guard = axum::middleware::from_fn_with_state(ui.clone(), host_guard);
    Router::new()
        .route("/", get(|| async { see_other("/ui") }))
        .route("/ui", get(overview))
        .route("/ui/", get(|| async { see_other("/ui") }))
        .route("/ui/live/overview", get(overview_live))
        .route("/ui/queues/{queue}", get(queue_page))
        .route("/ui/live/queues/{queue}", get(queue_live))
        .route("/ui/queues/{queue}/dead", get(dead_page).post(dead_action))
        .route("/ui/queues/{queue}/dead/{id}", get(dead_one))
        .route("/ui/worker", get(worker_page))
        .route("/ui/live/worker", get(worker_live))
        .route("/ui/enqueue", get(enqueue_page).post(enqueue_action))
        .route("/ui/jobs", get(job_page))
        .route("/ui/login", get(login_page).post(login_action))
        .route("/ui/logout", post(logout_action))
        .route("/ui/assets/htmx.min.js", get(htmx_js))
        .route("/ui/assets/app.css", get(app_css))
        .route_layer(guard)
        .with_state(ui)
}

/// Refuses a request addressed to a host name the dashboard does not answer to: a page on another
/// site whose name was pointed at this address (DNS rebinding) would otherwise be same-origin.
/// Allowed: an IP address, `localhost`, or a name in `http.allowed_hosts`.
async fn host_guard(
    State(ui): S,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match host {
        Some(h) if !host_allowed(&h, &ui.config.http.allowed_hosts) => {
            tracing::warn!(host = %h, "dashboard: request for a host name not in http.allowed_hosts refused");
            page(
                StatusCode::FORBIDDEN,
                view::message(
                    &format!(
                        "This dashboard does not answer to the host name {h:?}. Add it to \
                         http.allowed_hosts if it is this server's own name."
                    ),
                    true,
                ),
            )
        }
        _ => next.run(req).await,
    }
}

/// Whether a `Host` header names this server by address, as `localhost`, or by an allowed name.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(name))
}

type S = State<Arc<Ui>>;

/// A refused request's page (boxed: a `Response` is large for an `Err`).
type Refusal = Box<Response>;

async fn overview(State(ui): S, headers: HeaderMap) -> Response {
    let access = ui.access(&headers);
    let queues = ui.all_queues().await;
    page(
        StatusCode::OK,
        view::layout(&ui, access, "Queues", "overview", view::overview(&queues)),
    )
}

async fn overview_live(State(ui): S) -> Response {
    page(StatusCode::OK, view::overview_live(&ui.all_queues().await))
}

/// The levels of a configured queue, or a 404 page.
fn levels_of(ui: &Ui, headers: &HeaderMap, queue: &str) -> Result<Vec<Priority>, Refusal> {
    match ui.config.effective_queues().get(queue) {
        Some(q) => Ok(q.levels()),
        None => Err(Box::new(not_found(
            ui,
            headers,
            &format!(
                "No queue \"{queue}\" in this worker's config (queues: {}).",
                ui.queue_names().join(", ")
            ),
        ))),
    }
}

async fn queue_page(State(ui): S, headers: HeaderMap, Path(queue): Path<String>) -> Response {
    let levels = match levels_of(&ui, &headers, &queue) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let access = ui.access(&headers);
    let q = ui.queue_view(&queue, &levels).await;
    let dead = ui.dead_letters(&queue, &Filter::default()).await;
    page(
        StatusCode::OK,
        view::layout(
            &ui,
            access,
            &format!("Queue {queue}"),
            "overview",
            view::queue(&q, dead.as_ref().map(|(d, _)| d.as_slice())),
        ),
    )
}

async fn queue_live(State(ui): S, headers: HeaderMap, Path(queue): Path<String>) -> Response {
    let levels = match levels_of(&ui, &headers, &queue) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    page(
        StatusCode::OK,
        view::queue_live(&ui.queue_view(&queue, &levels).await),
    )
}

async fn dead_page(
    State(ui): S,
    headers: HeaderMap,
    Path(queue): Path<String>,
    Query(filter): Query<Filter>,
) -> Response {
    if let Err(r) = levels_of(&ui, &headers, &queue) {
        return *r;
    }
    let message = filter.done_message(&queue);
    dead_list(&ui, &headers, &queue, &filter, message, StatusCode::OK).await
}

/// The dead-letters page, with a message on top (an error when `status` is not 200).
async fn dead_list(
    ui: &Ui,
    headers: &HeaderMap,
    queue: &str,
    filter: &Filter,
    message: Option<String>,
    status: StatusCode,
) -> Response {
    let access = ui.access(headers);
    // One read (on a broker that cannot browse, reading counts a delivery): the job names to
    // filter by come from the whole list.
    let read = dlq::list(&ui.broker, queue, SCAN)
        .await
        .map_err(|e| e.to_string());
    let mut jobs: Vec<String> = read
        .iter()
        .flatten()
        .map(|d| d.envelope.job.clone().unwrap_or_else(|| "-".into()))
        .collect();
    jobs.sort();
    jobs.dedup();
    let found = read.map(|all| {
        let n = all.len();
        (all.into_iter().filter(|d| filter.matches(d)).collect(), n)
    });
    let message = message.map(|m| (m, status != StatusCode::OK));
    page(
        status,
        view::layout(
            ui,
            access,
            &format!("Dead letters of {queue}"),
            "overview",
            view::dead_letters(&ui.csrf, access, queue, filter, &jobs, found, message),
        ),
    )
}

async fn dead_one(
    State(ui): S,
    headers: HeaderMap,
    Path((queue, id)): Path<(String, String)>,
) -> Response {
    if let Err(r) = levels_of(&ui, &headers, &queue) {
        return *r;
    }
    let access = ui.access(&headers);
    match ui.dead_letters(&queue, &Filter::default()).await {
        Ok((all, _)) => match all.into_iter().find(|d| d.envelope.id == id) {
            Some(d) => page(
                StatusCode::OK,
                view::layout(
                    &ui,
                    access,
                    &format!("Dead letter {id}"),
                    "overview",
                    view::dead_letter(&ui.csrf, access, &queue, &d),
                ),
            ),
            None => not_found(
                &ui,
                &headers,
                &format!(
                    "No dead letter {id} in {queue} (among the first {SCAN}): replayed or purged already?"
                ),
            ),
        },
        Err(e) => page(
            StatusCode::BAD_GATEWAY,
            view::layout(
                &ui,
                access,
                "Broker error",
                "overview",
                view::message(&format!("Cannot read the dead letters: {e}"), true),
            ),
        ),
    }
}

/// The form of a dead-letter action.
#[derive(serde::Deserialize)]
struct DeadAction {
    #[serde(default)]
    csrf: String,
    /// `replay` or `purge`.
    action: String,
    /// `one` (with `id`) or `filtered` (with `job` and `error`; every dead letter when both are
    /// empty).
    scope: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    job: String,
    #[serde(default)]
    error: String,
}

async fn dead_action(
    State(ui): S,
    headers: HeaderMap,
    Path(queue): Path<String>,
    Form(form): Form<DeadAction>,
) -> Response {
    if let Err(r) = levels_of(&ui, &headers, &queue) {
        return *r;
    }
    if let Err(r) = ui.check_action(&headers, &form.csrf) {
        return *r;
    }
    let filter = Filter {
        job: form.job.clone(),
        error: form.error.clone(),
        ..Filter::default()
    };
    // A failure is shown at once, on the list; a success redirects with a message code (never
    // free text in the URL, which anyone could craft).
    let failed = |message: String| {
        let ui = ui.clone();
        let headers = headers.clone();
        let queue = queue.clone();
        let filter = filter.clone();
        async move {
            dead_list(
                &ui,
                &headers,
                &queue,
                &filter,
                Some(message),
                StatusCode::BAD_GATEWAY,
            )
            .await
        }
    };
    let (select, limit) = match form.scope.as_str() {
        "one" if !form.id.is_empty() => (Select::Ids(vec![form.id.clone()]), SCAN),
        "filtered" if filter.is_empty() => (Select::All, ALL),
        "filtered" => match ui.dead_letters(&queue, &filter).await {
            Ok((found, _)) => (
                Select::Ids(found.into_iter().map(|d| d.envelope.id).collect()),
                SCAN,
            ),
            Err(e) => return failed(format!("Cannot read the dead letters: {e}")).await,
        },
        other => return failed(format!("Unknown scope {other:?}.")).await,
    };
    if matches!(&select, Select::Ids(ids) if ids.is_empty()) {
        return see_other(&dead_url(&queue, &filter, "nothing", 0));
    }
    match form.action.as_str() {
        "replay" => match dlq::replay(&ui.broker, &queue, &select, limit).await {
            Ok(n) => {
                tracing::info!(queue = %queue, replayed = n, scope = %form.scope, "dashboard: dead letters replayed");
                see_other(&dead_url(&queue, &filter, "replayed", n))
            }
            Err(e) => failed(format!("Replay failed: {e}")).await,
        },
        "purge" => match dlq::purge(&ui.broker, &queue, &select, limit).await {
            Ok(n) => {
                tracing::info!(queue = %queue, purged = n, scope = %form.scope, "dashboard: dead letters purged");
                see_other(&dead_url(&queue, &filter, "purged", n))
            }
            Err(e) => failed(format!("Purge failed: {e}")).await,
        },
        other => failed(format!("Unknown action {other:?}.")).await,
    }
}

fn dead_url(queue: &str, filter: &Filter, done: &str, n: usize) -> String {
    format!("/ui/queues/{}/dead{}", enc(queue), filter.query(done, n))
}

async fn worker_page(State(ui): S, headers: HeaderMap) -> Response {
    let access = ui.access(&headers);
    page(
        StatusCode::OK,
        view::layout(&ui, access, "This worker", "worker", view::worker(&ui)),
    )
}

async fn worker_live(State(ui): S) -> Response {
    page(StatusCode::OK, view::worker_live(&ui))
}

/// The enqueue form's fields (also what is shown again after an error).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub(crate) struct EnqueueForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    job: String,
    #[serde(default)]
    queue: String,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    priority: String,
    #[serde(default)]
    delay: String,
}

/// `?id=` of the job page.
#[derive(serde::Deserialize, Default)]
struct JobQuery {
    #[serde(default)]
    id: String,
}

/// A job's status by id (queues with `track_status`).
async fn job_page(State(ui): S, headers: HeaderMap, Query(q): Query<JobQuery>) -> Response {
    let access = ui.access(&headers);
    let id = q.id.trim();
    let tracked: Vec<String> = ui
        .config
        .effective_queues()
        .into_iter()
        .filter(|(_, c)| c.track_status.window().is_some())
        .map(|(name, _)| name)
        .collect();
    // The codes of GET /jobs/{id}: 404 none (or no store here), 500 unreadable, 503 no answer.
    let (code, found) = match (&ui.store, id.is_empty()) {
        (_, true) => (StatusCode::OK, None),
        (None, false) => (
            StatusCode::NOT_FOUND,
            Some(Err(
                "this process has no state store ([store]), so it keeps no job status".to_string(),
            )),
        ),
        (Some(store), false) => {
            match crate::effects::timed(store.get(&crate::status::key(id))).await {
                Ok(None) => (StatusCode::NOT_FOUND, Some(Ok(None))),
                Ok(Some(b)) => match crate::JobStatus::decode(&b) {
                    Some(s) => (StatusCode::OK, Some(Ok(Some(s)))),
                    None => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        Some(Err("the stored status is not readable".to_string())),
                    ),
                },
                Err(e) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Some(Err(format!("the state store did not answer: {e}"))),
                ),
            }
        }
    };
    page(
        code,
        view::layout(
            &ui,
            access,
            "Find a job",
            "jobs",
            view::job_status(id, &tracked, found),
        ),
    )
}

async fn enqueue_page(State(ui): S, headers: HeaderMap) -> Response {
    let access = ui.access(&headers);
    let form = EnqueueForm {
        payload: "{}".into(),
        priority: "normal".into(),
        queue: crate::config::DEFAULT_QUEUE.into(),
        ..EnqueueForm::default()
    };
    page(
        StatusCode::OK,
        view::layout(
            &ui,
            access,
            "Enqueue a job",
            "enqueue",
            view::enqueue(&ui, access, &form, None),
        ),
    )
}

async fn enqueue_action(
    State(ui): S,
    headers: HeaderMap,
    Form(form): Form<EnqueueForm>,
) -> Response {
    let access = match ui.check_action(&headers, &form.csrf) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let outcome = enqueue(&ui, &form).await;
    let status = if outcome.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    page(
        status,
        view::layout(
            &ui,
            access,
            "Enqueue a job",
            "enqueue",
            view::enqueue(&ui, access, &form, Some(outcome)),
        ),
    )
}

/// Checks the form as the CLI's `enqueue` does (a job this binary serves, a queue the config
/// defines, JSON payload), then enqueues. `Ok` carries the message shown.
async fn enqueue(ui: &Ui, f: &EnqueueForm) -> Result<String, String> {
    if !ui.jobs.iter().any(|j| j == &f.job) {
        return Err(format!(
            "No handler is registered for job \"{}\" (registered: {}).",
            f.job,
            ui.jobs.join(", ")
        ));
    }
    if !ui.config.effective_queues().contains_key(&f.queue) {
        return Err(format!(
            "No queue \"{}\" in the config (queues: {}).",
            f.queue,
            ui.queue_names().join(", ")
        ));
    }
    let payload: serde_json::Value = serde_json::from_str(&f.payload)
        .map_err(|e| format!("The payload is not valid JSON: {e}."))?;
    let priority = Priority::parse(&f.priority)
        .ok_or_else(|| format!("Unknown priority \"{}\" (high, normal or low).", f.priority))?;
    let levels = ui.config.levels(&f.queue);
    if !levels.contains(&priority) {
        let served: Vec<&str> = levels.iter().map(|p| p.as_str()).collect();
        return Err(format!(
            "Queue {} serves only {} (its weights); a {} job would wait where no worker looks.",
            f.queue,
            served.join(", "),
            priority.as_str()
        ));
    }
    let delay = match f.delay.trim() {
        "" => None,
        d => Some(humantime::parse_duration(d).map_err(|e| {
            format!("The delay \"{d}\" is not a duration ({e}); write e.g. 30s, 10m or 2h.")
        })?),
    };
    let client = crate::Client::new(ui.broker.clone()).with_limits_from(&ui.config);
    let mut e = client
        .enqueue(&f.job, &payload)
        .queue(&f.queue)
        .priority(priority);
    if let Some(d) = delay {
        e = e.delay(d);
    }
    let id = e.send().await.map_err(|e| format!("Not enqueued: {e}."))?;
    tracing::info!(job = %f.job, queue = %f.queue, %id, "dashboard: job enqueued");
    Ok(format!(
        "Enqueued {} on {} as {id}{}.",
        f.job,
        f.queue,
        delay.map_or(String::new(), |d| format!(
            ", to run in {}",
            humantime::format_duration(d)
        ))
    ))
}

/// Query of the sign-in page.
#[derive(serde::Deserialize)]
struct Next {
    #[serde(default)]
    next: String,
}

/// Where to go after signing in: a dashboard path only (never another site).
fn next_path(next: &str) -> &str {
    if next.starts_with("/ui") && !next.starts_with("//") && !next.contains("://") {
        next
    } else {
        "/ui"
    }
}

async fn login_page(State(ui): S, headers: HeaderMap, Query(next): Query<Next>) -> Response {
    let access = ui.access(&headers);
    page(
        StatusCode::OK,
        view::layout(
            &ui,
            access,
            "Sign in",
            "",
            view::login(&ui, next_path(&next.next), None),
        ),
    )
}

#[derive(serde::Deserialize)]
struct Login {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

async fn login_action(State(ui): S, headers: HeaderMap, Form(form): Form<Login>) -> Response {
    if let Err(r) = ui.check_form(&headers, &form.csrf) {
        return *r;
    }
    let next = next_path(&form.next);
    match &ui.config.http.token {
        Some(token) if ct_eq(form.token.as_bytes(), token.as_bytes()) => {
            let mut r = see_other(next);
            if let Ok(v) = format!("{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict").parse()
            {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Some(_) => {
            tracing::warn!("dashboard: sign-in with a wrong token");
            let access = ui.access(&headers);
            page(
                StatusCode::FORBIDDEN,
                view::layout(
                    &ui,
                    access,
                    "Sign in",
                    "",
                    view::login(&ui, next, Some("That is not the token (http.token).")),
                ),
            )
        }
        None => see_other(next),
    }
}

async fn logout_action(State(ui): S, headers: HeaderMap, Form(form): Form<Login>) -> Response {
    if let Err(r) = ui.check_form(&headers, &form.csrf) {
        return *r;
    }
    let mut r = see_other("/ui");
    if let Ok(v) = format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0").parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn htmx_js() -> Response {
    asset("text/javascript; charset=utf-8", HTMX)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

fn not_found(ui: &Ui, headers: &HeaderMap, what: &str) -> Response {
    page(
        StatusCode::NOT_FOUND,
        view::layout(
            ui,
            ui.access(headers),
            "Not found",
            "",
            view::message(what, true),
        ),
    )
}

/// An HTML response with the dashboard's security headers.
fn page(status: StatusCode, body: Markup) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                 connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
        ],
        body.into_string(),
    )
        .into_response()
}

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

/// The value of cookie `name`, if the request carries it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether a request comes from a page of this same host: browsers send `Sec-Fetch-Site` and
/// `Origin` with form posts; a missing header (curl, an old browser) is not proof of anything,
/// so the CSRF token decides then.
fn same_origin(headers: &HeaderMap) -> bool {
    let h = |n: header::HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(site) = h(header::HeaderName::from_static("sec-fetch-site")) {
        if site != "same-origin" && site != "none" {
            return false;
        }
    }
    match (h(header::ORIGIN), h(header::HOST)) {
        (Some(origin), Some(host)) => {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                == Some(host)
        }
        (Some(_), None) => false,
        (None, _) => true,
    }
}

/// Compares without stopping at the first difference.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Percent-encodes everything but unreserved characters (for query values and path segments).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
