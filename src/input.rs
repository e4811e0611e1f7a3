//! What the CLI reads from its user: a payload argument (JSON text, `@FILE` or `-` for stdin) and
//! JSON-lines input, streamed into one transaction with a progress line when stderr is a terminal.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use forkq::queue::producer::{BulkInsert, Counts, JsonLines, Limits, LineError, NewJob};

use crate::{fail, Failure, EX_DATAERR};

/// The progress line is redrawn after this many jobs at most (indicatif limits the rate further).
const PROGRESS_EVERY: u64 = 1024;

/// The payload of `--payload`: JSON text, `@FILE` for a file's contents, or `-` for stdin.
pub fn payload(arg: &str) -> Result<Value, Failure> {
    let (text, source) = match arg {
        "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| fail(EX_DATAERR, format!("cannot read --payload from stdin: {e}")))?;
            (text, "stdin".to_string())
        }
        _ => match arg.strip_prefix('@') {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    fail(
                        EX_DATAERR,
                        format!("cannot read --payload file {path:?}: {e}; give a readable file after @"),
                    )
                })?;
                (text, format!("file {path:?}"))
            }
            None => return parse_payload(arg, "--payload"),
        },
    };
    parse_payload(&text, &format!("--payload ({source})"))
}

fn parse_payload(text: &str, what: &str) -> Result<Value, Failure> {
    serde_json::from_str(text).map_err(|e| {
        fail(
            EX_DATAERR,
            format!("{what} is not valid JSON: {e}; pass JSON text, @FILE or - for stdin"),
        )
    })
}

/// JSON-lines input from a file or stdin, opened before anything else happens so a missing file
/// fails without a database.
pub struct JsonlInput {
    name: String,
    reader: Box<dyn BufRead>,
    /// The file's size, for the progress bar; `None` for stdin and pipes.
    size: Option<u64>,
}

impl JsonlInput {
    /// Opens `path`, or stdin for `-`.
    pub fn open(path: &str) -> Result<JsonlInput, Failure> {
        if path == "-" {
            return Ok(JsonlInput {
                name: "stdin".into(),
                reader: Box::new(BufReader::new(std::io::stdin())),
                size: None,
            });
        }
        let file =
            File::open(path).map_err(|e| fail(EX_DATAERR, format!("cannot read {path}: {e}")))?;
        let size = file
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        Ok(JsonlInput {
            name: path.to_string(),
            reader: Box::new(BufReader::with_capacity(1 << 16, file)),
            size,
        })
    }

    /// Every job, validated, in memory (for batches, whose parent needs them all).
    pub fn read_all(self, queue: &str, limits: &Limits) -> Result<Vec<NewJob>, Failure> {
        let name = self.name;
        JsonLines::new(self.reader, queue, limits)
            .collect::<Result<_, _>>()
            .map_err(|e| refused_line(&name, e))
    }

    /// Streams every job into one transaction and commits; returns how many were created, not
    /// created because their unique key was taken, and replaced. A refused line rolls everything
    /// back and is named.
    pub fn enqueue(
        self,
        client: &mut postgres::Client,
        schema: &str,
        queue: &str,
        limits: &Limits,
    ) -> Result<Counts, Failure> {
        let mut bulk = BulkInsert::begin(client, schema, limits, None)?;
        let progress = Progress::new(self.size);
        let mut lines = JsonLines::new(self.reader, queue, limits);
        while let Some(job) = lines.next() {
            let job = job.map_err(|e| refused_line(&self.name, e))?;
            bulk.push(&job).map_err(|e| {
                let mut failure = Failure::from(e);
                failure.message.push_str("; nothing was enqueued");
                failure
            })?;
            if bulk.pushed() % PROGRESS_EVERY == 0 {
                progress.update(lines.bytes_read(), bulk.pushed());
            }
        }
        progress.update(lines.bytes_read(), bulk.pushed());
        progress
            .bar
            .set_message(format!("{} jobs, committing", bulk.pushed()));
        let counts = bulk.commit()?;
        progress.bar.finish_and_clear();
        Ok(counts)
    }
}

fn refused_line(name: &str, e: LineError) -> Failure {
    fail(
        EX_DATAERR,
        format!(
            "{name}: line {}: {}; nothing was enqueued",
            e.line, e.reason
        ),
    )
}

/// A progress line on stderr, drawn only when stderr is a terminal (indicatif hides it otherwise,
/// so piped and logged runs print nothing but the result).
struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn new(size: Option<u64>) -> Progress {
        let bar = ProgressBar::with_draw_target(size, ProgressDrawTarget::stderr());
        let template = if size.is_some() {
            "{bar:20} {bytes}/{total_bytes}, {msg} ({elapsed})"
        } else {
            "{spinner} {bytes}, {msg} ({elapsed})"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        Progress { bar }
    }

    fn update(&self, bytes: u64, jobs: u64) {
        if self.bar.is_hidden() {
            return;
        }
        self.bar.set_position(bytes);
        self.bar.set_message(format!("{jobs} jobs"));
    }
}
