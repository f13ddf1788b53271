use kiln_testkit::TestApp;
use kiln_testkit::serde_json::json;
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

use crate::{assert_problem, error_fields};

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn signup_gives_a_personal_org_and_sign_in_works(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (status, body) = app
        .call(Method::POST, "/v1/auth/signup", None, Some(json!({"email": "  Ada@Example.COM ", "password": "correct horse battery", "name": "Ada"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body["user"]["email"], "ada@example.com",
        "email is normalised"
    );
    assert!(body["user"]["id"].as_str().unwrap().starts_with("usr_"));
    assert!(body["org"]["id"].as_str().unwrap().starts_with("org_"));
    assert_eq!(body["org"]["role"], "owner");
    assert!(body["user"].get("password_hash").is_none() && !body.to_string().contains("argon2"));

    // The email is one account whatever its case.
    let (access, _) = app.login("ADA@example.com", "correct horse battery").await;
    let (status, me) = app.get("/v1/me", &access).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["user"]["email"], "ada@example.com");
    assert_eq!(me["memberships"].as_array().unwrap().len(), 1);
    assert_eq!(me["memberships"][0]["role"], "owner");

    // The stored hash is argon2id at OWASP's minimum or better.
    let (hash,): (String,) = sqlx::query_as("SELECT password_hash FROM users")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn signup_reports_every_bad_field_and_refuses_duplicates(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (status, body) = app
        .call(
            Method::POST,
            "/v1/auth/signup",
            None,
            Some(json!({"email": "not-an-email", "password": "short"})),
        )
        .await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    let mut fields = error_fields(&body);
    fields.sort();
    assert_eq!(fields, ["email", "name", "password"]);

    let (status, body) = app
        .call(
            Method::POST,
            "/v1/auth/signup",
            None,
            Some(json!({"email": "bob@example.com", "password": "BOB@example.com", "name": "Bob"})),
        )
        .await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        error_fields(&body),
        ["password"],
        "the password may not be the email: {body}"
    );

    app.user("bob").await;
    let (status, body) = app
        .call(Method::POST, "/v1/auth/signup", None, Some(json!({"email": "BOB@example.com", "password": "another long password", "name": "Bob 2"})))
        .await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_fields(&body), ["email"]);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM users")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(n, 1, "the duplicate created nothing");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn wrong_password_and_unknown_email_look_the_same(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    app.user("carol").await;
    let (s1, b1) = app
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"email": "carol@example.com", "password": "wrong password!!"})),
        )
        .await;
    let (s2, b2) = app
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"email": "nobody@example.com", "password": "wrong password!!"})),
        )
        .await;
    assert_problem(s1, &b1, StatusCode::UNAUTHORIZED);
    assert_eq!(
        (s1, &b1),
        (s2, &b2),
        "answers must not reveal whether the account exists"
    );

    // The failed attempt on a real account is in the audit log for that person's orgs.
    let carol = app
        .login("carol@example.com", "carol-correct-horse-battery")
        .await
        .0;
    let (_, me) = app.get("/v1/me", &carol).await;
    let org = me["memberships"][0]["org_id"].as_str().unwrap().to_owned();
    kiln_testkit::eventually(
        "the failed sign-in to be audited",
        std::time::Duration::from_secs(10),
        || {
            let (app, carol, org) = (&app, &carol, &org);
            async move {
                let (_, log) = app.get(&format!("/v1/orgs/{org}/audit-log"), carol).await;
                log["items"]
                    .as_array()?
                    .iter()
                    .any(|e| e["action"] == "auth.login_failed")
                    .then_some(())
            }
        },
    )
    .await;
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn refresh_rotates_and_reuse_revokes_the_family(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("dave").await;
    let (status, pair) = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": u.refresh_token})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{pair}");
    let (access2, refresh2) = (
        pair["access_token"].as_str().unwrap().to_owned(),
        pair["refresh_token"].as_str().unwrap().to_owned(),
    );
    assert_ne!(refresh2, u.refresh_token);
    assert_eq!(app.get("/v1/me", &access2).await.0, StatusCode::OK);

    // Presenting the spent token again (a thief's copy, say) revokes the whole session...
    let (status, body) = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": u.refresh_token})),
        )
        .await;
    assert_problem(status, &body, StatusCode::UNAUTHORIZED);
    // ...so the newest refresh token and the access tokens of the family die too.
    let (status, _) = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": refresh2})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.get("/v1/me", &access2).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.get("/v1/me", &u.access_token).await.0,
        StatusCode::UNAUTHORIZED
    );
    // Other sessions of the same person are unaffected.
    let (other, _) = app.login(&u.email, &u.password).await;
    assert_eq!(app.get("/v1/me", &other).await.0, StatusCode::OK);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn logout_revokes_the_session_at_once(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("erin").await;
    assert_eq!(app.get("/v1/me", &u.access_token).await.0, StatusCode::OK);
    let (status, _) = app
        .call(Method::POST, "/v1/auth/logout", Some(&u.access_token), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = app.get("/v1/me", &u.access_token).await;
    assert_problem(status, &body, StatusCode::UNAUTHORIZED);
    let (status, _) = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": u.refresh_token})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn forged_and_garbage_tokens_are_refused(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("frank").await;
    let mut forged = u.access_token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    for token in [forged.as_str(), "garbage", "kiln_notreallyakey", "a.b.c"] {
        let (status, body) = app.get("/v1/me", token).await;
        assert_problem(status, &body, StatusCode::UNAUTHORIZED);
    }
    let (status, body) = app.call(Method::GET, "/v1/me", None, None).await;
    assert_problem(status, &body, StatusCode::UNAUTHORIZED);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn rotating_the_signing_key_logs_nobody_out(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("grace").await;
    let old_kid = app.state.keyring().signing_kid().unwrap().to_owned();
    // Rotate now (as another replica would), retiring nothing yet.
    assert!(
        app.store()
            .signing_keys_rotate(time::Duration::ZERO, time::Duration::hours(1))
            .await
            .unwrap()
    );
    let (fresh, _) = app.login(&u.email, &u.password).await;
    // This replica has not reloaded; it signs with the old key until it does...
    app.state.rotate_and_reload_keys().await.unwrap();
    let new_kid = app.state.keyring().signing_kid().unwrap().to_owned();
    assert_ne!(old_kid, new_kid);
    let (newest, _) = app.login(&u.email, &u.password).await;
    // Tokens signed by either key verify.
    for t in [&u.access_token, &fresh, &newest] {
        assert_eq!(app.get("/v1/me", t).await.0, StatusCode::OK);
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn sign_in_is_rate_limited_per_account_and_per_ip(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |c| {
        c.login_limit_per_account = 3;
        c.login_limit_per_ip = 5;
        c.signup_limit_per_ip = 2;
    })
    .await;
    let bad = json!({"email": "henry@example.com", "password": "guessing password"});
    for _ in 0..3 {
        assert_eq!(
            app.call(Method::POST, "/v1/auth/login", None, Some(bad.clone()))
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
    }
    let (status, headers, body) = app
        .call_full(Method::POST, "/v1/auth/login", None, Some(bad.clone()), &[])
        .await;
    assert_problem(status, &body, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // Other accounts from the same address still get through, up to the per-IP limit.
    let other = json!({"email": "ivy@example.com", "password": "guessing password"});
    assert_eq!(
        app.call(Method::POST, "/v1/auth/login", None, Some(other.clone()))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.call(Method::POST, "/v1/auth/login", None, Some(other.clone()))
            .await
            .0,
        StatusCode::TOO_MANY_REQUESTS
    );

    // Sign-ups per address.
    for i in 0..2 {
        let body = json!({"email": format!("s{i}@example.com"), "password": "correct horse battery", "name": "S"});
        assert_eq!(
            app.call(Method::POST, "/v1/auth/signup", None, Some(body))
                .await
                .0,
            StatusCode::CREATED
        );
    }
    let body = json!({"email": "s9@example.com", "password": "correct horse battery", "name": "S"});
    let (status, body) = app
        .call(Method::POST, "/v1/auth/signup", None, Some(body))
        .await;
    assert_problem(status, &body, StatusCode::TOO_MANY_REQUESTS);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn malformed_bodies_get_problems_not_crashes(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |c| c.max_body_bytes = 4096).await;
    let url = format!("{}/v1/auth/signup", app.url);
    let cases: Vec<(&str, Vec<u8>, StatusCode)> = vec![
        (
            "application/json",
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "application/json",
            b"[1,2,3]".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "application/json",
            br#"{"email": 5}"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "text/plain",
            br#"{"email":"a@b.co"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "application/json",
            vec![b' '; 10_000],
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "application/json",
            format!(
                r#"{{"email":"a@b.co","password":"{}","name":"x"}}"#,
                "p".repeat(300)
            )
            .into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "application/json",
            json!({"email": "\u{0}@x.co", "password": "correct horse battery", "name": "\u{7}"})
                .to_string()
                .into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (ct, body, expected) in cases {
        let resp = app
            .client
            .post(&url)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let ctype = resp.headers()["content-type"].to_str().unwrap().to_owned();
        let body: kiln_testkit::serde_json::Value = resp.json().await.unwrap();
        assert_problem(status, &body, expected);
        assert_eq!(ctype, "application/problem+json");
    }
    // Unknown routes and methods answer problems too.
    let (status, body) = app.call(Method::GET, "/v1/nothing-here", None, None).await;
    assert_problem(status, &body, StatusCode::NOT_FOUND);
    let (status, _) = app.call(Method::PUT, "/v1/me", None, None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn health_and_metrics_are_served(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let resp = app
        .client
        .get(format!("{}/healthz", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = app.call(Method::GET, "/v1/me", None, None).await;
    let text = app
        .client
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("kiln_http_requests_total"), "{text}");
    assert!(text.contains("route=\"/v1/me\""), "{text}");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_logout_on_one_replica_reaches_the_others(pool: PgPool) {
    let a = TestApp::spawn(pool).await;
    let b = a.spawn_replica().await;
    let u = a.user("ivan").await;
    // Replica B has seen the session (and caches it as live).
    assert_eq!(b.get("/v1/me", &u.access_token).await.0, StatusCode::OK);
    let (status, _) = a
        .call(Method::POST, "/v1/auth/logout", Some(&u.access_token), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // B hears of it through Redis well before its cache would have expired.
    kiln_testkit::eventually(
        "replica B to refuse the revoked session",
        std::time::Duration::from_millis(1500),
        || {
            let (b, t) = (&b, &u.access_token);
            async move { (b.get("/v1/me", t).await.0 == StatusCode::UNAUTHORIZED).then_some(()) }
        },
    )
    .await;
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn sign_up_is_rate_limited_per_account(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |c| c.signup_limit_per_account = 2).await;
    // Attempts at one email count whatever their outcome (here: a taken address)...
    let body =
        json!({"email": "Judy@example.com", "password": "correct horse battery", "name": "Judy"});
    assert_eq!(
        app.call(Method::POST, "/v1/auth/signup", None, Some(body.clone()))
            .await
            .0,
        StatusCode::CREATED
    );
    let again =
        json!({"email": "judy@EXAMPLE.com ", "password": "correct horse battery", "name": "Judy"});
    assert_eq!(
        app.call(Method::POST, "/v1/auth/signup", None, Some(again.clone()))
            .await
            .0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let (status, headers, problem) = app
        .call_full(Method::POST, "/v1/auth/signup", None, Some(again), &[])
        .await;
    assert_problem(status, &problem, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("retry-after"));
    // ...while other addresses from the same client are unaffected.
    let other =
        json!({"email": "kim@example.com", "password": "correct horse battery", "name": "Kim"});
    assert_eq!(
        app.call(Method::POST, "/v1/auth/signup", None, Some(other))
            .await
            .0,
        StatusCode::CREATED
    );
}
