//! Endpoints' limits: what a tenant sets is validated field by field (422, nothing created)
//! and shown back with the defaults filled in.

use kiln_testkit::TestApp;
use kiln_testkit::serde_json::{Value, json};
use reqwest::StatusCode;
use sqlx::PgPool;

use crate::{assert_problem, error_fields};

fn endpoint(limits: Value) -> Value {
    json!({"name": "llm", "image": "kiln/demo-model:1", "port": 8000, "min_replicas": 0,
           "max_replicas": 1, "limits": limits})
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn autoscaling_is_validated_and_shown_with_its_defaults(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let path = format!("/v1/orgs/{}/endpoints", u.org_id);
    let mut bad = endpoint(Value::Null);
    bad["autoscaling"] = json!({"target_concurrency": 0, "scale_down_window_s": -1,
                                "scale_to_zero_after_s": 0});
    let (status, body) = app.post(&path, &u.access_token, bad).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    let mut fields = error_fields(&body);
    fields.sort();
    assert_eq!(
        fields,
        [
            "autoscaling.scale_down_window_s",
            "autoscaling.scale_to_zero_after_s",
            "autoscaling.target_concurrency",
        ]
    );
    let mut good = endpoint(Value::Null);
    good["autoscaling"] = json!({"target_concurrency": 2});
    let (status, created) = app.post(&path, &u.access_token, good).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(
        created["autoscaling"],
        json!({"target_concurrency": 2, "scale_down_window_s": 60, "scale_to_zero_after_s": 300})
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn limits_are_validated_and_shown_with_their_defaults(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let path = format!("/v1/orgs/{}/endpoints", u.org_id);

    let (status, body) = app
        .post(
            &path,
            &u.access_token,
            endpoint(json!({
                "per_key": {"requests_per_second": 0, "concurrent": 0},
                "total": {"burst": 10, "concurrent": 2_000_000},
            })),
        )
        .await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    let mut fields = error_fields(&body);
    fields.sort();
    assert_eq!(
        fields,
        [
            "limits.per_key.concurrent",
            "limits.per_key.requests_per_second",
            "limits.total.burst",
            "limits.total.concurrent",
        ]
    );
    let (_, list) = app.get(&path, &u.access_token).await;
    assert_eq!(list["items"], json!([]), "nothing was created");

    // Only a rate given: the burst is twice it; the rest keeps its defaults.
    let (status, created) = app
        .post(
            &path,
            &u.access_token,
            endpoint(json!({"per_key": {"requests_per_second": 5}, "total": {"concurrent": 8}})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(
        created["limits"],
        json!({
            "per_key": {"requests_per_second": 5.0, "burst": 10, "concurrent": 32},
            "total": {"requests_per_second": null, "burst": null, "concurrent": 8},
        })
    );

    // Nothing given: per key 50/s, burst 100, 32 in flight; unlimited in total.
    let mut other = endpoint(Value::Null);
    other["name"] = json!("other");
    let (status, created) = app.post(&path, &u.access_token, other).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(
        created["limits"],
        json!({
            "per_key": {"requests_per_second": 50.0, "burst": 100, "concurrent": 32},
            "total": null,
        })
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn traffic_shows_calls_errors_latency_and_tokens_to_the_org_only(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let path = format!("/v1/orgs/{}/endpoints", u.org_id);
    let (status, created) = app
        .post(&path, &u.access_token, endpoint(Value::Null))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let ep: kiln_domain::EndpointId = id.parse().unwrap();
    let org: kiln_domain::OrgId = u.org_id.parse().unwrap();
    // Three calls a moment ago (one failed at the replica), and one long before the window.
    for (status, ms, tokens, ago_s) in [
        (200, 10, Some(5), 5),
        (200, 20, Some(7), 5),
        (502, 1000, None, 5),
        (200, 30, Some(100), 7200),
    ] {
        sqlx::query(
            "INSERT INTO usage_events (id, endpoint_id, org_id, status, duration_ms, request_bytes,
                 response_bytes, prompt_tokens, completion_tokens, occurred_at)
             VALUES ($1, $2, $3, $4, $5, 10, 10, $6, $6, now() - make_interval(secs => $7))",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(ep.as_uuid())
        .bind(org.as_uuid())
        .bind(status)
        .bind(ms as i64)
        .bind(tokens.map(|t: i64| t))
        .bind(ago_s as f64)
        .execute(app.store().pool())
        .await
        .unwrap();
    }
    let (status, t) = app
        .get(&format!("{path}/{id}/traffic"), &u.access_token)
        .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(t["bucket_seconds"], 60);
    assert_eq!(
        t["buckets"].as_array().unwrap().len(),
        60,
        "every minute, empty ones too"
    );
    assert_eq!(
        (t["calls"].as_i64(), t["errors"].as_i64()),
        (Some(3), Some(1))
    );
    assert_eq!(
        (t["prompt_tokens"].as_i64(), t["completion_tokens"].as_i64()),
        (Some(12), Some(12))
    );
    let busy: Vec<&Value> = t["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["calls"].as_i64() > Some(0))
        .collect();
    assert_eq!(busy.len(), 1, "{t}");
    assert_eq!(busy[0]["calls"], 3);
    assert_eq!(busy[0]["p50_ms"], 20.0);
    assert_eq!(busy[0]["requests_per_second"], 0.05);

    let (status, body) = app
        .get(&format!("{path}/{id}/traffic?minutes=0"), &u.access_token)
        .await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, body) = app
        .get(
            &format!("{path}/{id}/traffic?minutes=lots"),
            &u.access_token,
        )
        .await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    let grace = app.user("grace").await;
    for p in [
        format!("/v1/orgs/{}/endpoints/{id}/traffic", grace.org_id),
        format!("{path}/{id}/traffic"),
    ] {
        let (status, body) = app.get(&p, &grace.access_token).await;
        assert_problem(status, &body, StatusCode::NOT_FOUND);
    }

    // The same figures over GraphQL; another org's caller gets not-found there too.
    let query = "query($org: ID!, $id: ID!) { endpointTraffic(orgId: $org, id: $id, minutes: 60) \
                 { calls errors promptTokens buckets { calls p50Ms } } }";
    let (status, g) = app
        .post(
            "/graphql",
            &u.access_token,
            json!({"query": query, "variables": {"org": u.org_id, "id": id}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{g}");
    let traffic = &g["data"]["endpointTraffic"];
    assert_eq!(
        (
            &traffic["calls"],
            &traffic["errors"],
            &traffic["promptTokens"]
        ),
        (&json!(3), &json!(1), &json!(12)),
        "{g}"
    );
    assert_eq!(traffic["buckets"].as_array().unwrap().len(), 60);
    let (_, g) = app
        .post(
            "/graphql",
            &grace.access_token,
            json!({"query": query, "variables": {"org": u.org_id, "id": id}}),
        )
        .await;
    assert_eq!(g["data"]["endpointTraffic"], Value::Null, "{g}");
    assert_eq!(g["errors"][0]["extensions"]["status"], 404, "{g}");
}
