//! Instances end to end under QEMU (TCG) on this machine: a tenant's `POST …/instances` until
//! an SSH command runs in the guest at the address the API reports.
//!
//! Real `kiln-api`, `kiln-scheduler` and `kiln-agent` processes (the agent with a simulated
//! 8× H100 inventory and the QEMU runtime, KVM off: it hangs on these machines) over a
//! throw-away database; the guest is the project's tiny image (scripts/build-vm-image.sh:
//! a kernel, an initramfs with dropbear, a data disk), registered in the catalog. One instance
//! at a time (each terminated and its VM gone before the next). Figures (medians):
//!
//! * `instances.create_to_ssh_s` — from sending the POST until `ssh … true` first succeeds
//!   with the tenant's key at the host and port the API reports;
//! * `instances.control_plane_overhead_ms` — from the POST until the API says `running`,
//!   minus the time the agent spent bringing the VM up (overlay disk, cloud-init seed, QEMU
//!   until it answers QMP; `runtime_ms` of the observation): what Kiln itself adds (API,
//!   scheduler, fleet stream, agent, reports). The API is polled every 10 ms, so this carries
//!   up to 10 ms of polling;
//! * `instances.qemu_start_ms` and `instances.guest_boot_s` — the agent's part and the guest's
//!   (running until SSH answers), for scale.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use uuid::Uuid;

use crate::stack::until;

pub struct InstancesPlan {
    pub instances: u32,
    pub warmup: u32,
    pub startup: Duration,
}

const BUILD_VM_IMAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/build-vm-image.sh");
/// Under TCG the guest boots in seconds; this bounds a broken run.
const BOOT: Duration = Duration::from_secs(240);

pub async fn run(
    plan: &InstancesPlan,
    (api_bin, scheduler_bin, agent_bin): (&Path, &Path, &Path),
    (db_url, redis_url): (&str, &str),
    run_id: &str,
    children: &mut Vec<Child>,
    figure: impl Fn(&str, String, &str),
) -> Result<()> {
    let built = Command::new("bash")
        .arg(BUILD_VM_IMAGE)
        .stderr(Stdio::inherit())
        .output()
        .await
        .context("running scripts/build-vm-image.sh")?;
    if !built.status.success() {
        bail!("scripts/build-vm-image.sh failed (run scripts/ensure-packages.sh all)");
    }
    let image_dir = PathBuf::from(String::from_utf8_lossy(&built.stdout).trim());

    crate::server::migrate(api_bin, db_url, plan.startup).await?;
    let mut slot = None;
    // A small VM per GPU: two cores here, and TCG.
    let api = crate::server::start_with(
        api_bin,
        (db_url, redis_url),
        run_id,
        &[("KILN_INSTANCE_SHAPE", "cpu_millis=1000,memory_mib=256")],
        plan.startup,
        &mut slot,
    )
    .await;
    children.extend(slot.take());
    let base = format!("http://{}", api?.addr);
    let namespace = format!("bench-{run_id}");
    let started = crate::server::start_scheduler(
        scheduler_bin,
        db_url,
        &[
            ("REDIS_URL", redis_url),
            ("KILN_REDIS_NAMESPACE", &namespace),
        ],
        plan.startup,
        &mut slot,
    )
    .await;
    children.extend(slot.take());
    let (fleet, _) = started?;

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(db_url)
        .await
        .context("connecting to the bench database")?;
    // The guest in the catalog, as `PUT /v1/admin/images/kiln-tiny` (make up) puts it.
    sqlx::query(
        "INSERT INTO vm_images (name, kernel, initrd, disk, kernel_args, login_user)
         VALUES ('kiln-tiny', 'vmlinuz', 'initramfs.cpio.gz', 'disk.raw',
                 'console=ttyS0 quiet panic=-1', 'root')",
    )
    .execute(&pool)
    .await
    .context("registering the VM image")?;
    let token = crate::stack::bootstrap_token(&pool).await?;
    let state_dir = std::env::temp_dir().join(format!("kiln-bench-vms-{run_id}"));
    std::fs::create_dir_all(&state_dir)?;
    let config = state_dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nvm_accel = \"tcg\"\nvm_image_dir = {:?}\nvm_powerdown_timeout_ms = 1000\n\
             vm_start_timeout_ms = 60000\n",
            image_dir.display().to_string()
        ),
    )?;
    let hostname = format!("bench-vms-{run_id}");
    let agent = crate::stack::spawn_agent(
        agent_bin,
        (fleet, &hostname),
        &state_dir.join("state"),
        &token,
        "disabled",
        &["--config".as_ref(), config.as_os_str()],
    )?;
    children.push(agent);
    let outcome = measure(plan, &base, &pool, (&hostname, &state_dir), figure).await;
    kill_vms(&state_dir.join("state/vms"));
    let _ = std::fs::remove_dir_all(&state_dir);
    outcome
}

/// QEMU processes outlive their agent by design (a restarted agent adopts them): the bench's
/// go with it, passed or not.
fn kill_vms(vms: &Path) {
    for d in std::fs::read_dir(vms).into_iter().flatten().flatten() {
        let meta = std::fs::read(d.path().join("meta.json")).unwrap_or_default();
        if let Some(pid) = serde_json::from_slice::<Value>(&meta)
            .ok()
            .and_then(|m| m["pid"].as_u64())
        {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

async fn ssh_ok(key: &Path, ssh: &Value) -> bool {
    let Some((user, host, port)) = ssh["user"]
        .as_str()
        .zip(ssh["host"].as_str())
        .zip(ssh["port"].as_i64())
        .map(|((u, h), p)| (u, h, p))
    else {
        return false;
    };
    Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .args(["-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
        .args(["-o", "ConnectTimeout=2", "-o", "LogLevel=ERROR"])
        .arg(format!("{user}@{host}"))
        .arg("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

async fn measure(
    plan: &InstancesPlan,
    base: &str,
    pool: &sqlx::PgPool,
    (hostname, state_dir): (&str, &Path),
    figure: impl Fn(&str, String, &str),
) -> Result<()> {
    crate::stack::registered(pool, hostname).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let (token, org) = crate::stack::tenant(&http, base, "Instances Bench").await?;
    let key = state_dir.join("tenant");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .await
        .context("ssh-keygen (package openssh-client)")?;
    if !keygen.success() {
        bail!("ssh-keygen failed");
    }
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    let instances = format!("{base}/v1/orgs/{org}/instances");

    let (mut to_ssh, mut overhead, mut qemu, mut guest) = (vec![], vec![], vec![], vec![]);
    for i in 0..plan.warmup + plan.instances {
        let t0 = Instant::now();
        let created: Value = http
            .post(&instances)
            .bearer_auth(&token)
            .json(&json!({
                "name": format!("bench-{i}"),
                "gpu_type": "h100-80gb",
                "gpu_count": 1,
                "image": "kiln-tiny",
                "disk_gib": 1,
                "ssh_public_keys": [public.trim()],
            }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = created["id"].as_str().context("no instance id")?.to_owned();
        let url = format!("{instances}/{id}");
        let running = until("the instance to run", BOOT, async || {
            let v: Value = http
                .get(&url)
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            match v["state"].as_str() {
                Some("failed" | "terminated" | "stopped") => {
                    bail!("instance {id} ended: {}", v["state_reason"])
                }
                Some("running") if !v["ssh"].is_null() => Ok(Some(v)),
                _ => Ok(None),
            }
        })
        .await?;
        let at_running = t0.elapsed();
        until("an SSH login", BOOT, async || {
            Ok(ssh_ok(&key, &running["ssh"]).await.then_some(()))
        })
        .await?;
        let at_ssh = t0.elapsed();
        let uuid = id
            .strip_prefix("ins_")
            .and_then(|u| Uuid::parse_str(u).ok())
            .context("an instance id that is not ins_<uuid>")?;
        let (assignment, runtime_ms): (Uuid, i64) = sqlx::query_as(
            "SELECT o.assignment_id, o.runtime_ms FROM node_observed o
             JOIN workloads w ON w.assignment_id = o.assignment_id WHERE w.id = $1",
        )
        .bind(uuid)
        .fetch_one(pool)
        .await
        .context("reading the instance's observation")?;
        if i >= plan.warmup {
            let qemu_ms = runtime_ms.max(0) as f64;
            to_ssh.push(at_ssh.as_secs_f64());
            overhead.push((at_running.as_secs_f64() * 1000.0 - qemu_ms).max(0.0));
            qemu.push(qemu_ms);
            guest.push((at_ssh - at_running).as_secs_f64());
        }
        http.delete(&url)
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()?;
        until(
            "the VM to be removed",
            Duration::from_secs(60),
            async || {
                let r: Option<(String,)> =
                    sqlx::query_as("SELECT state FROM node_observed WHERE assignment_id = $1")
                        .bind(assignment)
                        .fetch_optional(pool)
                        .await?;
                Ok(r.filter(|(s,)| s == "stopped").map(|_| ()))
            },
        )
        .await?;
    }
    eprintln!(
        "kiln-bench: {} instances created one at a time under QEMU/TCG (1 vCPU, 256 MiB)",
        plan.instances
    );
    figure(
        "instances.create_to_ssh_s",
        format!("{:.2}", median(to_ssh)),
        "s",
    );
    figure(
        "instances.control_plane_overhead_ms",
        format!("{:.1}", median(overhead)),
        "ms",
    );
    figure(
        "instances.qemu_start_ms",
        format!("{:.1}", median(qemu)),
        "ms",
    );
    figure(
        "instances.guest_boot_s",
        format!("{:.2}", median(guest)),
        "s",
    );
    Ok(())
}
