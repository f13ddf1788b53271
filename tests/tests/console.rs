//! The web console, used the way a person uses it: in headless Chromium (one end-to-end journey),
//! and over plain HTTP for what a browser would never show (cross-site posts, other orgs,
//! cookies and the session refresh).
//!
//! Needs `DATABASE_URL` (a Postgres that lets the test create databases) and `REDIS_URL`.

use kiln_testkit::TestApp;
use kiln_tests::{Browser, Chromedriver};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use serde_json::json;
use sqlx::PgPool;

/// Sign up, sign in, make an org, switch to it, make an API key (and use it), add a member,
/// fail to demote the last owner, revoke the key, read the audit log, sign out.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_person_runs_an_org_from_the_console(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let driver = Chromedriver::start().await;
    let b = Browser::open(&driver, "console").await;
    let email = "ada@example.com";
    let password = "analytical-engine-1843";

    // Sign up with a password that is too short: the message is beside the field, the input kept.
    b.goto(&format!("{}/signup", app.url)).await;
    b.fill("#name", "Ada Lovelace").await;
    b.fill("#email", email).await;
    b.fill("#password", "short").await;
    b.click("#create-account").await;
    let error = b.text("#password-error").await;
    assert!(
        error.contains("at least 12 characters"),
        "password error: {error}"
    );
    assert_eq!(b.value("#email").await, email, "the email is kept");
    assert_eq!(b.value("#name").await, "Ada Lovelace", "the name is kept");
    assert_eq!(
        b.value("#password").await,
        "",
        "the password is not sent back"
    );
    b.screenshot("signup-short-password").await;

    // Sign up properly: on to the sign-in page.
    b.fill("#password", password).await;
    b.click("#create-account").await;
    b.wait_for("#login-form").await;
    assert!(b.text("#notice").await.contains("is ready"));
    b.screenshot("signed-up").await;

    // Sign in: the dashboard, with the personal org and who is signed in.
    b.fill("#email", email).await;
    b.fill("#password", password).await;
    b.click("#sign-in").await;
    b.wait_for("#org-list").await;
    assert_eq!(b.text("#user-email").await, email);
    assert!(b.text("#org-list").await.contains("Ada Lovelace's org"));
    b.screenshot("dashboard").await;

    // Create an org: its page opens.
    b.fill("#org-name", "Difference Engines").await;
    b.click("#create-org").await;
    let title = b.text("#org-title").await;
    assert!(
        title.contains("Difference Engines") && title.contains("owner"),
        "org title: {title}"
    );
    let org_id = b.text("#org-id").await;
    assert!(org_id.starts_with("org_"), "org id: {org_id}");
    b.screenshot("org-created").await;

    // Switch to the personal org and back with the switcher in the top bar.
    let personal = b
        .wait_for("#org-switcher option[data-personal]")
        .await
        .attr("value")
        .await
        .expect("attr")
        .expect("a value");
    b.wait_for("#org-switcher")
        .await
        .select_by_value(&personal)
        .await
        .expect("pick the personal org");
    b.wait_for_path(&format!("/orgs/{personal}")).await;
    assert!(b.text("#org-title").await.contains("Ada Lovelace's org"));
    b.wait_for("#org-switcher")
        .await
        .select_by_value(&org_id)
        .await
        .expect("pick the new org");
    b.wait_for_path(&format!("/orgs/{org_id}")).await;
    assert!(b.text("#org-title").await.contains("Difference Engines"));
    b.screenshot("switched-org").await;

    // Create an API key: its secret is shown once, and it works over REST.
    b.click("#tab-api-keys").await;
    b.fill("#key-name", "ci-deploy").await;
    b.click("#create-key").await;
    let secret = b.value("#new-key-secret").await;
    assert!(secret.starts_with("kiln_"), "secret: {secret}");
    assert!(b.text("#new-key").await.contains("only time"));
    b.screenshot("api-key-created").await;
    let (status, me) = app.get("/v1/me", &secret).await;
    assert_eq!(status, StatusCode::OK, "GET /v1/me with the new key: {me}");
    assert_eq!(me["api_key"]["org_id"], org_id.as_str());
    b.goto(&format!("{}/orgs/{org_id}/api-keys", app.url)).await;
    b.wait_for("#api-keys tr[data-name='ci-deploy']").await;
    assert!(
        b.client
            .find(fantoccini_css("#new-key-secret"))
            .await
            .is_err(),
        "the secret is shown only once"
    );

    // Add a second person (signed up over REST) as a member.
    let grace = app.user("grace").await;
    b.click("#tab-members").await;
    b.fill("#member-email", &grace.email).await;
    b.wait_for("#member-role")
        .await
        .select_by_value("member")
        .await
        .expect("pick a role");
    b.click("#add-member").await;
    let row = b
        .text(&format!("#members tr[data-email='{}']", grace.email))
        .await;
    assert!(row.contains("member"), "grace's row: {row}");
    assert!(b.text("#notice").await.contains("Added grace@example.com"));
    b.screenshot("member-added").await;

    // The ops' rules show up as messages: the only owner cannot step down.
    let me_row = format!("#members tr[data-email='{email}']");
    b.wait_for(&format!("{me_row} select"))
        .await
        .select_by_value("admin")
        .await
        .expect("pick admin");
    b.click(&format!("{me_row} .role-form button")).await;
    let alert = b.text("#alert").await;
    assert!(alert.contains("at least one owner"), "alert: {alert}");
    b.screenshot("last-owner-refused").await;

    // Revoke the key: REST now refuses it.
    b.click("#tab-api-keys").await;
    b.click("#api-keys tr[data-name='ci-deploy'] .actions button")
        .await;
    b.accept_dialog().await;
    b.wait_for("#api-keys tr.revoked[data-name='ci-deploy']")
        .await;
    assert!(b.text("#notice").await.contains("Revoked"));
    b.screenshot("api-key-revoked").await;
    let (status, body) = app.get("/v1/me", &secret).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a revoked key: {body}");

    // The audit log shows the key's creation (and the rest).
    b.click("#tab-audit-log").await;
    let created = b.text("#audit-log tr[data-action='api_key.create']").await;
    assert!(
        created.contains(email) && created.contains("ci-deploy"),
        "audit row: {created}"
    );
    b.wait_for("#audit-log tr[data-action='api_key.revoke']")
        .await;
    b.wait_for("#audit-log tr[data-action='member.add']").await;
    b.screenshot("audit-log").await;

    // Sign out: back on the sign-in page, and the org pages are closed.
    b.click("#sign-out").await;
    b.wait_for("#login-form").await;
    b.wait_for_path("/login").await;
    assert!(b.text("#notice").await.contains("signed out"));
    b.screenshot("signed-out").await;
    b.goto(&format!("{}/orgs/{org_id}/members", app.url)).await;
    b.wait_for("#login-form").await;
    b.wait_for_path(&format!("/login?next=%2Forgs%2F{org_id}%2Fmembers"))
        .await;

    b.close().await;
    drop(driver);
    app.stop().await;
}

fn fantoccini_css(css: &str) -> kiln_tests::fantoccini::Locator<'_> {
    kiln_tests::fantoccini::Locator::Css(css)
}

// ---- without a browser ----

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

/// The `name=value` pairs a response sets, in a `Cookie` header's form.
fn cookies_set(headers: &HeaderMap) -> Vec<(String, String, String)> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (name, value) = pair.split_once('=')?;
            Some((
                name.trim().to_owned(),
                value.trim().to_owned(),
                attrs.to_owned(),
            ))
        })
        .collect()
}

fn cookie_header(cookies: &[(String, String, String)]) -> String {
    cookies
        .iter()
        .filter(|(n, v, _)| n.starts_with("kiln_") && !v.is_empty())
        .map(|(n, v, _)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn location(headers: &HeaderMap) -> String {
    headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Sign in through the console's form; returns the cookies it set.
async fn console_login(
    app: &TestApp,
    email: &str,
    password: &str,
) -> Vec<(String, String, String)> {
    let resp = no_redirects()
        .post(format!("{}/login", app.url))
        .form(&[("email", email), ("password", password), ("next", "/")])
        .send()
        .await
        .expect("POST /login");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(resp.headers()), "/");
    cookies_set(resp.headers())
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn console_refuses_cross_site_posts_and_hides_other_orgs(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let grace = app.user("grace").await;
    let http = no_redirects();

    // Signed out: org pages send you to sign in, and back here afterwards.
    let resp = http
        .get(format!("{}/orgs/{}/members", app.url, ada.org_id))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        location(resp.headers()),
        format!("/login?next=%2Forgs%2F{}%2Fmembers", ada.org_id)
    );
    let resp = http
        .get(format!("{}/", app.url))
        .send()
        .await
        .expect("GET /");
    assert_eq!(location(resp.headers()), "/login");

    // Signing in sets the two session cookies, HttpOnly and SameSite=Strict.
    let set = console_login(&app, &ada.email, &ada.password).await;
    for name in ["kiln_access", "kiln_refresh"] {
        let (_, value, attrs) = set
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is set: {set:?}"));
        assert!(!value.is_empty());
        assert!(
            attrs.contains("HttpOnly")
                && attrs.contains("SameSite=Strict")
                && attrs.contains("Path=/"),
            "{name}: {attrs}"
        );
    }
    let cookies = cookie_header(&set);

    // Own org: a page. Someone else's org, or no org at all: a not-found page, not a hint.
    let resp = http
        .get(format!("{}/orgs/{}/members", app.url, ada.org_id))
        .header("cookie", &cookies)
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    let csp = resp
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(csp.contains("frame-ancestors 'none'"), "csp: {csp}");
    assert!(resp.text().await.expect("body").contains("ada@example.com"));
    for path in [
        format!("/orgs/{}", grace.org_id),
        format!("/orgs/{}/members", grace.org_id),
        format!("/orgs/{}/api-keys", grace.org_id),
        "/orgs/org_not-an-id/members".to_owned(),
    ] {
        let resp = http
            .get(format!("{}{path}", app.url))
            .header("cookie", &cookies)
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap_or_default()
                .starts_with("text/html")
        );
        let body = resp.text().await.expect("body");
        assert!(
            body.contains("Not found") && !body.contains("grace"),
            "{path}: {body}"
        );
    }

    // A form posted from another site is refused, and nothing happens.
    for origin in ["http://evil.example", "null"] {
        let resp = http
            .post(format!("{}/orgs", app.url))
            .header("cookie", &cookies)
            .header("origin", origin)
            .form(&[("name", "Phished")])
            .send()
            .await
            .expect("POST /orgs");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "origin {origin}");
    }
    let resp = http
        .post(format!("{}/orgs/{}/members", app.url, ada.org_id))
        .header("cookie", &cookies)
        .header("origin", "https://evil.example")
        .form(&[("email", grace.email.as_str()), ("role", "owner")])
        .send()
        .await
        .expect("POST members");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let (_, orgs) = app.get("/v1/orgs", &ada.access_token).await;
    assert!(
        !orgs.to_string().contains("Phished"),
        "no org was made: {orgs}"
    );
    let (_, members) = app
        .get(
            &format!("/v1/orgs/{}/members", ada.org_id),
            &ada.access_token,
        )
        .await;
    assert!(
        !members.to_string().contains("grace"),
        "nobody was added: {members}"
    );

    // The same form from the console itself works.
    let resp = http
        .post(format!("{}/orgs", app.url))
        .header("cookie", &cookies)
        .header("origin", &app.url)
        .form(&[("name", "Analytical Engines")])
        .send()
        .await
        .expect("POST /orgs");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(location(resp.headers()).starts_with("/orgs/org_"));

    // Posting into someone else's org is a not-found too, and changes nothing.
    let resp = http
        .post(format!("{}/orgs/{}/members", app.url, grace.org_id))
        .header("cookie", &cookies)
        .form(&[("email", ada.email.as_str()), ("role", "owner")])
        .send()
        .await
        .expect("POST members");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let (_, members) = app
        .get(
            &format!("/v1/orgs/{}/members", grace.org_id),
            &grace.access_token,
        )
        .await;
    assert!(!members.to_string().contains("ada@"), "{members}");

    app.stop().await;
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn console_refreshes_a_rejected_access_token_and_signs_out(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let http = no_redirects();
    let set = console_login(&app, &ada.email, &ada.password).await;
    let refresh = set
        .iter()
        .find(|(n, _, _)| n == "kiln_refresh")
        .map(|(_, v, _)| v.clone())
        .expect("refresh cookie");

    // An access token the server rejects, with a good refresh token: the page still opens, and
    // a new pair of cookies comes back.
    let resp = http
        .get(format!("{}/orgs/{}", app.url, ada.org_id))
        .header(
            "cookie",
            format!("kiln_access=not-a-token; kiln_refresh={refresh}"),
        )
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    let renewed = cookies_set(resp.headers());
    let new_refresh = renewed
        .iter()
        .find(|(n, _, _)| n == "kiln_refresh")
        .map(|(_, v, _)| v.clone())
        .expect("a new refresh cookie");
    assert_ne!(new_refresh, refresh, "the refresh token rotates");
    let cookies = cookie_header(&renewed);
    let resp = http
        .get(format!("{}/", app.url))
        .header("cookie", &cookies)
        .send()
        .await
        .expect("GET /");
    assert_eq!(resp.status(), StatusCode::OK);

    // A bad refresh token as well: sign in again, and the cookies are cleared.
    let resp = http
        .get(format!("{}/", app.url))
        .header("cookie", "kiln_access=not-a-token; kiln_refresh=krt_nope")
        .send()
        .await
        .expect("GET /");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(resp.headers()), "/login");
    assert!(
        cookies_set(resp.headers())
            .iter()
            .any(|(n, v, a)| n == "kiln_access" && v.is_empty() && a.contains("Max-Age=0"))
    );

    // Sign out ends the session on the server, not only in the browser.
    let resp = http
        .post(format!("{}/logout", app.url))
        .header("cookie", &cookies)
        .send()
        .await
        .expect("POST /logout");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(resp.headers()), "/login");
    let resp = http
        .get(format!("{}/", app.url))
        .header("cookie", &cookies)
        .send()
        .await
        .expect("GET /");
    assert_eq!(
        resp.status(),
        StatusCode::SEE_OTHER,
        "the old cookies no longer work"
    );
    let (status, _) = app
        .call(
            reqwest::Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": new_refresh })),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the session's refresh token is dead"
    );

    app.stop().await;
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn viewers_see_read_only_pages_and_the_server_enforces_it(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let grace = app.user("grace").await;
    let carol = app.user("carol").await;
    app.add_member(&ada, &ada.org_id, &grace, "viewer").await;
    let http = no_redirects();
    let cookies = cookie_header(&console_login(&app, &grace.email, &grace.password).await);

    let resp = http
        .get(format!("{}/orgs/{}/members", app.url, ada.org_id))
        .header("cookie", &cookies)
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.text().await.expect("body");
    assert!(body.contains("ada@example.com") && body.contains("grace@example.com"));
    for absent in [
        "add-member-form",
        "role-form",
        "tab-api-keys",
        "tab-audit-log",
        "Remove</button>",
    ] {
        assert!(
            !body.contains(absent),
            "a viewer's members page has no `{absent}`"
        );
    }
    assert!(body.contains("Leave</button>"), "anyone may leave");

    // The pages a viewer cannot use are refused by the same ops as REST.
    for path in ["api-keys", "audit-log"] {
        let resp = http
            .get(format!("{}/orgs/{}/{path}", app.url, ada.org_id))
            .header("cookie", &cookies)
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
    }
    let resp = http
        .post(format!("{}/orgs/{}/members", app.url, ada.org_id))
        .header("cookie", &cookies)
        .form(&[("email", carol.email.as_str()), ("role", "viewer")])
        .send()
        .await
        .expect("POST members");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.text().await.expect("body").contains("may not do this"));
    let (_, members) = app
        .get(
            &format!("/v1/orgs/{}/members", ada.org_id),
            &ada.access_token,
        )
        .await;
    assert!(!members.to_string().contains("carol"), "{members}");

    app.stop().await;
}
