//! The real `kiln` binary against a real kiln-api (in-process, own database per test).
//!
//! Needs DATABASE_URL and REDIS_URL (as `make test` sets them).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use kiln_testkit::TestApp;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// One person's `kiln`: its own config directory, pointed at one server.
struct Kiln {
    home: tempfile::TempDir,
    url: String,
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "kiln failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

impl Kiln {
    fn new(app: &TestApp) -> Self {
        Self {
            home: tempfile::tempdir().unwrap(),
            url: app.url.clone(),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.home
            .path()
            .join("config")
            .join("kiln")
            .join("config.toml")
    }

    fn config(&self) -> toml::Table {
        std::fs::read_to_string(self.config_path())
            .unwrap()
            .parse()
            .unwrap()
    }

    fn write_config(&self, t: &toml::Table) {
        std::fs::write(self.config_path(), toml::to_string(t).unwrap()).unwrap();
    }

    async fn run(&self, args: &[&str]) -> Run {
        self.run_with(args, None, &[]).await
    }

    /// Run `kiln args…` with `stdin` and extra environment; the server keeps serving meanwhile.
    async fn run_with(&self, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Run {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(args)
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("KILN_API_URL", &self.url)
            .env_remove("KILN_API_KEY")
            .env_remove("KILN_ORG")
            .env_remove("KILN_PASSWORD")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn kiln");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(input.as_bytes()).await.unwrap();
            drop(pipe);
        }
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("kiln {args:?} did not finish in 60 s"))
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn login(&self, email: &str, password: &str) -> Run {
        self.run_with(
            &["login", "--email", email, "--password-stdin"],
            Some(&format!("{password}\n")),
            &[],
        )
        .await
    }
}

/// A list answer's entries: `{items: [...]}`, or a bare array (`/v1/gpu-types`).
fn items(v: &Value) -> &Vec<Value> {
    v.as_array()
        .or_else(|| v["items"].as_array())
        .expect("a list answer has items")
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_new_user_signs_in_and_manages_orgs_keys_and_members(pool: sqlx::PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let bob = app.user("bob").await;
    let kiln = Kiln::new(&app);

    let out = kiln.login(&ada.email, &ada.password).await.ok();
    assert!(
        out.stdout.contains("Signed in") && out.stdout.contains(&ada.email),
        "{out:?}"
    );

    // The session is saved privately.
    let path = kiln.config_path();
    assert!(path.is_file(), "config at {}", path.display());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "config mode is {mode:o}");
    }
    let cfg = kiln.config();
    assert_eq!(cfg["api_url"].as_str(), Some(app.url.as_str()));
    assert_eq!(
        cfg["org"].as_str(),
        Some(ada.org_id.as_str()),
        "the personal org is the default"
    );
    assert!(cfg["refresh_token"].as_str().is_some_and(|t| !t.is_empty()));

    // The personal org is listed.
    let orgs = kiln.run(&["orgs", "--output", "json"]).await.ok().json();
    let personal = items(&orgs)
        .iter()
        .find(|o| o["id"] == ada.org_id.as_str())
        .expect("personal org listed");
    assert_eq!(personal["personal"], true);
    assert_eq!(personal["role"], "owner");
    // …and in the table, marked as the default.
    let table = kiln.run(&["orgs"]).await.ok().stdout;
    assert!(table.contains("ID") && table.contains("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with('*') && l.contains(&ada.org_id)),
        "{table}"
    );

    // A new org.
    let created = kiln
        .run(&["orgs", "create", "Research Lab", "--output", "json"])
        .await
        .ok()
        .json();
    let lab = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["name"], "Research Lab");
    let orgs = kiln.run(&["orgs", "list", "-o", "json"]).await.ok().json();
    assert_eq!(items(&orgs).len(), 2);

    // An API key in the new org: the secret is printed once, the list shows its prefix only.
    let out = kiln
        .run(&["--org", &lab, "api-keys", "create", "ci"])
        .await
        .ok();
    let secret = out
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("kiln_"))
        .unwrap_or_else(|| panic!("no secret in {out:?}"))
        .to_owned();
    assert!(
        out.stdout.to_lowercase().contains("only this once"),
        "{}",
        out.stdout
    );
    let list = kiln
        .run(&["--org", &lab, "api-keys", "list"])
        .await
        .ok()
        .stdout;
    let listed = kiln
        .run(&["--org", &lab, "api-keys", "list", "-o", "json"])
        .await
        .ok()
        .json();
    let key = &items(&listed)[0];
    let prefix = key["prefix"].as_str().unwrap();
    assert!(secret.starts_with(prefix), "{secret} starts with {prefix}");
    assert!(list.contains(prefix) && list.contains("active"), "{list}");
    assert!(
        !list.contains(&secret) && !listed.to_string().contains(&secret),
        "the secret is never listed"
    );

    // The key works for scripts via KILN_API_KEY…
    let me = kiln
        .run_with(
            &["whoami", "-o", "json"],
            None,
            &[("KILN_API_KEY", &secret)],
        )
        .await
        .ok()
        .json();
    assert_eq!(me["api_key"]["org_id"], lab.as_str());
    // …until revoked.
    let key_id = key["id"].as_str().unwrap();
    kiln.run(&["--org", &lab, "api-keys", "revoke", key_id])
        .await
        .ok();
    let listed = kiln
        .run(&["--org", &lab, "api-keys", "list", "-o", "json"])
        .await
        .ok()
        .json();
    assert!(!items(&listed)[0]["revoked_at"].is_null());
    assert!(
        kiln.run(&["--org", &lab, "api-keys", "list"])
            .await
            .ok()
            .stdout
            .contains("revoked")
    );
    let out = kiln
        .run_with(&["whoami"], None, &[("KILN_API_KEY", &secret)])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("KILN_API_KEY"), "{}", out.stderr);

    // Members, in the org made the default.
    let out = kiln.run(&["orgs", "use", &lab]).await.ok();
    assert!(out.stdout.contains("Research Lab"), "{out:?}");
    assert_eq!(kiln.config()["org"].as_str(), Some(lab.as_str()));
    let out = kiln
        .run(&["members", "add", &bob.email, "--role", "admin"])
        .await
        .ok();
    assert!(out.stdout.contains(&bob.email), "{out:?}");
    let members = kiln.run(&["members", "--output", "json"]).await.ok().json();
    let row = items(&members)
        .iter()
        .find(|m| m["email"] == bob.email.as_str())
        .expect("bob is listed");
    assert_eq!(row["role"], "admin");
    assert_eq!(row["user_id"], bob.user_id.as_str());
    assert_eq!(items(&members).len(), 2);

    kiln.run(&["members", "set-role", &bob.user_id, "viewer"])
        .await
        .ok();
    let table = kiln.run(&["members"]).await.ok().stdout;
    assert!(
        table
            .lines()
            .any(|l| l.contains(&bob.email) && l.contains("viewer")),
        "{table}"
    );
    kiln.run(&["members", "remove", &bob.user_id]).await.ok();
    let members = kiln.run(&["members", "-o", "json"]).await.ok().json();
    assert_eq!(items(&members).len(), 1);

    // Sign out: the server session ends and the tokens are forgotten.
    let refresh = kiln.config()["refresh_token"].as_str().unwrap().to_owned();
    kiln.run(&["logout"]).await.ok();
    assert!(!kiln.config().contains_key("refresh_token"));
    let (status, _) = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh })),
        )
        .await;
    assert_eq!(status.as_u16(), 401, "the session was revoked");
    let out = kiln.run(&["orgs"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("kiln login"), "{}", out.stderr);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_expired_access_token_is_refreshed_transparently(pool: sqlx::PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let kiln = Kiln::new(&app);
    kiln.login(&ada.email, &ada.password).await.ok();

    // Expired by the clock: refreshed before the call.
    let mut cfg = kiln.config();
    let first_refresh = cfg["refresh_token"].as_str().unwrap().to_owned();
    cfg.insert("access_token".into(), "garbage".into());
    cfg.insert("access_expires_at".into(), "2000-01-01T00:00:00Z".into());
    kiln.write_config(&cfg);
    let orgs = kiln.run(&["orgs", "-o", "json"]).await.ok().json();
    assert_eq!(items(&orgs).len(), 1);
    let cfg = kiln.config();
    let second_refresh = cfg["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(
        second_refresh, first_refresh,
        "a new refresh token was saved"
    );
    assert_ne!(cfg["access_token"].as_str(), Some("garbage"));
    let expires = cfg["access_expires_at"].as_str().unwrap();
    assert!(expires > "2001", "new expiry saved: {expires}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(kiln.config_path())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }

    // Rejected by the server (401) although not expired by the clock: refreshed and retried once.
    let mut cfg = kiln.config();
    cfg.insert("access_token".into(), "garbage".into());
    kiln.write_config(&cfg);
    kiln.run(&["whoami"]).await.ok();
    let cfg = kiln.config();
    assert_ne!(cfg["refresh_token"].as_str(), Some(second_refresh.as_str()));
    assert_ne!(cfg["access_token"].as_str(), Some("garbage"));

    // When the session is over, the user is told to sign in again.
    let (status, _) = app
        .call(
            Method::POST,
            "/v1/auth/logout",
            None,
            Some(json!({ "refresh_token": cfg["refresh_token"].as_str().unwrap() })),
        )
        .await;
    assert!(status.is_success());
    let mut cfg = kiln.config();
    cfg.insert("access_token".into(), "garbage".into());
    kiln.write_config(&cfg);
    let out = kiln.run(&["orgs"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("kiln login"), "{}", out.stderr);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn mistakes_are_explained(pool: sqlx::PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let bob = app.user("bob").await;
    let kiln = Kiln::new(&app);

    // A wrong password.
    let out = kiln.login(&ada.email, "not-the-right-password").await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("email or password is wrong"),
        "{}",
        out.stderr
    );
    assert!(
        !kiln.config_path().exists() || !kiln.config().contains_key("refresh_token"),
        "nothing saved"
    );

    // Not signed in yet.
    let out = kiln.run(&["members"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("kiln login"), "{}", out.stderr);

    // A bad role is reported on its field.
    kiln.login(&ada.email, &ada.password).await.ok();
    let out = kiln
        .run(&["members", "add", &bob.email, "--role", "emperor"])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .lines()
            .any(|l| l.trim_start().starts_with("role:")),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "{}", out.stdout);

    // An org that is not yours.
    let out = kiln.run(&["--org", &bob.org_id, "members"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);

    // Usage errors exit 2.
    let out = kiln.run(&["members", "add"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = kiln.run(&["orgs", "--output", "yaml"]).await;
    assert_eq!(out.code, 2, "{out:?}");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn operators_mint_node_tokens_and_others_cannot(pool: sqlx::PgPool) {
    let app = TestApp::spawn(pool).await;
    // The deployment's operator, as `make up` creates it.
    let hash = app.state.hasher.hash("operator password 123").unwrap();
    let email = kiln_domain::Email::parse("email", "ops@example.com").unwrap();
    app.store()
        .user_ensure_operator(&email, &hash)
        .await
        .unwrap();
    let ops = Kiln::new(&app);
    ops.login("ops@example.com", "operator password 123")
        .await
        .ok();

    let minted = ops
        .run(&[
            "admin",
            "node-token",
            "--ttl-secs",
            "600",
            "--note",
            "gpu-host-7",
            "--output",
            "json",
        ])
        .await
        .ok();
    let token = minted.json()["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("kiln_nbt_"), "{token}");
    let table = ops.run(&["admin", "node-token"]).await.ok();
    assert!(
        table.stdout.contains("shown only this once"),
        "{}",
        table.stdout
    );
    let nodes = ops.run(&["admin", "nodes", "--output", "json"]).await.ok();
    assert_eq!(items(&nodes.json()).len(), 0, "no agent has joined yet");

    // A tenant sees no admin surface at all.
    app.user("tenant").await;
    let tenant = Kiln::new(&app);
    tenant
        .login("tenant@example.com", "tenant-correct-horse-battery")
        .await
        .ok();
    let refused = tenant.run(&["admin", "node-token"]).await;
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.to_lowercase().contains("not found"),
        "{}",
        refused.stderr
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn operators_inspect_nodes_and_cordon_them(pool: sqlx::PgPool) {
    let app = TestApp::spawn(pool).await;
    let hash = app.state.hasher.hash("operator password 123").unwrap();
    let email = kiln_domain::Email::parse("email", "ops@example.com").unwrap();
    app.store()
        .user_ensure_operator(&email, &hash)
        .await
        .unwrap();
    // A node that joined (its join is tested elsewhere) and registered one GPU.
    let node = kiln_domain::NodeId::new();
    sqlx::query(
        "INSERT INTO nodes (id, hostname, agent_version, credential_hash)
         VALUES ($1, 'gpu-07', '0.1.0', decode(md5(random()::text), 'hex'))",
    )
    .bind(node.as_uuid())
    .execute(app.store().pool())
    .await
    .unwrap();
    app.store()
        .node_register(
            node,
            &kiln_store::NodeRegistration {
                hostname: "gpu-07".into(),
                agent_version: "0.1.0".into(),
                protocol_minor: 0,
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
                cpu_cores: 32,
                memory_mib: 262_144,
                disk_gib: 500,
                gpus: vec![kiln_store::GpuRegistration {
                    uuid: "GPU-a100-0".into(),
                    index: 0,
                    model: "NVIDIA A100-SXM4-40GB".into(),
                    gpu_type: Some("a100-40gb".into()),
                    memory_mib: 40_960,
                    pci_bus_id: "00000000:07:00.0".into(),
                    numa_node: Some(0),
                    iommu_group: None,
                    mig_capable: true,
                    mig_enabled: false,
                    mig_instances: vec![],
                    nvlink_peers: vec![],
                }],
            },
        )
        .await
        .unwrap();
    app.store()
        .node_heartbeat(
            node,
            0,
            &[kiln_store::GpuHealthReport {
                uuid: "GPU-a100-0".into(),
                health: "unhealthy",
                reason: "XID 48: double-bit ECC error".into(),
            }],
        )
        .await
        .unwrap();
    let node = node.to_string();
    let ops = Kiln::new(&app);
    ops.login("ops@example.com", "operator password 123")
        .await
        .ok();

    // `kiln admin nodes` is still the list.
    for args in [&["admin", "nodes"][..], &["admin", "nodes", "list"]] {
        let out = ops.run(args).await.ok();
        assert!(out.stdout.contains("gpu-07"), "{}", out.stdout);
        assert!(out.stdout.contains("1 × a100-40gb"), "{}", out.stdout);
        assert!(out.stdout.contains("0/0/1"), "{}", out.stdout);
    }
    let shown = ops.run(&["admin", "nodes", "show", &node]).await.ok();
    assert!(shown.stdout.contains("GPU-a100-0"), "{}", shown.stdout);
    assert!(
        shown
            .stdout
            .contains("unhealthy (XID 48: double-bit ECC error)"),
        "{}",
        shown.stdout
    );
    let shown = ops
        .run(&["admin", "nodes", "show", &node, "--output", "json"])
        .await
        .ok();
    assert_eq!(shown.json()["gpus"][0]["health"], "unhealthy");

    let cordoned = ops.run(&["admin", "nodes", "cordon", &node]).await.ok();
    assert!(
        cordoned.stdout.contains("state cordoned"),
        "{}",
        cordoned.stdout
    );
    let drained = ops
        .run(&["admin", "nodes", "drain", &node, "--output", "json"])
        .await
        .ok();
    assert_eq!(drained.json()["state"], "draining");
    let back = ops.run(&["admin", "nodes", "uncordon", &node]).await.ok();
    assert!(back.stdout.contains("state ready"), "{}", back.stdout);

    let capacity = ops
        .run(&["admin", "capacity", "--output", "json"])
        .await
        .ok();
    assert_eq!(
        capacity.json()["items"],
        json!([{"gpu_type": "a100-40gb", "total": 1, "schedulable": 0, "unhealthy": 1}])
    );
    let table = ops.run(&["admin", "capacity"]).await.ok();
    assert!(table.stdout.contains("a100-40gb"), "{}", table.stdout);

    let missing = ops
        .run(&[
            "admin",
            "nodes",
            "cordon",
            "node_0190a0b0c0d0e0f00000000000000001",
        ])
        .await;
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.to_lowercase().contains("not found"),
        "{}",
        missing.stderr
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn anyone_signed_in_lists_gpu_types_with_what_is_free(pool: sqlx::PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    // A ready node with two L40S GPUs (no MIG), registered straight through the store.
    let node = kiln_domain::NodeId::new();
    sqlx::query(
        "INSERT INTO nodes (id, hostname, agent_version, credential_hash)
         VALUES ($1, 'gpu-l40s', '0.1.0', decode(md5(random()::text), 'hex'))",
    )
    .bind(node.as_uuid())
    .execute(app.store().pool())
    .await
    .unwrap();
    app.store()
        .node_register(
            node,
            &kiln_store::NodeRegistration {
                hostname: "gpu-l40s".into(),
                agent_version: "0.1.0".into(),
                protocol_minor: 0,
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
                cpu_cores: 32,
                memory_mib: 262_144,
                disk_gib: 500,
                gpus: (0..2)
                    .map(|i| kiln_store::GpuRegistration {
                        uuid: format!("GPU-l40s-{i}"),
                        index: i,
                        model: "NVIDIA L40S".into(),
                        gpu_type: Some("l40s-48gb".into()),
                        memory_mib: 46_068,
                        pci_bus_id: format!("00000000:0{i}:00.0"),
                        numa_node: Some(0),
                        iommu_group: None,
                        mig_capable: false,
                        mig_enabled: false,
                        mig_instances: vec![],
                        nvlink_peers: vec![],
                    })
                    .collect(),
            },
        )
        .await
        .unwrap();
    app.store().node_heartbeat(node, 0, &[]).await.unwrap();

    let kiln = Kiln::new(&app);
    kiln.login(&ada.email, &ada.password).await.ok();
    let list = kiln.run(&["gpu-types", "--output", "json"]).await.ok();
    let l40s = items(&list.json())
        .iter()
        .find(|t| t["id"] == "l40s-48gb")
        .cloned()
        .unwrap();
    assert_eq!(l40s["name"], "NVIDIA L40S 48GB");
    assert_eq!(l40s["mig_profiles"], json!([]));
    assert_eq!(l40s["available"]["whole"], 2);
    assert_eq!(l40s["available"]["total"], 2);
    let table = kiln.run(&["gpu-types"]).await.ok();
    assert!(
        table.stdout.contains("GPU TYPE") && table.stdout.contains("l40s-48gb"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("h100-80gb"), "{}", table.stdout);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn operators_set_list_and_remove_org_quotas(pool: sqlx::PgPool) {
    let app = TestApp::spawn(pool).await;
    let hash = app.state.hasher.hash("operator password 123").unwrap();
    let email = kiln_domain::Email::parse("email", "ops@example.com").unwrap();
    app.store()
        .user_ensure_operator(&email, &hash)
        .await
        .unwrap();
    let ops = Kiln::new(&app);
    ops.login("ops@example.com", "operator password 123")
        .await
        .ok();
    let tenant = app.user("tenant").await;
    let org = tenant.org_id.as_str();

    let empty = ops.run(&["admin", "quotas", "list", org]).await.ok();
    assert!(empty.stdout.contains("no quotas"), "{}", empty.stdout);

    let set = ops
        .run(&[
            "admin",
            "quotas",
            "set",
            org,
            "h100-80gb",
            "pod",
            "8",
            "--output",
            "json",
        ])
        .await
        .ok();
    assert_eq!(set.json()["max_gpus"], 8);
    let told = ops
        .run(&["admin", "quotas", "set", org, "a100-40gb", "instance", "2"])
        .await
        .ok();
    assert!(
        told.stdout
            .contains("at most 2 a100-40gb GPUs for instances"),
        "{}",
        told.stdout
    );

    let list = ops
        .run(&["admin", "quotas", "list", org, "--output", "json"])
        .await
        .ok();
    let got: Vec<(String, String, i64)> = items(&list.json())
        .iter()
        .map(|q| {
            (
                q["gpu_type"].as_str().unwrap().to_owned(),
                q["product"].as_str().unwrap().to_owned(),
                q["max_gpus"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a100-40gb".to_owned(), "instance".to_owned(), 2),
            ("h100-80gb".to_owned(), "pod".to_owned(), 8)
        ]
    );
    let table = ops.run(&["admin", "quotas", "list", org]).await.ok();
    assert!(
        table.stdout.contains("GPU TYPE")
            && table.stdout.contains("h100-80gb")
            && table.stdout.contains("instance"),
        "{}",
        table.stdout
    );

    // Bad input is explained per field.
    let bad = ops
        .run(&["admin", "quotas", "set", org, "h100-80gb", "vm", "8"])
        .await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("product"), "{}", bad.stderr);

    ops.run(&["admin", "quotas", "remove", org, "h100-80gb", "pod"])
        .await
        .ok();
    let list = ops
        .run(&["admin", "quotas", "list", org, "--output", "json"])
        .await
        .ok();
    assert_eq!(items(&list.json()).len(), 1);
    let again = ops
        .run(&["admin", "quotas", "remove", org, "h100-80gb", "pod"])
        .await;
    assert_eq!(again.code, 1);
    assert!(
        again.stderr.to_lowercase().contains("not found"),
        "{}",
        again.stderr
    );

    // The org's own owner cannot see the admin surface.
    let kiln = Kiln::new(&app);
    kiln.login(&tenant.email, &tenant.password).await.ok();
    let refused = kiln.run(&["admin", "quotas", "list", org]).await;
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.to_lowercase().contains("not found"),
        "{}",
        refused.stderr
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn pods_are_created_listed_shown_and_deleted(pool: sqlx::PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let kiln = Kiln::new(&app);
    kiln.login(&ada.email, &ada.password).await.ok();

    let created = kiln
        .run_with(
            &[
                "pods",
                "create",
                "llm",
                "--image",
                "vllm/vllm-openai:v0.6.3",
                "--gpu",
                "h100-80gb:2",
                "--cpu",
                "2.5",
                "--memory-gib",
                "16",
                "--env",
                "MODEL=llama",
                "--secret-env",
                "HF_TOKEN",
                "--port",
                "8000",
                "--spot",
                "--output",
                "json",
                "--",
                "--model",
                "meta-llama/Llama-3.1-8B",
            ],
            None,
            &[("HF_TOKEN", "hf_from_the_environment")],
        )
        .await
        .ok();
    let pod = created.json();
    let id = pod["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("pod_"), "{pod}");
    assert_eq!(pod["state"], "pending");
    assert_eq!(pod["gpu"], json!({"type": "h100-80gb", "count": 2}));
    assert_eq!(pod["cpu"], json!(2.5));
    assert_eq!(pod["spot"], true);
    assert_eq!(
        pod["command"],
        json!(["--model", "meta-llama/Llama-3.1-8B"])
    );
    assert_eq!(
        pod["env"],
        json!({"MODEL": "llama", "HF_TOKEN": {"secret": true}})
    );
    assert!(!created.stdout.contains("hf_from_the_environment"));

    let mig = kiln
        .run(&[
            "pods",
            "create",
            "nb",
            "--image",
            "jupyter/base-notebook",
            "--gpu",
            "h100-80gb:mig=3g.40gb",
        ])
        .await
        .ok();
    assert!(mig.stdout.contains("Created pod nb"), "{}", mig.stdout);
    assert!(mig.stdout.contains("pending"), "{}", mig.stdout);

    let table = kiln.run(&["pods"]).await.ok();
    assert!(table.stdout.contains("2 × h100-80gb"), "{}", table.stdout);
    assert!(
        table.stdout.contains("h100-80gb mig 3g.40gb"),
        "{}",
        table.stdout
    );
    let list = kiln.run(&["pods", "list", "-o", "json"]).await.ok();
    assert_eq!(items(&list.json()).len(), 2);

    let shown = kiln.run(&["pods", "get", &id]).await.ok();
    assert!(
        shown.stdout.contains("HF_TOKEN=<secret>"),
        "{}",
        shown.stdout
    );
    assert!(
        shown.stdout.contains("8000 (not bound yet)"),
        "{}",
        shown.stdout
    );
    assert!(!shown.stdout.contains("hf_from_the_environment"));

    // The server's validation reaches the person intact.
    let bad = kiln
        .run(&[
            "pods",
            "create",
            "x",
            "--image",
            "app",
            "--gpu",
            "b300-9000gb:1",
        ])
        .await;
    assert_ne!(bad.code, 0);
    assert!(
        bad.stderr.contains("unknown GPU type `b300-9000gb`"),
        "{}",
        bad.stderr
    );
    let bad = kiln
        .run(&[
            "pods",
            "create",
            "x",
            "--image",
            "app",
            "--gpu",
            "h100-80gb:two",
        ])
        .await;
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("TYPE[:COUNT]"), "{}", bad.stderr);

    let deleted = kiln.run(&["pods", "delete", &id]).await.ok();
    assert!(deleted.stdout.contains("terminated"), "{}", deleted.stdout);
    let got = kiln.run(&["pods", "get", &id, "-o", "json"]).await.ok();
    assert_eq!(got.json()["state"], "terminated");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn pod_logs_show_recent_lines_and_follow_until_the_pod_ends(pool: sqlx::PgPool) {
    use tokio::io::AsyncBufReadExt;
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let kiln = Kiln::new(&app);
    kiln.login(&ada.email, &ada.password).await.ok();
    let created = kiln
        .run(&[
            "pods",
            "create",
            "talker",
            "--image",
            "kiln/demo-model:1",
            "--restart",
            "never",
            "-o",
            "json",
        ])
        .await
        .ok();
    let pod = created.json();
    assert_eq!(pod["restart_policy"], "never");
    let id = pod["id"].as_str().unwrap().to_owned();

    // What an agent pushes through the fleet service lands in this store.
    let logs =
        kiln_logs::LogStore::connect(&kiln_testkit::redis_url(), &app.config().redis_namespace)
            .await
            .unwrap();
    let uuid = id.parse::<kiln_domain::PodId>().unwrap().as_uuid();
    let push = |text: &'static str, source: kiln_logs::Source| {
        let logs = logs.clone();
        async move {
            logs.append(
                uuid,
                &[kiln_logs::NewLine {
                    source,
                    text,
                    at_unix_ms: 1,
                }],
            )
            .await
            .unwrap();
        }
    };
    push("one", kiln_logs::Source::Stdout).await;
    push("two", kiln_logs::Source::Stdout).await;
    push("oops", kiln_logs::Source::Stderr).await;

    let recent = kiln.run(&["pods", "logs", &id, "--tail", "2"]).await.ok();
    assert_eq!(recent.stdout, "two\noops\n");

    // Following: the backlog, then a line pushed while it waits; it ends with the pod.
    let mut follow = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["pods", "logs", "-f", &id])
        .env("HOME", kiln.home.path())
        .env("XDG_CONFIG_HOME", kiln.home.path().join("config"))
        .env("KILN_API_URL", &kiln.url)
        .env_remove("KILN_API_KEY")
        .env_remove("KILN_ORG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(20), out.next_line())
            .await
            .expect("a line within 20 s")
            .unwrap()
    };
    assert_eq!(next().await.as_deref(), Some("one"));
    assert_eq!(next().await.as_deref(), Some("two"));
    push("live line", kiln_logs::Source::Stdout).await;
    assert_eq!(next().await.as_deref(), Some("live line"));
    kiln.run(&["pods", "delete", &id]).await.ok();
    assert_eq!(next().await, None, "the stream ends with the pod");
    let status = tokio::time::timeout(Duration::from_secs(20), follow.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut follow.stderr.take().unwrap(), &mut err)
        .await
        .unwrap();
    assert!(err.contains("oops"), "stderr lines go to stderr: {err}");

    let bad = kiln.run(&["pods", "logs", &id, "--tail", "9999"]).await;
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("tail"), "{}", bad.stderr);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn instances_are_created_from_a_key_file_reached_over_ssh_and_powered(pool: sqlx::PgPool) {
    use kiln_testkit::instances::{SSH_KEY, catalog_image, report_running};
    let app = TestApp::spawn(pool).await;
    catalog_image(app.store(), "kiln-tiny").await;
    let ada = app.user("ada").await;
    let kiln = Kiln::new(&app);
    kiln.login(&ada.email, &ada.password).await.ok();

    let images = kiln.run(&["images"]).await.ok();
    assert!(images.stdout.contains("kiln-tiny"), "{}", images.stdout);
    assert!(images.stdout.contains("root"), "{}", images.stdout);

    let key_file = kiln.home.path().join("id_ed25519.pub");
    std::fs::write(&key_file, format!("{SSH_KEY}\n")).unwrap();
    let key_file = key_file.to_str().unwrap();
    let created = kiln
        .run(&[
            "instances",
            "create",
            "--name",
            "trainer",
            "--gpu-type",
            "h100-80gb",
            "--gpus",
            "2",
            "--image",
            "kiln-tiny",
            "--ssh-key-file",
            key_file,
            "--disk-gib",
            "40",
            "-o",
            "json",
        ])
        .await
        .ok();
    let ins = created.json();
    let id = ins["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ins_"), "{ins}");
    assert_eq!(ins["state"], "pending");
    assert_eq!(ins["gpu_count"], 2);
    assert_eq!(ins["disk_gib"], 40);
    assert_eq!(ins["ssh_public_keys"], json!([SSH_KEY]));

    // Before it has a node there is nothing to log in to, and the CLI says why.
    let early = kiln.run(&["instances", "ssh", "trainer"]).await;
    assert_eq!(early.code, 1, "{early:?}");
    assert!(
        early.stderr.contains("has no SSH address yet") && early.stderr.contains("pending"),
        "{}",
        early.stderr
    );

    // Placed, and its node's agent reports port 22 forwarded: the command to log in.
    let node = kiln_testkit::fleet::registered_node(app.store(), "gpu-a", 4, false).await;
    kiln_scheduler::Placer::new(app.store().clone())
        .pass()
        .await
        .unwrap();
    report_running(app.store(), node, 40022).await;
    let ssh = kiln.run(&["instances", "ssh", "trainer"]).await.ok();
    assert_eq!(ssh.stdout, "ssh -p 40022 root@gpu-a\n");
    let by_id = kiln
        .run(&["instances", "ssh", &id, "-o", "json"])
        .await
        .ok();
    assert_eq!(
        by_id.json(),
        json!({"host": "gpu-a", "port": 40022, "user": "root", "command": "ssh -p 40022 root@gpu-a"})
    );

    let table = kiln.run(&["instances"]).await.ok();
    assert!(table.stdout.contains("2 × h100-80gb"), "{}", table.stdout);
    assert!(table.stdout.contains("running"), "{}", table.stdout);
    let shown = kiln.run(&["instances", "get", "trainer"]).await.ok();
    assert!(shown.stdout.contains(&node.to_string()), "{}", shown.stdout);
    assert!(
        shown.stdout.contains("ssh -p 40022 root@gpu-a"),
        "{}",
        shown.stdout
    );

    // The serial console, as the agent pushes it.
    let logs =
        kiln_logs::LogStore::connect(&kiln_testkit::redis_url(), &app.config().redis_namespace)
            .await
            .unwrap();
    let uuid = id.parse::<kiln_domain::InstanceId>().unwrap().as_uuid();
    let lines: Vec<kiln_logs::NewLine<'_>> = ["Booting Linux", "trainer login:"]
        .iter()
        .map(|text| kiln_logs::NewLine {
            source: kiln_logs::Source::Stdout,
            text,
            at_unix_ms: 1,
        })
        .collect();
    logs.append(uuid, &lines).await.unwrap();
    let console = kiln
        .run(&["instances", "console", "trainer", "--tail", "1"])
        .await
        .ok();
    assert_eq!(console.stdout, "trainer login:\n");

    let rebooted = kiln.run(&["instances", "reboot", "trainer"]).await.ok();
    assert!(rebooted.stdout.contains("Rebooting"), "{}", rebooted.stdout);
    let stopped = kiln
        .run(&["instances", "stop", "trainer", "-o", "json"])
        .await
        .ok();
    assert_eq!(stopped.json()["state"], "stopping");
    assert_eq!(stopped.json()["gpus"], json!([]));
    let started = kiln
        .run(&["instances", "start", &id, "-o", "json"])
        .await
        .ok();
    assert_eq!(started.json()["state"], "starting");
    assert_eq!(started.json()["gpus"].as_array().unwrap().len(), 2);
    let deleted = kiln.run(&["instances", "delete", "trainer"]).await.ok();
    assert!(deleted.stdout.contains("terminated"), "{}", deleted.stdout);
    let got = kiln
        .run(&["instances", "get", "trainer", "-o", "json"])
        .await
        .ok();
    assert_eq!(got.json()["state"], "terminated", "a name finds the newest");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn bad_instance_input_is_explained_and_creates_nothing(pool: sqlx::PgPool) {
    use kiln_testkit::instances::{SSH_KEY, catalog_image};
    let app = TestApp::spawn(pool).await;
    catalog_image(app.store(), "kiln-tiny").await;
    let ada = app.user("ada").await;
    let kiln = Kiln::new(&app);
    kiln.login(&ada.email, &ada.password).await.ok();
    let base = [
        "instances",
        "create",
        "--name",
        "x",
        "--gpu-type",
        "h100-80gb",
        "--image",
        "kiln-tiny",
    ];

    // A private key is refused before anything is sent.
    let private = kiln.home.path().join("id_ed25519");
    std::fs::write(
        &private,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    let mut args = base.to_vec();
    args.extend(["--ssh-key-file", private.to_str().unwrap()]);
    let bad = kiln.run(&args).await;
    assert_eq!(bad.code, 1);
    assert!(
        bad.stderr.contains("that is a private key") && bad.stderr.contains("id_ed25519.pub"),
        "{}",
        bad.stderr
    );
    assert!(!bad.stderr.contains("b3BlbnNzaC1rZXktdjEAAAAA"));

    // No key at all.
    let bad = kiln.run(&base).await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("no SSH key"), "{}", bad.stderr);

    // The server's validation, field by field.
    let mut args = base.to_vec();
    args.extend(["--gpus", "9", "--ssh-key", "ssh-ed25519 nonsense"]);
    args[7] = "no-such-image";
    let bad = kiln.run(&args).await;
    assert_eq!(bad.code, 1);
    for want in [
        "gpu_count: must be between 1 and 8",
        "image: unknown image `no-such-image`",
        "ssh_public_keys[0]: is not an OpenSSH public key",
    ] {
        assert!(bad.stderr.contains(want), "{want}: {}", bad.stderr);
    }

    // An instance that does not exist, by name.
    let bad = kiln.run(&["instances", "ssh", "ghost"]).await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("no instance `ghost`"), "{}", bad.stderr);

    let list = kiln.run(&["instances", "-o", "json"]).await.ok();
    assert_eq!(items(&list.json()).len(), 0, "nothing was created");
    // And a good one still works after all that.
    let mut args = base.to_vec();
    args.extend(["--ssh-key", SSH_KEY]);
    let ok = kiln.run(&args).await.ok();
    assert!(ok.stdout.contains("Created instance x"), "{}", ok.stdout);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn endpoints_are_deployed_listed_shown_and_deleted(pool: sqlx::PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let kiln = Kiln::new(&app);
    kiln.login(&ada.email, &ada.password).await.ok();
    let created = kiln
        .run(&[
            "endpoints",
            "create",
            "llm",
            "--image",
            "kiln/demo-model:1",
            "--gpu",
            "h100-80gb:1",
            "--port",
            "8000",
            "--min-replicas",
            "0",
            "--max-replicas",
            "3",
            "--key-rps",
            "5",
            "--key-concurrency",
            "4",
            "-o",
            "json",
        ])
        .await
        .ok();
    let ep = created.json();
    let id = ep["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ep_"), "{ep}");
    assert_eq!(ep["limits"]["per_key"]["requests_per_second"], 5.0);
    assert_eq!(ep["limits"]["per_key"]["burst"], 10);
    assert_eq!(ep["limits"]["per_key"]["concurrent"], 4);
    assert_eq!(ep["state"], "idle", "min 0: no replica yet");
    assert!(
        ep["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/v1/endpoints/{id}"))
    );

    let table = kiln.run(&["endpoints"]).await.ok();
    assert!(table.stdout.contains("llm"), "{}", table.stdout);
    assert!(
        table.stdout.contains("0 running / 0 of 0..3"),
        "{}",
        table.stdout
    );
    let shown = kiln.run(&["endpoints", "get", &id]).await.ok();
    assert!(shown.stdout.contains("/v1/endpoints/"), "{}", shown.stdout);
    assert!(
        shown
            .stdout
            .contains("per key 5/s (burst 10), 4 in flight; total unlimited"),
        "{}",
        shown.stdout
    );

    let bad = kiln
        .run(&[
            "endpoints",
            "create",
            "x",
            "--image",
            "app",
            "--port",
            "70000",
        ])
        .await;
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("port"), "{}", bad.stderr);

    let deleted = kiln.run(&["endpoints", "delete", &id]).await.ok();
    assert!(
        deleted.stdout.contains("Deleted endpoint llm"),
        "{}",
        deleted.stdout
    );
    let list = kiln.run(&["endpoints", "-o", "json"]).await.ok();
    assert!(
        items(&list.json()).is_empty(),
        "deleted endpoints are not listed"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_endpoint_is_priced_granted_to_another_org_and_taken_back(pool: sqlx::PgPool) {
    let app = TestApp::spawn(pool).await;
    let (ada, bob) = (app.user("ada").await, app.user("bob").await);
    let (kiln, bobs) = (Kiln::new(&app), Kiln::new(&app));
    kiln.login(&ada.email, &ada.password).await.ok();
    bobs.login(&bob.email, &bob.password).await.ok();
    let ep = kiln
        .run(&[
            "endpoints",
            "create",
            "llm",
            "--image",
            "kiln/demo-model:1",
            "--port",
            "8000",
            "--min-replicas",
            "0",
            "--per-request-micros",
            "2000",
            "-o",
            "json",
        ])
        .await
        .ok()
        .json();
    assert_eq!(ep["price"]["per_request_micros"], 2000);
    let id = ep["id"].as_str().unwrap().to_owned();
    let granted = kiln
        .run(&["endpoints", "grant", &id, &bob.org_id])
        .await
        .ok();
    assert!(granted.stdout.contains("Granted"), "{}", granted.stdout);
    let grants = kiln.run(&["endpoints", "grants", &id]).await.ok();
    assert!(grants.stdout.contains(&bob.org_id), "{}", grants.stdout);
    // Bob sees what he may call and what it costs him.
    let his = bobs.run(&["endpoints", "granted"]).await.ok();
    assert!(his.stdout.contains(&id), "{}", his.stdout);
    assert!(his.stdout.contains("2000 µ$/call"), "{}", his.stdout);
    // Bob cannot grant himself anything of Ada's.
    let refused = bobs.run(&["endpoints", "grant", &id, &bob.org_id]).await;
    assert_ne!(refused.code, 0);
    // The price goes; the grant stays until revoked.
    let free = kiln.run(&["endpoints", "price", &id, "--free"]).await.ok();
    assert!(free.stdout.contains("none"), "{}", free.stdout);
    let none = kiln.run(&["endpoints", "price", &id]).await;
    assert_ne!(none.code, 0, "a price with no part is refused locally");
    kiln.run(&["endpoints", "revoke", &id, &bob.org_id])
        .await
        .ok();
    let his = bobs.run(&["endpoints", "granted", "-o", "json"]).await.ok();
    assert!(items(&his.json()).is_empty());
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn operators_credit_orgs_and_tenants_see_their_balance(pool: sqlx::PgPool) {
    let app = TestApp::spawn(pool).await;
    let hash = app.state.hasher.hash("operator password 123").unwrap();
    let email = kiln_domain::Email::parse("email", "ops@example.com").unwrap();
    app.store()
        .user_ensure_operator(&email, &hash)
        .await
        .unwrap();
    let ops = Kiln::new(&app);
    ops.login("ops@example.com", "operator password 123")
        .await
        .ok();
    let tenant_user = app.user("tenant").await;
    let org = tenant_user.org_id.clone();

    ops.run(&["admin", "credit", &org, "12.50", "--reference", "wire-1"])
        .await
        .ok();
    // The same reference again credits nothing more.
    ops.run(&["admin", "credit", &org, "12.50", "--reference", "wire-1"])
        .await
        .ok();
    let set = ops
        .run(&[
            "admin",
            "billing",
            &org,
            "--credit-limit",
            "5",
            "--budget",
            "40",
            "--output",
            "json",
        ])
        .await
        .ok();
    assert_eq!(set.json()["credit_limit"]["amount_micros"], 5_000_000);
    assert_eq!(set.json()["monthly_budget"]["amount_micros"], 40_000_000);
    let prices = ops.run(&["admin", "prices"]).await.ok();
    assert!(
        prices.stdout.contains("default catalog"),
        "{}",
        prices.stdout
    );

    let tenant = Kiln::new(&app);
    tenant
        .login("tenant@example.com", "tenant-correct-horse-battery")
        .await
        .ok();
    let balance = tenant
        .run(&["billing", "balance", "--output", "json"])
        .await
        .ok();
    assert_eq!(balance.json()["balance"]["amount_micros"], 12_500_000);
    assert_eq!(balance.json()["available"]["amount_micros"], 17_500_000);
    let table = tenant.run(&["billing"]).await.ok();
    assert!(table.stdout.contains("12.500000 USD"), "{}", table.stdout);
    let ledger = tenant.run(&["billing", "ledger"]).await.ok();
    assert!(ledger.stdout.contains("top_up"), "{}", ledger.stdout);
    // Tenants cannot credit themselves.
    let refused = tenant
        .run(&["admin", "credit", &org, "100", "--reference", "free-money"])
        .await;
    assert_eq!(refused.code, 1);
}
