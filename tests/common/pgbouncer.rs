//! A real PgBouncer (Debian's 1.18) in transaction mode in front of the test database, on a free
//! port of its own, started by `scripts/pgbouncer.sh` (which installs it when missing) and killed
//! by pid when its guard drops.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{database_url, free_port, wait_until};

/// One PgBouncer of one test.
pub struct PgBouncer {
    child: Child,
    /// Where it listens.
    pub port: u16,
    dir: PathBuf,
    /// Its log (stderr).
    pub log: PathBuf,
    user: String,
    password: Option<String>,
    /// The test database's name (PgBouncer's name for it too).
    pub database: String,
}

impl PgBouncer {
    /// Starts one with `pool_size` server connections for the test database and waits until it
    /// accepts connections.
    pub fn start(pool_size: u32) -> PgBouncer {
        let upstream: postgres::Config = database_url().parse().expect("DATABASE_URL parses");
        let host = match upstream.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".into(),
        };
        let upstream_port = upstream.get_ports().first().copied().unwrap_or(5432);
        let user = upstream.get_user().unwrap_or("postgres").to_string();
        let password = upstream
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let database = upstream.get_dbname().unwrap_or(&user).to_string();
        for _ in 0..3 {
            let port = free_port();
            let dir =
                std::env::temp_dir().join(format!("forkq-pgbouncer-{}-{port}", std::process::id()));
            let log = dir.with_extension("log");
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pgbouncer.sh");
            let mut child = Command::new("bash")
                .arg(script)
                .arg(&dir)
                .arg(port.to_string())
                .arg(&host)
                .arg(upstream_port.to_string())
                .arg(&user)
                .arg(password.as_deref().unwrap_or(""))
                .env("POOL_SIZE", pool_size.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("run scripts/pgbouncer.sh");
            // Installing it may take a while on the first run.
            let up = wait_until(Duration::from_secs(300), || {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
                    || child.try_wait().ok().flatten().is_some()
            });
            if up && child.try_wait().ok().flatten().is_none() {
                return PgBouncer {
                    child,
                    port,
                    dir,
                    log,
                    user,
                    password,
                    database,
                };
            }
            // The port was taken in the meantime, most likely: try another.
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("PgBouncer did not start; see the forkq-pgbouncer-*.log files in the temp dir");
    }

    /// The connection string of `database` through this PgBouncer.
    fn url_of(&self, database: &str) -> String {
        let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let mut url = format!(
            "host=127.0.0.1 port={} user={} dbname={}",
            self.port,
            quote(&self.user),
            quote(database)
        );
        if let Some(p) = &self.password {
            url.push_str(&format!(" password={}", quote(p)));
        }
        url
    }

    /// The test database through this PgBouncer.
    pub fn url(&self) -> String {
        self.url_of(&self.database)
    }

    /// Runs `command` on the admin console; the rows as (column, value) pairs.
    pub fn admin(&self, command: &str) -> Vec<Vec<(String, String)>> {
        let mut console = postgres::Client::connect(&self.url_of("pgbouncer"), postgres::NoTls)
            .expect("PgBouncer's admin console");
        console
            .simple_query(command)
            .unwrap_or_else(|e| panic!("PgBouncer {command}: {e}"))
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(row) => Some(
                    row.columns()
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (c.name().to_string(), row.get(i).unwrap_or("").into()))
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    }

    /// The PostgreSQL backends of its server connections (`SHOW SERVERS`, `remote_pid`).
    pub fn server_pids(&self) -> Vec<i32> {
        self.admin("SHOW SERVERS")
            .iter()
            .filter_map(|row| {
                row.iter()
                    .find(|(c, _)| c == "remote_pid")
                    .and_then(|(_, v)| v.parse().ok())
            })
            .filter(|&pid: &i32| pid > 0)
            .collect()
    }

    /// Everything it logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- PgBouncer log ----\n{}", self.log_text());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.log);
    }
}
