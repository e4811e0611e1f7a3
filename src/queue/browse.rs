//! The job browser: keyset pages of live and archived jobs by queue, state and task, and the bulk
//! retry and cancel over the same filters. Shared by `forkq jobs`/`retry`/`cancel` and the
//! dashboard, so both show and touch exactly the same jobs.
//!
//! Pages run newest first and continue *after* (below) the id of the last row shown. Each page
//! walks at most [`SCAN_BUDGET`] rows of each table along an index in id order (the primary key,
//! or the partial dead-letter indexes for failed and cancelled jobs), so a page costs the same on
//! a 10-million-row archive as on an empty one, whatever the filters. When a rare filter does not
//! fill a page within the walk, the page says how far it got ([`Page::next`] with
//! [`Page::partial`]) and the next page goes on from there.

use postgres::types::{ToSql, Type};
use postgres::GenericClient;
use serde::{Deserialize, Serialize};

use super::admin::STATES;
use super::sql::{self, render};
use super::QueueError;
use crate::config::is_valid_queue_name;

/// Rows each page may examine per table, at most.
pub const SCAN_BUDGET: i64 = 5_000;
/// The largest page.
pub const MAX_LIMIT: i64 = 1_000;
/// Jobs retried or cancelled per transaction by the bulk actions.
const CHUNK: i64 = 1_000;

/// States that live in the archive.
const ARCHIVED: [&str; 3] = ["completed", "failed", "cancelled"];
/// States of the dead letter.
const DEAD: [&str; 2] = ["failed", "cancelled"];

/// Bad input to the browser, with what was wrong and what to do (CLI exit 65, dashboard 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError(pub String);

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FilterError {}

/// Which jobs to show or act on; `None` matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Filter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this state (one of [`STATES`]; due scheduled and retryable jobs count as available).
    pub state: Option<String>,
    /// Only this task.
    pub task: Option<String>,
}

impl Filter {
    /// Validates raw filter values (empty means "any"), naming the one at fault.
    pub fn parse(
        queue: Option<&str>,
        state: Option<&str>,
        task: Option<&str>,
    ) -> Result<Filter, FilterError> {
        fn given(v: Option<&str>) -> Option<&str> {
            v.map(str::trim).filter(|v| !v.is_empty())
        }
        let queue = given(queue).map(str::to_string);
        if let Some(q) = &queue {
            if !is_valid_queue_name(q) {
                return Err(FilterError(format!(
                    "queue {q:?} is not a queue name: at most 128 bytes, no spaces, commas or control characters"
                )));
            }
        }
        let state = given(state).map(str::to_string);
        if let Some(s) = &state {
            if !STATES.contains(&s.as_str()) {
                return Err(FilterError(format!(
                    "unknown state {s:?}: use one of {}",
                    STATES.join(", ")
                )));
            }
        }
        let task = given(task).map(str::to_string);
        if let Some(t) = &task {
            if t.len() > 256 || t.chars().any(char::is_control) {
                return Err(FilterError(format!(
                    "task {t:?} is not a task name: at most 256 bytes, no control characters"
                )));
            }
        }
        Ok(Filter { queue, state, task })
    }

    fn wants_live(&self) -> bool {
        self.state
            .as_deref()
            .map_or(true, |s| !ARCHIVED.contains(&s))
    }

    fn wants_archive(&self) -> bool {
        self.state
            .as_deref()
            .map_or(true, |s| ARCHIVED.contains(&s))
    }
}

/// Where a page starts and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Show jobs with ids below this one (the last id of the previous page); `None` from the newest.
    pub after: Option<i64>,
    /// At most this many jobs (1..=[`MAX_LIMIT`]).
    pub limit: i64,
}

impl Cursor {
    /// Validates a page request.
    pub fn new(after: Option<i64>, limit: i64) -> Result<Cursor, FilterError> {
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(FilterError(format!(
                "limit {limit} is out of range: use 1 to {MAX_LIMIT}"
            )));
        }
        if let Some(a) = after.filter(|&a| a < 1) {
            return Err(FilterError(format!(
                "after {a} is not a job id: use the last id of the previous page"
            )));
        }
        Ok(Cursor { after, limit })
    }
}

/// One job as the browser lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRow {
    /// The job id.
    pub id: i64,
    /// Its queue.
    pub queue: String,
    /// Its task.
    pub task: String,
    /// Its state (a due scheduled or retryable job shows as available).
    pub state: String,
    /// Attempts charged so far.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When it was enqueued.
    pub created_at: String,
    /// When it runs (live jobs) or finished (archived jobs).
    pub at: String,
    /// The start of its last error, if any.
    pub error: Option<String>,
    /// Its batch, if any.
    pub batch_id: Option<i64>,
}

/// One page of jobs, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// The jobs.
    pub jobs: Vec<JobRow>,
    /// The `after` of the next page; `None` when there is nothing older.
    pub next: Option<i64>,
    /// The page is not full because its walk ended before the filters matched enough jobs, not
    /// because nothing older matches: the next page goes on below `next`.
    pub partial: bool,
}

/// What one table's walk found.
struct Walk {
    rows: Vec<JobRow>,
    /// Every id at or above this was examined (0: the walk reached the table's oldest row).
    covered_down_to: i64,
}

fn walk(
    client: &mut impl GenericClient,
    schema: &str,
    template: &str,
    filter: &Filter,
    cursor: Cursor,
) -> Result<Walk, QueueError> {
    let after = cursor.after.unwrap_or(i64::MAX);
    // Typed, so a statement need not use every parameter (the extent uses no filter).
    let params: [(&(dyn ToSql + Sync), Type); 6] = [
        (&after, Type::INT8),
        (&SCAN_BUDGET, Type::INT8),
        (&cursor.limit, Type::INT8),
        (&filter.queue, Type::TEXT),
        (&filter.task, Type::TEXT),
        (&filter.state, Type::TEXT),
    ];
    let statement = |outer: &str| render(&outer.replace("{walk}", template), schema);
    let rows = client
        .query_typed(&statement(sql::BROWSE_PAGE), &params)?
        .iter()
        .map(|row| serde_json::from_value(row.get(0)))
        .collect::<Result<Vec<JobRow>, _>>()
        .map_err(|e| QueueError::InvalidJob(format!("unexpected job row: {e}")))?;
    let covered_down_to = if rows.len() as i64 == cursor.limit {
        rows.last().map_or(0, |r| r.id)
    } else {
        // Not full: the walk ran to its end; whether that was the table's end or the budget's
        // decides whether older matches may remain.
        let extent = client.query_typed_one(&statement(sql::BROWSE_EXTENT), &params)?;
        let examined: i64 = extent.get(0);
        let lowest: Option<i64> = extent.get(1);
        match lowest {
            Some(lowest) if examined == SCAN_BUDGET => lowest,
            _ => 0,
        }
    };
    Ok(Walk {
        rows,
        covered_down_to,
    })
}

/// One page of jobs matching `filter`, live and archived merged by id, newest first.
pub fn page(
    client: &mut impl GenericClient,
    schema: &str,
    filter: &Filter,
    cursor: Cursor,
) -> Result<Page, QueueError> {
    let mut walks = Vec::new();
    if filter.wants_live() {
        walks.push(walk(client, schema, sql::BROWSE_LIVE_WALK, filter, cursor)?);
    }
    if filter.wants_archive() {
        let dead = match (filter.state.as_deref(), &filter.queue) {
            (Some(s), Some(_)) if DEAD.contains(&s) => {
                format!("{} {}", sql::BROWSE_DEAD_ONLY, sql::BROWSE_DEAD_QUEUE)
            }
            (Some(s), None) if DEAD.contains(&s) => sql::BROWSE_DEAD_ONLY.to_string(),
            _ => String::new(),
        };
        let template = sql::BROWSE_ARCHIVE_WALK.replace("{dead}", &dead);
        walks.push(walk(client, schema, &template, filter, cursor)?);
    }
    Ok(merge(walks, cursor.limit))
}

/// Merges the walks of both tables: only ids every walk has examined can be shown, or a job of
/// one table could be skipped for good by a page that the other table filled.
fn merge(walks: Vec<Walk>, limit: i64) -> Page {
    let floor = walks.iter().map(|w| w.covered_down_to).max().unwrap_or(0);
    let mut jobs: Vec<JobRow> = walks
        .into_iter()
        .flat_map(|w| w.rows)
        .filter(|r| r.id >= floor)
        .collect();
    jobs.sort_by_key(|r| std::cmp::Reverse(r.id));
    jobs.truncate(limit as usize);
    let full = jobs.len() as i64 == limit;
    let next = if full {
        jobs.last().map(|r| r.id)
    } else {
        (floor > 0).then_some(floor)
    };
    Page {
        partial: !full && next.is_some(),
        jobs,
        next,
    }
}

/// The dead-letter state a bulk retry acts on: failed unless the filter names cancelled.
fn dead_state(filter: &Filter) -> Result<Option<&str>, FilterError> {
    match filter.state.as_deref() {
        None => Ok(Some("failed")),
        Some(s) if DEAD.contains(&s) => Ok(Some(s)),
        Some(s) => Err(FilterError(format!(
            "only failed or cancelled jobs can be retried, not {s} ones: use --state failed or --state cancelled"
        ))),
    }
}

/// The live state a bulk cancel acts on; archived states cannot be cancelled.
fn live_state(filter: &Filter) -> Result<Option<&str>, FilterError> {
    match filter.state.as_deref() {
        Some(s) if ARCHIVED.contains(&s) => Err(FilterError(format!(
            "{s} jobs are finished and cannot be cancelled: use --state available, scheduled, running or retryable"
        ))),
        s => Ok(s),
    }
}

/// A bulk action over the jobs a filter matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bulk {
    /// Move dead-lettered jobs back to their queue.
    Retry,
    /// Cancel live jobs.
    Cancel,
}

/// Checks that `filter` suits `action` (retry: the dead letter; cancel: live jobs).
pub fn check_bulk(action: Bulk, filter: &Filter) -> Result<(), FilterError> {
    match action {
        Bulk::Retry => dead_state(filter).map(|_| ()),
        Bulk::Cancel => live_state(filter).map(|_| ()),
    }
}

/// The ids `action` would touch above `after`, oldest first, at most `limit`.
fn target_ids(
    client: &mut impl GenericClient,
    schema: &str,
    action: Bulk,
    filter: &Filter,
    after: i64,
    limit: i64,
) -> Result<Vec<i64>, QueueError> {
    let (statement, state) = match action {
        Bulk::Retry => (sql::DEAD_IDS, dead_state(filter)),
        Bulk::Cancel => (sql::LIVE_IDS, live_state(filter)),
    };
    let state = state.map_err(|e| QueueError::InvalidJob(e.0))?;
    Ok(client
        .query_typed(
            &render(statement, schema),
            &[
                (&after, Type::INT8),
                (&filter.queue, Type::TEXT),
                (&filter.task, Type::TEXT),
                (&state, Type::TEXT),
                (&limit, Type::INT8),
            ],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// How many jobs `action` would touch now (for the confirmation before a bulk action).
pub fn count_targets(
    client: &mut impl GenericClient,
    schema: &str,
    action: Bulk,
    filter: &Filter,
) -> Result<i64, QueueError> {
    let mut total = 0;
    let mut after = 0;
    loop {
        let ids = target_ids(client, schema, action, filter, after, 100 * CHUNK)?;
        total += ids.len() as i64;
        match ids.last() {
            Some(&last) if ids.len() as i64 == 100 * CHUNK => after = last,
            _ => return Ok(total),
        }
    }
}

/// Applies `action` to every job `filter` matches, [`CHUNK`] jobs per transaction (a huge dead
/// letter never holds one long transaction); returns how many were retried or cancelled.
/// `retain` is whether cancelled jobs are archived (`FORKQ_RETENTION_SECONDS` > 0).
pub fn apply(
    client: &mut postgres::Client,
    schema: &str,
    action: Bulk,
    filter: &Filter,
    retain: bool,
) -> Result<i64, QueueError> {
    let mut done = 0;
    let mut after = 0;
    loop {
        let mut tx = client.transaction()?;
        let ids = target_ids(&mut tx, schema, action, filter, after, CHUNK)?;
        let Some(&last) = ids.last() else {
            return Ok(done);
        };
        let moved: i64 = match action {
            Bulk::Retry => tx.query_typed_one(
                &render(sql::RETRY_MANY, schema),
                &[(&ids, Type::INT8_ARRAY)],
            )?,
            Bulk::Cancel => tx.query_typed_one(
                &render(sql::CANCEL_MANY, schema),
                &[(&ids, Type::INT8_ARRAY), (&retain, Type::BOOL)],
            )?,
        }
        .get(0);
        tx.commit()?;
        done += moved;
        after = last;
    }
}

/// Deletes a dead-lettered job for good; false when it is not in the dead letter (or belongs to
/// an open batch, whose counters are recomputed from its children).
pub fn discard(client: &mut impl GenericClient, schema: &str, id: i64) -> Result<bool, QueueError> {
    Ok(client
        .query_typed_opt(&render(sql::DISCARD, schema), &[(&id, Type::INT8)])?
        .is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64) -> JobRow {
        JobRow {
            id,
            queue: "q".into(),
            task: "t".into(),
            state: "failed".into(),
            attempt: 1,
            max_attempts: 1,
            created_at: String::new(),
            at: String::new(),
            error: None,
            batch_id: None,
        }
    }

    fn ids(page: &Page) -> Vec<i64> {
        page.jobs.iter().map(|r| r.id).collect()
    }

    #[test]
    fn filters_name_what_is_wrong() {
        assert!(Filter::parse(Some("a b"), None, None)
            .unwrap_err()
            .0
            .contains("queue"));
        let err = Filter::parse(None, Some("done"), None).unwrap_err().0;
        assert!(
            err.contains("unknown state \"done\"") && err.contains("failed"),
            "{err}"
        );
        assert_eq!(
            Filter::parse(Some(" "), Some(""), None).unwrap(),
            Filter::default()
        );
        assert!(Cursor::new(None, 0).is_err());
        assert!(Cursor::new(Some(0), 10).is_err());
        assert!(check_bulk(
            Bulk::Retry,
            &Filter::parse(None, Some("running"), None).unwrap()
        )
        .is_err());
        assert!(check_bulk(
            Bulk::Cancel,
            &Filter::parse(None, Some("failed"), None).unwrap()
        )
        .is_err());
    }

    #[test]
    fn merge_never_skips_rows_of_a_table_that_was_not_walked_as_far() {
        // The live walk filled its page down to 50; the archive's was cut by its budget at 70.
        let live = Walk {
            rows: vec![row(90), row(60), row(50)],
            covered_down_to: 50,
        };
        let archive = Walk {
            rows: vec![row(80)],
            covered_down_to: 70,
        };
        let page = merge(vec![live, archive], 3);
        assert_eq!(ids(&page), vec![90, 80]);
        assert_eq!(page.next, Some(70));
        assert!(page.partial);
    }

    #[test]
    fn merge_ends_when_every_walk_reached_the_oldest_row() {
        let page = merge(
            vec![
                Walk {
                    rows: vec![row(5)],
                    covered_down_to: 0,
                },
                Walk {
                    rows: vec![row(7), row(3)],
                    covered_down_to: 0,
                },
            ],
            10,
        );
        assert_eq!(ids(&page), vec![7, 5, 3]);
        assert_eq!((page.next, page.partial), (None, false));
        let full = merge(
            vec![Walk {
                rows: vec![row(9), row(8)],
                covered_down_to: 8,
            }],
            2,
        );
        assert_eq!((full.next, full.partial), (Some(8), false));
    }
}
