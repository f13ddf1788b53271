use kiln_auth::{OpaqueSecret, SecretDigest};
use kiln_domain::{AssignmentId, NodeId};
use kiln_store::{
    AssignmentKind, AssignmentPut, GpuHealthReport, GpuRegistration, GpuSampleReport,
    MigInstanceRecord, NewNode, NodeRegistration, ObservedRecord,
};
use kiln_testkit::TestApp;
use kiln_testkit::serde_json::{Value, json};
use reqwest::{Method, StatusCode};
use sqlx::PgPool;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::{assert_problem, error_fields};

/// Join a node with `token` straight through the store (the gRPC side has its own tests).
async fn join(app: &TestApp, token: &str, hostname: &str) -> String {
    let mut tx = app.store().begin().await.unwrap();
    let node = app
        .store()
        .node_join(
            &mut tx,
            NewNode {
                token: &SecretDigest::of(token),
                hostname,
                agent_version: "0.1.0",
                credential: &OpaqueSecret::generate("kiln_ncr").digest(),
            },
        )
        .await
        .expect("join");
    tx.commit().await.unwrap();
    node.to_string()
}

async fn audited(app: &TestApp, action: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_events WHERE action = $1")
        .bind(action)
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    n
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_operator_issues_a_token_once_and_sees_the_node_it_admits(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;

    let (status, headers, created) = app
        .call_full(
            Method::POST,
            "/v1/admin/node-tokens",
            Some(&op),
            Some(json!({"note": "rack 4"})),
            &[("idempotency-key", "tok-1")],
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert!(headers.get("idempotent-replayed").is_none());
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("kiln_nbt_"), "{token}");
    assert!(created["id"].as_str().unwrap().starts_with("ntk_"));
    assert_eq!(created["note"], "rack 4");
    let expires = OffsetDateTime::parse(created["expires_at"].as_str().unwrap(), &Rfc3339).unwrap();
    let ttl = expires - OffsetDateTime::now_utc();
    assert!(
        ttl.whole_seconds() > 3500 && ttl.whole_seconds() <= 3600,
        "default ttl is an hour: {ttl}"
    );

    // A retry with the same key replays the answer instead of issuing a second token.
    let (status, headers, again) = app
        .call_full(
            Method::POST,
            "/v1/admin/node-tokens",
            Some(&op),
            Some(json!({"note": "rack 4"})),
            &[("idempotency-key", "tok-1")],
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(again, created);
    let (tokens,): (i64,) = sqlx::query_as("SELECT count(*) FROM node_bootstrap_tokens")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(tokens, 1);
    assert_eq!(audited(&app, "node_token.create").await, 1);

    // The longest allowed lifetime is seven days.
    let (status, body) = app
        .post("/v1/admin/node-tokens", &op, json!({"ttl_secs": 604_800}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // The node the token admits is listed, without any secret.
    let (status, list) = app.get("/v1/admin/nodes", &op).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["items"], json!([]));
    let node = join(&app, &token, "gpu-01").await;
    let (status, list) = app.get("/v1/admin/nodes", &op).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let item = &list["items"][0];
    assert_eq!(item["id"], node.as_str());
    assert_eq!(item["hostname"], "gpu-01");
    assert_eq!(item["state"], "ready");
    assert_eq!(item["agent_version"], "0.1.0");
    assert!(item["joined_at"].is_string());
    assert_eq!(item["last_heartbeat_at"], Value::Null);
    assert_eq!(item["credential_revoked_at"], Value::Null);
    assert!(!list.to_string().contains("kiln_ncr_"));

    assert_eq!(item["admin_state"], "active");
    assert_eq!(item["liveness"], "online");
    assert_eq!(item["gpus"], json!([]));
    assert_eq!(item["gpu_summary"]["count"], 0);

    // The detail is the list item plus the node's newest GPU events.
    let (status, mut one) = app.get(&format!("/v1/admin/nodes/{node}"), &op).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    let events = one.as_object_mut().unwrap().remove("gpu_events").unwrap();
    assert_eq!(events, json!([]));
    assert_eq!(&one, item);

    // Revoking the credential shows on the node, and is audited; twice is harmless.
    for _ in 0..2 {
        let (status, revoked) = app
            .post(
                &format!("/v1/admin/nodes/{node}/revoke-credential"),
                &op,
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{revoked}");
        assert!(revoked["credential_revoked_at"].is_string(), "{revoked}");
    }
    assert_eq!(audited(&app, "node.credential_revoke").await, 2);

    // Unknown and malformed node ids are simply not found.
    for missing in [
        "node_0190a0b0c0d0e0f00000000000000001".to_owned(),
        "gpu-01".to_owned(),
    ] {
        let (status, body) = app.get(&format!("/v1/admin/nodes/{missing}"), &op).await;
        assert_problem(status, &body, StatusCode::NOT_FOUND);
        let (status, body) = app
            .post(
                &format!("/v1/admin/nodes/{missing}/revoke-credential"),
                &op,
                json!({}),
            )
            .await;
        assert_problem(status, &body, StatusCode::NOT_FOUND);
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn the_admin_surface_is_invisible_to_everyone_but_operators(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let (_, created) = app.post("/v1/admin/node-tokens", &op, json!({})).await;
    let node = join(&app, created["token"].as_str().unwrap(), "gpu-01").await;

    let ada = app.user("ada").await;
    let (_, owner_key) = app.api_key(&ada, &ada.org_id, "owner").await;
    let routes = [
        (
            Method::POST,
            "/v1/admin/node-tokens".to_owned(),
            Some(json!({})),
        ),
        // A body that would fail validation still gets 404: the route is not revealed.
        (
            Method::POST,
            "/v1/admin/node-tokens".to_owned(),
            Some(json!({"ttl_secs": 0})),
        ),
        (Method::GET, "/v1/admin/nodes".to_owned(), None),
        (Method::GET, format!("/v1/admin/nodes/{node}"), None),
        (
            Method::POST,
            format!("/v1/admin/nodes/{node}/revoke-credential"),
            Some(json!({})),
        ),
        (Method::POST, format!("/v1/admin/nodes/{node}/cordon"), None),
        (
            Method::POST,
            format!("/v1/admin/nodes/{node}/uncordon"),
            None,
        ),
        (Method::POST, format!("/v1/admin/nodes/{node}/drain"), None),
        (Method::GET, "/v1/admin/capacity".to_owned(), None),
    ];
    for token in [ada.access_token.as_str(), owner_key.as_str()] {
        for (method, path, body) in &routes {
            let (status, answer) = app
                .call(method.clone(), path, Some(token), body.clone())
                .await;
            assert_problem(status, &answer, StatusCode::NOT_FOUND);
        }
    }
    for (method, path, body) in &routes {
        let (status, answer) = app.call(method.clone(), path, None, body.clone()).await;
        assert_problem(status, &answer, StatusCode::UNAUTHORIZED);
    }

    // Nothing changed: one token (the operator's), the node's credential untouched.
    let (status, one) = app.get(&format!("/v1/admin/nodes/{node}"), &op).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["credential_revoked_at"], Value::Null);
    assert_eq!(one["state"], "ready");
    assert_eq!(audited(&app, "node_token.create").await, 1);
    for action in ["node.cordon", "node.uncordon", "node.drain"] {
        assert_eq!(audited(&app, action).await, 0, "{action}");
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn bad_token_lifetimes_and_notes_are_refused(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    for ttl in [json!(0), json!(-1), json!(59), json!(604_801)] {
        let (status, body) = app
            .post("/v1/admin/node-tokens", &op, json!({"ttl_secs": ttl}))
            .await;
        assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error_fields(&body), ["ttl_secs"], "{body}");
    }
    let (status, body) = app
        .post(
            "/v1/admin/node-tokens",
            &op,
            json!({"ttl_secs": 0, "note": "x".repeat(201)}),
        )
        .await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_fields(&body), ["ttl_secs", "note"], "{body}");
    let (tokens,): (i64,) = sqlx::query_as("SELECT count(*) FROM node_bootstrap_tokens")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(tokens, 0);
}

/// A node that joined and registered `gpus` (through the store; the node-control service has
/// its own tests).
async fn node_with_gpus(
    app: &TestApp,
    op: &str,
    hostname: &str,
    gpus: Vec<GpuRegistration>,
) -> String {
    let (_, created) = app.post("/v1/admin/node-tokens", op, json!({})).await;
    let node = join(app, created["token"].as_str().unwrap(), hostname).await;
    let id: NodeId = node.parse().unwrap();
    app.store()
        .node_register(
            id,
            &NodeRegistration {
                hostname: hostname.to_owned(),
                agent_version: "0.1.0".into(),
                protocol_minor: 0,
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
                cpu_cores: 96,
                memory_mib: 1_048_576,
                disk_gib: 2000,
                gpus,
            },
        )
        .await
        .expect("register");
    node
}

fn h100(index: u32, mig: Vec<MigInstanceRecord>) -> GpuRegistration {
    GpuRegistration {
        uuid: format!("GPU-h100-{index}"),
        index,
        model: "NVIDIA H100 80GB HBM3".into(),
        gpu_type: Some("h100-80gb".into()),
        memory_mib: 81_559,
        pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index),
        numa_node: Some(0),
        iommu_group: None,
        mig_capable: true,
        mig_enabled: !mig.is_empty(),
        mig_instances: mig,
        nvlink_peers: vec![],
    }
}

fn sample(uuid: &str, sm: i32, used: i64) -> GpuSampleReport {
    GpuSampleReport {
        uuid: uuid.into(),
        sampled_at: OffsetDateTime::now_utc(),
        temperature_c: Some(51),
        power_w: Some(312.5),
        sm_util_pct: Some(sm),
        mem_util_pct: Some(sm / 2),
        memory_used_mib: Some(used),
        ecc_corrected: Some(0),
        ecc_uncorrected: Some(0),
        xids: vec![],
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_operator_sees_each_gpu_its_health_and_what_runs_on_it(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let mig = vec![
        MigInstanceRecord {
            profile: "3g.40gb".into(),
            start: 0,
            size: 4,
            uuid: "MIG-a".into(),
        },
        MigInstanceRecord {
            profile: "3g.40gb".into(),
            start: 4,
            size: 4,
            uuid: "MIG-b".into(),
        },
    ];
    let node = node_with_gpus(&app, &op, "gpu-01", vec![h100(0, vec![]), h100(1, mig)]).await;
    let other = node_with_gpus(&app, &op, "gpu-02", vec![h100(0, vec![])]).await;
    let id: NodeId = node.parse().unwrap();
    app.store()
        .node_metrics(
            id,
            &[
                sample("GPU-h100-0", 40, 20_480),
                sample("GPU-h100-1", 61, 1024),
            ],
        )
        .await
        .unwrap();

    // A pod on the whole of GPU 0 (its agent says it runs), another on one MIG instance of GPU 1.
    let (pod, sliced) = (AssignmentId::new(), AssignmentId::new());
    let mut tx = app.store().begin().await.unwrap();
    for (a, uuids) in [
        (pod, vec!["GPU-h100-0".to_owned()]),
        (sliced, vec!["MIG-b".to_owned()]),
    ] {
        app.store()
            .assignment_put(
                &mut tx,
                AssignmentPut {
                    id: a,
                    node: id,
                    kind: AssignmentKind::Pod,
                    spec: b"",
                    gpu_uuids: &uuids,
                },
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    app.store()
        .observed_report(
            id,
            2,
            &[ObservedRecord {
                assignment_id: pod.as_uuid(),
                generation: 1,
                state: "running",
                reason: String::new(),
                exit_code: None,
                ports: json!([]),
                observed_at: OffsetDateTime::now_utc(),
                runtime_ms: 0,
            }],
            false,
        )
        .await
        .unwrap();

    // GPU 1 goes unhealthy: the node stays up, the GPU leaves capacity.
    app.store()
        .node_heartbeat(
            id,
            2,
            &[GpuHealthReport {
                uuid: "GPU-h100-1".into(),
                health: "unhealthy",
                reason: "XID 79: GPU has fallen off the bus".into(),
            }],
        )
        .await
        .unwrap();

    let (status, list) = app.get("/v1/admin/nodes", &op).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let first = items.iter().find(|n| n["id"] == node.as_str()).unwrap();
    assert_eq!(first["state"], "ready");
    assert_eq!(first["driver_version"], "550.54.15");
    assert_eq!(
        first["gpu_summary"],
        json!({"count": 2, "gpu_types": ["h100-80gb"], "healthy": 1, "degraded": 0,
               "unhealthy": 1, "allocated": 2, "mean_sm_util_pct": 50.5})
    );
    assert_eq!(first["gpus"].as_array().unwrap().len(), 2);
    let second = items.iter().find(|n| n["id"] == other.as_str()).unwrap();
    assert_eq!(second["gpu_summary"]["count"], 1);
    assert_eq!(second["gpu_summary"]["allocated"], 0);
    assert_eq!(second["gpu_summary"]["mean_sm_util_pct"], Value::Null);

    let (status, one) = app.get(&format!("/v1/admin/nodes/{node}"), &op).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    let gpu0 = &one["gpus"][0];
    assert_eq!(gpu0["uuid"], "GPU-h100-0");
    assert_eq!(gpu0["health"], "healthy");
    assert_eq!(gpu0["sm_util_pct"], 40);
    assert_eq!(gpu0["memory_used_mib"], 20_480);
    assert_eq!(gpu0["temperature_c"], 51);
    assert_eq!(gpu0["power_w"], 312.5);
    assert_eq!(gpu0["allocated"], true);
    assert_eq!(
        gpu0["assignments"],
        json!([{"id": pod.to_string(), "kind": "pod", "generation": 1, "mig_uuid": null,
                "state": "running", "reason": ""}])
    );
    let gpu1 = &one["gpus"][1];
    assert_eq!(gpu1["health"], "unhealthy");
    assert_eq!(gpu1["health_reason"], "XID 79: GPU has fallen off the bus");
    assert_eq!(gpu1["mig_enabled"], true);
    assert_eq!(gpu1["mig_instances"][0]["allocated"], false);
    assert_eq!(gpu1["mig_instances"][1]["start"], 4);
    assert_eq!(gpu1["mig_instances"][1]["size"], 4);
    assert_eq!(gpu1["mig_instances"][1]["allocated"], true);
    assert_eq!(gpu1["assignments"][0]["id"], sliced.to_string());
    assert_eq!(gpu1["assignments"][0]["mig_uuid"], "MIG-b");
    // Not reported by the agent yet.
    assert_eq!(gpu1["assignments"][0]["state"], "pending");
    let events = one["gpu_events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["gpu_uuid"] == "GPU-h100-1"
            && e["kind"] == "health"
            && e["message"].as_str().unwrap().contains("unhealthy: XID 79")),
        "{events:?}"
    );

    let (status, capacity) = app.get("/v1/admin/capacity", &op).await;
    assert_eq!(status, StatusCode::OK, "{capacity}");
    assert_eq!(
        capacity["items"],
        json!([{"gpu_type": "h100-80gb", "total": 3, "schedulable": 2, "unhealthy": 1}])
    );

    // Healthy again: back in capacity.
    app.store()
        .node_heartbeat(
            id,
            2,
            &[GpuHealthReport {
                uuid: "GPU-h100-1".into(),
                health: "healthy",
                reason: String::new(),
            }],
        )
        .await
        .unwrap();
    let (_, capacity) = app.get("/v1/admin/capacity", &op).await;
    assert_eq!(capacity["items"][0]["schedulable"], 3, "{capacity}");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn cordon_uncordon_and_drain_move_the_node_and_are_audited(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let node = node_with_gpus(&app, &op, "gpu-01", vec![h100(0, vec![])]).await;
    let schedulable = || async {
        let (_, c) = app.get("/v1/admin/capacity", &op).await;
        c["items"][0]["schedulable"].as_i64().unwrap()
    };
    assert_eq!(schedulable().await, 1);

    for (action, state, admin, audit_action, capacity) in [
        ("cordon", "cordoned", "cordoned", "node.cordon", 0),
        ("uncordon", "ready", "active", "node.uncordon", 1),
        ("drain", "draining", "draining", "node.drain", 0),
        // Uncordon also ends a drain.
        ("uncordon", "ready", "active", "node.uncordon", 1),
    ] {
        let (status, body) = app
            .call(
                Method::POST,
                &format!("/v1/admin/nodes/{node}/{action}"),
                Some(&op),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{action}: {body}");
        assert_eq!(body["id"], node.as_str());
        assert_eq!(body["state"], state, "{action}: {body}");
        assert_eq!(body["admin_state"], admin, "{action}: {body}");
        assert_eq!(body["gpu_summary"]["count"], 1, "{body}");
        let (_, one) = app.get(&format!("/v1/admin/nodes/{node}"), &op).await;
        assert_eq!(one["state"], state);
        assert_eq!(schedulable().await, capacity, "after {action}");
        let (target,): (String,) = sqlx::query_as(
            "SELECT target FROM audit_events WHERE action = $1 ORDER BY id DESC LIMIT 1",
        )
        .bind(audit_action)
        .fetch_one(app.store().pool())
        .await
        .unwrap();
        assert_eq!(target, node);
    }
    assert_eq!(audited(&app, "node.cordon").await, 1);
    assert_eq!(audited(&app, "node.uncordon").await, 2);
    assert_eq!(audited(&app, "node.drain").await, 1);

    // Unknown and malformed nodes are not found.
    for missing in ["node_0190a0b0c0d0e0f00000000000000001", "gpu-01"] {
        for action in ["cordon", "uncordon", "drain"] {
            let (status, body) = app
                .call(
                    Method::POST,
                    &format!("/v1/admin/nodes/{missing}/{action}"),
                    Some(&op),
                    None,
                )
                .await;
            assert_problem(status, &body, StatusCode::NOT_FOUND);
        }
    }

    // A retired node (its credential revoked) stays retired.
    let (status, _) = app
        .post(
            &format!("/v1/admin/nodes/{node}/revoke-credential"),
            &op,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for action in ["cordon", "uncordon", "drain"] {
        let (status, headers, body) = app
            .call_full(
                Method::POST,
                &format!("/v1/admin/nodes/{node}/{action}"),
                Some(&op),
                None,
                &[],
            )
            .await;
        assert_problem(status, &body, StatusCode::CONFLICT);
        assert_eq!(
            headers.get("content-type").unwrap(),
            "application/problem+json"
        );
        assert!(
            body["detail"].as_str().unwrap().contains("retired"),
            "{body}"
        );
    }
    let (_, one) = app.get(&format!("/v1/admin/nodes/{node}"), &op).await;
    assert_eq!(one["state"], "retired");
    assert_eq!(audited(&app, "node.cordon").await, 1);
    let (_, capacity) = app.get("/v1/admin/capacity", &op).await;
    assert_eq!(
        capacity["items"],
        json!([]),
        "a retired node's GPUs are gone"
    );
}
