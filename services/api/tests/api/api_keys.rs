use kiln_testkit::TestApp;
use kiln_testkit::serde_json::json;
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

use crate::{assert_problem, error_fields};

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_key_is_shown_once_works_and_dies_when_revoked(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let org = u.org_id.clone();
    let (status, created) = app
        .post(
            &format!("/v1/orgs/{org}/api-keys"),
            &u.access_token,
            json!({"name": "ci"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["key"].as_str().unwrap().to_owned();
    let prefix = created["prefix"].as_str().unwrap().to_owned();
    assert!(
        secret.starts_with("kiln_") && secret.len() >= 48,
        "{secret}"
    );
    assert!(secret.starts_with(&prefix));
    assert_eq!(created["role"], "member", "default role");

    // The list shows the prefix, never the secret; the database holds only a digest.
    let (_, list) = app
        .get(&format!("/v1/orgs/{org}/api-keys"), &u.access_token)
        .await;
    assert!(!list.to_string().contains(&secret[12..]));
    assert_eq!(list["items"][0]["prefix"], prefix);
    let (stored,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM api_keys WHERE position(convert_to($1, 'UTF8') IN secret_hash) > 0",
    )
    .bind(&secret[5..20])
    .fetch_one(app.store().pool())
    .await
    .unwrap();
    assert_eq!(stored, 0);

    // The key authenticates, and records its use.
    let (status, me) = app.get("/v1/me", &secret).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["api_key"]["org_id"], org.as_str());
    let (_, list) = app
        .get(&format!("/v1/orgs/{org}/api-keys"), &u.access_token)
        .await;
    assert!(list["items"][0]["last_used_at"].is_string());

    let id = created["id"].as_str().unwrap();
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/orgs/{org}/api-keys/{id}"),
            Some(&u.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = app.get("/v1/me", &secret).await;
    assert_problem(status, &body, StatusCode::UNAUTHORIZED);
    let (_, list) = app
        .get(&format!("/v1/orgs/{org}/api-keys"), &u.access_token)
        .await;
    assert!(list["items"][0]["revoked_at"].is_string());
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn keys_expire_and_bad_expiries_are_refused(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("bob").await;
    let org = u.org_id.clone();
    for bad in ["yesterday", "2001-01-01T00:00:00Z"] {
        let (status, body) = app
            .post(
                &format!("/v1/orgs/{org}/api-keys"),
                &u.access_token,
                json!({"name": "k", "expires_at": bad}),
            )
            .await;
        assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error_fields(&body), ["expires_at"]);
    }
    let (status, created) = app
        .post(
            &format!("/v1/orgs/{org}/api-keys"),
            &u.access_token,
            json!({"name": "k", "expires_at": "2099-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let secret = created["key"].as_str().unwrap();
    assert_eq!(app.get("/v1/me", secret).await.0, StatusCode::OK);
    sqlx::query("UPDATE api_keys SET expires_at = now() - interval '1 second'")
        .execute(app.store().pool())
        .await
        .unwrap();
    assert_eq!(app.get("/v1/me", secret).await.0, StatusCode::UNAUTHORIZED);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn nobody_mints_a_key_stronger_than_themselves(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let owner = app.user("olive").await;
    let member = app.user("mia").await;
    let viewer = app.user("vic").await;
    let org = owner.org_id.clone();
    app.add_member(&owner, &org, &member, "member").await;
    app.add_member(&owner, &org, &viewer, "viewer").await;

    let (status, body) = app
        .post(
            &format!("/v1/orgs/{org}/api-keys"),
            &member.access_token,
            json!({"name": "k", "role": "admin"}),
        )
        .await;
    assert_problem(status, &body, StatusCode::FORBIDDEN);
    let (status, body) = app
        .post(
            &format!("/v1/orgs/{org}/api-keys"),
            &viewer.access_token,
            json!({"name": "k"}),
        )
        .await;
    assert_problem(status, &body, StatusCode::FORBIDDEN);

    // A viewer key reads but cannot write, even through a key-made key.
    let (_, viewer_key) = app.api_key(&owner, &org, "viewer").await;
    assert_eq!(
        app.get(&format!("/v1/orgs/{org}/members"), &viewer_key)
            .await
            .0,
        StatusCode::OK
    );
    let (status, body) = app
        .post(
            &format!("/v1/orgs/{org}/api-keys"),
            &viewer_key,
            json!({"name": "k"}),
        )
        .await;
    assert_problem(status, &body, StatusCode::FORBIDDEN);

    // Members may revoke their own keys, not someone else's.
    let (owner_key_id, _) = app.api_key(&owner, &org, "member").await;
    let (status, body) = app
        .call(
            Method::DELETE,
            &format!("/v1/orgs/{org}/api-keys/{owner_key_id}"),
            Some(&member.access_token),
            None,
        )
        .await;
    assert_problem(status, &body, StatusCode::FORBIDDEN);
    let (mine, _) = app.api_key(&member, &org, "member").await;
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/orgs/{org}/api-keys/{mine}"),
            Some(&member.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}
