//! GraphQL at `/graphql`, over real HTTP against a real server and database: the same answers
//! and the same authorisation as the REST identity API, and the checked-in SDL.

#![allow(
    clippy::unwrap_used,
    reason = "a test that cannot unwrap should fail right there"
)]

use std::path::Path;

use kiln_testkit::serde_json::{Value, json};
use kiln_testkit::{TestApp, TestUser};
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

// ---- helpers ----

/// POST a GraphQL request; GraphQL answers 200 even when fields fail.
async fn gql(app: &TestApp, token: Option<&str>, query: &str, variables: Value) -> Value {
    let (status, body) = app
        .call(
            Method::POST,
            "/graphql",
            token,
            Some(json!({ "query": query, "variables": variables })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// The `data` of an answer that must have no errors.
#[track_caller]
fn data(body: &Value) -> &Value {
    assert!(body.get("errors").is_none(), "unexpected errors: {body}");
    &body["data"]
}

/// The only error of an answer: (code, HTTP status equivalent, message).
#[track_caller]
fn only_error(body: &Value) -> (String, u64, String) {
    let errors = body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("expected errors: {body}"));
    assert_eq!(errors.len(), 1, "{body}");
    error_of(&errors[0])
}

#[track_caller]
fn error_of(e: &Value) -> (String, u64, String) {
    (
        e["extensions"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no code: {e}"))
            .to_owned(),
        e["extensions"]["status"]
            .as_u64()
            .unwrap_or_else(|| panic!("no status: {e}")),
        e["message"].as_str().unwrap_or_default().to_owned(),
    )
}

/// The `fields` a validation error names, sorted.
#[track_caller]
fn error_fields(body: &Value) -> Vec<String> {
    let mut f: Vec<String> = body["errors"][0]["extensions"]["fields"]
        .as_array()
        .unwrap_or_else(|| panic!("no fields: {body}"))
        .iter()
        .map(|f| f["field"].as_str().unwrap_or_default().to_owned())
        .collect();
    f.sort();
    f
}

const ME: &str =
    "{ me { user { id email } memberships { orgId role personal } apiKey { id orgId role } } }";

// ---- identity ----

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn signup_login_me_refresh_and_logout(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let signup = gql(
        &app,
        None,
        "mutation($input: SignupInput!) { signup(input: $input) { user { id email name } org { id role personal } } }",
        json!({ "input": { "email": " Ada@Example.com ", "password": "correct horse battery", "name": "Ada" } }),
    )
    .await;
    let s = &data(&signup)["signup"];
    assert_eq!(s["user"]["email"], "ada@example.com");
    assert_eq!(s["org"]["role"], "owner");
    assert_eq!(s["org"]["personal"], true);
    let (user_id, org_id) = (
        s["user"]["id"].as_str().unwrap().to_owned(),
        s["org"]["id"].as_str().unwrap().to_owned(),
    );

    let login = "mutation($input: LoginInput!) { login(input: $input) { accessToken refreshToken expiresIn tokenType } }";
    let creds =
        json!({ "input": { "email": "ada@example.com", "password": "correct horse battery" } });
    let body = gql(&app, None, login, creds.clone()).await;
    let pair = &data(&body)["login"];
    assert_eq!(pair["tokenType"], "Bearer");
    assert!(pair["expiresIn"].as_i64().unwrap() > 0);
    let access = pair["accessToken"].as_str().unwrap().to_owned();
    let refresh = pair["refreshToken"].as_str().unwrap().to_owned();

    let body = gql(&app, Some(&access), ME, json!({})).await;
    let me = &data(&body)["me"];
    assert_eq!(me["user"]["id"], user_id.as_str());
    assert_eq!(
        me["memberships"],
        json!([{ "orgId": org_id, "role": "owner", "personal": true }])
    );
    assert_eq!(me["apiKey"], Value::Null);
    // The REST view of the same caller agrees.
    let (status, rest) = app.get("/v1/me", &access).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rest["user"]["id"], user_id.as_str());
    assert_eq!(rest["memberships"][0]["org_id"], org_id.as_str());

    // Refresh rotates; the spent token presented again ends the session.
    let refresh_q = "mutation($t: String!) { refresh(input: { refreshToken: $t }) { accessToken refreshToken } }";
    let body = gql(&app, None, refresh_q, json!({ "t": refresh })).await;
    let new_access = data(&body)["refresh"]["accessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    data(&gql(&app, Some(&new_access), ME, json!({})).await);
    let body = gql(&app, None, refresh_q, json!({ "t": refresh })).await;
    let (code, status, message) = only_error(&body);
    assert_eq!((code.as_str(), status), ("unauthenticated", 401), "{body}");
    assert!(message.contains("already used"), "{message}");
    assert_eq!(body["data"]["refresh"], Value::Null);
    let (code, _, _) = only_error(&gql(&app, Some(&new_access), ME, json!({})).await);
    assert_eq!(code, "unauthenticated", "reuse revoked the session");

    // Logout ends the caller's own session.
    let body = gql(&app, None, login, creds).await;
    let access = data(&body)["login"]["accessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let body = gql(&app, Some(&access), "mutation { logout }", json!({})).await;
    assert_eq!(data(&body)["logout"], true);
    let (code, _, _) = only_error(&gql(&app, Some(&access), ME, json!({})).await);
    assert_eq!(code, "unauthenticated");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn no_token_or_a_bad_token_is_unauthenticated(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    for token in [
        None,
        Some("not.a.jwt"),
        Some("kiln_0123456789abcdefghijklmnopqrstuv"),
    ] {
        let body = gql(&app, token, ME, json!({})).await;
        let (code, status, _) = only_error(&body);
        assert_eq!(
            (code.as_str(), status),
            ("unauthenticated", 401),
            "token {token:?}: {body}"
        );
        assert_eq!(body["data"]["me"], Value::Null);

        let body = gql(
            &app,
            token,
            "mutation { createOrg(input: { name: \"Acme\" }) { id } }",
            json!({}),
        )
        .await;
        assert_eq!(
            only_error(&body).0,
            "unauthenticated",
            "token {token:?}: {body}"
        );
    }
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM orgs")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(n, 0);

    // A stale token does not get in the way of fields that need none.
    let body = gql(
        &app,
        Some("not.a.jwt"),
        "mutation { signup(input: { email: \"x\", password: \"\", name: \"X\" }) { user { id } } }",
        json!({}),
    )
    .await;
    assert_eq!(only_error(&body).0, "validation", "{body}");
}

// ---- orgs, members, API keys ----

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn orgs_members_and_api_keys_round_trip_and_rest_agrees(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let t = Some(alice.access_token.as_str());

    let body = gql(
        &app,
        t,
        "mutation { createOrg(input: { name: \"Acme\" }) { id name role personal } }",
        json!({}),
    )
    .await;
    let org = &data(&body)["createOrg"];
    assert_eq!(
        (
            org["name"].as_str(),
            org["role"].as_str(),
            org["personal"].as_bool()
        ),
        (Some("Acme"), Some("owner"), Some(false))
    );
    let org_id = org["id"].as_str().unwrap().to_owned();
    let vars = json!({ "org": org_id, "user": bob.user_id, "email": bob.email });
    let body = gql(
        &app,
        t,
        "query($org: ID!) { orgs { items { id } nextCursor } org(id: $org) { name } }",
        vars.clone(),
    )
    .await;
    let ids: Vec<&str> = data(&body)["orgs"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["id"].as_str())
        .collect();
    assert!(
        ids.contains(&org_id.as_str()) && ids.contains(&alice.org_id.as_str()),
        "{body}"
    );
    assert_eq!(body["data"]["org"]["name"], "Acme");

    let body = gql(&app, t, "mutation($org: ID!, $email: String!) { addMember(orgId: $org, input: { email: $email, role: \"viewer\" }) { userId role } }", vars.clone()).await;
    assert_eq!(
        data(&body)["addMember"],
        json!({ "userId": bob.user_id, "role": "viewer" })
    );
    let body = gql(&app, t, "mutation($org: ID!, $user: ID!) { updateMember(orgId: $org, userId: $user, input: { role: \"member\" }) { role } }", vars.clone()).await;
    assert_eq!(data(&body)["updateMember"]["role"], "member");
    let body = gql(
        &app,
        t,
        "query($org: ID!) { members(orgId: $org) { items { userId role } } }",
        vars.clone(),
    )
    .await;
    assert_eq!(data(&body)["members"]["items"].as_array().unwrap().len(), 2);

    // An API key: the secret once, then the same key through GraphQL and REST.
    let body = gql(&app, t, "mutation($org: ID!) { createApiKey(orgId: $org, input: { name: \"ci\" }) { id prefix key role } }", vars.clone()).await;
    let created = data(&body)["createApiKey"].clone();
    let (key_id, secret) = (
        created["id"].as_str().unwrap().to_owned(),
        created["key"].as_str().unwrap().to_owned(),
    );
    assert!(secret.starts_with(created["prefix"].as_str().unwrap()) && secret.starts_with("kiln_"));
    assert_eq!(created["role"], "member", "the default role");
    let body = gql(&app, t, "query($org: ID!) { apiKeys(orgId: $org) { items { id name prefix role createdBy revokedAt } } }", vars.clone()).await;
    let listed = data(&body)["apiKeys"]["items"].clone();
    assert_eq!(
        listed,
        json!([{ "id": key_id, "name": "ci", "prefix": created["prefix"], "role": "member", "createdBy": alice.user_id, "revokedAt": null }])
    );
    let (status, rest) = app
        .get(&format!("/v1/orgs/{org_id}/api-keys"), &alice.access_token)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&rest["items"][0]["id"], &rest["items"][0]["prefix"]),
        (&listed[0]["id"], &listed[0]["prefix"])
    );
    assert!(
        !rest.to_string().contains(&secret) && !listed.to_string().contains(&secret),
        "the secret is shown once"
    );

    // The key is a caller of its own.
    let body = gql(&app, Some(&secret), ME, json!({})).await;
    assert_eq!(
        data(&body)["me"]["apiKey"],
        json!({ "id": key_id, "orgId": org_id, "role": "member" })
    );

    let body = gql(&app, t, "mutation($org: ID!, $key: ID!) { revokeApiKey(orgId: $org, keyId: $key) { id revokedAt } }", json!({ "org": org_id, "key": key_id })).await;
    let revoked_at = data(&body)["revokeApiKey"]["revokedAt"]
        .as_str()
        .expect("revokedAt")
        .to_owned();
    let (_, rest) = app
        .get(&format!("/v1/orgs/{org_id}/api-keys"), &alice.access_token)
        .await;
    assert_eq!(rest["items"][0]["revoked_at"], revoked_at.as_str());
    assert_eq!(
        only_error(&gql(&app, Some(&secret), ME, json!({})).await).0,
        "unauthenticated",
        "a revoked key stops working"
    );

    // Everything above is in the audit log, the same through both surfaces, with the client's address.
    // (The log also holds the members' org-less events, such as sign-ins; look at the org's own.)
    let body = gql(
        &app,
        t,
        "query($org: ID!) { auditLog(orgId: $org) { items { id orgId action ip details } } }",
        vars.clone(),
    )
    .await;
    let all = data(&body)["auditLog"]["items"].as_array().unwrap().clone();
    let events: Vec<&Value> = all
        .iter()
        .filter(|e| e["orgId"] == org_id.as_str())
        .collect();
    let actions: Vec<&str> = events.iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(
        actions,
        [
            "api_key.revoke",
            "api_key.create",
            "member.update",
            "member.add",
            "org.create"
        ]
    );
    assert!(events.iter().all(|e| e["ip"] == "127.0.0.1"), "{events:?}");
    assert_eq!(events[3]["details"]["role"], "viewer", "details are JSON");
    let (_, rest) = app
        .get(&format!("/v1/orgs/{org_id}/audit-log"), &alice.access_token)
        .await;
    let rest_ids: Vec<&Value> = rest["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["id"])
        .collect();
    assert_eq!(rest_ids, all.iter().map(|e| &e["id"]).collect::<Vec<_>>());

    let body = gql(
        &app,
        t,
        "mutation($org: ID!, $user: ID!) { removeMember(orgId: $org, userId: $user) }",
        vars,
    )
    .await;
    assert_eq!(data(&body)["removeMember"], true);
    let (_, rest) = app
        .get(&format!("/v1/orgs/{org_id}/members"), &alice.access_token)
        .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_eq!(rest["items"][0]["user_id"], alice.user_id.as_str());
}

/// Another org's resources are not found, exactly as REST answers 404, and nothing changes.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn another_orgs_resources_are_not_found(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let alice = app.user("alice").await;
    let mallory = app.user("mallory").await;
    let (key_id, _) = app.api_key(&alice, &alice.org_id, "member").await;
    let vars = json!({ "org": alice.org_id, "user": alice.user_id, "key": key_id, "email": mallory.email });

    // Each root field fails on its own: one error per field, by path.
    let reads = "query($org: ID!) { org(id: $org) { id } members(orgId: $org) { items { userId } } \
                 apiKeys(orgId: $org) { items { id } } auditLog(orgId: $org) { items { id } } }";
    let writes = "mutation($org: ID!, $user: ID!, $key: ID!, $email: String!) { \
                  addMember(orgId: $org, input: { email: $email, role: \"owner\" }) { userId } \
                  updateMember(orgId: $org, userId: $user, input: { role: \"viewer\" }) { role } \
                  removeMember(orgId: $org, userId: $user) \
                  createApiKey(orgId: $org, input: { name: \"mine\" }) { key } \
                  revokeApiKey(orgId: $org, keyId: $key) { id } }";
    let (status, rest) = app
        .get(
            &format!("/v1/orgs/{}/members", alice.org_id),
            &mallory.access_token,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for (query, fields) in [
        (reads, &["org", "members", "apiKeys", "auditLog"][..]),
        (
            writes,
            &[
                "addMember",
                "updateMember",
                "removeMember",
                "createApiKey",
                "revokeApiKey",
            ][..],
        ),
    ] {
        let body = gql(&app, Some(&mallory.access_token), query, vars.clone()).await;
        let errors = body["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{body}"));
        let mut paths: Vec<&str> = errors
            .iter()
            .filter_map(|e| e["path"][0].as_str())
            .collect();
        paths.sort_unstable();
        let mut want = fields.to_vec();
        want.sort_unstable();
        assert_eq!(paths, want, "{body}");
        for e in errors {
            let (code, status, message) = error_of(e);
            assert_eq!((code.as_str(), status), ("not-found", 404), "{e}");
            assert_eq!(
                message,
                rest["detail"].as_str().unwrap(),
                "the same words as REST"
            );
            assert_eq!(body["data"][e["path"][0].as_str().unwrap()], Value::Null);
        }
    }
    // A made-up org id is just as absent.
    let body = gql(
        &app,
        Some(&mallory.access_token),
        "{ members(orgId: \"org_nope\") { items { userId } } }",
        json!({}),
    )
    .await;
    assert_eq!(only_error(&body).0, "not-found");

    let (_, keys) = app
        .get(
            &format!("/v1/orgs/{}/api-keys", alice.org_id),
            &alice.access_token,
        )
        .await;
    assert_eq!(
        keys["items"][0]["revoked_at"],
        Value::Null,
        "the key was not revoked"
    );
    let (_, members) = app
        .get(
            &format!("/v1/orgs/{}/members", alice.org_id),
            &alice.access_token,
        )
        .await;
    assert_eq!(
        members["items"].as_array().unwrap().len(),
        1,
        "nobody was added: {members}"
    );
    assert_eq!(members["items"][0]["role"], "owner");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_viewer_cannot_create_api_keys(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    app.add_member(&alice, &alice.org_id, &bob, "viewer").await;

    let body = gql(
        &app,
        Some(&bob.access_token),
        "mutation($org: ID!) { createApiKey(orgId: $org, input: { name: \"sneaky\" }) { key } }",
        json!({ "org": alice.org_id }),
    )
    .await;
    let (code, status, message) = only_error(&body);
    assert_eq!((code.as_str(), status), ("forbidden", 403), "{body}");
    let (rest_status, rest) = app
        .post(
            &format!("/v1/orgs/{}/api-keys", alice.org_id),
            &bob.access_token,
            json!({ "name": "sneaky" }),
        )
        .await;
    assert_eq!(rest_status, StatusCode::FORBIDDEN);
    assert_eq!(message, rest["detail"].as_str().unwrap());

    // Reading is still allowed.
    let body = gql(
        &app,
        Some(&bob.access_token),
        "query($org: ID!) { members(orgId: $org) { items { role } } }",
        json!({ "org": alice.org_id }),
    )
    .await;
    assert_eq!(data(&body)["members"]["items"].as_array().unwrap().len(), 2);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM api_keys")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn validation_errors_list_every_bad_field(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let body = gql(&app, None, "mutation { signup(input: { email: \"not-an-email\", password: \"short\", name: \"\" }) { user { id } } }", json!({})).await;
    let (code, status, _) = only_error(&body);
    assert_eq!((code.as_str(), status), ("validation", 422), "{body}");
    assert_eq!(error_fields(&body), ["email", "name", "password"]);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM users")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(n, 0);

    // Fields are named as in the schema (camelCase), each with its message.
    let alice: TestUser = app.user("alice").await;
    let body = gql(
        &app,
        Some(&alice.access_token),
        "mutation($org: ID!) { createApiKey(orgId: $org, input: { name: \"\", role: \"root\", expiresAt: \"tomorrow\" }) { key } }",
        json!({ "org": alice.org_id }),
    )
    .await;
    assert_eq!(only_error(&body).0, "validation");
    assert_eq!(error_fields(&body), ["expiresAt", "name", "role"]);
    let expires = body["errors"][0]["extensions"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == "expiresAt")
        .cloned()
        .unwrap();
    assert!(
        expires["message"].as_str().unwrap().contains("RFC 3339"),
        "{expires}"
    );

    let body = gql(
        &app,
        Some(&alice.access_token),
        "query($org: ID!) { members(orgId: $org, limit: 0) { items { userId } } }",
        json!({ "org": alice.org_id }),
    )
    .await;
    assert_eq!(error_fields(&body), ["limit"]);
}

// ---- the endpoint itself ----

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn serves_the_playground_introspection_and_refuses_abuse(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let resp = app
        .client
        .get(format!("{}/graphql", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(resp.text().await.unwrap().contains("/graphql"));

    // The full introspection query of graphql-js, as tools send it, fits within the limits.
    let body = gql(&app, None, INTROSPECTION, json!({})).await;
    let types = data(&body)["__schema"]["types"].as_array().unwrap();
    assert!(types.iter().any(|t| t["name"] == "ApiKeyCreatedView"));

    let deep = format!(
        "{{ __schema {{ types {{ fields {{ type {{ {} kind {} }} }} }} }} }}",
        "ofType { ".repeat(11),
        "}".repeat(11)
    );
    let body = gql(&app, None, &deep, json!({})).await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nested too deep"),
        "{body}"
    );
    let wide = format!(
        "{{ {} }}",
        (0..200)
            .map(|i| format!("a{i}: me {{ memberships {{ role }} }}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let body = gql(&app, None, &wide, json!({})).await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("too complex"),
        "{body}"
    );

    // A body that is not a GraphQL request is a GraphQL-shaped error with the HTTP status.
    let (status, body) = app
        .call(Method::POST, "/graphql", None, Some(json!([1, 2])))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(only_error(&body).0, "bad-request");
}

// ---- the fleet (operators only) ----

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn operators_list_nodes_with_gpus_and_cordon_them(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let hash = app.state.hasher.hash("op-correct-horse-battery").unwrap();
    app.store()
        .user_ensure_operator(
            &kiln_domain::Email::parse("email", "op@example.com").unwrap(),
            &hash,
        )
        .await
        .unwrap();
    let op = app
        .login("op@example.com", "op-correct-horse-battery")
        .await
        .0;
    let (_, created) = app.post("/v1/admin/node-tokens", &op, json!({})).await;
    let mut tx = app.store().begin().await.unwrap();
    let node = app
        .store()
        .node_join(
            &mut tx,
            kiln_store::NewNode {
                token: &kiln_auth::SecretDigest::of(created["token"].as_str().unwrap()),
                hostname: "gpu-01",
                agent_version: "0.1.0",
                credential: &kiln_auth::OpaqueSecret::generate("kiln_ncr").digest(),
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    app.store()
        .node_register(
            node,
            &kiln_store::NodeRegistration {
                hostname: "gpu-01".into(),
                agent_version: "0.1.0".into(),
                protocol_minor: 0,
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
                cpu_cores: 32,
                memory_mib: 262_144,
                disk_gib: 500,
                gpus: vec![kiln_store::GpuRegistration {
                    uuid: "GPU-l40s-0".into(),
                    index: 0,
                    model: "NVIDIA L40S".into(),
                    gpu_type: Some("l40s-48gb".into()),
                    memory_mib: 46_068,
                    pci_bus_id: "00000000:41:00.0".into(),
                    numa_node: Some(1),
                    iommu_group: None,
                    mig_capable: false,
                    mig_enabled: false,
                    mig_instances: vec![],
                    nvlink_peers: vec![],
                }],
            },
        )
        .await
        .unwrap();
    let node = node.to_string();

    const NODES: &str = "{ nodes { items { id hostname state gpuSummary { count gpuTypes } \
                         gpus { uuid health allocated } } } }";
    let body = gql(&app, Some(&op), NODES, json!({})).await;
    let items = &data(&body)["nodes"]["items"];
    assert_eq!(
        items,
        &json!([{"id": node, "hostname": "gpu-01", "state": "ready",
                 "gpuSummary": {"count": 1, "gpuTypes": ["l40s-48gb"]},
                 "gpus": [{"uuid": "GPU-l40s-0", "health": "healthy", "allocated": false}]}])
    );

    const CORDON: &str = "mutation($id: ID!) { cordonNode(id: $id) { id state adminState } }";
    let body = gql(&app, Some(&op), CORDON, json!({ "id": node })).await;
    assert_eq!(
        data(&body)["cordonNode"],
        json!({"id": node, "state": "cordoned", "adminState": "cordoned"})
    );
    let body = gql(
        &app,
        Some(&op),
        "query($id: ID!) { node(id: $id) { state gpus { uuid } gpuEvents { kind } } }",
        json!({ "id": node }),
    )
    .await;
    assert_eq!(
        data(&body)["node"],
        json!({"state": "cordoned", "gpus": [{"uuid": "GPU-l40s-0"}], "gpuEvents": []})
    );
    let body = gql(
        &app,
        Some(&op),
        "mutation($id: ID!) { uncordonNode(id: $id) { state } drainNode(id: $id) { state } }",
        json!({ "id": node }),
    )
    .await;
    assert_eq!(
        data(&body),
        &json!({"uncordonNode": {"state": "ready"}, "drainNode": {"state": "draining"}})
    );
    let body = gql(
        &app,
        Some(&op),
        "{ fleetCapacity { items { gpuType total schedulable } } }",
        json!({}),
    )
    .await;
    assert_eq!(
        data(&body)["fleetCapacity"]["items"],
        json!([{"gpuType": "l40s-48gb", "total": 1, "schedulable": 0}])
    );

    // Anyone else: not found, and nothing changes.
    let ada = app.user("ada").await;
    let body = gql(&app, Some(&ada.access_token), NODES, json!({})).await;
    assert_eq!(only_error(&body).0, "not-found", "{body}");
    assert_eq!(body["data"]["nodes"], Value::Null);
    let body = gql(&app, Some(&ada.access_token), CORDON, json!({ "id": node })).await;
    assert_eq!(only_error(&body).0, "not-found", "{body}");
    let (_, one) = app.get(&format!("/v1/admin/nodes/{node}"), &op).await;
    assert_eq!(one["state"], "draining");
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM audit_events WHERE action LIKE 'node.%'")
            .fetch_one(app.store().pool())
            .await
            .unwrap();
    assert_eq!(n, 3, "cordon, uncordon and drain by the operator only");
}

// ---- instances ----

const INSTANCE_FIELDS: &str = "id name image state power rebootCount gpuType gpuCount node gpus \
                               diskGib sshPublicKeys ssh { host port user command }";

/// An instance's life through GraphQL: created from the catalog (`images`), placed, reachable
/// over SSH once its node reports the port, stopped, started, rebooted and terminated — the
/// same answers as REST, since both call `ops::instances`.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn instances_are_created_powered_and_terminated(pool: PgPool) {
    use kiln_testkit::instances::{SSH_KEY, catalog_image, report_running};
    let app = TestApp::spawn(pool).await;
    catalog_image(app.store(), "kiln-tiny").await;
    let ada = app.user("ada").await;
    let token = Some(ada.access_token.as_str());

    let body = gql(
        &app,
        token,
        "{ images { items { name loginUser minDiskGib status } } }",
        json!({}),
    )
    .await;
    assert_eq!(
        data(&body)["images"]["items"],
        json!([{"name": "kiln-tiny", "loginUser": "root", "minDiskGib": 1, "status": "active"}])
    );

    let create = format!(
        "mutation($org: ID!, $input: CreateInstanceInput!) {{ createInstance(orgId: $org, input: $input) {{ {INSTANCE_FIELDS} }} }}"
    );
    let body = gql(
        &app,
        token,
        &create,
        json!({ "org": ada.org_id, "input": {
            "name": "trainer", "gpuType": "h100-80gb", "gpuCount": 2, "image": "kiln-tiny",
            "sshPublicKeys": [SSH_KEY], "diskGib": 40 } }),
    )
    .await;
    let ins = data(&body)["createInstance"].clone();
    let id = ins["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ins_"), "{ins}");
    assert_eq!(ins["state"], "pending");
    assert_eq!(ins["gpuCount"], 2);
    assert_eq!(ins["diskGib"], 40);
    assert_eq!(ins["sshPublicKeys"], json!([SSH_KEY]));
    assert_eq!(ins["ssh"], Value::Null, "no SSH before it has a node");

    let node = kiln_testkit::fleet::registered_node(app.store(), "gpu-a", 4, false).await;
    kiln_scheduler::Placer::new(app.store().clone())
        .pass()
        .await
        .unwrap();
    report_running(app.store(), node, 40022).await;
    let one = format!(
        "query($org: ID!, $id: ID!) {{ instance(orgId: $org, id: $id) {{ {INSTANCE_FIELDS} }} }}"
    );
    let vars = json!({ "org": ada.org_id, "id": id });
    let body = gql(&app, token, &one, vars.clone()).await;
    let got = &data(&body)["instance"];
    assert_eq!(got["state"], "running", "{got}");
    assert_eq!(got["node"], node.to_string());
    assert_eq!(got["gpus"].as_array().unwrap().len(), 2, "{got}");
    assert_eq!(
        got["ssh"],
        json!({"host": "gpu-a", "port": 40022, "user": "root", "command": "ssh -p 40022 root@gpu-a"})
    );
    let (_, rest) = app
        .get(
            &format!("/v1/orgs/{}/instances/{id}", ada.org_id),
            &ada.access_token,
        )
        .await;
    assert_eq!(rest["ssh"]["command"], got["ssh"]["command"], "REST agrees");

    // Its serial console, as the agent pushes it.
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
            at_unix_ms: 1_790_000_000_000,
        })
        .collect();
    logs.append(uuid, &lines).await.unwrap();
    let body = gql(
        &app,
        token,
        "query($org: ID!, $id: ID!) { instanceConsole(orgId: $org, id: $id, tail: 1) { text source } }",
        vars.clone(),
    )
    .await;
    assert_eq!(
        data(&body)["instanceConsole"],
        json!([{"text": "trainer login:", "source": "stdout"}])
    );

    let body = gql(
        &app,
        token,
        "query($org: ID!) { instances(orgId: $org) { items { id state } nextCursor } }",
        json!({ "org": ada.org_id }),
    )
    .await;
    assert_eq!(
        data(&body)["instances"],
        json!({"items": [{"id": id, "state": "running"}], "nextCursor": null})
    );

    // Reboot counts up; stop gives the GPUs back; start takes them again.
    let body = gql(
        &app,
        token,
        "mutation($org: ID!, $id: ID!) { rebootInstance(orgId: $org, id: $id) { rebootCount state } }",
        vars.clone(),
    )
    .await;
    assert_eq!(
        data(&body)["rebootInstance"],
        json!({"rebootCount": 1, "state": "running"})
    );
    let body = gql(
        &app,
        token,
        "mutation($org: ID!, $id: ID!) { stopInstance(orgId: $org, id: $id) { state power gpus ssh { command } } }",
        vars.clone(),
    )
    .await;
    assert_eq!(
        data(&body)["stopInstance"],
        json!({"state": "stopping", "power": "stopped", "gpus": [], "ssh": null})
    );
    let body = gql(
        &app,
        token,
        "mutation($org: ID!, $id: ID!) { startInstance(orgId: $org, id: $id) { state power gpus } }",
        vars.clone(),
    )
    .await;
    let started = &data(&body)["startInstance"];
    assert_eq!(started["state"], "starting", "{started}");
    assert_eq!(started["power"], "running");
    assert_eq!(started["gpus"].as_array().unwrap().len(), 2, "{started}");

    let body = gql(
        &app,
        token,
        "mutation($org: ID!, $id: ID!) { terminateInstance(orgId: $org, id: $id) { state gpus } }",
        vars.clone(),
    )
    .await;
    assert_eq!(
        data(&body)["terminateInstance"],
        json!({"state": "terminated", "gpus": []})
    );
    // A terminated instance cannot be started again: a conflict, in REST's words.
    let body = gql(
        &app,
        token,
        "mutation($org: ID!, $id: ID!) { startInstance(orgId: $org, id: $id) { state } }",
        vars,
    )
    .await;
    let (code, status, message) = only_error(&body);
    assert_eq!((code.as_str(), status), ("conflict", 409), "{body}");
    assert!(message.contains("terminated"), "{message}");
}

/// Another org's instance is not found for every instance field, and nothing happens to it.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn another_orgs_instance_cannot_be_seen_or_stopped(pool: PgPool) {
    use kiln_testkit::instances::{SSH_KEY, catalog_image};
    let app = TestApp::spawn(pool).await;
    catalog_image(app.store(), "kiln-tiny").await;
    let alice = app.user("alice").await;
    let mallory = app.user("mallory").await;
    let (_, ins) = app
        .post(
            &format!("/v1/orgs/{}/instances", alice.org_id),
            &alice.access_token,
            json!({"name": "mine", "gpu_type": "h100-80gb", "gpu_count": 1,
                   "image": "kiln-tiny", "ssh_public_keys": [SSH_KEY]}),
        )
        .await;
    let id = ins["id"].as_str().unwrap().to_owned();
    let vars = json!({ "org": alice.org_id, "id": id });

    let reads = "query($org: ID!, $id: ID!) { instances(orgId: $org) { items { id } } \
                 instance(orgId: $org, id: $id) { id } \
                 instanceConsole(orgId: $org, id: $id) { text } }";
    let writes = "mutation($org: ID!, $id: ID!) { stopInstance(orgId: $org, id: $id) { state } \
                  startInstance(orgId: $org, id: $id) { state } \
                  rebootInstance(orgId: $org, id: $id) { state } \
                  terminateInstance(orgId: $org, id: $id) { state } \
                  createInstance(orgId: $org, input: { name: \"theirs\", gpuType: \"h100-80gb\", \
                      gpuCount: 1, image: \"kiln-tiny\", sshPublicKeys: [] }) { id } }";
    for (query, fields) in [
        (reads, &["instance", "instanceConsole", "instances"][..]),
        (
            writes,
            &[
                "createInstance",
                "rebootInstance",
                "startInstance",
                "stopInstance",
                "terminateInstance",
            ][..],
        ),
    ] {
        let body = gql(&app, Some(&mallory.access_token), query, vars.clone()).await;
        let errors = body["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{body}"));
        let mut paths: Vec<&str> = errors
            .iter()
            .filter_map(|e| e["path"][0].as_str())
            .collect();
        paths.sort_unstable();
        assert_eq!(paths, fields, "{body}");
        for e in errors {
            let (code, status, _) = error_of(e);
            assert_eq!((code.as_str(), status), ("not-found", 404), "{e}");
        }
    }
    // Alice's instance is as it was, and Mallory's org has none.
    let (_, got) = app
        .get(
            &format!("/v1/orgs/{}/instances/{id}", alice.org_id),
            &alice.access_token,
        )
        .await;
    assert_eq!(got["state"], "pending", "{got}");
    assert_eq!(got["power"], "running", "{got}");
    let body = gql(
        &app,
        Some(&mallory.access_token),
        "query($org: ID!) { instances(orgId: $org) { items { id } } }",
        json!({ "org": mallory.org_id }),
    )
    .await;
    assert_eq!(data(&body)["instances"]["items"], json!([]));
}

/// A bad instance lists every bad field, named as the schema names them, and creates nothing.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_invalid_instance_lists_every_bad_field(pool: PgPool) {
    use kiln_testkit::instances::catalog_image;
    let app = TestApp::spawn(pool).await;
    catalog_image(app.store(), "kiln-tiny").await;
    let ada = app.user("ada").await;
    let body = gql(
        &app,
        Some(&ada.access_token),
        "mutation($org: ID!, $input: CreateInstanceInput!) { createInstance(orgId: $org, input: $input) { id } }",
        json!({ "org": ada.org_id, "input": {
            "name": "Not A Label", "gpuType": "h100-80gb", "gpuCount": 9, "image": "no-such-image",
            "sshPublicKeys": ["ssh-rsa not-a-key"] } }),
    )
    .await;
    let (code, status, message) = only_error(&body);
    assert_eq!((code.as_str(), status), ("validation", 422), "{body}");
    assert_eq!(
        error_fields(&body),
        ["gpuCount", "image", "name", "sshPublicKeys[0]"],
        "{body}"
    );
    assert!(
        message.contains("unknown image `no-such-image`"),
        "{message}"
    );
    assert_eq!(body["data"]["createInstance"], Value::Null);
    let (_, list) = app
        .get(
            &format!("/v1/orgs/{}/instances", ada.org_id),
            &ada.access_token,
        )
        .await;
    assert_eq!(list["items"], json!([]), "nothing was created");
}

#[test]
fn schema_graphql_is_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema.graphql");
    let generated = kiln_api::graphql::schema_sdl();
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &generated).expect("write schema.graphql");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        let first = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "one is a prefix of the other".to_owned(),
                |i| {
                    format!(
                        "line {}: checked in `{}`, generated `{}`",
                        i + 1,
                        checked_in.lines().nth(i).unwrap_or(""),
                        generated.lines().nth(i).unwrap_or("")
                    )
                },
            );
        panic!(
            "services/api/schema.graphql differs from the schema the code generates ({first}).\n\
             If the change is intended, rerun with UPDATE_SNAPSHOTS=1 cargo test -p kiln-api --test graphql \
             to rewrite it, and review the diff: it is a public contract."
        );
    }
}

/// graphql-js's `getIntrospectionQuery()` (v16), which GraphQL tools send.
const INTROSPECTION: &str = r#"
query IntrospectionQuery {
  __schema {
    queryType { name }
    mutationType { name }
    subscriptionType { name }
    types { ...FullType }
    directives { name description locations args { ...InputValue } }
  }
}
fragment FullType on __Type {
  kind name description
  fields(includeDeprecated: true) { name description args { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason }
  inputFields { ...InputValue }
  interfaces { ...TypeRef }
  enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason }
  possibleTypes { ...TypeRef }
}
fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
fragment TypeRef on __Type {
  kind name
  ofType { kind name ofType { kind name ofType { kind name ofType { kind name
    ofType { kind name ofType { kind name ofType { kind name } } } } } } }
}
"#;

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_endpoint_is_priced_and_granted_through_graphql_and_only_by_its_owner(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (ada, bob) = (app.user("ada").await, app.user("bob").await);
    let created = gql(
        &app,
        Some(&ada.access_token),
        "mutation($org: ID!) { createEndpoint(orgId: $org, input: {name: \"llm\", image: \"kiln/demo-model:1\",
            port: 8000, minReplicas: 0, price: {perRequestMicros: 1500}}) { id price { perRequestMicros currency } } }",
        json!({ "org": ada.org_id }),
    )
    .await;
    let ep = &data(&created)["createEndpoint"];
    assert_eq!(
        ep["price"],
        json!({"perRequestMicros": 1500, "currency": "USD"})
    );
    let id = ep["id"].as_str().unwrap();
    let grant = "mutation($org: ID!, $id: ID!, $to: ID!) {
        grantEndpoint(orgId: $org, id: $id, grantee: $to) { org orgName } }";
    // Bob cannot grant himself Ada's endpoint, through his org or hers.
    for org in [&bob.org_id, &ada.org_id] {
        let body = gql(
            &app,
            Some(&bob.access_token),
            grant,
            json!({ "org": org, "id": id, "to": bob.org_id }),
        )
        .await;
        assert_eq!(only_error(&body).1, 404, "{body}");
    }
    let body = gql(
        &app,
        Some(&ada.access_token),
        grant,
        json!({ "org": ada.org_id, "id": id, "to": bob.org_id }),
    )
    .await;
    assert_eq!(data(&body)["grantEndpoint"]["org"], json!(bob.org_id));
    let granted = "query($org: ID!) { grantedEndpoints(orgId: $org) { items { id url price { perRequestMicros } } } }";
    let body = gql(
        &app,
        Some(&bob.access_token),
        granted,
        json!({ "org": bob.org_id }),
    )
    .await;
    let items = &data(&body)["grantedEndpoints"]["items"];
    assert_eq!(items[0]["id"], json!(id));
    assert_eq!(items[0]["price"]["perRequestMicros"], 1500);
    // A bad price is a validation error naming the field.
    let body = gql(
        &app,
        Some(&ada.access_token),
        "mutation($org: ID!, $id: ID!) { setEndpointPrice(orgId: $org, id: $id, price: {perRequestMicros: -5}) { id } }",
        json!({ "org": ada.org_id, "id": id }),
    )
    .await;
    assert_eq!(error_fields(&body), ["price.perRequestMicros"]);
    let body = gql(
        &app,
        Some(&ada.access_token),
        "mutation($org: ID!, $id: ID!, $to: ID!) { revokeEndpointGrant(orgId: $org, id: $id, grantee: $to) }",
        json!({ "org": ada.org_id, "id": id, "to": bob.org_id }),
    )
    .await;
    assert_eq!(data(&body)["revokeEndpointGrant"], true);
    let body = gql(
        &app,
        Some(&bob.access_token),
        granted,
        json!({ "org": bob.org_id }),
    )
    .await;
    assert_eq!(data(&body)["grantedEndpoints"]["items"], json!([]));
}
