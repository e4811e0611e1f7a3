//! Headless Chromium driven through chromedriver's W3C WebDriver endpoints (JSON over HTTP), for
//! tests that look at pages as a person does: load, read, fill in, click, screenshot.
//!
//! The handful of WebDriver calls the tests use are written out here over a plain TCP stream:
//! the WebDriver client crates are async and would bring a runtime into the tests for six
//! requests. Chromium and chromedriver are Debian's, installed by `scripts/ops-tools.sh browser`
//! when missing. Every process started here is killed by pid when its guard drops.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use super::{free_port, wait_until};

/// Where screenshots go: `target/test-output/`.
pub fn output_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-output");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Installs Chromium and chromedriver with the project's script when they are missing.
fn ensure_installed() {
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !(have("chromium") && have("chromedriver")) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ops-tools.sh");
        let _ = Command::new("bash").args([script, "browser"]).status();
    }
    assert!(
        have("chromium") && have("chromedriver"),
        "headless Chromium is needed and could not be installed: run `scripts/ops-tools.sh browser` \
         (apt-get install chromium chromium-driver)"
    );
}

/// One browser session.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile.
    pub fn start() -> Browser {
        ensure_installed();
        let port = free_port();
        let mut command = Command::new("chromedriver");
        command
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so Chromium's processes go with it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let driver = command.spawn().expect("start chromedriver");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let profile =
            std::env::temp_dir().join(format!("forkq-chromium-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            profile,
        };
        assert!(
            wait_until(Duration::from_secs(20), || browser
                .call("GET", "/status", None)
                .is_some_and(|v| v["value"]["ready"] == true)),
            "chromedriver did not become ready"
        );
        let args = [
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--window-size=1280,900".into(),
            format!("--user-data-dir={}", browser.profile.display()),
        ];
        let created = browser
            .call(
                "POST",
                "/session",
                Some(json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
                }}})),
            )
            .expect("chromedriver answers");
        browser.session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {created}"))
            .to_string();
        browser
    }

    /// One WebDriver request; the JSON answer, or `None` when chromedriver does not answer.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Option<Value> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .ok()?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .ok()?;
        // chromedriver keeps the socket open after its answer: read exactly Content-Length.
        let mut response = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            response.extend_from_slice(&chunk[..n]);
            let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())?;
            if response.len() >= end + 4 + length {
                return serde_json::from_slice(&response[end + 4..end + 4 + length]).ok();
            }
        }
    }

    /// A call within this session; panics with WebDriver's message on an error.
    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let answer = self
            .call(method, &format!("/session/{}{path}", self.session), body)
            .expect("chromedriver answers");
        if answer["value"]["error"].is_string() {
            panic!("WebDriver {method} {path}: {}", answer["value"]);
        }
        answer["value"].clone()
    }

    /// Loads `url` and waits for it.
    pub fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url })));
    }

    /// The page's title.
    pub fn title(&self) -> String {
        self.session_call("GET", "/title", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The page's HTML as the browser holds it.
    pub fn source(&self) -> String {
        self.session_call("GET", "/source", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn element(&self, css: &str) -> String {
        let found = self.session_call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_string()
    }

    /// The text a person sees in the first element matching `css`.
    pub fn text(&self, css: &str) -> String {
        let id = self.element(css);
        self.session_call("GET", &format!("/element/{id}/text"), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Clicks the first element matching `css` (as a person would: WebDriver moves the pointer
    /// there and clicks, so a hidden or covered element fails) and waits up to 20 s for the page
    /// the click leads to: chromedriver may answer a click that submits a form before the next
    /// page has loaded (seen on a loaded machine), so the old page is marked first and the wait
    /// ends on a loaded page without the mark. Every click in these tests leads to a new page.
    pub fn click(&self, css: &str) {
        let id = self.element(css);
        let marked = self.script("window.forkqOldPage = true; return true");
        assert_eq!(
            marked,
            Some(json!(true)),
            "could not mark the page before clicking {css}"
        );
        self.session_call("POST", &format!("/element/{id}/click"), Some(json!({})));
        let loaded = wait_until(Duration::from_secs(20), || {
            self.script("return !window.forkqOldPage && document.readyState === 'complete'")
                == Some(json!(true))
        });
        assert!(loaded, "clicking {css} led to no new page within 20 s");
    }

    /// Runs `script` in the page; what it returns, or `None` while the page cannot answer (as
    /// during a navigation).
    fn script(&self, script: &str) -> Option<Value> {
        self.call(
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            Some(json!({ "script": script, "args": [] })),
        )
        .map(|answer| answer["value"].clone())
    }

    /// Types `text` into the first element matching `css`.
    pub fn fill(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.session_call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Saves a screenshot of the page as `target/test-output/<name>.png`; returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.session_call("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .expect("a base64 PNG");
        let path = output_dir().join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let group = nix::unistd::Pid::from_raw(-(self.driver.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
