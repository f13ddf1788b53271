//! The `kiln-api` binary as `make up` runs it: settings from the environment, migrations at
//! start-up, the operator account created, health answered.

use std::process::Stdio;
use std::time::Duration;

use kiln_testkit::eventually;
use kiln_testkit::serde_json::{Value, json};
use sqlx::PgPool;

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn the_binary_serves_and_creates_the_operator(pool: PgPool) {
    let (db,): (String,) = sqlx::query_as("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://kiln:kiln@127.0.0.1:5432/kiln".into());
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(&db);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-api"))
        .arg("serve")
        .env("DATABASE_URL", url.as_str())
        .env("REDIS_URL", kiln_testkit::redis_url())
        .env("KILN_API_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "KILN_REDIS_NAMESPACE",
            format!("test-{}", uuid::Uuid::new_v4().simple()),
        )
        .env("KILN_ADMIN_EMAIL", "admin@kiln.local")
        .env("KILN_ADMIN_PASSWORD", "operator password 123")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _child = Child(child);
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    eventually(
        "kiln-api to answer /healthz",
        Duration::from_secs(30),
        || {
            let (http, base) = (http.clone(), base.clone());
            async move {
                http.get(format!("{base}/healthz"))
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        },
    )
    .await;
    let tokens: Value = http
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({"email": "admin@kiln.local", "password": "operator password 123"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let me: Value = http
        .get(format!("{base}/v1/me"))
        .bearer_auth(tokens["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["user"]["is_operator"], true, "{me}");
}
