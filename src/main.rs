//! The `forkq` command line: the daemon (`run`) and the admin commands.
//!
//! Settings come from the environment (see `config.example.env`); flags only say what to do.

use std::io::Read;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use forkq::config::{redacted_url, Config, EX_CONFIG};
use forkq::handler::{builtin::Builtin, Handler};
use forkq::queue::batch::{self, CancelOutcome, NewBatch};
use forkq::queue::producer::{self, Limits, NewJob};
use forkq::queue::{self, admin, migrations, QueueError};

/// Exit code for refused input (`EX_DATAERR`).
const EX_DATAERR: u8 = 65;

#[derive(Parser)]
#[command(
    name = "forkq",
    version,
    about = "A prefork worker daemon for a job queue in PostgreSQL",
    long_about = "A prefork worker daemon for a job queue in PostgreSQL.\n\n\
        Every setting is an environment variable (DATABASE_URL, FORKQ_*); see config.example.env.",
    after_help = "Examples:\n  forkq migrate\n  forkq enqueue --queue default --task noop\n  forkq run"
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
        forkq enqueue --queue default --jsonl jobs.jsonl   # each line {\"task\":..,\"payload\":..}"
    )]
    Enqueue(EnqueueArgs),
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
    /// Move a failed (dead-lettered) or cancelled job back to the queue.
    #[command(after_help = "Examples:\n  forkq retry 42\n  forkq retry --failed --queue default")]
    Retry {
        /// The job id.
        #[arg(required_unless_present = "failed", conflicts_with = "failed")]
        id: Option<i64>,
        /// Retry every failed job of --queue.
        #[arg(long, requires = "queue")]
        failed: bool,
        /// The queue for --failed.
        #[arg(long)]
        queue: Option<String>,
    },
    /// Cancel a job: at once when waiting, after its current run when running.
    #[command(after_help = "Example:\n  forkq cancel 42")]
    Cancel {
        /// The job id.
        id: i64,
    },
    /// Create, inspect, list and cancel batches of jobs.
    #[command(subcommand)]
    Batch(BatchCommand),
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
    /// The payload, any JSON value.
    #[arg(long, default_value = "{}")]
    payload: String,
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
    /// Enqueue every line of FILE (or - for stdin) in one transaction.
    #[arg(long, value_name = "FILE")]
    jsonl: Option<String>,
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
    /// Cancel an open batch: waiting children are cancelled, running ones finish without retries.
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
            QueueError::InvalidJob(_) => EX_DATAERR,
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
    let cli = Cli::parse();
    // Before the configuration, so its clamps and overrides are logged.
    init_logging();
    if let Command::Health { addr } = cli.command {
        return exit_code(health(addr));
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => forkq::exit_on_config_error(e),
    };
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

fn init_logging() {
    let filter = std::env::var("FORKQ_LOG").unwrap_or_else(|_| "info".into());
    env_logger::Builder::new()
        .parse_filters(&filter)
        .format_timestamp_millis()
        .init();
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
        Command::Run => unreachable!("handled in main"),
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
                    println!("schema {schema:?}: applied migration(s) {applied:?}");
                }
            }
        }
        Command::Enqueue(args) => enqueue(args, config)?,
        Command::Status { json } => {
            let mut client = connect(config)?;
            migrations::require_current(&mut client, schema)?;
            let queues = admin::status(&mut client, schema)?;
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
        Command::Retry { id, failed, queue } => {
            let mut client = connect(config)?;
            migrations::require_current(&mut client, schema)?;
            if failed {
                let queue = queue.expect("clap requires --queue with --failed");
                let n = admin::retry_failed(&mut client, schema, &queue)?;
                println!("{n} failed job(s) of queue {queue:?} are back in the queue");
            } else {
                let id = id.expect("clap requires an id without --failed");
                if !admin::retry(&mut client, schema, id)? {
                    return Err(fail(1, format!(
                        "job {id} is not in the dead letter (not failed or cancelled, or a live job holds its unique key)"
                    )));
                }
                println!("job {id} is back in the queue");
            }
        }
        Command::Cancel { id } => {
            let mut client = connect(config)?;
            migrations::require_current(&mut client, schema)?;
            match admin::cancel(&mut client, schema, id, !config.retention.is_zero())? {
                None => return Err(fail(1, format!("no job {id}"))),
                Some(state) if state == "cancelling" => {
                    println!("job {id} is running; it will not be retried")
                }
                Some(state) if state == "cancelled" => println!("job {id} cancelled"),
                Some(state) => return Err(fail(1, format!("job {id} is already {state}"))),
            }
        }
        Command::Batch(command) => batch_command(command, config)?,
        Command::Health { .. } => unreachable!("handled in main"),
    }
    Ok(())
}

fn enqueue(args: EnqueueArgs, config: &Config) -> Result<(), Failure> {
    let limits = Limits {
        max_payload_bytes: config.max_payload_bytes,
        default_max_attempts: config.max_attempts,
    };
    if let Some(path) = &args.jsonl {
        let jobs = read_jsonl(path, &args.queue, &limits)?;
        let mut client = connect(config)?;
        migrations::require_current(&mut client, &config.schema)?;
        let n = producer::enqueue_many(&mut client, &config.schema, &limits, &jobs, None)?;
        println!("{n}");
        return Ok(());
    }
    let payload: Value = serde_json::from_str(&args.payload)
        .map_err(|e| fail(EX_DATAERR, format!("--payload is not valid JSON: {e}")))?;
    let job = NewJob {
        queue: args.queue,
        task: args.task.expect("clap requires --task without --jsonl"),
        payload,
        priority: args.priority,
        run_at: args.run_at,
        delay: args.delay,
        max_attempts: args.max_attempts,
        unique_key: args.unique_key,
    };
    let mut client = connect(config)?;
    migrations::require_current(&mut client, &config.schema)?;
    println!(
        "{}",
        producer::enqueue(&mut client, &config.schema, &limits, &job)?
    );
    Ok(())
}

/// Reads and validates JSON-lines jobs from `path` (or stdin for `-`).
fn read_jsonl(path: &str, queue: &str, limits: &Limits) -> Result<Vec<NewJob>, Failure> {
    let mut input = String::new();
    let read = if path == "-" {
        std::io::stdin().read_to_string(&mut input)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut input))
    };
    read.map_err(|e| fail(EX_DATAERR, format!("cannot read {path}: {e}")))?;
    producer::parse_jsonl(&input, queue, limits).map_err(|e| {
        fail(
            EX_DATAERR,
            format!(
                "{path}: line {}: {}; nothing was enqueued",
                e.line, e.reason
            ),
        )
    })
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
        let jobs = read_jsonl(&args.jsonl, &args.queue, &limits)?;
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
                println!(
                        "batch {id} cancelled; {pending} running child(ren) will finish without retries"
                    );
            }
            Some(CancelOutcome::AlreadyFinished(state)) => {
                return Err(fail(1, format!("batch {id} is already {state}")))
            }
        },
        BatchCommand::List { state, limit, json } => {
            let batches = batch::list(&mut client, schema, state.as_deref(), limit)?;
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
