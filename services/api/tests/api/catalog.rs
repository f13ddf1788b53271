//! `GET /v1/gpu-types`: the catalog with live availability. GPUs are registered and workloads
//! placed through the store and the real placer, so the figures are checked against what the
//! scheduler actually does.

use kiln_domain::{NodeId, Permission, SessionId};
use kiln_scheduler::Placer;
use kiln_store::{GpuHealthReport, NewWorkload, OrgScope, Principal, Store};
use kiln_testkit::serde_json::{Value, json};
use kiln_testkit::{TestApp, TestUser};
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

use crate::assert_problem;

async fn node(store: &Store, hostname: &str, gpus: u32, mig: bool) -> NodeId {
    kiln_testkit::fleet::registered_node(store, hostname, gpus, mig).await
}

fn gpu(hostname: &str, i: u32) -> String {
    kiln_testkit::fleet::gpu_uuid(hostname, i)
}

/// A scope of `user`'s personal org to create workloads in.
async fn scope(app: &TestApp, user: &TestUser) -> OrgScope {
    let principal = Principal::User {
        user_id: user.user_id.parse().unwrap(),
        session_id: SessionId::new(),
        is_operator: false,
    };
    app.store()
        .authorize(
            &principal,
            user.org_id.parse().unwrap(),
            Permission::WorkloadWrite,
        )
        .await
        .unwrap()
}

/// Create an h100-80gb pod (`whole` with `count` GPUs, or `mig` with `profile`) and run one
/// placer pass; asserts it was placed.
async fn place(app: &TestApp, scope: &OrgScope, gpu_mode: &str, count: i32, profile: Option<&str>) {
    let store = app.store();
    let mut tx = store.begin().await.unwrap();
    let w = store
        .workload_create(
            &mut tx,
            scope,
            &NewWorkload {
                kind: "pod",
                name: "p",
                tier: "on_demand",
                priority: 0,
                gpu_mode,
                gpu_type: Some("h100-80gb"),
                gpu_count: count,
                mig_profile: profile,
                share_memory_mib: None,
                cpu_millis: 1000,
                memory_mib: 4096,
                disk_gib: 10,
                spec: json!({"image": "kiln/demo:1"}),
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let outcome = Placer::new(store.clone()).pass().await.unwrap();
    assert_eq!(outcome.placed, 1, "{outcome:?}");
    let (state,): (String,) = sqlx::query_as("SELECT state FROM workloads WHERE id = $1")
        .bind(w.id)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(state, "scheduled");
}

/// The catalog's entry for `id`.
async fn gpu_type(app: &TestApp, token: &str, id: &str) -> Value {
    let (status, body) = app.get("/v1/gpu-types", token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body.as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {body}"))
        .clone()
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn without_credentials_the_catalog_is_401(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (status, body) = app.call(Method::GET, "/v1/gpu-types", None, None).await;
    assert_problem(status, &body, StatusCode::UNAUTHORIZED);
    let (status, headers, _) = app
        .call_full(Method::GET, "/v1/gpu-types", Some("not-a-token"), None, &[])
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/problem+json"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_empty_fleet_still_lists_the_mig_capable_types_with_nothing_free(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let (_, key) = app.api_key(&ada, &ada.org_id, "viewer").await;
    for token in [&ada.access_token, &key] {
        let (status, body) = app.get("/v1/gpu-types", token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let ids: Vec<&str> = body
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a100-40gb", "a100-80gb", "h100-80gb"]);
    }
    let mut h100 = gpu_type(&app, &key, "h100-80gb").await;
    // Prices come from the catalog's version in effect (the billing tests check them).
    let prices = h100["prices"].take();
    assert_eq!(prices["pod"]["amount_micros"], 2_990_000, "{prices}");
    assert_eq!(
        h100,
        json!({
            "id": "h100-80gb",
            "name": "NVIDIA H100 80GB",
            "memory_gib": 80,
            "mig_profiles": ["1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"],
            "prices": null,
            "available": {
                "whole": 0,
                "mig": {"1g.10gb": 0, "1g.20gb": 0, "2g.20gb": 0, "3g.40gb": 0, "4g.40gb": 0, "7g.80gb": 0},
                "shares": {"gpus": 0, "max_memory_gib": 0},
                "total": 0,
                "unhealthy": 0,
            },
        })
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn placed_work_and_unhealthy_gpus_leave_whole_availability(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let token = ada.access_token.clone();
    let n = node(app.store(), "h1", 4, false).await;

    let h = gpu_type(&app, &token, "h100-80gb").await;
    assert_eq!(h["available"]["whole"], 4, "{h}");
    assert_eq!(h["available"]["total"], 4);
    assert_eq!(h["available"]["unhealthy"], 0);
    assert_eq!(
        h["available"]["shares"],
        json!({"gpus": 4, "max_memory_gib": 79})
    );
    // MIG mode is off on every GPU: no MIG instance can be placed.
    assert_eq!(h["available"]["mig"]["1g.10gb"], 0);

    let scope = scope(&app, &ada).await;
    place(&app, &scope, "whole", 2, None).await;
    let h = gpu_type(&app, &token, "h100-80gb").await;
    assert_eq!(h["available"]["whole"], 2, "{h}");
    assert_eq!(h["available"]["total"], 4);
    assert_eq!(h["available"]["shares"]["gpus"], 2);

    // One of the two idle GPUs goes unhealthy: it leaves `whole` and is counted unhealthy.
    let (held,): (Vec<String>,) = sqlx::query_as("SELECT array_agg(gpu_uuid) FROM gpu_allocations")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    let idle = (0..4)
        .map(|i| gpu("h1", i))
        .find(|u| !held.contains(u))
        .unwrap();
    app.store()
        .node_heartbeat(
            n,
            0,
            &[GpuHealthReport {
                uuid: idle.clone(),
                health: "unhealthy",
                reason: "XID 79: fell off the bus".into(),
            }],
        )
        .await
        .unwrap();
    let h = gpu_type(&app, &token, "h100-80gb").await;
    assert_eq!(h["available"]["whole"], 1, "{h}");
    assert_eq!(h["available"]["unhealthy"], 1);
    assert_eq!(h["available"]["total"], 4);

    // A cordoned node offers nothing, though its GPUs are still counted.
    let mut tx = app.store().begin().await.unwrap();
    app.store()
        .node_set_admin_state(&mut tx, n, kiln_domain::AdminState::Cordoned)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let h = gpu_type(&app, &token, "h100-80gb").await;
    assert_eq!(h["available"]["whole"], 0, "{h}");
    assert_eq!(h["available"]["total"], 4);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_placed_3g_slice_shows_fewer_3g_and_7g_placements(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let token = ada.access_token.clone();
    node(app.store(), "m1", 1, true).await;

    let h = gpu_type(&app, &token, "h100-80gb").await;
    assert_eq!(
        h["available"]["mig"],
        json!({"1g.10gb": 7, "1g.20gb": 4, "2g.20gb": 3, "3g.40gb": 2, "4g.40gb": 1, "7g.80gb": 1}),
        "{h}"
    );
    assert_eq!(h["available"]["whole"], 0, "a MIG-mode GPU is never whole");
    assert_eq!(h["available"]["shares"]["gpus"], 0);

    let scope = scope(&app, &ada).await;
    place(&app, &scope, "mig", 0, Some("3g.40gb")).await;
    let h = gpu_type(&app, &token, "h100-80gb").await;
    // The placer keeps the 4g position free (3g at slices 4–7): one more 3g, no 7g, the 4g
    // still fits (3 + 4 compute slices), and four 1g slices are left.
    assert_eq!(
        h["available"]["mig"],
        json!({"1g.10gb": 4, "1g.20gb": 2, "2g.20gb": 2, "3g.40gb": 1, "4g.40gb": 1, "7g.80gb": 0}),
        "{h}"
    );
    assert_eq!(h["available"]["total"], 1);

    // GraphQL answers the same, with MIG availability as a list.
    let (status, body) = app
        .call(
            Method::POST,
            "/graphql",
            Some(&token),
            Some(json!({"query": "{ gpuTypes { items { id name migProfiles prices available { whole total mig { profile available } } } } }"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("errors").is_none(), "{body}");
    let g = body["data"]["gpuTypes"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "h100-80gb")
        .unwrap();
    assert_eq!(g["name"], "NVIDIA H100 80GB");
    assert_eq!(g["prices"]["pod"]["amount_micros"], 2_990_000, "{g}");
    assert_eq!(g["available"]["whole"], 0);
    assert_eq!(
        g["available"]["mig"][3],
        json!({"profile": "3g.40gb", "available": 1})
    );
}
