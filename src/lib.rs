//! forkq: a prefork worker daemon for a job queue that lives in PostgreSQL.
//!
//! A single-threaded supervisor forks consumer children; each opens its own connection, claims
//! jobs with `FOR UPDATE SKIP LOCKED`, runs them through a [`Handler`] and heartbeats into shared
//! memory. Producers enqueue through [`Client`], the `forkq` CLI or the SQL function
//! `<schema>.enqueue(...)`.
//!
//! To run your own Rust code as the handler:
//!
//! ```no_run
//! use forkq::{Config, Handler, Job, JobContext, Outcome};
//!
//! struct Greeter;
//! impl Handler for Greeter {
//!     fn handle(&mut self, job: &Job, _ctx: &mut dyn JobContext) -> Outcome {
//!         Outcome::Success(serde_json::json!({ "greeted": job.payload["name"] }))
//!     }
//! }
//!
//! forkq::logging::init().unwrap_or_else(|e| forkq::exit_on_config_error(e));
//! let config = Config::from_env().unwrap_or_else(|e| forkq::exit_on_config_error(e));
//! std::process::exit(forkq::run(config, |_config| Box::new(Greeter)));
//! ```

pub mod backoff;
pub mod child;
pub mod claim_gate;
pub mod client;
pub mod config;
pub mod dashboard;
mod database_hooks;
pub mod futex;
pub mod handler;
pub mod host;
pub mod logging;
pub mod presence;
pub mod probe;
pub mod proctitle;
pub mod queue;
pub mod schedule;
pub mod slots;
pub mod supervisor;
pub mod ticker;
pub mod wakeup;

pub use client::Client;
pub use config::Config;
pub use handler::{Handler, Job, JobContext, Outcome};
pub use queue::batch::NewBatch;
pub use queue::producer::NewJob;
pub use queue::QueueError;

/// Runs the supervisor and its fleet until it is stopped; returns the exit code for
/// `std::process::exit`. Each process titles itself for `ps` by writing over the memory of the
/// program's arguments and environment (see [`proctitle`]): read `std::env::args()` before. `factory` builds each child's default handler after the fork (tasks
/// with a `FORKQ_ROUTES` entry go to their route instead; an `exec:` or `coproc:` handler in
/// `FORKQ_HANDLER` replaces it).
pub fn run<F>(config: Config, factory: F) -> i32
where
    F: Fn(&Config) -> Box<dyn Handler> + 'static,
{
    let routed = move |config: &Config| -> Box<dyn Handler> {
        Box::new(handler::Router::new(config, || factory(config)))
    };
    supervisor::run(config, &routed, database_hooks::HOOKS)
}

/// Prints a configuration error and exits with code 78 (`EX_CONFIG`).
pub fn exit_on_config_error(error: config::ConfigError) -> ! {
    eprintln!("forkq: {error}");
    std::process::exit(config::EX_CONFIG)
}
