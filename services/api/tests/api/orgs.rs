use kiln_testkit::TestApp;
use kiln_testkit::serde_json::json;
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

use crate::{assert_problem, error_fields};

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn create_list_and_page_through_orgs(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    for name in ["Alpha", "Beta", "Gamma"] {
        let (status, org) = app
            .post("/v1/orgs", &u.access_token, json!({"name": name}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{org}");
        assert_eq!(org["role"], "owner");
        assert_eq!(org["personal"], false);
    }
    let (status, all) = app.get("/v1/orgs", &u.access_token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all["items"].as_array().unwrap().len(), 4);
    assert!(all["next_cursor"].is_null());

    // Page by two.
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/orgs?limit=2&cursor={c}"),
            None => "/v1/orgs?limit=2".to_owned(),
        };
        let (status, page) = app.get(&path, &u.access_token).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["name"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["ada's org", "Alpha", "Beta", "Gamma"]);

    for bad in [
        "/v1/orgs?limit=0",
        "/v1/orgs?limit=9999",
        "/v1/orgs?limit=abc",
        "/v1/orgs?cursor=nope",
    ] {
        let (status, body) = app.get(bad, &u.access_token).await;
        assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn org_names_are_validated(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("bob").await;
    for name in [json!(""), json!("   "), json!("x".repeat(101))] {
        let (status, body) = app
            .post("/v1/orgs", &u.access_token, json!({"name": name}))
            .await;
        assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error_fields(&body), ["name"]);
    }
    let (status, body) = app
        .call(Method::POST, "/v1/orgs", None, Some(json!({"name": "x"})))
        .await;
    assert_problem(status, &body, StatusCode::UNAUTHORIZED);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn api_keys_cannot_create_orgs_and_see_only_their_org(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("carol").await;
    let (_, key) = app.api_key(&u, &u.org_id, "admin").await;
    let (status, body) = app.post("/v1/orgs", &key, json!({"name": "Sneaky"})).await;
    assert_problem(status, &body, StatusCode::FORBIDDEN);
    let (status, list) = app.get("/v1/orgs", &key).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [u.org_id.as_str()]);
}
