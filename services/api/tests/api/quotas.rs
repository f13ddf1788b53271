//! Org GPU quotas: operators set, replace and remove them (audited in the org's log); tenants
//! cannot see the admin routes at all, and read only their own org's quotas.

use kiln_testkit::TestApp;
use kiln_testkit::serde_json::{Value, json};
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

use crate::{assert_problem, error_fields};

async fn put(app: &TestApp, token: &str, org: &str, body: Value) -> (StatusCode, Value) {
    app.call(
        Method::PUT,
        &format!("/v1/admin/orgs/{org}/quotas"),
        Some(token),
        Some(body),
    )
    .await
}

async fn remove(
    app: &TestApp,
    token: &str,
    org: &str,
    gpu_type: &str,
    product: &str,
) -> (StatusCode, Value) {
    app.call(
        Method::DELETE,
        &format!("/v1/admin/orgs/{org}/quotas/{gpu_type}/{product}"),
        Some(token),
        None,
    )
    .await
}

/// `(gpu_type, product, max_gpus)` of a quota list, in order.
fn rows(list: &Value) -> Vec<(String, String, i64)> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|q| {
            (
                q["gpu_type"].as_str().unwrap().to_owned(),
                q["product"].as_str().unwrap().to_owned(),
                q["max_gpus"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn row(gpu_type: &str, product: &str, max_gpus: i64) -> (String, String, i64) {
    (gpu_type.to_owned(), product.to_owned(), max_gpus)
}

/// The quota audit events recorded against `org`: (action, target, details), oldest first.
async fn audit_events(app: &TestApp, org: &str) -> Vec<(String, Option<String>, Value)> {
    let org: kiln_domain::OrgId = org.parse().unwrap();
    sqlx::query_as(
        "SELECT action, target, details FROM audit_events
         WHERE org_id = $1 AND action LIKE 'quota.%' ORDER BY id",
    )
    .bind(org.as_uuid())
    .fetch_all(app.store().pool())
    .await
    .unwrap()
}

async fn stored_quotas(app: &TestApp) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM org_gpu_quotas")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    n
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_operator_sets_lists_replaces_and_removes_an_orgs_quotas(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let tenant = app.user("tenant").await;
    let org = tenant.org_id.clone();
    let list_path = format!("/v1/admin/orgs/{org}/quotas");

    let (status, list) = app.get(&list_path, &op).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list, json!({"items": []}));

    let (status, set) = put(
        &app,
        &op,
        &org,
        json!({"gpu_type": "h100-80gb", "product": "pod", "max_gpus": 8}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["gpu_type"], "h100-80gb");
    assert_eq!(set["product"], "pod");
    assert_eq!(set["max_gpus"], 8);
    assert!(set["updated_at"].is_string(), "{set}");
    let (status, _) = put(
        &app,
        &op,
        &org,
        json!({"gpu_type": "a100-40gb", "product": "instance", "max_gpus": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // Listed by GPU type, then product.
    let (status, list) = app.get(&list_path, &op).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(
        rows(&list),
        vec![row("a100-40gb", "instance", 0), row("h100-80gb", "pod", 8)]
    );
    assert_eq!(list["items"][1], set);

    // Setting the same GPU type and product again replaces the quota rather than adding one.
    let (status, replaced) = put(
        &app,
        &op,
        &org,
        json!({"gpu_type": "h100-80gb", "product": "pod", "max_gpus": 100_000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["max_gpus"], 100_000);
    let (_, list) = app.get(&list_path, &op).await;
    assert_eq!(
        rows(&list),
        vec![
            row("a100-40gb", "instance", 0),
            row("h100-80gb", "pod", 100_000)
        ]
    );
    // Another org's quotas are its own.
    let other = app.user("other").await;
    let (_, list) = app
        .get(&format!("/v1/admin/orgs/{}/quotas", other.org_id), &op)
        .await;
    assert_eq!(list, json!({"items": []}));

    // Removing answers 204 once, then 404: there is nothing left to remove.
    let (status, body) = remove(&app, &op, &org, "h100-80gb", "pod").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(body, Value::Null);
    let (status, body) = remove(&app, &op, &org, "h100-80gb", "pod").await;
    assert_problem(status, &body, StatusCode::NOT_FOUND);
    let (status, body) = remove(&app, &op, &org, "a100-40gb", "pod").await;
    assert_problem(status, &body, StatusCode::NOT_FOUND);
    let (_, list) = app.get(&list_path, &op).await;
    assert_eq!(rows(&list), vec![row("a100-40gb", "instance", 0)]);

    // Unknown and malformed orgs are 404, and nothing is stored for them.
    let ghost = format!("org_{}", uuid::Uuid::now_v7().simple());
    let body = json!({"gpu_type": "h100-80gb", "product": "pod", "max_gpus": 1});
    for org in [ghost.as_str(), "not-an-org"] {
        let (status, resp) = put(&app, &op, org, body.clone()).await;
        assert_problem(status, &resp, StatusCode::NOT_FOUND);
        let (status, resp) = remove(&app, &op, org, "a100-40gb", "instance").await;
        assert_problem(status, &resp, StatusCode::NOT_FOUND);
    }
    for org in [ghost.as_str(), "not-an-org"] {
        let (status, resp) = app.get(&format!("/v1/admin/orgs/{org}/quotas"), &op).await;
        assert_problem(status, &resp, StatusCode::NOT_FOUND);
    }
    assert_eq!(stored_quotas(&app).await, 1);

    // Every change is audited against the org, by the operator.
    let events = audit_events(&app, &org).await;
    let actions: Vec<&str> = events.iter().map(|(a, _, _)| a.as_str()).collect();
    assert_eq!(
        actions,
        ["quota.set", "quota.set", "quota.set", "quota.remove"]
    );
    assert_eq!(events[0].1.as_deref(), Some("h100-80gb/pod"));
    assert_eq!(
        events[2].2,
        json!({"gpu_type": "h100-80gb", "product": "pod", "max_gpus": 100_000})
    );
    assert_eq!(
        events[3].2,
        json!({"gpu_type": "h100-80gb", "product": "pod"})
    );
    let (operator_events,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM audit_events a JOIN users u ON u.id = a.actor_user_id
         WHERE a.action LIKE 'quota.%' AND u.email = 'op@example.com'",
    )
    .fetch_one(app.store().pool())
    .await
    .unwrap();
    assert_eq!(operator_events, 4);
    // … and the org's own admins see it in their audit log.
    let (status, log) = app
        .get(&format!("/v1/orgs/{org}/audit-log"), &tenant.access_token)
        .await;
    assert_eq!(status, StatusCode::OK, "{log}");
    assert_eq!(log["items"][0]["action"], "quota.remove", "{log}");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn tenants_get_404_from_every_admin_quota_route(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let owner = app.user("owner").await;
    let org = owner.org_id.clone();
    let (_, owner_key) = app.api_key(&owner, &org, "owner").await;
    let (status, _) = put(
        &app,
        &op,
        &org,
        json!({"gpu_type": "h100-80gb", "product": "pod", "max_gpus": 8}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let routes = [
        (Method::GET, format!("/v1/admin/orgs/{org}/quotas"), None),
        (
            Method::PUT,
            format!("/v1/admin/orgs/{org}/quotas"),
            Some(json!({"gpu_type": "h100-80gb", "product": "pod", "max_gpus": 1000})),
        ),
        // A bad body is not even read: still 404, not 422.
        (
            Method::PUT,
            format!("/v1/admin/orgs/{org}/quotas"),
            Some(json!({"gpu_type": "", "product": "vm", "max_gpus": -1})),
        ),
        (
            Method::DELETE,
            format!("/v1/admin/orgs/{org}/quotas/h100-80gb/pod"),
            None,
        ),
    ];
    // Even the org's own owner (and its owner key) may not change its quotas.
    for token in [owner.access_token.as_str(), owner_key.as_str()] {
        for (method, path, body) in routes.clone() {
            let (status, resp) = app.call(method.clone(), &path, Some(token), body).await;
            assert_problem(status, &resp, StatusCode::NOT_FOUND);
        }
    }
    for (method, path, body) in routes {
        let (status, resp) = app.call(method, &path, None, body).await;
        assert_problem(status, &resp, StatusCode::UNAUTHORIZED);
    }

    let (_, list) = app.get(&format!("/v1/admin/orgs/{org}/quotas"), &op).await;
    assert_eq!(rows(&list), vec![row("h100-80gb", "pod", 8)]);
    let actions: Vec<String> = audit_events(&app, &org)
        .await
        .into_iter()
        .map(|(a, _, _)| a)
        .collect();
    assert_eq!(actions, ["quota.set"], "refused requests are not audited");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn members_read_their_own_orgs_quotas_and_no_one_elses(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let owner = app.user("owner").await;
    let viewer = app.user("viewer").await;
    let org = owner.org_id.clone();
    app.add_member(&owner, &org, &viewer, "viewer").await;
    let (_, viewer_key) = app.api_key(&owner, &org, "viewer").await;
    for (gpu_type, product, max_gpus) in [("h100-80gb", "pod", 8), ("h100-80gb", "endpoint", 2)] {
        let (status, _) = put(
            &app,
            &op,
            &org,
            json!({"gpu_type": gpu_type, "product": product, "max_gpus": max_gpus}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, admin_view) = app.get(&format!("/v1/admin/orgs/{org}/quotas"), &op).await;

    for token in [
        owner.access_token.as_str(),
        viewer.access_token.as_str(),
        viewer_key.as_str(),
    ] {
        let (status, list) = app.get(&format!("/v1/orgs/{org}/quotas"), token).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        assert_eq!(
            rows(&list),
            vec![row("h100-80gb", "endpoint", 2), row("h100-80gb", "pod", 8)]
        );
        assert_eq!(list, admin_view, "members see what operators see");
    }

    // Another org's people and keys see nothing, as if the org did not exist.
    let stranger = app.user("stranger").await;
    let (_, stranger_key) = app.api_key(&stranger, &stranger.org_id, "owner").await;
    for token in [stranger.access_token.as_str(), stranger_key.as_str()] {
        let (status, resp) = app.get(&format!("/v1/orgs/{org}/quotas"), token).await;
        assert_problem(status, &resp, StatusCode::NOT_FOUND);
        assert!(!resp.to_string().contains("h100"), "{resp}");
    }
    let (status, own) = app
        .get(
            &format!("/v1/orgs/{}/quotas", stranger.org_id),
            &stranger.access_token,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{own}");
    assert_eq!(own, json!({"items": []}));
    // An operator who is not a member reads through the admin route, not the tenant one.
    let (status, resp) = app.get(&format!("/v1/orgs/{org}/quotas"), &op).await;
    assert_problem(status, &resp, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn invalid_quotas_are_422_with_every_bad_field(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let org = app.user("tenant").await.org_id;

    let cases = [
        (json!({}), vec!["gpu_type", "product", "max_gpus"]),
        (
            json!({"gpu_type": "", "product": "vm", "max_gpus": -1}),
            vec!["gpu_type", "product", "max_gpus"],
        ),
        (
            json!({"gpu_type": "H100-80GB", "product": "pod", "max_gpus": 1}),
            vec!["gpu_type"],
        ),
        (
            json!({"gpu_type": "h100_80gb", "product": "pod", "max_gpus": 1}),
            vec!["gpu_type"],
        ),
        (
            json!({"gpu_type": "a".repeat(65), "product": "pod", "max_gpus": 1}),
            vec!["gpu_type"],
        ),
        (
            json!({"gpu_type": "h100-80gb", "product": "pods", "max_gpus": 1}),
            vec!["product"],
        ),
        (
            json!({"gpu_type": "h100-80gb", "product": "pod", "max_gpus": 100_001}),
            vec!["max_gpus"],
        ),
        (
            json!({"gpu_type": "h100-80gb", "product": "pod"}),
            vec!["max_gpus"],
        ),
    ];
    for (body, fields) in cases {
        let (status, resp) = put(&app, &op, &org, body.clone()).await;
        assert_problem(status, &resp, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            resp["type"], "https://kiln.dev/problems/validation",
            "{body}: {resp}"
        );
        assert_eq!(error_fields(&resp), fields, "{body}: {resp}");
        assert!(
            resp["errors"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["message"].as_str().is_some_and(|m| !m.is_empty())),
            "{resp}"
        );
    }
    assert_eq!(
        stored_quotas(&app).await,
        0,
        "a refused quota is not stored"
    );
    assert!(audit_events(&app, &org).await.is_empty());

    // The bounds themselves are fine: 64 characters, 0 and 100000 GPUs.
    for body in [
        json!({"gpu_type": "a".repeat(64), "product": "instance", "max_gpus": 0}),
        json!({"gpu_type": "rtx-4090", "product": "endpoint", "max_gpus": 100_000}),
    ] {
        let (status, resp) = put(&app, &op, &org, body).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
    }
    assert_eq!(stored_quotas(&app).await, 2);
}
