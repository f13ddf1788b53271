//! The Docker runtime against this machine's real Docker engine, with an image the tests build
//! locally (`kiln-test/busybox:1`: a static busybox in a scratch image; no registry).
//!
//! Each test has its own node label, assignment ids and default network, so tests running in
//! parallel never see each other's containers; a guard removes them (also on panic).

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::query_parameters::{InspectContainerOptions, RemoveContainerOptions};
use kiln_agent::docker::{DockerRuntime, DockerSettings};
use kiln_agent::state::{AppliedAssignment, AppliedState, GpuUse, SpecKind};
use kiln_proto::node::v1::assignment::Kind;
use kiln_proto::node::v1::gpu_allocation::Kind as GpuKind;
use kiln_proto::node::v1::{
    Assignment, GpuAllocation, ObservedAssignment, ObservedState, PodSpec, PortSpec, Protocol,
    WholeGpus,
};
use kiln_proto::node::v1::{LogSource, RestartPolicy};

const IMAGE: &str = "kiln-test/busybox:1";
const BUSYBOX: &str = "/bin/busybox";

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run the docker CLI")
}

/// Builds `kiln-test/busybox:1` unless present: Debian's static busybox (package
/// `busybox-static`) in a scratch image.
fn ensure_image() {
    if docker(&["image", "inspect", IMAGE]).status.success() {
        return;
    }
    if !Path::new(BUSYBOX).exists() {
        // The project's package list installs it; this is the fallback on a bare machine.
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "busybox-static"])
            .output();
    }
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: install the Debian package busybox-static"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(BUSYBOX, dir.path().join("busybox")).unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\n",
    )
    .unwrap();
    let out = docker(&["build", "-q", "-t", IMAGE, &dir.path().to_string_lossy()]);
    assert!(
        out.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One test's world: its node label, its network, and the cleanup of both.
struct Fixture {
    tag: String,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        ensure_image();
        Self {
            tag: format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn node(&self) -> String {
        format!("node_test{}", self.tag)
    }

    fn network(&self) -> String {
        format!("kiln-test-{}", self.tag)
    }

    fn id(&self, n: u32) -> String {
        format!("asg_{}{n}", self.tag)
    }

    fn settings(&self) -> DockerSettings {
        DockerSettings {
            default_network: self.network(),
            org_network_prefix: format!("{}-org-", self.network()),
            reconcile_interval: Duration::from_millis(300),
            specs_path: Some(self.dir.path().join("pods.pb")),
            ..DockerSettings::new(self.node())
        }
    }

    async fn runtime(&self) -> DockerRuntime {
        DockerRuntime::connect(self.settings())
            .await
            .expect("the Docker engine answers")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let out = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=kiln.node={}", self.node()),
        ]);
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = docker(&["rm", "-f", id]);
        }
        let _ = docker(&["network", "rm", &self.network()]);
        let orgs = docker(&[
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("name={}-org-", self.network()),
        ]);
        for id in String::from_utf8_lossy(&orgs.stdout).split_whitespace() {
            let _ = docker(&["network", "rm", id]);
        }
    }
}

fn pod(command: &str) -> PodSpec {
    PodSpec {
        org_id: String::new(),
        image: IMAGE.into(),
        command: vec![BUSYBOX.into(), "sh".into(), "-c".into(), command.into()],
        env: [("GREETING".to_owned(), "hello-kiln".to_owned())].into(),
        ports: Vec::new(),
        cpu_millis: 500,
        memory_mib: 64,
        gpus: None,
        restart_policy: 0,
        env_sealed: Default::default(),
    }
}

fn assignment(id: &str, generation: u64, pod: PodSpec) -> Assignment {
    Assignment {
        assignment_id: id.into(),
        generation,
        trace_parent: String::new(),
        kind: Some(Kind::Pod(pod)),
    }
}

fn applied(assignments: &[&Assignment]) -> AppliedState {
    AppliedState {
        node_id: String::new(),
        applied_revision: 1,
        assignments: assignments
            .iter()
            .map(|a| {
                (
                    a.assignment_id.clone(),
                    AppliedAssignment {
                        generation: a.generation,
                        kind: SpecKind::Pod,
                        gpu_uuids: Vec::new(),
                        gpu_use: GpuUse::None,
                    },
                )
            })
            .collect(),
    }
}

/// Polls the runtime until the assignment's observation satisfies `ok`.
async fn wait_for(
    rt: &DockerRuntime,
    id: &str,
    what: &str,
    ok: impl Fn(&ObservedAssignment) -> bool,
) -> ObservedAssignment {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < Duration::from_secs(40) {
        if let Some(o) = rt
            .observe_all()
            .await
            .into_iter()
            .find(|o| o.assignment_id == id)
        {
            if ok(&o) {
                return o;
            }
            last = Some(o);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {id} to be {what}; last seen {last:?}");
}

fn is(state: ObservedState) -> impl Fn(&ObservedAssignment) -> bool {
    move |o| o.state == state as i32
}

async fn container_id(rt: &DockerRuntime, id: &str) -> Option<String> {
    rt.docker()
        .inspect_container(
            &rt.settings().container_name(id),
            None::<InspectContainerOptions>,
        )
        .await
        .ok()
        .and_then(|c| c.id)
}

/// GET `path` from 127.0.0.1:`port`, retrying while the server comes up.
fn http_get(port: u32, path: &str) -> String {
    let start = Instant::now();
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port as u16))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(body) if body.starts_with("HTTP/1.") => return body,
            other if start.elapsed() > Duration::from_secs(15) => {
                panic!("GET {path} on port {port}: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_runs_hardened_with_gpu_env_and_a_reachable_port_then_is_removed() {
    let f = Fixture::new();
    let rt = f.runtime().await;
    let id = f.id(1);
    let mut spec = pod(&format!(
        "{BUSYBOX} mkdir -p /www && {BUSYBOX} env > /www/env.txt && \
         exec {BUSYBOX} httpd -f -p 8000 -h /www"
    ));
    spec.ports = vec![PortSpec {
        port: 8000,
        protocol: Protocol::Tcp as i32,
        name: "http".into(),
    }];
    spec.gpus = Some(GpuAllocation {
        kind: Some(GpuKind::Whole(WholeGpus {
            gpu_uuids: vec!["GPU-test-0".into(), "GPU-test-1".into()],
        })),
    });
    let a = assignment(&id, 2, spec);
    rt.apply(&a).await;
    let o = wait_for(&rt, &id, "running", is(ObservedState::Running)).await;
    assert_eq!(o.generation, 2);
    assert_eq!(o.ports.len(), 1, "{o:?}");
    assert_eq!(o.ports[0].port, 8000);
    let host_port = o.ports[0].host_port;
    assert!(host_port > 0);

    // The port is reachable from the host, and the env is visible inside.
    let env = http_get(host_port, "/env.txt");
    assert!(env.contains("200 OK"), "{env}");
    assert!(env.contains("GREETING=hello-kiln"), "{env}");
    assert!(
        env.contains("NVIDIA_VISIBLE_DEVICES=GPU-test-0,GPU-test-1"),
        "{env}"
    );
    assert!(
        env.contains("NVIDIA_DRIVER_CAPABILITIES=compute,utility"),
        "{env}"
    );

    // Labels, limits and hardening as Docker has them.
    let c = rt
        .docker()
        .inspect_container(
            &rt.settings().container_name(&id),
            None::<InspectContainerOptions>,
        )
        .await
        .unwrap();
    let labels = c.config.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(labels["kiln.managed"], "true");
    assert_eq!(labels["kiln.assignment"], id);
    assert_eq!(labels["kiln.generation"], "2");
    assert_eq!(labels["kiln.node"], f.node());
    let h = c.host_config.unwrap();
    assert_eq!(h.nano_cpus, Some(500_000_000));
    assert_eq!(h.memory, Some(64 << 20));
    assert_eq!(h.privileged, Some(false));
    assert_eq!(h.cap_drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert!(h.cap_add.unwrap_or_default().is_empty());
    assert_eq!(
        h.security_opt.as_deref(),
        Some(&["no-new-privileges:true".to_owned()][..])
    );
    assert_eq!(h.network_mode.as_deref(), Some(f.network().as_str()));
    assert_ne!(h.pid_mode.as_deref(), Some("host"));
    assert_ne!(h.ipc_mode.as_deref(), Some("host"));
    assert!(h.device_requests.unwrap_or_default().is_empty());

    // Removal: gone from Docker, reported STOPPED.
    rt.remove(&id, 2).await.unwrap();
    assert_eq!(container_id(&rt, &id).await, None);
    let o = wait_for(&rt, &id, "stopped", is(ObservedState::Stopped)).await;
    assert_eq!(o.reason, "stopped and removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_removed_behind_the_agents_back_is_recreated() {
    let f = Fixture::new();
    let rt = f.runtime().await;
    let _loop = rt.spawn_reconciler();
    let id = f.id(1);
    rt.apply(&assignment(
        &id,
        1,
        pod(&format!("exec {BUSYBOX} sleep 600")),
    ))
    .await;
    wait_for(&rt, &id, "running", is(ObservedState::Running)).await;
    let first = container_id(&rt, &id).await.unwrap();
    rt.docker()
        .remove_container(
            &first,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(second) = container_id(&rt, &id).await
            && second != first
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not recreated within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for(&rt, &id, "running again", is(ObservedState::Running)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_adopts_running_containers_and_removes_unwanted_ones() {
    let f = Fixture::new();
    let keep = assignment(&f.id(1), 3, pod(&format!("exec {BUSYBOX} sleep 600")));
    let drop_ = assignment(&f.id(2), 1, pod(&format!("exec {BUSYBOX} sleep 600")));
    let (kept_container, dropped_container) = {
        let rt = f.runtime().await;
        rt.apply(&keep).await;
        rt.apply(&drop_).await;
        wait_for(
            &rt,
            &keep.assignment_id,
            "running",
            is(ObservedState::Running),
        )
        .await;
        wait_for(
            &rt,
            &drop_.assignment_id,
            "running",
            is(ObservedState::Running),
        )
        .await;
        (
            container_id(&rt, &keep.assignment_id).await.unwrap(),
            container_id(&rt, &drop_.assignment_id).await.unwrap(),
        )
    };
    // A new agent process: the applied state lists only `keep` (the other was removed while the
    // agent was down).
    let rt = f.runtime().await;
    let lost = rt.restore(&applied(&[&keep]));
    assert!(lost.is_empty(), "{lost:?}");
    rt.reconcile().await;
    assert_eq!(
        container_id(&rt, &keep.assignment_id).await.as_deref(),
        Some(kept_container.as_str()),
        "adopted, not recreated"
    );
    assert_eq!(container_id(&rt, &drop_.assignment_id).await, None);
    let _ = dropped_container;
    let o = wait_for(
        &rt,
        &keep.assignment_id,
        "running",
        is(ObservedState::Running),
    )
    .await;
    assert_eq!(o.generation, 3);

    // A newer generation replaces the container.
    let newer = assignment(&f.id(1), 4, pod(&format!("exec {BUSYBOX} sleep 601")));
    rt.apply(&newer).await;
    let o = wait_for(&rt, &newer.assignment_id, "running", |o| {
        o.state == ObservedState::Running as i32 && o.generation == 4
    })
    .await;
    assert_eq!(o.generation, 4);
    let replaced = container_id(&rt, &newer.assignment_id).await.unwrap();
    assert_ne!(replaced, kept_container);

    // A restart whose applied state has a pod without a kept spec says so.
    let rt = f.runtime().await;
    let unknown = assignment("asg_never_kept", 1, pod("true"));
    let lost = rt.restore(&applied(&[&newer, &unknown]));
    assert_eq!(lost, vec!["asg_never_kept".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_fail_with_the_exit_code_after_restarts_and_exit_0_stops() {
    let f = Fixture::new();
    let rt = f.runtime().await;
    let failing = f.id(1);
    let clean = f.id(2);
    rt.apply(&assignment(&failing, 1, pod("exit 3"))).await;
    rt.apply(&assignment(&clean, 1, pod("exit 0"))).await;
    let o = wait_for(&rt, &failing, "failed", is(ObservedState::Failed)).await;
    assert_eq!(o.exit_code, Some(3));
    assert!(o.reason.starts_with("container exited 3"), "{o:?}");
    assert!(o.reason.contains("restarted 3 times"), "{o:?}");
    let o = wait_for(&rt, &clean, "stopped", is(ObservedState::Stopped)).await;
    assert_eq!(o.exit_code, Some(0));
    assert_eq!(o.reason, "container exited 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policy_never_fails_at_once_and_always_restarts_even_after_exit_0() {
    let f = Fixture::new();
    let rt = f.runtime().await;
    let never = f.id(1);
    let always = f.id(2);
    let mut spec = pod("exit 4");
    spec.restart_policy = RestartPolicy::Never as i32;
    rt.apply(&assignment(&never, 1, spec)).await;
    let mut spec = pod("sleep 0.2; exit 0");
    spec.restart_policy = RestartPolicy::Always as i32;
    rt.apply(&assignment(&always, 1, spec)).await;

    let o = wait_for(&rt, &never, "failed", is(ObservedState::Failed)).await;
    assert_eq!(o.exit_code, Some(4));
    assert_eq!(o.reason, "container exited 4", "no restarts: {o:?}");
    // Exit 0 under `always` is restarted, and keeps being restarted.
    let o = wait_for(&rt, &always, "restarted twice", |o| {
        restarts(&o.reason) >= 2
    })
    .await;
    assert_ne!(o.state, ObservedState::Stopped as i32, "{o:?}");
    assert_ne!(o.state, ObservedState::Failed as i32, "{o:?}");
}

/// The restart count a reason mentions ("… (restarted 2 times)", "… restarting (restart 2)").
fn restarts(reason: &str) -> u32 {
    ["restarted ", "(restart "]
        .iter()
        .filter_map(|k| reason.split_once(k))
        .filter_map(|(_, rest)| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_the_control_plane_could_not_open_fail_the_pod_instead_of_running_it() {
    let f = Fixture::new();
    let rt = f.runtime().await;
    let id = f.id(1);
    let mut spec = pod("sleep 30");
    spec.env_sealed = [("HF_TOKEN".to_owned(), "c2VhbGVk".to_owned())].into();
    let o = rt.apply(&assignment(&id, 1, spec)).await;
    let o = if o.state == ObservedState::Failed as i32 {
        o
    } else {
        wait_for(&rt, &id, "failed", is(ObservedState::Failed)).await
    };
    assert!(
        o.reason.contains("HF_TOKEN could not be delivered"),
        "{o:?}"
    );
    assert_eq!(
        container_id(&rt, &id).await,
        None,
        "never started without its secrets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_shipped_in_order_with_its_stream_and_a_death_wakes_the_report() {
    let f = Fixture::new();
    let rt = f.runtime().await;
    rt.spawn_event_watch();
    let changes = rt.changes();
    let mut lines = rt.log_lines().expect("one consumer");
    assert!(rt.log_lines().is_none(), "only one consumer");
    let id = f.id(1);
    let o = rt
        .apply(&assignment(
            &id,
            1,
            pod("echo out-1; echo err-1 >&2; echo \"$GREETING\"; sleep 1; exit 7"),
        ))
        .await;
    assert!(o.runtime_ms > 0, "Docker time is measured: {o:?}");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < 3 {
        let line = tokio::time::timeout_at(deadline, lines.recv())
            .await
            .expect("three lines within 30 s")
            .expect("channel open");
        assert_eq!(line.assignment_id, id);
        got.push((line.source, line.text));
    }
    let stdout: Vec<&str> = got
        .iter()
        .filter(|(s, _)| *s == LogSource::Stdout as i32)
        .map(|(_, t)| t.as_str())
        .collect();
    assert_eq!(
        stdout,
        ["out-1", "hello-kiln"],
        "stdout in order, env visible inside"
    );
    assert!(
        got.contains(&(LogSource::Stderr as i32, "err-1".to_owned())),
        "{got:?}"
    );
    // The container's exit (Docker's `die` event) wakes the agent's report without a timer:
    // every wake-up is followed by an observation, until one sees it failed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::timeout_at(deadline, changes.notified())
            .await
            .expect("woken by container events within 30 s");
        let o = rt
            .observe_all()
            .await
            .into_iter()
            .find(|o| o.assignment_id == id)
            .expect("observed");
        if o.state == ObservedState::Failed as i32 {
            assert_eq!(o.exit_code, Some(7));
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_is_reported_as_such() {
    let f = Fixture::new();
    let rt = f.runtime().await;
    let id = f.id(1);
    let mut spec = pod(&format!(
        "x=$({BUSYBOX} head -c 300000000 /dev/zero | {BUSYBOX} tr '\\0' a); echo survived"
    ));
    spec.memory_mib = 16;
    rt.apply(&assignment(&id, 1, spec)).await;
    let o = wait_for(&rt, &id, "failed", is(ObservedState::Failed)).await;
    assert!(
        o.reason.starts_with("container exited 137: out of memory"),
        "{o:?}"
    );
    assert_eq!(o.exit_code, Some(137));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_is_not_here_and_cannot_be_pulled_fails_clearly() {
    let f = Fixture::new();
    let rt = f.runtime().await;
    let id = f.id(1);
    let image = format!("kiln-test/absent-{}:1", f.tag);
    let mut spec = pod("true");
    spec.image = image.clone();
    rt.apply(&assignment(&id, 1, spec)).await;
    let o = wait_for(&rt, &id, "failed", is(ObservedState::Failed)).await;
    let prefix = format!("image {image} not found locally and cannot be pulled: ");
    assert!(
        o.reason.starts_with(&prefix) && o.reason.len() > prefix.len(),
        "{o:?}"
    );
    assert_eq!(container_id(&rt, &id).await, None);
    // Reconcile does not retry a failed pull of the same generation in a loop.
    rt.reconcile().await;
    let o = wait_for(&rt, &id, "still failed", is(ObservedState::Failed)).await;
    assert!(o.reason.starts_with(&prefix));
}

/// The container's address on its (only) network.
async fn container_ip(rt: &DockerRuntime, id: &str) -> String {
    let c = rt
        .docker()
        .inspect_container(
            &rt.settings().container_name(id),
            None::<InspectContainerOptions>,
        )
        .await
        .unwrap();
    let networks = c.network_settings.unwrap().networks.unwrap();
    assert_eq!(networks.len(), 1, "{networks:?}");
    networks
        .values()
        .next()
        .unwrap()
        .ip_address
        .clone()
        .unwrap()
}

/// Pods carry their org (`PodSpec.org_id`); each org gets its own bridge network, and a pod
/// reaches a pod of its own org but not another org's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_different_orgs_cannot_reach_each_other() {
    let f = Fixture::new();
    let rt = f.runtime().await;
    let server = format!(
        "{BUSYBOX} mkdir -p /www && echo ok > /www/ok && exec {BUSYBOX} httpd -f -p 8000 -h /www"
    );
    let of = |org: &str, command: &str| PodSpec {
        org_id: org.into(),
        ..pod(command)
    };
    let (a1, b1) = (f.id(1), f.id(2));
    rt.apply(&assignment(&a1, 1, of("org_a", &server))).await;
    rt.apply(&assignment(&b1, 1, of("org_b", &server))).await;
    wait_for(&rt, &a1, "running", is(ObservedState::Running)).await;
    wait_for(&rt, &b1, "running", is(ObservedState::Running)).await;
    let (ip_a, ip_b) = (container_ip(&rt, &a1).await, container_ip(&rt, &b1).await);
    // busybox's nc, not its wget: the static wget crashes without NSS files in a scratch image.
    let get = |ip: &str| {
        format!(
            "printf 'GET /ok HTTP/1.0\\r\\n\\r\\n' | {BUSYBOX} nc -w 2 {ip} 8000 | \
             {BUSYBOX} grep -q '200 OK'"
        )
    };
    let probe = format!(
        "{} || exit 10; {} && exit 11; exit 0",
        get(&ip_a),
        get(&ip_b)
    );
    let client = f.id(3);
    rt.apply(&assignment(&client, 1, of("org_a", &probe))).await;
    let o = wait_for(&rt, &client, "done", |o| {
        o.state == ObservedState::Stopped as i32 || o.state == ObservedState::Failed as i32
    })
    .await;
    assert_eq!(
        o.exit_code,
        Some(0),
        "10: own org's pod unreachable, 11: the other org's pod was reachable; {o:?}"
    );
}

/// A registry of one image on a loopback port (Docker treats 127.0.0.0/8 registries as
/// insecure-allowed by default): the schema-2 manifest, config and layer of a local image,
/// taken from `docker save`. Layers' last 64 KiB wait for `release`, so a test can see the
/// pull in progress without racing it; `manifest_gets` counts manifest requests.
struct TinyRegistry {
    addr: std::net::SocketAddr,
    release: tokio::sync::watch::Sender<bool>,
    manifest_gets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn tiny_registry(image: &str) -> TinyRegistry {
    use axum::body::Body;
    use axum::http::{HeaderMap, StatusCode, header};
    use futures::StreamExt;
    use sha2::{Digest, Sha256};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("image.tar");
    let out = docker(&["save", "-o", &tar.to_string_lossy(), image]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unpacked = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(unpacked.status.success());
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    let config = std::fs::read(dir.path().join(saved[0]["Config"].as_str().unwrap())).unwrap();
    let layers: Vec<Vec<u8>> = saved[0]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| std::fs::read(dir.path().join(l.as_str().unwrap())).unwrap())
        .collect();
    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": config.len(),
            "digest": digest(&config),
        },
        // Uncompressed layers under the gzip type: Docker detects the compression itself.
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": l.len(),
            "digest": digest(l),
        })).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes();
    let manifest_digest = digest(&manifest);
    let mut blobs: std::collections::HashMap<String, (Vec<u8>, bool)> =
        std::collections::HashMap::new();
    blobs.insert(digest(&config), (config, false));
    for l in layers {
        blobs.insert(digest(&l), (l, true));
    }
    let blobs = Arc::new(blobs);
    let (release, released) = tokio::sync::watch::channel(false);
    let manifest_gets = Arc::new(AtomicUsize::new(0));

    let (rel, gets) = (released, manifest_gets.clone());
    let app = axum::Router::new()
        .route(
            "/v2/",
            axum::routing::get(|| async {
                ([("docker-distribution-api-version", "registry/2.0")], "{}")
            }),
        )
        .route(
            "/v2/{*rest}",
            axum::routing::get(
                move |axum::extract::Path(rest): axum::extract::Path<String>,
                      method: axum::http::Method| {
                    let (blobs, manifest, manifest_digest, rel, gets) = (
                        blobs.clone(),
                        manifest.clone(),
                        manifest_digest.clone(),
                        rel.clone(),
                        gets.clone(),
                    );
                    async move {
                        let mut headers = HeaderMap::new();
                        if rest.contains("/manifests/") {
                            gets.fetch_add(1, Ordering::SeqCst);
                            headers.insert(
                                header::CONTENT_TYPE,
                                "application/vnd.docker.distribution.manifest.v2+json"
                                    .parse()
                                    .unwrap(),
                            );
                            headers
                                .insert("docker-content-digest", manifest_digest.parse().unwrap());
                            return (StatusCode::OK, headers, Body::from(manifest));
                        }
                        let Some((_, d)) = rest.rsplit_once("/blobs/") else {
                            return (StatusCode::NOT_FOUND, headers, Body::empty());
                        };
                        let Some((bytes, gated)) = blobs.get(d).cloned() else {
                            return (StatusCode::NOT_FOUND, headers, Body::empty());
                        };
                        headers.insert(header::CONTENT_LENGTH, bytes.len().into());
                        headers.insert("docker-content-digest", d.parse().unwrap());
                        if method == axum::http::Method::HEAD {
                            return (StatusCode::OK, headers, Body::empty());
                        }
                        if !gated || bytes.len() <= 65536 {
                            return (StatusCode::OK, headers, Body::from(bytes));
                        }
                        let split = bytes.len() - 65536;
                        let (head, tail) = (bytes[..split].to_vec(), bytes[split..].to_vec());
                        let body = futures::stream::iter(vec![Ok::<_, std::io::Error>(head)])
                            .chain(futures::stream::once(async move {
                                let mut rel = rel;
                                let _ = rel.wait_for(|r| *r).await;
                                Ok(tail)
                            }));
                        (StatusCode::OK, headers, Body::from_stream(body))
                    }
                },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _keep = dir;
        axum::serve(listener, app).await.unwrap();
    });
    TinyRegistry {
        addr,
        release,
        manifest_gets,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_is_pulled_with_progress_and_only_when_absent() {
    let f = Fixture::new();
    // An image with a layer of its own (a shared layer would be "Already exists", not pulled),
    // saved for the registry and then removed here, so the agent must pull it.
    ensure_image();
    let source = format!("kiln-test/unique-{}:1", f.tag);
    let ctx = tempfile::tempdir().unwrap();
    let noise: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ f.tag.len() as u8)
        .collect();
    std::fs::write(ctx.path().join("noise"), noise).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {IMAGE}\nCOPY noise /noise\nLABEL kiln.test={}\n",
            f.tag
        ),
    )
    .unwrap();
    let built = docker(&["build", "-q", "-t", &source, &ctx.path().to_string_lossy()]);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let registry = tiny_registry(&source).await;
    assert!(docker(&["rmi", "-f", &source]).status.success());
    let image = format!("{}/kiln-test/pulled-{}:1", registry.addr, f.tag);
    struct Rmi(String);
    impl Drop for Rmi {
        fn drop(&mut self) {
            let _ = docker(&["rmi", "-f", &self.0]);
        }
    }
    let _rmi = Rmi(image.clone());
    let rt = f.runtime().await;
    let first = f.id(1);
    let mut spec = pod("sleep 300");
    spec.image = image.clone();
    rt.apply(&assignment(&first, 1, spec.clone())).await;
    // Held at the layer's last bytes: the pull is in progress, and says how far.
    let o = wait_for(&rt, &first, "pulling with a percentage", |o| {
        o.reason.starts_with("pulling image ") && o.reason.ends_with('%')
    })
    .await;
    assert_eq!(o.state, ObservedState::Starting as i32, "{o:?}");
    registry.release.send_replace(true);
    wait_for(&rt, &first, "running", is(ObservedState::Running)).await;
    let pulls = registry
        .manifest_gets
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(pulls >= 1);

    // A second pod of the same image starts without asking the registry again.
    let second = f.id(2);
    rt.apply(&assignment(&second, 1, spec)).await;
    wait_for(&rt, &second, "running", is(ObservedState::Running)).await;
    assert_eq!(
        registry
            .manifest_gets
            .load(std::sync::atomic::Ordering::SeqCst),
        pulls,
        "present images are not pulled"
    );
}
