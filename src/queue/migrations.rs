//! Versioned schema migrations, applied in one transaction under an advisory lock.
//!
//! Each migration is SQL with `{s}` standing for the quoted schema name (validated by
//! [`crate::config::is_valid_schema_name`], never taken from job input). Migrations only ever append;
//! a released one is never edited, so a database records exactly what it ran.

use postgres::types::Type;
use postgres::Client;

use super::sql::{self, render};
use super::QueueError;

/// One schema change.
pub struct Migration {
    /// Applied in ascending order; recorded in `{schema}.schema_migrations`.
    pub version: i32,
    /// A short description shown by `forkq migrate --status`.
    pub name: &'static str,
    /// The SQL, with `{s}` for the schema.
    pub sql: &'static str,
}

/// Every migration, oldest first. Versions need not be contiguous (branches reserve numbers):
/// what counts is that every one listed here is applied.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "jobs, archive, batches and queue functions",
        sql: include_str!("sql/001_schema.sql"),
    },
    Migration {
        version: 2,
        name: "unique windows and schedules",
        sql: include_str!("sql/002_time.sql"),
    },
    Migration {
        version: 3,
        name: "hosts, dead-letter indexes",
        sql: include_str!("sql/003_fleet.sql"),
    },
    Migration {
        version: 4,
        name: "queues (pause, limits), snooze, progress, results",
        sql: include_str!("sql/004_flow.sql"),
    },
];

/// The version the code expects.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// A migration and whether this database has it.
#[derive(Debug, Clone)]
pub struct MigrationStatus {
    /// The migration's version.
    pub version: i32,
    /// Its description.
    pub name: String,
    /// When it was applied, as PostgreSQL prints it; `None` when pending.
    pub applied_at: Option<String>,
}

/// Applies every pending migration; returns the versions applied. Safe to run concurrently.
pub fn migrate(client: &mut Client, schema: &str) -> Result<Vec<i32>, QueueError> {
    let mut tx = client.transaction()?;
    tx.query_typed(
        "SELECT pg_advisory_xact_lock($1)",
        &[(&sql::advisory_key("migrate", schema), Type::INT8)],
    )?;
    tx.batch_execute(&render(
        "CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.schema_migrations (
             version    int PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
        schema,
    ))?;
    let applied: Vec<i32> = tx
        .query_typed(
            &render("SELECT version FROM {s}.schema_migrations", schema),
            &[],
        )?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut done = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        tx.batch_execute(&render(migration.sql, schema))
            .map_err(|e| QueueError::Migration {
                version: migration.version,
                source: e,
            })?;
        tx.query_typed(
            &render(
                "INSERT INTO {s}.schema_migrations (version, name) VALUES ($1, $2)",
                schema,
            ),
            &[
                (&migration.version, Type::INT4),
                (&migration.name, Type::TEXT),
            ],
        )?;
        done.push(migration.version);
    }
    tx.commit()?;
    Ok(done)
}

/// Lists every known migration and whether it is applied.
pub fn status(client: &mut Client, schema: &str) -> Result<Vec<MigrationStatus>, QueueError> {
    let applied = applied_versions(client, schema)?;
    Ok(MIGRATIONS
        .iter()
        .map(|m| MigrationStatus {
            version: m.version,
            name: m.name.to_string(),
            applied_at: applied
                .iter()
                .find(|(v, _)| *v == m.version)
                .map(|(_, at)| at.clone()),
        })
        .collect())
}

fn applied_versions(client: &mut Client, schema: &str) -> Result<Vec<(i32, String)>, QueueError> {
    let exists: bool = client
        .query_typed_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[(&format!("\"{schema}\".schema_migrations"), Type::TEXT)],
        )?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    Ok(client
        .query_typed(
            &render(
                "SELECT version, applied_at::text FROM {s}.schema_migrations ORDER BY version",
                schema,
            ),
            &[],
        )?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect())
}

/// Fails with [`QueueError::SchemaOutdated`] unless every migration is applied (one missing below
/// the newest counts too, since versions may have gaps), so no command runs against a schema it
/// does not understand.
pub fn require_current(client: &mut Client, schema: &str) -> Result<(), QueueError> {
    let applied: Vec<i32> = applied_versions(client, schema)?
        .into_iter()
        .map(|(v, _)| v)
        .collect();
    let current = applied.iter().copied().max().unwrap_or(0);
    if let Some(missing) = MIGRATIONS.iter().find(|m| !applied.contains(&m.version)) {
        return Err(QueueError::SchemaOutdated {
            schema: schema.to_string(),
            // The schema is complete up to the last version below the missing one.
            found: applied
                .iter()
                .copied()
                .filter(|&v| v < missing.version)
                .max()
                .unwrap_or(0),
            expected: latest_version(),
        });
    }
    if current > latest_version() {
        return Err(QueueError::SchemaTooNew {
            schema: schema.to_string(),
            found: current,
            expected: latest_version(),
        });
    }
    Ok(())
}
