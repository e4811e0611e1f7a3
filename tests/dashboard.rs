//! `forkq dashboard` against a real daemon and database, looked at in headless Chromium: what a
//! person sees on each page, a dead-lettered job retried by clicking, and the requests that must
//! change nothing. Screenshots are kept in target/test-output/.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::browser::Browser;
use common::*;
use serde_json::json;

const TOKEN: &str = "test-token-0123456789abcdef";
const PASSWORD: &str = "sekrit-pw-4711";

/// The test database's URL with a password in it, and that password: the URL's own when it has
/// one, else [`PASSWORD`] (trust authentication ignores it).
fn url_with_password() -> (String, String) {
    let url = database_url();
    let Some((scheme, rest)) = url.split_once("://") else {
        return (format!("{url} password={PASSWORD}"), PASSWORD.into());
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    match authority.rsplit_once('@') {
        Some((user, _)) if user.contains(':') => {
            let password = user.split_once(':').unwrap().1.to_string();
            (url.clone(), password)
        }
        Some((user, host)) => (
            url.replacen(authority, &format!("{user}:{PASSWORD}@{host}"), 1),
            PASSWORD.into(),
        ),
        None => (
            format!("{scheme}://postgres:{PASSWORD}@{rest}"),
            PASSWORD.into(),
        ),
    }
}

/// A `forkq dashboard` process, killed by pid when dropped.
struct Dashboard {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Dashboard {
    /// Starts the dashboard on a free port, with the database password in its URL (trust auth
    /// ignores it) so the pages can be searched for it.
    fn start(schema: &TestSchema, token: Option<&str>) -> Dashboard {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "{}-dashboard-{}.log",
            schema.name,
            token.is_some()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let (url, _) = url_with_password();
        let mut cmd = Command::new(forkq_bin());
        cmd.arg("dashboard")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", url)
            .env("FORKQ_SCHEMA", &schema.name)
            .env("FORKQ_DASHBOARD_ADDR", "127.0.0.1:0")
            .env("FORKQ_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        if let Some(t) = token {
            cmd.env("FORKQ_DASHBOARD_TOKEN", t);
        }
        let child = cmd.spawn().expect("spawn forkq dashboard");
        let mut addr = None;
        assert!(
            wait_until(Duration::from_secs(20), || {
                addr = std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .split("dashboard on http://")
                    .nth(1)
                    .and_then(|rest| rest.split('/').next()?.parse().ok());
                addr.is_some()
            }),
            "the dashboard did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Dashboard {
            child,
            addr: addr.unwrap(),
            log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One raw HTTP request: (status, headers and body as text).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Length: {}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        write!(stream, "{head}\r\n{body}").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let code = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, response)
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- dashboard log ----\n{}", self.log_text());
        }
    }
}

/// Dead-letters job `id` at once, as a worker would after its last attempt.
fn dead_letter(schema: &TestSchema, id: i64, error: &str) {
    schema
        .client()
        .execute(
            &format!(
                "SELECT \"{0}\".retire(ARRAY[$1::bigint], ARRAY[NULL::bigint], ARRAY['failed'],
                                       ARRAY[$2::text], ARRAY[NULL::jsonb], true)",
                schema.name
            ),
            &[&id, &error],
        )
        .unwrap();
}

#[test]
fn every_page_shows_what_a_person_needs() {
    let schema = TestSchema::new("dash_pages");
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_QUEUES", "default,mail"),
            ("FORKQ_HOST_INTERVAL_SECONDS", "1"),
        ],
    );
    // A job that fails for good through the daemon, with its error.
    let limits = forkq::queue::producer::Limits {
        max_payload_bytes: 1 << 20,
        default_max_attempts: 25,
    };
    let failed = forkq::queue::producer::enqueue(
        &mut schema.client(),
        &schema.name,
        &limits,
        &forkq::NewJob::new(
            "mail",
            "fail",
            json!({"error": "SMTP relay refused: 554 5.7.1"}),
        )
        .with_max_attempts(1),
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(20), || schema
        .job(failed)
        .is_some_and(|j| j["state"] == "failed")));
    // A waiting job with a payload too big to show whole.
    let big = {
        let job = forkq::NewJob::new("reports", "render", json!({"rows": "x".repeat(20_000)}))
            .with_delay(3600.0);
        forkq::queue::producer::enqueue(&mut schema.client(), &schema.name, &limits, &job).unwrap()
    };
    let batch = forkq::queue::batch::create(
        &mut schema.client(),
        &schema.name,
        &limits,
        &forkq::NewBatch::new("reports"),
        &[forkq::NewJob::new("reports", "render", json!({})).with_delay(3600.0)],
    )
    .unwrap();

    let dashboard = Dashboard::start(&schema, None);
    let browser = Browser::start();

    browser.goto(&dashboard.url("/"));
    browser.screenshot("dashboard-queues");
    assert_eq!(browser.title(), "Queues · forkq");
    let queues = browser.text("#queues");
    assert!(
        queues.contains("mail") && queues.contains("reports"),
        "{queues}"
    );
    let mail_row = queues
        .lines()
        .find(|l| l.starts_with("mail"))
        .unwrap()
        .to_string();
    // status limits available running scheduled retryable failed cancelled oldest hosts
    assert!(
        mail_row.starts_with("mail active no limits 0 0 0 0 1 0"),
        "{mail_row}"
    );
    assert!(mail_row.ends_with(" 1"), "one host serves mail: {mail_row}");
    let reports_row = queues
        .lines()
        .find(|l| l.starts_with("reports"))
        .unwrap()
        .to_string();
    assert!(
        reports_row.starts_with("reports active no limits 0 0 2 0 0 0"),
        "{reports_row}"
    );
    assert!(
        reports_row.ends_with(" 0"),
        "no host serves reports: {reports_row}"
    );
    assert!(browser
        .text("main")
        .contains("Read-only: this dashboard has no FORKQ_DASHBOARD_TOKEN"));

    browser.goto(&dashboard.url("/jobs?state=failed"));
    browser.screenshot("dashboard-dead-letter");
    let jobs = browser.text("#jobs");
    assert!(jobs.contains("SMTP relay refused: 554 5.7.1"), "{jobs}");
    assert!(!jobs.contains("Retry"), "no action buttons when read-only");

    browser.goto(&dashboard.url(&format!("/jobs/{failed}")));
    browser.screenshot("dashboard-failed-job");
    assert_eq!(browser.text("#error"), "SMTP relay refused: 554 5.7.1");
    assert!(browser.text("#job").contains("1 of 1"));

    browser.goto(&dashboard.url(&format!("/jobs/{big}")));
    browser.screenshot("dashboard-big-payload");
    let main = browser.text("main");
    assert!(main.contains("Cut at 4096 of"), "{main}");
    browser.click("main a[href$='/payload']");
    let full: serde_json::Value = serde_json::from_str(&browser.text("body")).unwrap();
    assert_eq!(full["rows"].as_str().unwrap().len(), 20_000);

    browser.goto(&dashboard.url("/batches"));
    assert!(browser
        .text("#batches")
        .contains(&format!("{batch} reports open 1 1")));
    browser.goto(&dashboard.url("/hosts"));
    browser.screenshot("dashboard-hosts");
    let hosts = browser.text("main");
    assert!(
        hosts.contains("(running)") && hosts.contains("queues default, mail"),
        "{hosts}"
    );
    assert_eq!(
        hosts.matches("idle").count() + hosts.matches("claiming").count(),
        2,
        "two slots: {hosts}"
    );
    // The example schedules, as a daemon carrying examples/schedules.toml declares them.
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/schedules.toml");
    let declared = forkq::schedule::load(std::path::Path::new(file), 25).unwrap();
    forkq::queue::schedules::declare(
        &mut common::connect(),
        &schema.name,
        &declared,
        jiff::Timestamp::now(),
        "test",
    )
    .unwrap();
    browser.goto(&dashboard.url("/schedules"));
    let schedules = browser.text("#schedules");
    assert!(
        schedules.contains("every-second") && schedules.contains("ticks / noop"),
        "{schedules}"
    );
    assert!(
        schedules.contains("nightly-report") && schedules.contains("Europe/Berlin"),
        "{schedules}"
    );

    browser.goto(&dashboard.url("/jobs/987654321"));
    assert_eq!(browser.title(), "Not found · forkq");
    browser.goto(&dashboard.url("/jobs?state=finished"));
    assert_eq!(browser.title(), "Bad request · forkq");
    assert!(browser
        .text("#message")
        .contains("unknown state \"finished\""));

    // Nothing anywhere shows the password or the environment.
    let (_, password) = url_with_password();
    for path in [
        "/",
        "/jobs",
        "/hosts",
        "/batches",
        &format!("/jobs/{failed}"),
    ] {
        browser.goto(&dashboard.url(path));
        let html = browser.source();
        assert!(
            !html.contains(&password) && !html.contains("DATABASE_URL"),
            "{path} shows a secret"
        );
    }
    assert!(!dashboard.log_text().contains(&password));
    drop(daemon);
}

#[test]
fn a_dead_lettered_job_is_retried_by_clicking_and_runs() {
    let schema = TestSchema::new("dash_retry");
    let _daemon = Daemon::start(&schema, &[]);
    // The daemon serves `default`; the job is dead-lettered as after an outage of what it calls.
    let id = schema.enqueue("default", "noop", json!({"order": 42}));
    assert!(wait_until(Duration::from_secs(20), || schema
        .job(id)
        .is_some_and(|j| j["state"] == "completed")));
    schema
        .client()
        .execute(
            &format!(
                "INSERT INTO \"{0}\".jobs_archive (id, queue, task, payload, priority, state, attempt,
                                                   max_attempts, created_at, last_error)
                 SELECT nextval(pg_get_serial_sequence('\"{0}\".jobs', 'id')), 'default', 'noop',
                        '{{\"order\": 43}}', 0, 'failed', 3, 3, now(),
                        'payment gateway timed out'",
                schema.name
            ),
            &[],
        )
        .unwrap();
    let dead: i64 = schema.count("SELECT max(id) FROM {s}.jobs_archive WHERE state = 'failed'");
    let dashboard = Dashboard::start(&schema, Some(TOKEN));
    let browser = Browser::start();

    browser.goto(&dashboard.url("/jobs?state=failed"));
    assert!(
        !browser.text("#jobs").contains("Retry"),
        "no buttons before logging in"
    );
    browser.click("header a[href='/login']");
    browser.fill("input[name=token]", "not-the-token-at-all");
    browser.click("form[action='/login'] button");
    assert!(browser
        .text("main")
        .contains("That is not the dashboard token."));
    browser.fill("input[name=token]", TOKEN);
    browser.click("form[action='/login'] button");
    assert_eq!(browser.title(), "Queues · forkq");

    browser.goto(&dashboard.url("/jobs?state=failed"));
    browser.screenshot("dashboard-before-retry");
    assert!(browser.text("#jobs").contains("payment gateway timed out"));
    browser.click(&format!("form[action='/jobs/{dead}/retry'] button"));
    browser.screenshot("dashboard-after-retry");
    assert!(
        browser
            .text(".notice")
            .contains(&format!("Job {dead} is back in its queue.")),
        "{}",
        browser.text("main")
    );
    assert!(
        wait_until(Duration::from_secs(20), || schema
            .job(dead)
            .is_some_and(|j| j["state"] == "completed")),
        "the retried job did not run"
    );
    browser.goto(&dashboard.url(&format!("/jobs/{dead}")));
    browser.screenshot("dashboard-retried-job");
    assert!(browser.text("#job").contains("completed"));
    let log = dashboard.log_text();
    assert!(
        log.contains(&format!("dashboard: retry job {dead} by 127.0.0.1"))
            && log.contains("(session): retried"),
        "{log}"
    );
}

#[test]
fn requests_without_the_token_change_nothing() {
    let schema = TestSchema::new("dash_forged");
    let id = schema.enqueue("default", "noop", json!({}));
    dead_letter(&schema, id, "boom");
    let state = || {
        schema.job(id).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };

    let read_only = Dashboard::start(&schema, None);
    let (code, body) = read_only.request("POST", &format!("/jobs/{id}/retry"), &[], "");
    assert_eq!(code, 403);
    assert!(body.contains("read-only"), "{body}");

    let dashboard = Dashboard::start(&schema, Some(TOKEN));
    // The real values, as a logged-in browser would send them.
    let (_, login) = dashboard.request("POST", "/login", &[], &format!("token={TOKEN}"));
    let cookie = login
        .lines()
        .find_map(|l| l.strip_prefix("Set-Cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string();
    let (_, page) = dashboard.request("GET", &format!("/jobs/{id}"), &[("Cookie", &cookie)], "");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a csrf field")
        .to_string();
    let path = format!("/jobs/{id}/retry");
    let origin = format!("http://{}", dashboard.addr);
    for (what, headers, body) in [
        ("no cookie", vec![], format!("csrf={csrf}")),
        (
            "forged cookie",
            vec![("Cookie", "forkq_session=00ff00ff")],
            format!("csrf={csrf}"),
        ),
        (
            "no csrf field",
            vec![("Cookie", cookie.as_str())],
            String::new(),
        ),
        (
            "forged csrf field",
            vec![("Cookie", cookie.as_str())],
            "csrf=deadbeef".into(),
        ),
        (
            "another site",
            vec![
                ("Cookie", cookie.as_str()),
                ("Origin", "https://evil.example"),
            ],
            format!("csrf={csrf}"),
        ),
        (
            "wrong bearer token",
            vec![("Authorization", "Bearer guess")],
            String::new(),
        ),
    ] {
        let (code, _) = dashboard.request("POST", &path, &headers, &body);
        assert_eq!(code, 403, "{what}");
        assert_eq!(state(), "failed", "{what} changed the job");
    }
    let (code, body) = dashboard.request("POST", "/login", &[], "token=guess");
    assert_eq!(code, 403, "{body}");
    assert!(!body.contains("Set-Cookie"));

    // Bad addresses and filters.
    assert_eq!(dashboard.request("GET", "/jobs/987654321", &[], "").0, 404);
    assert_eq!(dashboard.request("GET", "/nowhere", &[], "").0, 404);
    let (code, body) = dashboard.request("GET", "/jobs?after=yesterday", &[], "");
    assert!(
        code == 400 && body.contains("after &quot;yesterday&quot; is not a job id"),
        "{body}"
    );
    let (code, body) = dashboard.request("GET", "/jobs?queue=a%20b", &[], "");
    assert!(
        code == 400 && body.contains("is not a queue name"),
        "{body}"
    );
    // Pause and resume: refused without the CSRF field, done with it (and logged).
    let paused =
        || schema.count("SELECT count(*) FROM {s}.queues WHERE name = 'default' AND paused");
    let (code, _) = dashboard.request("POST", "/queues/default/pause", &[("Cookie", &cookie)], "");
    assert_eq!((code, paused()), (403, 0));
    for (verb, want) in [("pause", 1), ("resume", 0)] {
        let (code, _) = dashboard.request(
            "POST",
            &format!("/queues/default/{verb}"),
            &[("Cookie", &cookie), ("Origin", &origin)],
            &format!("csrf={csrf}"),
        );
        assert_eq!((code, paused()), (303, want), "{verb}");
    }
    assert!(dashboard.log_text().contains("pause queue \"default\""));

    // The genuine request works, and says who did it.
    let (code, _) = dashboard.request(
        "POST",
        &path,
        &[("Cookie", &cookie), ("Origin", &origin)],
        &format!("csrf={csrf}&back=/jobs"),
    );
    assert_eq!(code, 303);
    assert_eq!(state(), "available");
    assert!(dashboard.log_text().contains("refused to retry job"));
}
