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

// ---- the operators' fleet page ----

/// Make `user` the deployment's operator (as `KILN_ADMIN_EMAIL` does at start-up).
async fn make_operator(app: &TestApp, email: &str) {
    sqlx::query("UPDATE users SET is_operator = true WHERE email = $1")
        .bind(email)
        .execute(app.store().pool())
        .await
        .expect("make an operator");
}

/// A node with two H100s (GPU 1 split into two MIG instances) whose GPU 0 reports unhealthy.
/// The node is inserted directly: joining is tested with the node-control service.
async fn fleet_node(app: &TestApp, hostname: &str) -> String {
    sqlx::query(
        "INSERT INTO nodes (id, hostname, agent_version, credential_hash)
         VALUES (gen_random_uuid(), $1, '0.1.0', decode(md5(random()::text), 'hex'))",
    )
    .bind(hostname)
    .execute(app.store().pool())
    .await
    .expect("insert a node");
    let page = app
        .store()
        .node_list(kiln_store::PageRequest {
            limit: 50,
            after: None,
        })
        .await
        .expect("list nodes");
    let id = page
        .items
        .iter()
        .find(|n| n.hostname == hostname)
        .expect("the node")
        .id;
    let gpu = |index: u32, mig: Vec<kiln_store::MigInstanceRecord>| kiln_store::GpuRegistration {
        uuid: format!("GPU-{hostname}-{index}"),
        index,
        model: "NVIDIA H100 80GB HBM3".into(),
        gpu_type: Some("h100-80gb".into()),
        memory_mib: 81_559,
        pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index),
        numa_node: Some(0),
        iommu_group: None,
        mig_capable: true,
        mig_enabled: !mig.is_empty(),
        mig_instances: mig,
        nvlink_peers: vec![],
    };
    let mig = |start: u32, size: u32| kiln_store::MigInstanceRecord {
        profile: format!("{size}g.{}gb", size * 10),
        start,
        size,
        uuid: format!("MIG-{hostname}-{start}"),
    };
    app.store()
        .node_register(
            id,
            &kiln_store::NodeRegistration {
                hostname: hostname.to_owned(),
                agent_version: "0.1.0".into(),
                protocol_minor: 0,
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
                cpu_cores: 96,
                memory_mib: 1_048_576,
                disk_gib: 2000,
                gpus: vec![gpu(0, vec![]), gpu(1, vec![mig(0, 4), mig(4, 4)])],
            },
        )
        .await
        .expect("register");
    app.store()
        .node_heartbeat(
            id,
            0,
            &[kiln_store::GpuHealthReport {
                uuid: format!("GPU-{hostname}-0"),
                health: "unhealthy",
                reason: "XID 79: GPU has fallen off the bus".into(),
            }],
        )
        .await
        .expect("heartbeat");
    id.to_string()
}

/// An operator opens the fleet page from the top bar, sees the unhealthy GPU coloured and the
/// MIG slices inside their GPU, and cordons the node with a click.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_operator_sees_the_fleet_grid_and_cordons_a_node(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.user("op").await;
    make_operator(&app, &op.email).await;
    let node = fleet_node(&app, "gpu-01").await;
    let driver = Chromedriver::start().await;
    let b = Browser::open(&driver, "fleet").await;

    b.goto(&format!("{}/login", app.url)).await;
    b.fill("#email", &op.email).await;
    b.fill("#password", &op.password).await;
    b.click("#sign-in").await;
    b.wait_for("#org-list").await;
    b.click("#nav-fleet").await;
    b.wait_for("#fleet-grid").await;
    b.screenshot("fleet").await;

    let row = format!("[data-node=\"{node}\"]");
    assert_eq!(b.text(&format!("{row} .node-state")).await, "ready");
    let bad = b
        .wait_for(&format!("{row} .gpu[data-gpu=\"GPU-gpu-01-0\"]"))
        .await;
    assert_eq!(
        bad.attr("data-health").await.unwrap().as_deref(),
        Some("unhealthy")
    );
    let title = bad.attr("title").await.unwrap().unwrap_or_default();
    assert!(
        title.contains("XID 79: GPU has fallen off the bus"),
        "{title}"
    );
    // Coloured: a red border, unlike the healthy GPU beside it.
    let border = bad.css_value("border-top-color").await.unwrap();
    let good = b
        .wait_for(&format!("{row} .gpu[data-gpu=\"GPU-gpu-01-1\"]"))
        .await;
    let good_border = good.css_value("border-top-color").await.unwrap();
    assert!(border.contains("185, 28, 28"), "unhealthy border: {border}");
    assert_ne!(border, good_border);
    // Two MIG instances, each four of the GPU's eight slices wide, side by side.
    let slices = good
        .find_all(fantoccini_css(".mig-slice"))
        .await
        .expect("MIG slices");
    assert_eq!(slices.len(), 2);
    let (first, second) = (
        slices[0].rectangle().await.unwrap(),
        slices[1].rectangle().await.unwrap(),
    );
    assert!(second.0 > first.0 + first.2 * 0.9, "{first:?} {second:?}");
    assert!((first.2 - second.2).abs() < 2.0, "{first:?} {second:?}");
    assert!(b.text("#capacity").await.contains("h100-80gb"));

    b.click(&format!("{row} button[data-action=\"cordon\"]"))
        .await;
    let notice = b.text("#notice").await;
    assert!(notice.contains("Cordoned gpu-01"), "notice: {notice}");
    assert_eq!(b.text(&format!("{row} .node-state")).await, "cordoned");
    b.screenshot("fleet-cordoned").await;
    let (state,): (String,) = sqlx::query_as("SELECT state FROM nodes WHERE hostname = 'gpu-01'")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(state, "cordoned");

    b.close().await;
    drop(driver);
    app.stop().await;
}

/// Without a browser: the page and its buttons are invisible to tenants, cross-site posts are
/// refused, and a retired node's refusal is shown on the page.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn the_fleet_page_is_for_operators_only(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.user("op").await;
    make_operator(&app, &op.email).await;
    let ada = app.user("ada").await;
    let node = fleet_node(&app, "gpu-01").await;
    let http = no_redirects();

    let tenant = cookie_header(&console_login(&app, &ada.email, &ada.password).await);
    let dashboard = http
        .get(format!("{}/", app.url))
        .header("cookie", &tenant)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !dashboard.contains("nav-fleet"),
        "no Fleet link for tenants"
    );
    let resp = http
        .get(format!("{}/admin/fleet", app.url))
        .header("cookie", &tenant)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(!resp.text().await.unwrap().contains("gpu-01"));
    let resp = http
        .post(format!("{}/admin/fleet/{node}/cordon", app.url))
        .header("cookie", &tenant)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    let operator = cookie_header(&console_login(&app, &op.email, &op.password).await);
    let page = http
        .get(format!("{}/admin/fleet", app.url))
        .header("cookie", &operator)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("id=\"nav-fleet\""));
    assert!(html.contains("gpu-free gpu-unhealthy"), "{html}");
    assert!(html.contains("mig-slice mig-start-4 mig-size-4"), "{html}");

    // Another site cannot make the operator's browser drain a node.
    let resp = http
        .post(format!("{}/admin/fleet/{node}/drain", app.url))
        .header("cookie", &operator)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = http
        .post(format!("{}/admin/fleet/{node}/drain", app.url))
        .header("cookie", &operator)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(resp.headers()), "/admin/fleet");
    let (state,): (String,) = sqlx::query_as("SELECT state FROM nodes WHERE hostname = 'gpu-01'")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(state, "draining");

    // A retired node: the page says why nothing happened.
    sqlx::query("UPDATE nodes SET admin_state = 'retired' WHERE hostname = 'gpu-01'")
        .execute(app.store().pool())
        .await
        .unwrap();
    let resp = http
        .post(format!("{}/admin/fleet/{node}/uncordon", app.url))
        .header("cookie", &operator)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let html = resp.text().await.unwrap();
    assert!(html.contains("id=\"alert\""), "{html}");
    assert!(html.contains("is retired"), "{html}");
}

// ---- pods ----

/// The image the new-pod form offers first (as the server decides it).
fn demo_image() -> String {
    std::env::var("KILN_DEMO_IMAGE")
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "kiln/demo-model:1".to_owned())
}

/// Wait until the element `css` reads `want` (the page changing by itself, no reload).
async fn wait_for_text(b: &Browser, css: &str, want: &str) {
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + kiln_tests::STEP;
    loop {
        if let Ok(el) = b.client.find(fantoccini_css(css)).await
            && let Ok(text) = el.text().await
        {
            if text.trim() == want {
                return;
            }
            last = text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`{css}` still reads `{last}`, not `{want}`"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Wait until the logs panel holds a line reading `text`; returns that line element.
async fn wait_for_log_line(b: &Browser, text: &str) -> kiln_tests::fantoccini::elements::Element {
    let deadline = tokio::time::Instant::now() + kiln_tests::STEP;
    loop {
        for line in b
            .client
            .find_all(fantoccini_css("#pod-logs .log-line"))
            .await
            .unwrap_or_default()
        {
            let Ok(t) = line.find(fantoccini_css(".log-text")).await else {
                continue;
            };
            if t.text().await.unwrap_or_default() == text {
                return line;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line `{text}` appeared: {}",
            b.client
                .find(fantoccini_css("#pod-logs"))
                .await
                .expect("the logs panel")
                .text()
                .await
                .unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Lines in the log store, as the fleet service leaves an agent's `PushLogs`.
async fn push_log_lines(app: &TestApp, pod: &str, lines: &[(kiln_logs::Source, &str)]) {
    let store =
        kiln_logs::LogStore::connect(&kiln_testkit::redis_url(), &app.config().redis_namespace)
            .await
            .expect("the log store");
    let pod: kiln_domain::PodId = pod.parse().expect("a pod id");
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let new: Vec<kiln_logs::NewLine<'_>> = lines
        .iter()
        .map(|(source, text)| kiln_logs::NewLine {
            source: *source,
            text,
            at_unix_ms: now,
        })
        .collect();
    store.append(pod.as_uuid(), &new).await.expect("append");
}

/// A newcomer signs up, opens Pods, gets a field error for a bad image, launches the demo image
/// with a secret, and watches the page follow the pod without reloading: placed by the
/// scheduler, running with its port, its output streaming in (stderr set apart), deleted.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_newcomer_launches_a_pod_and_watches_it_live(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let driver = Chromedriver::start().await;
    let b = Browser::open(&driver, "pods").await;
    let email = "lin@example.com";
    let password = "first-light-of-day";
    let secret = "hf_do-not-echo-4242";

    b.goto(&format!("{}/signup", app.url)).await;
    b.fill("#name", "Lin").await;
    b.fill("#email", email).await;
    b.fill("#password", password).await;
    b.click("#create-account").await;
    b.wait_for("#login-form").await;
    b.fill("#email", email).await;
    b.fill("#password", password).await;
    b.click("#sign-in").await;
    b.wait_for("#org-list").await;
    let org = b
        .wait_for("#org-switcher option[data-personal]")
        .await
        .attr("value")
        .await
        .expect("attr")
        .expect("the personal org");
    b.goto(&format!("{}/orgs/{org}", app.url)).await;

    // Pods: none yet, and the form has the demo image filled in.
    b.click("#tab-pods").await;
    b.wait_for_path(&format!("/orgs/{org}/pods")).await;
    assert!(b.text("#no-pods").await.contains("No pods yet"));
    assert_eq!(b.value("#pod-image").await, demo_image());
    let gpu_types = b.text("#pod-gpu-type").await;
    assert!(gpu_types.contains("h100-80gb"), "GPU types: {gpu_types}");
    b.screenshot("pods-empty").await;

    // A bad image: the message is beside the field, the rest of the input kept, the secret not.
    b.fill("#pod-name", "demo").await;
    b.fill("#pod-image", "UPPER CASE").await;
    b.fill("#pod-env-secret", &format!("HF_TOKEN={secret}"))
        .await;
    b.click("#create-pod").await;
    let error = b.text("#pod-image-error").await;
    assert!(
        error.starts_with("Image must be an image reference"),
        "image error: {error}"
    );
    assert_eq!(b.value("#pod-name").await, "demo", "the name is kept");
    assert_eq!(b.value("#pod-image").await, "UPPER CASE");
    assert_eq!(
        b.value("#pod-env-secret").await,
        "HF_TOKEN=",
        "the secret's name is kept, never its value"
    );
    assert!(!b.client.source().await.expect("html").contains(secret));
    b.screenshot("pod-bad-image").await;

    // Launch it: one whole H100, port 8000, a plain and a secret variable.
    b.fill("#pod-image", &demo_image()).await;
    b.wait_for("#pod-gpu-type")
        .await
        .select_by_value("h100-80gb")
        .await
        .expect("pick the GPU type");
    b.fill("#pod-gpu-count", "1").await;
    b.fill("#pod-ports", "8000").await;
    b.fill("#pod-env", "MODEL=tiny").await;
    b.fill("#pod-env-secret", &format!("HF_TOKEN={secret}"))
        .await;
    b.wait_for("#pod-restart")
        .await
        .select_by_value("always")
        .await
        .expect("pick a restart policy");
    b.click("#create-pod").await;
    let notice = b.text("#notice").await;
    assert!(notice.contains("Created the pod demo"), "notice: {notice}");
    assert_eq!(b.text("#pod-state").await, "pending");
    let pod = b.text("#pod-id").await;
    assert!(pod.starts_with("pod_"), "pod id: {pod}");
    assert_eq!(b.text("#pod-restart-policy").await, "always");
    assert_eq!(
        b.text("#pod-env tr[data-key='MODEL'] td:last-child").await,
        "tiny"
    );
    assert_eq!(
        b.text("#pod-env tr[data-key='HF_TOKEN'] td:last-child")
            .await,
        "•••• (secret)"
    );
    assert!(
        !b.client.source().await.expect("html").contains(secret),
        "the secret value is nowhere in the page"
    );
    // The live stream is connected.
    wait_for_text(&b, "#live-status", "● live").await;
    b.screenshot("pod-pending").await;

    // Anything below happens without a reload: this mark would be gone after one.
    b.client
        .execute("window.kilnNoReload = true; return true;", vec![])
        .await
        .expect("mark the page");

    // A node joins and the scheduler places the pod: the badge and the node change live.
    let node = kiln_testkit::fleet::registered_node(app.store(), "gpu-node-1", 2, false).await;
    kiln_scheduler::Placer::new(app.store().clone())
        .pass()
        .await
        .expect("a scheduling pass");
    wait_for_text(&b, "#pod-state", "scheduled").await;
    assert_eq!(b.text("#pod-node").await, node.to_string());
    let gpus = b.text("#pod-gpus").await;
    assert!(gpus.starts_with("GPU-gpu-node-1-"), "GPUs held: {gpus}");
    assert_eq!(b.text("#pod-ports").await, "8000 (not bound yet)");
    b.screenshot("pod-scheduled").await;

    // The node's agent reports it running with port 8000 bound: the address appears as a link.
    let assignment = app
        .store()
        .assignment_list(node)
        .await
        .expect("assignments")
        .pop()
        .expect("the pod's assignment");
    app.store()
        .observed_report(
            node,
            u64::try_from(assignment.revision).unwrap_or_default(),
            &[kiln_store::ObservedRecord {
                assignment_id: assignment.id,
                generation: assignment.generation,
                state: "running",
                reason: "container started".into(),
                exit_code: None,
                ports: json!([{"port": 8000, "protocol": "tcp", "host_port": 31000}]),
                observed_at: time::OffsetDateTime::now_utc(),
                runtime_ms: 0,
            }],
            false,
        )
        .await
        .expect("report");
    wait_for_text(&b, "#pod-state", "running").await;
    assert_eq!(b.text("#pod-reason").await, "container started");
    let link = b.wait_for("#pod-ports a").await;
    assert_eq!(link.text().await.expect("text"), "gpu-node-1:31000");
    assert_eq!(
        link.attr("href").await.expect("href").as_deref(),
        Some("http://gpu-node-1:31000/")
    );
    b.screenshot("pod-running").await;

    // Its output streams into the logs panel; stderr is set apart.
    push_log_lines(
        &app,
        &pod,
        &[
            (kiln_logs::Source::Stdout, "loading the tiny model"),
            (
                kiln_logs::Source::Stderr,
                "warning: no GPU kernels, using CPU",
            ),
        ],
    )
    .await;
    let out = wait_for_log_line(&b, "loading the tiny model").await;
    let err = wait_for_log_line(&b, "warning: no GPU kernels, using CPU").await;
    assert_eq!(
        err.attr("data-source").await.expect("attr").as_deref(),
        Some("stderr")
    );
    let out_colour = out
        .find(fantoccini_css(".log-text"))
        .await
        .expect("text")
        .css_value("color")
        .await
        .expect("colour");
    let err_colour = err
        .find(fantoccini_css(".log-text"))
        .await
        .expect("text")
        .css_value("color")
        .await
        .expect("colour");
    assert_ne!(out_colour, err_colour, "stderr looks different");
    push_log_lines(
        &app,
        &pod,
        &[(kiln_logs::Source::Stdout, "serving on :8000")],
    )
    .await;
    wait_for_log_line(&b, "serving on :8000").await;
    b.client
        .execute(
            "document.querySelector('.logs-card').scrollIntoView(); return true;",
            vec![],
        )
        .await
        .expect("scroll to the logs");
    b.screenshot("pod-logs").await;
    let still_here = b
        .client
        .execute("return window.kilnNoReload === true;", vec![])
        .await
        .expect("read the mark");
    assert_eq!(still_here, json!(true), "the page never reloaded");

    // Delete it: terminated, and the Delete button is gone.
    b.client
        .execute("window.scrollTo(0, 0); return true;", vec![])
        .await
        .expect("scroll to the top");
    b.click("#delete-pod").await;
    b.accept_dialog().await;
    let notice = b.text("#notice").await;
    assert!(notice.contains("Deleted the pod demo"), "notice: {notice}");
    wait_for_text(&b, "#pod-state", "terminated").await;
    assert!(
        b.client.find(fantoccini_css("#delete-pod")).await.is_err(),
        "no Delete button on a terminated pod"
    );
    // The last lines are still shown, and the panel says the pod has ended.
    wait_for_log_line(&b, "serving on :8000").await;
    wait_for_text(
        &b,
        "#logs-status",
        "The pod has ended; these are its last lines.",
    )
    .await;
    b.client
        .execute("window.scrollTo(0, 0); return true;", vec![])
        .await
        .expect("scroll to the top");
    b.screenshot("pod-deleted").await;

    // The list shows it terminated, with its GPU.
    b.click("#back-to-pods").await;
    let row = format!("#pods tr[data-pod='{pod}']");
    assert_eq!(b.text(&format!("{row} .pod-state")).await, "terminated");
    assert!(b.text(&row).await.contains("1 × h100-80gb"));
    b.screenshot("pods-list").await;

    b.close().await;
    drop(driver);
    app.stop().await;
}

/// Without a browser: another org's pod is the console's not-found page (the page, its
/// streams and its delete), a cross-site form cannot launch a pod, and viewers get no form.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn pod_pages_are_for_the_pods_org_only(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let grace = app.user("grace").await;
    let http = no_redirects();
    let (status, theirs) = app
        .post(
            &format!("/v1/orgs/{}/pods", grace.org_id),
            &grace.access_token,
            json!({"name": "private", "image": "kiln/demo-model:1"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{theirs}");
    let theirs = theirs["id"].as_str().expect("an id").to_owned();
    let cookies = cookie_header(&console_login(&app, &ada.email, &ada.password).await);

    for path in [
        format!("/orgs/{}/pods/{theirs}", grace.org_id),
        format!("/orgs/{}/pods/{theirs}", ada.org_id),
        format!("/orgs/{}/pods/{theirs}/events", ada.org_id),
        format!("/orgs/{}/pods/{theirs}/logs", grace.org_id),
        format!("/orgs/{}/pods", grace.org_id),
        format!("/orgs/{}/pods/pod_not-an-id", ada.org_id),
    ] {
        let resp = http
            .get(format!("{}{path}", app.url))
            .header("cookie", &cookies)
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        let body = resp.text().await.expect("body");
        assert!(
            body.contains("Not found") && !body.contains("private"),
            "{path}: {body}"
        );
    }
    let resp = http
        .post(format!(
            "{}/orgs/{}/pods/{theirs}/delete",
            app.url, grace.org_id
        ))
        .header("cookie", &cookies)
        .send()
        .await
        .expect("POST delete");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let (_, pod) = app
        .get(
            &format!("/v1/orgs/{}/pods/{theirs}", grace.org_id),
            &grace.access_token,
        )
        .await;
    assert_eq!(pod["state"], "pending", "still there: {pod}");

    // Signed out, the streams send you to sign in like any page.
    let resp = http
        .get(format!(
            "{}/orgs/{}/pods/{theirs}/events",
            app.url, grace.org_id
        ))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);

    // Another site cannot launch a pod with Ada's cookies.
    let form = [("name", "phished"), ("image", "kiln/demo-model:1")];
    let resp = http
        .post(format!("{}/orgs/{}/pods", app.url, ada.org_id))
        .header("cookie", &cookies)
        .header("origin", "http://evil.example")
        .form(&form)
        .send()
        .await
        .expect("POST pods");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let (_, list) = app
        .get(&format!("/v1/orgs/{}/pods", ada.org_id), &ada.access_token)
        .await;
    assert_eq!(list["items"], json!([]), "no pod was made: {list}");

    // Grace's own view of it streams over her session: the stream says what it is.
    let own = cookie_header(&console_login(&app, &grace.email, &grace.password).await);
    let resp = http
        .get(format!(
            "{}/orgs/{}/pods/{theirs}/events",
            app.url, grace.org_id
        ))
        .header("cookie", &own)
        .send()
        .await
        .expect("GET events");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    let mut resp = resp;
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), resp.chunk())
        .await
        .expect("an event within 10 s")
        .expect("a chunk")
        .expect("not the end");
    // Leave, or the server's graceful stop would wait for the open stream.
    drop(resp);
    let first = String::from_utf8_lossy(&first);
    assert!(
        first.contains("event: pod") && first.contains("\"state\":\"pending\""),
        "{first}"
    );

    // A viewer sees the pods but no form; posting anyway is refused by the ops.
    app.add_member(&grace, &grace.org_id, &ada, "viewer").await;
    let page = http
        .get(format!("{}/orgs/{}/pods", app.url, grace.org_id))
        .header("cookie", &cookies)
        .send()
        .await
        .expect("GET pods");
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.expect("body");
    assert!(html.contains("private") && !html.contains("new-pod-form"));
    let resp = http
        .post(format!("{}/orgs/{}/pods", app.url, grace.org_id))
        .header("cookie", &cookies)
        .form(&form)
        .send()
        .await
        .expect("POST pods");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    app.stop().await;
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn endpoint_pages_show_the_url_a_curl_example_and_charts_to_the_org_only(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let ada = app.user("ada").await;
    let grace = app.user("grace").await;
    let (status, ep) = app
        .post(
            &format!("/v1/orgs/{}/endpoints", ada.org_id),
            &ada.access_token,
            json!({"name": "llm", "image": "kiln/demo-model:1", "port": 8000, "min_replicas": 0,
                   "max_replicas": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ep}");
    let id = ep["id"].as_str().expect("an id").to_owned();
    let url = ep["url"].as_str().expect("a url").to_owned();
    let http = no_redirects();
    let get = |path: String, cookies: String| {
        let http = http.clone();
        let base = app.url.clone();
        async move {
            let r = http
                .get(format!("{base}{path}"))
                .header("cookie", cookies)
                .send()
                .await
                .expect("GET");
            (r.status(), r.text().await.expect("body"))
        }
    };
    let cookies = cookie_header(&console_login(&app, &ada.email, &ada.password).await);
    let (status, list) = get(format!("/orgs/{}/endpoints", ada.org_id), cookies.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        list.contains(&format!("/orgs/{}/endpoints/{id}", ada.org_id)),
        "{list}"
    );
    assert!(list.contains("0 running / 0 of 0..2"), "{list}");
    let (status, page) = get(
        format!("/orgs/{}/endpoints/{id}", ada.org_id),
        cookies.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&url), "the URL: {page}");
    assert!(
        page.contains("Authorization: Bearer $KILN_API_KEY")
            && page.contains(&format!("{url}/v1/completions"))
            && page.contains("data-copy=\"endpoint-curl\""),
        "a curl example to copy: {page}"
    );
    for chart in ["chart-requests", "chart-latency", "chart-errors"] {
        assert!(page.contains(&format!("id=\"{chart}\"")), "{chart}: {page}");
    }
    assert!(page.contains("<svg class=\"chart\""));
    assert!(page.contains("scaled to zero"), "no replicas yet: {page}");
    assert!(
        page.contains("per key 50/s (burst 100), 32 in flight"),
        "{page}"
    );

    let theirs = cookie_header(&console_login(&app, &grace.email, &grace.password).await);
    for path in [
        format!("/orgs/{}/endpoints/{id}", ada.org_id),
        format!("/orgs/{}/endpoints/{id}", grace.org_id),
        format!("/orgs/{}/endpoints/ep_not-an-id", grace.org_id),
    ] {
        let (status, body) = get(path.clone(), theirs.clone()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(!body.contains(&url), "{path}: {body}");
    }
}

/// Ada shares her endpoint from its page: a bad price is explained, a good one shown; she
/// grants Grace's org by its id, Grace finds it under "Shared with this org" with its price,
/// and after Ada revokes the grant it is gone from Grace's list.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_owner_prices_and_shares_an_endpoint_from_the_console(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (ada, grace) = (app.user("ada").await, app.user("grace").await);
    let (status, ep) = app
        .post(
            &format!("/v1/orgs/{}/endpoints", ada.org_id),
            &ada.access_token,
            json!({"name": "llm", "image": "kiln/demo-model:1", "port": 8000, "min_replicas": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ep}");
    let id = ep["id"].as_str().expect("an id").to_owned();
    let driver = Chromedriver::start().await;
    let b = Browser::open(&driver, "endpoint-sharing").await;
    b.goto(&format!("{}/login", app.url)).await;
    b.fill("#email", &ada.email).await;
    b.fill("#password", &ada.password).await;
    b.click("#sign-in").await;
    b.wait_for("#org-list").await;
    b.goto(&format!("{}/orgs/{}/endpoints/{id}", app.url, ada.org_id))
        .await;
    assert!(b.text("#endpoint-price").await.starts_with("free"));
    assert!(b.text("#no-grants").await.contains("Not granted"));

    b.fill("#price-request", "-3").await;
    b.click("#price-submit").await;
    wait_for_text(
        &b,
        "#alert",
        "Per call: must be between 0 and 1000000000 micro-units.",
    )
    .await;
    b.fill("#price-request", "2500").await;
    b.fill("#price-completion", "900").await;
    b.click("#price-submit").await;
    wait_for_notice(&b, "is now 2500 µ$ per call").await;
    assert_eq!(
        b.text("#endpoint-price").await,
        "2500 µ$ per call, 0 µ$ per 1k prompt and 900 µ$ per 1k completion tokens"
    );

    b.fill("#grant-org", &grace.org_id).await;
    b.click("#grant-submit").await;
    wait_for_notice(&b, "its API keys may call this endpoint now").await;
    assert!(b.text("#grants").await.contains(&grace.org_id));
    b.screenshot("endpoint-shared").await;

    // Grace's side, over plain HTTP with her own session.
    let http = no_redirects();
    let theirs = cookie_header(&console_login(&app, &grace.email, &grace.password).await);
    let list = || {
        let (http, theirs) = (http.clone(), theirs.clone());
        let url = format!("{}/orgs/{}/endpoints", app.url, grace.org_id);
        async move {
            http.get(url)
                .header("cookie", theirs)
                .send()
                .await
                .expect("GET")
                .text()
                .await
                .expect("body")
        }
    };
    let page = list().await;
    assert!(page.contains("Shared with this org"), "{page}");
    assert!(page.contains(&format!("data-endpoint=\"{id}\"")), "{page}");
    assert!(page.contains("2500 µ$ per call"), "{page}");

    b.click(&format!("tr[data-grantee=\"{}\"] button", grace.org_id))
        .await;
    b.accept_dialog().await;
    wait_for_notice(&b, "can no longer call this endpoint").await;
    assert!(b.text("#no-grants").await.contains("Not granted"));
    let page = list().await;
    assert!(!page.contains("Shared with this org"), "{page}");
    b.close().await;
}

// ---- instances ----

/// Wait until the flash message reads `want` (the page after a form post has loaded; the one
/// before it may still show the previous action's message).
async fn wait_for_notice(b: &Browser, want: &str) {
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + kiln_tests::STEP;
    loop {
        if let Ok(el) = b.client.find(fantoccini_css("#notice")).await
            && let Ok(text) = el.text().await
        {
            if text.contains(want) {
                return;
            }
            last = text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the notice still reads `{last}`, not `{want}`"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Ada opens Instances, is told which SSH key line is wrong, creates an instance from the
/// catalog image with two whole GPUs, sees it placed with the SSH command to copy once its
/// node forwards the port and its serial console, reboots, stops, starts and terminates it.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_person_creates_an_instance_and_gets_its_ssh_command(pool: PgPool) {
    use kiln_testkit::instances::{SSH_KEY, catalog_image, report_running};
    let app = TestApp::spawn(pool).await;
    catalog_image(app.store(), "kiln-tiny").await;
    let ada = app.user("ada").await;
    let driver = Chromedriver::start().await;
    let b = Browser::open(&driver, "instances").await;

    b.goto(&format!("{}/login", app.url)).await;
    b.fill("#email", &ada.email).await;
    b.fill("#password", &ada.password).await;
    b.click("#sign-in").await;
    b.wait_for("#org-list").await;
    let org = ada.org_id.clone();
    b.goto(&format!("{}/orgs/{org}", app.url)).await;

    // Instances: none yet; the form offers the catalog's image and the GPU types.
    b.click("#tab-instances").await;
    b.wait_for_path(&format!("/orgs/{org}/instances")).await;
    assert!(b.text("#no-instances").await.contains("No instances yet"));
    assert_eq!(b.value("#instance-image").await, "kiln-tiny");
    let gpu_types = b.text("#instance-gpu-type").await;
    assert!(gpu_types.contains("h100-80gb"), "GPU types: {gpu_types}");
    b.screenshot("instances-empty").await;

    // A key that is not a public key: the message names its line, the input is kept.
    b.fill("#instance-name", "trainer").await;
    b.wait_for("#instance-gpu-type")
        .await
        .select_by_value("h100-80gb")
        .await
        .expect("pick the GPU type");
    b.fill("#instance-gpu-count", "2").await;
    b.fill(
        "#instance-ssh-keys",
        &format!("{SSH_KEY}\nssh-ed25519 not-a-key"),
    )
    .await;
    b.click("#create-instance").await;
    let error = b.text("#instance-ssh-keys-error").await;
    assert!(
        error.starts_with("The SSH key on line 2 is not an OpenSSH public key"),
        "key error: {error}"
    );
    assert_eq!(
        b.value("#instance-name").await,
        "trainer",
        "the name is kept"
    );
    assert_eq!(b.value("#instance-gpu-count").await, "2");
    b.screenshot("instance-bad-key").await;

    // Create it.
    b.fill("#instance-ssh-keys", SSH_KEY).await;
    b.click("#create-instance").await;
    wait_for_notice(&b, "Created the instance trainer").await;
    assert_eq!(b.text("#instance-state").await, "pending");
    let id = b.text("#instance-id").await;
    assert!(id.starts_with("ins_"), "instance id: {id}");
    assert_eq!(b.text("#instance-gpu").await, "2 × h100-80gb");
    assert!(
        b.text("#instance-ssh-pending")
            .await
            .starts_with("Not reachable yet"),
    );
    assert!(b.text("#console-empty").await.contains("No console output"));
    b.screenshot("instance-pending").await;

    // Placed on a node whose agent reports the VM up with port 22 forwarded, and booting.
    let node = kiln_testkit::fleet::registered_node(app.store(), "gpu-a", 4, false).await;
    kiln_scheduler::Placer::new(app.store().clone())
        .pass()
        .await
        .expect("a scheduling pass");
    report_running(app.store(), node, 40022).await;
    let logs =
        kiln_logs::LogStore::connect(&kiln_testkit::redis_url(), &app.config().redis_namespace)
            .await
            .expect("the log store");
    let uuid = id
        .parse::<kiln_domain::InstanceId>()
        .expect("an instance id")
        .as_uuid();
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let lines: Vec<kiln_logs::NewLine<'_>> =
        ["Booting Linux on physical CPU 0x0", "trainer login:"]
            .iter()
            .map(|text| kiln_logs::NewLine {
                source: kiln_logs::Source::Stdout,
                text,
                at_unix_ms: now,
            })
            .collect();
    logs.append(uuid, &lines).await.expect("append");
    b.click("#refresh-instance").await;
    wait_for_text(&b, "#instance-state", "running").await;
    assert_eq!(b.text("#instance-node").await, node.to_string());
    let gpus = b.text("#instance-gpus").await;
    assert!(gpus.starts_with("GPU-gpu-a-"), "GPUs held: {gpus}");
    assert_eq!(b.text("#instance-ssh").await, "ssh -p 40022 root@gpu-a");
    let console = b.text("#instance-console").await;
    assert!(
        console.contains("Booting Linux on physical CPU 0x0")
            && console.ends_with("trainer login:"),
        "console: {console}"
    );
    // The command is one click away from the clipboard.
    b.click("#copy-ssh").await;
    wait_for_text(&b, "#copy-ssh", "Copied").await;
    b.screenshot("instance-running").await;

    // Reboot, stop (the GPUs go back), start (taken again), each said in words.
    b.click("#reboot-instance").await;
    wait_for_notice(&b, "Rebooting the instance trainer").await;
    assert_eq!(b.text("#instance-power").await, "running · rebooted 1×");
    b.click("#stop-instance").await;
    wait_for_notice(&b, "Stopping the instance trainer").await;
    assert_eq!(b.text("#instance-state").await, "stopping");
    assert_eq!(b.text("#instance-gpus").await, "none");
    assert!(
        b.client
            .find(fantoccini_css("#stop-instance"))
            .await
            .is_err(),
        "no Stop button on a stopped instance"
    );
    b.screenshot("instance-stopping").await;
    b.click("#start-instance").await;
    wait_for_notice(&b, "Starting the instance trainer").await;
    assert_eq!(b.text("#instance-state").await, "starting");
    assert!(b.text("#instance-gpus").await.starts_with("GPU-gpu-a-"));

    // Terminate, after a confirmation.
    b.click("#terminate-instance").await;
    b.accept_dialog().await;
    wait_for_notice(&b, "Terminated the instance trainer").await;
    assert_eq!(b.text("#instance-state").await, "terminated");
    assert!(
        b.client
            .find(fantoccini_css("#terminate-instance"))
            .await
            .is_err(),
        "no Terminate button on a terminated instance"
    );
    b.screenshot("instance-terminated").await;

    // The list shows it terminated, with its GPUs.
    b.click("#back-to-instances").await;
    let row = format!("#instances tr[data-instance='{id}']");
    assert_eq!(
        b.text(&format!("{row} .instance-state")).await,
        "terminated"
    );
    assert_eq!(
        b.text(&format!("{row} .instance-gpu")).await,
        "2 × h100-80gb"
    );
    b.screenshot("instances-list").await;

    b.close().await;
    drop(driver);
    app.stop().await;
}

/// Without a browser: another org's instance is the not-found page (the page and its power
/// actions), and a cross-site form can neither create nor stop one.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn instance_pages_are_for_the_instances_org_only(pool: PgPool) {
    use kiln_testkit::instances::{SSH_KEY, catalog_image};
    let app = TestApp::spawn(pool).await;
    catalog_image(app.store(), "kiln-tiny").await;
    let ada = app.user("ada").await;
    let grace = app.user("grace").await;
    let (status, theirs) = app
        .post(
            &format!("/v1/orgs/{}/instances", grace.org_id),
            &grace.access_token,
            json!({"name": "private", "gpu_type": "h100-80gb", "gpu_count": 1,
                   "image": "kiln-tiny", "ssh_public_keys": [SSH_KEY]}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{theirs}");
    let theirs = theirs["id"].as_str().expect("an id").to_owned();
    let http = no_redirects();
    let cookies = cookie_header(&console_login(&app, &ada.email, &ada.password).await);

    for path in [
        format!("/orgs/{}/instances/{theirs}", grace.org_id),
        format!("/orgs/{}/instances/{theirs}", ada.org_id),
        format!("/orgs/{}/instances", grace.org_id),
        format!("/orgs/{}/instances/ins_not-an-id", ada.org_id),
    ] {
        let resp = http
            .get(format!("{}{path}", app.url))
            .header("cookie", &cookies)
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        let body = resp.text().await.expect("body");
        assert!(
            body.contains("Not found") && !body.contains("private"),
            "{path}: {body}"
        );
    }
    for action in ["stop", "reboot", "terminate"] {
        let resp = http
            .post(format!(
                "{}/orgs/{}/instances/{theirs}/{action}",
                app.url, grace.org_id
            ))
            .header("cookie", &cookies)
            .send()
            .await
            .expect("POST");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{action}");
    }
    let (_, ins) = app
        .get(
            &format!("/v1/orgs/{}/instances/{theirs}", grace.org_id),
            &grace.access_token,
        )
        .await;
    assert_eq!(ins["state"], "pending", "untouched: {ins}");
    assert_eq!(ins["power"], "running", "untouched: {ins}");

    // Another site cannot use Grace's cookies to stop her instance or create one.
    let own = cookie_header(&console_login(&app, &grace.email, &grace.password).await);
    let resp = http
        .post(format!(
            "{}/orgs/{}/instances/{theirs}/stop",
            app.url, grace.org_id
        ))
        .header("cookie", &own)
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect("POST stop");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let form = [
        ("name", "phished"),
        ("image", "kiln-tiny"),
        ("gpu_type", "h100-80gb"),
        ("gpu_count", "1"),
        ("ssh_public_keys", SSH_KEY),
    ];
    let resp = http
        .post(format!("{}/orgs/{}/instances", app.url, grace.org_id))
        .header("cookie", &own)
        .header("origin", "http://evil.example")
        .form(&form)
        .send()
        .await
        .expect("POST instances");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let (_, list) = app
        .get(
            &format!("/v1/orgs/{}/instances", grace.org_id),
            &grace.access_token,
        )
        .await;
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "nothing was made: {list}");
    assert_eq!(items[0]["power"], "running", "nothing was stopped: {list}");

    // A viewer sees the instances but no form and no power buttons; posting anyway is refused.
    app.add_member(&grace, &grace.org_id, &ada, "viewer").await;
    for path in [
        format!("/orgs/{}/instances", grace.org_id),
        format!("/orgs/{}/instances/{theirs}", grace.org_id),
    ] {
        let resp = http
            .get(format!("{}{path}", app.url))
            .header("cookie", &cookies)
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let html = resp.text().await.expect("body");
        assert!(html.contains("private"), "{path}: {html}");
        for control in ["new-instance-form", "stop-instance", "terminate-instance"] {
            assert!(!html.contains(control), "{path} has {control}: {html}");
        }
    }
    let resp = http
        .post(format!(
            "{}/orgs/{}/instances/{theirs}/stop",
            app.url, grace.org_id
        ))
        .header("cookie", &cookies)
        .send()
        .await
        .expect("POST stop");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = http
        .post(format!("{}/orgs/{}/instances", app.url, grace.org_id))
        .header("cookie", &cookies)
        .form(&form)
        .send()
        .await
        .expect("POST instances");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let (_, ins) = app
        .get(
            &format!("/v1/orgs/{}/instances/{theirs}", grace.org_id),
            &grace.access_token,
        )
        .await;
    assert_eq!(ins["power"], "running", "the viewer stopped nothing: {ins}");

    app.stop().await;
}
