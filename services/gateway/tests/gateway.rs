//! The gateway's front door over real HTTP: API keys are checked against the shared store.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kiln_auth::ApiKeySecret;
use kiln_gateway::cache::CacheTtls;
use kiln_gateway::{GatewayState, app};
use kiln_ratelimit::admission::Admission;
use kiln_store::Store;
use kiln_store::{EndpointLimits, RateLimit};
use sqlx::PgPool;

async fn spawn(pool: PgPool) -> String {
    spawn_with(pool, CacheTtls::default()).await
}

/// A gateway on a real socket, once it is healthy (listening for cache invalidations).
async fn spawn_with(pool: PgPool, ttls: CacheTtls) -> String {
    serve(GatewayState::with_cache_ttls(Store::new(pool), ttls)).await
}

/// A gateway enforcing endpoints' limits in Redis (its own namespace).
async fn spawn_limited(pool: PgPool) -> String {
    let admission = Admission::connect(&kiln_testkit::redis_url(), &format!("test-{}", uuid_v7()))
        .await
        .expect("redis must be running (make test starts it)");
    serve(GatewayState::new(Store::new(pool)).with_admission(admission)).await
}

/// Two gateways over one database and one Redis namespace: replicas behind one address.
async fn spawn_two_limited(pool: PgPool) -> [String; 2] {
    let namespace = format!("test-{}", uuid_v7());
    let mut urls = Vec::new();
    for _ in 0..2 {
        let admission = Admission::connect(&kiln_testkit::redis_url(), &namespace)
            .await
            .expect("redis must be running (make test starts it)");
        urls.push(
            serve(GatewayState::new(Store::new(pool.clone())).with_admission(admission)).await,
        );
    }
    [urls[0].clone(), urls[1].clone()]
}

async fn serve(state: GatewayState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app(state)).await;
    });
    let healthy = format!("{url}/healthz");
    eventually("the gateway is healthy", || async {
        reqwest::get(&healthy)
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    url
}

/// Poll `check` until it holds; panics with `what` after a generous deadline.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    kiln_testkit::eventually(what, Duration::from_secs(20), || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await
}

/// Lifetimes so long that only a pushed notice can make a cached answer change in a test.
const FOREVER: CacheTtls = CacheTtls {
    key: Duration::from_secs(3600),
    unknown_key: Duration::from_secs(3600),
    standing: Duration::from_secs(3600),
    route: Duration::from_secs(3600),
};

async fn org_with_key(pool: &PgPool) -> (sqlx::types::Uuid, ApiKeySecret) {
    let org = uuid_v7();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, $2)")
        .bind(org)
        .bind(format!("org-{org}"))
        .execute(pool)
        .await
        .unwrap();
    let key = ApiKeySecret::generate();
    insert_key(pool, org, &key).await;
    (org, key)
}

async fn insert_key(pool: &PgPool, org: sqlx::types::Uuid, key: &ApiKeySecret) {
    sqlx::query("INSERT INTO api_keys (id, org_id, name, prefix, secret_hash, role) VALUES ($1, $2, 'k', 'p', $3, 'member')")
        .bind(uuid_v7())
        .bind(org)
        .bind(key.digest().as_bytes())
        .execute(pool)
        .await
        .unwrap();
}

async fn status(url: &str, key: &ApiKeySecret) -> u16 {
    reqwest::Client::new()
        .post(format!("{url}/v1/endpoints/ep_0123/v1/completions"))
        .bearer_auth(key.expose())
        .body("{}")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn revocations_and_new_keys_are_pushed_to_the_gateway(pool: PgPool) {
    let (org, key) = org_with_key(&pool).await;
    let url = spawn_with(pool.clone(), FOREVER).await;
    // Past the key check (404: no such endpoint), so the key is cached now, for an hour.
    assert_eq!(status(&url, &key).await, 404);
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE org_id = $1")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    eventually("the revoked key is refused", || async {
        status(&url, &key).await == 401
    })
    .await;

    // A key unknown when first tried (cached as unknown, for an hour) works once created.
    let later = ApiKeySecret::generate();
    assert_eq!(status(&url, &later).await, 401);
    insert_key(&pool, org, &later).await;
    eventually("the new key is accepted", || async {
        status(&url, &later).await == 404
    })
    .await;

    // Out of credit, then topped up: both reach the cached standing without waiting for it.
    assert_eq!(status(&url, &later).await, 404);
    sqlx::query("UPDATE billing_settings SET credit_limit_micros = 0 WHERE org_id = $1")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    eventually("the org is refused for credit", || async {
        status(&url, &later).await == 402
    })
    .await;
    sqlx::query("UPDATE billing_settings SET credit_limit_micros = 100000000 WHERE org_id = $1")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    eventually("the org may call again", || async {
        status(&url, &later).await == 404
    })
    .await;
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
    eventually("the org is refused for credit", || async {
        call(Some(live.expose().to_owned())).await.unwrap().status() == 402
    })
    .await;
    let r = call(Some(live.expose().to_owned())).await.unwrap();
    assert_eq!(r.status(), 402, "and stays refused");
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

/// A replica: counts the calls it gets; `/slow` answers only when `release` is notified.
#[derive(Clone, Default)]
struct Replica {
    calls: Arc<AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
}

impl Replica {
    async fn serve(&self) -> std::net::SocketAddr {
        let me = self.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let me = me.clone();
            async move {
                me.calls.fetch_add(1, Ordering::SeqCst);
                if uri.path() == "/slow" {
                    me.release.notified().await;
                }
                "ok"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn call(url: &str, endpoint: &str, path: &str, key: &ApiKeySecret) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{url}/v1/endpoints/{endpoint}/{path}"))
        .bearer_auth(key.expose())
        .send()
        .await
        .unwrap()
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn over_its_rate_a_key_gets_429_with_retry_after_and_the_replica_is_not_called(pool: PgPool) {
    let replica = Replica::default();
    let addr = replica.serve().await;
    let limits = EndpointLimits {
        // A burst of 3, then one call every 10 s.
        per_key_rate: RateLimit {
            per_second: 0.1,
            burst: 3,
        },
        ..EndpointLimits::default()
    };
    let ep = kiln_testkit::gateway::seed_running_endpoint(&pool, addr, &limits)
        .await
        .unwrap();
    let url = spawn_limited(pool.clone()).await;
    for _ in 0..3 {
        assert_eq!(
            call(&url, &ep.endpoint, "v1/models", &ep.key)
                .await
                .status(),
            200
        );
    }
    let r = call(&url, &ep.endpoint, "v1/models", &ep.key).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        replica.calls(),
        3,
        "the refused call never reached the replica"
    );
    // Another key of the same org has its own bucket.
    let other = ApiKeySecret::generate();
    insert_key(&pool, ep.org_id, &other).await;
    assert_eq!(
        call(&url, &ep.endpoint, "v1/models", &other).await.status(),
        200
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_key_with_its_calls_in_flight_waits_for_one_to_end(pool: PgPool) {
    let replica = Replica::default();
    let addr = replica.serve().await;
    let limits = EndpointLimits {
        per_key_concurrency: 1,
        ..EndpointLimits::default()
    };
    let ep = kiln_testkit::gateway::seed_running_endpoint(&pool, addr, &limits)
        .await
        .unwrap();
    let url = spawn_limited(pool.clone()).await;
    let slow = tokio::spawn({
        let (url, endpoint, key) = (url.clone(), ep.endpoint.clone(), ep.key.clone());
        async move { call(&url, &endpoint, "slow", &key).await.status() }
    });
    eventually("the slow call reached the replica", || async {
        replica.calls() == 1
    })
    .await;
    let r = call(&url, &ep.endpoint, "v1/models", &ep.key).await;
    assert_eq!(r.status(), 429, "one call in flight is this key's limit");
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(replica.calls(), 1);
    replica.release.notify_one();
    assert_eq!(slow.await.unwrap(), 200);
    // The slot is freed as the slow call ends.
    eventually("the key may call again", || async {
        call(&url, &ep.endpoint, "v1/models", &ep.key)
            .await
            .status()
            == 200
    })
    .await;
}

fn uuid_v7() -> sqlx::types::Uuid {
    sqlx::types::Uuid::now_v7()
}

/// A `kiln-gateway` process over the test's database and Redis namespace, once healthy.
struct GatewayProcess {
    child: tokio::process::Child,
    url: String,
}

impl GatewayProcess {
    async fn start(database_url: &str, namespace: &str) -> Self {
        Self::start_with(database_url, namespace, &[]).await
    }

    async fn start_with(database_url: &str, namespace: &str, env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln-gateway"))
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", kiln_testkit::redis_url())
            .env("KILN_REDIS_NAMESPACE", namespace)
            .env("KILN_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            // A dead gateway's events are taken over after 1 s instead of 30.
            .env("KILN_GATEWAY_USAGE_CLAIM_IDLE_SECS", "1")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .kill_on_drop(true)
            .spawn()
            .expect("the kiln-gateway binary runs");
        let url = format!("http://127.0.0.1:{port}");
        let healthy = format!("{url}/healthz");
        eventually("the gateway process is healthy", || async {
            reqwest::get(&healthy)
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        Self { child, url }
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_gateway_killed_mid_burst_loses_no_answered_call_and_counts_none_twice(pool: PgPool) {
    let replica = Replica::default();
    let addr = replica.serve().await;
    let roomy = RateLimit {
        per_second: 100_000.0,
        burst: 100_000,
    };
    let limits = EndpointLimits {
        per_key_rate: roomy,
        per_key_concurrency: 100_000,
        ..EndpointLimits::default()
    };
    let ep = kiln_testkit::gateway::seed_running_endpoint(&pool, addr, &limits)
        .await
        .unwrap();
    let database_url = kiln_testkit::database_url(&pool).await;
    let namespace = format!("test-{}", uuid_v7());
    let mut doomed = GatewayProcess::start(&database_url, &namespace).await;
    // The survivor's ingester takes over what the doomed one had read but not stored.
    let _survivor = GatewayProcess::start(&database_url, &namespace).await;

    const CALLERS: usize = 8;
    let answered = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (url, endpoint, key) = (doomed.url.clone(), ep.endpoint.clone(), ep.key.clone());
            let answered = answered.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                loop {
                    let sent = http
                        .get(format!("{url}/v1/endpoints/{endpoint}/v1/models"))
                        .bearer_auth(key.expose())
                        .send()
                        .await;
                    // Until the gateway dies: refused, reset or cut off mid-answer.
                    let Ok(r) = sent else { return };
                    assert_eq!(r.status(), 200, "before the kill every call succeeds");
                    match r.text().await {
                        Ok(body) if body == "ok" => answered.fetch_add(1, Ordering::SeqCst),
                        _ => return,
                    };
                }
            })
        })
        .collect();
    eventually("the burst is under way", || async {
        answered.load(Ordering::SeqCst) >= 300
    })
    .await;
    doomed.child.kill().await.unwrap(); // SIGKILL
    for c in callers {
        c.await.unwrap();
    }
    let answered = answered.load(Ordering::SeqCst);
    let reached = replica.calls();

    // Every event in the stream ends up in Postgres, once.
    let redis = redis::Client::open(kiln_testkit::redis_url()).unwrap();
    let conn = redis.get_multiplexed_async_connection().await.unwrap();
    let metered = || async {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM usage_events WHERE endpoint_id = $1")
                .bind(ep.endpoint_id)
                .fetch_one(&pool)
                .await
                .unwrap();
        n as usize
    };
    eventually("the stream is ingested", || {
        let mut conn = conn.clone();
        let stream = format!("{namespace}:usage");
        async move {
            let streamed: usize = redis::cmd("XLEN")
                .arg(stream)
                .query_async(&mut conn)
                .await
                .unwrap();
            metered().await == streamed
        }
    })
    .await;
    let metered = metered().await;
    assert!(
        metered >= answered,
        "lost: {answered} calls were answered in full, {metered} metered"
    );
    assert!(
        metered <= reached,
        "counted twice: {metered} metered, the replica answered {reached}"
    );
    // The only calls metered but not answered are those cut off by the kill, one per caller.
    assert!(
        reached - answered <= CALLERS,
        "{reached} reached the replica, {answered} were answered"
    );
}

/// Limits hold across gateway replicas: a key's rate and its calls in flight are counted in
/// Redis, so alternating between two gateways gets no more than one would give.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn two_gateways_enforce_one_rate_and_one_concurrency_limit(pool: PgPool) {
    let [a, b] = spawn_two_limited(pool.clone()).await;

    // A burst of 4, then one call every 10 s: shared, whichever gateway is called.
    let rated = Replica::default();
    let rate = kiln_testkit::gateway::seed_running_endpoint(
        &pool,
        rated.serve().await,
        &EndpointLimits {
            per_key_rate: RateLimit {
                per_second: 0.1,
                burst: 4,
            },
            ..EndpointLimits::default()
        },
    )
    .await
    .unwrap();
    for url in [&a, &b, &a, &b] {
        assert_eq!(
            call(url, &rate.endpoint, "v1/models", &rate.key)
                .await
                .status(),
            200
        );
    }
    for url in [&a, &b] {
        let r = call(url, &rate.endpoint, "v1/models", &rate.key).await;
        assert_eq!(r.status(), 429, "the shared burst is spent");
        assert!(r.headers().contains_key("retry-after"));
    }
    assert_eq!(rated.calls(), 4, "refused calls never reached the replica");

    // One call in flight allowed: held through A, the same key's call through B is refused.
    let held = Replica::default();
    let one = kiln_testkit::gateway::seed_running_endpoint(
        &pool,
        held.serve().await,
        &EndpointLimits {
            per_key_concurrency: 1,
            ..EndpointLimits::default()
        },
    )
    .await
    .unwrap();
    let slow = tokio::spawn({
        let (url, endpoint, key) = (a.clone(), one.endpoint.clone(), one.key.clone());
        async move { call(&url, &endpoint, "slow", &key).await.status() }
    });
    eventually("the slow call reached the replica", || async {
        held.calls() == 1
    })
    .await;
    let r = call(&b, &one.endpoint, "v1/models", &one.key).await;
    assert_eq!(r.status(), 429, "the call in flight on A counts on B");
    assert_eq!(held.calls(), 1);
    held.release.notify_one();
    assert_eq!(slow.await.unwrap(), 200);
    eventually("the key may call through B again", || async {
        call(&b, &one.endpoint, "v1/models", &one.key)
            .await
            .status()
            == 200
    })
    .await;
}

/// SIGTERM to a gateway: it stops taking calls, lets the one in flight finish (its answer
/// arrives whole), then exits; a call that never ends holds it no longer than the grace period.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_terminated_gateway_finishes_calls_in_flight_within_its_grace_period(pool: PgPool) {
    let replica = Replica::default();
    let addr = replica.serve().await;
    let ep = kiln_testkit::gateway::seed_running_endpoint(&pool, addr, &EndpointLimits::default())
        .await
        .unwrap();
    let database_url = kiln_testkit::database_url(&pool).await;
    let namespace = format!("test-{}", uuid_v7());
    let sigterm = |child: &tokio::process::Child| {
        let pid = child.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    let exited = async |child: &mut tokio::process::Child, within: std::time::Duration| {
        tokio::time::timeout(within, child.wait())
            .await
            .expect("the gateway exits")
            .unwrap()
    };

    // A call in flight when SIGTERM arrives is answered, then the gateway exits cleanly.
    let mut gw = GatewayProcess::start_with(
        &database_url,
        &namespace,
        &[("KILN_SHUTDOWN_GRACE_SECS", "30")],
    )
    .await;
    let in_flight = tokio::spawn({
        let (url, endpoint, key) = (gw.url.clone(), ep.endpoint.clone(), ep.key.clone());
        async move {
            let r = call(&url, &endpoint, "slow", &key).await;
            (r.status(), r.text().await.unwrap())
        }
    });
    eventually("the call reached the replica", || async {
        replica.calls() == 1
    })
    .await;
    sigterm(&gw.child);
    // It no longer takes calls...
    let url = gw.url.clone();
    eventually("the gateway to stop accepting", || async {
        reqwest::get(format!("{url}/healthz")).await.is_err()
    })
    .await;
    // ...but the one in flight finishes.
    replica.release.notify_one();
    assert_eq!(
        in_flight.await.unwrap(),
        (reqwest::StatusCode::OK, "ok".to_owned())
    );
    let status = exited(&mut gw.child, std::time::Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");

    // A call that never ends holds a terminated gateway only for its grace period.
    let mut gw = GatewayProcess::start_with(
        &database_url,
        &namespace,
        &[("KILN_SHUTDOWN_GRACE_SECS", "1")],
    )
    .await;
    let stuck = tokio::spawn({
        let (url, endpoint, key) = (gw.url.clone(), ep.endpoint.clone(), ep.key.clone());
        async move {
            let sent = reqwest::Client::new()
                .get(format!("{url}/v1/endpoints/{endpoint}/slow"))
                .bearer_auth(key.expose())
                .send()
                .await;
            match sent {
                Ok(r) => r.text().await.is_ok(),
                Err(_) => false,
            }
        }
    });
    eventually("the second call reached the replica", || async {
        replica.calls() == 2
    })
    .await;
    sigterm(&gw.child);
    let status = exited(&mut gw.child, std::time::Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    assert!(
        !stuck.await.unwrap(),
        "the stuck call was cut off, not answered"
    );
}

/// An endpoint's owner grants another org: that org's keys reach the endpoint, each answered
/// call is recorded with who made it and the price it owes the owner, and once the grant is
/// taken back its keys get 404 again (pushed to the gateway, not waited out).
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_granted_org_calls_another_orgs_endpoint_until_the_grant_is_taken_back(pool: PgPool) {
    let replica = Replica::default();
    let addr = replica.serve().await;
    let ep = kiln_testkit::gateway::seed_running_endpoint(&pool, addr, &EndpointLimits::default())
        .await
        .unwrap();
    let (partner, partner_key) = org_with_key(&pool).await;
    let (_, stranger_key) = org_with_key(&pool).await;
    sqlx::query(
        "UPDATE endpoints SET price_per_request_micros = 1500,
             price_per_1k_prompt_tokens_micros = 10, price_per_1k_completion_tokens_micros = 20
         WHERE id = $1",
    )
    .bind(ep.endpoint_id)
    .execute(&pool)
    .await
    .unwrap();
    // Metered into Redis and ingested into Postgres as the binary does; cached answers live for
    // an hour, so only the grant's notice can change what the gateway says.
    let namespace = format!("test-{}", uuid_v7());
    let store = Store::new(pool.clone());
    let meter = kiln_gateway::metering::Meter::connect(&kiln_testkit::redis_url(), &namespace)
        .await
        .unwrap();
    let ingester = kiln_gateway::metering::Ingester::new(
        store.clone(),
        &kiln_testkit::redis_url(),
        &namespace,
    )
    .unwrap();
    tokio::spawn(ingester.run());
    let url = &serve(GatewayState::with_cache_ttls(store, FOREVER).with_meter(meter)).await;
    for key in [&partner_key, &stranger_key] {
        let r = call(url, &ep.endpoint, "v1/models", key).await;
        assert_eq!(
            r.status(),
            404,
            "not granted: as unknown as a made-up endpoint"
        );
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    assert_eq!(replica.calls(), 0);

    sqlx::query("INSERT INTO endpoint_grants (endpoint_id, org_id) VALUES ($1, $2)")
        .bind(ep.endpoint_id)
        .bind(partner)
        .execute(&pool)
        .await
        .unwrap();
    eventually("the grant reaches the gateway", || async {
        call(url, &ep.endpoint, "v1/models", &partner_key)
            .await
            .status()
            == 200
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            call(url, &ep.endpoint, "v1/models", &partner_key)
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        call(url, &ep.endpoint, "v1/models", &ep.key).await.status(),
        200
    );
    assert_eq!(
        call(url, &ep.endpoint, "v1/models", &stranger_key)
            .await
            .status(),
        404,
        "a grant to one org opens the endpoint to no other"
    );

    // Each answered call is metered once, the partner's with the price it owes the owner.
    let rows =
        || async {
            sqlx::query_as::<_, (Option<sqlx::types::Uuid>, Option<i64>, Option<i64>, Option<i64>)>(
            "SELECT caller_org_id, resale_per_request_micros, resale_per_1k_prompt_tokens_micros,
                    resale_per_1k_completion_tokens_micros
             FROM usage_events WHERE endpoint_id = $1 ORDER BY id",
        )
        .bind(ep.endpoint_id)
        .fetch_all(&pool)
        .await
        .unwrap()
        };
    let answered = replica.calls();
    eventually("every answered call is ingested", || async {
        rows().await.len() == answered
    })
    .await;
    let rows = rows().await;
    let by_partner: Vec<_> = rows.iter().filter(|r| r.0 == Some(partner)).collect();
    assert_eq!(
        by_partner.len(),
        answered - 1,
        "all but the owner's one call"
    );
    assert!(
        by_partner
            .iter()
            .all(|r| (r.1, r.2, r.3) == (Some(1500), Some(10), Some(20)))
    );
    let by_owner: Vec<_> = rows.iter().filter(|r| r.0.is_none()).collect();
    assert_eq!(by_owner.len(), 1);
    assert_eq!(
        (by_owner[0].1, by_owner[0].2),
        (None, None),
        "the owner owes itself nothing"
    );

    // Taken back: refused again at once, before any replica is called.
    sqlx::query("DELETE FROM endpoint_grants WHERE endpoint_id = $1 AND org_id = $2")
        .bind(ep.endpoint_id)
        .bind(partner)
        .execute(&pool)
        .await
        .unwrap();
    eventually("the revocation reaches the gateway", || async {
        call(url, &ep.endpoint, "v1/models", &partner_key)
            .await
            .status()
            == 404
    })
    .await;
    let reached = replica.calls();
    assert_eq!(
        call(url, &ep.endpoint, "v1/models", &partner_key)
            .await
            .status(),
        404
    );
    assert_eq!(replica.calls(), reached);
    assert_eq!(
        call(url, &ep.endpoint, "v1/models", &ep.key).await.status(),
        200
    );
}
