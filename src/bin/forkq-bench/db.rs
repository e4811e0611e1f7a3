//! The benchmark's schemas: one fresh, migrated schema per workload, dropped afterwards.

use std::sync::atomic::{AtomicU32, Ordering};

use postgres::Client;

/// Errors of the benchmark: anything, reported in the table instead of aborting the run.
pub type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A migrated schema of its own; dropped with everything in it when the guard drops.
pub struct BenchSchema {
    /// The schema name.
    pub name: String,
    /// The database URL of the run.
    pub url: String,
}

/// Opens a connection named `application` in `pg_stat_activity`.
pub fn connect(url: &str, application: &str) -> BenchResult<Client> {
    Ok(forkq::queue::connect(url, application)?)
}

impl BenchSchema {
    /// Creates and migrates `bench_<label>_<pid>_<n>`.
    pub fn new(url: &str, label: &str) -> BenchResult<BenchSchema> {
        let name = format!(
            "bench_{label}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let mut client = connect(url, "forkq-bench")?;
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))?;
        forkq::queue::migrations::migrate(&mut client, &name)?;
        Ok(BenchSchema {
            name,
            url: url.to_string(),
        })
    }

    /// `sql` with `{s}` replaced by the quoted schema.
    pub fn sql(&self, sql: &str) -> String {
        sql.replace("{s}", &format!("\"{}\"", self.name))
    }

    /// The URL every process of this workload uses: tagged with an application name, so the
    /// PostgreSQL backends serving this workload (and only those) can be found and measured.
    pub fn tagged_url(&self) -> String {
        self.tagged(&self.url)
    }

    /// `url` (this workload's server, or a pooler in front of it) with this workload's tag.
    pub fn tagged(&self, url: &str) -> String {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}application_name={}", self.name)
    }

    /// Pre-enqueues `n` jobs of `task` in queue `default` in one statement, then analyzes the
    /// table (what autovacuum does shortly after a bulk load), so runs start from the same plan.
    pub fn fill(&self, n: usize, task: &str, payload: &serde_json::Value) -> BenchResult<()> {
        self.fill_announced(n, task, payload, false)?;
        Ok(())
    }

    /// [`BenchSchema::fill`] in one transaction (ANALYZE counts the rows its own transaction
    /// inserted), announced in it when `announce` (one NOTIFY, as an enqueue sends, which wakes
    /// an idle fleet), so the jobs, their statistics and the wake-up arrive together at commit.
    /// Returns the moment the commit was sent.
    pub fn fill_announced(
        &self,
        n: usize,
        task: &str,
        payload: &serde_json::Value,
        announce: bool,
    ) -> BenchResult<std::time::Instant> {
        let mut client = connect(&self.url, "forkq-bench")?;
        let mut tx = client.transaction()?;
        tx.execute(
            &self.sql(
                "INSERT INTO {s}.jobs (queue, task, payload)
                 SELECT 'default', $1, $2 FROM generate_series(1, $3)",
            ),
            &[&task, payload, &(n as i32)],
        )?;
        tx.batch_execute(&self.sql("ANALYZE {s}.jobs"))?;
        if announce {
            let channel = forkq::queue::sql::channel(&self.name);
            tx.execute("SELECT pg_notify($1, 'default')", &[&channel])?;
        }
        let committed = std::time::Instant::now();
        tx.commit()?;
        Ok(committed)
    }

    /// Whether every job that could run was run and acknowledged (rows scheduled for later do
    /// not count); two probes of the partial indexes, whatever the table holds.
    pub fn is_drained(&self, client: &mut Client) -> BenchResult<bool> {
        Ok(client
            .query_one(
                &self.sql(
                    "SELECT NOT EXISTS (SELECT 1 FROM {s}.jobs WHERE state = 'running')
                        AND NOT EXISTS (SELECT 1 FROM {s}.jobs WHERE state = 'available')",
                ),
                &[],
            )?
            .get(0))
    }

    /// The PostgreSQL backends serving this workload's tagged connections.
    pub fn backend_pids(&self, client: &mut Client) -> BenchResult<Vec<i32>> {
        Ok(client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                &[&self.name],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}

impl Drop for BenchSchema {
    fn drop(&mut self) {
        if let Ok(mut client) = connect(&self.url, "forkq-bench") {
            let _ =
                client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name));
        }
    }
}

/// PostgreSQL's version and the settings that bound queue throughput and latency.
pub fn server_settings(url: &str) -> BenchResult<Vec<(String, String)>> {
    let mut client = connect(url, "forkq-bench")?;
    let mut out = vec![(
        "version".to_string(),
        client
            .query_one("SELECT version()", &[])?
            .get::<_, String>(0),
    )];
    for row in client.query(
        "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings
         WHERE name = ANY($1) ORDER BY name",
        &[&vec![
            "shared_buffers",
            "synchronous_commit",
            "fsync",
            "full_page_writes",
            "wal_level",
            "wal_sync_method",
            "wal_buffers",
            "wal_writer_delay",
            "commit_delay",
            "max_wal_size",
            "checkpoint_timeout",
            "max_connections",
            "work_mem",
            "jit",
            "autovacuum",
            "shared_preload_libraries",
        ]],
    )? {
        out.push((row.get(0), row.get(1)));
    }
    Ok(out)
}
