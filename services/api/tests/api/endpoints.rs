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

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_owner_prices_its_endpoint_and_grants_it_to_another_org(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let bob = app.user("bob").await;
    let path = format!("/v1/orgs/{}/endpoints", ada.org_id);

    // Every bad part of a price is named; nothing is created.
    let mut bad = endpoint(Value::Null);
    bad["price"] = json!({"per_request_micros": -1, "per_1k_completion_tokens_micros": 1_000_000_001_i64,
                          "currency": "EUR"});
    let (status, body) = app.post(&path, &ada.access_token, bad).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    let mut fields = error_fields(&body);
    fields.sort();
    assert_eq!(
        fields,
        [
            "price.currency",
            "price.per_1k_completion_tokens_micros",
            "price.per_request_micros",
        ]
    );
    let (_, list) = app.get(&path, &ada.access_token).await;
    assert_eq!(list["items"], json!([]), "nothing was created");

    // A price's missing parts are free; no price at all is shown as null.
    let mut priced = endpoint(Value::Null);
    priced["price"] = json!({"per_request_micros": 2000});
    let (status, ep) = app.post(&path, &ada.access_token, priced).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ep}");
    assert_eq!(
        ep["price"],
        json!({"per_request_micros": 2000, "per_1k_prompt_tokens_micros": 0,
               "per_1k_completion_tokens_micros": 0, "currency": "USD"})
    );
    let id = ep["id"].as_str().unwrap();
    let ep_path = format!("{path}/{id}");

    // Grants: to another org (twice is the same grant), never to one's own or a made-up org.
    let grants = format!("{ep_path}/grants");
    let (status, g) = app
        .post(&grants, &ada.access_token, json!({"org": bob.org_id}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{g}");
    assert_eq!(
        (g["org"].as_str(), g["endpoint"].as_str()),
        (Some(bob.org_id.as_str()), Some(id))
    );
    let (status, again) = app
        .post(&grants, &ada.access_token, json!({"org": bob.org_id}))
        .await;
    assert_eq!(
        (status, &again["created_at"]),
        (StatusCode::CREATED, &g["created_at"])
    );
    let ghost = format!("org_{}", uuid::Uuid::now_v7().simple());
    for org in [ada.org_id.as_str(), "org_nonsense", ghost.as_str(), ""] {
        let (status, body) = app
            .post(&grants, &ada.access_token, json!({ "org": org }))
            .await;
        assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error_fields(&body), ["org"], "{org}");
    }
    let (_, list) = app.get(&grants, &ada.access_token).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    // The grantee sees what it may call, where, and at what price — and nothing of the owner's.
    let granted = format!("/v1/orgs/{}/granted-endpoints", bob.org_id);
    let (status, mine) = app.get(&granted, &bob.access_token).await;
    assert_eq!(status, StatusCode::OK);
    let item = &mine["items"][0];
    assert_eq!(item["id"], ep["id"]);
    assert_eq!(item["url"], ep["url"]);
    assert_eq!(item["owner_org"].as_str(), Some(ada.org_id.as_str()));
    assert_eq!(item["price"], ep["price"]);
    for (method, p) in [
        (reqwest::Method::GET, ep_path.clone()),
        (reqwest::Method::GET, grants.clone()),
        (reqwest::Method::DELETE, format!("{grants}/{}", bob.org_id)),
        (reqwest::Method::DELETE, format!("{ep_path}/price")),
        // The owner's endpoint under the grantee's own org is no endpoint of its.
        (
            reqwest::Method::GET,
            format!("/v1/orgs/{}/endpoints/{id}", bob.org_id),
        ),
        (
            reqwest::Method::DELETE,
            format!(
                "/v1/orgs/{}/endpoints/{id}/grants/{}",
                bob.org_id, bob.org_id
            ),
        ),
    ] {
        let (status, body) = app
            .call(method.clone(), &p, Some(&bob.access_token), None)
            .await;
        assert_problem(status, &body, StatusCode::NOT_FOUND);
        assert!(
            !body.to_string().contains(&ada.email),
            "{method} {p} leaked"
        );
    }
    let (_, none) = app
        .get(
            &format!("/v1/orgs/{}/granted-endpoints", ada.org_id),
            &ada.access_token,
        )
        .await;
    assert_eq!(none["items"], json!([]), "an owner is not granted its own");

    // The price changes (and goes) for future calls; the grant stays.
    let (status, changed) = app
        .call(
            reqwest::Method::PUT,
            &format!("{ep_path}/price"),
            Some(&ada.access_token),
            Some(json!({"per_1k_completion_tokens_micros": 700})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["price"]["per_1k_completion_tokens_micros"], 700);
    assert_eq!(changed["price"]["per_request_micros"], 0);
    let (status, removed) = app
        .call(
            reqwest::Method::DELETE,
            &format!("{ep_path}/price"),
            Some(&ada.access_token),
            None,
        )
        .await;
    assert_eq!((status, &removed["price"]), (StatusCode::OK, &Value::Null));
    let (_, mine) = app.get(&granted, &bob.access_token).await;
    assert_eq!(mine["items"][0]["price"], Value::Null);

    // Taken back: gone for the grantee; a second revoke has nothing to remove.
    let revoke = format!("{grants}/{}", bob.org_id);
    let (status, _) = app
        .call(
            reqwest::Method::DELETE,
            &revoke,
            Some(&ada.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = app
        .call(
            reqwest::Method::DELETE,
            &revoke,
            Some(&ada.access_token),
            None,
        )
        .await;
    assert_problem(status, &body, StatusCode::NOT_FOUND);
    let (_, mine) = app.get(&granted, &bob.access_token).await;
    assert_eq!(mine["items"], json!([]));
    // Every change is in the owner's audit log.
    let (_, log) = app
        .get(
            &format!("/v1/orgs/{}/audit-log", ada.org_id),
            &ada.access_token,
        )
        .await;
    let actions: Vec<&str> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for a in ["endpoint.grant", "endpoint.price", "endpoint.revoke_grant"] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
}
