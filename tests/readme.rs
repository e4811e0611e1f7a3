//! The README's quick tour runs as written, so it cannot rot: its shell block is taken from the
//! README and run by bash on a fresh schema, in a directory where `target/release/forkq` is the
//! binary under test.

mod common;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// The health port the tour gives its daemon (beside `make run`'s 9280).
const TOUR_PORT: u16 = 9282;

/// The first fenced `sh` block of the README's "Quick tour" section.
fn quick_tour() -> String {
    let readme = include_str!("../README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Quick tour"))
        .expect("the README has a Quick tour section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .expect("the Quick tour has a ```sh block");
    block.split("\n```").next().unwrap().to_string() + "\n"
}

/// A process group killed by pid when dropped (the tour starts a daemon in the background).
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_quick_tour_runs_as_written_on_a_fresh_schema() {
    let tour = quick_tour();
    assert!(
        tour.contains(&format!("127.0.0.1:{TOUR_PORT}")),
        "the tour's daemon must keep off make run's port 9280:\n{tour}"
    );
    if let Err(e) = TcpListener::bind(("127.0.0.1", TOUR_PORT)) {
        panic!("port {TOUR_PORT} is taken ({e}): stop whatever runs the quick tour, then retry");
    }
    let schema = FreshSchema::new("tour");
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tour-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("target/release")).unwrap();
    std::os::unix::fs::symlink(forkq_bin(), dir.join("target/release/forkq")).unwrap();
    let output = dir.join("output.txt");
    let out = std::fs::File::create(&output).unwrap();

    let mut bash = Command::new("bash");
    bash.args(["-e", "-u", "-o", "pipefail", "-c", &tour])
        .current_dir(&dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url())
        .env("FORKQ_SCHEMA", &schema.0)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0);
    let mut group = Group(bash.spawn().expect("bash runs the tour"));
    let mut status = None;
    wait_until(Duration::from_secs(60), || {
        status = group.0.try_wait().unwrap();
        status.is_some()
    });
    let printed = std::fs::read_to_string(&output).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("the tour did not finish in 60 s:\n{printed}"));
    assert!(status.success(), "the tour failed ({status}):\n{printed}");
    println!("{printed}");

    for shown in [
        "\"alive_children\"",
        "forkq: child 0",
        "forkq: probe",
        " supervisor [",
        "all children stopped",
    ] {
        assert!(
            printed.contains(shown),
            "the tour printed no {shown:?}:\n{printed}"
        );
    }
    let mut db = connect();
    let mut count = |sql: &str| -> i64 {
        db.query_one(&sql.replace("{s}", &format!("\"{}\"", schema.0)), &[])
            .unwrap()
            .get(0)
    };
    assert_eq!(
        count("SELECT (SELECT count(*) FROM {s}.jobs) + (SELECT count(*) FROM {s}.jobs_archive)"),
        4,
        "sleep, two from jobs.jsonl and the scheduled one:\n{printed}"
    );
    assert_eq!(
        count("SELECT count(*) FROM {s}.jobs WHERE unique_key = 'nightly' AND state = 'scheduled'"),
        1
    );
    let _ = std::fs::remove_dir_all(&dir);
}
