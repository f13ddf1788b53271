use kiln_testkit::TestApp;
use kiln_testkit::serde_json::json;
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

use crate::assert_problem;

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn admins_read_who_did_what(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let owner = app.user("olive").await;
    let bob = app.user("bob").await;
    let org = owner.org_id.clone();
    app.add_member(&owner, &org, &bob, "member").await;
    let (key_id, _) = app.api_key(&owner, &org, "viewer").await;
    app.call(
        Method::DELETE,
        &format!("/v1/orgs/{org}/api-keys/{key_id}"),
        Some(&owner.access_token),
        None,
    )
    .await;
    app.call(
        Method::PATCH,
        &format!("/v1/orgs/{org}/members/{}", bob.user_id),
        Some(&owner.access_token),
        Some(json!({"role": "viewer"})),
    )
    .await;

    let (status, log) = app
        .get(&format!("/v1/orgs/{org}/audit-log"), &owner.access_token)
        .await;
    assert_eq!(status, StatusCode::OK, "{log}");
    let actions: Vec<&str> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for expected in [
        "auth.signup",
        "auth.login",
        "member.add",
        "api_key.create",
        "api_key.revoke",
        "member.update",
    ] {
        assert!(
            actions.contains(&expected),
            "{expected} missing from {actions:?}"
        );
    }
    assert_eq!(actions[0], "member.update", "newest first: {actions:?}");
    let add = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "member.add")
        .unwrap();
    assert_eq!(add["actor_email"], "olive@example.com");
    assert_eq!(add["target"], bob.user_id.as_str());
    assert_eq!(add["ip"], "127.0.0.1");

    // Bob's sign-ins show in the org he belongs to; a member cannot read the log.
    let (status, body) = app
        .get(&format!("/v1/orgs/{org}/audit-log"), &bob.access_token)
        .await;
    assert_problem(status, &body, StatusCode::FORBIDDEN);

    // Paging.
    let (_, p1) = app
        .get(
            &format!("/v1/orgs/{org}/audit-log?limit=2"),
            &owner.access_token,
        )
        .await;
    let cursor = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = app
        .get(
            &format!("/v1/orgs/{org}/audit-log?limit=2&cursor={cursor}"),
            &owner.access_token,
        )
        .await;
    let a: i64 = p1["items"][1]["id"].as_str().unwrap().parse().unwrap();
    let b: i64 = p2["items"][0]["id"].as_str().unwrap().parse().unwrap();
    assert!(b < a);
}
