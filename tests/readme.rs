//! The README's quick tour runs as written, so it cannot rot: its shell block is taken from the
//! README and run by bash on a fresh schema, in a directory where `target/release/forkq` is the
//! binary under test.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::*;

/// The health port the tour gives its daemon (beside `make run`'s 9280).
const TOUR_PORT: u16 = 9282;

#[test]
fn the_quick_tour_runs_as_written_on_a_fresh_schema() {
    let tour = doc_block(include_str!("../README.md"), "Quick tour");
    assert!(
        tour.contains(&format!("127.0.0.1:{TOUR_PORT}")),
        "the tour's daemon must keep off make run's port 9280:\n{tour}"
    );
    if let Err(e) = TcpListener::bind(("127.0.0.1", TOUR_PORT)) {
        panic!("port {TOUR_PORT} is taken ({e}): stop whatever runs the quick tour, then retry");
    }
    let schema = FreshSchema::new("tour");
    let run = run_doc_script("tour", &tour, &schema.0, Duration::from_secs(60));
    let printed = run.printed;
    let status = run
        .status
        .unwrap_or_else(|| panic!("the tour did not finish in 60 s:\n{printed}"));
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
    let _ = std::fs::remove_dir_all(&run.dir);
}
