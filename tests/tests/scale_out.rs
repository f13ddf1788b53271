//! Scale-out, proven with real processes: two `kiln-api`, two `kiln-scheduler` and two
//! `kiln-gateway` over one PostgreSQL and one Redis, one `kiln-agent` (simulated 8× H100, this
//! machine's Docker) reaching the schedulers through a TCP forwarder (the load balancer).
//! Creates, deletes and inference calls go through both replicas of each; midway one replica of
//! each is SIGKILLed, and clients carry on with the other (a create that got no answer is sent
//! again with the same Idempotency-Key, as a client should). Then: no GPU is held twice (in the
//! database or among the running containers), every create is exactly one pod, every deleted
//! pod's container is gone and every other pod runs, each Idempotency-Key answers the same pod
//! on either API, and every answered inference call is metered exactly once.
//!
//! A second test stops a scheduler the way an orchestrator does (SIGTERM): the other takes over
//! the autoscaler's leadership and its agent, and it exits cleanly.
//!
//! The binaries are the workspace's own (`target/<profile>/kiln-*`, built by
//! `cargo nextest run --workspace`). Needs Docker and `scripts/build-images.sh`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;

const PODS: usize = 12;
const SECRETS_KEY: &str = "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=";

/// `target/<profile>/NAME`, next to this test's `deps/` directory.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace (`cargo nextest run --workspace`)",
        path.display()
    );
    path
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Every process the test started, SIGKILLed when it ends (passed or not).
#[derive(Default)]
struct Processes(Vec<(String, Child)>);

impl Processes {
    fn start(&mut self, name: &str, cmd: &mut Command, log: &std::path::Path) {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log.join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.0.push((name.to_owned(), child));
    }

    /// SIGKILL, as a crash or an OOM kill would.
    fn kill(&mut self, name: &str) {
        let (_, child) = self.0.iter_mut().find(|(n, _)| n == name).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, as Kubernetes or systemd stopping it would.
    fn terminate(&self, name: &str) {
        let (_, child) = self.0.iter().find(|(n, _)| n == name).unwrap();
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM {name}");
    }

    /// How it exited, once it has.
    fn exited(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        let (_, child) = self.0.iter_mut().find(|(n, _)| n == name).unwrap();
        child.try_wait().unwrap()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn until<T>(what: &str, within: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn healthy(http: &reqwest::Client, url: &str) {
    until(
        &format!("{url}/healthz"),
        Duration::from_secs(60),
        async || {
            let r = http.get(format!("{url}/healthz")).send().await.ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
}

/// The load balancer in front of the schedulers' node-control port: forwards every new
/// connection to the current upstream.
async fn forwarder(upstream: Arc<Mutex<SocketAddr>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let to = *upstream.lock().unwrap();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

/// Send `body` to `apis[first]`; when that API does not answer, to the other, with the same
/// Idempotency-Key. The answer's status and body.
async fn create_pod(
    http: &reqwest::Client,
    apis: &[String; 2],
    first: usize,
    (token, org): (&str, &str),
    key: &str,
    body: &Value,
) -> (StatusCode, Value, usize) {
    for i in [first, 1 - first] {
        let sent = http
            .post(format!("{}/v1/orgs/{org}/pods", apis[i]))
            .bearer_auth(token)
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await;
        if let Ok(r) = sent {
            let status = r.status();
            if let Ok(v) = r.json::<Value>().await {
                return (status, v, i);
            }
        }
    }
    panic!("neither API answered the create with key {key}");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn two_of_each_service_survive_losing_one_of_each_mid_run(pool: PgPool) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let built = Command::new(format!("{root}/scripts/build-images.sh"))
        .output()
        .expect("scripts/build-images.sh");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let image = String::from_utf8_lossy(&built.stdout).trim().to_owned();

    let db = kiln_testkit::database_url(&pool).await;
    let redis = kiln_testkit::redis_url();
    let namespace = format!("scale-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path();
    let mut procs = Processes::default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    let gateways = [free_addr(), free_addr()].map(|a| format!("http://{a}"));
    let apis = [free_addr(), free_addr()].map(|a| format!("http://{a}"));
    for (i, url) in apis.iter().enumerate() {
        procs.start(
            &format!("api-{i}"),
            Command::new(binary("kiln-api"))
                .arg("serve")
                .env("DATABASE_URL", &db)
                .env("REDIS_URL", &redis)
                .env("KILN_REDIS_NAMESPACE", &namespace)
                .env("KILN_API_LISTEN", url.trim_start_matches("http://"))
                .env("KILN_SECRETS_KEY", SECRETS_KEY)
                .env("KILN_GATEWAY_URL", &gateways[0])
                .env("KILN_SIGNUP_LIMIT_PER_IP", "1000")
                .env("RUST_LOG", "warn"),
            logs,
        );
    }
    let fleet = [free_addr(), free_addr()];
    let schedulers: Vec<String> = (0..2)
        .map(|i| {
            let ops = free_addr();
            procs.start(
                &format!("scheduler-{i}"),
                Command::new(binary("kiln-scheduler"))
                    .env("DATABASE_URL", &db)
                    .env("REDIS_URL", &redis)
                    .env("KILN_REDIS_NAMESPACE", &namespace)
                    .env("KILN_SECRETS_KEY", SECRETS_KEY)
                    .env("KILN_FLEET_LISTEN", fleet[i].to_string())
                    .env("KILN_SCHEDULER_OPS_LISTEN", ops.to_string())
                    .env("KILN_HEARTBEAT_INTERVAL_MS", "500")
                    .env("KILN_PLACEMENT_TICK_MS", "200")
                    .env("KILN_LIFECYCLE_TICK_MS", "200")
                    .env("KILN_AUTOSCALE_TICK_MS", "200")
                    .env("RUST_LOG", "warn"),
                logs,
            );
            format!("http://{ops}")
        })
        .collect();
    for (i, url) in gateways.iter().enumerate() {
        procs.start(
            &format!("gateway-{i}"),
            Command::new(binary("kiln-gateway"))
                .env("DATABASE_URL", &db)
                .env("REDIS_URL", &redis)
                .env("KILN_REDIS_NAMESPACE", &namespace)
                .env("KILN_GATEWAY_LISTEN", url.trim_start_matches("http://"))
                // The survivor claims what the killed one read but did not ingest, soon.
                .env("KILN_GATEWAY_USAGE_CLAIM_IDLE_SECS", "1")
                .env("RUST_LOG", "warn"),
            logs,
        );
    }
    for url in apis.iter().chain(&schedulers).chain(&gateways) {
        healthy(&http, url).await;
    }

    // The agent dials the schedulers through the forwarder.
    let upstream = Arc::new(Mutex::new(fleet[0]));
    let balancer = forwarder(upstream.clone()).await;
    let store = kiln_store::Store::new(pool.clone());
    let token = kiln_testkit::fleet::bootstrap_token(&store, Duration::from_secs(600)).await;
    let hostname = format!("scale-{}", std::process::id());
    procs.start(
        "agent",
        Command::new(binary("kiln-agent"))
            .args(["--control-plane", &format!("http://{balancer}")])
            .args([
                "--nvml",
                "disabled",
                "--docker",
                "auto",
                "--hostname",
                &hostname,
            ])
            .args([
                "--public-address",
                "127.0.0.1",
                "--metrics-interval-ms",
                "500",
            ])
            .arg("--state-dir")
            .arg(dir.path().join("agent"))
            .arg("--simulated-inventory")
            .arg(format!(
                "{root}/agent/inventory/inventories/h100-sxm-8x.toml"
            ))
            .env_remove("KILN_AGENT_CONFIG")
            .env("KILN_AGENT_BOOTSTRAP_TOKEN", &token)
            .env("RUST_LOG", "warn"),
        logs,
    );
    let node = until(
        "the node to register",
        Duration::from_secs(60),
        async || {
            let (id, registered): (uuid::Uuid, bool) = sqlx::query_as(
                "SELECT id, registered_at IS NOT NULL FROM nodes WHERE hostname = $1",
            )
            .bind(&hostname)
            .fetch_optional(&pool)
            .await
            .ok()??;
            registered.then(|| kiln_domain::NodeId::from_uuid(id).to_string())
        },
    )
    .await;

    // A tenant, signed up on one API, with an API key made on the other.
    let signup: Value = http
        .post(format!("{}/v1/auth/signup", apis[0]))
        .json(&json!({"email": "ada@example.com", "password": "ada-correct-horse-battery", "name": "Ada"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let org = signup["org"]["id"].as_str().unwrap().to_owned();
    let login: Value = http
        .post(format!("{}/v1/auth/login", apis[1]))
        .json(&json!({"email": "ada@example.com", "password": "ada-correct-horse-battery"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap().to_owned();
    let key: Value = http
        .post(format!("{}/v1/orgs/{org}/api-keys", apis[1]))
        .bearer_auth(&token)
        .json(&json!({"name": "caller", "role": "member"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api_key = key["key"].as_str().unwrap().to_owned();

    // An endpoint with one replica, called through both gateways.
    let ep: Value = http
        .post(format!("{}/v1/orgs/{org}/endpoints", apis[1]))
        .bearer_auth(&token)
        .json(&json!({"name": "llm", "image": image, "gpu": {"type": "h100-80gb", "count": 1},
                      "port": 8000, "health_path": "/health", "min_replicas": 1, "max_replicas": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ep_id = ep["id"].as_str().unwrap().to_owned();
    for g in &gateways {
        let url = format!("{g}/v1/endpoints/{ep_id}/v1/models");
        until(
            "the endpoint to answer",
            Duration::from_secs(90),
            async || {
                let r = http.get(&url).bearer_auth(&api_key).send().await.ok()?;
                (r.status() == StatusCode::OK).then_some(())
            },
        )
        .await;
    }

    // Callers: each alternates between the gateways until the first is gone, then uses the
    // second; counts the calls that were answered.
    let stop = Arc::new(AtomicBool::new(false));
    let gateway_down = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..2)
        .map(|c| {
            let (http, gateways, ep_id, api_key) = (
                http.clone(),
                gateways.clone(),
                ep_id.clone(),
                api_key.clone(),
            );
            let (stop, down, answered) = (stop.clone(), gateway_down.clone(), answered.clone());
            tokio::spawn(async move {
                let mut n = c;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let g = if down.load(Ordering::Relaxed) {
                        1
                    } else {
                        n % 2
                    };
                    let r = http
                        .post(format!(
                            "{}/v1/endpoints/{ep_id}/v1/completions",
                            gateways[g]
                        ))
                        .bearer_auth(&api_key)
                        .json(&json!({"prompt": "scale out"}))
                        .send()
                        .await;
                    if let Ok(r) = r
                        && r.status() == StatusCode::OK
                        && r.bytes().await.is_ok()
                    {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    // Creates through both APIs, half of them deleted again; one of each service is killed
    // after the first half.
    let pod_body = |i: usize| {
        // Small CPU, memory and disk: the simulated host has this machine's two cores and disk.
        json!({"name": format!("job-{i}"), "image": image, "gpu": {"type": "h100-80gb", "count": 1},
               "cpu": 0.1, "memory_gib": 1, "disk_gib": 1, "ports": [8000]})
    };
    let mut created: Vec<(String, String)> = Vec::new(); // (idempotency key, pod id)
    for i in 0..PODS {
        if i == PODS / 2 {
            procs.kill("api-0");
            procs.kill("scheduler-0");
            *upstream.lock().unwrap() = fleet[1];
            procs.kill("gateway-0");
            gateway_down.store(true, Ordering::Relaxed);
        }
        let key = format!("create-job-{i}");
        let (status, pod, _) =
            create_pod(&http, &apis, i % 2, (&token, &org), &key, &pod_body(i)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{pod}");
        created.push((key, pod["id"].as_str().unwrap().to_owned()));
    }
    // Every other pod is deleted, through whichever API is alive.
    for (_, id) in created.iter().step_by(2) {
        let r = http
            .delete(format!("{}/v1/orgs/{org}/pods/{id}", apis[1]))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }

    // The survivors settle: the kept pods all run (placed by the surviving scheduler, started
    // by the agent that reconnected through the balancer), the deleted ones' containers go.
    let kept: Vec<&String> = created
        .iter()
        .skip(1)
        .step_by(2)
        .map(|(_, id)| id)
        .collect();
    let last = Mutex::new(String::new());
    let settle = tokio::time::timeout(Duration::from_secs(120), async {
        until(
            "every kept pod running and every deleted pod's container gone",
            Duration::from_secs(150),
            async || {
                let rows: Vec<(String, String)> =
                    sqlx::query_as("SELECT state, state_reason FROM workloads WHERE kind = 'pod'")
                        .fetch_all(&pool)
                        .await
                        .ok()?;
                let running = rows.iter().filter(|(s, _)| s == "running").count();
                let containers = running_containers(&node).len();
                *last.lock().unwrap() = format!("pods {rows:?}, {containers} containers");
                (running == kept.len() && containers == kept.len() + 1).then_some(())
            },
        )
        .await
    })
    .await;
    if settle.is_err() {
        let mut logs_of = String::new();
        for name in ["scheduler-1", "agent", "api-1"] {
            let text =
                std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            logs_of.push_str(&format!(
                "\n--- {name}:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        panic!("the pods did not settle: {}{logs_of}", last.lock().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }

    // Exactly one pod per create, whoever answered and however often it was sent; each key
    // answers the same pod on the surviving API.
    let (pods,): (i64,) = sqlx::query_as("SELECT count(*) FROM workloads WHERE kind = 'pod'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pods as usize, PODS, "one pod per create");
    for (i, (key, id)) in created.iter().enumerate() {
        let (status, again, by) =
            create_pod(&http, &apis, 1, (&token, &org), key, &pod_body(i)).await;
        assert_eq!(by, 1);
        assert!(status.is_success(), "{again}");
        assert_eq!(again["id"], id.as_str(), "the replay of {key}");
    }

    // No GPU held twice: not in the database, not among the running containers.
    let (doubled,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM (SELECT gpu_uuid FROM gpu_allocations GROUP BY gpu_uuid
                               HAVING count(DISTINCT workload_id) > 1) d",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(doubled, 0);
    let devices = running_containers(&node);
    let mut distinct = devices.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        devices.len(),
        "a GPU in two containers: {devices:?}"
    );

    // Every answered call metered once (the gateway killed mid-run included).
    let answered = answered.load(Ordering::Relaxed) as i64;
    assert!(answered > 0);
    let metered = async || -> i64 {
        sqlx::query_as::<_, (i64,)>(
            "SELECT count(*) FROM usage_events WHERE status = 200 AND prompt_tokens IS NOT NULL",
        )
        .fetch_one(&pool)
        .await
        .map(|(n,)| n)
        .unwrap_or(-1)
    };
    until(
        "every answered call ingested",
        Duration::from_secs(30),
        async || (metered().await >= answered).then_some(()),
    )
    .await;
    assert_eq!(metered().await, answered, "no call counted twice");

    // What operators watch, from the survivors: the scheduler's queue and placement latency and
    // the GPUs' samples, the gateway's traffic per endpoint, the API's per-route latency.
    let scrape = async |url: &str| -> String {
        http.get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let gpu_sample = format!("kiln_gpu_utilization_ratio{{node=\"{node}\"");
    until(
        "the node's GPU samples on the scheduler",
        Duration::from_secs(20),
        async || {
            scrape(&schedulers[1])
                .await
                .contains(&gpu_sample)
                .then_some(())
        },
    )
    .await;
    let scheduler = scrape(&schedulers[1]).await;
    for name in [
        "kiln_scheduler_pending_workloads",
        "kiln_scheduler_pass_seconds_bucket",
        "kiln_scheduler_placement_wait_seconds_bucket",
        "kiln_gpu_memory_used_bytes",
        "kiln_gpu_temperature_celsius",
    ] {
        assert!(
            scheduler.contains(name),
            "{name} missing from the scheduler's /metrics"
        );
    }
    let gateway = scrape(&gateways[1]).await;
    let calls = format!("kiln_gateway_calls_total{{endpoint=\"{ep_id}\",status=\"200\"}}");
    assert!(
        gateway.contains(&calls),
        "{calls} missing from the gateway's /metrics"
    );
    assert!(gateway.contains("kiln_gateway_call_duration_seconds_bucket{endpoint="));
    let api = scrape(&apis[1]).await;
    assert!(
        api.contains("kiln_http_request_duration_seconds_bucket{")
            && api.contains("/v1/orgs/{org}/pods"),
        "per-route latency on the API"
    );

    // Clean up: the endpoint and the kept pods, and their containers.
    let r = http
        .delete(format!("{}/v1/orgs/{org}/endpoints/{ep_id}", apis[1]))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    for id in &kept {
        http.delete(format!("{}/v1/orgs/{org}/pods/{id}", apis[1]))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
    }
    until(
        "the node's containers to go",
        Duration::from_secs(60),
        async || running_containers(&node).is_empty().then_some(()),
    )
    .await;
    let _ = Command::new("docker")
        .args(["network", "rm", &format!("kiln-org-{org}")])
        .output();
}

/// The `NVIDIA_VISIBLE_DEVICES` of each running container of `node`.
fn running_containers(node: &str) -> Vec<String> {
    let ids = Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label=kiln.node={node}")])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&ids.stdout)
        .lines()
        .map(|id| {
            let env = Command::new("docker")
                .args([
                    "inspect",
                    "-f",
                    "{{range .Config.Env}}{{println .}}{{end}}",
                    id,
                ])
                .output()
                .expect("docker inspect");
            String::from_utf8_lossy(&env.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("NVIDIA_VISIBLE_DEVICES="))
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// Two schedulers over one database and an agent behind the load balancer, connected to the
/// one that leads the autoscaler. SIGTERM to that one: the server ends the agent's streams
/// itself (the agent is told it is shutting down, rather than losing the connection when the
/// process dies), the agent registers again through the balancer with the other, which also
/// takes the autoscaler's lock; the terminated one exits 0 without running into its grace
/// period.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_terminated_scheduler_hands_over_its_agents_and_the_autoscaler(pool: PgPool) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let db = kiln_testkit::database_url(&pool).await;
    let namespace = format!("shutdown-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path();
    let log_of = |name: &str| std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap();
    let mut procs = Processes::default();
    let http = reqwest::Client::new();

    let fleet = [free_addr(), free_addr()];
    for (i, fleet) in fleet.iter().enumerate() {
        let ops = free_addr();
        procs.start(
            &format!("scheduler-{i}"),
            Command::new(binary("kiln-scheduler"))
                .env("DATABASE_URL", &db)
                .env("REDIS_URL", kiln_testkit::redis_url())
                .env("KILN_REDIS_NAMESPACE", &namespace)
                .env("KILN_FLEET_LISTEN", fleet.to_string())
                .env("KILN_SCHEDULER_OPS_LISTEN", ops.to_string())
                .env("KILN_HEARTBEAT_INTERVAL_MS", "500")
                .env("KILN_AUTOSCALE_TICK_MS", "200")
                // Long enough that exiting before it means nothing held the process open.
                .env("KILN_SHUTDOWN_GRACE_SECS", "600")
                .env("RUST_LOG", "warn,kiln_scheduler=info"),
            logs,
        );
        healthy(&http, &format!("http://{ops}")).await;
    }
    const LEADS: &str = "this scheduler now runs the endpoint autoscaler";
    let leader = until(
        "one scheduler to lead",
        Duration::from_secs(30),
        async || (0..2).find(|i| log_of(&format!("scheduler-{i}")).contains(LEADS)),
    )
    .await;
    let other = 1 - leader;
    assert!(
        !log_of(&format!("scheduler-{other}")).contains(LEADS),
        "one leader"
    );

    // The agent reaches the leader through the balancer.
    let upstream = Arc::new(Mutex::new(fleet[leader]));
    let balancer = forwarder(upstream.clone()).await;
    let store = kiln_store::Store::new(pool.clone());
    let token = kiln_testkit::fleet::bootstrap_token(&store, Duration::from_secs(600)).await;
    let hostname = format!("shutdown-{}", std::process::id());
    procs.start(
        "agent",
        Command::new(binary("kiln-agent"))
            .args(["--control-plane", &format!("http://{balancer}")])
            .args(["--nvml", "disabled", "--docker", "disabled"])
            .args(["--hostname", &hostname, "--metrics-interval-ms", "300"])
            .arg("--state-dir")
            .arg(dir.path().join("agent"))
            .arg("--simulated-inventory")
            .arg(format!("{root}/agent/inventory/inventories/l40s-2x.toml"))
            .env_remove("KILN_AGENT_CONFIG")
            .env("KILN_AGENT_BOOTSTRAP_TOKEN", &token)
            .env("RUST_LOG", "warn,kiln_agent=info"),
        logs,
    );
    const REGISTERED: &str = "registered with the control plane";
    until(
        "the agent to register",
        Duration::from_secs(60),
        async || log_of("agent").contains(REGISTERED).then_some(()),
    )
    .await;

    // The orchestrator stops the leader and takes it out of the balancer.
    procs.terminate(&format!("scheduler-{leader}"));
    *upstream.lock().unwrap() = fleet[other];

    let status = until(
        "the terminated scheduler to exit",
        Duration::from_secs(60),
        async || procs.exited(&format!("scheduler-{leader}")),
    )
    .await;
    assert!(status.success(), "{status}");
    let stopped = log_of(&format!("scheduler-{leader}"));
    assert!(!stopped.contains("grace period"), "{stopped}");
    until(
        "the other scheduler to lead the autoscaler",
        Duration::from_secs(30),
        async || {
            log_of(&format!("scheduler-{other}"))
                .contains(LEADS)
                .then_some(())
        },
    )
    .await;
    // The agent was told, and came back through the balancer to the survivor, which keeps
    // the node alive.
    let agent_log = until(
        "the agent to register again",
        Duration::from_secs(30),
        async || {
            let log = log_of("agent");
            (log.matches(REGISTERED).count() >= 2).then_some(log)
        },
    )
    .await;
    assert!(
        agent_log.contains("shutting down; reconnect"),
        "the server ended the streams: {agent_log}"
    );
    let (since,): (time::OffsetDateTime,) = sqlx::query_as("SELECT now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    until(
        "a heartbeat through the survivor",
        Duration::from_secs(30),
        async || {
            let (at, state): (Option<time::OffsetDateTime>, String) = sqlx::query_as(
                "SELECT last_heartbeat_at, liveness::text FROM nodes WHERE hostname = $1",
            )
            .bind(&hostname)
            .fetch_one(&pool)
            .await
            .ok()?;
            (at? > since && state == "online").then_some(())
        },
    )
    .await;
}
