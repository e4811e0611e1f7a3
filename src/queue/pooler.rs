//! What a fleet behind a pooler in transaction mode gets from the database instead of session
//! settings: the defaults of its role, checked once per daemon.
//!
//! On a direct connection each worker sets `statement_timeout` and `synchronous_commit` for its
//! session when it connects. Behind PgBouncer in transaction mode a `SET` lasts only until the
//! transaction ends, and then stays behind on a server connection that other clients get. So
//! there forkq sets nothing, and the settings must be the role's (or the database's):
//! `ALTER ROLE ... IN DATABASE ... SET ...`, which every server connection starts with.

use std::time::Duration;

use postgres::GenericClient;

use super::sql;
use super::QueueError;
use crate::config::Config;

/// The settings a new server connection of this role starts with (as this one has them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSettings {
    /// The role.
    pub role: String,
    /// The database.
    pub database: String,
    /// `statement_timeout` in milliseconds (0: none).
    pub statement_timeout_ms: i64,
    /// `synchronous_commit` (`on`, `off`, `local`, `remote_write`, `remote_apply`).
    pub synchronous_commit: String,
}

/// Reads the settings of the connection's session.
pub fn role_settings(client: &mut impl GenericClient) -> Result<RoleSettings, QueueError> {
    let row = client.query_typed_one(sql::ROLE_SETTINGS, &[])?;
    Ok(RoleSettings {
        role: row.get(0),
        database: row.get(1),
        statement_timeout_ms: row.get(2),
        synchronous_commit: row.get(3),
    })
}

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// forkq works, slower or less bounded than it could.
    Advice,
    /// What the operator asked for does not hold (`FORKQ_DURABLE=1` with asynchronous commits).
    Broken,
}

/// What is missing from `settings` for the guarantees a direct connection gives, each with the
/// statement that fixes it.
pub fn findings(config: &Config, settings: &RoleSettings) -> Vec<(Severity, String)> {
    let mut out = Vec::new();
    let alter = |setting: &str, value: &str| {
        format!(
            "ALTER ROLE \"{}\" IN DATABASE \"{}\" SET {setting} = '{value}'",
            settings.role, settings.database
        )
    };
    let budget = super::WorkerTimeouts::new(config.health_stale).budget;
    let timeout = Duration::from_millis(settings.statement_timeout_ms.max(0) as u64);
    if timeout.is_zero() || timeout > budget {
        out.push((
            Severity::Advice,
            format!(
                "statement_timeout is {} for this role: a statement stuck behind a lock makes its \
                 worker go stale and be killed instead of reconnecting; behind a pooler forkq \
                 cannot set it per session: {}",
                if timeout.is_zero() {
                    "off".to_string()
                } else {
                    format!("{} ms", timeout.as_millis())
                },
                alter("statement_timeout", &format!("{}ms", budget.as_millis()))
            ),
        ));
    }
    let asynchronous = settings.synchronous_commit == "off";
    if config.durable && asynchronous {
        out.push((
            Severity::Broken,
            format!(
                "FORKQ_DURABLE=1, but this role commits asynchronously (synchronous_commit = off), \
                 so an acknowledged job can run again after a database crash: {}",
                alter("synchronous_commit", "on")
            ),
        ));
    } else if !config.durable && !asynchronous {
        out.push((
            Severity::Advice,
            format!(
                "every acknowledgement waits for the WAL flush (synchronous_commit = {}); a \
                 direct connection turns that off per session, behind a pooler only the role \
                 can: {}",
                settings.synchronous_commit,
                alter("synchronous_commit", "off")
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(durable: bool) -> Config {
        let vars: HashMap<String, String> = [
            ("DATABASE_URL", "postgres://u@127.0.0.1/db"),
            ("FORKQ_POOLER", "transaction"),
            ("FORKQ_DURABLE", if durable { "1" } else { "0" }),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Config::from_vars(vars).unwrap()
    }

    fn settings(timeout_ms: i64, commit: &str) -> RoleSettings {
        RoleSettings {
            role: "forkq".into(),
            database: "app".into(),
            statement_timeout_ms: timeout_ms,
            synchronous_commit: commit.into(),
        }
    }

    #[test]
    fn a_role_set_up_as_documented_needs_nothing() {
        assert!(findings(&config(false), &settings(5000, "off")).is_empty());
        assert!(findings(&config(true), &settings(2000, "on")).is_empty());
    }

    #[test]
    fn each_missing_setting_comes_with_its_fix() {
        let found = findings(&config(false), &settings(0, "on"));
        assert_eq!(found.len(), 2);
        assert!(found.iter().all(|(s, _)| *s == Severity::Advice));
        assert!(found[0]
            .1
            .contains("ALTER ROLE \"forkq\" IN DATABASE \"app\" SET statement_timeout = '5000ms'"));
        assert!(found[1].1.contains("SET synchronous_commit = 'off'"));
        let found = findings(&config(true), &settings(60_000, "off"));
        assert_eq!(found[1].0, Severity::Broken);
        assert!(found[1].1.contains("SET synchronous_commit = 'on'"));
    }
}
