//! What `deploy/` and `docker-compose.yml` promise, checked against the code they deploy:
//!
//! * the Kubernetes manifests pass the Kubernetes API schemas (kubernetes-validate, strict, for
//!   the oldest and newest Kubernetes they are written for), and agree with the binaries: every
//!   environment variable they set is one the binary reads, every required one is set, listen
//!   addresses, container ports, probes and Services line up, and every probe answers 200 on the
//!   service itself, started here;
//! * `docker-compose config` accepts the compose file, whose services agree with the binaries
//!   the same way;
//! * the image's `prebuilt` stage builds (on a base made here from the host's libraries, since
//!   no image can be pulled), holds every binary, runs as a non-root user and serves `/readyz`
//!   with its default command;
//! * `systemd-analyze` finds nothing wrong with the agent's unit and scores it as hardened;
//! * the Grafana dashboard queries only metrics some service registers.
//!
//! The tools come from `scripts/ensure-packages.sh deploy` (which `make test` runs); a missing
//! one fails the test with that instruction rather than skipping it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use clap::{Args, FromArgMatches};
use serde_json::Value;
use sqlx::PgPool;

/// The Kubernetes versions the manifests are checked against: the oldest they are written for
/// (the preStop `sleep` action is on by default from 1.30) and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// The binaries in the image (deploy/Dockerfile copies exactly these).
const BINARIES: [&str; 6] = [
    "kiln-api",
    "kiln-scheduler",
    "kiln-billing",
    "kiln-gateway",
    "kiln-agent",
    "kiln",
];

/// Which listen address of each service serves the operator's routes (`/livez`, `/readyz`,
/// `/metrics`): the API and the gateway merge them into their main router, the scheduler and
/// billing have an ops listener of their own.
const OPS_LISTEN: [(&str, &str); 4] = [
    ("kiln-api", "KILN_API_LISTEN"),
    ("kiln-gateway", "KILN_GATEWAY_LISTEN"),
    ("kiln-scheduler", "KILN_SCHEDULER_OPS_LISTEN"),
    ("kiln-billing", "KILN_BILLING_OPS_LISTEN"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

fn k8s_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

/// Where `scripts/ensure-packages.sh deploy` puts its venv.
fn venv() -> PathBuf {
    let tools = match std::env::var_os("KILN_TOOLS_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache")
                });
            cache.join("kiln/tools")
        }
    };
    tools.join("venv")
}

fn venv_tool(name: &str) -> PathBuf {
    let path = venv().join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `scripts/ensure-packages.sh deploy` (make test does)",
        path.display()
    );
    path
}

fn system_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("{name} is not installed: run `scripts/ensure-packages.sh deploy` (make test does)")
    })
}

/// Runs `cmd`, panicking with its output when it fails.
fn run(cmd: &mut Command) -> Output {
    // (`output` gives the child an empty stdin unless the caller set one.)
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every YAML document of `path`, as JSON (parsed by the PyYAML the validator's venv has).
fn yaml_docs(path: &Path) -> Vec<Value> {
    const TO_JSON: &str = "import json, sys, yaml\n\
        json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None], sys.stdout)";
    let out = run(Command::new(venv_tool("python3"))
        .arg("-c")
        .arg(TO_JSON)
        .arg(path));
    serde_json::from_slice(&out.stdout).expect("the YAML converts to JSON")
}

fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .expect("deploy/kubernetes exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    files
}

fn is_example(path: &Path) -> bool {
    path.to_string_lossy().ends_with(".example.yaml")
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{pointer} is a string in {v}"))
}

fn items<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// One environment variable a binary reads.
#[derive(Debug, Clone)]
struct EnvVar {
    default: Option<String>,
    required: bool,
}

/// The environment variables `A`'s flags read, with their defaults.
fn clap_env<A: Args>() -> BTreeMap<String, EnvVar> {
    let cmd = A::augment_args(clap::Command::new("kiln"));
    cmd.get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_str()?.to_owned();
            let default = arg
                .get_default_values()
                .first()
                .map(|d| d.to_string_lossy().into_owned());
            Some((
                env,
                EnvVar {
                    default,
                    required: arg.is_required_set(),
                },
            ))
        })
        .collect()
}

/// Names in `env = "…"` and `env::var("…")` of a source file (for the agent, whose flags live
/// in its binary, not a library).
fn source_env(path: &Path) -> BTreeMap<String, EnvVar> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = BTreeMap::new();
    for marker in ["env = \"", "env::var(\""] {
        for (i, _) in text.match_indices(marker) {
            let rest = &text[i + marker.len()..];
            let name = &rest[..rest.find('"').unwrap()];
            out.insert(
                name.to_owned(),
                EnvVar {
                    default: None,
                    required: false,
                },
            );
        }
    }
    out
}

/// Every environment variable `binary` reads.
fn known_env(binary: &str) -> BTreeMap<String, EnvVar> {
    let mut vars = match binary {
        "kiln-api" => clap_env::<kiln_api::ApiConfig>(),
        "kiln-gateway" => clap_env::<kiln_gateway::GatewayConfig>(),
        "kiln-scheduler" => clap_env::<kiln_scheduler::SchedulerConfig>(),
        "kiln-billing" => clap_env::<kiln_billing::BillingConfig>(),
        "kiln-agent" => source_env(&root().join("agent/agent/src/main.rs")),
        other => panic!("no service binary is called {other}"),
    };
    // Read by the logging set-up of every binary: RUST_LOG by tracing's EnvFilter
    // (`try_from_default_env`), KILN_LOG_FORMAT by kiln_telemetry (and the agent's own copy).
    let telemetry = include_str!("../../services/telemetry/src/lib.rs");
    assert!(
        telemetry.contains("EnvFilter::try_from_default_env")
            && telemetry.contains("KILN_LOG_FORMAT"),
        "kiln-telemetry's logging set-up changed: update the variables here"
    );
    for name in ["RUST_LOG", "KILN_LOG_FORMAT"] {
        vars.entry(name.to_owned()).or_insert(EnvVar {
            default: None,
            required: false,
        });
    }
    vars
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr} is host:port"))
}

fn ops_listen_var(binary: &str) -> &'static str {
    OPS_LISTEN
        .iter()
        .find(|(b, _)| *b == binary)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("{binary} serves no probes"))
}

/// Checks a set of environment variables given to `binary` (by a manifest or compose):
/// each is read by it, every required one is there, and every listen address binds all
/// interfaces on the port the binary uses by default. Returns the listen ports.
fn check_env(
    what: &str,
    binary: &str,
    env: &BTreeMap<String, Option<String>>,
) -> BTreeMap<String, u16> {
    let known = known_env(binary);
    for name in env.keys() {
        assert!(
            known.contains_key(name),
            "{what} sets {name}, which {binary} does not read (it reads {:?})",
            known.keys().collect::<Vec<_>>()
        );
    }
    for (name, var) in &known {
        if var.required && var.default.is_none() {
            assert!(
                env.contains_key(name),
                "{what} does not set {name}, which {binary} requires"
            );
        }
    }
    let mut ports = BTreeMap::new();
    for (name, value) in env {
        if !name.ends_with("_LISTEN") {
            continue;
        }
        let value = value
            .as_deref()
            .unwrap_or_else(|| panic!("{what}: {name} comes from a literal or a ConfigMap"));
        let (host, _) = value.rsplit_once(':').unwrap();
        assert_eq!(
            host, "0.0.0.0",
            "{what}: {name}={value} must listen on every interface to be reachable"
        );
        let default = known[name]
            .default
            .as_deref()
            .unwrap_or_else(|| panic!("{binary}'s {name} has a default"));
        assert_eq!(
            port_of(value),
            port_of(default),
            "{what}: {name}={value} uses another port than {binary}'s default ({default})"
        );
        ports.insert(name.clone(), port_of(value));
    }
    ports
}

/// The deployed objects, by kind and name.
struct Manifests {
    docs: Vec<Value>,
    config_maps: BTreeMap<String, BTreeMap<String, String>>,
    secret_keys: BTreeSet<String>,
}

impl Manifests {
    fn load() -> Self {
        let mut docs = Vec::new();
        let mut secret_keys = BTreeSet::new();
        for file in manifest_files() {
            for doc in yaml_docs(&file) {
                if is_example(&file) {
                    assert_eq!(
                        s(&doc, "/kind"),
                        "Secret",
                        "{} is the Secret",
                        file.display()
                    );
                    assert_eq!(s(&doc, "/metadata/name"), "kiln");
                    for key in doc["stringData"].as_object().unwrap().keys() {
                        secret_keys.insert(key.clone());
                    }
                } else {
                    docs.push(doc);
                }
            }
        }
        let config_maps = docs
            .iter()
            .filter(|d| d["kind"] == "ConfigMap")
            .map(|d| {
                let data = d["data"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect();
                (s(d, "/metadata/name").to_owned(), data)
            })
            .collect();
        Self {
            docs,
            config_maps,
            secret_keys,
        }
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.docs.iter().filter(move |d| d["kind"] == kind)
    }

    /// A container's environment: name → literal or ConfigMap value (`None` for a secret).
    fn container_env(&self, what: &str, c: &Value) -> BTreeMap<String, Option<String>> {
        let mut env = BTreeMap::new();
        for from in items(c, "/envFrom") {
            if let Some(name) = from.pointer("/configMapRef/name").and_then(Value::as_str) {
                let data = self
                    .config_maps
                    .get(name)
                    .unwrap_or_else(|| panic!("{what} uses ConfigMap {name}, which is not here"));
                for (k, v) in data {
                    env.insert(k.clone(), Some(v.clone()));
                }
            } else {
                panic!("{what}: envFrom only takes ConfigMaps here: {from}");
            }
        }
        for e in items(c, "/env") {
            let name = s(e, "/name").to_owned();
            let value = if let Some(v) = e.get("value") {
                Some(v.as_str().unwrap().to_owned())
            } else if let Some(r) = e.pointer("/valueFrom/secretKeyRef") {
                assert_eq!(s(r, "/name"), "kiln", "{what}: {name} from another Secret");
                let key = s(r, "/key");
                assert!(
                    self.secret_keys.contains(key),
                    "{what}: {name} comes from Secret key {key}, which secret.example.yaml lacks"
                );
                None
            } else if let Some(r) = e.pointer("/valueFrom/configMapKeyRef") {
                let map = &self.config_maps[s(r, "/name")];
                Some(map[s(r, "/key")].clone())
            } else {
                panic!("{what}: {name} has no value");
            };
            env.insert(name, value);
        }
        env
    }
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn binary_of(what: &str, c: &Value) -> String {
    let binary = s(c, "/command/0").to_owned();
    assert!(
        BINARIES.contains(&binary.as_str()),
        "{what} runs {binary}, which is not in the image"
    );
    binary
}

#[test]
fn kubernetes_manifests_pass_the_api_schemas() {
    let validator = venv_tool("kubernetes-validate");
    // The validator rejects what it must (an unknown field), so a pass below means something.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 80}], selectr: {}}\n",
    )
    .unwrap();
    let out = Command::new(&validator)
        .args(["--strict", "--quiet"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "kubernetes-validate accepted an unknown field: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    let files = manifest_files();
    assert!(files.len() >= 6, "{files:?}");
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&validator)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .args(&files)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "deploy/kubernetes does not validate against Kubernetes {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn kustomization_applies_every_manifest_but_the_secret_template() {
    let kustomization = &yaml_docs(&k8s_dir().join("kustomization.yaml"))[0];
    let listed: BTreeSet<String> = items(kustomization, "/resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> = manifest_files()
        .iter()
        .filter(|p| !is_example(p))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, present, "kustomization.yaml's resources");
    // Every workload uses the image kustomize rewrites.
    let images = items(kustomization, "/images");
    assert!(images.iter().any(|i| i["name"] == "kiln"), "{images:?}");
    let m = Manifests::load();
    for w in m.of_kind("Deployment").chain(m.of_kind("Job")) {
        for c in items(pod_spec(w), "/containers") {
            assert_eq!(s(c, "/image"), "kiln", "{}", s(w, "/metadata/name"));
        }
    }
}

#[test]
fn kubernetes_manifests_agree_with_the_services_config() {
    let m = Manifests::load();
    let deployments: Vec<&Value> = m.of_kind("Deployment").collect();
    let mut deployed = BTreeSet::new();
    for d in &deployments {
        let name = s(d, "/metadata/name");
        let spec = pod_spec(d);
        let labels = d["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .unwrap();
        for (k, v) in d["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(labels.get(k), Some(v), "{name}: selector matches its pods");
        }
        let sc = &spec["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{name} runs as non-root");
        let c = &items(spec, "/containers")[0];
        let what = format!("Deployment {name}");
        let binary = binary_of(&what, c);
        assert_eq!(name, binary, "Deployments are named after their binary");
        deployed.insert(binary.clone());
        let env = m.container_env(&what, c);
        let listen = check_env(&what, &binary, &env);
        let ports: BTreeMap<String, u16> = items(c, "/ports")
            .iter()
            .map(|p| {
                (
                    s(p, "/name").to_owned(),
                    u16::try_from(p["containerPort"].as_u64().unwrap()).unwrap(),
                )
            })
            .collect();
        for (var, port) in &listen {
            assert!(
                ports.values().any(|p| p == port),
                "{what}: {var} listens on {port}, which is not a container port ({ports:?})"
            );
        }
        let ops_port = listen
            .get(ops_listen_var(&binary))
            .unwrap_or_else(|| panic!("{what} sets {}", ops_listen_var(&binary)));
        for (probe, path) in [
            ("startupProbe", "/livez"),
            ("livenessProbe", "/livez"),
            ("readinessProbe", "/readyz"),
        ] {
            let p = &c[probe]["httpGet"];
            assert_eq!(p["path"], path, "{what}: {probe}");
            let port = match &p["port"] {
                Value::String(name) => *ports
                    .get(name)
                    .unwrap_or_else(|| panic!("{what}: {probe} names no container port")),
                n => u16::try_from(n.as_u64().unwrap()).unwrap(),
            };
            assert_eq!(port, *ops_port, "{what}: {probe} goes to the ops routes");
        }
        let annotations = &d["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(
            annotations["prometheus.io/port"],
            ops_port.to_string(),
            "{what}: Prometheus scrapes /metrics where it is served"
        );
        assert!(
            c.pointer("/resources/requests/cpu").is_some(),
            "{what}: a CPU request (HPAs scale on utilisation of it)"
        );
        // Every Deployment can lose a pod to a node drain without going dark.
        let pdb = m
            .of_kind("PodDisruptionBudget")
            .find(|p| p["spec"]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]);
        assert!(pdb.is_some(), "{what} has a PodDisruptionBudget");
    }
    let services: BTreeSet<&str> = OPS_LISTEN.iter().map(|(b, _)| *b).collect();
    assert_eq!(
        deployed,
        services.iter().map(|s| (*s).to_owned()).collect(),
        "one Deployment per service"
    );

    for svc in m.of_kind("Service") {
        let name = s(svc, "/metadata/name");
        let d = deployments
            .iter()
            .find(|d| {
                let labels = &d["spec"]["template"]["metadata"]["labels"];
                svc["spec"]["selector"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
            })
            .unwrap_or_else(|| panic!("Service {name} selects no Deployment's pods"));
        let c = &items(pod_spec(d), "/containers")[0];
        for p in items(svc, "/spec/ports") {
            let target = s(p, "/targetPort");
            assert!(
                items(c, "/ports").iter().any(|cp| cp["name"] == target),
                "Service {name}: targetPort {target} is not a port of {}",
                s(d, "/metadata/name")
            );
        }
    }
    for hpa in m.of_kind("HorizontalPodAutoscaler") {
        let target = s(hpa, "/spec/scaleTargetRef/name");
        assert!(
            deployments.iter().any(|d| d["metadata"]["name"] == target),
            "HPA {} scales {target}, which is not a Deployment",
            s(hpa, "/metadata/name")
        );
    }
    let scaled: BTreeSet<&str> = m
        .of_kind("HorizontalPodAutoscaler")
        .map(|h| s(h, "/spec/scaleTargetRef/name"))
        .collect();
    assert!(scaled.contains("kiln-api") && scaled.contains("kiln-gateway"));

    // The migrations Job runs `kiln-api migrate` with what kiln-api needs for it.
    let job = m.of_kind("Job").next().expect("a migrations Job");
    let c = &items(pod_spec(job), "/containers")[0];
    assert_eq!(c["command"], serde_json::json!(["kiln-api", "migrate"]));
    let env = m.container_env("Job kiln-migrate", c);
    check_env("Job kiln-migrate", "kiln-api", &env);
    assert!(env.contains_key("DATABASE_URL"));
}

/// Every probe path the Deployments use, answered by the service itself.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn every_probe_answers_200_on_the_running_service(pool: PgPool) {
    let m = Manifests::load();
    let mut probes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for d in m.of_kind("Deployment") {
        let c = &items(pod_spec(d), "/containers")[0];
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            probes
                .entry(s(c, "/command/0").to_owned())
                .or_default()
                .insert(s(c, &format!("/{probe}/httpGet/path")).to_owned());
        }
    }
    let store = kiln_store::Store::new(pool.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut base = BTreeMap::new();

    let api = kiln_testkit::TestApp::spawn(pool.clone()).await;
    base.insert("kiln-api", api.url.clone());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    base.insert(
        "kiln-gateway",
        format!("http://{}", listener.local_addr().unwrap()),
    );
    let gateway = kiln_gateway::app(kiln_gateway::GatewayState::new(store.clone()));
    tokio::spawn(async move { axum::serve(listener, gateway).await });

    let fleet = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    base.insert(
        "kiln-scheduler",
        format!("http://{}", ops.local_addr().unwrap()),
    );
    let config = kiln_scheduler::SchedulerConfig::from_arg_matches(
        &kiln_scheduler::SchedulerConfig::augment_args(clap::Command::new("kiln-scheduler"))
            .try_get_matches_from([
                "kiln-scheduler",
                "--database-url",
                "unused",
                "--redis-namespace",
                &format!("deploy-test-{}", rand_suffix()),
            ])
            .unwrap(),
    )
    .unwrap();
    let scheduler = kiln_scheduler::Scheduler {
        store: store.clone(),
        config,
        fleet_listener: fleet,
        ops_listener: ops,
    };
    let scheduler = tokio::spawn(scheduler.run(stopped(stop_rx.clone())));

    let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    base.insert(
        "kiln-billing",
        format!("http://{}", ops.local_addr().unwrap()),
    );
    let billing = kiln_billing::Billing {
        store: store.clone(),
        config: kiln_billing::BillingConfig::for_tests(String::new()),
        ops_listener: ops,
    };
    let billing = tokio::spawn(billing.run(stopped(stop_rx.clone())));

    let http = reqwest::Client::new();
    for (binary, paths) in &probes {
        let url = &base[binary.as_str()];
        for path in paths {
            let url = format!("{url}{path}");
            let http = http.clone();
            // The gateway is ready once its cache listener is connected, a moment after start.
            kiln_testkit::eventually(
                &format!("{binary} to answer {path} with 200"),
                Duration::from_secs(20),
                || {
                    let (http, url) = (http.clone(), url.clone());
                    async move {
                        let r = http.get(&url).send().await.ok()?;
                        (r.status() == 200).then_some(())
                    }
                },
            )
            .await;
        }
    }
    let _ = stop_tx.send(true);
    scheduler.await.unwrap().unwrap();
    billing.await.unwrap().unwrap();
    api.stop().await;
}

/// `docker-compose config`'s rendering of the compose file, as JSON.
fn compose_config(env: &[(&str, &str)], extra: &[&str]) -> Value {
    let mut cmd = Command::new(system_tool("docker-compose"));
    cmd.current_dir(root())
        .args([
            "--project-name",
            "kiln-deploy-test",
            "--file",
            "docker-compose.yml",
        ])
        .args(extra)
        .arg("config");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(&mut cmd);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("compose.yaml");
    std::fs::write(&file, &out.stdout).unwrap();
    yaml_docs(&file).remove(0)
}

#[test]
fn compose_file_is_valid_and_agrees_with_the_services() {
    // Without the secrets it asks for, compose refuses to start anything (and says which).
    let out = Command::new(system_tool("docker-compose"))
        .current_dir(root())
        .args(["--file", "docker-compose.yml", "config", "--quiet"])
        .env_remove("KILN_ADMIN_PASSWORD")
        .env_remove("KILN_SECRETS_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("KILN_"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let env = [
        ("KILN_ADMIN_PASSWORD", "compose-test-password"),
        (
            "KILN_SECRETS_KEY",
            "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=",
        ),
    ];
    let config = compose_config(&env, &["--profile", "agent"]);
    let services = config["services"].as_object().unwrap();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    for want in [
        "postgres",
        "redis",
        "migrate",
        "kiln-api",
        "kiln-scheduler",
        "kiln-billing",
        "kiln-gateway",
        "sim-agent",
    ] {
        assert!(names.contains(want), "compose has {want}: {names:?}");
    }
    let mut seen = BTreeSet::new();
    for (name, svc) in services {
        let Some(binary) = svc.pointer("/command/0").and_then(Value::as_str) else {
            continue;
        };
        if !binary.starts_with("kiln") {
            continue;
        }
        let what = format!("compose service {name}");
        let binary = binary_of(&what, svc);
        seen.insert(binary.clone());
        assert_eq!(svc["image"], "kiln:dev", "{what} runs the one image");
        let env: BTreeMap<String, Option<String>> = svc["environment"]
            .as_object()
            .map(|e| {
                e.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned)))
                    .collect()
            })
            .unwrap_or_default();
        let known = known_env(&binary);
        for k in env.keys() {
            assert!(
                known.contains_key(k),
                "{what} sets {k}, which {binary} does not read"
            );
        }
        if binary == "kiln-agent" {
            let inventory = svc["command"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .find(|a| a.starts_with("/usr/share/kiln/inventories/"))
                .expect("the simulated agent names an inventory in the image");
            let file = inventory.trim_start_matches("/usr/share/kiln/inventories/");
            assert!(
                root()
                    .join("agent/inventory/inventories")
                    .join(file)
                    .exists(),
                "{inventory} is copied from agent/inventory/inventories"
            );
            continue;
        }
        let listen = check_env(&what, &binary, &env);
        if name == "migrate" {
            continue;
        }
        // docker-compose renders them "127.0.0.1:8080:8080/tcp" (the container port last).
        let published: BTreeSet<u64> = items(svc, "/ports")
            .iter()
            .map(|p| match p {
                Value::String(p) => {
                    let p = p.split('/').next().unwrap();
                    p.rsplit(':').next().unwrap().parse().unwrap()
                }
                p => p["target"].as_u64().unwrap(),
            })
            .collect();
        let ops = ops_listen_var(&binary);
        assert!(
            published.contains(&u64::from(listen[ops])),
            "{what} publishes its {ops} port {} ({published:?})",
            listen[ops]
        );
        assert!(
            svc.pointer("/depends_on/migrate/condition")
                .is_some_and(|c| c == "service_completed_successfully"),
            "{what} starts after the migrations"
        );
    }
    assert!(
        seen.is_superset(
            &[
                "kiln-api",
                "kiln-scheduler",
                "kiln-billing",
                "kiln-gateway",
                "kiln-agent"
            ]
            .into_iter()
            .map(str::to_owned)
            .collect()
        ),
        "{seen:?}"
    );
    // The image compose builds is deploy/Dockerfile.
    let build = &services["migrate"]["build"];
    assert!(
        build["dockerfile"]
            .as_str()
            .unwrap()
            .ends_with("deploy/Dockerfile"),
        "{build}"
    );
}

#[test]
fn agent_unit_verifies_and_stays_hardened() {
    let analyze = system_tool("systemd-analyze");
    let unit = std::fs::read_to_string(root().join("deploy/systemd/kiln-agent.service")).unwrap();
    // A root with the unit, its ExecStart and the system's units (for its dependencies).
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(r.join("usr/local/bin")).unwrap();
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    std::fs::write(r.join("etc/systemd/system/kiln-agent.service"), &unit).unwrap();
    let exec = r.join("usr/local/bin/kiln-agent");
    std::fs::write(&exec, "#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exec, std::fs::Permissions::from_mode(0o755)).unwrap();
    run(Command::new("cp")
        .arg("-r")
        .arg("/usr/lib/systemd/system")
        .arg(r.join("usr/lib/systemd/")));

    let out = run(Command::new(&analyze)
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .arg("kiln-agent.service"));
    // verify exits 0 on unknown keys and bad values (it only warns): any output is a finding.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.trim().is_empty(), "systemd-analyze verify:\n{said}");

    let out = run(Command::new(&analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--root={}", r.display()))
        .arg("kiln-agent.service"));
    let report = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for kiln-agent.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    // 9.6 is an unhardened root service; the unit scores 5.8 (it must keep root, /sys writes,
    // KVM/VFIO/NVIDIA devices and no syscall filter for QEMU). A rise means a protection went.
    assert!(exposure <= 5.8, "exposure {exposure}:\n{report}");

    let setting = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
    };
    // An agent restart (an upgrade) must not kill the VMs it re-adopts.
    assert_eq!(setting("KillMode").as_deref(), Some("process"));
    // VFIO pins guest memory.
    assert_eq!(setting("LimitMEMLOCK").as_deref(), Some("infinity"));
    // The flags it starts with are the agent's.
    let exec_start = setting("ExecStart").unwrap();
    let agent_env = source_env(&root().join("agent/agent/src/main.rs"));
    assert!(
        agent_env.contains_key("KILN_AGENT_CONFIG"),
        "--config exists"
    );
    assert!(exec_start.contains("--config /etc/kiln/agent.toml"));
}

/// `counter!("…")`, `gauge!("…")` and `histogram!("…")` in the non-test sources of services/
/// and agent/: name → macro.
fn registered_metrics() -> BTreeMap<String, &'static str> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "tests" && n != "target") {
                    walk(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join("services"), &mut files);
    walk(&root().join("agent"), &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for kind in ["counter", "gauge", "histogram"] {
            let marker = format!("{kind}!(");
            for (i, _) in text.match_indices(&marker) {
                let rest = text[i + marker.len()..].trim_start();
                if let Some(rest) = rest.strip_prefix('"') {
                    out.insert(rest[..rest.find('"').unwrap()].to_owned(), kind);
                }
            }
        }
    }
    out
}

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn grafana_dashboard_queries_only_metrics_the_services_register() {
    let registered = registered_metrics();
    assert!(
        registered.get("kiln_http_requests_total") == Some(&"counter"),
        "the source scan finds the services' metrics: {registered:?}"
    );
    let path = root().join("deploy/grafana/kiln-control-plane.json");
    let dashboard: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 10, "{queries:?}");
    let mut used = BTreeSet::new();
    for q in &queries {
        for (i, _) in q.match_indices("kiln_") {
            if i > 0 && q.as_bytes()[i - 1].is_ascii_alphanumeric() {
                continue;
            }
            let name: String = q[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let (base, kind) = match registered.get(&name) {
                Some(kind) => (name.clone(), *kind),
                None => {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| name.strip_suffix(suffix))
                        .unwrap_or(&name);
                    let kind = registered.get(base).unwrap_or_else(|| {
                        panic!("the dashboard queries {name}, which no service registers: {q}")
                    });
                    assert_eq!(
                        *kind, "histogram",
                        "{name}: only histograms have _bucket/_sum/_count series"
                    );
                    (base.to_owned(), *kind)
                }
            };
            if q.contains("rate(") && !name.ends_with("_bucket") {
                assert_ne!(kind, "gauge", "rate() of the gauge {name}: {q}");
            }
            used.insert(base);
        }
    }
    // Each service shows up on the dashboard.
    for family in [
        "kiln_up",
        "kiln_http_",
        "kiln_gateway_",
        "kiln_scheduler_",
        "kiln_billing_",
    ] {
        assert!(
            used.iter().any(|m| m.starts_with(family)),
            "the dashboard shows {family}*: {used:?}"
        );
    }
}

// ---- the image ----

/// Where cargo put the workspace's binaries: next to this test's `deps/` directory.
fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run the tests with `cargo nextest run --workspace` (make test), which \
         builds every binary",
        path.display()
    );
    path
}

/// `docker rm -f` / `docker rmi` when the test ends, however it ends.
struct DockerCleanup(Vec<Vec<String>>);

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        for args in self.0.iter().rev() {
            let _ = Command::new("docker")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A base image like distroless/cc, made from this host's files: the shared libraries the
/// binaries link (from `ldd`), a passwd with `nonroot` (65532) and a /tmp. Imported with
/// `docker import`, since no image can be pulled here.
fn import_base(tag: &str, binaries: &[PathBuf], rootfs: &Path) {
    let mut libs = BTreeSet::new();
    for b in binaries {
        let out = run(Command::new("ldd").arg(b));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.insert(PathBuf::from(p));
            }
        }
    }
    assert!(
        libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
        "{libs:?}"
    );
    for lib in &libs {
        let dest = rootfs.join(lib.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(lib, &dest).unwrap();
    }
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    let tmp = rootfs.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["--numeric-owner", "--owner=0", "--group=0", "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stream = tar.stdout.take().unwrap();
    run(Command::new("docker")
        .args(["import", "-", tag])
        .stdin(stream));
    assert!(tar.wait().unwrap().success(), "tar of the base's rootfs");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn image_builds_from_the_dockerfile_and_serves_readyz(pool: PgPool) {
    system_tool("docker");
    let id = std::process::id();
    let nonce = format!("{id}-{}", rand_suffix());
    let base = format!("kiln-deploy-test/base:{nonce}");
    let image = format!("kiln-deploy-test/kiln:{nonce}");
    let container = format!("kiln-deploy-test-{nonce}");
    let mut cleanup = DockerCleanup(vec![vec!["rmi".into(), "-f".into(), base.clone()]]);

    // The build context mirrors the repository's layout with what the `prebuilt` stage takes.
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(ctx.join("deploy/bin")).unwrap();
    std::fs::copy(
        root().join("deploy/Dockerfile"),
        ctx.join("deploy/Dockerfile"),
    )
    .unwrap();
    std::fs::copy(root().join(".dockerignore"), ctx.join(".dockerignore")).unwrap();
    let inventories = ctx.join("agent/inventory/inventories");
    std::fs::create_dir_all(&inventories).unwrap();
    for e in std::fs::read_dir(root().join("agent/inventory/inventories")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, inventories.join(p.file_name().unwrap())).unwrap();
    }
    let mut copies = Vec::new();
    for name in BINARIES {
        let dest = ctx.join("deploy/bin").join(name);
        // Debug binaries carry hundreds of MB of debug info; the code is the same without.
        run(Command::new("objcopy")
            .arg("--strip-debug")
            .arg(built_binary(name))
            .arg(&dest));
        copies.push(dest);
    }
    import_base(&base, &copies, &dir.path().join("rootfs"));
    cleanup
        .0
        .push(vec!["rmi".into(), "-f".into(), image.clone()]);
    run(Command::new("docker")
        .args(["build", "--quiet", "--target", "prebuilt"])
        .arg("--build-arg")
        .arg(format!("BASE={base}"))
        .args(["-f", "deploy/Dockerfile", "-t", &image, "."])
        .current_dir(&ctx));

    let user =
        run(Command::new("docker").args(["image", "inspect", "-f", "{{.Config.User}}", &image]));
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "65532:65532");
    // Every binary is there and starts (its libraries resolve) as the image's user.
    for name in BINARIES {
        let out = run(Command::new("docker").args(["run", "--rm", &image, name, "--help"]));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{name} --help"
        );
    }

    // The default command serves the API, which is ready against a real database.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let database_url = kiln_testkit::database_url(&pool).await;
    cleanup
        .0
        .push(vec!["rm".into(), "-f".into(), container.clone()]);
    run(Command::new("docker")
        // As deploy/kubernetes runs it: read-only root, a /tmp, no capabilities.
        .args([
            "run",
            "-d",
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp",
        ])
        .args(["--name", &container])
        .args(["--cap-drop", "ALL", "--security-opt", "no-new-privileges"])
        .arg("-e")
        .arg(format!("DATABASE_URL={database_url}"))
        .arg("-e")
        .arg(format!("REDIS_URL={}", kiln_testkit::redis_url()))
        .arg("-e")
        .arg(format!("KILN_REDIS_NAMESPACE=deploy-test-{nonce}"))
        .arg("-e")
        .arg(format!("KILN_API_LISTEN=127.0.0.1:{port}"))
        .arg(&image));
    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{port}/readyz");
    kiln_testkit::eventually(
        "the API in the image to answer /readyz with 200",
        Duration::from_secs(60),
        || {
            let (http, ready, container) = (http.clone(), ready.clone(), container.clone());
            async move {
                if let Ok(r) = http.get(&ready).send().await
                    && r.status() == 200
                {
                    return Some(());
                }
                let state = Command::new("docker")
                    .args(["inspect", "-f", "{{.State.Running}}", &container])
                    .output()
                    .unwrap();
                assert_ne!(
                    String::from_utf8_lossy(&state.stdout).trim(),
                    "false",
                    "the container exited:\n{}",
                    container_logs(&container)
                );
                None
            }
        },
    )
    .await;
    let logs = container_logs(&container);
    assert!(
        logs.contains("\"kiln-api listening\""),
        "the image logs JSON lines by default: {logs}"
    );
}

fn container_logs(name: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", name])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn rand_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{nanos:x}")
}
