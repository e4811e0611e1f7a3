//! The dashboard's pages, rendered on the server with maud (every value escaped). No JavaScript:
//! lists refresh with a meta tag, actions are plain forms.
//!
//! Extending: a new queue property is one [`QUEUE_COLUMNS`] entry plus its field in
//! [`QueueRow`].

use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde_json::Value;

use crate::queue::batch::BatchInfo;
use crate::queue::browse::{Filter, Page};
use crate::queue::hosts::HostRow;
use crate::queue::overview::{QueueRow, DEAD_COUNT_CAP};
use crate::queue::schedules::Stored;

/// Payloads and results longer than this are cut, with a link to the full value.
pub const PREVIEW_BYTES: usize = 4096;

/// What every page needs to know about the request.
pub struct Ctx<'a> {
    /// Actions are possible (a token is configured).
    pub actions_enabled: bool,
    /// The visitor holds a valid session.
    pub logged_in: bool,
    /// The CSRF token for action forms, when logged in.
    pub csrf: Option<&'a str>,
    /// A one-line message about the last action.
    pub notice: Option<&'a str>,
}

impl Ctx<'_> {
    fn can_act(&self) -> bool {
        self.actions_enabled && self.logged_in && self.csrf.is_some()
    }
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.2em;align-items:center}
header a{color:#cfd6e4;text-decoration:none}header a:hover{color:#fff}
header .brand{font-weight:700;color:#fff}header .who{margin-left:auto;font-size:.9em}
main{padding:1em 1.2em}h1{font-size:1.3em;margin:.2em 0 .8em}
table{border-collapse:collapse;background:#fff;width:100%;margin-bottom:1em}
th,td{padding:.35em .6em;border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.failed,.cancelled,.gone{color:#b3261e}.running{color:#1f6feb}.completed{color:#1a7f37}
.notice{background:#fff8c5;border:1px solid #e6d36b;padding:.5em .8em;margin-bottom:1em}
.readonly{background:#eef0f4;padding:.4em .8em;margin-bottom:1em}
pre{background:#fff;border:1px solid #e3e6eb;padding:.6em;overflow:auto;max-height:30em}
form.inline{display:inline}button{cursor:pointer}
.filters{margin-bottom:1em}.filters input,.filters select{margin-right:.5em}
.muted{color:#6a7385}#job th,#timeline th{width:10em}";

/// The frame around every page.
pub fn layout(ctx: &Ctx<'_>, title: &str, refresh: Option<u32>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(seconds) = refresh {
                    meta http-equiv="refresh" content=(seconds);
                }
                title { (title) " · forkq" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    a.brand href="/" { "forkq" }
                    a href="/" { "Queues" }
                    a href="/jobs" { "Jobs" }
                    a href="/jobs?state=failed" { "Dead letter" }
                    a href="/batches" { "Batches" }
                    a href="/schedules" { "Schedules" }
                    a href="/hosts" { "Hosts" }
                    span.who {
                        @if !ctx.actions_enabled {
                            "read-only"
                        } @else if ctx.logged_in {
                            form.inline method="post" action="/logout" {
                                button type="submit" { "Log out" }
                            }
                        } @else {
                            a href="/login" { "Log in" }
                        }
                    }
                }
                main {
                    @if let Some(notice) = ctx.notice {
                        p.notice { (notice) }
                    }
                    @if !ctx.actions_enabled {
                        p.readonly {
                            "Read-only: this dashboard has no FORKQ_DASHBOARD_TOKEN, so it cannot retry, cancel or discard jobs, or pause queues."
                        }
                    }
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A link to the job list with these filters.
pub fn jobs_href(filter: &Filter, after: Option<i64>) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (key, value) in [
        ("queue", &filter.queue),
        ("state", &filter.state),
        ("task", &filter.task),
    ] {
        if let Some(v) = value {
            query.append_pair(key, v);
        }
    }
    if let Some(a) = after {
        query.append_pair("after", &a.to_string());
    }
    let query = query.finish();
    if query.is_empty() {
        "/jobs".into()
    } else {
        format!("/jobs?{query}")
    }
}

/// One column of the queue table: a title and how to render a queue's cell (with the request's
/// context, so a cell can hold an action form and its CSRF token).
pub struct QueueColumn {
    /// The header.
    pub title: &'static str,
    /// The cell.
    pub cell: fn(&QueueRow, &Ctx<'_>) -> Markup,
}

fn count_link(queue: &str, state: &str, n: i64) -> Markup {
    let filter = Filter {
        queue: Some(queue.into()),
        state: Some(state.into()),
        task: None,
    };
    html! { a href=(jobs_href(&filter, None)) { (n) } }
}

fn dead_count(row: &QueueRow, state: &str, n: i64) -> Markup {
    html! {
        span class=(if n > 0 { state } else { "" }) { (count_link(&row.queue, state, n)) }
        @if row.dead_capped { "+" }
    }
}

/// The queue table's columns, in order. To show a new property of queues, add its field to
/// [`QueueRow`] and its query, and one entry here; nothing else changes.
pub const QUEUE_COLUMNS: &[QueueColumn] = &[
    QueueColumn {
        title: "status",
        cell: queue_status,
    },
    QueueColumn {
        title: "limits",
        cell: |r, _| html! { span.muted { (r.settings.limits()) } },
    },
    QueueColumn {
        title: "available",
        cell: |r, _| count_link(&r.queue, "available", r.available),
    },
    QueueColumn {
        title: "running",
        cell: |r, _| count_link(&r.queue, "running", r.running),
    },
    QueueColumn {
        title: "scheduled",
        cell: |r, _| count_link(&r.queue, "scheduled", r.scheduled),
    },
    QueueColumn {
        title: "retryable",
        cell: |r, _| count_link(&r.queue, "retryable", r.retryable),
    },
    QueueColumn {
        title: "failed",
        cell: |r, _| dead_count(r, "failed", r.failed),
    },
    QueueColumn {
        title: "cancelled",
        cell: |r, _| dead_count(r, "cancelled", r.cancelled),
    },
    QueueColumn {
        title: "oldest waiting",
        cell: |r, _| html! { (age(r.oldest_available_seconds)) },
    },
    QueueColumn {
        title: "hosts",
        cell: |r, _| html! { span class=(if r.hosts == 0 { "gone" } else { "" }) { (r.hosts) } },
    },
];

/// Paused or active, with the button that changes it when the visitor may act.
fn queue_status(row: &QueueRow, ctx: &Ctx<'_>) -> Markup {
    let (status, verb, label) = if row.settings.paused {
        ("paused", "resume", "Resume")
    } else {
        ("active", "pause", "Pause")
    };
    let action = format!(
        "/queues/{}/{verb}",
        percent_encoding::utf8_percent_encode(&row.queue, percent_encoding::NON_ALPHANUMERIC)
    );
    html! {
        span class=(if row.settings.paused { "failed" } else { "" }) { (status) }
        @if ctx.can_act() {
            " "
            form.inline method="post" action=(action) {
                input type="hidden" name="csrf" value=(ctx.csrf.unwrap_or(""));
                button type="submit" { (label) }
            }
        }
    }
}

fn age(seconds: f64) -> String {
    match seconds {
        s if s <= 0.0 => "–".into(),
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

/// `/`: every queue, and the fleet's throughput.
pub fn queues(ctx: &Ctx<'_>, rows: &[QueueRow], hosts: &[HostRow]) -> Markup {
    let running: Vec<&HostRow> = hosts.iter().filter(|h| h.status == "running").collect();
    let rate = running
        .iter()
        .fold(0.0, |sum, h| sum + h.workload.jobs_per_second);
    let body = html! {
        p {
            (running.len()) " host(s) running, "
            (running.iter().map(|h| h.workload.alive).sum::<i32>()) " children alive, "
            (format!("{rate:.1}")) " jobs/s. "
            span.muted {
                "Dead-letter counts stop at " (DEAD_COUNT_CAP) " (shown with +). Refreshes every 5 s."
            }
        }
        @if rows.is_empty() {
            p { "No queue has jobs yet, and no host serves one." }
        } @else {
            table #queues {
                thead { tr {
                    th { "queue" }
                    @for c in QUEUE_COLUMNS { th { (c.title) } }
                } }
                tbody {
                    @for r in rows {
                        tr {
                            td { a href=(jobs_href(&Filter { queue: Some(r.queue.clone()), ..Filter::default() }, None)) { (r.queue) } }
                            @for c in QUEUE_COLUMNS { td.n { ((c.cell)(r, ctx)) } }
                        }
                    }
                }
            }
        }
    };
    layout(ctx, "Queues", Some(5), body)
}

/// A small form that POSTs one action on one job.
fn action(ctx: &Ctx<'_>, id: i64, verb: &str, label: &str, back: &str) -> Markup {
    html! {
        form.inline method="post" action=(format!("/jobs/{id}/{verb}")) {
            input type="hidden" name="csrf" value=(ctx.csrf.unwrap_or(""));
            input type="hidden" name="back" value=(back);
            button type="submit" name="action" value=(verb) { (label) }
        }
    }
}

/// The actions a job in `state` allows.
fn job_actions(ctx: &Ctx<'_>, id: i64, state: &str, back: &str) -> Markup {
    html! {
        @if ctx.can_act() {
            @match state {
                "failed" | "cancelled" => {
                    (action(ctx, id, "retry", "Retry", back)) " "
                    (action(ctx, id, "discard", "Discard", back))
                }
                "completed" => {}
                _ => { (action(ctx, id, "cancel", "Cancel", back)) }
            }
        }
    }
}

/// `/jobs`: a filter form and one keyset page.
pub fn jobs(ctx: &Ctx<'_>, filter: &Filter, page: &Page, back: &str) -> Markup {
    let states = crate::queue::admin::STATES;
    let body = html! {
        form.filters method="get" action="/jobs" {
            label { "queue " input name="queue" value=(filter.queue.as_deref().unwrap_or("")); }
            label { "state "
                select name="state" {
                    option value="" { "any" }
                    @for s in states {
                        option value=(s) selected[filter.state.as_deref() == Some(s)] { (s) }
                    }
                }
            }
            label { "task " input name="task" value=(filter.task.as_deref().unwrap_or("")); }
            button type="submit" { "Filter" }
        }
        @if page.jobs.is_empty() {
            p { "No job matches on this page." }
        } @else {
            table #jobs {
                thead { tr {
                    th { "id" } th { "queue" } th { "task" } th { "state" } th { "attempt" }
                    th { "runs / finished at" } th { "error" } th {}
                } }
                tbody {
                    @for j in &page.jobs {
                        tr {
                            td.n { a href=(format!("/jobs/{}", j.id)) { (j.id) } }
                            td { (j.queue) }
                            td { (j.task) }
                            td class=(j.state) { (j.state) }
                            td.n { (j.attempt) "/" (j.max_attempts) }
                            td { (j.at) }
                            td { (j.error.as_deref().unwrap_or("")) }
                            td { (job_actions(ctx, j.id, &j.state, back)) }
                        }
                    }
                }
            }
        }
        @if let Some(next) = page.next {
            p {
                @if page.partial {
                    span.muted { "This page looked at jobs down to #" (next) " without filling up. " }
                }
                a #older href=(jobs_href(filter, Some(next))) { "Older jobs →" }
            }
        }
    };
    layout(ctx, "Jobs", None, body)
}

/// A JSON value pretty-printed and cut at [`PREVIEW_BYTES`], with a link to all of it.
fn preview(value: &Value, full: &str) -> Markup {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    let cut = (text.len() > PREVIEW_BYTES).then(|| {
        let mut end = PREVIEW_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        end
    });
    html! {
        @match cut {
            Some(end) => {
                pre { (&text[..end]) "…" }
                p { "Cut at " (PREVIEW_BYTES) " of " (text.len()) " bytes: " a href=(full) { "the full value" } "." }
            }
            None => pre { (text) },
        }
    }
}

/// `/jobs/ID`: everything about one job.
pub fn job(ctx: &Ctx<'_>, job: &Value) -> Markup {
    let id = job["id"].as_i64().unwrap_or(0);
    let state = job["state"].as_str().unwrap_or("");
    let field = |name: &str| match &job[name] {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let back = format!("/jobs/{id}");
    let body = html! {
        p { (job_actions(ctx, id, state, &back)) }
        table #job {
            tr { th { "state" } td class=(state) { (state) } }
            tr { th { "queue" } td { a href=(jobs_href(&Filter { queue: Some(field("queue")), ..Filter::default() }, None)) { (field("queue")) } } }
            tr { th { "task" } td { (field("task")) } }
            tr { th { "attempts" } td { (field("attempt")) " of " (field("max_attempts")) } }
            tr { th { "priority" } td { (field("priority")) } }
            @if !field("batch_id").is_empty() {
                tr { th { "batch" } td { a href=(format!("/batches?before={}", job["batch_id"].as_i64().unwrap_or(0) + 1)) { (field("batch_id")) } } }
            }
            @if !field("unique_key").is_empty() {
                tr { th { "unique key" } td { (field("unique_key")) } }
            }
            @if !field("lease_owner").is_empty() {
                tr { th { "leased by" } td { (field("lease_owner")) " until " (field("lease_expires_at")) } }
            }
            @if job["cancel_requested"] == Value::Bool(true) {
                tr { th { "cancel" } td { "requested: its handler is told to stop; it will not be retried" } }
            }
        }
        h2 { "Timeline" }
        table #timeline {
            tr { th { "enqueued" } td { (field("created_at")) } }
            @if !field("run_at").is_empty() {
                tr { th { "runs at" } td { (field("run_at")) } }
            }
            @if !field("finished_at").is_empty() {
                tr { th { "finished" } td { (field("finished_at")) } }
            }
        }
        @if !field("last_error").is_empty() {
            h2 { "Error" }
            pre.failed #error { (field("last_error")) }
        }
        h2 { "Payload" }
        (preview(&job["payload"], &format!("/jobs/{id}/payload")))
        @if !job["result"].is_null() {
            h2 { "Result" }
            (preview(&job["result"], &format!("/jobs/{id}/result")))
        }
    };
    layout(ctx, &format!("Job {id}"), None, body)
}

/// `/batches`: one keyset page of batches, newest first.
pub fn batches(
    ctx: &Ctx<'_>,
    batches: &[BatchInfo],
    state: Option<&str>,
    next: Option<i64>,
) -> Markup {
    let body = html! {
        @if batches.is_empty() {
            p { "No batch here." }
        } @else {
            table #batches {
                thead { tr {
                    th { "id" } th { "queue" } th { "state" } th { "total" } th { "pending" }
                    th { "succeeded" } th { "failed" } th { "cancelled" } th { "completion job" } th { "created" }
                } }
                tbody {
                    @for b in batches {
                        tr {
                            td.n { (b.status.id) }
                            td { (b.queue) }
                            td class=(b.status.state) { (b.status.state) }
                            td.n { (b.status.total) }
                            td.n { (b.status.pending) }
                            td.n { (b.status.succeeded) }
                            td.n { (b.status.failed) }
                            td.n { (b.status.cancelled) }
                            td { @if let Some(j) = b.completion_job_id { a href=(format!("/jobs/{j}")) { (j) } } }
                            td { (b.created_at) }
                        }
                    }
                }
            }
        }
        @if let Some(next) = next {
            @let mut query = form_urlencoded::Serializer::new(String::new());
            @let query = {
                if let Some(s) = state { query.append_pair("state", s); }
                query.append_pair("before", &next.to_string()).finish()
            };
            p { a href=(format!("/batches?{query}")) { "Older batches →" } }
        }
    };
    layout(ctx, "Batches", None, body)
}

/// `/schedules`: every schedule the database holds (declared by the daemons' FORKQ_SCHEDULES
/// files), with its next and last run and the last job it enqueued.
pub fn schedules(ctx: &Ctx<'_>, schedules: &[Stored]) -> Markup {
    let now = jiff::Timestamp::now();
    let at = |t: Option<jiff::Timestamp>| {
        t.map_or("-".to_string(), |t| {
            t.strftime("%Y-%m-%d %H:%M:%SZ").to_string()
        })
    };
    let body = html! {
        @if schedules.is_empty() {
            p #empty { "No schedules: a daemon declares the schedules of its FORKQ_SCHEDULES file when it starts." }
        } @else {
            table #schedules {
                thead { tr { th { "Name" } th { "Cron" } th { "Time zone" } th { "Queue / task" }
                             th { "Next run" } th { "Last run" } th { "Last job" } } }
                tbody {
                    @for s in schedules {
                        tr {
                            td { (s.name) }
                            td { code { (s.field("cron")) } }
                            td { (s.field("timezone")) }
                            td { (s.field("queue")) " / " (s.field("task")) }
                            td { (at(s.next_run(now))) }
                            td { (at(s.last_run_at)) }
                            td {
                                @if let Some(id) = s.last_job_id {
                                    a href=(format!("/jobs/{id}")) { (id) }
                                } @else { "-" }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(ctx, "Schedules", None, body)
}

/// `/hosts`: every daemon and its slots.
pub fn hosts(ctx: &Ctx<'_>, hosts: &[HostRow]) -> Markup {
    let body = html! {
        @if hosts.is_empty() {
            p { "No daemon has recorded itself in this schema yet." }
        }
        @for h in hosts {
            h2 { (h.host) " " span class=(h.status) { "(" (h.status) ")" } }
            p {
                "boot " (h.boot) ", pid " (h.pid) ", forkq " (h.version) ", queues " (h.workload.queues.join(", "))
                ", " (h.workload.alive) "/" (h.workload.concurrency) " children alive, " (h.workload.busy) " busy, "
                (format!("{:.1}", h.workload.jobs_per_second)) " jobs/s, "
                (h.workload.succeeded) " succeeded and " (h.workload.failed) " failed since " (h.started_at)
                "; last seen " (format!("{:.0}", h.seconds_since_seen)) " s ago."
                @if let Some(at) = &h.released_at {
                    " Its jobs were brought back at " (at) " because it was gone."
                }
                @if !h.workload.crash_looping.is_empty() {
                    span.failed { " Crash-looping slots: " (format!("{:?}", h.workload.crash_looping)) "." }
                }
            }
            table.slots {
                thead { tr {
                    th { "slot" } th { "pid" } th { "state" } th { "job" } th { "in job" }
                    th { "heartbeat" } th { "restarts" } th { "last exit" }
                } }
                tbody {
                    @for s in h.workload.slots.as_array().into_iter().flatten() {
                        tr {
                            td.n { (s["slot"]) }
                            td.n { (s["pid"]) }
                            td class=(s["state"].as_str().unwrap_or("")) { (s["state"].as_str().unwrap_or("")) }
                            td { @if let Some(j) = s["job_id"].as_i64() { a href=(format!("/jobs/{j}")) { (j) } } }
                            td.n { @if let Some(t) = s["seconds_in_job"].as_f64() { (format!("{t:.1} s")) } }
                            td.n { (format!("{:.1} s ago", s["seconds_since_heartbeat"].as_f64().unwrap_or(0.0))) }
                            td.n { (s["restarts"]) }
                            td { (s["last_exit"].as_str().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    };
    layout(ctx, "Hosts", Some(5), body)
}

/// `/login`.
pub fn login(ctx: &Ctx<'_>, error: Option<&str>) -> Markup {
    let body = html! {
        @if let Some(e) = error { p.notice { (e) } }
        @if ctx.actions_enabled {
            form method="post" action="/login" {
                label { "Dashboard token " input type="password" name="token" autocomplete="current-password"; }
                " "
                button type="submit" { "Log in" }
            }
        }
    };
    layout(ctx, "Log in", None, body)
}

/// An error or status page.
pub fn message(ctx: &Ctx<'_>, title: &str, text: &str) -> Markup {
    layout(
        ctx,
        title,
        None,
        html! { p #message { (text) } p { a href="/" { "Back to the queues" } } },
    )
}
