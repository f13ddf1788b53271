//! The QEMU runtime for real, through its API (apply / observe / remove): boots the project's
//! guest (scripts/build-vm-image.sh), logs in over SSH with a fresh key through the reported host
//! port, writes on /mnt/data, powers the VM off and on again and finds the file, re-adopts the
//! running VM from a new runtime over the same state directory (an agent restart) without
//! restarting it, reboots it on a grown reboot count, and removes it with its overlay. Needs `scripts/ensure-packages.sh all`.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_agent::logs::LogShipper;
use kiln_agent::qemu::launch::Accel;
use kiln_agent::qemu::{QemuRuntime, QemuSettings};
use kiln_agent::state::{AppliedAssignment, AppliedState};
use kiln_proto::node::v1::assignment::Kind;
use kiln_proto::node::v1::{
    Assignment, InstanceSpec, ObservedAssignment, ObservedState, PowerState, VmImage,
};

mod common;

use common::{KillVms, run, vm_image};

const DEADLINE: Duration = Duration::from_secs(240);
const POLL: Duration = Duration::from_millis(250);
const ID: &str = "asg_qemu_it";

fn ssh(key: &Path, port: u32, command: &str) -> Output {
    Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
        .args(["-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"])
        .arg("root@127.0.0.1")
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .expect("ssh (package openssh-client)")
}

fn settings(state: &Path, image: &Path) -> QemuSettings {
    let mut s = QemuSettings::new(state.join("vms"), image);
    s.host_address = "127.0.0.1".into();
    // The guest has no ACPI powerdown handler: a short wait before quit.
    s.powerdown_timeout = Duration::from_secs(2);
    s.apply_wait = Duration::from_secs(1);
    s.start_timeout = Duration::from_secs(60);
    // TCG, as DESIGN.md says for tests: this machine's /dev/kvm opens but a KVM guest hangs.
    s.accel = Some(Accel::Tcg);
    s
}

fn runtime(state: &Path, image: &Path) -> QemuRuntime {
    QemuRuntime::new(
        settings(state, image),
        LogShipper::new(),
        Arc::new(tokio::sync::Notify::new()),
    )
    .unwrap()
}

fn instance(generation: u64, public_key: &str, power: PowerState) -> Assignment {
    Assignment {
        assignment_id: ID.into(),
        generation,
        trace_parent: String::new(),
        kind: Some(Kind::Instance(InstanceSpec {
            image: "kiln-tiny".into(),
            cpu_millis: 1000,
            memory_mib: 256,
            disk_gib: 1,
            gpu_uuids: vec!["GPU-simulated-0".into()],
            ssh_authorized_keys: vec![public_key.to_owned()],
            ports: Vec::new(),
            hostname: "kiln-it".into(),
            power: power as i32,
            reboot_count: 0,
            org_id: "org_test".into(),
            image_source: Some(VmImage {
                name: "kiln-tiny".into(),
                kernel: "vmlinuz".into(),
                initrd: "initramfs.cpio.gz".into(),
                disk: "disk.raw".into(),
                kernel_args: "console=ttyS0 quiet panic=-1".into(),
                login_user: "root".into(),
            }),
        })),
    }
}

/// Polls the runtime until the instance is in `state`.
async fn wait_for(rt: &QemuRuntime, state: ObservedState, console: &Path) -> ObservedAssignment {
    let started = Instant::now();
    loop {
        let all = rt.observe_all().await;
        let o = all.into_iter().find(|o| o.assignment_id == ID);
        if let Some(o) = &o
            && o.state == state as i32
        {
            return o.clone();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "not {state:?} within {DEADLINE:?}: {o:?}\nconsole:\n{}",
            std::fs::read_to_string(console).unwrap_or_default()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Runs `command` over SSH once the guest lets the key in.
async fn ssh_until_ok(key: &Path, port: u32, command: &str, console: &Path) -> String {
    let started = Instant::now();
    loop {
        let out = ssh(key, port, command);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no SSH login within {DEADLINE:?}: {}\nconsole:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(console).unwrap_or_default()
        );
        tokio::time::sleep(POLL).await;
    }
}

fn ssh_port(o: &ObservedAssignment) -> u32 {
    o.ports
        .iter()
        .find(|p| p.port == 22)
        .unwrap_or_else(|| panic!("no SSH port reported: {o:?}"))
        .host_port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_boots_keeps_its_disk_across_power_and_survives_an_agent_restart() {
    let image = vm_image();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path();
    let _guard = KillVms(state.join("vms"));

    let key = state.join("tenant");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "tenant", "-f"])
        .arg(&key));
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let public = public.trim();

    let rt = runtime(state, &image);
    let dir = rt.instance_dir(ID);
    let console = dir.join("serial.log");

    // Boot, log in, write on the data disk (synced: the guest ignores ACPI powerdown, so a
    // stop ends in quit).
    rt.apply(&instance(1, public, PowerState::Running)).await;
    let o = wait_for(&rt, ObservedState::Running, &console).await;
    let port = ssh_port(&o);
    let got = ssh_until_ok(
        &key,
        port,
        "echo hello-from-$(hostname); echo kept > /mnt/data/probe && sync && cat /mnt/data/probe",
        &console,
    )
    .await;
    assert!(got.lines().any(|l| l == "hello-from-kiln-it"), "{got:?}");
    assert!(got.lines().any(|l| l == "kept"), "{got:?}");
    assert!(dir.join("overlay.qcow2").is_file());

    // Power off: QEMU goes, the overlay stays.
    let first_pid = rt.qemu_pid(ID).expect("QEMU runs");
    rt.apply(&instance(2, public, PowerState::Stopped)).await;
    let o = wait_for(&rt, ObservedState::Stopped, &console).await;
    assert_eq!(o.reason, "powered off");
    assert_eq!(rt.qemu_pid(ID), None);
    assert!(dir.join("overlay.qcow2").is_file());

    // Power on: the same overlay, the file is still there, and the same SSH port.
    rt.apply(&instance(3, public, PowerState::Running)).await;
    let o = wait_for(&rt, ObservedState::Running, &console).await;
    assert_eq!(ssh_port(&o), port, "the SSH port is kept across stop/start");
    let pid = rt.qemu_pid(ID).expect("QEMU runs again");
    assert_ne!(pid, first_pid);
    let boot_id = ssh_until_ok(
        &key,
        port,
        "cat /mnt/data/probe; cat /proc/sys/kernel/random/boot_id",
        &console,
    )
    .await;
    assert!(boot_id.starts_with("kept\n"), "{boot_id:?}");

    // An agent restart: a new runtime over the same state directory adopts the running VM.
    drop(rt);
    let rt = runtime(state, &image);
    let applied = AppliedState {
        node_id: "node_test".into(),
        applied_revision: 3,
        assignments: [(
            ID.to_owned(),
            AppliedAssignment::of(&instance(3, public, PowerState::Running)),
        )]
        .into(),
    };
    assert!(rt.restore(&applied).is_empty(), "the spec was kept");
    let o = wait_for(&rt, ObservedState::Running, &console).await;
    assert_eq!(o.generation, 3);
    assert_eq!(ssh_port(&o), port);
    assert_eq!(rt.qemu_pid(ID), Some(pid), "re-adopted, not restarted");
    let again = ssh_until_ok(
        &key,
        port,
        "cat /mnt/data/probe; cat /proc/sys/kernel/random/boot_id",
        &console,
    )
    .await;
    assert_eq!(again, boot_id, "the guest did not reboot");

    // A reboot the tenant asked for: the same QEMU, a new boot of the guest.
    let mut reboot = instance(4, public, PowerState::Running);
    if let Some(Kind::Instance(spec)) = reboot.kind.as_mut() {
        spec.reboot_count = 1;
    }
    rt.apply(&reboot).await;
    let started = Instant::now();
    let rebooted = loop {
        let now = ssh(
            &key,
            port,
            "cat /mnt/data/probe; cat /proc/sys/kernel/random/boot_id",
        );
        let out = String::from_utf8_lossy(&now.stdout).into_owned();
        if now.status.success() && out != boot_id {
            break out;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no reboot within {DEADLINE:?}"
        );
        tokio::time::sleep(POLL).await;
    };
    assert!(rebooted.starts_with("kept\n"), "{rebooted:?}");
    assert_eq!(
        rt.qemu_pid(ID),
        Some(pid),
        "a reboot keeps the QEMU process"
    );
    let o = wait_for(&rt, ObservedState::Running, &console).await;
    assert_eq!(o.generation, 4);

    // Removal: QEMU quits and the overlay, seed and socket are gone.
    rt.remove(ID, 4).await.unwrap();
    let o = wait_for(&rt, ObservedState::Stopped, &console).await;
    assert_eq!(o.reason, "stopped and removed");
    assert!(!dir.exists(), "the instance's directory is deleted");
    assert!(
        !Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .contains(ID),
        "QEMU is gone"
    );
}

/// A VM whose QEMU dies is reported FAILED with how it ended (no guest boot needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_qemu_dies_is_failed_with_the_reason() {
    let image = vm_image();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path();
    let _guard = KillVms(state.join("vms"));
    let rt = runtime(state, &image);
    let console = rt.instance_dir(ID).join("serial.log");
    rt.apply(&instance(1, "ssh-ed25519 AAAA nobody", PowerState::Running))
        .await;
    wait_for(&rt, ObservedState::Running, &console).await;
    let pid = rt.qemu_pid(ID).expect("QEMU runs");
    run(Command::new("kill").args(["-9", &pid.to_string()]));
    // FAILED at once; the exit status joins the reason once this process has reaped QEMU.
    let started = Instant::now();
    loop {
        let o = wait_for(&rt, ObservedState::Failed, &console).await;
        assert!(o.reason.contains("exited unexpectedly"), "{}", o.reason);
        if o.reason.contains("signal: 9") {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "no exit status: {}", o.reason);
        tokio::time::sleep(POLL).await;
    }
    rt.remove(ID, 1).await.unwrap();
    assert!(!rt.instance_dir(ID).exists());
}
