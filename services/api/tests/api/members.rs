use kiln_testkit::TestApp;
use kiln_testkit::serde_json::json;
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

use crate::{assert_problem, error_fields};

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn owners_add_change_and_remove_members(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let owner = app.user("olive").await;
    let bob = app.user("bob").await;
    let org = owner.org_id.clone();
    app.add_member(&owner, &org, &bob, "member").await;

    let (status, list) = app
        .get(&format!("/v1/orgs/{org}/members"), &owner.access_token)
        .await;
    assert_eq!(status, StatusCode::OK);
    let roles: Vec<(String, String)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["email"].as_str().unwrap().to_owned(),
                m["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        roles.contains(&("bob@example.com".into(), "member".into())),
        "{roles:?}"
    );

    // Bob now sees the org.
    let (status, _) = app.get(&format!("/v1/orgs/{org}"), &bob.access_token).await;
    assert_eq!(status, StatusCode::OK);

    let (status, m) = app
        .call(
            Method::PATCH,
            &format!("/v1/orgs/{org}/members/{}", bob.user_id),
            Some(&owner.access_token),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{m}");
    assert_eq!(m["role"], "admin");

    // Adding twice conflicts; unknown people and bad roles are field errors.
    let (status, body) = app
        .post(
            &format!("/v1/orgs/{org}/members"),
            &owner.access_token,
            json!({"email": bob.email, "role": "member"}),
        )
        .await;
    assert_problem(status, &body, StatusCode::CONFLICT);
    let (status, body) = app
        .post(
            &format!("/v1/orgs/{org}/members"),
            &owner.access_token,
            json!({"email": "ghost@example.com", "role": "superuser"}),
        )
        .await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_fields(&body), ["role"]);
    let (status, body) = app
        .post(
            &format!("/v1/orgs/{org}/members"),
            &owner.access_token,
            json!({"email": "ghost@example.com", "role": "member"}),
        )
        .await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_fields(&body), ["email"]);

    // Removal takes effect at once.
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/orgs/{org}/members/{}", bob.user_id),
            Some(&owner.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = app.get(&format!("/v1/orgs/{org}"), &bob.access_token).await;
    assert_problem(status, &body, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_org_always_keeps_an_owner(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let owner = app.user("olive").await;
    let org = owner.org_id.clone();
    let me = format!("/v1/orgs/{org}/members/{}", owner.user_id);
    let (status, body) = app
        .call(
            Method::PATCH,
            &me,
            Some(&owner.access_token),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_problem(status, &body, StatusCode::CONFLICT);
    let (status, body) = app
        .call(Method::DELETE, &me, Some(&owner.access_token), None)
        .await;
    assert_problem(status, &body, StatusCode::CONFLICT);
    assert!(body["detail"].as_str().unwrap().contains("owner"));

    // With a second owner, one may step down.
    let peer = app.user("peer").await;
    app.add_member(&owner, &org, &peer, "owner").await;
    let (status, _) = app
        .call(
            Method::PATCH,
            &me,
            Some(&owner.access_token),
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn two_owners_demoting_each_other_at_once_leave_one_owner(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let a = app.user("anna").await;
    let b = app.user("bert").await;
    let org = a.org_id.clone();
    app.add_member(&a, &org, &b, "owner").await;
    for _ in 0..5 {
        let pa = format!("/v1/orgs/{org}/members/{}", b.user_id);
        let pb = format!("/v1/orgs/{org}/members/{}", a.user_id);
        let (ra, rb) = tokio::join!(
            app.call(
                Method::PATCH,
                &pa,
                Some(&a.access_token),
                Some(json!({"role": "member"}))
            ),
            app.call(
                Method::PATCH,
                &pb,
                Some(&b.access_token),
                Some(json!({"role": "member"}))
            ),
        );
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM memberships WHERE org_id = $1 AND role = 'owner'")
                .bind(
                    org.trim_start_matches("org_")
                        .parse::<uuid::Uuid>()
                        .unwrap(),
                )
                .fetch_one(app.store().pool())
                .await
                .unwrap();
        assert!(n >= 1, "org lost its last owner: {ra:?} {rb:?}");
        let oks = [ra.0, rb.0]
            .iter()
            .filter(|s| **s == StatusCode::OK)
            .count();
        assert!(oks <= 1, "both demotions succeeded");
        if n == 1 {
            break;
        }
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn roles_limit_who_may_grant_what(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let owner = app.user("olive").await;
    let admin = app.user("adam").await;
    let viewer = app.user("vera").await;
    let carl = app.user("carl").await;
    let org = owner.org_id.clone();
    app.add_member(&owner, &org, &admin, "admin").await;
    app.add_member(&owner, &org, &viewer, "viewer").await;

    // Admins manage members but cannot make, change or remove owners.
    let (status, body) = app
        .post(
            &format!("/v1/orgs/{org}/members"),
            &admin.access_token,
            json!({"email": carl.email, "role": "owner"}),
        )
        .await;
    assert_problem(status, &body, StatusCode::FORBIDDEN);
    let (status, body) = app
        .call(
            Method::DELETE,
            &format!("/v1/orgs/{org}/members/{}", owner.user_id),
            Some(&admin.access_token),
            None,
        )
        .await;
    assert_problem(status, &body, StatusCode::FORBIDDEN);
    let (status, _) = app
        .post(
            &format!("/v1/orgs/{org}/members"),
            &admin.access_token,
            json!({"email": carl.email, "role": "member"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    // Viewers read but cannot write.
    let (status, _) = app
        .get(&format!("/v1/orgs/{org}/members"), &viewer.access_token)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app
        .call(
            Method::PATCH,
            &format!("/v1/orgs/{org}/members/{}", carl.user_id),
            Some(&viewer.access_token),
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_problem(status, &body, StatusCode::FORBIDDEN);

    // Anyone may leave.
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/orgs/{org}/members/{}", viewer.user_id),
            Some(&viewer.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn me_shows_membership_changes_at_once(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let owner = app.user("olive").await;
    let bob = app.user("bob").await;
    let org = owner.org_id.clone();
    let orgs_of = |me: &kiln_testkit::serde_json::Value| -> Vec<(String, String)> {
        me["memberships"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["org_id"].as_str().unwrap().to_owned(),
                    m["role"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    // Warm whatever /v1/me keeps, then change bob's memberships and look again straight away.
    let (_, me) = app.get("/v1/me", &bob.access_token).await;
    assert_eq!(orgs_of(&me).len(), 1);
    app.add_member(&owner, &org, &bob, "viewer").await;
    let (_, me) = app.get("/v1/me", &bob.access_token).await;
    assert!(
        orgs_of(&me).contains(&(org.clone(), "viewer".into())),
        "{me}"
    );
    app.call(
        Method::PATCH,
        &format!("/v1/orgs/{org}/members/{}", bob.user_id),
        Some(&owner.access_token),
        Some(json!({"role": "admin"})),
    )
    .await;
    let (_, me) = app.get("/v1/me", &bob.access_token).await;
    assert!(
        orgs_of(&me).contains(&(org.clone(), "admin".into())),
        "{me}"
    );
    app.call(
        Method::DELETE,
        &format!("/v1/orgs/{org}/members/{}", bob.user_id),
        Some(&owner.access_token),
        None,
    )
    .await;
    let (_, me) = app.get("/v1/me", &bob.access_token).await;
    assert!(!orgs_of(&me).iter().any(|(o, _)| *o == org), "{me}");
    let (_, created) = app
        .post(
            "/v1/orgs",
            &bob.access_token,
            json!({"name": "Bob's new org"}),
        )
        .await;
    let (_, me) = app.get("/v1/me", &bob.access_token).await;
    assert!(
        orgs_of(&me).contains(&(created["id"].as_str().unwrap().to_owned(), "owner".into())),
        "{me}"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn concurrent_writes_do_not_starve_a_small_pool(pool: PgPool) {
    // Each write holds one connection for its transaction; if it needed a second one (to
    // authorise, say) a burst larger than the pool would wait on itself until timeouts.
    let app = TestApp::spawn_with(pool, |c| c.db_max_connections = 2).await;
    let owner = app.user("olive").await;
    let mut people = vec![];
    for i in 0..6 {
        people.push(app.user(&format!("p{i}")).await);
    }
    let org = owner.org_id.clone();
    let started = std::time::Instant::now();
    let path = format!("/v1/orgs/{org}/members");
    let adds = people.iter().map(|p| {
        app.post(
            &path,
            &owner.access_token,
            json!({"email": p.email, "role": "member"}),
        )
    });
    for (status, body) in futures::future::join_all(adds).await {
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "writes queued behind each other for {:?}",
        started.elapsed()
    );
}
