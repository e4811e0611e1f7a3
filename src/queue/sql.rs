//! Every SQL statement forkq sends, in one place.
//!
//! Statements are templates: `{s}` is the quoted schema and `{c}` the notification channel, both
//! derived from `FORKQ_SCHEMA` (a validated identifier). Values always travel as bind parameters;
//! nothing from a job or a command line is ever spliced into SQL text.

/// Fills in the schema and channel of a template.
pub fn render(template: &str, schema: &str) -> String {
    template
        .replace("{s}", &format!("\"{schema}\""))
        .replace("{c}", &channel(schema))
}

/// A stable advisory-lock key for `purpose` in `schema`, so work on one schema serialises while
/// other schemas (parallel tests, tenants) do not. FNV-1a: stable across builds and platforms.
pub fn advisory_key(purpose: &str, schema: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"forkq."
        .iter()
        .chain(purpose.as_bytes())
        .chain(b".")
        .chain(schema.as_bytes())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// The first key of the claim gate's advisory locks in `schema` (see [`GATE`]; the second is
/// the turn): the high half of [`advisory_key`], as the two-key lock functions take `int`s.
pub fn claim_gate_key(schema: &str) -> i32 {
    (advisory_key("claim", schema) >> 32) as i32
}

/// What the LISTEN/NOTIFY channel of a schema starts with.
pub const CHANNEL_PREFIX: &str = "forkq_";

/// The LISTEN/NOTIFY channel of a schema: an identifier too, so a schema name is bounded by it
/// (see [`crate::config::MAX_SCHEMA_BYTES`]).
pub fn channel(schema: &str) -> String {
    format!("{CHANNEL_PREFIX}{schema}")
}

/// Enqueues one job through the SQL function that every producer shares; answers its id and
/// whether it was created or replaced (see `enqueue_job` in the migration).
/// `$5` is an RFC 3339 text and `$6` a delay in seconds; at most one of them is non-null.
/// `$10` is a unique window in seconds; `$12`-`$14` are the flow-control options (concurrency
/// key, timeout, backoff).
pub const ENQUEUE: &str = "
    SELECT id, created, replaced
    FROM {s}.enqueue_job($1, $2, $3, $4,
                         coalesce($5::text::timestamptz, now() + make_interval(secs => $6::float8)),
                         $7, $8, $9, make_interval(secs => $10::float8), $11, $12, $13, $14)";

/// Enqueues many jobs in one statement; unique keys that are live already are skipped. Answers
/// how many were inserted. Jobs with a unique window or `replace` go through
/// [`ENQUEUE_EACH`] instead.
pub const ENQUEUE_MANY: &str = "
    WITH input AS (
        SELECT queue, task, payload, priority,
               coalesce(run_at_text::timestamptz, now() + make_interval(secs => delay)) AS run_at,
               max_attempts, unique_key, batch_id, concurrency_key, timeout_seconds,
               backoff_seconds
        FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::smallint[], $5::text[],
                    $6::float8[], $7::int[], $8::text[], $9::bigint[], $10::text[],
                    $11::float8[], $12::float8[])
            AS a(queue, task, payload, priority, run_at_text, delay, max_attempts, unique_key,
                 batch_id, concurrency_key, timeout_seconds, backoff_seconds)
    ), inserted AS (
        INSERT INTO {s}.jobs (queue, task, payload, priority, state, run_at, max_attempts,
                              unique_key, batch_id, concurrency_key, timeout_seconds,
                              backoff_seconds)
        SELECT queue, task, payload, priority,
               CASE WHEN run_at > now() THEN 'scheduled' ELSE 'available' END,
               coalesce(run_at, now()), max_attempts, unique_key, batch_id, concurrency_key,
               timeout_seconds, backoff_seconds
        FROM input
        ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
        RETURNING queue
    )
    SELECT count(*) FROM inserted";

/// Enqueues many jobs one by one, in order, through `enqueue_job` (for unique windows and
/// `replace`); answers how many were created and how many replaced a waiting job.
pub const ENQUEUE_EACH: &str = "
    SELECT count(*) FILTER (WHERE e.created), count(*) FILTER (WHERE e.replaced)
    FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::smallint[], $5::text[],
                $6::float8[], $7::int[], $8::text[], $9::bigint[], $10::float8[], $11::bool[],
                $12::text[], $13::float8[], $14::float8[])
            WITH ORDINALITY
            AS a(queue, task, payload, priority, run_at_text, delay, max_attempts, unique_key,
                 batch_id, unique_for, replace, concurrency_key, timeout_seconds,
                 backoff_seconds, n),
         LATERAL {s}.enqueue_job(a.queue, a.task, a.payload, a.priority,
                                 coalesce(a.run_at_text::timestamptz,
                                          now() + make_interval(secs => a.delay)),
                                 a.max_attempts, a.unique_key, a.batch_id,
                                 make_interval(secs => a.unique_for), a.replace,
                                 a.concurrency_key, a.timeout_seconds, a.backoff_seconds) e";

/// Wakes idle workers once the enqueuing transaction commits.
pub const NOTIFY: &str = "SELECT pg_notify('{c}', $1)";

/// The columns of a claimed job, first in every row a claiming statement returns ([`round`],
/// [`CLAIM_LIMITED`]), in this order: the consumer reads them by position ([`claim_column`]), not
/// by name, which searched the row's columns a dozen times per job.
macro_rules! claim_columns {
    () => {
        "id, queue, task, payload, priority, run_at, attempt, max_attempts, batch_id, expiries, \
         timeout_seconds, backoff_seconds"
    };
}

/// Where each column of [`claim_columns`] is in a claiming statement's rows.
pub mod claim_column {
    /// `id`: null in the lean round's one row that carries no job.
    pub const ID: usize = 0;
    /// `queue`.
    pub const QUEUE: usize = 1;
    /// `task`.
    pub const TASK: usize = 2;
    /// `payload`.
    pub const PAYLOAD: usize = 3;
    /// `priority`.
    pub const PRIORITY: usize = 4;
    /// `run_at`.
    pub const RUN_AT: usize = 5;
    /// `attempt`.
    pub const ATTEMPT: usize = 6;
    /// `max_attempts`.
    pub const MAX_ATTEMPTS: usize = 7;
    /// `batch_id`.
    pub const BATCH_ID: usize = 8;
    /// `expiries`.
    pub const EXPIRIES: usize = 9;
    /// `timeout_seconds`.
    pub const TIMEOUT_SECONDS: usize = 10;
    /// `backoff_seconds`.
    pub const BACKOFF_SECONDS: usize = 11;
}

/// The lean round: settles plain completed jobs (in its settling form: fenced by lease token,
/// archived when `$4`), claims up to `$9` jobs from the queues `$8`, and either says whether due
/// scheduled or retryable jobs wait (one probe of `jobs_due_idx`) or, in its promoting form,
/// makes up to `$9` of them claimable for the next round, in one statement, with no procedural
/// code in the way (see [`round`]). Jobs come back in index order per queue, not in claim order:
/// the caller sorts them (by queue position, priority, run_at, id). The round's [`SUMMARY`] comes
/// in a column of its own after the claim columns ([`ROUND_SUMMARY`]), on one row only: a row of
/// its own with a null id in the form that claims in a CTE, the first job picked in the direct
/// form (see [`RoundForm::direct`]). `$1` ids, `$2` tokens, `$3` results, `$5` owner, `$6` this
/// claim's lease token, `$7` lease seconds, `$10` and `$11` the claim gate.
///
/// Two rounds can deadlock: a walk whose snapshot predates another worker's claim can reach
/// that job through a stale index entry and lock its newest version before finding it no longer
/// `available` (PostgreSQL keeps that lock until commit, and following an update chain can even
/// wait, `SKIP LOCKED` notwithstanding), so the other round's delete of its acks may wait on this
/// one. Snapshots went that stale when rounds waited at the gate inside the statement (8
/// consumers sharing 4 turns deadlocked 7 times in 12 drains of 10,000 jobs), so the gate never
/// waits (see [`GATE`]). Deleting the acks before the walk also closed the cycles but drained
/// 20-30 % slower (W1, A/B on the 2-core machine). Cycles still form when a busy server leaves a
/// round's snapshot stale before its walk: 6 in 36 drains of 60,000 jobs at 8 daemons x 8 and
/// 2 x 32 children. PostgreSQL's detector breaks one only after `deadlock_timeout` (1 s, which
/// only a superuser may lower), so both rounds stalled that long, and the 8 x 8 drains that met one
/// ran at half speed. So a round waits at most [`ROUND_LOCK_WAIT`] for any row lock (its own
/// `lock_timeout`, set first thing in its transaction: `turn` sets it, and the walk and the acks'
/// delete wait for `turn`), and the consumer sends a round that gave up, or that PostgreSQL
/// aborted to break a cycle, again (`retried` in `consumer.rs`).
const ROUND: &str = "
    WITH turn AS (
        SELECT {gate} AS taken, set_config('lock_timeout', '{lock_wait}', true) AS bounded
    ){picked}{settle}{claim}";

/// The lean round's claim (see [`ROUND`]): the jobs `{ids}` names, leased to `$5` with the token
/// `$6` for `$7` seconds, returned with the claim columns and `{summary}`.
const CLAIM: &str = "UPDATE {s}.jobs j
        SET state = 'running', attempt = j.attempt + 1, lease_owner = $5::text,
            lease_token = $6::bigint,
            lease_expires_at = now() + make_interval(secs => $7::float8)
        WHERE j.id = ANY({ids})
        RETURNING {returning}{summary}";

/// The jobs a round picks, once its turn is taken (see [`GATE`]).
const PICKED: &str = "ARRAY(SELECT p.id FROM ({pick}) p WHERE (SELECT taken FROM turn))";

/// The claim of the form that claims in a CTE (see [`round`]): the claimed jobs, then a row
/// with a null in every claim column that carries the summary.
const CLAIM_IN_CTE: &str = ", claimed AS (
        {claim}
    ){promote}
    SELECT {columns}, NULL::bigint[] AS summary FROM claimed
    UNION ALL
    SELECT {nulls}, {summary}";

/// The jobs the direct form picks (see [`RoundForm::direct`]), before its acks, which it settles
/// only when it picks a job ([`PICKED_SOME`]); its claim is the statement itself, the first job
/// picked carrying the summary.
const PICKED_FIRST: &str = ", picked AS (SELECT {picked} AS ids)";

/// See [`PICKED_FIRST`].
const PICKED_SOME: &str = "AND cardinality((SELECT ids FROM picked)) > 0";

/// What a lean round reports beside its jobs, one `bigint[]`: the sum of `changes` (see the
/// migration), which tells the worker when to check its prefetched jobs for a cancel; how many
/// due jobs it made claimable; whether jobs are due (1 or 0); whether it got a claim turn (1 or
/// 0, see [`GATE`]); then the ids of the acks it refused (stale leases), if any.
const SUMMARY: &str = "ARRAY[(SELECT coalesce(sum(weight), 0)::bigint FROM {s}.changes),
                              {promotion}, (SELECT taken FROM turn)::int] || {refused}";

/// Where the lean round's [`SUMMARY`] is in its rows: the column after the claim columns, null
/// on every row but one.
pub const ROUND_SUMMARY: usize = claim_column::BACKOFF_SECONDS + 1;

/// The acks of a round that archives (see [`round`]): deletes the jobs acknowledged (`$1`, fenced
/// by their lease tokens `$2`), archiving them with their results `$3` when `$4`. Each ack finds
/// its job through the primary key, one probe each (a nested loop): joining the acks to a scan of
/// `id = ANY($1)` instead built a hash table at every round, 3 % of the server's time per job.
/// The arrays go in through `(SELECT $n)` so that no plan can see their length: a custom plan
/// counted one ack where the generic plan guesses ten, looked cheaper, and the plan cache then
/// planned every round of one ack afresh (0.6 ms of server time each; durable mode drained at
/// 0.6x the raw loop). Both now guess ten, and the generic plan is kept.
const ARCHIVING_ACKS: &str = ", done AS (
        DELETE FROM {s}.jobs j
        USING unnest((SELECT $1::bigint[]), (SELECT $2::bigint[]), (SELECT $3::jsonb[]))
              AS a(id, token, result)
        WHERE j.id = a.id AND j.lease_token = a.token AND (SELECT bounded FROM turn) IS NOT NULL
              {picked_some}
        RETURNING j.id, j.queue, j.task, j.payload, j.priority, j.attempt, j.max_attempts,
                  j.unique_key, j.created_at, j.last_error, a.result
    ), archived AS (
        INSERT INTO {s}.jobs_archive (id, queue, task, payload, priority, state, attempt,
                                      max_attempts, unique_key, created_at, last_error, result)
        SELECT id, queue, task, payload, priority, 'completed', attempt, max_attempts,
               unique_key, created_at, last_error, result
        FROM done WHERE $4::boolean
    )";

/// The acks of a round that keeps no archive (`FORKQ_RETENTION_SECONDS=0`; see [`round`]): deletes
/// the jobs acknowledged (`$1`, fenced by `$2`) and keeps only their ids, leaving `$3` and `$4`
/// unread (its arrays hidden from the planner as [`ARCHIVING_ACKS`]'s are). The archiving form,
/// sent with `$4` false, still copied every deleted row into the statement's memory and received
/// every result for nothing.
const DELETING_ACKS: &str = ", done AS (
        DELETE FROM {s}.jobs j
        USING unnest((SELECT $1::bigint[]), (SELECT $2::bigint[])) AS a(id, token)
        WHERE j.id = a.id AND j.lease_token = a.token AND (SELECT bounded FROM turn) IS NOT NULL
              {picked_some}
        RETURNING j.id
    )";

/// The acks a settling round refused (null when none, which leaves [`SUMMARY`] as it is).
const REFUSED: &str = "CASE WHEN (SELECT count(*) FROM done) < cardinality($1::bigint[])
                THEN ARRAY(SELECT unnest($1::bigint[]) EXCEPT SELECT id FROM done) END";

/// What a lean round does with the acks it carries (see [`round`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Settle {
    /// Carries none: the round only claims, and leaves `$1` to `$4` unread (the statement is
    /// prepared with their types given).
    Nothing,
    /// Deletes the jobs acknowledged, archived when `$4`.
    Archiving,
    /// Deletes them, with no archive (see [`DELETING_ACKS`]).
    Deleting,
}

/// The parts a lean round carries (see [`round`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RoundForm {
    /// What it does with acknowledgements.
    pub settle: Settle,
    /// Makes due jobs claimable, instead of only looking for them.
    pub promotes: bool,
    /// The direct form: the claim's `UPDATE` is the statement itself, so its rows go to the
    /// worker as it returns them, and the summary rides on the first job picked. Claiming in a
    /// CTE and returning its rows beside a row of their own cost the server 1.0-1.4 µs more per
    /// job in rounds of 100 (the raw loop written both ways, two runs of 3-4 drains of 100k). A
    /// direct round that claims nothing returns no row, and with it no summary: so it settles
    /// nothing either, and the worker sends the same acks again in the other form (see
    /// `Consumer::settle_and_claim`), which says which it refused. It never promotes.
    pub direct: bool,
}

/// The promoting round's extra part (see [`round`]): makes up to `$9` due scheduled or retryable
/// jobs claimable for the next round; the round reports how many, and no `due`.
const PROMOTE: &str = ", promoted AS (
        UPDATE {s}.jobs j SET state = 'available'
        WHERE j.id = ANY(ARRAY(SELECT id FROM (SELECT d.id FROM {s}.jobs d
                               WHERE d.state IN ('scheduled', 'retryable') AND d.run_at <= now()
                               ORDER BY d.run_at LIMIT {cap} FOR UPDATE SKIP LOCKED) due
                               LIMIT $9::int))
          AND j.state IN ('scheduled', 'retryable')
        RETURNING 1
    )";

/// What the lean round says in place of promoting (see [`round`]): nothing promoted, and whether
/// any job is due: whether the earliest scheduled or retryable job is (the first entry of
/// `jobs_due_idx`). Asked as `EXISTS (… AND run_at <= now())`, a generic plan, which cannot know
/// what `now()` will be, guessed a third of those jobs are due and scanned the hot table for one:
/// 104 ms a round beside 1M jobs scheduled for tomorrow.
const DUE: &str = "0, coalesce((SELECT d.run_at <= now() FROM {s}.jobs d
                           WHERE d.state IN ('scheduled', 'retryable')
                           ORDER BY d.run_at LIMIT 1), false)::int";

/// One queue's pick: its first claimable jobs in claim order (at most `{cap}`; see [`round`]),
/// locked, skipping rows others hold. Served by `jobs_claim_idx` (equality on queue, then its
/// exact order). A queue whose row in `queues` is gated (paused, or limited: see `claim_limited`
/// in migration 004) is skipped; the test does not depend on the job, so it runs once per pick,
/// one probe of the queues' primary key (a one-time filter above the walk), whatever the number
/// of jobs claimed.
const PICK: &str = "SELECT c.id FROM {s}.jobs c
    WHERE c.queue = ($8::text[])[{n}] AND c.state = 'available'
      AND NOT EXISTS (SELECT 1 FROM {s}.queues g WHERE g.name = ($8::text[])[{n}] AND g.gated)
    ORDER BY c.priority, c.run_at, c.id LIMIT {cap} FOR UPDATE SKIP LOCKED";

/// The claim gate of the lean round (its `turn`): at most `$10` rounds of the schema pick jobs at
/// the same time, across every host (`$10` = 0: no gate); a round that claims nothing (`$9` = 0,
/// acks alone) takes no turn. A round tries each of `$10`
/// transaction-level advisory locks (`$11`, slot) without waiting, from a slot of its own so
/// rounds spread over them, and stops at the first it gets; the lock is gone with the statement's
/// commit. A round that gets none claims nothing and says so (in its [`SUMMARY`]); its acks are
/// settled all the same, and the worker queues for a turn in a transaction of its own (see
/// [`turn_wait`]).
/// Why a gate: claimers that walk the head of the claim index together mostly skip each other's
/// locked rows; past a few per database core that costs far more than the jobs (each host's own
/// gate, `claim_gate`, does not see the other hosts). Why it never waits: a round that waited here
/// would walk with the snapshot it took before the wait, stale by every round that committed
/// meanwhile, and stale walks deadlock (see [`ROUND`]): the scale curve's 2 to 8 daemons
/// deadlocked 7 times in one run (each a round stalled for `deadlock_timeout`, 1 s).
const GATE: &str = "($10::int = 0 OR $9::int = 0 OR EXISTS (
    SELECT 1 FROM generate_series(0, $10::int - 1) g
    WHERE pg_try_advisory_xact_lock($11::int, (g + pg_backend_pid()) % $10::int)))";

/// The lean round for `queues` queues, served strictly in the order given: each queue's pick
/// runs only while the ones before it left room. `cap` is the most a round ever claims (the
/// worker's prefetch): every walk is written `LIMIT cap` inside `LIMIT $9`, so the plan that
/// serves every value of `$9` is costed for a round's worth of rows and the plan cache keeps it
/// (W1: 12 plans for 1,004 rounds of a daemon's child; more after the table's statistics change).
/// Under `LIMIT $9` alone that plan was costed for a tenth of the table, and the daemon's children
/// planned the round afresh at every run: 0.75 ms of server time per round of 100 jobs (a fifth
/// of the round's time), and most of a durable round's. Rows are pulled one at a time through
/// both limits, so a round locks at most `$9` rows as before.
///
/// `form.promotes`: the promoting form, which a worker sends only after a round said jobs are
/// due. The promotion's `UPDATE` cost every round, whether it found a due job or not: with it in
/// every round, rounds of one job with synchronous commit (durable mode's) ran about 15 % slower
/// than with the probe in its place (pgbench, 2 clients, 8,000 rounds, 3 runs each); why an
/// `UPDATE` of no row costs that much was not pinned down. `form.settle`: [`Settle::Nothing`]
/// only claims, which is what a worker woken from its idle wait sends (its acks went with its
/// last round): the `DELETE` and `INSERT` of no row cost a round of one job 0.04-0.05 ms of the
/// 0.22-0.23 it takes from the client (pgbench, 3 runs each).
pub fn round(queues: usize, cap: usize, form: RoundForm) -> String {
    let cap = cap.max(1).to_string();
    let pick = if queues <= 1 {
        format!(
            "SELECT id FROM ({}) q1 LIMIT $9::int",
            PICK.replace("{n}", "1")
        )
    } else {
        let picks: Vec<String> = (1..=queues)
            .map(|n| {
                format!(
                    "SELECT id FROM ({}) q{n}",
                    PICK.replace("{n}", &n.to_string())
                )
            })
            .collect();
        format!("{} LIMIT $9::int", picks.join(" UNION ALL "))
    };
    let (settle, refused) = match form.settle {
        Settle::Archiving => (ARCHIVING_ACKS, REFUSED),
        Settle::Deleting => (DELETING_ACKS, REFUSED),
        Settle::Nothing => ("", "NULL::bigint[]"),
    };
    let (promote, promotion) = match form.promotes {
        true => (PROMOTE, "(SELECT count(*) FROM promoted), 0"),
        false => ("", DUE),
    };
    let summary = SUMMARY
        .replace("{promotion}", promotion)
        .replace("{refused}", refused);
    let returning: Vec<String> = claim_columns!()
        .split(',')
        .map(|column| format!("j.{}", column.trim()))
        .collect();
    let claim = CLAIM.replace("{returning}", &returning.join(", "));
    let claim = match form.direct {
        true => {
            let first = format!(
                ", CASE WHEN j.id = (SELECT ids[1] FROM picked) THEN {summary} END AS summary"
            );
            let claim = claim
                .replace("{ids}", "(SELECT ids FROM picked)::bigint[]")
                .replace("{summary}", &first);
            format!("\n    {claim}")
        }
        false => CLAIM_IN_CTE
            .replace("{promote}", promote)
            .replace("{columns}", claim_columns!())
            .replace("{nulls}", &["NULL"; ROUND_SUMMARY].join(", "))
            .replace("{summary}", &summary)
            .replace(
                "{claim}",
                &claim.replace("{ids}", PICKED).replace("{summary}", ""),
            ),
    };
    let (picked, picked_some) = match form.direct {
        true => (PICKED_FIRST.replace("{picked}", PICKED), PICKED_SOME),
        false => (String::new(), ""),
    };
    ROUND
        .replace("{picked}", &picked)
        .replace("{settle}", &settle.replace("{picked_some}", picked_some))
        .replace("{claim}", &claim)
        .replace("{pick}", &pick)
        .replace("{gate}", GATE)
        .replace("{cap}", &cap)
        .replace("{lock_wait}", &format!("{}ms", ROUND_LOCK_WAIT.as_millis()))
}

/// The longest a lean round waits for a row lock before it gives up and is sent again (see
/// [`ROUND`]). A round rarely waits for a lock at all: its walk skips locked rows and its acks
/// are its own jobs; what it may wait on is another statement about to commit (a round, or a
/// command changing the same job), or a cycle.
pub const ROUND_LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Opens the transaction in which a round the claim gate refused queues for a turn (see
/// `Consumer::claim_in_turn`): takes one of the `{turns}` turns of the gate `{key}` if one is
/// free by now, as [`GATE`] does, or else waits, up to [`TURN_WAIT`], for turn `{slot}`; either
/// is held until the transaction ends, so the round that follows in it claims with the turn
/// already its own (sent with `$10` = 0). That round is a statement of its own, with a snapshot
/// taken after the wait (read committed, whatever the server's default), so the wait does not
/// make its walk stale (see [`ROUND`]). Sent as text: every value in it is a number.
pub fn turn_wait(key: i32, turns: i32, slot: i32) -> String {
    let free = GATE
        .replace("$10::int", &format!("{turns}::int"))
        .replace("$11::int", &format!("({key})::int"))
        .replace("$9::int", "1::int");
    format!(
        "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = '{}ms';
         SELECT CASE WHEN {free} THEN true
                ELSE (SELECT true FROM pg_advisory_xact_lock({key}, {slot})) END",
        TURN_WAIT.as_millis()
    )
}

/// The longest a worker waits in the database for a claim turn (see [`turn_wait`]): a turn is
/// held for one round, a few milliseconds; a wait that runs out ends with no claim, and the
/// worker tries again.
pub const TURN_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Learns the parameter types of `{statement}` without leaving anything on the server
/// connection: one simple query (one implicit transaction, so one server connection even behind
/// a pooler in transaction mode) prepares it under forkq's own name, reads the types and
/// deallocates it.
pub const DESCRIBE: &str = "
    PREPARE forkq_describe AS {statement};
    SELECT parameter_types::oid[]::text FROM pg_prepared_statements WHERE name = 'forkq_describe';
    DEALLOCATE forkq_describe";

/// Settles what the lean round does not: failures, retries, cancels and batch children (see
/// `settle` in the migration). Returns the ids refused (stale leases).
pub const SETTLE: &str = "SELECT {s}.settle($1, $2, $3, $4, $5, $6, $7)";

/// Renews the leases a worker holds and gives back anything else under its name (see `renew`);
/// says of each held job whether its cancel was requested.
pub const RENEW: &str = "SELECT id, cancel_requested FROM {s}.renew($1, $2, $3, $4, $5, $6)";

/// Claims at most one job of a limited queue (see `claim_limited` in migration 004): the columns
/// of the lean round's claim, or a row with a null id whose `retry_in` says when the rate limit
/// allows the next start.
pub const CLAIM_LIMITED: &str = concat!(
    "SELECT ",
    claim_columns!(),
    ", retry_in FROM {s}.claim_limited($1, $2, $3, $4)"
);

/// Sends snoozed jobs back to the queue, uncharged (see `snooze` in migration 004); returns the
/// ids refused.
pub const SNOOZE: &str = "SELECT {s}.snooze($1, $2, $3, $4)";

/// Records a running job's progress, fenced by its lease (see `report_progress`).
pub const REPORT_PROGRESS: &str = "SELECT {s}.report_progress($1, $2, $3)";

/// What a worker needs to know of its queues `$1`, one row each: whether it is paused, whether
/// it is limited (claimed through [`CLAIM_LIMITED`]; a queue without a row is neither), and the
/// sum of `changes` as of this read (see [`round`]), so a change after it is noticed.
pub const QUEUE_FLOW: &str = "
    SELECT q.name, coalesce(g.paused, false),
           coalesce(g.max_running IS NOT NULL OR g.per_key IS NOT NULL OR g.rate IS NOT NULL,
                    false),
           (SELECT coalesce(sum(weight), 0)::bigint FROM {s}.changes)
    FROM unnest($1::text[]) AS q(name) LEFT JOIN {s}.queues g ON g.name = q.name";

/// Every queue's settings, by name.
pub const QUEUE_SETTINGS: &str = "
    SELECT name, paused, max_running, per_key, rate, burst, updated_at::text
    FROM {s}.queues ORDER BY name";

/// Changes a queue's settings (`$2` a JSON object; see `queue_set` in migration 004).
pub const QUEUE_SET: &str = "
    SELECT name, paused, max_running, per_key, rate, burst, updated_at::text
    FROM {s}.queue_set($1, $2)";

/// Where a job stands, for a producer waiting on it (see `job_result` in migration 004).
pub const JOB_RESULT: &str = "SELECT state, result, error FROM {s}.job_result($1)";

/// Counts against their queue's caps the running jobs of capped queues that a lean round took
/// while the cap was being set (see `mark_limited`).
pub const MARK_LIMITED: &str = "SELECT {s}.mark_limited(NULL)";

/// Deletes the progress of finished jobs older than `$1` seconds, at most `$2`.
pub const PURGE_PROGRESS: &str = "SELECT {s}.purge_progress($1, $2)";

/// Gives back the jobs `owner` holds (see `release` in the migration).
pub const RELEASE: &str = "SELECT {s}.release($1, $2, $3, $4)";

/// Reports the start of a suspect job (see `mark_started` in the migration).
pub const MARK_STARTED: &str = "SELECT {s}.mark_started($1, $2)";

/// Ends cancelled the prefetched jobs that must no longer run (see `drop_cancelled`).
pub const DROP_CANCELLED: &str = "SELECT {s}.drop_cancelled($1, $2, $3)";

/// Returns expired leases to the queue.
pub const RESCUE_EXPIRED: &str = "SELECT {s}.rescue_expired($1)";

/// Folds old rows of the changes table into one.
pub const COMPACT_CHANGES: &str = "SELECT {s}.compact_changes()";

/// Deletes completed and cancelled jobs older than the retention (`$1` seconds), at most `$2`,
/// oldest first: the walk of `jobs_archive_finished_idx` ends at the first row still kept, so a
/// pass that finds nothing expired reads a page or two. Children of open batches are kept: they
/// are the rows the batch repair recomputes from.
pub const PURGE_EXPIRED_ARCHIVE: &str = "
    DELETE FROM {s}.jobs_archive
    WHERE id = ANY(ARRAY(
        SELECT a.id FROM {s}.jobs_archive a
        WHERE a.state <> 'failed' AND a.finished_at < now() - make_interval(secs => $1)
          AND (a.batch_id IS NULL
               OR NOT EXISTS (SELECT 1 FROM {s}.batches b
                              WHERE b.id = a.batch_id AND b.state = 'open'))
        ORDER BY a.finished_at LIMIT $2 FOR UPDATE SKIP LOCKED))";

/// Deletes unique windows that expired, a bounded chunk at a time (an enqueue of the key takes an
/// expired window over anyway; this keeps keys that never come back from piling up).
pub const PURGE_EXPIRED_WINDOWS: &str = "
    DELETE FROM {s}.unique_windows
    WHERE key IN (SELECT key FROM {s}.unique_windows WHERE expires_at < now()
                  LIMIT 10000 FOR UPDATE SKIP LOCKED)";

/// What a session sees of the server's connections (see `queue::capacity`): the port the server
/// listens on, whether this session's backend was started within the last `$1` seconds (not a
/// pooled one), `max_connections`, the slots this role cannot use, the client connections in use
/// by others, and what the role's and the database's `CONNECTION LIMIT` leave (NULL: none).
/// Superusers may use the reserved slots and ignore the limits. The sessions come from
/// `pg_stat_get_activity`, read once, rather than from the `pg_stat_activity` view four times:
/// the view joins two catalogs more at each reference, and a new session ran the query in
/// 4.6-5.9 ms instead of 2.1-2.9 (psql, fresh connections; it runs at every start-up).
pub const CONNECTION_HEADROOM: &str = "
    WITH a AS (SELECT pid, datid, usesysid, backend_start FROM pg_stat_get_activity(NULL)
               WHERE backend_type = 'client backend')
    SELECT current_setting('port')::int AS port,
           coalesce((SELECT backend_start FROM a WHERE pid = pg_backend_pid())
                    > now() - make_interval(secs => $1), false) AS own_session,
           current_setting('max_connections')::int AS max_connections,
           CASE WHEN r.rolsuper THEN 0
                ELSE current_setting('superuser_reserved_connections')::int
                     + coalesce(current_setting('reserved_connections', true), '0')::int
           END AS reserved,
           (SELECT count(*) FROM a)::int - 1 AS in_use,
           CASE WHEN r.rolsuper OR r.rolconnlimit < 0 THEN NULL
                ELSE r.rolconnlimit + 1 - (SELECT count(*) FROM a WHERE usesysid = r.oid)::int
           END AS role_free,
           CASE WHEN r.rolsuper OR d.datconnlimit < 0 THEN NULL
                ELSE d.datconnlimit + 1 - (SELECT count(*) FROM a WHERE datid = d.oid)::int
           END AS database_free
    FROM pg_roles r, pg_database d
    WHERE r.rolname = current_user AND d.datname = current_database()";

/// Takes this schema's maintenance turn if the last pass anywhere began at least `$2` seconds ago
/// (and no pass is taking it right now), and if so rescues expired leases; returns null when it
/// was not this caller's turn. One statement, one round trip.
pub const TAKE_TURN_AND_RESCUE: &str = "
    WITH turn AS (
        UPDATE {s}.maintenance_turn t SET at = now()
        WHERE t.at <= now() - make_interval(secs => $2::float8)
          AND t.id IN (SELECT m.id FROM {s}.maintenance_turn m FOR UPDATE SKIP LOCKED)
        RETURNING 1
    )
    SELECT CASE WHEN EXISTS (SELECT 1 FROM turn) THEN {s}.rescue_expired($1::boolean) END";

/// When a session began to hold back the removal of dead rows, as far as `pg_stat_activity` (as
/// `a`) tells: the running statement's start for an active session without a transaction id
/// (under read committed each statement takes its own snapshot, so a long transaction of short
/// statements holds none for long), else its transaction's start (an idle transaction keeps a
/// snapshot only under repeatable read; a transaction id holds from when it was taken, which
/// `pg_stat_activity` does not tell, until the transaction ends, whatever statement runs now).
/// It can still be late: a statement's snapshot keeps back what the oldest transaction running
/// when it began kept back, so a statement begun just before such a transaction ended holds the
/// removal back as far until it ends; the vacuum then run removes nothing.
macro_rules! held_since {
    () => {
        "coalesce(CASE WHEN a.state = 'active' AND a.backend_xid IS NULL THEN a.query_start END,
                  a.xact_start)"
    };
}

/// The client sessions of this database, other than the caller's, that hold a snapshot or a
/// transaction id, as `a` (a `FROM` item and its `WHERE`, to be extended with `AND`).
macro_rules! snapshot_holders {
    () => {
        "pg_stat_activity a
         WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
           AND a.backend_type = 'client backend'
           AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)"
    };
}

/// The watched tables of schema `$1` (names `$2`) whose dead rows exceed `$3 + $4 × live rows`
/// (per table, in the same order), with their dead rows, and whether another client session of
/// the database has held a snapshot (or a transaction id) since before the table's last vacuum:
/// that vacuum removed all it could, and until the session ends another one would remove nothing
/// (dead rows it cannot remove still count in `n_dead_tup`).
pub const BLOATED_TABLES: &str = concat!(
    "
    SELECT w.name, t.n_dead_tup,
           EXISTS (SELECT 1 FROM ",
    snapshot_holders!(),
    " AND ",
    held_since!(),
    " < greatest(t.last_vacuum, t.last_autovacuum))
    FROM unnest($2::text[], $3::bigint[], $4::float8[]) AS w(name, base, fraction)
    JOIN pg_stat_user_tables t ON t.schemaname = $1 AND t.relname = w.name
    WHERE t.n_dead_tup > w.base + w.fraction * t.n_live_tup"
);

/// The client session of this database, other than the caller's, that has held a snapshot or a
/// transaction id longest (see `snapshot_holders!`), if it has for more than `$1` seconds (see
/// `held_since!`): its pid, application name, state, seconds held and the start of its query.
/// Other roles' sessions show only to a superuser or a member of `pg_read_all_stats`.
pub const SNAPSHOT_HOLDER: &str = concat!(
    "
    SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.state, ''),
           extract(epoch FROM now() - ",
    held_since!(),
    ")::float8, left(coalesce(a.query, ''), 80)
    FROM ",
    snapshot_holders!(),
    " AND ",
    held_since!(),
    " < now() - make_interval(secs => $1)
    ORDER BY ",
    held_since!(),
    " LIMIT 1"
);

/// Counts live jobs per queue and effective state (a due scheduled job counts as available), and
/// the failed and cancelled jobs of the archive (through their partial index).
pub const STATUS_COUNTS: &str = "
    SELECT queue,
           CASE WHEN state IN ('scheduled', 'retryable') AND run_at <= now() THEN 'available'
                ELSE state END AS state,
           count(*)
    FROM {s}.jobs GROUP BY 1, 2
    UNION ALL
    SELECT queue, state, count(*) FROM {s}.jobs_archive WHERE state <> 'completed' GROUP BY 1, 2";

/// Counts the completed jobs the archive still holds, per queue: a scan of the whole archive,
/// so only `forkq status` asks for it, never a metrics scrape.
pub const COMPLETED_COUNTS: &str = "
    SELECT queue, count(*) FROM {s}.jobs_archive WHERE state = 'completed' GROUP BY 1";

/// The age in seconds of the oldest job that could run now, per queue.
pub const OLDEST_AVAILABLE: &str = "
    SELECT queue, extract(epoch FROM now() - min(run_at))::float8
    FROM {s}.jobs WHERE state <> 'running' AND run_at <= now() GROUP BY queue";

/// One job, live or archived, as JSON, with the latest progress its handler reported (and when)
/// if any.
pub const JOB_BY_ID: &str = "
    SELECT x.job || coalesce((SELECT jsonb_build_object('progress', p.progress,
                                                        'progress_at', p.reported_at)
                              FROM {s}.job_progress p WHERE p.job_id = $1), '{}')
    FROM (SELECT to_jsonb(j) - 'lease_token' - 'limited' AS job FROM {s}.jobs j WHERE j.id = $1
          UNION ALL
          SELECT to_jsonb(a) FROM {s}.jobs_archive a WHERE a.id = $1) x";

/// Cancels a job (see `cancel` in the migration).
pub const CANCEL: &str = "SELECT {s}.cancel($1, $2)";

/// Retries a failed or cancelled job (see `retry` in the migration).
pub const RETRY: &str = "SELECT {s}.retry($1)";

/// Readiness: the database answers and the schema is at the version the code expects.
pub const SCHEMA_VERSION: &str = "SELECT coalesce(max(version), 0) FROM {s}.schema_migrations";

/// Opens an empty batch (see `batch_open` in the migration); returns its id.
pub const BATCH_OPEN: &str = "SELECT {s}.batch_open($1, $2, $3, $4)";

/// Counts the batch's children, sets its totals, completes it when empty; returns the count.
pub const BATCH_SEAL: &str = "SELECT {s}.batch_seal($1)";

/// One batch's state and counters.
pub const BATCH_STATUS: &str = "
    SELECT id, queue, state, total, pending, succeeded, failed, cancelled, fail_fast,
           completion_job_id, created_at::text, finished_at::text
    FROM {s}.batches WHERE id = $1";

/// The newest batches, optionally in one state, below id `$3` (keyset paging; null: from the
/// newest).
pub const BATCH_LIST: &str = "
    SELECT id, queue, state, total, pending, succeeded, failed, cancelled, fail_fast,
           completion_job_id, created_at::text, finished_at::text
    FROM {s}.batches WHERE ($1::text IS NULL OR state = $1) AND id < coalesce($3, 9223372036854775807)
    ORDER BY id DESC LIMIT $2";

/// Cancels a batch (see `batch_cancel` in the migration).
pub const BATCH_CANCEL: &str = "SELECT state, changed FROM {s}.batch_cancel($1, $2)";

/// Repairs open batches whose counters disagree with their children (see `batch_repair`).
pub const BATCH_REPAIR: &str = "
    SELECT batch_id, old_counts, new_counts FROM {s}.batch_repair($1, $2)";

/// Declares a daemon's schedules (see `schedule_declare` in the migration): $1 names, $2
/// definitions, $3 the daemon's start time (RFC 3339), $4 who declares. Answers what the database
/// holds for those names, in the columns of [`SCHEDULE_STATE`].
pub const SCHEDULE_DECLARE: &str =
    "SELECT * FROM {s}.schedule_declare($1, $2, $3::text::timestamptz, $4)";

/// The schedules named in $1 (every one when null): name, definition, revision, declared_by,
/// declared_at, ticks_after, last_tick_at, last_run_at (seconds since the epoch), last_job_id.
pub const SCHEDULE_STATE: &str = "SELECT * FROM {s}.schedule_state($1)";

/// Enqueues due ticks (see `schedule_fire` in the migration): $1 names, $2 ticks (RFC 3339),
/// $3 revisions, sorted by name then tick. Answers the job enqueued (null when the tick was
/// enqueued already) and the schedule's revision (null when it is gone), per tick.
pub const SCHEDULE_FIRE: &str = "
    SELECT job_id, revision FROM {s}.schedule_fire($1, $2::text[]::timestamptz[], $3)";

/// Enqueues one run of a schedule now; answers the job id, null when there is no such schedule.
pub const SCHEDULE_RUN: &str = "SELECT {s}.schedule_run($1)";

/// One keyset page of the job browser over one table, newest first: `{walk}` picks at most `$2`
/// candidate rows below id `$1` by walking an index in id order (one of the `BROWSE_*_WALK`
/// statements), and the filters `$4` queue, `$5` task, `$6` state (null: any) keep the first
/// `$3` of them as JSON objects. The walk stops as soon as the page is full, so a page's cost is
/// bounded by the walk whatever the filters match, and small when they match often.
pub const BROWSE_PAGE: &str = "
    SELECT to_jsonb(w) FROM ({walk}) w
    WHERE ($4::text IS NULL OR w.queue = $4) AND ($5::text IS NULL OR w.task = $5)
      AND ($6::text IS NULL OR w.state = $6)
    ORDER BY w.id DESC LIMIT $3";

/// How far a walk reaches (the rows it examines, and the lowest id among them), for a page that
/// the filters did not fill; sent with [`BROWSE_PAGE`]'s parameters, typed.
pub const BROWSE_EXTENT: &str = "SELECT count(*), min(w.id) FROM ({walk}) w";

/// The browser's walk of the hot table: its primary key, newest first. A due scheduled or
/// retryable job shows as available, as in `forkq status`.
pub const BROWSE_LIVE_WALK: &str = "
    SELECT j.id, j.queue, j.task,
           CASE WHEN j.state IN ('scheduled', 'retryable') AND j.run_at <= now() THEN 'available'
                ELSE j.state END AS state,
           j.attempt, j.max_attempts, j.created_at, j.run_at AS at, left(j.last_error, 300) AS error,
           j.batch_id
    FROM {s}.jobs j WHERE j.id < $1 ORDER BY j.id DESC LIMIT $2";

/// The browser's walk of the archive: the primary key, or with [`BROWSE_DEAD_ONLY`] the
/// dead-letter index (and with [`BROWSE_DEAD_QUEUE`] its per-queue twin), newest first. Only
/// index columns narrow the walk, so it examines exactly the rows it counts.
pub const BROWSE_ARCHIVE_WALK: &str = "
    SELECT a.id, a.queue, a.task, a.state, a.attempt, a.max_attempts, a.created_at,
           a.finished_at AS at, left(a.last_error, 300) AS error, a.batch_id
    FROM {s}.jobs_archive a WHERE a.id < $1 {dead} ORDER BY a.id DESC LIMIT $2";

/// Narrows the archive walk to the dead letter (the filter then picks failed or cancelled).
pub const BROWSE_DEAD_ONLY: &str = "AND a.state <> 'completed'";

/// Narrows a dead-letter walk to queue `$4` (served by `jobs_archive_dead_queue_idx`).
pub const BROWSE_DEAD_QUEUE: &str = "AND a.queue = $4";

/// The ids of dead-lettered jobs (failed or cancelled, `$4` one of them or null for both)
/// matching the browser's filters, above id `$1`, oldest first, at most `$5`: the chunks of a bulk
/// retry, and (with a large `$5`) the count it confirms.
pub const DEAD_IDS: &str = "
    SELECT a.id FROM {s}.jobs_archive a
    WHERE a.state <> 'completed' AND a.id > $1
      AND ($2::text IS NULL OR a.queue = $2) AND ($3::text IS NULL OR a.task = $3)
      AND ($4::text IS NULL OR a.state = $4)
    ORDER BY a.id LIMIT $5";

/// The ids of live jobs matching the browser's filters (`$4` an effective state or null), above
/// id `$1`, oldest first, at most `$5`: the chunks of a bulk cancel.
pub const LIVE_IDS: &str = "
    SELECT j.id FROM {s}.jobs j
    WHERE j.id > $1 AND ($2::text IS NULL OR j.queue = $2) AND ($3::text IS NULL OR j.task = $3)
      AND ($4::text IS NULL
           OR $4 = CASE WHEN j.state IN ('scheduled', 'retryable') AND j.run_at <= now()
                        THEN 'available' ELSE j.state END)
    ORDER BY j.id LIMIT $5";

/// Retries the given dead-lettered jobs; returns how many moved.
pub const RETRY_MANY: &str =
    "SELECT count(*) FILTER (WHERE {s}.retry(id)) FROM unnest($1::bigint[]) id";

/// Cancels the given live jobs; returns how many were cancelled or marked.
pub const CANCEL_MANY: &str = "
    SELECT count(*) FILTER (WHERE {s}.cancel(id, $2) IN ('cancelled', 'cancelling'))
    FROM unnest($1::bigint[]) id";

/// Deletes one dead-lettered job for good, unless it is a child of an open batch (whose counters
/// are recomputed from its children's rows); returns its id when it was deleted.
pub const DISCARD: &str = "
    DELETE FROM {s}.jobs_archive a
    WHERE a.id = $1 AND a.state <> 'completed'
      AND (a.batch_id IS NULL
           OR NOT EXISTS (SELECT 1 FROM {s}.batches b WHERE b.id = a.batch_id AND b.state = 'open'))
    RETURNING a.id";

/// Records one daemon boot in the hosts table (see `hosts` in migration 003); a row pruned while
/// its host lived is written again.
pub const HOST_UPSERT: &str = "
    INSERT INTO {s}.hosts AS h (boot, host, lease_prefix, pid, version, queues, concurrency, alive,
                                busy, crash_looping, slots, succeeded, failed, jobs_per_second,
                                interval_seconds, holds_lock, lock_key, stopping, started_at,
                                last_seen)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
            to_timestamp($19), now())
    ON CONFLICT (boot) DO UPDATE
    SET queues = excluded.queues, concurrency = excluded.concurrency, alive = excluded.alive,
        busy = excluded.busy, crash_looping = excluded.crash_looping, slots = excluded.slots,
        succeeded = excluded.succeeded, failed = excluded.failed,
        jobs_per_second = excluded.jobs_per_second, interval_seconds = excluded.interval_seconds,
        holds_lock = excluded.holds_lock, stopping = excluded.stopping, last_seen = now()";

/// Deletes the rows of hosts not seen for `$1` seconds.
pub const HOST_PRUNE: &str = "
    DELETE FROM {s}.hosts WHERE last_seen < now() - make_interval(secs => $1)";

/// How many hosts serve the schema now: seen within `$1` seconds and not stopping (at least this
/// one, which has just written its row).
pub const HOSTS_SERVING: &str = "
    SELECT count(*) FROM {s}.hosts
    WHERE last_seen >= now() - make_interval(secs => $1) AND NOT stopping";

/// Every recorded host, newest boot first within a host, with the seconds since it was seen.
pub const HOSTS_LIST: &str = "
    SELECT boot, host, pid, version, queues, concurrency, alive, busy, crash_looping, slots,
           succeeded, failed, jobs_per_second, interval_seconds, stopping, started_at::text,
           last_seen::text, extract(epoch FROM now() - last_seen)::float8, released_at::text
    FROM {s}.hosts ORDER BY host, started_at DESC";

/// The role, the database, and the session's statement timeout (ms) and commit mode: behind a
/// transaction-mode pooler, the role's defaults (see `queue::pooler`).
pub const ROLE_SETTINGS: &str = "
    SELECT current_user::text, current_database()::text,
           (SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'),
           current_setting('synchronous_commit')";

/// Takes this boot's shared session lock (see `expire_gone_hosts` in migration 003); every
/// connection of the boot holds it until it closes.
pub const HOLD_BOOT_LOCK: &str = "SELECT pg_advisory_lock_shared($1)";

/// Expires the leases of hosts that are provably gone (see `expire_gone_hosts`).
pub const EXPIRE_GONE_HOSTS: &str = "SELECT boot, host, expired FROM {s}.expire_gone_hosts($1)";

/// How long the server takes at least to close the session of a client that vanished from the
/// network (TCP keepalive: idle + interval x count, cut short by tcp_user_timeout); idle reads 0
/// on a Unix socket, where a vanished client is impossible. `current_setting` shows these four as
/// plain numbers (seconds, milliseconds for tcp_user_timeout), and reads them without building
/// the whole of `pg_settings` (10 ms for the four look-ups a new session made that way).
pub const DEAD_CLIENT_SECONDS: &str = "
    SELECT CASE WHEN idle = 0 THEN NULL
                ELSE idle + CASE WHEN user_timeout > 0 THEN least(user_timeout / 1000.0, probes)
                                 ELSE probes END
           END::float8
    FROM (SELECT current_setting('tcp_keepalives_idle')::int AS idle,
                 current_setting('tcp_keepalives_interval')::int
                 * current_setting('tcp_keepalives_count')::int AS probes,
                 current_setting('tcp_user_timeout')::int AS user_timeout) s";

/// The dashboard's queue page: per queue, the live jobs by effective state and the age of the
/// oldest runnable one (the hot table is small by design), the dead letter counted up to `$1`
/// jobs (through its partial index, never the archive's bulk), and the hosts serving it now
/// (seen within `$2` intervals), then its name again and its settings (the columns of
/// [`QUEUE_SETTINGS`], null without a row). Queues are those with live jobs, dead-lettered jobs,
/// a host or settings (the dead letter's queue names come from a loose index scan), at most `$3`
/// of them.
pub const QUEUE_OVERVIEW: &str = "
    WITH RECURSIVE dead_names AS (
        (SELECT a.queue FROM {s}.jobs_archive a WHERE a.state <> 'completed'
         ORDER BY a.queue LIMIT 1)
        UNION ALL
        SELECT (SELECT a.queue FROM {s}.jobs_archive a
                WHERE a.state <> 'completed' AND a.queue > d.queue ORDER BY a.queue LIMIT 1)
        FROM dead_names d WHERE d.queue IS NOT NULL
    ), live AS (
        SELECT j.queue,
               count(*) FILTER (WHERE j.state <> 'running' AND j.run_at <= now()) AS available,
               count(*) FILTER (WHERE j.state = 'scheduled' AND j.run_at > now()) AS scheduled,
               count(*) FILTER (WHERE j.state = 'running') AS running,
               count(*) FILTER (WHERE j.state = 'retryable' AND j.run_at > now()) AS retryable,
               extract(epoch FROM now() - min(j.run_at)
                   FILTER (WHERE j.state <> 'running' AND j.run_at <= now()))::float8 AS oldest
        FROM {s}.jobs j GROUP BY j.queue
    ), serving AS (
        SELECT q.queue, count(*) AS hosts
        FROM {s}.hosts h, unnest(h.queues) AS q(queue)
        WHERE h.last_seen > now() - make_interval(secs => h.interval_seconds * $2::float8)
        GROUP BY q.queue
    ), names AS (
        SELECT queue FROM live UNION SELECT queue FROM dead_names WHERE queue IS NOT NULL
        UNION SELECT queue FROM serving UNION SELECT name FROM {s}.queues
    )
    SELECT n.queue, coalesce(l.available, 0), coalesce(l.scheduled, 0), coalesce(l.running, 0),
           coalesce(l.retryable, 0), coalesce(l.oldest, 0), d.failed, d.cancelled, d.capped,
           coalesce(s.hosts, 0),
           n.queue, g.paused, g.max_running, g.per_key, g.rate, g.burst, g.updated_at::text
    FROM (SELECT queue FROM names ORDER BY queue LIMIT $3::bigint) n
    LEFT JOIN live l ON l.queue = n.queue
    LEFT JOIN serving s ON s.queue = n.queue
    LEFT JOIN {s}.queues g ON g.name = n.queue
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE x.state = 'failed') AS failed,
               count(*) FILTER (WHERE x.state = 'cancelled') AS cancelled,
               count(*) > $1::bigint AS capped
        FROM (SELECT a.state FROM {s}.jobs_archive a
              WHERE a.queue = n.queue AND a.state <> 'completed' LIMIT $1::bigint + 1) x
    ) d
    ORDER BY n.queue";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_column_positions_follow_the_claim_columns() {
        let names: Vec<&str> = claim_columns!().split(',').map(str::trim).collect();
        let positions = [
            ("id", claim_column::ID),
            ("queue", claim_column::QUEUE),
            ("task", claim_column::TASK),
            ("payload", claim_column::PAYLOAD),
            ("priority", claim_column::PRIORITY),
            ("run_at", claim_column::RUN_AT),
            ("attempt", claim_column::ATTEMPT),
            ("max_attempts", claim_column::MAX_ATTEMPTS),
            ("batch_id", claim_column::BATCH_ID),
            ("expiries", claim_column::EXPIRIES),
            ("timeout_seconds", claim_column::TIMEOUT_SECONDS),
            ("backoff_seconds", claim_column::BACKOFF_SECONDS),
        ];
        assert_eq!(names.len(), positions.len());
        for (name, position) in positions {
            assert_eq!(names[position], name);
        }
        for direct in [false, true] {
            let round = round(
                2,
                100,
                RoundForm {
                    settle: Settle::Archiving,
                    promotes: false,
                    direct,
                },
            );
            let returning: Vec<String> = names.iter().map(|n| format!("j.{n}")).collect();
            assert!(round.contains(&format!("RETURNING {}", returning.join(", "))));
            assert_eq!(
                round.contains(&format!(
                    "SELECT {}, NULL::bigint[] AS summary",
                    claim_columns!()
                )),
                !direct
            );
        }
        assert!(CLAIM_LIMITED.starts_with(&format!("SELECT {}, retry_in", claim_columns!())));
    }
}
