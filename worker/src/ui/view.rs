//! The dashboard's HTML. Every value is escaped by maud; `data-*` attributes name what a cell
//! shows, for tests and for users' own scripts.

use super::{enc, Access, EnqueueForm, Filter, Ui, ALL, SCAN};
use crate::autoscale::{Hint, Rates, HISTORY};
use crate::dlq::DeadLetter;
use crate::stats::QueueSnapshot;
use maud::{html, Markup, DOCTYPE};
use std::time::{Duration, SystemTime};
use stevedore_core::Depth;

/// htmx settings: no inline styles or eval (the CSP forbids both), and every response is
/// swapped in, errors included, so a refused action shows its page.
const HTMX_CONFIG: &str = r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false,"responseHandling":[{"code":".*","swap":true}]}"#;

/// How often live parts refresh.
const EVERY: &str = "every 2s";

/// One queue as the pages show it.
pub(crate) struct QueueView {
    pub name: String,
    pub levels: Vec<(&'static str, Result<Depth, String>)>,
    pub dead: Result<Depth, String>,
    pub hint: Option<Hint>,
    pub history: Vec<Rates>,
    pub counters: QueueSnapshot,
}

impl QueueView {
    fn total(&self) -> Result<Depth, String> {
        let mut t = Depth::default();
        for (_, d) in &self.levels {
            let d = d.as_ref().map_err(Clone::clone)?;
            t.ready += d.ready;
            t.in_flight += d.in_flight;
            t.delayed = match (t.delayed, d.delayed) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            };
            t.oldest_age = t.oldest_age.max(d.oldest_age);
        }
        Ok(t)
    }
}

pub(super) fn layout(ui: &Ui, access: Access, title: &str, nav: &str, body: Markup) -> Markup {
    let link = |href: &str, key: &str, text: &str| {
        html! { a href=(href) .on[nav == key] { (text) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="htmx-config" content=(HTMX_CONFIG);
                // No favicon request (it would be a 404 on every page).
                link rel="icon" href="data:,";
                title { (title) " · Stevedore" }
                link rel="stylesheet" href="/ui/assets/app.css";
                script src="/ui/assets/htmx.min.js" {}
            }
            body hx-boost="true" {
                header {
                    span.brand { "Stevedore" }
                    nav {
                        (link("/ui", "overview", "Queues"))
                        @if ui.runs_jobs { (link("/ui/worker", "worker", "This worker")) }
                        (link("/ui/enqueue", "enqueue", "Enqueue"))
                        (link("/ui/jobs", "jobs", "Find a job"))
                    }
                    span.who {
                        (ui.broker.name()) " · "
                        @if ui.runs_jobs { "worker " (ui.worker_id) } @else { "dashboard (runs no jobs)" }
                        " · "
                        @match access {
                            Access::ReadOnly => span.badge.ro data-access="read-only" { "read-only" },
                            Access::SignInFirst => a href="/ui/login?next=/ui" data-access="sign-in" { "Sign in for actions" },
                            Access::SignedIn => form.inline method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(ui.csrf);
                                button.secondary type="submit" data-access="signed-in" { "Sign out" }
                            },
                            Access::Open => span.badge data-access="open" { "actions open" },
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

pub(super) fn overview(queues: &[QueueView]) -> Markup {
    html! {
        div.card { (overview_live(queues)) }
        p.muted {
            "Depths are read from the broker every 2 s. Rates, the worker estimate and the chart \
             come from this process's autoscale sampler (every autoscale.interval); \"done/s\" counts \
             this worker's jobs only."
        }
    }
}

pub(super) fn overview_live(queues: &[QueueView]) -> Markup {
    html! {
        div #live hx-get="/ui/live/overview" hx-trigger=(EVERY) hx-swap="outerHTML" {
            table #queues {
                thead { tr {
                    th { "Queue / level" } th { "Ready" } th { "In flight" } th { "Delayed" }
                    th { "Oldest" } th { "Dead" } th { "In/s" } th { "Done/s" }
                    th { "Workers wanted" } th { "This worker" } th.l { "Last " (HISTORY) " samples" }
                } }
                tbody {
                    @for q in queues { (queue_rows(q, true)) }
                }
            }
        }
    }
}

fn depth_cells(d: &Result<Depth, String>) -> Markup {
    html! {
        @match d {
            Ok(d) => {
                td data-col="ready" { (d.ready) }
                td data-col="in-flight" { (d.in_flight) }
                td data-col="delayed" { (opt(d.delayed)) }
                td data-col="oldest" { (d.oldest_age.map_or("–".to_string(), age)) }
            }
            Err(e) => td.err colspan="4" { "unavailable: " (e) },
        }
    }
}

fn queue_rows(q: &QueueView, link: bool) -> Markup {
    let dead = q.dead.as_ref().map(|d| d.ready);
    html! {
        tr.queue data-queue=(q.name) {
            td { @if link { a href={"/ui/queues/" (enc(&q.name))} { (q.name) } } @else { (q.name) } }
            (depth_cells(&q.total()))
            td data-col="dead" {
                @match dead {
                    Ok(0) => a href={"/ui/queues/" (enc(&q.name)) "/dead"} { "0" },
                    Ok(n) => a.num-dead href={"/ui/queues/" (enc(&q.name)) "/dead"} { (n) },
                    Err(_) => "?",
                }
            }
            @match &q.hint {
                Some(h) => {
                    td data-col="arrival" { (rate(h.arrival_rate)) }
                    td data-col="completion" { (rate(h.completion_rate)) }
                    td data-col="desired" { (h.desired_workers) }
                    td data-col="busy" {
                        @if h.busy { span.busy { "busy" } } @else { span.muted { "idle" } }
                    }
                }
                None => td.muted colspan="4" { "not sampled yet" },
            }
            td.l { (spark(&q.history)) }
        }
        @for (level, d) in &q.levels {
            tr.level data-queue=(q.name) data-level=(level) {
                td { (level) }
                (depth_cells(d))
                td colspan="6" {}
            }
        }
    }
}

/// A chart of completions (solid) and arrivals (dashed) per second over the kept samples.
fn spark(h: &[Rates]) -> Markup {
    const W: f64 = 160.0;
    const H: f64 = 28.0;
    if h.len() < 2 {
        return html! { span.muted { "collecting…" } };
    }
    let max = h
        .iter()
        .map(|r| r.arrival.max(r.completion))
        .fold(1.0, f64::max);
    let step = W / (HISTORY - 1) as f64;
    let start = (HISTORY - h.len()) as f64 * step;
    let points = |f: &dyn Fn(&Rates) -> f64| {
        h.iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "{:.1},{:.1}",
                    start + i as f64 * step,
                    H - 1.0 - f(r) / max * (H - 2.0)
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let last = h.last().copied().unwrap_or(Rates {
        arrival: 0.0,
        completion: 0.0,
    });
    html! {
        svg.spark width=(W) height=(H) viewBox={"0 0 " (W) " " (H)} role="img"
            aria-label={"done " (rate(last.completion)) "/s, in " (rate(last.arrival)) "/s; peak " (rate(max)) "/s"} {
            title { "done/s (solid) and in/s (dashed), peak " (rate(max)) "/s" }
            polyline.in points=(points(&|r| r.arrival)) {}
            polyline.done points=(points(&|r| r.completion)) {}
        }
    }
}

pub(super) fn queue(q: &QueueView, dead: Result<&[DeadLetter], &String>) -> Markup {
    html! {
        div.card { (queue_live(q)) }
        h2 { "Dead letters" }
        div.card {
            @match dead {
                Ok([]) => p.muted { "None." },
                Ok(list) => {
                    p { (list.len()) @if list.len() >= SCAN { "+" } " dead letter(s). "
                        a href={"/ui/queues/" (enc(&q.name)) "/dead"} { "Filter, inspect, replay or purge →" } }
                    (dead_table(&q.name, &list[..list.len().min(10)], None))
                }
                Err(e) => p.flash.error { "Cannot read the dead letters: " (e) },
            }
        }
    }
}

pub(super) fn queue_live(q: &QueueView) -> Markup {
    let c = &q.counters;
    html! {
        div #live hx-get={"/ui/live/queues/" (enc(&q.name))} hx-trigger=(EVERY) hx-swap="outerHTML" {
            table {
                thead { tr {
                    th { "Queue / level" } th { "Ready" } th { "In flight" } th { "Delayed" }
                    th { "Oldest" } th { "Dead" } th { "In/s" } th { "Done/s" }
                    th { "Workers wanted" } th { "This worker" } th.l { "Last " (HISTORY) " samples" }
                } }
                tbody { (queue_rows(q, false)) }
            }
            h2 { "This worker on " (q.name) }
            table #counters data-queue=(q.name) {
                thead { tr { th { "Succeeded" } th { "Retried" } th { "Dead-lettered" } th { "Released" } th { "Running" } } }
                tbody { tr {
                    td data-col="processed" { (c.processed) }
                    td data-col="retried" { (c.retried) }
                    td data-col="dead-lettered" { (c.dead_lettered) }
                    td data-col="released" { (c.released) }
                    td data-col="running" { (c.in_flight) }
                } }
            }
        }
    }
}

fn dead_table(
    queue: &str,
    list: &[DeadLetter],
    actions: Option<(&str, Access, &Filter)>,
) -> Markup {
    html! {
        table #dead {
            thead { tr {
                th.l { "Id" } th.l { "Job" } th.l { "Error" } th { "Attempts" } th { "Died" }
                @if actions.is_some() { th {} }
            } }
            tbody {
                @for d in list {
                    tr data-id=(d.envelope.id) {
                        td.l { a href={"/ui/queues/" (enc(queue)) "/dead/" (enc(&d.envelope.id))} { (d.envelope.id) } }
                        td.l data-col="job" { (d.envelope.job.as_deref().unwrap_or("-")) }
                        td.err data-col="error" { (cut(&d.error, 240)) }
                        td data-col="attempts" { (d.attempts) }
                        td { (d.last_failure.map_or("–".to_string(), ago)) }
                        @if let Some((csrf, access, filter)) = actions {
                            td { @if access.can_act() { (one_actions(csrf, queue, &d.envelope.id, filter)) } }
                        }
                    }
                }
            }
        }
    }
}

/// Replay and purge buttons for one dead letter; `filter` is where the list returns after.
fn one_actions(csrf: &str, queue: &str, id: &str, filter: &Filter) -> Markup {
    let url = format!("/ui/queues/{}/dead", enc(queue));
    let keep = html! {
        input type="hidden" name="job" value=(filter.job);
        input type="hidden" name="error" value=(filter.error);
    };
    html! {
        form.inline method="post" action=(url) hx-confirm={"Replay dead letter " (id) " to " (queue) "?"} {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="action" value="replay";
            input type="hidden" name="scope" value="one";
            input type="hidden" name="id" value=(id);
            (keep)
            button.secondary type="submit" data-action="replay" { "Replay" }
        }
        " "
        form.inline method="post" action=(url) hx-confirm={"Delete dead letter " (id) " for good?"} {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="action" value="purge";
            input type="hidden" name="scope" value="one";
            input type="hidden" name="id" value=(id);
            (keep)
            button.danger type="submit" data-action="purge" { "Purge" }
        }
    }
}

pub(super) fn dead_letters(
    csrf: &str,
    access: Access,
    queue: &str,
    filter: &Filter,
    jobs: &[String],
    found: Result<(Vec<DeadLetter>, usize), String>,
    message: Option<(String, bool)>,
) -> Markup {
    let url = format!("/ui/queues/{}/dead", enc(queue));
    html! {
        @if let Some((text, error)) = &message {
            p.flash.error[*error] #flash { (text) }
        }
        p { a href={"/ui/queues/" (enc(queue))} { "← queue " (queue) } }
        div.card {
            form.filters method="get" action=(url) {
                label { "Job"
                    select name="job" {
                        option value="" selected[filter.job.is_empty()] { "any" }
                        @for j in jobs { option value=(j) selected[&filter.job == j] { (j) } }
                    }
                }
                label { "Error contains"
                    input type="search" name="error" value=(filter.error) placeholder="text in the error";
                }
                button type="submit" { "Filter" }
                @if !filter.is_empty() { a href=(url) { "clear" } }
            }
            @match found {
                Err(e) => p.flash.error { "Cannot read the dead letters: " (e) },
                Ok((list, read)) => {
                    p #count data-count=(list.len()) {
                        (list.len()) " of " (read) @if read >= SCAN { "+ (the first " (SCAN) " are searched)" }
                        " dead letter(s)" @if !filter.is_empty() { " match" } "."
                    }
                    @if access.can_act() && !list.is_empty() {
                        @let what = if filter.is_empty() { format!("all dead letters of {queue} (up to {ALL})") } else { format!("the dead letters that match this filter when you confirm ({} now)", list.len()) };
                        div.actions {
                            @for (action, label, class, verb) in [("replay", "Replay", "secondary", "Replay"), ("purge", "Purge", "danger", "Delete for good")] {
                                form.inline method="post" action=(url) hx-confirm={(verb) " " (what) "?"} {
                                    input type="hidden" name="csrf" value=(csrf);
                                    input type="hidden" name="action" value=(action);
                                    input type="hidden" name="scope" value="filtered";
                                    input type="hidden" name="job" value=(filter.job);
                                    input type="hidden" name="error" value=(filter.error);
                                    button class=(class) type="submit" data-action={(action) "-filtered"} {
                                        (label) " " @if filter.is_empty() { "all" } @else { "these " (list.len()) }
                                    }
                                }
                            }
                        }
                    }
                    @if list.is_empty() { p.muted { "Nothing here." } }
                    @else { (dead_table(queue, &list[..list.len().min(200)], Some((csrf, access, filter)))) }
                    @if list.len() > 200 { p.muted { "Showing the first 200." } }
                }
            }
        }
    }
}

pub(super) fn dead_letter(csrf: &str, access: Access, queue: &str, d: &DeadLetter) -> Markup {
    let e = &d.envelope;
    html! {
        p { a href={"/ui/queues/" (enc(queue)) "/dead"} { "← dead letters of " (queue) } }
        div.card {
            dl.kv #details {
                dt { "Id" } dd data-col="id" { (e.id) }
                dt { "Job" } dd data-col="job" { (e.job.as_deref().unwrap_or("-")) }
                dt { "Error" } dd.err data-col="error" { (d.error) }
                dt { "Attempts" } dd data-col="attempts" { (d.attempts) }
                dt { "Origin queue" } dd { (if d.origin.is_empty() { queue } else { &d.origin }) }
                dt { "Priority" } dd { (e.priority.as_str()) }
                dt { "Enqueued" } dd { (time(e.enqueued_at)) }
                dt { "First failure" } dd { (d.first_failure.map_or("–".into(), time)) }
                dt { "Last failure" } dd { (d.last_failure.map_or("–".into(), time)) }
                dt { "Given up by" } dd { (d.worker) }
            }
            @if access.can_act() { div.actions { (one_actions(csrf, queue, &e.id, &Filter::default())) } }
        }
        h2 { "Payload (" (e.payload.len()) " bytes)" }
        pre #payload { (payload(&e.payload)) }
        h2 { "Headers" }
        div.card { dl.kv {
            @for (k, v) in &e.headers { dt { (k) } dd { (cut(v, 2000)) } }
        } }
    }
}

pub(super) fn worker(ui: &Ui) -> Markup {
    html! {
        @if !ui.runs_jobs {
            p.muted { "This process is the dashboard alone: it runs no jobs." }
        } @else {
            div.card { (worker_live(ui)) }
        }
        @if !ui.notices.is_empty() {
            h2 { "Start-up notices" }
            div.card { ul { @for n in &ui.notices { li { (n) } } } }
        }
        h2 { "Config (secrets redacted)" }
        pre #config { (ui.config.redacted()) }
    }
}

pub(super) fn worker_live(ui: &Ui) -> Markup {
    let running = ui.stats.running();
    html! {
        div #live hx-get="/ui/live/worker" hx-trigger=(EVERY) hx-swap="outerHTML" {
            p { (running.len()) " job(s) running now (worker.concurrency = " (ui.config.worker.concurrency) ")." }
            @if !running.is_empty() {
                table #running {
                    thead { tr { th.l { "Queue" } th.l { "Job" } th.l { "Id" } th { "Attempt" } th { "Running for" } } }
                    tbody {
                        @for r in running.iter().take(500) {
                            tr data-id=(r.id) {
                                td.l { (r.queue) } td.l { (r.job) } td.l { (r.id) }
                                td { (r.attempt) } td { (age(r.age)) }
                            }
                        }
                    }
                }
            }
            h2 { "Counters" }
            table {
                thead { tr { th.l { "Queue" } th { "Succeeded" } th { "Retried" } th { "Dead-lettered" } th { "Released" } th { "Running" } } }
                tbody {
                    @for (name, c) in ui.stats.snapshot() {
                        tr { td.l { (name) } td { (c.processed) } td { (c.retried) } td { (c.dead_lettered) } td { (c.released) } td { (c.in_flight) } }
                    }
                }
            }
        }
    }
}

pub(super) fn enqueue(
    ui: &Ui,
    access: Access,
    f: &EnqueueForm,
    outcome: Option<Result<String, String>>,
) -> Markup {
    html! {
        @match &outcome {
            Some(Ok(m)) => p.flash #flash { (m) " " a href={"/ui/queues/" (enc(&f.queue))} { "See the queue →" } },
            Some(Err(m)) => p.flash.error #flash { (m) },
            None => {},
        }
        @match access {
            Access::ReadOnly => p.muted { "This dashboard is read-only: it cannot enqueue." },
            Access::SignInFirst => p { "Enqueueing needs the dashboard token. " a href="/ui/login?next=/ui/enqueue" { "Sign in" } },
            Access::Open | Access::SignedIn => div.card {
                form method="post" action="/ui/enqueue" #enqueue {
                    input type="hidden" name="csrf" value=(ui.csrf);
                    div.grid {
                        label { "Job"
                            select name="job" required {
                                @for j in &ui.jobs { option value=(j) selected[&f.job == j] { (j) } }
                            }
                        }
                        label { "Queue"
                            select name="queue" {
                                @for q in ui.queue_names() { option value=(q) selected[f.queue == q] { (q) } }
                            }
                        }
                        label { "Priority"
                            select name="priority" {
                                @for p in ["high", "normal", "low"] { option value=(p) selected[f.priority == p] { (p) } }
                            }
                        }
                        label { "Delay (optional)"
                            input type="text" name="delay" value=(f.delay) placeholder="e.g. 30s, 10m";
                        }
                    }
                    label { "Payload (JSON)"
                        textarea name="payload" spellcheck="false" { (f.payload) }
                    }
                    div.actions { button type="submit" { "Enqueue" } }
                }
            },
        }
    }
}

pub(super) fn login(ui: &Ui, next: &str, error: Option<&str>) -> Markup {
    html! {
        @if let Some(e) = error { p.flash.error #flash { (e) } }
        @if ui.config.http.token.is_none() {
            p { "This dashboard has no token (http.token): there is nothing to sign in to." }
        } @else {
            div.card {
                form method="post" action="/ui/login" #login {
                    input type="hidden" name="csrf" value=(ui.csrf);
                    input type="hidden" name="next" value=(next);
                    label { "Token (http.token)" input type="password" name="token" autocomplete="current-password" autofocus; }
                    div.actions { button type="submit" { "Sign in" } }
                }
            }
        }
    }
}

pub(super) fn refused(why: &str, access: Access) -> Markup {
    html! {
        p.flash.error #flash { (why) }
        @if access == Access::SignInFirst { p { a href="/ui/login?next=/ui" { "Sign in" } } }
    }
}

pub(super) fn message(text: &str, error: bool) -> Markup {
    html! { p.flash.error[error] #flash { (text) } }
}

fn opt(v: Option<u64>) -> String {
    v.map_or("–".to_string(), |n| n.to_string())
}

fn rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// `0.4s`, `12s`, `3m 20s`, `2h 5m`, `3d 4h`.
pub(super) fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=9 => format!("{:.1}s", d.as_secs_f64()),
        10..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn ago(t: SystemTime) -> String {
    match SystemTime::now().duration_since(t) {
        Ok(d) => format!("{} ago", age(d)),
        Err(_) => time(t),
    }
}

/// RFC 3339 in UTC; a time humantime cannot write (past the year 9999, which any producer can
/// put in a header) as milliseconds since the epoch.
/// The job page: a search by id and, for one searched, its status.
pub(super) fn job_status(
    id: &str,
    tracked: &[String],
    found: Option<Result<Option<crate::JobStatus>, String>>,
) -> Markup {
    let opt = |t: Option<SystemTime>| t.map_or("–".to_string(), time);
    html! {
        div.card {
            form.filters method="get" action="/ui/jobs" {
                label { "Job id"
                    input type="search" name="id" value=(id) placeholder="the id enqueue returned" size="40";
                }
                button type="submit" { "Find" }
            }
            p.muted {
                @if tracked.is_empty() {
                    "No queue of this config keeps job status: set track_status = true on a queue."
                } @else {
                    "Queues that keep job status: " (tracked.join(", ")) "."
                }
            }
        }
        @match found {
            None => {},
            Some(Err(e)) => p.flash.error #flash { (e) },
            Some(Ok(None)) => p.flash.error #flash {
                "No status recorded for " (id) ": its queue does not keep status, the id is unknown, or its status expired."
            },
            Some(Ok(Some(s))) => div.card {
                dl.kv #status {
                    dt { "Id" } dd data-col="id" { (s.id) }
                    dt { "State" } dd data-col="state" { (s.state.as_str()) }
                    dt { "Job" } dd data-col="job" { (s.job) }
                    dt { "Queue" } dd { a href={"/ui/queues/" (enc(&s.queue))} { (s.queue) } }
                    dt { "Attempt" } dd data-col="attempt" {
                        (s.attempt) @if let Some(max) = s.max_attempts { " of " (max) }
                    }
                    dt { "Enqueued" } dd { (time(s.enqueued_at)) }
                    @if s.run_at.is_some() { dt { "Runs at" } dd { (opt(s.run_at)) } }
                    dt { "Started" } dd { (opt(s.started_at)) }
                    dt { "Finished" } dd { (opt(s.finished_at)) }
                    dt { "Updated" } dd { (time(s.updated_at)) }
                    dt { "Worker" } dd { (s.worker.as_deref().unwrap_or("–")) }
                    @if let Some(e) = &s.last_error { dt { "Last error" } dd.err data-col="error" { (e) } }
                    @if let Some(r) = &s.result { dt { "Result" } dd { pre { (r.to_string()) } } }
                }
                @if s.state == crate::JobState::Dead {
                    p { a href={"/ui/queues/" (enc(&s.queue)) "/dead/" (enc(&s.id))} { "Its dead letter →" } }
                }
            },
        }
    }
}

pub(super) fn time(t: SystemTime) -> String {
    let ms = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    if ms < 253_402_300_800_000 {
        humantime::format_rfc3339_seconds(t).to_string()
    } else {
        format!("{ms} ms after 1970")
    }
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max).collect();
    out.push('…');
    out
}

/// The payload as text: pretty JSON, else UTF-8 text, else a hex dump of its first 4 KiB.
pub(super) fn payload(bytes: &[u8]) -> Markup {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) {
        if let Ok(pretty) = serde_json::to_string_pretty(&v) {
            return html! { (pretty) };
        }
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        return html! { (text) };
    }
    let mut out = String::from("(binary; hex)\n");
    for (i, chunk) in bytes.chunks(16).take(256).enumerate() {
        out.push_str(&format!("{:08x}  ", i * 16));
        for b in chunk {
            out.push_str(&format!("{b:02x} "));
        }
        out.push('\n');
    }
    if bytes.len() > 4096 {
        out.push_str(&format!("… {} more bytes\n", bytes.len() - 4096));
    }
    html! { (out) }
}
