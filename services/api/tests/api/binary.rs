//! The `kiln-api` binary as `make up` runs it: settings from the environment, migrations at
//! start-up, the operator account created, health answered; and stopped as an orchestrator
//! stops it (SIGTERM): live streams end, the request in flight is answered, it exits 0.

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

/// `kiln-api serve` on a free port over `pool`'s database, its log in `log`: the child and
/// its base URL, once it answers `/healthz`.
async fn start(pool: &PgPool, env: &[(&str, &str)], log: &std::path::Path) -> (Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-api"))
        .arg("serve")
        .env("DATABASE_URL", kiln_testkit::database_url(pool).await)
        .env("REDIS_URL", kiln_testkit::redis_url())
        .env("KILN_API_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "KILN_REDIS_NAMESPACE",
            format!("test-{}", uuid::Uuid::new_v4().simple()),
        )
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let child = Child(child);
    let base = format!("http://127.0.0.1:{port}");
    eventually(
        "kiln-api to answer /healthz",
        Duration::from_secs(30),
        || {
            let base = base.clone();
            async move {
                reqwest::get(format!("{base}/healthz"))
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        },
    )
    .await;
    (child, base)
}

/// SIGTERM with a request in flight (a pod delete waiting on the pod's row, which the test
/// holds) and two live streams open (the pod's events and its followed logs): the streams end
/// at once, new connections are refused, the request is answered in full once it can go on,
/// and the process exits 0 without running into its grace period.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_terminated_api_ends_live_streams_and_answers_the_request_in_flight(pool: PgPool) {
    use futures::StreamExt;

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("api.log");
    // Long enough that exiting before it means nothing held the process open.
    let (mut child, base) = start(&pool, &[("KILN_SHUTDOWN_GRACE_SECS", "600")], &log).await;
    let http = reqwest::Client::new();
    let signup: Value = http
        .post(format!("{base}/v1/auth/signup"))
        .json(&json!({"email": "ada@example.com", "password": "ada-correct-horse-battery", "name": "Ada"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let org = signup["org"]["id"].as_str().unwrap().to_owned();
    let login: Value = http
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({"email": "ada@example.com", "password": "ada-correct-horse-battery"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap().to_owned();
    let pods = format!("{base}/v1/orgs/{org}/pods");
    let pod: Value = http
        .post(&pods)
        .bearer_auth(&token)
        .json(
            &json!({"name": "p", "image": "kiln/demo:1", "gpu": {"type": "h100-80gb", "count": 1}}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = pod["id"].as_str().unwrap().to_owned();

    // Two live streams, each past its first event.
    let mut events = http
        .get(format!("{pods}/{id}/events"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let first = events.next().await.unwrap().unwrap();
    assert!(
        String::from_utf8_lossy(&first).contains("pending"),
        "{first:?}"
    );
    let follow = http
        .get(format!("{pods}/{id}/logs?follow=true"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), 200);
    let mut follow = follow.bytes_stream();

    // A request in flight: the delete waits on the pod's row, which the test holds.
    let mut held = pool.begin().await.unwrap();
    let pod_id: kiln_domain::PodId = id.parse().unwrap();
    sqlx::query("SELECT 1 FROM workloads WHERE id = $1 FOR UPDATE")
        .bind(pod_id.as_uuid())
        .execute(&mut *held)
        .await
        .unwrap();
    let delete = tokio::spawn({
        let (http, url, token) = (http.clone(), format!("{pods}/{id}"), token.clone());
        async move {
            let r = http.delete(url).bearer_auth(token).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    });
    eventually(
        "the delete to wait on the pod's row",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move {
                let (waiting,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&pool)
                .await
                .ok()?;
                (waiting > 0).then_some(())
            }
        },
    )
    .await;

    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    // The live streams end (they would hold the drain open otherwise)...
    for (name, stream) in [("events", &mut events), ("logs", &mut follow)] {
        loop {
            match stream.next().await {
                None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("the {name} stream ends cleanly: {e}"),
            }
        }
    }
    // ...no new connection is taken...
    eventually(
        "the API to refuse connections",
        Duration::from_secs(30),
        || {
            let base = base.clone();
            async move {
                reqwest::get(format!("{base}/healthz"))
                    .await
                    .is_err()
                    .then_some(())
            }
        },
    )
    .await;
    assert!(!delete.is_finished(), "the delete still waits");
    // ...and the request in flight is answered in full.
    held.rollback().await.unwrap();
    let (status, deleted) = delete.await.unwrap();
    assert_eq!(status, 202, "{deleted}");
    assert_eq!(deleted["id"], id.as_str());
    assert_eq!(deleted["state"], "terminated", "{deleted}");

    let exited = eventually("kiln-api to exit", Duration::from_secs(60), || {
        let status = child.0.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(exited.success(), "{exited}");
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(!output.contains("grace period"), "{output}");
}
