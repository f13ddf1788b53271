//! What the end-to-end benchmarks (`pods.rs`, `instances.rs`) share: a node bootstrap token
//! straight into the database, a signed-up tenant, and polling with a deadline.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_auth::OpaqueSecret;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep};
use uuid::Uuid;

/// A bootstrap token valid for an hour, as `POST /v1/admin/node-tokens` makes one.
pub async fn bootstrap_token(pool: &sqlx::PgPool) -> Result<OpaqueSecret> {
    let token = OpaqueSecret::generate("kiln_nbt");
    sqlx::query(
        "INSERT INTO node_bootstrap_tokens (id, token_hash, expires_at)
         VALUES ($1, $2, now() + interval '1 hour')",
    )
    .bind(Uuid::now_v7())
    .bind(token.digest().as_bytes().to_vec())
    .execute(pool)
    .await
    .context("inserting a bootstrap token")?;
    Ok(token)
}

/// A new tenant signed up and in at `base`: (access token, org id).
pub async fn tenant(http: &reqwest::Client, base: &str, who: &str) -> Result<(String, String)> {
    let slug: String = who
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let email = format!("{slug}-{}@example.com", Uuid::new_v4().simple());
    let password = format!("Bench-{}-pw!", Uuid::new_v4().simple());
    http.post(format!("{base}/v1/auth/signup"))
        .json(&json!({ "email": email, "password": password, "name": who }))
        .send()
        .await?
        .error_for_status()?;
    let login: Value = http
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = login["access_token"]
        .as_str()
        .context("signup gave no access token")?
        .to_owned();
    let me: Value = http
        .get(format!("{base}/v1/me"))
        .bearer_auth(&token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let org = me["memberships"][0]["org_id"]
        .as_str()
        .context("no org in /v1/me")?
        .to_owned();
    Ok((token, org))
}

/// Polls `check` every 10 ms until it answers, or fails after `within`.
pub async fn until<T>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the agent on `hostname` has registered its GPUs.
pub async fn registered(pool: &sqlx::PgPool, hostname: &str) -> Result<()> {
    until(
        "the agent to register",
        Duration::from_secs(60),
        async || {
            let n: Option<(bool,)> =
                sqlx::query_as("SELECT registered_at IS NOT NULL FROM nodes WHERE hostname = $1")
                    .bind(hostname)
                    .fetch_optional(pool)
                    .await?;
            Ok(n.filter(|(r,)| *r).map(|_| ()))
        },
    )
    .await
}

/// The simulated 8× H100 host the end-to-end benches' agent reports.
pub const INVENTORY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../agent/inventory/inventories/h100-sxm-8x.toml"
);

/// A `kiln-agent` joining the scheduler at `fleet` as `hostname` with `token`: the simulated
/// 8× H100 inventory, public address 127.0.0.1 (the hostname does not resolve), state in
/// `state_dir`, `docker` ("auto" or "disabled") and any `extra` flags. Its output goes to
/// stderr (stdout is for BENCH lines); killed when dropped.
pub fn spawn_agent(
    bin: &Path,
    (fleet, hostname): (std::net::SocketAddr, &str),
    state_dir: &Path,
    token: &OpaqueSecret,
    docker: &str,
    extra: &[&std::ffi::OsStr],
) -> Result<Child> {
    Command::new(bin)
        .args(extra)
        .args(["--control-plane", &format!("http://{fleet}")])
        .args([
            "--nvml",
            "disabled",
            "--docker",
            docker,
            "--hostname",
            hostname,
        ])
        .args([
            "--public-address",
            "127.0.0.1",
            "--simulated-inventory",
            INVENTORY,
        ])
        .arg("--state-dir")
        .arg(state_dir)
        .env("KILN_AGENT_BOOTSTRAP_TOKEN", token.expose())
        .env("RUST_LOG", "warn")
        .env_remove("KILN_AGENT_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting kiln-agent")
}
