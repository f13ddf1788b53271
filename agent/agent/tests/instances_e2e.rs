//! An instance end to end, every part real: the API and scheduler in process, a `kiln-agent`
//! process running VMs under QEMU (TCG) from the project's tiny guest image
//! (scripts/build-vm-image.sh), registered in the catalog as an operator would. A tenant creates
//! an instance through the API with their SSH key, logs in at the address the API reports and
//! writes a file; stop and start keep it; the serial console is readable through the API;
//! terminate removes the VM and its overlay disk. Needs `scripts/ensure-packages.sh all`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use kiln_testkit::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

mod common;

use common::{ControlPlane, KillVms, run, start_agent_with, until, vm_image};

/// Booting under TCG on two cores takes tens of seconds; a deadline, not a sleep.
const BOOT: Duration = Duration::from_secs(240);

/// `ssh -i key -p port user@host command`, non-interactive.
fn ssh(key: &Path, ssh: &Value, command: &str) -> Output {
    Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", &ssh["port"].to_string()])
        .args(["-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
        .args(["-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"])
        .arg(format!(
            "{}@{}",
            ssh["user"].as_str().unwrap(),
            ssh["host"].as_str().unwrap()
        ))
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .expect("ssh (package openssh-client)")
}

struct Tenant<'a> {
    app: &'a TestApp,
    token: String,
    /// `/v1/orgs/{org}/instances/{id}`
    path: String,
}

impl Tenant<'_> {
    async fn get(&self) -> Value {
        let (status, body) = self.app.get(&self.path, &self.token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Polls the instance until it is `state` (and, when running, says how to SSH in).
    async fn until_state(&self, state: &str, deadline: Duration) -> Value {
        until(
            &format!("the instance to be {state}"),
            deadline,
            async || {
                let i = self.get().await;
                (i["state"] == state && (state != "running" || !i["ssh"].is_null())).then_some(i)
            },
        )
        .await
    }

    async fn power(&self, what: &str) -> Value {
        let (status, body) = self
            .app
            .post(&format!("{}/{what}", self.path), &self.token, json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{what}: {body}");
        body
    }

    /// Runs `command` once the guest lets the key in (sshd comes up after the state does).
    async fn ssh_until_ok(&self, key: &Path, ssh_to: &Value, command: &str) -> String {
        until("an SSH login", BOOT, async || {
            let out = ssh(key, ssh_to, command);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .await
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_tenant_creates_an_instance_logs_in_over_ssh_and_its_disk_survives_stop_and_start(
    pool: PgPool,
) {
    let image_dir = vm_image();

    // A small VM per GPU: this machine has two cores and runs the guest under TCG.
    let app = TestApp::spawn_with(pool, |c| {
        c.instance_shape = kiln_api::ops::instances::Shape {
            cpu_millis_per_gpu: 1000,
            memory_mib_per_gpu: 256,
        };
    })
    .await;
    let control = ControlPlane::start(&app).await;
    let dir = tempfile::tempdir().unwrap();
    let _vms = KillVms(dir.path().join("state/vms"));
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nqemu = \"auto\"\nvm_accel = \"tcg\"\nvm_image_dir = {:?}\n\
             vm_powerdown_timeout_ms = 2000\nvm_start_timeout_ms = 60000\n",
            image_dir.display().to_string()
        ),
    )
    .unwrap();
    let hostname = format!("vm-e2e-{}", std::process::id());
    let (_agent, node) = start_agent_with(
        app.store(),
        &control.fleet_url,
        &hostname,
        dir.path(),
        Some(&config),
    )
    .await;

    // The operator registers the guest image, as `make up` does.
    let op = app.operator().await;
    let (status, image) = app
        .call(
            Method::PUT,
            "/v1/admin/images/kiln-tiny",
            Some(&op),
            Some(json!({
                "description": "Kiln's tiny guest: busybox and dropbear",
                "kernel": "vmlinuz",
                "initrd": "initramfs.cpio.gz",
                "disk": "disk.raw",
                "kernel_args": "console=ttyS0 quiet panic=-1",
                "login_user": "root",
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{image}");

    let ada = app.user("ada").await;
    let key = dir.path().join("ada");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ada@laptop", "-f"])
        .arg(&key));
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let (status, created) = app
        .post(
            &format!("/v1/orgs/{}/instances", ada.org_id),
            &ada.access_token,
            json!({
                "name": "box",
                "gpu_type": "l40s-48gb",
                "gpu_count": 1,
                "image": "kiln-tiny",
                "disk_gib": 1,
                "ssh_public_keys": [public.trim()],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let tenant = Tenant {
        app: &app,
        token: ada.access_token.clone(),
        path: format!(
            "/v1/orgs/{}/instances/{}",
            ada.org_id,
            created["id"].as_str().unwrap()
        ),
    };

    // Placed, booted, and the API says how to log in: there, with Ada's key, as root.
    let running = tenant.until_state("running", BOOT).await;
    assert_eq!(running["node"], node.to_string());
    assert_eq!(running["gpus"].as_array().unwrap().len(), 1);
    let ssh_to = running["ssh"].clone();
    assert_eq!(ssh_to["host"], "127.0.0.1", "the node's public address");
    assert_eq!(
        ssh_to["command"],
        format!("ssh -p {} root@127.0.0.1", ssh_to["port"]),
    );
    let got = tenant
        .ssh_until_ok(
            &key,
            &ssh_to,
            "echo hello-from-$(hostname); echo kept > /mnt/data/probe && sync && cat /mnt/data/probe",
        )
        .await;
    assert!(got.lines().any(|l| l == "hello-from-box"), "{got:?}");
    assert!(got.lines().any(|l| l == "kept"), "{got:?}");
    // Someone else's key does not get in.
    let stranger = dir.path().join("stranger");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&stranger));
    assert!(!ssh(&stranger, &ssh_to, "true").status.success());

    // The serial console, through the API: the guest's own ready line.
    until(
        "the guest's console lines",
        Duration::from_secs(30),
        async || {
            let (status, text) = app
                .get(
                    &format!("{}/console?tail=500", tenant.path),
                    &ada.access_token,
                )
                .await;
            (status == StatusCode::OK && text.as_str()?.contains("kiln-guest: ready")).then_some(())
        },
    )
    .await;

    // Stop: the VM goes, its overlay disk stays on the node, no SSH offered.
    let vms = dir.path().join("state/vms");
    let overlays = || -> Vec<PathBuf> {
        std::fs::read_dir(&vms)
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.path().join("overlay.qcow2"))
            .filter(|p| p.is_file())
            .collect()
    };
    assert_eq!(overlays().len(), 1, "one overlay disk for the instance");
    tenant.power("stop").await;
    let stopped = tenant.until_state("stopped", Duration::from_secs(60)).await;
    assert_eq!(stopped["ssh"], Value::Null);
    assert_eq!(stopped["gpus"], json!([]), "its GPU is given back");
    assert_eq!(stopped["node"], node.to_string(), "it keeps its node");
    assert_eq!(overlays().len(), 1, "the disk is kept");

    // Start: the same disk, the file is still there.
    tenant.power("start").await;
    let again = tenant.until_state("running", BOOT).await;
    let kept = tenant
        .ssh_until_ok(&key, &again["ssh"], "cat /mnt/data/probe")
        .await;
    assert_eq!(kept.trim(), "kept");

    // Terminate: QEMU and the overlay are gone from the node.
    let (status, gone) = app
        .call(Method::DELETE, &tenant.path, Some(&ada.access_token), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{gone}");
    assert_eq!(gone["state"], "terminated");
    until(
        "the VM's directory and overlay to be removed",
        Duration::from_secs(60),
        async || {
            std::fs::read_dir(&vms)
                .map(|d| d.count() == 0)
                .unwrap_or(true)
                .then_some(())
        },
    )
    .await;
    assert!(!ssh(&key, &again["ssh"], "true").status.success());
    control.stop().await;
}
