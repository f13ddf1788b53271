//! Instances and the VM image catalog: operators register images (PUT is idempotent), tenants
//! see the active ones and create instances from them (202, pending) that the real placer puts
//! on whole GPUs; the SSH command appears once the node reports the forwarded port. Every bad
//! field is refused at once (weak and malformed SSH keys too) and nothing is recorded; stop,
//! start and reboot are new generations of the same assignment on the same node; other orgs
//! see nothing; Idempotency-Key replays.

use kiln_proto::node::v1 as pb;
use kiln_testkit::serde_json::{Value, json};
use kiln_testkit::{TestApp, fleet};
use prost::Message;
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

use crate::{assert_problem, error_fields};

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICkUXr7KBjyhOJbLhmZ4FG1BCioIpGK2VR4/bXi/cqXH ada@laptop";
const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBBY7hOri8DXzXUoYinmueIO/a8aRynKWHFwxsaF+fRpG9ox2W/ILHzbBi5ify+2n3OuK76lzlh82HkvuejWXlGU= t@kiln";
const RSA_2048: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCdW+RKMgkXkOtm4eUmH5hYlY7f49VVfPBqWCF4kCqjJPU1Pag21jhPXyNHCYp4oGTzVu5K7f6ep/J1t0uraN7oVaX7jQeEMLiZlDfuLklgOAct4lvNb93DhWKNn0JKdKYMmyB3bxbpkrOGX++QfKJfUtV/3HGssWEFkyS2fOWRi27gSo1juXeEb8OSy/5AK4CGSMWzrA45/A9Kd+Ln4uN/+dt2+KWinWRPTl69pdXH+6Wt1ikwv2qEzAcwgWCMEGDd98x3kiQwMb/s1lBbWkzzGdZeW2qwem5FtLus3+ycJF9jEIdtY3jsF6v4n1w4GqAR8il7LhWTlBmI2M6znkCH t@kiln";
const RSA_1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDVcotUW4r8v9g3ouQ0kJLmY16GGKRZR1dMojqMR8ZOyCqQ5ejiOq8tcSElltIRMZfkOUaLcCrGXna8817jsiX5jc33zm+FLoLFbXrdAA4Hy/WGY4tQgV7EOdXw21RxyQ3cAx1fvCnn1rq4TkJnYajwQ8o1cgP9RIkruOA1DIenbw== t@kiln";
const DSA: &str = "ssh-dss AAAAB3NzaC1kc3MAAACBALqQh98uEncOutW9p/Rs/vvWvp8HomwlpnNJfU0M6R0PFxHDe8b10nenTC7oTq5QuE8UlAdjvFw4GA37uXr7dBEZzjOSBvN2IVrVfhH+YL1oZfegWE1kG0a2KN6eIVmBaXOxCD0c55sjMPhC8VY09z0A80mueW4z8b4UeRtd/G/7AAAAFQCmnRAVabU/rVbfe9meO28CmP7kLwAAAIBvc1VZv3jt8MWPpPNq7LZxs1J4/cA8DlTb2LkACFFZ7OyTNbXr9uUGRXho2QAIPW8/sOaDEMH6VQNx9PaxOFdhHmGzL9KRJARYEWvVlvn01YhUqtTR0KHgG9SvI7tdAdbEABYBuZz7XVNk4GwF143QzvbKALYO+TtKTgEdmp8g6AAAAIBltNMraB1ZPQyvEyYBFNz+tv+H7H8Ocz4IyeJDDz0XZ8uQnNh8mkQkHJxsNxsVVEajTorYHuNuDC6EbaTtKYL31AoxURTtKtWE8LxODdfq+nkakJRGFR6Jz5uQfBpjzKn4TjpgIhQ9X0DSVYpwrzzvIWwqlN08l5jwdo8jDxy1pg== t@kiln";

fn instances(org: &str) -> String {
    format!("/v1/orgs/{org}/instances")
}

/// Register `name` (active, login user `ubuntu`, at least 10 GiB) as the operator.
async fn register_image(app: &TestApp, op: &str, name: &str) -> (StatusCode, Value) {
    app.call(
        Method::PUT,
        &format!("/v1/admin/images/{name}"),
        Some(op),
        Some(json!({
            "description": "Ubuntu 24.04 with the NVIDIA driver",
            "kernel": "vmlinuz",
            "initrd": "initramfs.cpio.gz",
            "disk": "ubuntu-24.04.qcow2",
            "kernel_args": "console=ttyS0",
            "login_user": "ubuntu",
            "min_disk_gib": 10,
        })),
    )
    .await
}

fn instance_body(name: &str) -> Value {
    json!({
        "name": name,
        "gpu_type": "h100-80gb",
        "gpu_count": 2,
        "image": "ubuntu-24.04",
        "ssh_public_keys": [ED25519],
    })
}

async fn schedule(app: &TestApp) {
    kiln_scheduler::Placer::new(app.store().clone())
        .pass()
        .await
        .unwrap();
}

/// The instance's assignment: (id, generation, what the node is told).
async fn assignment(app: &TestApp, instance: &str) -> (uuid::Uuid, i64, pb::InstanceSpec) {
    let id: kiln_domain::InstanceId = instance.parse().unwrap();
    let (asg, generation, spec): (uuid::Uuid, i64, Vec<u8>) = sqlx::query_as(
        "SELECT a.id, a.generation, a.spec FROM workloads w
         JOIN node_assignments a ON a.id = w.assignment_id WHERE w.id = $1",
    )
    .bind(id.as_uuid())
    .fetch_one(app.store().pool())
    .await
    .unwrap();
    let decoded = pb::Assignment::decode(spec.as_slice()).unwrap();
    match decoded.kind {
        Some(pb::assignment::Kind::Instance(i)) => (asg, generation, i),
        other => panic!("not an instance assignment: {other:?}"),
    }
}

async fn allocations(app: &TestApp, instance: &str) -> i64 {
    let id: kiln_domain::InstanceId = instance.parse().unwrap();
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM gpu_allocations WHERE workload_id = $1")
            .bind(id.as_uuid())
            .fetch_one(app.store().pool())
            .await
            .unwrap();
    n
}

/// What its agent reports for an instance's `generation`: running, with the guest's SSH
/// forwarded to host port 20022.
async fn report(app: &TestApp, asg: uuid::Uuid, node: kiln_domain::NodeId, generation: i64) {
    app.store()
        .observed_report(
            node,
            0,
            &[kiln_store::ObservedRecord {
                assignment_id: asg,
                generation,
                state: "running",
                reason: "booted".into(),
                exit_code: None,
                ports: json!([{"port": 22, "protocol": "tcp", "host_port": 20022}]),
                observed_at: time::OffsetDateTime::now_utc(),
                runtime_ms: 0,
            }],
            false,
        )
        .await
        .unwrap();
}

async fn power(app: &TestApp, token: &str, org: &str, id: &str, what: &str) -> (StatusCode, Value) {
    app.post(&format!("{}/{id}/{what}", instances(org)), token, json!({}))
        .await
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_instance_boots_a_catalog_image_on_whole_gpus_and_says_how_to_ssh_in(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let (status, image) = register_image(&app, &op, "ubuntu-24.04").await;
    assert_eq!(status, StatusCode::CREATED, "{image}");
    assert_eq!(image["login_user"], "ubuntu");
    assert_eq!(image["status"], "active");
    // Registering it again (what `make up` does on every run) replaces it: 200, still one.
    let (status, _) = register_image(&app, &op, "ubuntu-24.04").await;
    assert_eq!(status, StatusCode::OK);

    let ada = app.user("ada").await;
    let (status, catalog) = app.get("/v1/images", &ada.access_token).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = catalog["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ubuntu-24.04"], "{catalog}");

    let node = fleet::registered_node(app.store(), "gpu-a", 4, false).await;
    let (status, created) = app
        .post(&instances(&ada.org_id), &ada.access_token, {
            let mut b = instance_body("trainer");
            b["ssh_public_keys"] = json!([format!("  {ED25519}\n"), ECDSA, RSA_2048]);
            b
        })
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ins_"), "{created}");
    assert_eq!(created["state"], "pending");
    assert_eq!(created["power"], "running");
    assert_eq!(created["image"], "ubuntu-24.04");
    assert_eq!(created["gpu_count"], 2);
    assert_eq!(
        created["disk_gib"], 20,
        "the default disk, above the image's 10"
    );
    assert_eq!(created["ssh"], Value::Null, "no SSH before it runs");
    assert_eq!(
        created["ssh_public_keys"][0], ED25519,
        "keys are stored trimmed and re-encoded"
    );
    assert_eq!(created["ssh_public_keys"].as_array().unwrap().len(), 3);
    // The default shape: 8 cores and 64 GiB per GPU.
    assert_eq!(created["cpu"], json!(16.0));
    assert_eq!(created["memory_gib"], 128);

    schedule(&app).await;
    let (_, placed) = app
        .get(
            &format!("{}/{id}", instances(&ada.org_id)),
            &ada.access_token,
        )
        .await;
    assert_eq!(placed["node"], node.to_string(), "{placed}");
    assert_eq!(placed["gpus"].as_array().unwrap().len(), 2, "{placed}");
    assert_eq!(allocations(&app, &id).await, 2);
    // The node is told what to boot: the image copied from the catalog, the keys, power on.
    let (asg, generation, spec) = assignment(&app, &id).await;
    assert_eq!(spec.image, "ubuntu-24.04");
    let source = spec.image_source.as_ref().unwrap();
    assert_eq!(
        (source.disk.as_str(), source.login_user.as_str()),
        ("ubuntu-24.04.qcow2", "ubuntu")
    );
    assert_eq!(spec.ssh_authorized_keys.len(), 3);
    assert_eq!(spec.gpu_uuids.len(), 2);
    assert_eq!(spec.power, pb::PowerState::Running as i32);
    assert_eq!(spec.hostname, "trainer");

    // Once the node reports the guest's port 22 forwarded, the instance says how to log in.
    report(&app, asg, node, generation).await;
    let (_, running) = app
        .get(
            &format!("{}/{id}", instances(&ada.org_id)),
            &ada.access_token,
        )
        .await;
    assert_eq!(
        running["ssh"],
        json!({"host": "gpu-a", "port": 20022, "user": "ubuntu", "command": "ssh -p 20022 ubuntu@gpu-a"}),
        "{running}"
    );
    let (_, list) = app.get(&instances(&ada.org_id), &ada.access_token).await;
    assert_eq!(list["items"][0]["id"], id.as_str());

    // Another org sees nothing of it and cannot touch it.
    let eve = app.user("eve").await;
    let (status, body) = app
        .get(
            &format!("{}/{id}", instances(&ada.org_id)),
            &eve.access_token,
        )
        .await;
    assert_problem(status, &body, StatusCode::NOT_FOUND);
    let (status, body) = power(&app, &eve.access_token, &ada.org_id, &id, "stop").await;
    assert_problem(status, &body, StatusCode::NOT_FOUND);
    let (status, body) = app
        .get(
            &format!("{}/{id}", instances(&eve.org_id)),
            &eve.access_token,
        )
        .await;
    assert_problem(status, &body, StatusCode::NOT_FOUND);
    let (_, theirs) = app.get(&instances(&eve.org_id), &eve.access_token).await;
    assert_eq!(theirs["items"], json!([]));
    assert_eq!(
        allocations(&app, &id).await,
        2,
        "eve's stop changed nothing"
    );

    // The console log is readable (empty until the node ships lines).
    let console = reqwest::Client::new()
        .get(format!(
            "{}{}/{id}/console?tail=10",
            app.url,
            instances(&ada.org_id)
        ))
        .bearer_auth(&ada.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(console.status(), StatusCode::OK);
    assert!(
        console.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let (status, body) = app
        .get(
            &format!("{}/{id}/console?tail=many", instances(&ada.org_id)),
            &ada.access_token,
        )
        .await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_bad_instance_is_refused_with_every_reason_and_nothing_is_recorded(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    register_image(&app, &op, "ubuntu-24.04").await;
    register_image(&app, &op, "old-image").await;
    let (status, _) = app
        .call(
            Method::PUT,
            "/v1/admin/images/old-image",
            Some(&op),
            Some(json!({"disk": "old.qcow2", "status": "deprecated"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    fleet::registered_node(app.store(), "gpu-a", 4, false).await;
    let ada = app.user("ada").await;

    let cases: Vec<(Value, &[&str])> = vec![
        (
            json!({"name": "Bad Name!", "gpu_type": "", "gpu_count": 0, "image": "",
                   "ssh_public_keys": []}),
            &["name", "gpu_type", "gpu_count", "image", "ssh_public_keys"],
        ),
        (
            json!({"name": "a", "gpu_type": "tpu-v9", "gpu_count": 9, "image": "nope",
                   "ssh_public_keys": [ED25519]}),
            &["gpu_type", "gpu_count", "image"],
        ),
        (
            json!({"name": "a", "gpu_type": "h100-80gb", "gpu_count": 1, "image": "old-image",
                   "ssh_public_keys": [ED25519]}),
            &["image"],
        ),
        (
            json!({"name": "a", "gpu_type": "h100-80gb", "gpu_count": 1, "image": "ubuntu-24.04",
                   "disk_gib": 5, "ssh_public_keys": [ED25519]}),
            &["disk_gib"],
        ),
        (
            json!({"name": "a", "gpu_type": "h100-80gb", "gpu_count": 1, "image": "ubuntu-24.04",
                   "disk_gib": 100000, "ssh_public_keys": [ED25519]}),
            &["disk_gib"],
        ),
        (
            json!({"name": "a", "gpu_type": "h100-80gb", "gpu_count": 1, "image": "ubuntu-24.04",
                   "ssh_public_keys": [ED25519, RSA_1024, DSA, "not a key", ""]}),
            &[
                "ssh_public_keys[1]",
                "ssh_public_keys[2]",
                "ssh_public_keys[3]",
                "ssh_public_keys[4]",
            ],
        ),
        (
            json!({"name": "a", "gpu_type": "h100-80gb", "gpu_count": 1, "image": "ubuntu-24.04",
                   "ssh_public_keys": vec![ED25519; 17]}),
            &["ssh_public_keys"],
        ),
    ];
    for (body, fields) in cases {
        let (status, problem) = app
            .post(&instances(&ada.org_id), &ada.access_token, body.clone())
            .await;
        assert_problem(status, &problem, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error_fields(&problem), *fields, "{body} → {problem}");
    }

    // The reasons say what to do.
    let (_, problem) = app
        .post(&instances(&ada.org_id), &ada.access_token, {
            let mut b = instance_body("a");
            b["ssh_public_keys"] = json!([RSA_1024]);
            b
        })
        .await;
    let reason = problem["errors"][0]["message"].as_str().unwrap();
    assert!(
        reason.contains("1024 bits") && reason.contains("2048"),
        "{problem}"
    );

    // Not JSON, wrong types, unknown fields: 4xx problems, never a crash.
    for raw in [
        "{",
        r#"{"name": 5}"#,
        r#"{"name":"a","gpu_type":"h100-80gb","gpu_count":"two","image":"ubuntu-24.04","ssh_public_keys":[]}"#,
    ] {
        let resp = reqwest::Client::new()
            .post(format!("{}{}", app.url, instances(&ada.org_id)))
            .bearer_auth(&ada.access_token)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_client_error(), "{raw}: {}", resp.status());
        let problem: Value = resp.json().await.unwrap();
        assert!(problem["detail"].is_string(), "{raw}: {problem}");
    }

    let (_, list) = app.get(&instances(&ada.org_id), &ada.access_token).await;
    assert_eq!(list["items"], json!([]), "nothing recorded");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn stop_start_and_reboot_are_new_generations_on_the_same_node(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    register_image(&app, &op, "ubuntu-24.04").await;
    let node = fleet::registered_node(app.store(), "gpu-a", 2, false).await;
    let ada = app.user("ada").await;
    let (_, created) = app
        .post(
            &instances(&ada.org_id),
            &ada.access_token,
            instance_body("box"),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_owned();
    schedule(&app).await;
    let (asg, g1, first) = assignment(&app, &id).await;
    report(&app, asg, node, g1).await;

    // Stop: powered off, GPUs given back at once, still on its node; no SSH while stopped.
    let (status, stopped) = power(&app, &ada.access_token, &ada.org_id, &id, "stop").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{stopped}");
    assert_eq!(stopped["power"], "stopped");
    assert_eq!(stopped["state"], "stopping");
    assert_eq!(stopped["node"], node.to_string());
    assert_eq!(stopped["ssh"], Value::Null);
    assert_eq!(allocations(&app, &id).await, 0);
    let (same, g2, spec) = assignment(&app, &id).await;
    assert_eq!(same, asg, "the same assignment: the disk stays on the node");
    assert!(g2 > g1);
    assert_eq!(spec.power, pb::PowerState::Stopped as i32);
    assert!(spec.gpu_uuids.is_empty());
    // Stopping again changes nothing.
    let (status, _) = power(&app, &ada.access_token, &ada.org_id, &id, "stop").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(assignment(&app, &id).await.1, g2);
    // Reboot needs it powered on.
    let (status, body) = power(&app, &ada.access_token, &ada.org_id, &id, "reboot").await;
    assert_problem(status, &body, StatusCode::CONFLICT);

    // While it is stopped its GPUs are free: another tenant's pod takes both.
    let bob = app.user("bob").await;
    let (status, pod) = app
        .post(
            &format!("/v1/orgs/{}/pods", bob.org_id),
            &bob.access_token,
            json!({"name": "hog", "image": "busybox", "gpu": {"type": "h100-80gb", "count": 2}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pod}");
    schedule(&app).await;
    let (status, body) = power(&app, &ada.access_token, &ada.org_id, &id, "start").await;
    assert_problem(status, &body, StatusCode::CONFLICT);
    assert!(
        body["detail"].as_str().unwrap().contains("its node"),
        "{body}"
    );
    assert_eq!(
        assignment(&app, &id).await.1,
        g2,
        "a refused start changes nothing"
    );
    let (_, still) = app
        .get(
            &format!("{}/{id}", instances(&ada.org_id)),
            &ada.access_token,
        )
        .await;
    assert_eq!(still["power"], "stopped");

    // Once the pod is gone, start takes the same GPUs back on the same node.
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!(
                "/v1/orgs/{}/pods/{}",
                bob.org_id,
                pod["id"].as_str().unwrap()
            ),
            Some(&bob.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, started) = power(&app, &ada.access_token, &ada.org_id, &id, "start").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    assert_eq!(started["power"], "running");
    assert_eq!(started["state"], "starting");
    let (_, g3, spec) = assignment(&app, &id).await;
    assert!(g3 > g2);
    assert_eq!(spec.power, pb::PowerState::Running as i32);
    assert_eq!(spec.gpu_uuids, first.gpu_uuids, "the GPUs it had");
    assert_eq!(allocations(&app, &id).await, 2);

    // Reboot: the count goes up, the node sees a new generation.
    let (status, rebooted) = power(&app, &ada.access_token, &ada.org_id, &id, "reboot").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{rebooted}");
    assert_eq!(rebooted["reboot_count"], 1);
    let (_, g4, spec) = assignment(&app, &id).await;
    assert!(g4 > g3);
    assert_eq!(spec.reboot_count, 1);

    // Terminate: GPUs free, the image can go, and nothing more can be done with it.
    let (status, gone) = app
        .call(
            Method::DELETE,
            &format!("{}/{id}", instances(&ada.org_id)),
            Some(&ada.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{gone:?}");
    assert_eq!(gone["state"], "terminated");
    assert_eq!(allocations(&app, &id).await, 0);
    let (status, body) = power(&app, &ada.access_token, &ada.org_id, &id, "start").await;
    assert_problem(status, &body, StatusCode::CONFLICT);
    let (status, again) = app
        .call(
            Method::DELETE,
            &format!("{}/{id}", instances(&ada.org_id)),
            Some(&ada.access_token),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "deleting again is harmless: {again:?}"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn only_operators_manage_the_image_catalog(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let ada = app.user("ada").await;

    // To a tenant the admin catalog does not exist.
    for (method, path, body) in [
        (Method::GET, "/v1/admin/images", None),
        (Method::GET, "/v1/admin/images/x", None),
        (
            Method::PUT,
            "/v1/admin/images/x",
            Some(json!({"disk": "x.qcow2"})),
        ),
        (
            Method::POST,
            "/v1/admin/images",
            Some(json!({"name": "x", "disk": "x.qcow2"})),
        ),
        (Method::DELETE, "/v1/admin/images/x", None),
    ] {
        let (status, body) = app
            .call(method.clone(), path, Some(&ada.access_token), body)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body:?}");
    }
    let (status, body) = app.get("/v1/images", "not-a-token").await;
    assert_problem(status, &body, StatusCode::UNAUTHORIZED);

    // Operators: POST creates once (409 after), bad fields are named.
    let (status, created) = app
        .post(
            "/v1/admin/images",
            &op,
            json!({"name": "tiny", "kernel": "vmlinuz", "initrd": "initrd.gz", "disk": "disk.raw"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["login_user"], "root");
    let (status, body) = app
        .post(
            "/v1/admin/images",
            &op,
            json!({"name": "tiny", "disk": "disk.raw"}),
        )
        .await;
    assert_problem(status, &body, StatusCode::CONFLICT);
    let (status, body) = app
        .post(
            "/v1/admin/images",
            &op,
            json!({"name": "Not Valid", "status": "gone", "min_disk_gib": 0}),
        )
        .await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    let fields = error_fields(&body);
    for f in ["name", "status", "min_disk_gib"] {
        assert!(fields.contains(&f.to_owned()), "{f} in {body}");
    }
    let (status, body) = app
        .call(
            Method::PUT,
            "/v1/admin/images/tiny",
            Some(&op),
            Some(json!({"name": "other", "disk": "disk.raw"})),
        )
        .await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);

    // An image in use cannot be deleted; deprecated it leaves the tenant catalog and stops new
    // instances, while the instance made from it keeps what it boots.
    fleet::registered_node(app.store(), "gpu-a", 1, false).await;
    let (status, inst) = app
        .post(&instances(&ada.org_id), &ada.access_token, {
            let mut b = instance_body("vm");
            b["image"] = json!("tiny");
            b["gpu_count"] = json!(1);
            b
        })
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{inst}");
    let (status, body) = app
        .call(Method::DELETE, "/v1/admin/images/tiny", Some(&op), None)
        .await;
    assert_problem(status, &body, StatusCode::CONFLICT);
    let (status, _) = app
        .call(
            Method::PUT,
            "/v1/admin/images/tiny",
            Some(&op),
            Some(json!({"kernel": "vmlinuz-new", "disk": "disk.raw", "status": "deprecated"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, catalog) = app.get("/v1/images", &ada.access_token).await;
    assert_eq!(catalog["items"], json!([]));
    let (_, all) = app.get("/v1/admin/images", &op).await;
    assert_eq!(all["items"][0]["status"], "deprecated");
    let id = inst["id"].as_str().unwrap();
    schedule(&app).await;
    let (_, _, spec) = assignment(&app, id).await;
    assert_eq!(
        spec.image_source.unwrap().kernel,
        "vmlinuz",
        "what it was created with"
    );

    // Terminated, the image can go.
    app.call(
        Method::DELETE,
        &format!("{}/{id}", instances(&ada.org_id)),
        Some(&ada.access_token),
        None,
    )
    .await;
    let (status, body) = app
        .call(Method::DELETE, "/v1/admin/images/tiny", Some(&op), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body:?}");
    let (status, _) = app.get("/v1/admin/images/tiny", &op).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_retried_create_with_the_same_idempotency_key_makes_one_instance(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    register_image(&app, &op, "ubuntu-24.04").await;
    let ada = app.user("ada").await;
    let send = |body: Value| {
        let (url, token) = (
            format!("{}{}", app.url, instances(&ada.org_id)),
            ada.access_token.clone(),
        );
        async move {
            let resp = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .header("idempotency-key", "create-box-1")
                .json(&body)
                .send()
                .await
                .unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        }
    };
    let (s1, first) = send(instance_body("box")).await;
    let (s2, second) = send(instance_body("box")).await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(first["id"], second["id"]);
    let (s3, other) = send(instance_body("other-box")).await;
    assert_problem(s3, &other, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, list) = app.get(&instances(&ada.org_id), &ada.access_token).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}
