//! `forkq dashboard`: the web dashboard, a process of its own (never forked from the
//! supervisor), serving server-rendered pages of queues, jobs, the dead letter, batches,
//! schedules and hosts on `FORKQ_DASHBOARD_ADDR`.
//!
//! Every page reads through the same query layer as the CLI ([`crate::queue::browse`],
//! [`crate::queue::overview`], [`crate::queue::hosts`]), paged by keyset and never counting the
//! archive's bulk. Actions (retry, cancel, discard) need `FORKQ_DASHBOARD_TOKEN` and pass
//! [`auth::Auth::authorize`]; each is logged with who asked. Nothing shows the environment or
//! the database URL.

pub mod auth;
pub mod pages;

use std::io::Read;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use maud::Markup;
use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;
use tiny_http::{Header, Method, Request, Response, Server};

use crate::config::{Config, DashboardSettings, Pooler, EX_CONFIG};
use crate::queue::browse::{self, Cursor, Filter, FilterError};
use crate::queue::{admin, batch, hosts, migrations, overview, queues, schedules, QueueError};
use auth::{Auth, Credentials, Verdict};
use pages::Ctx;

/// Request threads (and database connections).
const THREADS: u32 = 4;
/// The longest statement a page may run.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Jobs and batches per page.
const PAGE_SIZE: i64 = 50;
/// The largest form a POST may carry.
const MAX_FORM_BYTES: u64 = 16 * 1024;

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

struct App {
    config: Config,
    auth: Auth,
    pool: Pool,
}

/// Runs the dashboard until the process is stopped; returns the exit code when it cannot start.
pub fn serve(config: Config, settings: DashboardSettings) -> i32 {
    let listener = match TcpListener::bind(settings.addr) {
        Ok(l) => l,
        Err(e) => {
            log::error!(
                "cannot listen on {} for the dashboard (FORKQ_DASHBOARD_ADDR): {e}; pick a free address",
                settings.addr
            );
            return 1;
        }
    };
    let pool = match connect(&config) {
        Ok(pool) => pool,
        Err(e) => {
            log::error!(
                "{e}; check DATABASE_URL, that PostgreSQL is running and that `forkq migrate` ran"
            );
            return EX_CONFIG;
        }
    };
    let bound = listener.local_addr().map_or(settings.addr, |a| a);
    let auth = Auth::new(settings.token);
    log::info!(
        "dashboard on http://{bound}/ for schema {:?}; {}",
        config.schema,
        if auth.enabled() {
            "actions need the token (FORKQ_DASHBOARD_TOKEN)"
        } else {
            "read-only (no FORKQ_DASHBOARD_TOKEN)"
        }
    );
    let server = match Server::from_listener(listener, None) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            log::error!("cannot start the dashboard's HTTP server: {e}");
            return 1;
        }
    };
    let app = Arc::new(App { config, auth, pool });
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let server = Arc::clone(&server);
            let app = Arc::clone(&app);
            std::thread::spawn(move || {
                while let Ok(request) = server.recv() {
                    app.handle(request);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    0
}

/// The dashboard's pool, after checking the schema once.
fn connect(config: &Config) -> Result<Pool, QueueError> {
    let mut pg: postgres::Config = config.database_url.parse()?;
    if pg.get_application_name().is_none() {
        pg.application_name("forkq dashboard");
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    let mut check = pg.connect(NoTls)?;
    migrations::require_current(&mut check, &config.schema)?;
    let manager = PostgresConnectionManager::new(pg, NoTls);
    let builder = r2d2::Pool::builder()
        .max_size(THREADS)
        .connection_timeout(Duration::from_secs(5));
    // Behind a transaction-mode pooler a session SET would stay behind on whichever server
    // connection ran it, for other clients; the role's statement_timeout bounds pages there.
    let builder = match config.pooler {
        Pooler::None => builder.connection_customizer(Box::new(SessionSettings)),
        Pooler::Transaction => builder,
    };
    builder
        .build(manager)
        .map_err(|e| QueueError::Unavailable(e.to_string()))
}

/// Bounds every statement of the dashboard's connections, so a page can never hang a thread.
#[derive(Debug)]
struct SessionSettings;

impl r2d2::CustomizeConnection<postgres::Client, postgres::Error> for SessionSettings {
    fn on_acquire(&self, client: &mut postgres::Client) -> Result<(), postgres::Error> {
        client.batch_execute(&format!(
            "SET statement_timeout = {}",
            STATEMENT_TIMEOUT.as_millis()
        ))
    }
}

/// A response on its way out.
struct Reply {
    code: u16,
    body: String,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn html(code: u16, markup: Markup) -> Reply {
        Reply {
            code,
            body: markup.into_string(),
            content_type: "text/html; charset=utf-8",
            headers: Vec::new(),
        }
    }

    fn redirect(to: &str) -> Reply {
        Reply {
            code: 303,
            body: String::new(),
            content_type: "text/plain",
            headers: vec![("Location", to.to_string())],
        }
    }
}

/// What went wrong with a request, as the page that says so.
enum Failure {
    BadRequest(String),
    NotFound(String),
    Forbidden(String),
    Database(QueueError),
}

impl From<QueueError> for Failure {
    fn from(e: QueueError) -> Self {
        Failure::Database(e)
    }
}

impl From<FilterError> for Failure {
    fn from(e: FilterError) -> Self {
        Failure::BadRequest(e.0)
    }
}

/// A request's form fields, in order.
type Form = Vec<(String, String)>;

/// Results of an action, as a notice on the page it returns to.
const NOTICES: &[(&str, &str)] = &[
    ("retried", "is back in its queue"),
    ("cancelled", "is cancelled"),
    (
        "cancelling",
        "is running; its handler is told to stop, and it will not be retried",
    ),
    ("discarded", "is deleted for good"),
    (
        "paused",
        "is paused: no new job of it starts; running ones finish",
    ),
    ("resumed", "is resumed"),
    (
        "not-dead",
        "is not in the dead letter (or a live job holds its unique key): nothing changed",
    ),
    ("finished", "had finished already: nothing changed"),
    (
        "kept",
        "is not in the dead letter, or belongs to an open batch: nothing changed",
    ),
];

/// A request, parsed once.
struct Incoming<'r> {
    request: &'r mut Request,
    path: String,
    query: Vec<(String, String)>,
}

impl Incoming<'_> {
    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn header(&self, name: &'static str) -> Option<&str> {
        self.request
            .headers()
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.as_str())
    }

    fn form(&mut self) -> Vec<(String, String)> {
        let mut body = Vec::new();
        let _ = self
            .request
            .as_reader()
            .take(MAX_FORM_BYTES)
            .read_to_end(&mut body);
        form_urlencoded::parse(&body).into_owned().collect()
    }

    /// Who is asking, for the log (the proxy's X-Forwarded-For too, when there is one).
    fn peer(&self) -> String {
        let addr = self
            .request
            .remote_addr()
            .map_or("?".into(), |a| a.to_string());
        match self.header("X-Forwarded-For") {
            Some(forwarded) => format!("{addr} (for {forwarded})"),
            None => addr,
        }
    }
}

impl App {
    fn handle(&self, mut request: Request) {
        let url = request.url().to_string();
        let (path, query) = url.split_once('?').unwrap_or((&url, ""));
        let mut incoming = Incoming {
            path: path.to_string(),
            query: form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect(),
            request: &mut request,
        };
        let reply = self.route(&mut incoming);
        let reply = reply.unwrap_or_else(|f| self.failure_page(&incoming, f));
        let mut response = Response::from_string(reply.body)
            .with_status_code(reply.code)
            .with_header(header("Content-Type", reply.content_type))
            .with_header(header("Cache-Control", "no-store"))
            .with_header(header("X-Content-Type-Options", "nosniff"))
            .with_header(header("Referrer-Policy", "same-origin"))
            .with_header(header("X-Frame-Options", "DENY"))
            .with_header(header(
                "Content-Security-Policy",
                "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; \
                 form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ));
        for (name, value) in &reply.headers {
            response = response.with_header(header(name, value));
        }
        let _ = request.respond(response);
    }

    fn ctx<'a>(
        &'a self,
        incoming: &Incoming<'_>,
        csrf: &'a Option<String>,
        notice: Option<&'a str>,
    ) -> Ctx<'a> {
        let logged_in = self.auth.logged_in(incoming.header("Cookie"));
        Ctx {
            actions_enabled: self.auth.enabled(),
            logged_in,
            csrf: csrf.as_deref().filter(|_| logged_in),
            notice,
        }
    }

    /// Renders a page with the request's context (and the notice of the action that led here).
    fn page(&self, incoming: &Incoming<'_>, render: impl FnOnce(&Ctx<'_>) -> Markup) -> Reply {
        let csrf = self.auth.csrf();
        let notice = self.notice(incoming);
        let ctx = self.ctx(incoming, &csrf, notice.as_deref());
        Reply::html(200, render(&ctx))
    }

    fn notice(&self, incoming: &Incoming<'_>) -> Option<String> {
        let code = incoming.param("notice")?;
        let (_, text) = NOTICES.iter().find(|(c, _)| *c == code)?;
        if let Some(queue) = incoming.param("queue") {
            return Some(format!("Queue {queue} {text}."));
        }
        let job: i64 = incoming.param("job")?.parse().ok()?;
        Some(format!("Job {job} {text}."))
    }

    fn failure_page(&self, incoming: &Incoming<'_>, failure: Failure) -> Reply {
        let (code, title, text) = match failure {
            Failure::BadRequest(why) => (400, "Bad request", why),
            Failure::NotFound(why) => (404, "Not found", why),
            Failure::Forbidden(why) => (403, "Forbidden", why),
            Failure::Database(e) => {
                log::warn!(
                    "dashboard: {} {}: {e}",
                    incoming.request.method(),
                    incoming.path
                );
                (
                    503,
                    "Database unavailable",
                    format!("The page could not be read: {e}"),
                )
            }
        };
        let csrf = self.auth.csrf();
        let ctx = self.ctx(incoming, &csrf, None);
        Reply::html(code, pages::message(&ctx, title, &text))
    }

    fn db(&self) -> Result<r2d2::PooledConnection<PostgresConnectionManager<NoTls>>, Failure> {
        self.pool
            .get()
            .map_err(|e| Failure::Database(QueueError::Unavailable(e.to_string())))
    }

    fn route(&self, r: &mut Incoming<'_>) -> Result<Reply, Failure> {
        let schema = self.config.schema.as_str();
        let method = r.request.method().clone();
        let segments: Vec<String> = r
            .path
            .trim_start_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        match (&method, segments.as_slice()) {
            (Method::Get | Method::Head, [""]) => {
                let mut db = self.db()?;
                let rows = overview::queues(&mut *db, schema)?;
                let hosts = hosts::list(&mut *db, schema)?;
                Ok(self.page(r, |ctx| pages::queues(ctx, &rows, &hosts)))
            }
            (Method::Get | Method::Head, ["jobs"]) => {
                let filter = Filter::parse(r.param("queue"), r.param("state"), r.param("task"))?;
                let after = match r.param("after").filter(|a| !a.is_empty()) {
                    None => None,
                    Some(a) => Some(a.parse::<i64>().map_err(|_| {
                        Failure::BadRequest(format!(
                            "after {a:?} is not a job id: use the last id of the previous page"
                        ))
                    })?),
                };
                let page = browse::page(
                    &mut *self.db()?,
                    schema,
                    &filter,
                    Cursor::new(after, PAGE_SIZE)?,
                )?;
                let back = pages::jobs_href(&filter, after);
                Ok(self.page(r, |ctx| pages::jobs(ctx, &filter, &page, &back)))
            }
            (Method::Get | Method::Head, ["jobs", id]) => {
                let id = job_id(id)?;
                let job = admin::job(&mut *self.db()?, schema, id)?
                    .ok_or_else(|| Failure::NotFound(format!("There is no job {id}: it never existed, or it finished and its retention passed.")))?;
                Ok(self.page(r, |ctx| pages::job(ctx, &job)))
            }
            (Method::Get | Method::Head, ["jobs", id, part @ ("payload" | "result")]) => {
                let id = job_id(id)?;
                let job = admin::job(&mut *self.db()?, schema, id)?
                    .ok_or_else(|| Failure::NotFound(format!("There is no job {id}.")))?;
                Ok(Reply {
                    code: 200,
                    body: job[*part].to_string(),
                    content_type: "application/json",
                    headers: Vec::new(),
                })
            }
            (Method::Post, ["jobs", id, verb @ ("retry" | "cancel" | "discard")]) => {
                let id = job_id(id)?;
                self.act(r, id, verb)
            }
            (Method::Post, ["queues", queue, verb @ ("pause" | "resume")]) => {
                let queue = percent_decode(queue);
                self.pause(r, &queue, verb)
            }
            (Method::Get | Method::Head, ["batches"]) => {
                let state = r.param("state").filter(|s| !s.is_empty());
                if let Some(s) = state {
                    if !batch::STATES.contains(&s) {
                        return Err(Failure::BadRequest(format!(
                            "unknown batch state {s:?}: use one of {}",
                            batch::STATES.join(", ")
                        )));
                    }
                }
                let before = match r.param("before").filter(|b| !b.is_empty()) {
                    None => None,
                    Some(b) => Some(b.parse::<i64>().map_err(|_| {
                        Failure::BadRequest(format!("before {b:?} is not a batch id"))
                    })?),
                };
                let list = batch::list(&mut *self.db()?, schema, state, PAGE_SIZE, before)?;
                let next = (list.len() as i64 == PAGE_SIZE)
                    .then(|| list.last().map(|b| b.status.id))
                    .flatten();
                Ok(self.page(r, |ctx| pages::batches(ctx, &list, state, next)))
            }
            (Method::Get | Method::Head, ["schedules"]) => {
                let stored = schedules::stored(&mut *self.db()?, schema, None)?;
                Ok(self.page(r, |ctx| pages::schedules(ctx, &stored)))
            }
            (Method::Get | Method::Head, ["hosts"]) => {
                let hosts = hosts::list(&mut *self.db()?, schema)?;
                Ok(self.page(r, |ctx| pages::hosts(ctx, &hosts)))
            }
            (Method::Get | Method::Head, ["login"]) => {
                Ok(self.page(r, |ctx| pages::login(ctx, None)))
            }
            (Method::Post, ["login"]) => self.login(r),
            (Method::Post, ["logout"]) => {
                let mut reply = Reply::redirect("/");
                reply.headers.push((
                    "Set-Cookie",
                    format!(
                        "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict",
                        auth::COOKIE
                    ),
                ));
                Ok(reply)
            }
            (Method::Get | Method::Head | Method::Post, _) => Err(Failure::NotFound(format!(
                "There is no page {:?} here: see the links above.",
                r.path
            ))),
            _ => Err(Failure::BadRequest(format!(
                "method {method} is not used here: pages are GET, actions POST"
            ))),
        }
    }

    /// Logs in: a right token sets the session cookie.
    fn login(&self, r: &mut Incoming<'_>) -> Result<Reply, Failure> {
        if !self.auth.enabled() {
            return Err(Failure::Forbidden(
                "This dashboard is read-only: it has no FORKQ_DASHBOARD_TOKEN.".into(),
            ));
        }
        let form = r.form();
        let token = form
            .iter()
            .find(|(k, _)| k == "token")
            .map_or("", |(_, v)| v.as_str());
        if !self.auth.is_token(token) {
            log::warn!("dashboard: failed log-in from {}", r.peer());
            let csrf = self.auth.csrf();
            let ctx = self.ctx(r, &csrf, None);
            return Ok(Reply::html(
                403,
                pages::login(&ctx, Some("That is not the dashboard token.")),
            ));
        }
        log::info!("dashboard: log-in from {}", r.peer());
        let mut reply = Reply::redirect("/");
        reply.headers.push((
            "Set-Cookie",
            format!(
                "{}={}; Path=/; HttpOnly; SameSite=Strict",
                auth::COOKIE,
                self.auth.session().unwrap_or_default()
            ),
        ));
        Ok(reply)
    }

    /// Whether the action `what` (for the log: "retry job 7") may go ahead: how the request was
    /// authorized, and its form fields; refusals are logged.
    fn authorize(&self, r: &mut Incoming<'_>, what: &str) -> Result<(&'static str, Form), Failure> {
        let form = r.form();
        let csrf = form
            .iter()
            .find(|(k, _)| k == auth::CSRF_FIELD)
            .map(|(_, v)| v.as_str());
        let verdict = self.auth.authorize(&Credentials {
            cookie: r.header("Cookie"),
            authorization: r.header("Authorization"),
            csrf,
            origin: r.header("Origin"),
            fetch_site: r.header("Sec-Fetch-Site"),
            host: r.header("Host"),
        });
        match verdict {
            Verdict::Allowed(how) => Ok((how, form)),
            Verdict::ReadOnly => {
                log::warn!("dashboard: refused to {what} for {}: read-only", r.peer());
                Err(Failure::Forbidden("This dashboard is read-only: it has no FORKQ_DASHBOARD_TOKEN, so nothing was changed.".into()))
            }
            Verdict::Forbidden(why) => {
                log::warn!("dashboard: refused to {what} for {}: {why}", r.peer());
                Err(Failure::Forbidden(format!(
                    "Refused, nothing was changed: {why}."
                )))
            }
        }
    }

    /// Pause or resume one queue, if the request may; logged either way.
    fn pause(&self, r: &mut Incoming<'_>, queue: &str, verb: &str) -> Result<Reply, Failure> {
        if !crate::config::is_valid_queue_name(queue) {
            return Err(Failure::BadRequest(format!(
                "{queue:?} is not a queue name"
            )));
        }
        let (how, _) = self.authorize(r, &format!("{verb} queue {queue}"))?;
        let change = queues::Change {
            paused: Some(verb == "pause"),
            ..queues::Change::default()
        };
        queues::set(&mut *self.db()?, &self.config.schema, queue, &change)?;
        let outcome = if verb == "pause" { "paused" } else { "resumed" };
        log::info!("dashboard: {verb} queue {queue:?} by {} ({how})", r.peer());
        let mut query = form_urlencoded::Serializer::new(String::new());
        query
            .append_pair("notice", outcome)
            .append_pair("queue", queue);
        Ok(Reply::redirect(&format!("/?{}", query.finish())))
    }

    /// Retry, cancel or discard one job, if the request may; logged either way.
    fn act(&self, r: &mut Incoming<'_>, id: i64, verb: &str) -> Result<Reply, Failure> {
        let (how, form) = self.authorize(r, &format!("{verb} job {id}"))?;
        let field = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let schema = self.config.schema.as_str();
        let mut db = self.db()?;
        let outcome = match verb {
            "retry" => {
                if admin::retry(&mut *db, schema, id)? {
                    "retried"
                } else {
                    "not-dead"
                }
            }
            "cancel" => {
                match admin::cancel(&mut *db, schema, id, !self.config.retention.is_zero())?
                    .as_deref()
                {
                    None => return Err(Failure::NotFound(format!("There is no job {id}."))),
                    Some("cancelled") => "cancelled",
                    Some("cancelling") => "cancelling",
                    Some(_) => "finished",
                }
            }
            _ => {
                if browse::discard(&mut *db, schema, id)? {
                    "discarded"
                } else {
                    "kept"
                }
            }
        };
        log::info!(
            "dashboard: {verb} job {id} by {} ({how}): {outcome}",
            r.peer()
        );
        let back = field("back")
            .filter(|b| {
                b.starts_with('/') && !b.starts_with("//") && !b.contains(['\r', '\n', '\\'])
            })
            .map_or_else(|| format!("/jobs/{id}"), str::to_string);
        let join = if back.contains('?') { '&' } else { '?' };
        Ok(Reply::redirect(&format!(
            "{back}{join}notice={outcome}&job={id}"
        )))
    }
}

fn job_id(raw: &str) -> Result<i64, Failure> {
    raw.parse::<i64>().ok().filter(|&id| id > 0).ok_or_else(|| {
        Failure::BadRequest(format!(
            "{raw:?} is not a job id: job ids are positive integers"
        ))
    })
}

fn percent_decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes())
        .expect("header names and values are ASCII")
}
