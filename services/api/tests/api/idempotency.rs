use kiln_testkit::TestApp;
use kiln_testkit::serde_json::json;
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

use crate::assert_problem;

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn same_key_same_body_replays_and_different_body_is_refused(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let h = [("idempotency-key", "create-org-1")];
    let (s1, _, first) = app
        .call_full(
            Method::POST,
            "/v1/orgs",
            Some(&u.access_token),
            Some(json!({"name": "Acme"})),
            &h,
        )
        .await;
    let (s2, headers, second) = app
        .call_full(
            Method::POST,
            "/v1/orgs",
            Some(&u.access_token),
            Some(json!({"name": "Acme"})),
            &h,
        )
        .await;
    assert_eq!(s1, StatusCode::CREATED);
    assert_eq!(
        (s2, &second),
        (s1, &first),
        "the replay is the first answer"
    );
    assert_eq!(headers["idempotent-replayed"], "true");
    let (s3, _, body) = app
        .call_full(
            Method::POST,
            "/v1/orgs",
            Some(&u.access_token),
            Some(json!({"name": "Other"})),
            &h,
        )
        .await;
    assert_problem(s3, &body, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, orgs) = app.get("/v1/orgs", &u.access_token).await;
    assert_eq!(
        orgs["items"].as_array().unwrap().len(),
        2,
        "personal org + one Acme"
    );

    // Keys belong to their caller: another person using the same key gets their own effect.
    let v = app.user("bob").await;
    let (s4, _, theirs) = app
        .call_full(
            Method::POST,
            "/v1/orgs",
            Some(&v.access_token),
            Some(json!({"name": "Acme"})),
            &h,
        )
        .await;
    assert_eq!(s4, StatusCode::CREATED);
    assert_ne!(theirs["id"], first["id"]);

    // A bad key is a field error.
    let long = "x".repeat(300);
    let (s5, _, body) = app
        .call_full(
            Method::POST,
            "/v1/orgs",
            Some(&u.access_token),
            Some(json!({"name": "A"})),
            &[("idempotency-key", long.as_str())],
        )
        .await;
    assert_problem(s5, &body, StatusCode::UNPROCESSABLE_ENTITY);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn concurrent_duplicates_make_one_effect(pool: PgPool) {
    // A pool smaller than the burst: duplicates waiting on the first request must not starve it.
    let app = TestApp::spawn_with(pool, |c| c.db_max_connections = 4).await;
    let u = app.user("ada").await;
    let path = format!("/v1/orgs/{}/api-keys", u.org_id);
    let h = [("idempotency-key", "burst-1")];
    let calls = (0..8).map(|_| {
        app.call_full(
            Method::POST,
            &path,
            Some(&u.access_token),
            Some(json!({"name": "deploy"})),
            &h,
        )
    });
    let results = futures::future::join_all(calls).await;
    let mut ids = std::collections::HashSet::new();
    for (status, headers, body) in &results {
        match *status {
            StatusCode::CREATED => {
                ids.insert(body["id"].as_str().unwrap().to_owned());
            }
            // Still running when this duplicate arrived: told to come back.
            StatusCode::CONFLICT => {
                assert_eq!(
                    body["type"], "https://kiln.dev/problems/idempotency-key-in-progress",
                    "{body}"
                );
                assert_eq!(headers["retry-after"], "1");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(
        ids.len(),
        1,
        "every answered duplicate got the same key: {results:?}"
    );
    // Coming back gets the first answer.
    let (status, _, again) = app
        .call_full(
            Method::POST,
            &path,
            Some(&u.access_token),
            Some(json!({"name": "deploy"})),
            &h,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(ids.contains(again["id"].as_str().unwrap()));
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM api_keys")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn failures_are_not_remembered(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let h = [("idempotency-key", "retry-me")];
    let path = format!("/v1/orgs/{}/members", u.org_id);
    let body = json!({"email": "late@example.com", "role": "member"});
    let (s1, _, _) = app
        .call_full(
            Method::POST,
            &path,
            Some(&u.access_token),
            Some(body.clone()),
            &h,
        )
        .await;
    assert_eq!(
        s1,
        StatusCode::UNPROCESSABLE_ENTITY,
        "nobody with that email yet"
    );
    app.user("late").await;
    let (s2, _, m) = app
        .call_full(Method::POST, &path, Some(&u.access_token), Some(body), &h)
        .await;
    assert_eq!(
        s2,
        StatusCode::CREATED,
        "the retry after the failure runs: {m}"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn signup_is_idempotent_too(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let h = [("idempotency-key", "signup-1")];
    let body =
        json!({"email": "zed@example.com", "password": "correct horse battery", "name": "Zed"});
    let (s1, _, a) = app
        .call_full(
            Method::POST,
            "/v1/auth/signup",
            None,
            Some(body.clone()),
            &h,
        )
        .await;
    let (s2, _, b) = app
        .call_full(Method::POST, "/v1/auth/signup", None, Some(body), &h)
        .await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(a, b);
}
