//! Test harness for Kiln's integration tests.
//!
//! Each test gets its own database (from `#[sqlx::test(migrator = "kiln_store::MIGRATOR")]`,
//! which creates and drops one per test), and [`TestApp::spawn`] serves the real `kiln-api`
//! application on an ephemeral loopback port with its own Redis key namespace, so tests run in
//! parallel without sharing state. Talk to it over real HTTP with [`TestApp::client`].

pub mod fleet;
pub mod gateway;
pub mod instances;

use std::time::Duration;

use kiln_api::{ApiConfig, AppState};
use kiln_store::Store;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::oneshot;

pub use serde_json;

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A running kiln-api on 127.0.0.1:<ephemeral>.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub state: AppState,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// A signed-up, signed-in person.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub email: String,
    pub password: String,
    pub user_id: String,
    /// Their personal org.
    pub org_id: String,
    pub access_token: String,
    pub refresh_token: String,
}

impl TestApp {
    pub async fn spawn(pool: PgPool) -> Self {
        Self::spawn_with(pool, |_| {}).await
    }

    /// Spawn with settings changed by `tweak` (e.g. low rate limits).
    pub async fn spawn_with(pool: PgPool, tweak: impl FnOnce(&mut ApiConfig)) -> Self {
        let namespace = format!("test-{}", uuid::Uuid::new_v4().simple());
        let mut config = ApiConfig::for_tests(String::new(), redis_url(), namespace.clone());
        tweak(&mut config);
        Self::start(Store::new(pool), config).await
    }

    /// A second replica: the same database and Redis namespace, its own process state.
    pub async fn spawn_replica(&self) -> Self {
        let config = self.state.config.clone();
        Self::start(Store::new(self.store().pool().clone()), config).await
    }

    async fn start(store: Store, config: ApiConfig) -> Self {
        let limiter = kiln_ratelimit_connect(&config.redis_url, &config.redis_namespace).await;
        let state = AppState::new(store, limiter, config)
            .await
            .expect("build app state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let st = state.clone();
        let server = tokio::spawn(async move {
            let _ = kiln_api::serve(listener, st, async move {
                let _ = rx.await;
            })
            .await;
        });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client");
        Self {
            url,
            state,
            client,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// The API's settings (its Redis namespace and secrets key, for a scheduler beside it).
    pub fn config(&self) -> &ApiConfig {
        &self.state.config
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// Send a request; `token` becomes `Authorization: Bearer`. Returns status and JSON body
    /// (`Value::Null` for an empty body).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (status, _, body) = self.call_full(method, path, token, body, &[]).await;
        (status, body)
    }

    /// Like [`call`](Self::call) with extra headers, also returning the response headers.
    pub async fn call_full(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.client.request(method, format!("{}{}", self.url, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request reaches the server");
        let status = resp.status();
        let headers = resp.headers().clone();
        // A live stream (server-sent events) does not end by itself: answer with its status
        // and headers only; tests that read one use the response directly.
        let streaming = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if streaming {
            return (status, headers, Value::Null);
        }
        let bytes = resp.bytes().await.expect("read body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, headers, value)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// Sign up `name` as `<name>@example.com` and sign in.
    pub async fn user(&self, name: &str) -> TestUser {
        let email = format!("{name}@example.com");
        let password = format!("{name}-correct-horse-battery");
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/auth/signup",
                None,
                Some(json!({ "email": email, "password": password, "name": name })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "signup of {name}: {body}");
        let user_id = body["user"]["id"].as_str().expect("user id").to_owned();
        let org_id = body["org"]["id"].as_str().expect("org id").to_owned();
        let (access_token, refresh_token) = self.login(&email, &password).await;
        TestUser {
            email,
            password,
            user_id,
            org_id,
            access_token,
            refresh_token,
        }
    }

    /// Make `op@example.com` an operator (as `KILN_ADMIN_EMAIL` does at start-up) and sign in:
    /// the operator's access token.
    pub async fn operator(&self) -> String {
        let (email, password) = ("op@example.com", "op-correct-horse-battery");
        let hash = self.state.hasher.hash(password).unwrap();
        self.store()
            .user_ensure_operator(&kiln_domain::Email::parse("email", email).unwrap(), &hash)
            .await
            .unwrap();
        self.login(email, password).await.0
    }

    /// Sign in; returns (access, refresh).
    pub async fn login(&self, email: &str, password: &str) -> (String, String) {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({ "email": email, "password": password })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "login of {email}: {body}");
        (
            body["access_token"].as_str().expect("access").to_owned(),
            body["refresh_token"].as_str().expect("refresh").to_owned(),
        )
    }

    /// Add `who` to `org` with `role`, as `by`.
    pub async fn add_member(&self, by: &TestUser, org: &str, who: &TestUser, role: &str) {
        let (status, body) = self
            .post(
                &format!("/v1/orgs/{org}/members"),
                &by.access_token,
                json!({ "email": who.email, "role": role }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "add member: {body}");
    }

    /// Create an API key in `org` as `by`; returns (id, secret).
    pub async fn api_key(&self, by: &TestUser, org: &str, role: &str) -> (String, String) {
        let (status, body) = self
            .post(
                &format!("/v1/orgs/{org}/api-keys"),
                &by.access_token,
                json!({ "name": format!("{role} key"), "role": role }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "create api key: {body}");
        (
            body["id"].as_str().expect("id").to_owned(),
            body["key"].as_str().expect("key").to_owned(),
        )
    }

    /// Stop the server and wait for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = h.await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            h.abort();
        }
    }
}

async fn kiln_ratelimit_connect(url: &str, namespace: &str) -> kiln_ratelimit::RateLimiter {
    kiln_ratelimit::RateLimiter::connect(url, namespace)
        .await
        .expect("redis must be running (make test starts it)")
}

/// The URL of `pool`'s database (sqlx::test makes one per test), for processes a test starts.
pub async fn database_url(pool: &PgPool) -> String {
    let (db,): (String,) = sqlx::query_as("SELECT current_database()")
        .fetch_one(pool)
        .await
        .expect("the test database answers");
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://kiln:kiln@127.0.0.1:5432/kiln".into());
    let (prefix, _) = base
        .rsplit_once('/')
        .expect("DATABASE_URL names a database");
    format!("{prefix}/{db}")
}

/// Poll `check` until it returns `Some`, or panic after `deadline`. Use instead of sleeping.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(250));
    }
}
