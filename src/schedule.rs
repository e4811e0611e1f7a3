//! Periodic schedules: the file that declares them (`FORKQ_SCHEDULES`), cron expressions in a time
//! zone, and which ticks are due.
//!
//! Pure: no database and no clock of its own (callers pass "now"), so the tick arithmetic, daylight
//! saving time included, is tested with a fixed clock. The database side (one enqueue per tick
//! across every daemon) is in [`crate::queue::schedules`], the loop that drives it in
//! [`crate::ticker`].
//!
//! The file is TOML, one table per schedule:
//!
//! ```toml
//! [nightly-report]
//! cron = "30 2 * * *"          # minute hour day month weekday, or with a leading seconds field
//! timezone = "Europe/Berlin"   # default UTC
//! queue = "reports"            # default "default"
//! task = "report.nightly"
//! payload = { format = "pdf" } # default {}
//! priority = 0                 # default 0
//! max_attempts = 3             # default FORKQ_MAX_ATTEMPTS
//! missed = "catch-up"          # or "skip" (the default)
//! catch_up_limit = 3           # with catch-up only; default 10
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use croner::parser::{CronParser, Seconds};
use croner::{Cron, Direction};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use toml::Spanned;

/// A tick younger than this is late, not missed: it is still enqueued, by whichever daemon gets
/// there first (a restart, a database failover or a slow statement does not lose it).
pub const LATE: Duration = Duration::from_secs(60);
/// Most missed ticks a `catch-up` schedule enqueues when it names no `catch_up_limit`.
pub const DEFAULT_CATCH_UP_LIMIT: u32 = 10;
/// The largest `catch_up_limit`, so a daemon that starts late never floods the queue.
pub const MAX_CATCH_UP_LIMIT: u32 = 1000;

/// What happens to ticks that no daemon enqueued within [`LATE`] of their time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Missed {
    /// Dropped: the schedule resumes with its next tick.
    #[default]
    Skip,
    /// The most recent `catch_up_limit` of them are enqueued, oldest first.
    CatchUp,
}

/// What a schedule enqueues and when, with every default filled in: the form stored in the
/// database and compared between daemons, so two daemons with the same file agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    /// The cron expression: five fields, or six with a leading seconds field.
    pub cron: String,
    /// The IANA time zone the expression is read in.
    pub timezone: String,
    /// The queue of the jobs.
    pub queue: String,
    /// The task of the jobs.
    pub task: String,
    /// The payload of every job.
    pub payload: Value,
    /// The priority of the jobs (lower runs first).
    pub priority: i16,
    /// Attempts of each job before the dead letter.
    pub max_attempts: i32,
    /// The missed-ticks policy.
    pub missed: Missed,
    /// With [`Missed::CatchUp`]: the most missed ticks enqueued at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up_limit: Option<u32>,
}

/// A checked schedule, ready to compute its ticks.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Its name (the table name in the file), unique in a database schema.
    pub name: String,
    /// What it enqueues and when.
    pub definition: Definition,
    cron: Cron,
    zone: TimeZone,
}

/// The ticks of one schedule to enqueue now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Oldest first.
    pub ticks: Vec<Timestamp>,
    /// Whether missed ticks were left out (skipped, or beyond the catch-up limit).
    pub left_out: bool,
}

/// Whether `name` can name a schedule: 1-128 bytes of letters, digits and `-_.:/`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
}

/// The part of a definition a check refused, so the file's error can point at its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    Cron,
    Timezone,
    Queue,
    Task,
    MaxAttempts,
    CatchUpLimit,
}

impl Schedule {
    /// Checks a definition (from the file, or as the database holds it) and compiles its cron
    /// expression and time zone. The error says what is wrong, without a location.
    pub fn new(name: &str, definition: Definition) -> Result<Schedule, String> {
        Schedule::check(name, definition).map_err(|(_, why)| why)
    }

    fn check(name: &str, definition: Definition) -> Result<Schedule, (Field, String)> {
        if !is_valid_name(name) {
            return Err((
                Field::Name,
                format!(
                    "schedule name {name:?} is not allowed: use 1-128 letters, digits and -_.:/"
                ),
            ));
        }
        let cron = parse_cron(&definition.cron).map_err(|why| (Field::Cron, why))?;
        let zone = parse_zone(&definition.timezone).map_err(|why| (Field::Timezone, why))?;
        if !crate::config::is_valid_queue_name(&definition.queue) {
            return Err((
                Field::Queue,
                format!(
                    "queue {:?} is not allowed: use 1-128 bytes without spaces, commas or control characters",
                    definition.queue
                ),
            ));
        }
        if definition.task.is_empty()
            || definition.task.len() > 256
            || definition.task.chars().any(char::is_control)
        {
            return Err((
                Field::Task,
                format!(
                    "task {:?} is not allowed: use 1-256 bytes without control characters",
                    definition.task
                ),
            ));
        }
        if !(1..=1000).contains(&definition.max_attempts) {
            return Err((
                Field::MaxAttempts,
                format!("max_attempts is {}; use 1 to 1000", definition.max_attempts),
            ));
        }
        let limit_error = match (definition.missed, definition.catch_up_limit) {
            (Missed::Skip, Some(_)) => {
                Some("catch_up_limit applies only with missed = \"catch-up\"".to_string())
            }
            (Missed::CatchUp, None) => Some("catch-up needs a catch_up_limit".to_string()),
            (Missed::CatchUp, Some(n)) if !(1..=MAX_CATCH_UP_LIMIT).contains(&n) => Some(format!(
                "catch_up_limit is {n}; use 1 to {MAX_CATCH_UP_LIMIT}"
            )),
            _ => None,
        };
        if let Some(why) = limit_error {
            return Err((Field::CatchUpLimit, why));
        }
        Ok(Schedule {
            name: name.to_string(),
            definition,
            cron,
            zone,
        })
    }

    /// The first tick strictly after `t`, or `None` when the expression never matches again.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_next_occurrence(&t.to_zoned(self.zone.clone()), false)
            .ok()
            .map(|z| z.timestamp())
    }

    /// The ticks to enqueue at `now` when every tick up to `after` is dealt with: every late tick
    /// (younger than [`LATE`]), and of the missed ones none (`skip`) or the most recent
    /// `catch_up_limit` (`catch-up`), oldest first.
    pub fn due(&self, after: Timestamp, now: Timestamp) -> Due {
        let late_from = now - LATE;
        let mut due = Due::default();
        if after < late_from {
            // The latest missed tick, if any: searching backwards from the boundary costs the
            // same whatever the length of the outage.
            let missed = self
                .cron
                .iter_from(late_from.to_zoned(self.zone.clone()), Direction::Backward)
                .map(|z| z.timestamp())
                .take_while(|t| *t > after);
            let limit = match self.definition.missed {
                Missed::Skip => 0,
                Missed::CatchUp => self.definition.catch_up_limit.unwrap_or(0) as usize,
            };
            let mut recent: Vec<Timestamp> = Vec::new();
            for (n, tick) in missed.enumerate() {
                if n >= limit {
                    due.left_out = true;
                    break;
                }
                recent.push(tick);
            }
            recent.reverse();
            due.ticks = recent;
        }
        let mut cursor = after.max(late_from);
        while let Some(tick) = self.next_after(cursor).filter(|t| *t <= now) {
            due.ticks.push(tick);
            cursor = tick;
        }
        due
    }
}

fn parse_cron(expression: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(expression)
        .map_err(|e| {
            format!(
                "cron expression {expression:?} is invalid ({e}); use five fields \
                 (minute hour day-of-month month day-of-week) or six with a leading seconds field, \
                 e.g. \"30 2 * * *\" or \"*/10 * * * * *\""
            )
        })
}

fn parse_zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|_| {
        format!(
            "time zone {name:?} is unknown; use an IANA name such as \"UTC\", \"Europe/Berlin\" \
             or \"America/New_York\""
        )
    })
}

/// One table of the file as written, with the position of each value for error messages.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    cron: Spanned<String>,
    timezone: Option<Spanned<String>>,
    queue: Option<Spanned<String>>,
    task: Spanned<String>,
    payload: Option<Spanned<Value>>,
    priority: Option<Spanned<i64>>,
    max_attempts: Option<Spanned<i64>>,
    missed: Option<Spanned<Missed>>,
    catch_up_limit: Option<Spanned<i64>>,
}

/// Reads and checks the schedules file at `path`. `default_max_attempts` fills in schedules that
/// name none. The error names the file, the line and what is wrong.
pub fn load(path: &Path, default_max_attempts: i32) -> Result<Vec<Schedule>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
    parse(&text, &path.display().to_string(), default_max_attempts)
}

/// Parses schedules from TOML `text`; `origin` names it in errors ("FILE line N: what").
pub fn parse(text: &str, origin: &str, default_max_attempts: i32) -> Result<Vec<Schedule>, String> {
    let at = |offset: usize, what: String| {
        let line = text[..offset.min(text.len())].matches('\n').count() + 1;
        format!("{origin} line {line}: {what}")
    };
    let entries: BTreeMap<Spanned<String>, Spanned<Entry>> = toml::from_str(text).map_err(|e| {
        let what = format!(
            "{} (see the format in docs/schedules.md)",
            e.message().trim()
        );
        at(e.span().map_or(0, |s| s.start), what)
    })?;
    let mut schedules = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        let table_at = entry.span().start;
        let entry = entry.into_inner();
        let fail = |span: Option<std::ops::Range<usize>>, why: String| {
            at(
                span.map_or(table_at, |s| s.start),
                format!("schedule {:?}: {why}", name.get_ref()),
            )
        };
        let int =
            |value: &Option<Spanned<i64>>, what: &str, default: i64, max: (i64, i64)| match value {
                None => Ok(default),
                Some(v) if (max.0..=max.1).contains(v.get_ref()) => Ok(*v.get_ref()),
                Some(v) => Err(fail(
                    Some(v.span()),
                    format!("{what} is {}; use {} to {}", v.get_ref(), max.0, max.1),
                )),
            };
        let missed = entry.missed.as_ref().map_or(Missed::Skip, |m| *m.get_ref());
        let catch_up_limit = match (missed, &entry.catch_up_limit) {
            (Missed::Skip, None) => None,
            (Missed::Skip, Some(v)) => Some(*v.get_ref() as u32),
            (Missed::CatchUp, limit) => Some(int(
                limit,
                "catch_up_limit",
                i64::from(DEFAULT_CATCH_UP_LIMIT),
                (1, i64::from(MAX_CATCH_UP_LIMIT)),
            )? as u32),
        };
        let text = |v: &Option<Spanned<String>>, default: &str| {
            v.as_ref()
                .map_or(default.to_string(), |v| v.get_ref().clone())
        };
        let definition = Definition {
            cron: entry.cron.get_ref().clone(),
            timezone: text(&entry.timezone, "UTC"),
            queue: text(&entry.queue, "default"),
            task: entry.task.get_ref().clone(),
            payload: entry
                .payload
                .as_ref()
                .map_or(Value::Object(Default::default()), |p| p.get_ref().clone()),
            priority: int(&entry.priority, "priority", 0, (-32768, 32767))? as i16,
            max_attempts: int(
                &entry.max_attempts,
                "max_attempts",
                i64::from(default_max_attempts),
                (1, 1000),
            )? as i32,
            missed,
            catch_up_limit,
        };
        let schedule = Schedule::check(name.get_ref(), definition).map_err(|(field, why)| {
            let span = match field {
                Field::Name => Some(name.span()),
                Field::Cron => Some(entry.cron.span()),
                Field::Timezone => entry.timezone.as_ref().map(Spanned::span),
                Field::Queue => entry.queue.as_ref().map(Spanned::span),
                Field::Task => Some(entry.task.span()),
                Field::MaxAttempts => entry.max_attempts.as_ref().map(Spanned::span),
                Field::CatchUpLimit => entry.catch_up_limit.as_ref().map(Spanned::span),
            };
            fail(span, why)
        })?;
        schedules.push(schedule);
    }
    Ok(schedules)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn one(toml: &str) -> Schedule {
        parse(toml, "s.toml", 25).unwrap().remove(0)
    }

    fn error(toml: &str) -> String {
        parse(toml, "s.toml", 25).unwrap_err()
    }

    /// The next `n` ticks after `from`, as UTC texts.
    fn ticks(s: &Schedule, from: &str, n: usize) -> Vec<String> {
        let mut t = ts(from);
        (0..n)
            .map(|_| {
                t = s.next_after(t).unwrap();
                t.to_string()
            })
            .collect()
    }

    const BERLIN_0230: &str =
        "[nightly]\ncron = \"30 2 * * *\"\ntimezone = \"Europe/Berlin\"\ntask = \"report\"\n";

    #[test]
    fn berlin_0230_runs_at_0300_when_the_clocks_spring_forward() {
        // 2024-03-31: 02:00 CET becomes 03:00 CEST, so 02:30 does not exist that day. The run
        // takes place at the first minute after the gap, 03:00 CEST, and the day after at 02:30
        // CEST again: once a day, every day.
        assert_eq!(
            ticks(&one(BERLIN_0230), "2024-03-29T12:00:00Z", 4),
            [
                "2024-03-30T01:30:00Z", // 02:30 CET
                "2024-03-31T01:00:00Z", // 03:00 CEST
                "2024-04-01T00:30:00Z", // 02:30 CEST
                "2024-04-02T00:30:00Z",
            ]
        );
    }

    #[test]
    fn berlin_0230_runs_once_when_the_clocks_fall_back() {
        // 2024-10-27: 03:00 CEST becomes 02:00 CET, so 02:30 happens twice. The run takes place
        // at the first, 02:30 CEST, and not again at 02:30 CET an hour later.
        assert_eq!(
            ticks(&one(BERLIN_0230), "2024-10-25T12:00:00Z", 3),
            [
                "2024-10-26T00:30:00Z", // 02:30 CEST
                "2024-10-27T00:30:00Z", // 02:30 CEST, the first of the two
                "2024-10-28T01:30:00Z", // 02:30 CET
            ]
        );
    }

    #[test]
    fn interval_schedules_follow_real_time_across_clock_changes() {
        let every_30 =
            one("[x]\ncron = \"*/30 * * * *\"\ntimezone = \"Europe/Berlin\"\ntask = \"t\"\n");
        // Spring: the wall-clock hour 02:xx does not exist; 01:30 CET is followed by 03:00 CEST,
        // half an hour of real time later.
        assert_eq!(
            ticks(&every_30, "2024-03-31T00:15:00Z", 3),
            [
                "2024-03-31T00:30:00Z",
                "2024-03-31T01:00:00Z",
                "2024-03-31T01:30:00Z"
            ]
        );
        // Autumn: the repeated hour runs in both passes, every half hour of real time.
        assert_eq!(
            ticks(&every_30, "2024-10-27T00:15:00Z", 4),
            [
                "2024-10-27T00:30:00Z", // 02:30 CEST
                "2024-10-27T01:00:00Z", // 02:00 CET
                "2024-10-27T01:30:00Z", // 02:30 CET
                "2024-10-27T02:00:00Z", // 03:00 CET
            ]
        );
    }

    #[test]
    fn five_or_six_fields_and_utc_by_default() {
        let every_second = one("[every-second]\ncron = \"* * * * * *\"\ntask = \"noop\"\n");
        assert_eq!(every_second.definition.timezone, "UTC");
        assert_eq!(every_second.definition.queue, "default");
        assert_eq!(
            ticks(&every_second, "2030-01-01T00:00:00.250Z", 2),
            ["2030-01-01T00:00:01Z", "2030-01-01T00:00:02Z"]
        );
        let minutely = one("[m]\ncron = \"*/15 * * * *\"\ntask = \"noop\"\n");
        assert_eq!(
            ticks(&minutely, "2030-01-01T00:00:00Z", 2),
            ["2030-01-01T00:15:00Z", "2030-01-01T00:30:00Z"]
        );
    }

    #[test]
    fn late_ticks_are_enqueued_and_missed_ones_follow_the_policy() {
        let skip = one("[s]\ncron = \"*/10 * * * * *\"\ntask = \"t\"\n");
        let now = ts("2030-01-01T12:00:05Z");
        // On time: the one tick since the last.
        assert_eq!(
            skip.due(ts("2030-01-01T11:59:50Z"), now),
            Due {
                ticks: vec![ts("2030-01-01T12:00:00Z")],
                left_out: false
            }
        );
        // Thirty seconds behind: every late tick, oldest first.
        assert_eq!(
            skip.due(ts("2030-01-01T11:59:30Z"), now).ticks,
            [
                ts("2030-01-01T11:59:40Z"),
                ts("2030-01-01T11:59:50Z"),
                ts("2030-01-01T12:00:00Z")
            ]
        );
        // An hour behind: ticks older than LATE were missed; skip drops them.
        let due = skip.due(ts("2030-01-01T11:00:00Z"), now);
        assert!(due.left_out);
        assert_eq!(due.ticks.first(), Some(&ts("2030-01-01T11:59:10Z")));
        assert_eq!(due.ticks.len(), 6);

        let catch_up = one(
            "[c]\ncron = \"*/10 * * * * *\"\ntask = \"t\"\nmissed = \"catch-up\"\ncatch_up_limit = 3\n",
        );
        // A year behind costs three backward steps, not a year of forward ones.
        let due = catch_up.due(ts("2029-01-01T00:00:00Z"), now);
        assert!(due.left_out);
        assert_eq!(
            due.ticks[..4],
            [
                ts("2030-01-01T11:58:40Z"),
                ts("2030-01-01T11:58:50Z"),
                ts("2030-01-01T11:59:00Z"),
                ts("2030-01-01T11:59:10Z"),
            ],
            "the three most recent missed ticks, then the late ones"
        );
        assert_eq!(due.ticks.len(), 9);
        // Fewer missed than the limit: all of them, nothing left out.
        let due = catch_up.due(ts("2030-01-01T11:58:50Z"), now);
        assert!(!due.left_out);
        assert_eq!(due.ticks[0], ts("2030-01-01T11:59:00Z"));
        // Nothing due yet.
        assert_eq!(catch_up.due(now, now), Due::default());
    }

    #[test]
    fn definitions_are_normalised_for_the_database() {
        let s = one(
            "[r]\ncron = \"0 6 * * MON\"\ntask = \"report\"\nqueue = \"reports\"\n\
             payload = { format = \"pdf\", pages = [1, 2] }\npriority = -3\nmissed = \"catch-up\"\n",
        );
        assert_eq!(
            serde_json::to_value(&s.definition).unwrap(),
            serde_json::json!({
                "cron": "0 6 * * MON", "timezone": "UTC", "queue": "reports", "task": "report",
                "payload": {"format": "pdf", "pages": [1, 2]}, "priority": -3,
                "max_attempts": 25, "missed": "catch-up", "catch_up_limit": 10,
            })
        );
        let back: Definition =
            serde_json::from_value(serde_json::to_value(&s.definition).unwrap()).unwrap();
        assert_eq!(back, s.definition);
    }

    #[test]
    fn bad_files_name_the_line_and_what_is_wrong() {
        let cases = [
            (
                "[a]\ntask = \"t\"\ncron = \"61 * * * *\"\n",
                "s.toml line 3: schedule \"a\": cron expression \"61 * * * *\" is invalid",
            ),
            (
                "[a]\ncron = \"* * * * *\"\n\ntimezone = \"Mars/Olympus\"\ntask = \"t\"\n",
                "s.toml line 4: schedule \"a\": time zone \"Mars/Olympus\" is unknown",
            ),
            ("[a]\ncron = \"* * * * *\"\ntask = \n", "s.toml line 3: "),
            ("[a]\ncron = \"* * * * *\"\n", "s.toml line 1: missing field `task`"),
            (
                "[a]\ncron = \"* * * * *\"\ntask = \"t\"\nqueu = \"x\"\n",
                "s.toml line 4: unknown field `queu`",
            ),
            (
                "[a]\ncron = \"* * * * *\"\ntask = \"t\"\nmissed = \"sometimes\"\n",
                "s.toml line 4: unknown variant `sometimes`",
            ),
            (
                "[a]\ncron = \"* * * * *\"\ntask = \"t\"\ncatch_up_limit = 3\n",
                "s.toml line 4: schedule \"a\": catch_up_limit applies only with missed = \"catch-up\"",
            ),
            (
                "[a]\ncron = \"* * * * *\"\ntask = \"t\"\nmissed = \"catch-up\"\ncatch_up_limit = 0\n",
                "s.toml line 5: schedule \"a\": catch_up_limit is 0; use 1 to 1000",
            ),
            (
                "[a]\ncron = \"* * * * *\"\ntask = \"t\"\nqueue = \"two words\"\n",
                "s.toml line 4: schedule \"a\": queue \"two words\" is not allowed",
            ),
            (
                "[\"no spaces\"]\ncron = \"* * * * *\"\ntask = \"t\"\n",
                "s.toml line 1: schedule \"no spaces\": schedule name",
            ),
            ("[a]\ncron = \"* * * * *\"\ntask = \"t\"\n[a]\n", "s.toml line 4: "),
        ];
        for (text, expected) in cases {
            let message = error(text);
            assert!(
                message.starts_with(expected),
                "{text:?}\n got: {message}\nwant: {expected}..."
            );
        }
    }
}
