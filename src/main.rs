//! The `forkq` command line: the daemon (`run`) and the admin commands.
//!
//! Settings come from the environment (see `config.example.env`); flags only say what to do.

mod input;

use std::io::Read;
use std::process::ExitCode;

use clap::{ArgGroup, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::json;

use forkq::config::{redacted_url, Config, EX_CONFIG};
use forkq::handler::{builtin::Builtin, Handler};
use forkq::queue::batch::{self, CancelOutcome, NewBatch};
use forkq::queue::producer::{self, Limits, NewJob};
use forkq::queue::queues::{self, Change, Rate};
use forkq::queue::waiting::{self, Finished};
use forkq::queue::{self, admin, browse, hosts, migrations, schedules, QueueError};

/// Exit code for refused input (`EX_DATAERR`).
const EX_DATAERR: u8 = 65;
/// `enqueue --wait`: the job failed for good (dead letter).
const EXIT_WAIT_FAILED: u8 = 4;
/// `enqueue --wait`: the job was cancelled.
const EXIT_WAIT_CANCELLED: u8 = 5;
/// `enqueue --wait`: the wait timed out (the job goes on), as with timeout(1).
const EXIT_WAIT_TIMEOUT: u8 = 124;

#[derive(Parser)]
#[command(
    name = "forkq",
    version,
    about = "A prefork worker daemon for a job queue in PostgreSQL",
    long_about = "A prefork worker daemon for a job queue in PostgreSQL.\n\n\
        Every setting is an environment variable (DATABASE_URL, FORKQ_*); see config.example.env.",
    after_help = "Examples:\n  forkq migrate\n  forkq enqueue --queue default --task noop\n  forkq run\n\n\
        Exit codes: 0 done, 1 the request failed (no such job, unhealthy), 2 usage error (unknown \
        command or flag), 65 bad input (invalid JSON, a refused job), 78 bad configuration or \
        database unreachable; `forkq run` adds 70 (crash loop with FORKQ_CRASH_LOOP_EXIT=1)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor and its children until SIGTERM.
    #[command(
        after_help = "Example:\n  DATABASE_URL=postgres://postgres@127.0.0.1/test FORKQ_CONCURRENCY=4 forkq run\n\n\
        Signals: TERM/INT graceful stop, QUIT immediate stop, HUP rolling restart, TTIN/TTOU one child more/less.\n\
        Exit codes: 0 stopped cleanly, 1 start-up failure (health address taken, fork failed), \
        70 crash loop with FORKQ_CRASH_LOOP_EXIT=1, 78 invalid configuration or database unreachable at start-up."
    )]
    Run,
    /// Apply pending schema migrations (safe to run concurrently).
    #[command(after_help = "Examples:\n  forkq migrate\n  forkq migrate --status")]
    Migrate {
        /// List migrations and whether each is applied, without changing anything.
        #[arg(long)]
        status: bool,
    },
    /// Enqueue one job, or many from JSON lines.
    #[command(
        after_help = "Examples:\n  forkq enqueue --queue default --task sleep --payload '{\"ms\": 500}'\n  \
        forkq enqueue --queue mail --task send --delay 60 --unique-key welcome-42\n  \
        forkq enqueue --queue reports --task daily --unique-key daily-report --unique-for 1h --json\n  \
        forkq enqueue --queue search --task reindex --payload '{\"user\": 7}' --delay 5 --unique-key reindex-7 --replace\n  \
        forkq enqueue --task resize --payload @job.json    # the payload from a file (- for stdin)\n  \
        forkq enqueue --queue default --jsonl jobs.jsonl   # each line {\"task\":..,\"payload\":..}\n  \
        forkq enqueue --queue api --task sync --concurrency-key customer-7 --timeout 60\n  \
        forkq enqueue --task report --wait --wait-timeout 300   # prints the result\n\n\
        --jsonl streams any number of lines into one transaction: all are enqueued or, at the first \
        refused line (named), none. On a terminal a progress line shows on stderr.\n\n\
        With --wait, exit codes: 0 completed (the result on stdout), 4 failed for good, \
        5 cancelled, 124 the wait timed out (the job goes on)."
    )]
    Enqueue(EnqueueArgs),
    /// Pause, resume and limit queues; list them with their settings and counts.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Show counts per queue and state.
    #[command(after_help = "Examples:\n  forkq status\n  forkq status --json")]
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one job (live or archived).
    #[command(after_help = "Example:\n  forkq job 42 --json")]
    Job {
        /// The job id.
        id: i64,
        /// Print compact JSON instead of pretty JSON.
        #[arg(long)]
        json: bool,
    },
    /// List jobs, live and archived, newest first, a page at a time.
    #[command(
        after_help = "Examples:\n  forkq jobs --state failed\n  forkq jobs --queue mail --task send --limit 20\n  \
        forkq jobs --state failed --after 4711 --json\n\n\
        Pages continue below the last id shown: pass it as --after. A page walks at most 5000 rows \
        of each table, so a rare filter may return a short page that says where to go on."
    )]
    Jobs {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many jobs (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Only jobs older than this id (the last id of the previous page).
        #[arg(long, value_name = "ID")]
        after: Option<i64>,
        /// Print {"jobs": [...], "next": ID or null, "partial": bool} instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move failed (dead-lettered) or cancelled jobs back to their queue: one by id, or every
    /// one a filter matches.
    #[command(
        after_help = "Examples:\n  forkq retry 42\n  forkq retry --queue default --yes\n  \
        forkq retry --state cancelled --task send --yes\n\n\
        Without an id, --state is failed unless given (failed or cancelled), and more than one \
        matching job needs --yes (without it, the count is printed and nothing changes)."
    )]
    Retry {
        /// The job id.
        #[arg(conflicts_with_all = ["queue", "state", "task", "failed"], required_unless_present_any = ["queue", "state", "task", "failed"])]
        id: Option<i64>,
        #[command(flatten)]
        filter: FilterArgs,
        /// The same as --state failed.
        #[arg(long, conflicts_with = "state")]
        failed: bool,
        /// Go ahead when more than one job matches.
        #[arg(long)]
        yes: bool,
    },
    /// Cancel jobs: at once when waiting; when running, their handler is told to stop (and they
    /// are never retried). One by id, or every live job a filter matches.
    #[command(
        after_help = "Examples:\n  forkq cancel 42\n  forkq cancel --queue mail --state scheduled --yes\n\n\
        More than one matching job needs --yes (without it, the count is printed and nothing changes)."
    )]
    Cancel {
        /// The job id.
        #[arg(conflicts_with_all = ["queue", "state", "task"], required_unless_present_any = ["queue", "state", "task"])]
        id: Option<i64>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Go ahead when more than one job matches.
        #[arg(long)]
        yes: bool,
    },
    /// List the daemons that serve this schema, as they recorded themselves.
    #[command(after_help = "Examples:\n  forkq hosts\n  forkq hosts --json\n\n\
        Each daemon writes its row every FORKQ_HOST_INTERVAL_SECONDS; one not seen for 3 intervals \
        is gone (stopped, if it said it was stopping) and its row is deleted an hour after it was \
        last seen.")]
    Hosts {
        /// Print one JSON object per host and line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve the web dashboard (its own process; run it beside the daemon).
    #[command(
        after_help = "Examples:\n  forkq dashboard\n  FORKQ_DASHBOARD_ADDR=0.0.0.0:9281 FORKQ_DASHBOARD_TOKEN=$(openssl rand -hex 16) forkq dashboard\n\n\
        Without FORKQ_DASHBOARD_TOKEN the dashboard is read-only. See docs/dashboard.md."
    )]
    Dashboard,
    /// Create, inspect, list and cancel batches of jobs.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// List the periodic schedules, or enqueue one run of a schedule now.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Exit 0 when the fleet's /livez answers 200 (for container HEALTHCHECKs).
    #[command(after_help = "Example:\n  forkq health --addr 127.0.0.1:9280")]
    Health {
        /// Address of the probe; defaults to FORKQ_HEALTH_ADDR (0.0.0.0 is asked as 127.0.0.1).
        #[arg(long)]
        addr: Option<String>,
    },
}

#[derive(Args)]
struct EnqueueArgs {
    /// The queue.
    #[arg(long, default_value = "default")]
    queue: String,
    /// The task name (picks the handler).
    #[arg(long, required_unless_present = "jsonl", conflicts_with = "jsonl")]
    task: Option<String>,
    /// The payload, any JSON value; @FILE reads it from FILE, - from stdin [default: {}].
    #[arg(long, conflicts_with = "jsonl", allow_hyphen_values = true)]
    payload: Option<String>,
    /// Lower runs first (-32768..32767).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i16,
    /// Run no earlier than this many seconds from now.
    #[arg(long, conflicts_with = "run_at")]
    delay: Option<f64>,
    /// Run no earlier than this RFC 3339 time.
    #[arg(long)]
    run_at: Option<String>,
    /// Attempts before the dead letter (default FORKQ_MAX_ATTEMPTS).
    #[arg(long)]
    max_attempts: Option<i32>,
    /// While a live job has this key, return its id instead of enqueueing another.
    #[arg(long)]
    unique_key: Option<String>,
    /// With --unique-key: keep the key taken this long (90s, 30m, 1h30m, 1d) after this job took
    /// it, whatever becomes of the job meanwhile.
    #[arg(long, value_name = "DURATION", requires = "unique_key", value_parser = producer::parse_duration)]
    unique_for: Option<std::time::Duration>,
    /// With --unique-key: give the waiting job holding the key this payload and run time instead
    /// of adding a job (debounce); a running one gives the key up to a new job.
    #[arg(long, requires = "unique_key", conflicts_with = "unique_for")]
    replace: bool,
    /// Print {"id":..,"created":..,"replaced":..} (with --jsonl: {"created":..,"duplicate":..,"replaced":..}).
    #[arg(long)]
    json: bool,
    /// Enqueue every line of FILE (or - for stdin) in one transaction, streamed.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["unique_key", "unique_for", "replace"])]
    jsonl: Option<String>,
    /// The key a per-key cap of the queue counts running jobs by (see `forkq queue set`).
    #[arg(long, value_name = "KEY", conflicts_with = "jsonl")]
    concurrency_key: Option<String>,
    /// This job's timeout in seconds (instead of FORKQ_JOB_TIMEOUT_SECONDS).
    #[arg(
        long,
        value_name = "SECONDS",
        conflicts_with = "jsonl",
        allow_hyphen_values = true
    )]
    timeout: Option<f64>,
    /// This job's retry backoff base in seconds (instead of FORKQ_RETRY_BACKOFF_BASE_SECONDS).
    #[arg(
        long,
        value_name = "SECONDS",
        conflicts_with = "jsonl",
        allow_hyphen_values = true
    )]
    backoff: Option<f64>,
    /// Wait for the job to end; print its result (exit codes below).
    #[arg(long, conflicts_with = "jsonl")]
    wait: bool,
    /// Give up waiting after this many seconds [default: wait as long as it takes].
    #[arg(long, value_name = "SECONDS", requires = "wait")]
    wait_timeout: Option<f64>,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// List queues (those with settings or jobs): paused, limits, jobs by state, oldest waiting.
    #[command(
        after_help = "Examples:\n  forkq queue list\n  forkq queue list --json\n\n\
        Counts are of live jobs and the dead letter (failed, cancelled); completed jobs are not counted."
    )]
    List {
        /// Print {"queues": [...]} instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pause a queue: no new job of it starts anywhere; running jobs finish; enqueues go on.
    #[command(after_help = "Example:\n  forkq queue pause mail\n\n\
        Queues need no creating: pausing one that has no settings yet creates its row.")]
    Pause {
        /// The queue.
        queue: String,
    },
    /// Resume a paused queue.
    #[command(after_help = "Example:\n  forkq queue resume mail")]
    Resume {
        /// The queue.
        queue: String,
    },
    /// Set a queue's limits (each across the whole fleet); `none` removes one.
    #[command(after_help = "Examples:\n  forkq queue set api --max-running 5\n  \
        forkq queue set api --per-key 1 --rate 50/s\n  forkq queue set api --rate 10/min --burst 5\n  \
        forkq queue set api --max-running none --rate none\n\n\
        All changes of one call apply together or, if one is refused (exit 65), none. A queue \
        that has no settings yet gets its row. See docs/flow-control.md.")]
    Set(QueueSetArgs),
}

#[derive(Args)]
#[command(group(ArgGroup::new("setting").required(true).multiple(true)
    .args(["max_running", "per_key", "rate", "burst"])))]
struct QueueSetArgs {
    /// The queue.
    queue: String,
    /// At most N jobs of the queue running at once across all hosts (or none).
    #[arg(long, value_name = "N|none", allow_hyphen_values = true)]
    max_running: Option<String>,
    /// At most N running jobs per concurrency key (or none).
    #[arg(long, value_name = "N|none", allow_hyphen_values = true)]
    per_key: Option<String>,
    /// At most this many starts: 50/s, 10/min, 100/h (or none).
    #[arg(long, value_name = "RATE|none", allow_hyphen_values = true)]
    rate: Option<String>,
    /// Starts the rate limit allows at once after a quiet spell (1 until set).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    burst: Option<String>,
}

impl QueueSetArgs {
    /// The change these flags ask for, or exit 65 naming the flag at fault.
    fn change(&self) -> Result<Change, Failure> {
        let bad = |flag: &str, why: String| {
            fail(EX_DATAERR, format!("--{flag}: {why}; nothing was changed"))
        };
        let cap = |flag: &str, v: &Option<String>| {
            v.as_deref()
                .map(|t| queues::parse_cap(t).map_err(|e| bad(flag, e)))
                .transpose()
        };
        let rate = match self.rate.as_deref() {
            None => None,
            Some("none") => Some(None),
            Some(t) => Some(Some(Rate::parse(t).map_err(|e| bad("rate", e))?)),
        };
        let burst = match self.burst.as_deref() {
            None => None,
            Some(t) => match queues::parse_cap(t) {
                Ok(Some(n)) => Some(n),
                _ => {
                    return Err(bad(
                        "burst",
                        format!("{t:?} is not a burst: use a whole number from 1 to 1000000"),
                    ))
                }
            },
        };
        Ok(Change {
            paused: None,
            max_running: cap("max-running", &self.max_running)?,
            per_key: cap("per-key", &self.per_key)?,
            rate,
            burst,
        })
    }
}

/// The job browser's filters, shared by `jobs`, `retry` and `cancel`.
#[derive(Args)]
struct FilterArgs {
    /// Only jobs of this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only jobs in this state: available, scheduled, running, retryable, completed, failed or
    /// cancelled.
    #[arg(long)]
    state: Option<String>,
    /// Only jobs of this task.
    #[arg(long)]
    task: Option<String>,
}

impl FilterArgs {
    /// The validated filter, or exit 65 naming what is wrong.
    fn parse(&self, state: Option<&str>) -> Result<browse::Filter, Failure> {
        browse::Filter::parse(
            self.queue.as_deref(),
            state.or(self.state.as_deref()),
            self.task.as_deref(),
        )
        .map_err(|e| fail(EX_DATAERR, e.0))
    }
}

#[derive(Subcommand)]
enum BatchCommand {
    /// Create a batch from JSON lines (parent and children in one transaction); prints its id.
    #[command(
        after_help = "Examples:\n  forkq batch create --queue pages --on-complete pdf.assemble --jsonl pages.jsonl\n  \
        printf '{\"task\":\"noop\"}\\n' | forkq batch create --queue default --fail-fast --jsonl -"
    )]
    Create(BatchCreateArgs),
    /// Show a batch's state and counts.
    #[command(after_help = "Example:\n  forkq batch status 7 --json")]
    Status {
        /// The batch id.
        id: i64,
        /// Print {"id","state","total","pending","succeeded","failed","cancelled"}.
        #[arg(long)]
        json: bool,
    },
    /// Cancel an open batch: waiting children are cancelled, running ones are told to stop.
    #[command(after_help = "Example:\n  forkq batch cancel 7")]
    Cancel {
        /// The batch id.
        id: i64,
    },
    /// List the newest batches.
    #[command(
        after_help = "Examples:\n  forkq batch list\n  forkq batch list --state open --json"
    )]
    List {
        /// Only batches in this state.
        #[arg(long, value_parser = batch::STATES)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print one JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ScheduleCommand {
    /// List the schedules the database holds (declared by daemons from FORKQ_SCHEDULES), with
    /// their next run, last run and last job.
    #[command(after_help = "Examples:\n  forkq schedule list\n  forkq schedule list --json")]
    List {
        /// Print one JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Enqueue one run of a schedule now, outside its ticks; prints the job id.
    #[command(after_help = "Example:\n  forkq schedule run every-second")]
    Run {
        /// The schedule's name.
        name: String,
        /// Print {"id":..}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct BatchCreateArgs {
    /// The queue of the children (unless a line names one) and of the completion job.
    #[arg(long, default_value = "default")]
    queue: String,
    /// Enqueue this task when the batch ends (payload: batch id, state and counts).
    #[arg(long, value_name = "TASK")]
    on_complete: Option<String>,
    /// The completion job's queue (default --queue).
    #[arg(long, value_name = "QUEUE", requires = "on_complete")]
    on_complete_queue: Option<String>,
    /// Stop at the first child that fails for good: cancel the rest, fail the batch.
    #[arg(long)]
    fail_fast: bool,
    /// The children, one JSON job per line, from FILE (or - for stdin).
    #[arg(long, value_name = "FILE")]
    jsonl: String,
}

/// A failure with its exit code; the message is printed once, prefixed with "forkq: ".
struct Failure {
    code: u8,
    message: String,
}

impl From<QueueError> for Failure {
    fn from(e: QueueError) -> Self {
        let code = match &e {
            QueueError::InvalidJob(_) | QueueError::InvalidInput(_) => EX_DATAERR,
            QueueError::SchemaOutdated { .. } | QueueError::SchemaTooNew { .. } => EX_CONFIG as u8,
            e if e.is_connection_lost() => EX_CONFIG as u8,
            _ => 1,
        };
        let message = if e.is_connection_lost() {
            format!("{e}; check DATABASE_URL and that PostgreSQL is running")
        } else {
            e.to_string()
        };
        Failure { code, message }
    }
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    // `--version` names the schema this binary expects (`forkq migrate` brings a database there).
    let version: &'static str = format!(
        "{} (schema version {})",
        env!("CARGO_PKG_VERSION"),
        migrations::latest_version()
    )
    .leak();
    let cli = Cli::from_arg_matches(&Cli::command().version(version).get_matches())
        .unwrap_or_else(|e| e.exit());
    // Before the configuration, so its clamps and overrides are logged.
    if let Err(e) = forkq::logging::init() {
        forkq::exit_on_config_error(e);
    }
    if let Command::Health { addr } = cli.command {
        return exit_code(health(addr));
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => forkq::exit_on_config_error(e),
    };
    if let Command::Dashboard = cli.command {
        let settings = match forkq::config::DashboardSettings::from_env() {
            Ok(s) => s,
            Err(e) => forkq::exit_on_config_error(e),
        };
        let code = forkq::dashboard::serve(config, settings);
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    if let Command::Run = cli.command {
        let code = forkq::run(config, |config| {
            Box::new(Builtin::new(config)) as Box<dyn Handler>
        });
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    exit_code(command(cli.command, &config))
}

/// Prints a failure once, prefixed with "forkq: ", and turns it into the exit code.
fn exit_code(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("forkq: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Connects, or fails with exit code 78 naming the variable that holds the URL (password hidden):
/// a database that cannot be reached is a setting to fix, not a passing fault.
fn connect(config: &Config) -> Result<postgres::Client, Failure> {
    queue::connect(&config.database_url, "forkq cli").map_err(|e| {
        let variable = if std::env::var("FORKQ_DATABASE_URL").is_ok_and(|v| !v.trim().is_empty()) {
            "FORKQ_DATABASE_URL"
        } else {
            "DATABASE_URL"
        };
        fail(
            EX_CONFIG as u8,
            format!(
                "cannot connect with {variable}={:?}: {e}; check the URL and that PostgreSQL is running",
                redacted_url(&config.database_url)
            ),
        )
    })
}

fn command(command: Command, config: &Config) -> Result<(), Failure> {
    let schema = config.schema.as_str();
    match command {
        Command::Run | Command::Dashboard => unreachable!("handled in main"),
        Command::Migrate { status } => {
            let mut client = connect(config)?;
            if status {
                for m in migrations::status(&mut client, schema)? {
                    let state = m
                        .applied_at
                        .map_or("pending".to_string(), |at| format!("applied {at}"));
                    println!("{:>4}  {:<40} {state}", m.version, m.name);
                }
            } else {
                let applied = migrations::migrate(&mut client, schema)?;
                if applied.is_empty() {
                    println!(
                        "schema {schema:?} is up to date (version {})",
                        migrations::latest_version()
                    );
                } else {
                    let versions: Vec<String> = applied.iter().map(i32::to_string).collect();
                    println!(
                        "schema {schema:?}: applied migration(s) {}",
                        versions.join(", ")
                    );
                }
            }
        }
        Command::Enqueue(args) => enqueue(args, config)?,
        Command::Queue(command) => queue_command(command, config)?,
        Command::Status { json } => {
            let mut client = connect(config)?;
            migrations::require_current(&mut client, schema)?;
            let queues = admin::status(&mut client, schema, true)?;
            if json {
                println!("{}", json!({ "queues": queues }));
            } else {
                println!(
                    "{:<20} {}  oldest_available_s",
                    "queue",
                    admin::STATES.map(|s| format!("{s:>10}")).join(" ")
                );
                for (name, q) in &queues {
                    let counts = admin::STATES
                        .map(|s| format!("{:>10}", q.count(s)))
                        .join(" ");
                    println!("{name:<20} {counts}  {:.1}", q.oldest_available_seconds);
                }
            }
        }
        Command::Job { id, json } => {
            let mut client = connect(config)?;
            migrations::require_current(&mut client, schema)?;
            let job = admin::job(&mut client, schema, id)?
                .ok_or_else(|| fail(1, format!("no job {id}")))?;
            if json {
                println!("{job}");
            } else {
                println!("{}", serde_json::to_string_pretty(&job).unwrap_or_default());
            }
        }
        Command::Jobs {
            filter,
            limit,
            after,
            json,
        } => {
            let filter = filter.parse(None)?;
            let cursor = browse::Cursor::new(after, limit).map_err(|e| fail(EX_DATAERR, e.0))?;
            let mut client = connect(config)?;
            migrations::require_current(&mut client, schema)?;
            let page = browse::page(&mut client, schema, &filter, cursor)?;
            if json {
                println!("{}", json!(page));
            } else {
                print_jobs(&page);
            }
        }
        Command::Retry { id: Some(id), .. } => {
            let mut client = connect(config)?;
            migrations::require_current(&mut client, schema)?;
            if !admin::retry(&mut client, schema, id)? {
                return Err(fail(1, format!(
                    "job {id} is not in the dead letter (not failed or cancelled, or a live job holds its unique key)"
                )));
            }
            println!("job {id} is back in the queue");
        }
        Command::Retry {
            id: None,
            filter,
            failed,
            yes,
        } => {
            let filter = filter.parse(failed.then_some("failed"))?;
            bulk(config, browse::Bulk::Retry, &filter, yes)?;
        }
        Command::Cancel { id: Some(id), .. } => {
            let mut client = connect(config)?;
            migrations::require_current(&mut client, schema)?;
            match admin::cancel(&mut client, schema, id, !config.retention.is_zero())? {
                None => return Err(fail(1, format!("no job {id}"))),
                Some(state) if state == "cancelling" => {
                    println!("job {id} is running; its handler is told to stop, and it will not be retried")
                }
                Some(state) if state == "cancelled" => println!("job {id} cancelled"),
                Some(state) => return Err(fail(1, format!("job {id} is already {state}"))),
            }
        }
        Command::Cancel {
            id: None,
            filter,
            yes,
        } => {
            let filter = filter.parse(None)?;
            bulk(config, browse::Bulk::Cancel, &filter, yes)?;
        }
        Command::Hosts { json } => {
            let mut client = connect(config)?;
            migrations::require_current(&mut client, schema)?;
            let hosts = hosts::list(&mut client, schema)?;
            if json {
                for h in &hosts {
                    println!("{}", json!(h));
                }
            } else {
                print_hosts(&hosts);
            }
        }
        Command::Batch(command) => batch_command(command, config)?,
        Command::Schedule(command) => schedule_command(command, config)?,
        Command::Health { .. } => unreachable!("handled in main"),
    }
    Ok(())
}

/// Prints a page of jobs as a table, and how to get the next one.
fn print_jobs(page: &browse::Page) {
    println!(
        "{:>10}  {:<16} {:<10} {:<20} {:>7}  {:<25}  error",
        "id", "queue", "state", "task", "attempt", "runs/finished at"
    );
    for j in &page.jobs {
        println!(
            "{:>10}  {:<16} {:<10} {:<20} {:>3}/{:<3}  {:<25}  {}",
            j.id,
            j.queue,
            j.state,
            j.task,
            j.attempt,
            j.max_attempts,
            j.at,
            j.error.as_deref().unwrap_or("").replace('\n', " ")
        );
    }
    match page.next {
        Some(next) if page.partial => println!(
            "(page not full: examined jobs down to id {next} without more matches; \
             go on with --after {next})"
        ),
        Some(next) => println!("(more: --after {next})"),
        None => {}
    }
}

/// Prints the hosts as a table.
fn print_hosts(hosts: &[hosts::HostRow]) {
    println!(
        "{:<24} {:<16} {:<8} {:>7} {:>9} {:>5} {:>8}  {:<20} last seen",
        "host", "boot", "status", "pid", "alive", "busy", "jobs/s", "queues"
    );
    for h in hosts {
        let looping = if h.workload.crash_looping.is_empty() {
            String::new()
        } else {
            format!(" crash-looping slots {:?}", h.workload.crash_looping)
        };
        println!(
            "{:<24} {:<16} {:<8} {:>7} {:>4}/{:<4} {:>5} {:>8.1}  {:<20} {:.0} s ago{looping}",
            h.host,
            h.boot,
            h.status,
            h.pid,
            h.workload.alive,
            h.workload.concurrency,
            h.workload.busy,
            h.workload.jobs_per_second,
            h.workload.queues.join(","),
            h.seconds_since_seen
        );
    }
}

/// A bulk retry or cancel: counts the jobs the filter matches, asks for --yes when more than
/// one does, then acts and says how many it changed.
fn bulk(
    config: &Config,
    action: browse::Bulk,
    filter: &browse::Filter,
    yes: bool,
) -> Result<(), Failure> {
    browse::check_bulk(action, filter).map_err(|e| fail(EX_DATAERR, e.0))?;
    let (verb, done) = match action {
        browse::Bulk::Retry => ("retry", "back in their queue"),
        browse::Bulk::Cancel => ("cancel", "cancelled (running ones are told to stop)"),
    };
    let mut client = connect(config)?;
    migrations::require_current(&mut client, &config.schema)?;
    let matching = browse::count_targets(&mut client, &config.schema, action, filter)?;
    if matching == 0 {
        println!("no job matches; nothing to {verb}");
        return Ok(());
    }
    if matching > 1 && !yes {
        return Err(fail(
            1,
            format!("{matching} jobs match; nothing was changed: add --yes to {verb} them all"),
        ));
    }
    let n = browse::apply(
        &mut client,
        &config.schema,
        action,
        filter,
        !config.retention.is_zero(),
    )?;
    println!("{n} job(s) {done}");
    Ok(())
}

fn enqueue(args: EnqueueArgs, config: &Config) -> Result<(), Failure> {
    let limits = Limits {
        max_payload_bytes: config.max_payload_bytes,
        default_max_attempts: config.max_attempts,
    };
    if let Some(path) = &args.jsonl {
        let input = input::JsonlInput::open(path)?;
        let mut client = connect(config)?;
        migrations::require_current(&mut client, &config.schema)?;
        let counts = input.enqueue(&mut client, &config.schema, &args.queue, &limits)?;
        if args.json {
            println!("{}", serde_json::to_string(&counts).unwrap_or_default());
        } else {
            println!("{}", counts.created);
            if counts.duplicate + counts.replaced > 0 {
                eprintln!(
                    "{} duplicate(s) not enqueued (their unique key was taken), {} waiting job(s) replaced",
                    counts.duplicate, counts.replaced
                );
            }
        }
        return Ok(());
    }
    let payload = input::payload(args.payload.as_deref().unwrap_or("{}"))?;
    let job = NewJob {
        queue: args.queue,
        task: args.task.expect("clap requires --task without --jsonl"),
        payload,
        priority: args.priority,
        run_at: args.run_at,
        delay: args.delay,
        max_attempts: args.max_attempts,
        unique_key: args.unique_key,
        unique_for: args.unique_for,
        replace: args.replace,
        concurrency_key: args.concurrency_key,
        timeout_seconds: args.timeout,
        backoff_seconds: args.backoff,
    };
    // Checked before anything is enqueued: a bad value enqueues nothing.
    let wait_timeout = match args.wait_timeout {
        Some(t) if !(0.0..=1e9).contains(&t) => {
            return Err(fail(
                EX_DATAERR,
                format!("--wait-timeout {t}: use a number of seconds from 0 to 1e9"),
            ))
        }
        Some(t) => std::time::Duration::from_secs_f64(t),
        None => std::time::Duration::from_secs(1_000_000_000),
    };
    let mut client = connect(config)?;
    migrations::require_current(&mut client, &config.schema)?;
    let outcome = producer::enqueue_with_outcome(&mut client, &config.schema, &limits, &job)?;
    if args.wait {
        return wait_for(&mut client, &config.schema, outcome.id, wait_timeout);
    }
    if args.json {
        println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
        return Ok(());
    }
    println!("{}", outcome.id);
    let key = job.unique_key.as_deref().unwrap_or_default();
    if outcome.replaced {
        eprintln!(
            "job {} was waiting with unique key {key:?}: its payload and run time were replaced",
            outcome.id
        );
    } else if !outcome.created {
        eprintln!(
            "duplicate: job {} holds unique key {key:?}; nothing was enqueued",
            outcome.id
        );
    }
    Ok(())
}

/// `enqueue --wait`: waits for job `id` to end, prints its result, and exits with the code that
/// says how it ended.
fn wait_for(
    client: &mut postgres::Client,
    schema: &str,
    id: i64,
    timeout: std::time::Duration,
) -> Result<(), Failure> {
    match waiting::wait(|| waiting::finished(client, schema, id), timeout)? {
        Some(Finished::Completed { result }) => println!("{result}"),
        Some(Finished::Gone) => {
            eprintln!(
                "forkq: job {id} completed; its result was not kept (FORKQ_RETENTION_SECONDS=0)"
            );
            println!("null");
        }
        Some(Finished::Failed { error }) => {
            return Err(fail(EXIT_WAIT_FAILED, format!("job {id} failed: {error}")))
        }
        Some(Finished::Cancelled { error }) => {
            return Err(fail(
                EXIT_WAIT_CANCELLED,
                format!("job {id} was cancelled: {error}"),
            ))
        }
        None => {
            return Err(fail(
                EXIT_WAIT_TIMEOUT,
                format!(
                    "job {id} has not ended after {:.1} s; it goes on (see forkq job {id})",
                    timeout.as_secs_f64()
                ),
            ))
        }
    }
    Ok(())
}

fn queue_command(command: QueueCommand, config: &Config) -> Result<(), Failure> {
    let schema = config.schema.as_str();
    // Flags are checked before anything is sent: a bad one changes nothing.
    let (queue, change) = match &command {
        QueueCommand::List { .. } => (None, Change::default()),
        QueueCommand::Pause { queue } | QueueCommand::Resume { queue } => (
            Some(queue.as_str()),
            Change {
                paused: Some(matches!(command, QueueCommand::Pause { .. })),
                ..Change::default()
            },
        ),
        QueueCommand::Set(args) => (Some(args.queue.as_str()), args.change()?),
    };
    let mut client = connect(config)?;
    migrations::require_current(&mut client, schema)?;
    let Some(queue) = queue else {
        let listed = queues::list(&mut client, schema)?;
        if matches!(command, QueueCommand::List { json: true }) {
            println!("{}", json!({ "queues": listed }));
        } else {
            print_queues(&listed);
        }
        return Ok(());
    };
    let now = queues::set(&mut client, schema, queue, &change)?;
    match command {
        QueueCommand::Pause { .. } => println!(
            "queue {queue} paused: no new job of it starts; running ones finish; enqueues go on"
        ),
        QueueCommand::Resume { .. } => println!("queue {queue} resumed"),
        _ => println!("queue {queue}: {}", now.limits()),
    }
    Ok(())
}

/// Prints the queues as a table.
fn print_queues(listed: &[queues::Listed]) {
    println!(
        "{:<20} {:<7} {:<32} {:>9} {:>9} {:>7} {:>9} {:>7} {:>9}  oldest_available_s",
        "queue",
        "status",
        "limits",
        "available",
        "scheduled",
        "running",
        "retryable",
        "failed",
        "cancelled"
    );
    for q in listed {
        let c = &q.counts;
        println!(
            "{:<20} {:<7} {:<32} {:>9} {:>9} {:>7} {:>9} {:>7} {:>9}  {:.1}",
            q.queue,
            if q.settings.paused {
                "paused"
            } else {
                "active"
            },
            q.settings.limits(),
            c.available,
            c.scheduled,
            c.running,
            c.retryable,
            c.failed,
            c.cancelled,
            c.oldest_available_seconds
        );
    }
}

fn batch_command(command: BatchCommand, config: &Config) -> Result<(), Failure> {
    let schema = config.schema.as_str();
    let retain = !config.retention.is_zero();
    if let BatchCommand::Create(args) = &command {
        // Read and validate the input before connecting: bad input fails without a database.
        let limits = Limits {
            max_payload_bytes: config.max_payload_bytes,
            default_max_attempts: config.max_attempts,
        };
        let jobs = input::JsonlInput::open(&args.jsonl)?.read_all(&args.queue, &limits)?;
        let spec = NewBatch {
            queue: args.queue.clone(),
            fail_fast: args.fail_fast,
            on_complete_task: args.on_complete.clone(),
            on_complete_queue: args.on_complete_queue.clone(),
        };
        let mut client = connect(config)?;
        migrations::require_current(&mut client, schema)?;
        println!(
            "{}",
            batch::create(&mut client, schema, &limits, &spec, &jobs)?
        );
        return Ok(());
    }
    let mut client = connect(config)?;
    migrations::require_current(&mut client, schema)?;
    match command {
        BatchCommand::Create(_) => unreachable!("handled above"),
        BatchCommand::Status { id, json } => {
            let info = batch::status(&mut client, schema, id)?
                .ok_or_else(|| fail(1, format!("no batch {id}")))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&info.status).unwrap_or_default()
                );
            } else {
                let s = &info.status;
                println!(
                    "batch {} ({}): {}; {} total, {} pending, {} succeeded, {} failed, {} cancelled",
                    s.id, info.queue, s.state, s.total, s.pending, s.succeeded, s.failed, s.cancelled
                );
                if let Some(job) = info.completion_job_id {
                    println!("completion job: {job}");
                }
            }
        }
        BatchCommand::Cancel { id } => match batch::cancel(&mut client, schema, id, retain)? {
            None => return Err(fail(1, format!("no batch {id}"))),
            Some(CancelOutcome::Cancelled) => {
                let pending =
                    batch::status(&mut client, schema, id)?.map_or(0, |b| b.status.pending);
                println!("batch {id} cancelled; {pending} running child(ren) are told to stop");
            }
            Some(CancelOutcome::AlreadyFinished(state)) => {
                return Err(fail(1, format!("batch {id} is already {state}")))
            }
        },
        BatchCommand::List { state, limit, json } => {
            let batches = batch::list(&mut client, schema, state.as_deref(), limit, None)?;
            if json {
                for b in &batches {
                    println!("{}", serde_json::to_string(b).unwrap_or_default());
                }
            } else {
                println!(
                    "{:>8} {:<16} {:<10} {:>8} {:>8} {:>9} {:>8} {:>9}  created_at",
                    "id", "queue", "state", "total", "pending", "succeeded", "failed", "cancelled"
                );
                for b in &batches {
                    let s = &b.status;
                    println!(
                        "{:>8} {:<16} {:<10} {:>8} {:>8} {:>9} {:>8} {:>9}  {}",
                        s.id,
                        b.queue,
                        s.state,
                        s.total,
                        s.pending,
                        s.succeeded,
                        s.failed,
                        s.cancelled,
                        b.created_at
                    );
                }
            }
        }
    }
    Ok(())
}

fn schedule_command(command: ScheduleCommand, config: &Config) -> Result<(), Failure> {
    let schema = config.schema.as_str();
    let mut client = connect(config)?;
    migrations::require_current(&mut client, schema)?;
    match command {
        ScheduleCommand::List { json } => {
            let now = jiff::Timestamp::now();
            let stored = schedules::stored(&mut client, schema, None)?;
            if !json {
                println!(
                    "{:<24} {:<20} {:<16} {:<24} {:<20} {:<20} {:>10}",
                    "name", "cron", "timezone", "queue/task", "next run", "last run", "last job"
                );
            }
            for s in &stored {
                let next = s.next_run(now);
                let text = |v: &str| s.field(v);
                if json {
                    let at = |t: Option<jiff::Timestamp>| t.map(|t| t.to_string());
                    println!(
                        "{}",
                        json!({
                            "name": s.name,
                            "definition": s.definition,
                            "revision": s.revision,
                            "declared_by": s.declared_by,
                            "declared_at": s.declared_at.to_string(),
                            "next_run": at(next),
                            "last_tick": at(s.last_tick_at),
                            "last_run": at(s.last_run_at),
                            "last_job_id": s.last_job_id,
                        })
                    );
                } else {
                    let at = |t: Option<jiff::Timestamp>| {
                        t.map_or("-".into(), |t| t.strftime("%Y-%m-%d %H:%M:%SZ").to_string())
                    };
                    println!(
                        "{:<24} {:<20} {:<16} {:<24} {:<20} {:<20} {:>10}",
                        s.name,
                        text("cron"),
                        text("timezone"),
                        format!("{}/{}", text("queue"), text("task")),
                        at(next),
                        at(s.last_run_at),
                        s.last_job_id.map_or("-".into(), |id| id.to_string())
                    );
                }
            }
        }
        ScheduleCommand::Run { name, json } => {
            let Some(id) = schedules::run_now(&mut client, schema, &name)? else {
                let known: Vec<String> = schedules::stored(&mut client, schema, None)?
                    .into_iter()
                    .map(|s| s.name)
                    .collect();
                return Err(fail(
                    1,
                    format!(
                        "no schedule {name:?} in the database (it holds: {}); a daemon declares \
                         the schedules of its FORKQ_SCHEDULES file when it starts",
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            };
            if json {
                println!("{}", json!({ "id": id }));
            } else {
                println!("{id}");
            }
        }
    }
    Ok(())
}

/// `forkq health` needs only the probe's address, not the rest of the configuration.
fn health(addr: Option<String>) -> Result<(), Failure> {
    use std::io::Write;
    let addr = match addr {
        Some(a) => a,
        None => {
            let configured = forkq::config::health_addr_from_env()
                .map_err(|e| fail(EX_CONFIG as u8, e.to_string()))?;
            if configured.ip().is_unspecified() {
                format!("127.0.0.1:{}", configured.port())
            } else {
                configured.to_string()
            }
        }
    };
    let target: std::net::SocketAddr = addr.parse().map_err(|_| {
        fail(
            EX_CONFIG as u8,
            format!("--addr {addr:?} is not an address such as 127.0.0.1:9280"),
        )
    })?;
    let timeout = std::time::Duration::from_secs(3);
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| fail(1, format!("cannot reach the probe at {addr}: {e}")))?;
    let _ = stream.set_read_timeout(Some(timeout));
    write!(stream, "GET /livez HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(|e| fail(1, e.to_string()))?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status_line = response.lines().next().unwrap_or("");
    if status_line.split_whitespace().nth(1) == Some("200") {
        println!("healthy");
        Ok(())
    } else {
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
        Err(fail(1, format!("unhealthy: {status_line} {body}")))
    }
}
