//! The OpenAPI document is a public contract: it is checked in and this test fails when the
//! code's document drifts from it. Rerun with `UPDATE_SNAPSHOTS=1` to accept a change.

use kiln_testkit::TestApp;
use sqlx::PgPool;

#[test]
fn openapi_document_matches_the_checked_in_copy() {
    let generated = serde_json::to_string_pretty(&kiln_api::rest::openapi()).unwrap() + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    if std::env::var("UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") {
        std::fs::write(path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "services/api/openapi.json is out of date; rerun with UPDATE_SNAPSHOTS=1 and review the diff"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/v1/auth/signup",
        "/v1/auth/login",
        "/v1/auth/refresh",
        "/v1/auth/logout",
        "/v1/me",
        "/v1/orgs",
        "/v1/orgs/{org}/members/{user}",
        "/v1/orgs/{org}/api-keys/{key}",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} missing");
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn openapi_is_served(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let doc: serde_json::Value = app
        .client
        .get(format!("{}/openapi.json", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc,
        serde_json::to_value(kiln_api::rest::openapi()).unwrap()
    );
}
