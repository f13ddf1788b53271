//! Boots the guest image for real under QEMU TCG with a cloud-init NoCloud seed, logs in over SSH
//! with the tenant's key, runs a command, and checks that another key is refused.
//! Needs the OS packages from `scripts/ensure-packages.sh all`.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// A scratch directory removed at the end, also on panic.
struct Scratch(PathBuf);
impl Scratch {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("kiln-vm-boot-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The QEMU process, killed at the end, also on panic.
struct Qemu(Child);
impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/ensure-packages.sh all)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key));
    let public = fs::read_to_string(key.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string();
    (key, public)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ssh(key: &Path, port: u16, command: &str) -> Output {
    Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
            "root@127.0.0.1",
            command,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("ssh (package openssh-client)")
}

#[test]
fn guest_boots_under_tcg_and_accepts_only_the_tenants_key() {
    let scratch = Scratch::new();
    let dir = &scratch.0;

    // The image, from OS packages (cached between runs).
    let out = run(Command::new("bash")
        .arg(kiln_vm_image::build_script())
        .stderr(Stdio::inherit()));
    let image = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let (kernel, initrd) = (image.join("vmlinuz"), image.join("initramfs.cpio.gz"));
    assert!(
        kernel.is_file() && initrd.is_file(),
        "no image in {}",
        image.display()
    );

    // The tenant's key and a stranger's.
    let (tenant_key, tenant_pub) = keygen(dir, "tenant");
    let (stranger_key, _) = keygen(dir, "stranger");

    // The NoCloud seed: an ISO labelled cidata with user-data and meta-data.
    let hostname = format!("kiln-t{}", std::process::id());
    let seed = dir.join("seed");
    fs::create_dir_all(&seed).unwrap();
    fs::write(
        seed.join("user-data"),
        format!("#cloud-config\nhostname: {hostname}\nssh_authorized_keys:\n  - {tenant_pub}\n"),
    )
    .unwrap();
    fs::write(
        seed.join("meta-data"),
        format!("instance-id: {hostname}\nlocal-hostname: {hostname}\n"),
    )
    .unwrap();
    let seed_iso = dir.join("seed.iso");
    run(Command::new("genisoimage")
        .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
        .arg(&seed_iso)
        .arg(seed.join("user-data"))
        .arg(seed.join("meta-data")));

    // A writable data disk (ext4, made on the host side).
    let disk = dir.join("disk.img");
    fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-F"])
        .arg(&disk));

    let port = free_port();
    let serial = dir.join("serial.log");
    let started = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-accel", "tcg", "-m", "256", "-smp", "1"])
        .args(["-nographic", "-monitor", "none"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args([
            "-netdev",
            &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"),
        ])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .args([
            "-drive",
            &format!("file={},if=virtio,format=raw", disk.display()),
        ])
        .args([
            "-drive",
            &format!(
                "file={},if=virtio,format=raw,readonly=on",
                seed_iso.display()
            ),
        ])
        .args(["-serial", &format!("file:{}", serial.display())])
        .arg("-no-reboot")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("qemu.err")).unwrap())
        .spawn()
        .expect("qemu-system-x86_64 (package qemu-system-x86)");
    let mut qemu = Qemu(child);
    let console = || fs::read_to_string(&serial).unwrap_or_default();

    // Poll until the tenant can log in, with a deadline; fail early if QEMU exits.
    let command = "echo hello-from-$(hostname); echo kept > /mnt/data/probe && cat /mnt/data/probe";
    let output = loop {
        if let Some(status) = qemu.0.try_wait().unwrap() {
            panic!(
                "qemu exited with {status}\nqemu: {}\nconsole:\n{}",
                fs::read_to_string(dir.join("qemu.err")).unwrap_or_default(),
                console()
            );
        }
        let out = ssh(&tenant_key, port, command);
        if out.status.success() {
            break out;
        }
        assert!(
            started.elapsed() < BOOT_DEADLINE,
            "no SSH login within {BOOT_DEADLINE:?}; last ssh error: {}\nconsole:\n{}",
            String::from_utf8_lossy(&out.stderr),
            console()
        );
        thread::sleep(POLL_INTERVAL);
    };
    let secs = started.elapsed().as_secs_f64();
    let _ = writeln!(std::io::stderr(), "guest ssh ready after {secs:.1} s");

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l == format!("hello-from-{hostname}")),
        "unexpected output: {stdout:?}"
    );
    assert!(
        stdout.lines().any(|l| l == "kept"),
        "data disk not writable: {stdout:?}"
    );
    assert!(
        console().contains(kiln_vm_image::READY_LINE),
        "no ready line on the console:\n{}",
        console()
    );

    // Another key is refused.
    let refused = ssh(&stranger_key, port, "echo should-not-run");
    assert!(!refused.status.success(), "a key not in the seed logged in");
    assert!(!String::from_utf8_lossy(&refused.stdout).contains("should-not-run"));

    drop(qemu);
}
