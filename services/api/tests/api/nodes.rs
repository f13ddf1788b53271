use kiln_auth::{OpaqueSecret, SecretDigest};
use kiln_domain::Email;
use kiln_store::NewNode;
use kiln_testkit::TestApp;
use kiln_testkit::serde_json::{Value, json};
use reqwest::{Method, StatusCode};
use sqlx::PgPool;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::{assert_problem, error_fields};

/// Make `op@example.com` an operator (as `KILN_ADMIN_EMAIL` does at start-up) and sign in.
async fn operator(app: &TestApp) -> String {
    let (email, password) = ("op@example.com", "op-correct-horse-battery");
    let hash = app.state.hasher.hash(password).unwrap();
    app.store()
        .user_ensure_operator(&Email::parse("email", email).unwrap(), &hash)
        .await
        .unwrap();
    app.login(email, password).await.0
}

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
    let op = operator(&app).await;

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

    let (status, one) = app.get(&format!("/v1/admin/nodes/{node}"), &op).await;
    assert_eq!(status, StatusCode::OK, "{one}");
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
    let op = operator(&app).await;
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
    assert_eq!(audited(&app, "node_token.create").await, 1);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn bad_token_lifetimes_and_notes_are_refused(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = operator(&app).await;
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
