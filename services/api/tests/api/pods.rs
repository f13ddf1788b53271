//! Pods: create (202, pending), placed by the scheduler onto a node with GPUs, every
//! validation error, secret env values never shown nor stored in plaintext, other orgs see
//! nothing, delete frees the GPUs at once, Idempotency-Key replays.

use kiln_testkit::serde_json::{Value, json};
use kiln_testkit::{TestApp, fleet};
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

use crate::{assert_problem, error_fields};

fn pods(org: &str) -> String {
    format!("/v1/orgs/{org}/pods")
}

async fn create(app: &TestApp, token: &str, org: &str, body: Value) -> (StatusCode, Value) {
    app.post(&pods(org), token, body).await
}

/// Run one scheduling pass, as the scheduler would.
async fn schedule(app: &TestApp) {
    kiln_scheduler::Placer::new(app.store().clone())
        .pass()
        .await
        .unwrap();
}

async fn allocations(app: &TestApp, pod: &str) -> i64 {
    let pod: kiln_domain::PodId = pod.parse().unwrap();
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM gpu_allocations WHERE workload_id = $1")
            .bind(pod.as_uuid())
            .fetch_one(app.store().pool())
            .await
            .unwrap();
    n
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_pod_is_accepted_pending_then_scheduled_with_a_node_and_gpus(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let (status, pod) = create(
        &app,
        &u.access_token,
        &u.org_id,
        json!({
            "name": "llama",
            "image": "vllm/vllm-openai:v0.6.3",
            "gpu": {"type": "h100-80gb", "count": 2},
            "cpu": 2.5,
            "memory_gib": 16,
            "env": {"MODEL": "llama-3-8b"},
            "ports": [8000],
            "command": ["python", "-m", "server"],
        }),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pod}");
    let id = pod["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("pod_"), "{pod}");
    assert_eq!(pod["state"], "pending");
    assert_eq!(pod["gpu"], json!({"type": "h100-80gb", "count": 2}));
    assert_eq!(pod["node"], Value::Null);
    assert_eq!(pod["gpus"], json!([]));
    assert_eq!(pod["cpu"], json!(2.5));
    assert_eq!(pod["memory_gib"], 16);
    assert_eq!(pod["disk_gib"], 10);
    assert_eq!(pod["env"], json!({"MODEL": "llama-3-8b"}));
    assert_eq!(
        pod["ports"],
        json!([{"container_port": 8000, "host": null, "host_port": null}])
    );
    assert_eq!(pod["command"], json!(["python", "-m", "server"]));
    assert_eq!(pod["spot"], false);
    assert_eq!(
        pod["cost_so_far"],
        json!({"amount_micros": 0, "currency": "USD"}),
        "nothing charged before it runs"
    );

    let node = fleet::registered_node(app.store(), "gpu-a", 8, false).await;
    schedule(&app).await;
    let (status, got) = app
        .get(&format!("{}/{id}", pods(&u.org_id)), &u.access_token)
        .await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["state"], "scheduled", "{got}");
    assert_eq!(got["node"], node.to_string());
    let gpus = got["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2, "{got}");
    let node_gpus: Vec<String> = (0..8).map(|i| fleet::gpu_uuid("gpu-a", i)).collect();
    assert!(
        gpus.iter()
            .all(|g| node_gpus.contains(&g.as_str().unwrap().to_owned())),
        "{got}"
    );

    // Once the agent reports the port bound, the pod says where to reach it.
    let (assignment,): (uuid::Uuid,) =
        sqlx::query_as("SELECT assignment_id FROM workloads WHERE id = $1")
            .bind(id.parse::<kiln_domain::PodId>().unwrap().as_uuid())
            .fetch_one(app.store().pool())
            .await
            .unwrap();
    sqlx::query(
        "INSERT INTO node_observed (assignment_id, node_id, generation, state, ports, observed_at)
         VALUES ($1, $2, 1, 'running', $3, now())",
    )
    .bind(assignment)
    .bind(node.as_uuid())
    .bind(json!([{"port": 8000, "protocol": "tcp", "host_port": 31000}]))
    .execute(app.store().pool())
    .await
    .unwrap();
    let (_, got) = app
        .get(&format!("{}/{id}", pods(&u.org_id)), &u.access_token)
        .await;
    assert_eq!(
        got["ports"],
        json!([{"container_port": 8000, "host": "gpu-a", "host_port": 31000}])
    );

    // The list has it, newest first, and pages with a cursor.
    let (_, second) = create(
        &app,
        &u.access_token,
        &u.org_id,
        json!({"name": "cpu-only", "image": "busybox"}),
    )
    .await;
    assert_eq!(second["gpu"], Value::Null);
    assert_eq!(second["cpu"], json!(1.0));
    assert_eq!(second["memory_gib"], 4);
    let (status, list) = app
        .get(&format!("{}?limit=1", pods(&u.org_id)), &u.access_token)
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["items"][0]["id"], second["id"]);
    let cursor = list["next_cursor"].as_str().unwrap();
    let (_, rest) = app
        .get(
            &format!("{}?limit=1&cursor={cursor}", pods(&u.org_id)),
            &u.access_token,
        )
        .await;
    assert_eq!(rest["items"][0]["id"], json!(id));
    assert_eq!(rest["next_cursor"], Value::Null);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn mig_slices_and_shares_are_asked_for_as_such(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let (status, mig) = create(
        &app,
        &u.access_token,
        &u.org_id,
        json!({"name": "m", "image": "app", "gpu": {"type": "h100-80gb", "mig_profile": "3g.40gb"}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{mig}");
    assert_eq!(
        mig["gpu"],
        json!({"type": "h100-80gb", "mig_profile": "3g.40gb"})
    );
    let (status, share) = create(
        &app,
        &u.access_token,
        &u.org_id,
        json!({"name": "s", "image": "app", "spot": true,
               "gpu": {"type": "h100-80gb", "share": {"memory_gib": 20}}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{share}");
    assert_eq!(
        share["gpu"],
        json!({"type": "h100-80gb", "share": {"memory_gib": 20}})
    );
    assert_eq!(share["spot"], true);
    fleet::registered_node(app.store(), "gpu-a", 8, false).await;
    schedule(&app).await;
    let (_, got) = app
        .get(
            &format!("{}/{}", pods(&u.org_id), share["id"].as_str().unwrap()),
            &u.access_token,
        )
        .await;
    assert_eq!(got["state"], "scheduled", "{got}");
    assert_eq!(got["gpus"].as_array().unwrap().len(), 1, "{got}");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn every_invalid_field_is_a_clear_422(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let ok = json!({"name": "ok", "image": "busybox"});
    let with = |patch: Value| {
        let mut b = ok.clone();
        for (k, v) in patch.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let many_env: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("K{i}"), json!("v"))).collect();
    let big_env = json!({"A": "x".repeat(20_000), "B": "y".repeat(13_000)});
    let cases: Vec<(Value, &str, &str)> = vec![
        (with(json!({"name": ""})), "name", "is required"),
        (with(json!({"name": "Web_1"})), "name", "DNS label"),
        (with(json!({"name": "a".repeat(64)})), "name", "63"),
        (with(json!({"image": ""})), "image", "is required"),
        (
            with(json!({"image": "Bad Image"})),
            "image",
            "image reference",
        ),
        (with(json!({"image": "app@sha256:abc"})), "image", "digest"),
        (with(json!({"image": "a".repeat(256)})), "image", "255"),
        (
            with(json!({"gpu": {"type": "b300-9000gb", "count": 1}})),
            "gpu.type",
            "unknown GPU type `b300-9000gb`; see GET /v1/gpu-types",
        ),
        (
            with(json!({"gpu": {"type": "h100-80gb", "mig_profile": "9g.99gb"}})),
            "gpu.mig_profile",
            "unknown MIG profile `9g.99gb` for h100-80gb",
        ),
        (
            with(json!({"gpu": {"type": "h100-80gb", "count": 0}})),
            "gpu.count",
            "between 1 and 8",
        ),
        (
            with(json!({"gpu": {"type": "h100-80gb", "count": 9}})),
            "gpu.count",
            "between 1 and 8",
        ),
        (
            with(json!({"gpu": {"type": "h100-80gb", "share": {"memory_gib": 81}}})),
            "gpu.share.memory_gib",
            "between 1 and 80",
        ),
        (
            with(json!({"gpu": {"type": "h100-80gb", "share": {"memory_gib": 0}}})),
            "gpu.share.memory_gib",
            "between 1 and 80",
        ),
        (
            with(json!({"gpu": {"type": "h100-80gb"}})),
            "gpu",
            "give one of",
        ),
        (
            with(json!({"gpu": {"type": "h100-80gb", "count": 1, "mig_profile": "3g.40gb"}})),
            "gpu",
            "only one",
        ),
        (with(json!({"cpu": 0.05})), "cpu", "between 0.1 and 256"),
        (with(json!({"cpu": 257})), "cpu", "between 0.1 and 256"),
        (
            with(json!({"memory_gib": 0})),
            "memory_gib",
            "between 1 and 2048",
        ),
        (
            with(json!({"memory_gib": 2049})),
            "memory_gib",
            "between 1 and 2048",
        ),
        (with(json!({"ports": [0]})), "ports", "not a port"),
        (with(json!({"ports": [65536]})), "ports", "not a port"),
        (with(json!({"ports": [80, 80]})), "ports", "only once"),
        (
            with(json!({"ports": (1..=33).collect::<Vec<i64>>()})),
            "ports",
            "at most 32",
        ),
        (with(json!({"env": many_env})), "env", "at most 64"),
        (with(json!({"env": {"9BAD": "v"}})), "env.9BAD", "[A-Za-z_]"),
        (
            with(json!({"env": {"A-B": {"value": "v", "secret": true}}})),
            "env.A-B",
            "[A-Za-z_]",
        ),
        (with(json!({"env": big_env})), "env", "32 KiB"),
        (
            with(json!({"command": vec!["x"; 65]})),
            "command",
            "at most 64",
        ),
    ];
    for (body, field, message) in cases {
        let (status, problem) = create(&app, &u.access_token, &u.org_id, body.clone()).await;
        assert_problem(status, &problem, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            error_fields(&problem),
            vec![field.to_owned()],
            "for {body}: {problem}"
        );
        assert!(
            problem["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains(message),
            "for {body}: expected `{message}` in {problem}"
        );
    }

    // All problems of one request at once.
    let (status, problem) = create(
        &app,
        &u.access_token,
        &u.org_id,
        json!({"name": "", "image": "", "cpu": 0, "ports": [0]}),
    )
    .await;
    assert_problem(status, &problem, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        error_fields(&problem),
        vec!["name", "image", "cpu", "ports"],
        "{problem}"
    );

    // A type only the fleet has is known once a node brings it.
    let (_, problem) = create(
        &app,
        &u.access_token,
        &u.org_id,
        with(json!({"gpu": {"type": "l40s-48gb", "count": 1}})),
    )
    .await;
    assert_eq!(error_fields(&problem), vec!["gpu.type"]);
    let (status, _) = create(
        &app,
        &u.access_token,
        &u.org_id,
        with(json!({"gpu": {"type": "a100-80gb", "mig_profile": "1g.10gb"}})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "MIG tables know a100-80gb");

    let (_, list) = app.get(&pods(&u.org_id), &u.access_token).await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "refused requests leave nothing"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn secret_env_values_are_never_shown_nor_stored_in_plaintext(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let secret = "hf_s3cr3t-token-value";
    let (status, pod) = create(
        &app,
        &u.access_token,
        &u.org_id,
        json!({"name": "s", "image": "app",
               "env": {"PLAIN": "visible", "HF_TOKEN": {"value": secret, "secret": true},
                       "ALSO_PLAIN": {"value": "shown", "secret": false}}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pod}");
    let expected = json!({"PLAIN": "visible", "HF_TOKEN": {"secret": true}, "ALSO_PLAIN": "shown"});
    assert_eq!(pod["env"], expected);
    assert!(!pod.to_string().contains(secret));
    let id = pod["id"].as_str().unwrap();
    let (_, got) = app
        .get(&format!("{}/{id}", pods(&u.org_id)), &u.access_token)
        .await;
    assert_eq!(got["env"], expected);
    assert!(!got.to_string().contains(secret));
    let (_, list) = app.get(&pods(&u.org_id), &u.access_token).await;
    assert!(!list.to_string().contains(secret));

    // At rest: plain values for the agent in spec.env, the secret only as ciphertext.
    let (spec,): (Value,) = sqlx::query_as("SELECT spec FROM workloads WHERE id = $1")
        .bind(id.parse::<kiln_domain::PodId>().unwrap().as_uuid())
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(
        spec["env"],
        json!({"PLAIN": "visible", "ALSO_PLAIN": "shown"})
    );
    let sealed = spec["env_secret"]["HF_TOKEN"].as_str().unwrap();
    assert!(!sealed.contains(secret));
    let (row,): (String,) = sqlx::query_as("SELECT w::text FROM workloads w")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert!(!row.contains(secret), "plaintext in the row: {row}");
    let (audit,): (String,) =
        sqlx::query_as("SELECT coalesce(string_agg(details::text, ' '), '') FROM audit_events")
            .fetch_one(app.store().pool())
            .await
            .unwrap();
    assert!(!audit.contains(secret));
    // And the deployment's key opens it.
    let org: kiln_domain::OrgId = u.org_id.parse().unwrap();
    let opened = app
        .state
        .secrets
        .as_ref()
        .unwrap()
        .open(&kiln_auth::pod_env_context(org, "HF_TOKEN"), sealed)
        .unwrap();
    assert_eq!(opened, secret);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn without_a_secrets_key_secret_values_are_refused(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |c| c.secrets_key = None).await;
    let u = app.user("ada").await;
    let (status, problem) = create(
        &app,
        &u.access_token,
        &u.org_id,
        json!({"name": "s", "image": "app", "env": {"T": {"value": "x", "secret": true}}}),
    )
    .await;
    assert_problem(status, &problem, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_fields(&problem), vec!["env.T"]);
    assert!(problem.to_string().contains("KILN_SECRETS_KEY"));
    let (status, _) = create(
        &app,
        &u.access_token,
        &u.org_id,
        json!({"name": "p", "image": "app", "env": {"T": "plain is fine"}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn another_org_gets_404_for_get_delete_and_sees_nothing_in_its_list(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let eve = app.user("eve").await;
    let (_, pod) = create(
        &app,
        &u.access_token,
        &u.org_id,
        json!({"name": "mine", "image": "app"}),
    )
    .await;
    let id = pod["id"].as_str().unwrap();
    for (method, path) in [
        (Method::GET, format!("{}/{id}", pods(&u.org_id))),
        (Method::DELETE, format!("{}/{id}", pods(&u.org_id))),
        (Method::GET, pods(&u.org_id)),
        // Eve's own org with Ada's pod id: still nothing.
        (Method::GET, format!("{}/{id}", pods(&eve.org_id))),
        (Method::DELETE, format!("{}/{id}", pods(&eve.org_id))),
        (Method::GET, format!("{}/pod_nonsense", pods(&u.org_id))),
    ] {
        let (status, body) = app
            .call(method.clone(), &path, Some(&eve.access_token), None)
            .await;
        assert_problem(status, &body, StatusCode::NOT_FOUND);
        assert!(
            !body.to_string().contains("mine"),
            "{method} {path}: {body}"
        );
    }
    let (_, list) = app.get(&pods(&eve.org_id), &eve.access_token).await;
    assert_eq!(list["items"], json!([]));
    let (_, got) = app
        .get(&format!("{}/{id}", pods(&u.org_id)), &u.access_token)
        .await;
    assert_eq!(got["state"], "pending", "untouched");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn delete_frees_the_gpus_at_once_and_twice_is_fine(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    fleet::registered_node(app.store(), "gpu-a", 8, false).await;
    let (_, pod) = create(
        &app,
        &u.access_token,
        &u.org_id,
        json!({"name": "big", "image": "app", "gpu": {"type": "h100-80gb", "count": 8}}),
    )
    .await;
    let id = pod["id"].as_str().unwrap().to_owned();
    schedule(&app).await;
    assert_eq!(allocations(&app, &id).await, 8);

    let path = format!("{}/{id}", pods(&u.org_id));
    let (status, deleted) = app
        .call(Method::DELETE, &path, Some(&u.access_token), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{deleted}");
    assert_eq!(deleted["state"], "terminated");
    assert!(
        deleted["state_reason"]
            .as_str()
            .unwrap()
            .starts_with("deleted by usr_"),
        "{deleted}"
    );
    assert_eq!(deleted["gpus"], json!([]));
    assert_eq!(allocations(&app, &id).await, 0);
    let (assignments,): (i64,) = sqlx::query_as("SELECT count(*) FROM node_assignments")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(assignments, 0, "the agent's assignment is removed");

    let (status, again) = app
        .call(Method::DELETE, &path, Some(&u.access_token), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(again["state"], "terminated");
    assert_eq!(again["state_reason"], deleted["state_reason"]);

    // The capacity is there for the next pod.
    let (_, next) = create(
        &app,
        &u.access_token,
        &u.org_id,
        json!({"name": "next", "image": "app", "gpu": {"type": "h100-80gb", "count": 8}}),
    )
    .await;
    schedule(&app).await;
    let (_, got) = app
        .get(
            &format!("{}/{}", pods(&u.org_id), next["id"].as_str().unwrap()),
            &u.access_token,
        )
        .await;
    assert_eq!(got["state"], "scheduled", "{got}");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn idempotency_key_replays_the_first_pod(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let body =
        json!({"name": "once", "image": "app", "env": {"T": {"value": "s", "secret": true}}});
    let h = [("idempotency-key", "pod-1")];
    let (s1, _, first) = app
        .call_full(
            Method::POST,
            &pods(&u.org_id),
            Some(&u.access_token),
            Some(body.clone()),
            &h,
        )
        .await;
    let (s2, headers, second) = app
        .call_full(
            Method::POST,
            &pods(&u.org_id),
            Some(&u.access_token),
            Some(body),
            &h,
        )
        .await;
    assert_eq!(s1, StatusCode::ACCEPTED, "{first}");
    assert_eq!((s2, &second), (s1, &first));
    assert_eq!(headers["idempotent-replayed"], "true");
    let (s3, _, problem) = app
        .call_full(
            Method::POST,
            &pods(&u.org_id),
            Some(&u.access_token),
            Some(json!({"name": "other", "image": "app"})),
            &h,
        )
        .await;
    assert_problem(s3, &problem, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, list) = app.get(&pods(&u.org_id), &u.access_token).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn graphql_creates_lists_and_deletes_pods(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let gql = |query: &str, variables: Value| json!({"query": query, "variables": variables});
    let (status, created) = app
        .post(
            "/graphql",
            &u.access_token,
            gql(
                "mutation($org: ID!, $input: CreatePodInput!) {
                    createPod(orgId: $org, input: $input) { id state gpu { type count } env }
                 }",
                json!({"org": u.org_id, "input": {
                    "name": "g", "image": "app", "gpu": {"type": "h100-80gb", "count": 1},
                    "env": {"A": "1", "S": {"value": "hidden", "secret": true}}}}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let pod = &created["data"]["createPod"];
    assert_eq!(pod["state"], "pending", "{created}");
    assert_eq!(pod["gpu"], json!({"type": "h100-80gb", "count": 1}));
    assert_eq!(pod["env"], json!({"A": "1", "S": {"secret": true}}));
    let id = pod["id"].as_str().unwrap();

    let (_, listed) = app
        .post(
            "/graphql",
            &u.access_token,
            gql(
                "query($org: ID!, $id: ID!) {
                    pods(orgId: $org) { items { id } nextCursor }
                    pod(orgId: $org, id: $id) { name }
                 }",
                json!({"org": u.org_id, "id": id}),
            ),
        )
        .await;
    assert_eq!(
        listed["data"]["pods"]["items"],
        json!([{"id": id}]),
        "{listed}"
    );
    assert_eq!(listed["data"]["pod"]["name"], "g");

    let (_, invalid) = app
        .post(
            "/graphql",
            &u.access_token,
            gql(
                "mutation($org: ID!) { createPod(orgId: $org, input: {name: \"BAD\", image: \"app\"}) { id } }",
                json!({"org": u.org_id}),
            ),
        )
        .await;
    assert_eq!(
        invalid["errors"][0]["extensions"]["code"], "validation",
        "{invalid}"
    );

    let (_, deleted) = app
        .post(
            "/graphql",
            &u.access_token,
            gql(
                "mutation($org: ID!, $id: ID!) { deletePod(orgId: $org, id: $id) { state } }",
                json!({"org": u.org_id, "id": id}),
            ),
        )
        .await;
    assert_eq!(
        deleted["data"]["deletePod"]["state"], "terminated",
        "{deleted}"
    );
}

/// Reads server-sent events off a response body, one `event: pod` at a time.
struct Events {
    body: reqwest::Response,
    buf: String,
}

impl Events {
    /// The next pod view, within 10 s; `None` when the stream ended.
    async fn next(&mut self) -> Option<Value> {
        self.next_named("pod").await.map(|(_, v)| v)
    }

    /// The next event called `name` (its `id:` and JSON data), within 10 s; `None` when the
    /// stream ended. Other events and keep-alive comments are skipped.
    async fn next_named(&mut self, name: &str) -> Option<(Option<String>, Value)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let data: String = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim)
                    .collect();
                let id = block
                    .lines()
                    .find_map(|l| l.strip_prefix("id:"))
                    .map(|i| i.trim().to_owned());
                if block.lines().any(|l| l.trim() == format!("event: {name}")) {
                    return Some((id, serde_json::from_str(&data).unwrap_or(Value::Null)));
                }
                continue;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let chunk = tokio::time::timeout(left, self.body.chunk())
                .await
                .expect("an event within 10 s")
                .unwrap();
            match chunk {
                Some(bytes) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                None => return None,
            }
        }
    }
}

/// Lines as an agent's `PushLogs` would leave them (the fleet service writes the same store).
async fn push_lines(app: &TestApp, pod: &str, lines: &[&str]) {
    let store =
        kiln_logs::LogStore::connect(&kiln_testkit::redis_url(), &app.config().redis_namespace)
            .await
            .unwrap();
    let pod: kiln_domain::PodId = pod.parse().unwrap();
    let new: Vec<kiln_logs::NewLine<'_>> = lines
        .iter()
        .map(|t| kiln_logs::NewLine {
            source: kiln_logs::Source::Stdout,
            text: t,
            at_unix_ms: 1_790_000_000_000,
        })
        .collect();
    store.append(pod.as_uuid(), &new).await.unwrap();
}

async fn follow(app: &TestApp, token: &str, path: &str, last_event_id: Option<&str>) -> Events {
    let mut req = reqwest::Client::new()
        .get(format!("{}{path}", app.url))
        .bearer_auth(token);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let body = req.send().await.unwrap();
    assert_eq!(body.status(), StatusCode::OK);
    assert!(
        body.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    Events {
        body,
        buf: String::new(),
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn logs_tail_follow_resume_and_end_with_the_pod(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let (status, pod) = create(
        &app,
        &ada.access_token,
        &ada.org_id,
        json!({"name": "talker", "image": "kiln/demo-model:1"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pod}");
    let id = pod["id"].as_str().unwrap().to_owned();
    let logs = format!("{}/{id}/logs", pods(&ada.org_id));

    // Nothing yet: an empty text answer.
    let (status, body) = app
        .call(Method::GET, &logs, Some(&ada.access_token), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    push_lines(&app, &id, &["one", "two", "three"]).await;
    let text = reqwest::Client::new()
        .get(format!("{}{logs}?tail=2", app.url))
        .bearer_auth(&ada.access_token)
        .send()
        .await
        .unwrap();
    assert!(
        text.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(text.text().await.unwrap(), "two\nthree\n");

    // Following: the last line first, then what comes, each with its cursor as the event id.
    let mut events = follow(
        &app,
        &ada.access_token,
        &format!("{logs}?follow=true&tail=1"),
        None,
    )
    .await;
    let (_, first) = events.next_named("log").await.unwrap();
    assert_eq!(first["text"], "three");
    assert_eq!(first["source"], "stdout");
    push_lines(&app, &id, &["four"]).await;
    let (four_id, four) = events.next_named("log").await.unwrap();
    assert_eq!(four["text"], "four");
    assert_eq!(four_id.as_deref(), four["cursor"].as_str());

    // A reconnecting client resumes after the last line it saw, whatever `tail` says.
    push_lines(&app, &id, &["five"]).await;
    let mut resumed = follow(
        &app,
        &ada.access_token,
        &format!("{logs}?follow=true&tail=100"),
        four_id.as_deref(),
    )
    .await;
    let (_, next) = resumed.next_named("log").await.unwrap();
    assert_eq!(next["text"], "five", "only lines after Last-Event-ID");

    // The pod ends: the streams end too.
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("{}/{id}", pods(&ada.org_id)),
            Some(&ada.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (_, five) = events.next_named("log").await.unwrap();
    assert_eq!(five["text"], "five");
    assert!(
        events.next_named("log").await.is_none(),
        "ends after the pod"
    );
    assert!(
        resumed.next_named("log").await.is_none(),
        "ends after the pod"
    );

    // Bad input is a clear 422; another org's pod a 404.
    for bad in ["tail=-1", "tail=5001", "tail=lots", "follow=maybe"] {
        let (status, body) = app
            .call(
                Method::GET,
                &format!("{logs}?{bad}"),
                Some(&ada.access_token),
                None,
            )
            .await;
        assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    }
    let bob = app.user("bob").await;
    for q in ["", "?follow=true"] {
        let (status, body) = app
            .call(
                Method::GET,
                &format!("{logs}{q}"),
                Some(&bob.access_token),
                None,
            )
            .await;
        assert_problem(status, &body, StatusCode::NOT_FOUND);
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn graphql_subscriptions_stream_pod_events_and_logs_over_sse(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    fleet::registered_node(app.store(), "gpu-a", 8, false).await;
    let (_, pod) = create(
        &app,
        &ada.access_token,
        &ada.org_id,
        json!({"name": "sub", "image": "kiln/demo-model:1", "gpu": {"type": "h100-80gb", "count": 1}}),
    )
    .await;
    let id = pod["id"].as_str().unwrap().to_owned();
    let subscribe = |query: String| {
        reqwest::Client::new()
            .post(format!("{}/graphql", app.url))
            .bearer_auth(&ada.access_token)
            .header("accept", "text/event-stream")
            .json(&json!({ "query": query }))
            .send()
    };
    let body = subscribe(format!(
        r#"subscription {{ podEvents(orgId: "{}", id: "{id}") {{ state node }} }}"#,
        ada.org_id
    ))
    .await
    .unwrap();
    assert_eq!(body.status(), StatusCode::OK);
    let mut events = Events {
        body,
        buf: String::new(),
    };
    let (_, first) = events.next_named("next").await.unwrap();
    assert_eq!(first["data"]["podEvents"]["state"], "pending", "{first}");
    schedule(&app).await;
    let (_, placed) = events.next_named("next").await.unwrap();
    assert_eq!(
        placed["data"]["podEvents"]["state"], "scheduled",
        "{placed}"
    );

    push_lines(&app, &id, &["hello over graphql"]).await;
    let (status, q) = app
        .post(
            "/graphql",
            &ada.access_token,
            json!({"query": format!(r#"{{ podLogs(orgId: "{}", id: "{id}", tail: 5) {{ text source }} }}"#, ada.org_id)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{q}");
    assert_eq!(q["data"]["podLogs"][0]["text"], "hello over graphql", "{q}");
    let body = subscribe(format!(
        r#"subscription {{ podLogs(orgId: "{}", id: "{id}", tail: 5) {{ text }} }}"#,
        ada.org_id
    ))
    .await
    .unwrap();
    let mut logs = Events {
        body,
        buf: String::new(),
    };
    let (_, line) = logs.next_named("next").await.unwrap();
    assert_eq!(
        line["data"]["podLogs"]["text"], "hello over graphql",
        "{line}"
    );

    // Another org: an error, not a stream of someone else's pod.
    let bob = app.user("bob").await;
    let body = reqwest::Client::new()
        .post(format!("{}/graphql", app.url))
        .bearer_auth(&bob.access_token)
        .header("accept", "text/event-stream")
        .json(&json!({ "query": format!(r#"subscription {{ podEvents(orgId: "{}", id: "{id}") {{ state }} }}"#, ada.org_id) }))
        .send()
        .await
        .unwrap();
    let mut denied = Events {
        body,
        buf: String::new(),
    };
    let (_, err) = denied.next_named("next").await.unwrap();
    assert_eq!(err["errors"][0]["extensions"]["code"], "not-found", "{err}");
    assert!(denied.next_named("next").await.is_none());
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_pods_state_streams_live_as_server_sent_events(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    fleet::registered_node(app.store(), "gpu-a", 8, false).await;
    let (status, pod) = create(
        &app,
        &ada.access_token,
        &ada.org_id,
        json!({"name": "live", "image": "kiln/demo-model:1", "gpu": {"type": "h100-80gb", "count": 1}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pod}");
    let id = pod["id"].as_str().unwrap().to_owned();
    let path = format!("{}/{id}/events", pods(&ada.org_id));

    let body = reqwest::Client::new()
        .get(format!("{}{path}", app.url))
        .bearer_auth(&ada.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(body.status(), StatusCode::OK);
    assert!(
        body.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut events = Events {
        body,
        buf: String::new(),
    };
    let first = events.next().await.unwrap();
    assert_eq!(
        (first["id"].as_str(), first["state"].as_str()),
        (Some(id.as_str()), Some("pending"))
    );

    // Placed: the stream says so at once (woken by the database's notice).
    schedule(&app).await;
    let placed = events.next().await.unwrap();
    assert_eq!(placed["state"], "scheduled");
    assert!(placed["node"].is_string());

    // Deleted: a last event, then the stream ends.
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("{}/{id}", pods(&ada.org_id)),
            Some(&ada.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let last = events.next().await.unwrap();
    assert_eq!(last["state"], "terminated");
    assert!(
        events.next().await.is_none(),
        "the stream ends after a final state"
    );

    // Another org's pod is a 404, not an empty stream.
    let bob = app.user("bob").await;
    let (status, body) = app
        .get(
            &format!("/v1/orgs/{}/pods/{id}/events", ada.org_id),
            &bob.access_token,
        )
        .await;
    assert_problem(status, &body, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn shutting_down_ends_live_streams_instead_of_waiting_for_them(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let (_, pod) = create(
        &app,
        &ada.access_token,
        &ada.org_id,
        json!({"name": "watched", "image": "kiln/demo-model:1"}),
    )
    .await;
    let id = pod["id"].as_str().unwrap().to_owned();
    let base = format!("{}/{id}", pods(&ada.org_id));
    let mut events = follow(&app, &ada.access_token, &format!("{base}/events"), None).await;
    assert!(events.next().await.is_some(), "the stream is open");
    let mut logs = follow(
        &app,
        &ada.access_token,
        &format!("{base}/logs?follow=true"),
        None,
    )
    .await;
    // A console left open must not hold the server's drain: stop returns, the streams end.
    tokio::time::timeout(std::time::Duration::from_secs(20), app.stop())
        .await
        .expect("the server stops with live streams open");
    assert!(events.next().await.is_none());
    assert!(logs.next_named("log").await.is_none());
}
