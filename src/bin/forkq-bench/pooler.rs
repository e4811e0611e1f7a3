//! A PgBouncer in transaction mode for the benchmark's pooler rows, started by
//! `scripts/pgbouncer.sh` in front of the benchmark's server and killed by pid when dropped.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::db::BenchResult;
use crate::sys;

/// A running PgBouncer.
pub struct PgBouncer {
    child: Child,
    /// The upstream database through it, as a URL (the workload tags it like the direct one).
    pub url: String,
}

impl PgBouncer {
    /// Starts one in front of the server of `upstream` (a postgres:// URL) with `pool_size`
    /// server connections, each set up with `connect_query`, logging into `log`.
    pub fn start(
        upstream: &str,
        pool_size: u32,
        connect_query: &str,
        log: &std::path::Path,
    ) -> BenchResult<PgBouncer> {
        let config: postgres::Config = upstream.parse()?;
        let host = match config.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            _ => return Err("the pooler rows need a TCP database URL".into()),
        };
        let user = config.get_user().unwrap_or("postgres").to_string();
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let database = config.get_dbname().unwrap_or(&user).to_string();
        let port = sys::free_port();
        let dir = log.with_extension("d");
        let child = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pgbouncer.sh"))
            .arg(&dir)
            .arg(port.to_string())
            .arg(host)
            .arg(config.get_ports().first().unwrap_or(&5432).to_string())
            .arg(&user)
            .arg(&password)
            .env("POOL_SIZE", pool_size.to_string())
            .env("CONNECT_QUERY", connect_query)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        let mut bouncer = PgBouncer {
            child,
            url: format!("postgres://{user}@127.0.0.1:{port}/{database}"),
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || bouncer.child.try_wait()?.is_some() {
                return Err(format!("PgBouncer did not start; see {}", log.display()).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !password.is_empty() {
            bouncer.url = bouncer.url.replacen('@', &format!(":{password}@"), 1);
        }
        Ok(bouncer)
    }

    /// CPU seconds PgBouncer has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        sys::cpu_seconds(self.child.id() as i32)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
