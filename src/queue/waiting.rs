//! Waiting for a job's result: polls where the job stands (`job_result` in migration 004) with a
//! growing pause, so a job nobody waits for pays nothing and a waiter costs one indexed read per
//! poll.

use std::time::{Duration, Instant};

use postgres::types::Type;
use postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;

use super::sql::{self, render};
use super::QueueError;

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Finished {
    /// It completed, with this result.
    Completed {
        /// The handler's result.
        result: Value,
    },
    /// It failed for good (dead-lettered).
    Failed {
        /// Its last error.
        error: String,
    },
    /// It was cancelled.
    Cancelled {
        /// Why.
        error: String,
    },
    /// It is in neither table: it completed with `FORKQ_RETENTION_SECONDS=0` (its result was not
    /// kept), its retention passed, or it never existed.
    Gone,
}

/// How job `id` ended, or `None` while it lives.
pub fn finished(
    client: &mut impl GenericClient,
    schema: &str,
    id: i64,
) -> Result<Option<Finished>, QueueError> {
    let row = client.query_typed_opt(&render(sql::JOB_RESULT, schema), &[(&id, Type::INT8)])?;
    let Some(row) = row else {
        return Ok(Some(Finished::Gone));
    };
    let state: String = row.get(0);
    let error = || row.get::<_, Option<String>>(2).unwrap_or_default();
    Ok(match state.as_str() {
        "completed" => Some(Finished::Completed {
            result: row.get::<_, Option<Value>>(1).unwrap_or(Value::Null),
        }),
        "failed" => Some(Finished::Failed { error: error() }),
        "cancelled" => Some(Finished::Cancelled { error: error() }),
        _ => None,
    })
}

/// The pause before the `n`-th poll (from 0): 10 ms, growing by half each time, at most 1 s.
fn pause(n: u32) -> Duration {
    Duration::from_millis(10)
        .mul_f64(1.5f64.powi(n.min(20) as i32))
        .min(Duration::from_secs(1))
}

/// Calls `poll` (one look at the job, such as [`finished`]) until it says the job ended or
/// `timeout` passes (`None` then), pausing longer between looks as the wait grows.
pub fn wait(
    mut poll: impl FnMut() -> Result<Option<Finished>, QueueError>,
    timeout: Duration,
) -> Result<Option<Finished>, QueueError> {
    let deadline = Instant::now() + timeout;
    for n in 0.. {
        if let Some(end) = poll()? {
            return Ok(Some(end));
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        std::thread::sleep(pause(n).min(deadline - now));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_start_fast_and_settle_at_a_second() {
        assert_eq!(pause(0), Duration::from_millis(10));
        assert_eq!(pause(1), Duration::from_millis(15));
        assert_eq!(pause(30), Duration::from_secs(1));
    }
}
