//! Queues as rows: pause, fleet-wide caps, per-key caps and rate limits (docs/flow-control.md).
//!
//! A queue needs no row: one without is not paused and has no limits. Changing a setting creates
//! the row; the database function `queue_set` (migration 004) checks and applies all changes of
//! one call together, notes the change for the workers and wakes the idle ones.

use std::collections::BTreeMap;
use std::fmt;

use postgres::types::Type;
use postgres::GenericClient;
use serde::Serialize;
use serde_json::{Map, Value};

use super::admin::{self, QueueStatus};
use super::sql::{self, render};
use super::QueueError;

/// A rate limit: starts per second, written `50/s`, `10/min` or `100/h`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(pub f64);

/// The slowest and fastest rates accepted (the same bounds as `queue_set`).
const RATE_BOUNDS: (f64, f64) = (1.0 / 86_400.0, 1e6);

impl Rate {
    /// Parses `N/s`, `N/min` or `N/h` (N a positive number).
    pub fn parse(text: &str) -> Result<Rate, String> {
        let allowed = "a rate such as 50/s, 10/min or 100/h (a positive number per s, min or h)";
        let (n, unit) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not {allowed}"))?;
        let seconds = match unit.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            _ => return Err(format!("{text:?} is not {allowed}")),
        };
        let n: f64 = n
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not {allowed}"))?;
        let per_second = n / seconds;
        if !per_second.is_finite() || n <= 0.0 {
            return Err(format!(
                "{text:?}: a rate must be above 0; to stop a queue, pause it"
            ));
        }
        if !(RATE_BOUNDS.0..=RATE_BOUNDS.1).contains(&per_second) {
            return Err(format!(
                "{text:?} is out of range: use from 1/day (0.04/h) to 1000000/s"
            ));
        }
        Ok(Rate(per_second))
    }
}

/// The rate in the unit that reads best: `50/s`, `10/min`, `100/h`.
impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (n, unit) = if self.0 >= 1.0 {
            (self.0, "s")
        } else if self.0 * 60.0 >= 1.0 {
            (self.0 * 60.0, "min")
        } else {
            (self.0 * 3600.0, "h")
        };
        let text = format!("{n:.3}");
        write!(
            f,
            "{}/{unit}",
            text.trim_end_matches('0').trim_end_matches('.')
        )
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A queue's settings, as its row says (the defaults when it has none).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    /// No job of the queue is claimed while it is paused.
    pub paused: bool,
    /// At most this many jobs of the queue run at once across the fleet.
    pub max_running: Option<i32>,
    /// At most this many jobs with the same concurrency key run at once across the fleet.
    pub per_key: Option<i32>,
    /// Starts across the fleet stay within this rate.
    pub rate: Option<Rate>,
    /// How many starts the rate limit allows at once after a quiet spell.
    pub burst: i32,
    /// When the settings last changed (none for a queue without a row).
    pub updated_at: Option<String>,
}

impl Default for Settings {
    /// A queue without a row.
    fn default() -> Settings {
        Settings {
            paused: false,
            max_running: None,
            per_key: None,
            rate: None,
            burst: 1,
            updated_at: None,
        }
    }
}

impl Settings {
    /// The name and settings of a row with the columns of [`sql::QUEUE_SETTINGS`] from `first`
    /// on (the settings of a queue without a row when the first one is null).
    pub fn from_row(row: &postgres::Row, first: usize) -> (String, Settings) {
        let name = row.get(first);
        let Some(paused) = row.get::<_, Option<bool>>(first + 1) else {
            return (name, Settings::default());
        };
        (
            name,
            Settings {
                paused,
                max_running: row.get(first + 2),
                per_key: row.get(first + 3),
                rate: row.get::<_, Option<f64>>(first + 4).map(Rate),
                burst: row.get(first + 5),
                updated_at: row.get(first + 6),
            },
        )
    }

    /// The limits in words: "max_running 5, per_key 1, rate 50/s (burst 1)", or "no limits".
    pub fn limits(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.max_running {
            parts.push(format!("max_running {n}"));
        }
        if let Some(n) = self.per_key {
            parts.push(format!("per_key {n}"));
        }
        if let Some(r) = self.rate {
            parts.push(format!("rate {r} (burst {})", self.burst));
        }
        if parts.is_empty() {
            "no limits".into()
        } else {
            parts.join(", ")
        }
    }
}

/// A change to a queue's settings: each field `None` leaves that setting alone; `Some(None)`
/// removes a limit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    /// Pause (true) or resume (false).
    pub paused: Option<bool>,
    /// The fleet-wide cap on running jobs.
    pub max_running: Option<Option<i32>>,
    /// The cap on running jobs per concurrency key.
    pub per_key: Option<Option<i32>>,
    /// The rate limit.
    pub rate: Option<Option<Rate>>,
    /// The rate limit's burst.
    pub burst: Option<i32>,
}

impl Change {
    /// The JSON object `queue_set` takes.
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(p) = self.paused {
            m.insert("paused".into(), Value::Bool(p));
        }
        for (key, cap) in [("max_running", self.max_running), ("per_key", self.per_key)] {
            if let Some(cap) = cap {
                m.insert(key.into(), cap.map_or(Value::Null, Value::from));
            }
        }
        if let Some(rate) = self.rate {
            m.insert(
                "rate".into(),
                rate.map_or(Value::Null, |r| Value::from(r.0)),
            );
        }
        if let Some(b) = self.burst {
            m.insert("burst".into(), Value::from(b));
        }
        Value::Object(m)
    }
}

/// Parses a cap given on the command line: a whole number of at least 1, or `none`.
pub fn parse_cap(text: &str) -> Result<Option<i32>, String> {
    if text.trim() == "none" {
        return Ok(None);
    }
    match text.trim().parse::<i64>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(Some(n as i32)),
        _ => Err(format!(
            "{text:?} is not a cap: use a whole number from 1 to 1000000, or none"
        )),
    }
}

/// Applies `change` to `queue` (creating its row if it has none), all or nothing; returns the
/// settings now.
pub fn set(
    client: &mut impl GenericClient,
    schema: &str,
    queue: &str,
    change: &Change,
) -> Result<Settings, QueueError> {
    if !crate::config::is_valid_queue_name(queue) {
        return Err(QueueError::InvalidInput(format!(
            "queue name {queue:?} is not allowed: use 1-128 bytes without spaces, commas or control characters"
        )));
    }
    let row = client
        .query_typed_one(
            &render(sql::QUEUE_SET, schema),
            &[(&queue, Type::TEXT), (&change.to_json(), Type::JSONB)],
        )
        .map_err(|e| match e.code() {
            Some(code) if *code == postgres::error::SqlState::INVALID_PARAMETER_VALUE => {
                QueueError::InvalidInput(
                    e.as_db_error()
                        .map_or(e.to_string(), |db| db.message().to_string()),
                )
            }
            _ => QueueError::Db(e),
        })?;
    Ok(Settings::from_row(&row, 0).1)
}

/// Every queue's settings, by name (queues without a row are not listed).
pub fn settings(
    client: &mut impl GenericClient,
    schema: &str,
) -> Result<BTreeMap<String, Settings>, QueueError> {
    Ok(client
        .query_typed(&render(sql::QUEUE_SETTINGS, schema), &[])?
        .iter()
        .map(|row| Settings::from_row(row, 0))
        .collect())
}

/// One queue as `forkq queue list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// The queue.
    pub queue: String,
    /// Its settings.
    #[serde(flatten)]
    pub settings: Settings,
    /// Its jobs by state (completed jobs are not counted), and its oldest runnable job's age.
    #[serde(flatten)]
    pub counts: QueueStatus,
}

/// Every queue that has a row or jobs (live or dead-lettered), by name.
pub fn list(client: &mut impl GenericClient, schema: &str) -> Result<Vec<Listed>, QueueError> {
    let mut settings = settings(client, schema)?;
    let mut counts = admin::status(client, schema, false)?;
    let names: std::collections::BTreeSet<String> =
        settings.keys().chain(counts.keys()).cloned().collect();
    Ok(names
        .into_iter()
        .map(|queue| Listed {
            settings: settings.remove(&queue).unwrap_or_default(),
            counts: counts.remove(&queue).unwrap_or_default(),
            queue,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_three_units_and_refuse_zero() {
        assert_eq!(Rate::parse("50/s"), Ok(Rate(50.0)));
        assert_eq!(Rate::parse("30/min"), Ok(Rate(0.5)));
        assert_eq!(Rate::parse(" 36/h "), Ok(Rate(0.01)));
        assert_eq!(Rate::parse("2.5/s"), Ok(Rate(2.5)));
        for bad in [
            "0/s",
            "-1/s",
            "5",
            "5/day",
            "x/s",
            "",
            "1/s/s",
            "2000000/s",
            "NaN/s",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        assert!(Rate::parse("0/s").unwrap_err().contains("pause"));
    }

    #[test]
    fn rates_print_in_the_unit_that_reads_best() {
        for (rate, text) in [
            (50.0, "50/s"),
            (0.5, "30/min"),
            (0.01, "36/h"),
            (2.5, "2.5/s"),
        ] {
            assert_eq!(Rate(rate).to_string(), text);
            assert_eq!(Rate::parse(text), Ok(Rate(rate)));
        }
    }

    #[test]
    fn caps_are_positive_or_none() {
        assert_eq!(parse_cap("3"), Ok(Some(3)));
        assert_eq!(parse_cap("none"), Ok(None));
        for bad in ["0", "-1", "1.5", "lots", "1000001"] {
            assert!(parse_cap(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_change_names_only_what_it_changes() {
        let change = Change {
            max_running: Some(None),
            rate: Some(Some(Rate(2.0))),
            ..Change::default()
        };
        assert_eq!(
            change.to_json(),
            serde_json::json!({"max_running": null, "rate": 2.0})
        );
    }
}
