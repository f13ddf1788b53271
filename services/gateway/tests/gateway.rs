//! The gateway's front door over real HTTP: API keys are checked against the shared store.

use kiln_auth::ApiKeySecret;
use kiln_gateway::{GatewayState, app};
use kiln_store::Store;
use sqlx::PgPool;

async fn spawn(pool: PgPool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app(GatewayState::new(Store::new(pool)))).await;
    });
    url
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn keys_are_checked_before_anything_else(pool: PgPool) {
    // An org with a live key and a revoked one, made directly in the store.
    let org = uuid_v7();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'acme')")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    let live = ApiKeySecret::generate();
    let revoked = ApiKeySecret::generate();
    for (k, rev) in [(&live, false), (&revoked, true)] {
        sqlx::query("INSERT INTO api_keys (id, org_id, name, prefix, secret_hash, role, revoked_at) VALUES ($1, $2, 'k', 'p', $3, 'member', CASE WHEN $4 THEN now() END)")
            .bind(uuid_v7())
            .bind(org)
            .bind(k.digest().as_bytes())
            .bind(rev)
            .execute(&pool)
            .await
            .unwrap();
    }
    let pool2 = pool.clone();
    let url = spawn(pool).await;
    let http = reqwest::Client::new();
    let call = |token: Option<String>| {
        let mut r = http
            .post(format!("{url}/v1/endpoints/ep_0123/v1/completions"))
            .body("{}");
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let r = call(None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(
        call(Some(revoked.expose().to_owned()))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(call(Some("kiln_guess".into())).await.unwrap().status(), 401);
    assert_eq!(
        call(Some(live.expose().to_owned())).await.unwrap().status(),
        404,
        "no endpoints exist yet"
    );
    // Out of credit (no balance, no credit limit): calls are refused with 402 until a top-up.
    sqlx::query("UPDATE billing_settings SET credit_limit_micros = 0 WHERE org_id = $1")
        .bind(org)
        .execute(&pool2)
        .await
        .unwrap();
    let r = call(Some(live.expose().to_owned())).await.unwrap();
    assert_eq!(r.status(), 402);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(
        call(Some(revoked.expose().to_owned()))
            .await
            .unwrap()
            .status(),
        401,
        "the key is checked first"
    );
    assert_eq!(
        http.get(format!("{url}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        http.get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("kiln_http_requests_total")
    );
}

fn uuid_v7() -> sqlx::types::Uuid {
    sqlx::types::Uuid::now_v7()
}
