//! The system under test: a throw-away database and a `kiln-api` child process.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

/// A `kiln_bench_<id>` database on the server of the given URL; drop it with
/// [`BenchDatabase::drop_database`].
pub struct BenchDatabase {
    admin_url: String,
    name: String,
    /// The URL of the new database (same server, role and password).
    pub url: String,
}

impl BenchDatabase {
    pub async fn create(admin_url: &str, run_id: &str) -> Result<Self> {
        // `run_id` is hex, so the name needs no quoting.
        let name = format!("kiln_bench_{run_id}");
        let mut url = url::Url::parse(admin_url).context("parsing DATABASE_URL")?;
        url.set_path(&format!("/{name}"));
        let mut conn = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("connecting to {}", redact(admin_url)))?;
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
        conn.close().await.ok();
        eprintln!("kiln-bench: created database {name}");
        Ok(Self {
            admin_url: admin_url.to_owned(),
            name,
            url: url.into(),
        })
    }

    pub async fn drop_database(self) -> Result<()> {
        let mut conn = PgConnection::connect(&self.admin_url)
            .await
            .with_context(|| format!("connecting to drop database {}", self.name))?;
        sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .with_context(|| format!("dropping database {}", self.name))?;
        conn.close().await.ok();
        eprintln!("kiln-bench: dropped database {}", self.name);
        Ok(())
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.into()
        }
        Err(_) => "<unparsable DATABASE_URL>".to_owned(),
    }
}

fn api_command(api_bin: &Path, db_url: &str) -> Command {
    let mut cmd = Command::new(api_bin);
    cmd.env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        // Stdout is reserved for BENCH lines: the child's output goes to stderr.
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd
}

/// `kiln-api migrate` against the bench database.
pub async fn migrate(api_bin: &Path, db_url: &str, limit: Duration) -> Result<()> {
    let mut cmd = api_command(api_bin, db_url);
    cmd.arg("migrate");
    let status = timeout(limit, cmd.status())
        .await
        .context("kiln-api migrate timed out")?
        .with_context(|| format!("running {} migrate", api_bin.display()))?;
    if !status.success() {
        bail!("kiln-api migrate failed: {status}");
    }
    Ok(())
}

pub struct RunningApi {
    pub addr: SocketAddr,
}

/// Start `kiln-api serve` on a free loopback port and wait for `/healthz`. The child is put
/// in `slot` as soon as it exists, so the caller can stop it whatever happens next.
pub async fn start(
    api_bin: &Path,
    db_url: &str,
    redis_url: &str,
    run_id: &str,
    limit: Duration,
    slot: &mut Option<Child>,
) -> Result<RunningApi> {
    start_with(api_bin, (db_url, redis_url), run_id, &[], limit, slot).await
}

/// [`start`] with extra environment for the API.
pub async fn start_with(
    api_bin: &Path,
    (db_url, redis_url): (&str, &str),
    run_id: &str,
    env: &[(&str, &str)],
    limit: Duration,
    slot: &mut Option<Child>,
) -> Result<RunningApi> {
    let addr = free_port()?;
    let public_url = format!("http://{addr}");
    let mut cmd = api_command(api_bin, db_url);
    cmd.arg("serve")
        .env("KILN_API_LISTEN", addr.to_string())
        .env("REDIS_URL", redis_url)
        .env("KILN_PUBLIC_URL", &public_url)
        .env("KILN_REDIS_NAMESPACE", format!("bench-{run_id}"))
        .env("KILN_LOGIN_LIMIT_PER_IP", "1000000")
        .env("KILN_LOGIN_LIMIT_PER_ACCOUNT", "1000000")
        .env("KILN_SIGNUP_LIMIT_PER_IP", "1000000")
        .envs(env.iter().copied());
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} serve", api_bin.display()))?;
    let child = slot.insert(child);
    eprintln!(
        "kiln-bench: kiln-api serve on {addr} (pid {:?})",
        child.id()
    );

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .context("building the HTTP client")?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().context("checking on kiln-api")? {
            bail!("kiln-api serve exited before answering /healthz: {status}");
        }
        match http.get(format!("{public_url}/healthz")).send().await {
            Ok(resp) if resp.status().is_success() => break,
            _ if Instant::now() >= deadline => {
                bail!("kiln-api did not answer {public_url}/healthz within {limit:?}")
            }
            _ => sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(RunningApi { addr })
}

/// Kill the child and reap it.
pub async fn stop(mut child: Child) {
    if let Err(err) = child.kill().await {
        eprintln!("kiln-bench: warning: stopping kiln-api: {err}");
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<SocketAddr> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?)
}

/// Resolves on Ctrl-C or SIGTERM, naming it.
pub async fn shutdown_signal() -> Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; Ok("Ctrl-C") }
        _ = term.recv() => Ok("SIGTERM"),
    }
}

/// Start `kiln-scheduler` (which migrates its database) on free loopback ports with `env`
/// added, and wait for its `/healthz`. The child is put in `slot` as soon as it exists. Answers
/// the node-control address and the child's pid.
pub async fn start_scheduler(
    bin: &Path,
    db_url: &str,
    env: &[(&str, &str)],
    limit: Duration,
    slot: &mut Option<Child>,
) -> Result<(SocketAddr, u32)> {
    let fleet_addr = free_port()?;
    let ops_addr = free_port()?;
    let mut cmd = Command::new(bin);
    cmd.env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .env("KILN_FLEET_LISTEN", fleet_addr.to_string())
        .env("KILN_SCHEDULER_OPS_LISTEN", ops_addr.to_string())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        // Stdout is reserved for BENCH lines: the child's output goes to stderr.
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let spawned = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = spawned.id().context("the scheduler has no pid")?;
    let spawned = slot.insert(spawned);
    wait_healthy(ops_addr, limit, spawned).await?;
    eprintln!("kiln-bench: kiln-scheduler on {fleet_addr} (pid {pid})");
    Ok((fleet_addr, pid))
}

async fn wait_healthy(ops: SocketAddr, limit: Duration, child: &mut Child) -> Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("kiln-scheduler exited before answering /healthz: {status}");
        }
        match http.get(format!("http://{ops}/healthz")).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            _ if Instant::now() >= deadline => bail!("kiln-scheduler did not become healthy"),
            _ => sleep(Duration::from_millis(100)).await,
        }
    }
}
