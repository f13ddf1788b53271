//! Tenant isolation: every tenant-scoped route, called with another org's credentials, answers
//! 404 and changes nothing; viewers cannot write anywhere.

use kiln_testkit::serde_json::{Value, json};
use kiln_testkit::{TestApp, TestUser};
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

use crate::assert_problem;

/// Every route under `/v1/orgs/{org}` with a request that would succeed for a rightful caller.
fn tenant_routes(
    org: &str,
    member: &str,
    key: &str,
    (pod, endpoint, invoice, grantee): &(String, String, String, String),
) -> Vec<(Method, String, Option<Value>)> {
    // The pod's UUID as an instance id (another kind's row: 404 for anyone), or the placeholder.
    let ins = pod
        .replace("{pod}", "{instance}")
        .replacen("pod_", "ins_", 1);
    vec![
        (Method::GET, format!("/v1/orgs/{org}"), None),
        (Method::GET, format!("/v1/orgs/{org}/members"), None),
        (
            Method::POST,
            format!("/v1/orgs/{org}/members"),
            Some(json!({"email": "mallory@example.com", "role": "viewer"})),
        ),
        (
            Method::PATCH,
            format!("/v1/orgs/{org}/members/{member}"),
            Some(json!({"role": "viewer"})),
        ),
        (
            Method::DELETE,
            format!("/v1/orgs/{org}/members/{member}"),
            None,
        ),
        (Method::GET, format!("/v1/orgs/{org}/api-keys"), None),
        (
            Method::POST,
            format!("/v1/orgs/{org}/api-keys"),
            Some(json!({"name": "stolen", "role": "viewer"})),
        ),
        (
            Method::DELETE,
            format!("/v1/orgs/{org}/api-keys/{key}"),
            None,
        ),
        (Method::GET, format!("/v1/orgs/{org}/audit-log"), None),
        (Method::GET, format!("/v1/orgs/{org}/quotas"), None),
        (Method::GET, format!("/v1/orgs/{org}/pods"), None),
        (
            Method::POST,
            format!("/v1/orgs/{org}/pods"),
            Some(json!({"name": "stolen", "image": "busybox"})),
        ),
        (Method::GET, format!("/v1/orgs/{org}/pods/{pod}"), None),
        (
            Method::GET,
            format!("/v1/orgs/{org}/pods/{pod}/events"),
            None,
        ),
        (Method::GET, format!("/v1/orgs/{org}/pods/{pod}/logs"), None),
        (Method::DELETE, format!("/v1/orgs/{org}/pods/{pod}"), None),
        (Method::GET, format!("/v1/orgs/{org}/instances"), None),
        (
            Method::POST,
            format!("/v1/orgs/{org}/instances"),
            Some(
                json!({"name": "stolen", "gpu_type": "h100-80gb", "gpu_count": 1,
                        "image": "kiln-tiny", "ssh_public_keys": ["ssh-ed25519 AAAA"]}),
            ),
        ),
        (Method::GET, format!("/v1/orgs/{org}/instances/{ins}"), None),
        (
            Method::POST,
            format!("/v1/orgs/{org}/instances/{ins}/stop"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/orgs/{org}/instances/{ins}/start"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/orgs/{org}/instances/{ins}/reboot"),
            None,
        ),
        (
            Method::GET,
            format!("/v1/orgs/{org}/instances/{ins}/console"),
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/orgs/{org}/instances/{ins}"),
            None,
        ),
        (Method::GET, format!("/v1/orgs/{org}/endpoints"), None),
        (
            Method::POST,
            format!("/v1/orgs/{org}/endpoints"),
            Some(json!({"name": "stolen", "image": "busybox", "port": 80})),
        ),
        (
            Method::GET,
            format!("/v1/orgs/{org}/endpoints/{endpoint}"),
            None,
        ),
        (
            Method::GET,
            format!("/v1/orgs/{org}/endpoints/{endpoint}/traffic"),
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/orgs/{org}/endpoints/{endpoint}"),
            None,
        ),
        (
            Method::PUT,
            format!("/v1/orgs/{org}/endpoints/{endpoint}/price"),
            Some(json!({"per_request_micros": 1})),
        ),
        (
            Method::DELETE,
            format!("/v1/orgs/{org}/endpoints/{endpoint}/price"),
            None,
        ),
        (
            Method::GET,
            format!("/v1/orgs/{org}/endpoints/{endpoint}/grants"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/orgs/{org}/endpoints/{endpoint}/grants"),
            Some(json!({"org": grantee})),
        ),
        (
            Method::DELETE,
            format!("/v1/orgs/{org}/endpoints/{endpoint}/grants/{grantee}"),
            None,
        ),
        (
            Method::GET,
            format!("/v1/orgs/{org}/granted-endpoints"),
            None,
        ),
        (Method::GET, format!("/v1/orgs/{org}/balance"), None),
        (
            Method::POST,
            format!("/v1/orgs/{org}/credits"),
            Some(json!({"amount_micros": 1_000_000, "currency": "USD", "reference": "stolen"})),
        ),
        (Method::GET, format!("/v1/orgs/{org}/usage"), None),
        (Method::GET, format!("/v1/orgs/{org}/ledger"), None),
        (Method::GET, format!("/v1/orgs/{org}/invoices"), None),
        (
            Method::GET,
            format!("/v1/orgs/{org}/invoices/{invoice}"),
            None,
        ),
    ]
}

/// The routes above must cover every tenant-scoped path in the OpenAPI document, so a new route
/// cannot be added without joining this walk.
#[test]
fn the_walk_covers_every_tenant_scoped_route() {
    let doc = serde_json::to_value(kiln_api::rest::openapi()).unwrap();
    let walked: Vec<(String, String)> = tenant_routes(
        "{org}",
        "{user}",
        "{key}",
        &(
            "{pod}".into(),
            "{endpoint}".into(),
            "{invoice}".into(),
            "{grantee}".into(),
        ),
    )
    .into_iter()
    .map(|(m, p, _)| (m.as_str().to_lowercase(), p))
    .collect();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/orgs/{org}") {
            continue;
        }
        for method in ops.as_object().unwrap().keys() {
            assert!(
                walked.contains(&(method.clone(), path.clone())),
                "{method} {path} is tenant-scoped but not in the isolation walk"
            );
        }
    }
}

type Ids = (String, String, String, String);

async fn setup(app: &TestApp) -> (TestUser, TestUser, String, Ids, String) {
    let victim = app.user("victim").await;
    let member = app.user("member").await;
    app.add_member(&victim, &victim.org_id, &member, "member")
        .await;
    let (key_id, _) = app.api_key(&victim, &victim.org_id, "member").await;
    let (status, pod) = app
        .post(
            &format!("/v1/orgs/{}/pods", victim.org_id),
            &victim.access_token,
            json!({"name": "victims-pod", "image": "busybox"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pod}");
    let (status, endpoint) = app
        .post(
            &format!("/v1/orgs/{}/endpoints", victim.org_id),
            &victim.access_token,
            json!({"name": "victims-model", "image": "busybox", "port": 8000, "min_replicas": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{endpoint}");
    // An invoice of the victim's (what kiln-billing writes at month close).
    let victim_org: kiln_domain::OrgId = victim.org_id.parse().unwrap();
    let mut conn = app.store().pool().acquire().await.unwrap();
    let invoice = app
        .store()
        .invoice_put(
            &mut conn,
            victim_org.as_uuid(),
            time::macros::date!(2026 - 10 - 01),
            "final",
            0,
            &[],
        )
        .await
        .unwrap();
    // A partner org the victim grants its endpoint to.
    let partner = app.user("partner").await;
    let (status, grant) = app
        .post(
            &format!(
                "/v1/orgs/{}/endpoints/{}/grants",
                victim.org_id,
                endpoint["id"].as_str().unwrap()
            ),
            &victim.access_token,
            json!({"org": partner.org_id}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{grant}");
    let pod_id = (
        pod["id"].as_str().unwrap().to_owned(),
        endpoint["id"].as_str().unwrap().to_owned(),
        kiln_domain::InvoiceId::from_uuid(invoice.id).to_string(),
        partner.org_id.clone(),
    );
    let attacker = app.user("mallory").await;
    (
        victim,
        member,
        key_id,
        pod_id,
        attacker.access_token.clone(),
    )
}

async fn fingerprint(app: &TestApp) -> Value {
    let (row,): (Value,) = sqlx::query_as(
        "SELECT json_build_object(
            'members', (SELECT json_agg(json_build_array(org_id, user_id, role) ORDER BY org_id, user_id) FROM memberships),
            'keys', (SELECT json_agg(json_build_array(id, revoked_at) ORDER BY id) FROM api_keys),
            'orgs', (SELECT json_agg(json_build_array(id, name) ORDER BY id) FROM orgs),
            'workloads', (SELECT json_agg(json_build_array(id, org_id, state, updated_at) ORDER BY id) FROM workloads),
            'endpoints', (SELECT json_agg(json_build_array(id, org_id, state, updated_at, price_per_request_micros) ORDER BY id) FROM endpoints),
            'grants', (SELECT json_agg(json_build_array(endpoint_id, org_id) ORDER BY endpoint_id, org_id) FROM endpoint_grants),
            'postings', (SELECT count(*) FROM ledger_postings))",
    )
    .fetch_one(app.store().pool())
    .await
    .unwrap();
    row
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn another_orgs_people_and_keys_get_404_everywhere(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (victim, member, key_id, pod_id, attacker_token) = setup(&app).await;
    let attacker = app.user("eve").await;
    let (_, attacker_key) = app.api_key(&attacker, &attacker.org_id, "owner").await;
    let before = fingerprint(&app).await;
    for token in [
        attacker_token.as_str(),
        attacker.access_token.as_str(),
        attacker_key.as_str(),
    ] {
        for (method, path, body) in tenant_routes(&victim.org_id, &member.user_id, &key_id, &pod_id)
        {
            let (status, resp) = app.call(method.clone(), &path, Some(token), body).await;
            assert_problem(status, &resp, StatusCode::NOT_FOUND);
            assert!(
                !resp.to_string().contains(&victim.email),
                "{method} {path} leaked: {resp}"
            );
        }
    }
    // Ids that do not exist at all look the same as other orgs' ids.
    let ghost = format!("org_{}", uuid::Uuid::now_v7().simple());
    for (method, path, body) in tenant_routes(&ghost, &member.user_id, &key_id, &pod_id) {
        let (status, resp) = app
            .call(method, &path, Some(&attacker.access_token), body)
            .await;
        assert_problem(status, &resp, StatusCode::NOT_FOUND);
    }
    assert_eq!(
        before,
        fingerprint(&app).await,
        "a refused request changed data"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn viewers_cannot_write_and_removed_members_lose_access_at_once(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (victim, member, key_id, pod_id, _) = setup(&app).await;
    let viewer = app.user("viewer").await;
    app.add_member(&victim, &victim.org_id, &viewer, "viewer")
        .await;
    let (_, viewer_key) = app.api_key(&victim, &victim.org_id, "viewer").await;
    let before = fingerprint(&app).await;
    for token in [viewer.access_token.as_str(), viewer_key.as_str()] {
        for (method, path, body) in tenant_routes(&victim.org_id, &member.user_id, &key_id, &pod_id)
        {
            let (status, resp) = app.call(method.clone(), &path, Some(token), body).await;
            if method == Method::GET {
                // The walk's instance id names no instance (a pod's UUID): 404 even for members.
                let readable = !path.ends_with("/api-keys")
                    && !path.ends_with("/audit-log")
                    && !path.contains("/instances/");
                assert_eq!(
                    status == StatusCode::OK,
                    readable,
                    "{method} {path}: {resp}"
                );
            } else {
                assert_problem(status, &resp, StatusCode::FORBIDDEN);
            }
        }
    }
    assert_eq!(before, fingerprint(&app).await, "a viewer changed data");

    // Remove the viewer: their very next request is refused.
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/orgs/{}/members/{}", victim.org_id, viewer.user_id),
            Some(&victim.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app
        .get(
            &format!("/v1/orgs/{}/members", victim.org_id),
            &viewer.access_token,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
