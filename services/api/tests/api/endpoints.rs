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
