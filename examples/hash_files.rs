//! A forkq worker with its handler written in Rust: it hashes files.
//!
//! Each job's payload names a file, `{"path": "/srv/uploads/a.bin"}`; the result is its size and
//! SHA-256, `{"path": .., "bytes": .., "sha256": ".."}`. The file is read in chunks with a
//! heartbeat between them, so a huge file keeps its lease and its worker looks alive.
//!
//! Run it like `forkq run`, configured by the same environment:
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1/test cargo run --example hash_files
//! forkq enqueue hash '{"path": "/etc/hostname"}'
//! ```

use std::fs::File;
use std::io::Read;

use forkq::{Config, Handler, Job, JobContext, Outcome};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Hashes the file named by `payload.path`.
struct HashFiles {
    buffer: Vec<u8>,
}

impl Handler for HashFiles {
    fn handle(&mut self, job: &Job, ctx: &mut dyn JobContext) -> Outcome {
        if &*job.task != "hash" {
            return Outcome::Fatal(format!("no handler for task {}", job.task));
        }
        let Some(path) = job.payload.get("path").and_then(Value::as_str) else {
            // Retrying cannot fix a payload.
            return Outcome::Fatal("the payload needs \"path\": a file to hash".into());
        };
        let mut file = match File::open(path) {
            Ok(file) => file,
            // The file may appear later (an upload still in flight): worth a retry.
            Err(e) => return Outcome::Failure(format!("cannot open {path}: {e}")),
        };
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        loop {
            let n = match file.read(&mut self.buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return Outcome::Failure(format!("cannot read {path}: {e}")),
            };
            hasher.update(&self.buffer[..n]);
            bytes += n as u64;
            if !ctx.heartbeat() {
                return Outcome::Retry("worker stopping".into());
            }
        }
        let digest = hasher.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Outcome::Success(json!({ "path": path, "bytes": bytes, "sha256": hex }))
    }
}

fn main() {
    // forkq's logger: FORKQ_LOG, FORKQ_LOG_FORMAT, and the role and pid of each process per line.
    forkq::logging::init().unwrap_or_else(|e| forkq::exit_on_config_error(e));
    let config = Config::from_env().unwrap_or_else(|e| forkq::exit_on_config_error(e));
    // Called in each child after the fork: whatever the handler opens belongs to that child.
    std::process::exit(forkq::run(config, |_config| {
        Box::new(HashFiles {
            buffer: vec![0; 1 << 20],
        })
    }));
}
