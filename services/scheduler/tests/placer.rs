//! The placer over a real database: pending work is placed and its node's agent told; work
//! that cannot be placed says why and is placed when capacity frees, highest priority first;
//! two replicas racing never double-book; lost and drained nodes hand work back by kind.

use std::time::Duration;

use kiln_domain::{AdminState, LivenessPolicy, NodeId, Permission, WorkloadId};
use kiln_proto::node::v1 as pb;
use kiln_scheduler::{LifecycleController, Placer};
use kiln_store::{NewWorkload, OrgScope, Store, WorkloadRecord};
use kiln_testkit::fleet;
use prost::Message;
use sqlx::PgPool;

async fn node(store: &Store, hostname: &str, gpus: u32, mig: bool) -> NodeId {
    fleet::registered_node(store, hostname, gpus, mig).await
}

async fn org(store: &Store, who: &str) -> OrgScope {
    fleet::org_scope(store, who, Permission::WorkloadWrite).await
}

fn pod<'a>(gpu_mode: &'a str, count: i32) -> NewWorkload<'a> {
    NewWorkload {
        kind: "pod",
        name: "p",
        tier: "on_demand",
        priority: 0,
        gpu_mode,
        gpu_type: (gpu_mode != "none").then_some("h100-80gb"),
        gpu_count: if matches!(gpu_mode, "whole" | "passthrough") {
            count
        } else {
            0
        },
        mig_profile: None,
        share_memory_mib: None,
        cpu_millis: 1000,
        memory_mib: 4096,
        disk_gib: 10,
        spec: serde_json::json!({"image": "kiln/demo:1", "env": {"A": "1"}, "ports": [8000]}),
    }
}

async fn create(store: &Store, scope: &OrgScope, new: NewWorkload<'_>) -> WorkloadRecord {
    let mut tx = store.begin().await.unwrap();
    let w = store.workload_create(&mut tx, scope, &new).await.unwrap();
    tx.commit().await.unwrap();
    w
}

async fn get(store: &Store, w: &WorkloadRecord) -> WorkloadRecord {
    store
        .workload_get_any(WorkloadId::from_uuid(w.id))
        .await
        .unwrap()
}

async fn release(store: &Store, w: &WorkloadRecord, state: &str) {
    let mut tx = store.begin().await.unwrap();
    store
        .workload_release(&mut tx, WorkloadId::from_uuid(w.id), state, "test")
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn allocations(store: &Store) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM gpu_allocations")
        .fetch_one(store.pool())
        .await
        .unwrap();
    n
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn pending_work_is_placed_and_its_agent_is_told(pool: PgPool) {
    let store = Store::new(pool);
    let n = node(&store, "gpu-a", 8, false).await;
    let scope = org(&store, "alice").await;
    let w = create(&store, &scope, pod("whole", 2)).await;
    assert_eq!(
        (w.state.as_str(), w.state_reason.as_str()),
        ("pending", "waiting for the scheduler")
    );

    let out = Placer::new(store.clone()).pass().await.unwrap();
    assert_eq!((out.claimed, out.placed), (1, 1));
    let w = get(&store, &w).await;
    assert_eq!(w.state, "scheduled");
    assert_eq!(w.node_id, Some(n.as_uuid()));
    assert_eq!(allocations(&store).await, 2);
    let record = store.node_get(n).await.unwrap();
    assert_eq!(record.assignment_revision, 1);

    // The agent's view: a pod with the image, env, port and exactly the two GPUs held.
    let assignments = store.assignment_list(n).await.unwrap();
    assert_eq!(assignments.len(), 1);
    assert_eq!(Some(assignments[0].id), w.assignment_id);
    let spec = pb::Assignment::decode(assignments[0].spec.as_slice()).unwrap();
    let Some(pb::assignment::Kind::Pod(pod)) = spec.kind else {
        panic!("{spec:?}")
    };
    assert_eq!(pod.image, "kiln/demo:1");
    assert_eq!(pod.env.get("A").map(String::as_str), Some("1"));
    assert_eq!(pod.ports[0].port, 8000);
    let Some(pb::gpu_allocation::Kind::Whole(whole)) = pod.gpus.and_then(|g| g.kind) else {
        panic!("whole GPUs expected")
    };
    assert_eq!(whole.gpu_uuids.len(), 2);
    let mut held = assignments[0].gpu_uuids.clone();
    held.sort();
    let mut sent = whole.gpu_uuids.clone();
    sent.sort();
    assert_eq!(held, sent);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn unplaceable_work_says_why_and_is_placed_highest_priority_first_when_capacity_frees(
    pool: PgPool,
) {
    let store = Store::new(pool);
    node(&store, "gpu-a", 8, false).await;
    let scope = org(&store, "alice").await;
    let placer = Placer::new(store.clone());
    let big = create(&store, &scope, pod("whole", 8)).await;
    placer.pass().await.unwrap();
    assert_eq!(get(&store, &big).await.state, "scheduled");

    let low = create(&store, &scope, pod("whole", 8)).await;
    let high = create(
        &store,
        &scope,
        NewWorkload {
            priority: 10,
            ..pod("whole", 8)
        },
    )
    .await;
    let out = placer.pass().await.unwrap();
    assert_eq!((out.placed, out.unschedulable), (0, 2));
    let reason = get(&store, &low).await.state_reason;
    assert!(reason.starts_with("waiting for capacity"), "{reason}");
    assert!(reason.contains("h100-80gb"), "{reason}");
    assert!(
        !reason.contains("would place now"),
        "nothing smaller fits either: {reason}"
    );

    // Capacity frees: the high-priority request, though younger, goes first.
    release(&store, &big, "terminated").await;
    assert_eq!(allocations(&store).await, 0);
    placer.pass().await.unwrap();
    assert_eq!(get(&store, &high).await.state, "scheduled");
    assert_eq!(get(&store, &low).await.state, "pending");

    // With 2 of 8 GPUs free, the refusal offers the nearest requests that would place now.
    release(&store, &high, "terminated").await;
    let six = create(
        &store,
        &scope,
        NewWorkload {
            priority: 20,
            ..pod("whole", 6)
        },
    )
    .await;
    placer.pass().await.unwrap();
    assert_eq!(get(&store, &six).await.state, "scheduled");
    let reason = get(&store, &low).await.state_reason;
    assert!(
        reason.contains("; would place now: 2 × h100-80gb, 1 × h100-80gb"),
        "{reason}"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn two_replicas_racing_never_double_book(pool: PgPool) {
    let store = Store::new(pool);
    node(&store, "gpu-a", 8, false).await;
    node(&store, "gpu-b", 8, false).await;
    let scope = org(&store, "alice").await;
    let mut work = Vec::new();
    for i in 0..40 {
        let new = if i % 3 == 0 {
            pod("whole", 2)
        } else {
            pod("whole", 1)
        };
        work.push(create(&store, &scope, new).await);
    }
    // Two replicas, each with a small batch so they interleave over the same GPUs.
    let one = Placer::new(store.clone()).with_batch(3);
    let two = Placer::new(store.clone()).with_batch(3);
    let mut conflicts = 0;
    for _ in 0..40 {
        let (a, b) = tokio::join!(one.pass(), two.pass());
        let (a, b) = (a.unwrap(), b.unwrap());
        conflicts += a.conflicts + b.conflicts;
        if a.placed + b.placed == 0 && a.conflicts + b.conflicts == 0 && a.claimed + b.claimed > 0 {
            break;
        }
    }
    eprintln!("placement conflicts resolved by the schema: {conflicts}");
    // Every GPU is held at most once, and all 16 are held.
    let (held, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT (node_id, gpu_uuid)) FROM gpu_allocations")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(held, distinct, "a GPU was allocated twice");
    assert_eq!(held, 16);
    let mut gpus_of_placed = 0;
    for w in &work {
        let w = get(&store, w).await;
        if w.state == "scheduled" {
            gpus_of_placed += w.gpu_count;
        } else {
            assert_eq!(w.state, "pending");
        }
    }
    assert_eq!(gpus_of_placed, 16);

    // And the schema itself refuses a second holder, whatever the code does.
    let (workload, node, gpu): (uuid::Uuid, uuid::Uuid, String) =
        sqlx::query_as("SELECT workload_id, node_id, gpu_uuid FROM gpu_allocations LIMIT 1")
            .fetch_one(store.pool())
            .await
            .unwrap();
    let other = work.iter().find(|w| w.id != workload).unwrap();
    let err = sqlx::query(
        "INSERT INTO gpu_allocations (workload_id, node_id, gpu_uuid, mode, slots)
         VALUES ($1, $2, $3, 'share', int8range(0, 1024))",
    )
    .bind(other.id)
    .bind(node)
    .bind(&gpu)
    .execute(store.pool())
    .await
    .unwrap_err();
    assert!(err.to_string().contains("exclusion"), "{err}");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn mig_slices_and_shares_are_placed_without_overlap(pool: PgPool) {
    let store = Store::new(pool);
    node(&store, "mig", 1, true).await;
    node(&store, "shared", 1, false).await;
    let scope = org(&store, "alice").await;
    let placer = Placer::new(store.clone());
    let mut slices = Vec::new();
    for _ in 0..3 {
        let new = NewWorkload {
            mig_profile: Some("2g.20gb"),
            ..pod("mig", 0)
        };
        slices.push(create(&store, &scope, new).await);
    }
    let mut shares = Vec::new();
    for _ in 0..3 {
        let new = NewWorkload {
            share_memory_mib: Some(30 * 1024),
            ..pod("share", 0)
        };
        shares.push(create(&store, &scope, new).await);
    }
    placer.pass().await.unwrap();
    let ranges: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT mode, lower(slots), upper(slots) FROM gpu_allocations ORDER BY mode, lower(slots)",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let mig: Vec<(i64, i64)> = ranges
        .iter()
        .filter(|r| r.0 == "mig")
        .map(|r| (r.1, r.2))
        .collect();
    assert_eq!(
        mig.len(),
        3,
        "three 2g.20gb slices fit on an H100: {ranges:?}"
    );
    assert!(
        mig.windows(2).all(|w| w[0].1 <= w[1].0),
        "slices overlap: {mig:?}"
    );
    // Two 30 GiB shares fit in 80 GiB; the third waits and says why.
    let share: Vec<(i64, i64)> = ranges
        .iter()
        .filter(|r| r.0 == "share")
        .map(|r| (r.1, r.2))
        .collect();
    assert_eq!(share, vec![(0, 30 * 1024), (30 * 1024, 60 * 1024)]);
    let third = get(&store, &shares[2]).await;
    assert_eq!(third.state, "pending");
    assert!(!third.state_reason.is_empty());
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn lost_and_drained_nodes_hand_work_back_by_kind(pool: PgPool) {
    let store = Store::new(pool);
    let a = node(&store, "gpu-a", 8, false).await;
    let scope = org(&store, "alice").await;
    let placer = Placer::new(store.clone());
    let p = create(&store, &scope, pod("whole", 2)).await;
    let vm = create(
        &store,
        &scope,
        NewWorkload {
            kind: "instance",
            ..pod("passthrough", 2)
        },
    )
    .await;
    placer.pass().await.unwrap();
    assert_eq!(get(&store, &p).await.state, "scheduled");
    assert_eq!(get(&store, &vm).await.state, "scheduled");

    // Lost: the pod goes back to the queue, the VM fails (its disk is kept), capacity is freed.
    sqlx::query("UPDATE nodes SET last_heartbeat_at = now() - interval '1 hour'")
        .execute(store.pool())
        .await
        .unwrap();
    let controller = LifecycleController::new(
        store.clone(),
        LivenessPolicy {
            unreachable_after: Duration::from_secs(30),
            lost_after: Duration::from_secs(300),
        },
    );
    controller.tick().await.unwrap();
    controller.tick().await.unwrap();
    assert_eq!(store.node_get(a).await.unwrap().state, "lost");
    let pw = get(&store, &p).await;
    assert_eq!(pw.state, "pending");
    assert!(pw.state_reason.contains("was lost"), "{}", pw.state_reason);
    let vw = get(&store, &vm).await;
    assert_eq!(vw.state, "failed");
    assert!(
        vw.state_reason.contains("disk is kept"),
        "{}",
        vw.state_reason
    );
    assert_eq!(allocations(&store).await, 0);
    let rec = store.node_get(a).await.unwrap();
    assert_eq!(
        (rec.cpu_cores, store.assignment_list(a).await.unwrap().len()),
        (64, 0)
    );

    // A second node takes the pod; draining it sends the pod back to the queue.
    let b = node(&store, "gpu-b", 8, false).await;
    placer.pass().await.unwrap();
    assert_eq!(get(&store, &p).await.node_id, Some(b.as_uuid()));
    let mut tx = store.begin().await.unwrap();
    store
        .node_set_admin_state(&mut tx, b, AdminState::Draining)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(controller.drain().await.unwrap(), 1);
    let pw = get(&store, &p).await;
    assert_eq!(pw.state, "pending");
    assert!(pw.state_reason.contains("draining"), "{}", pw.state_reason);
    // Nowhere to go now: it waits, saying why.
    placer.pass().await.unwrap();
    assert_eq!(get(&store, &p).await.state, "pending");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn org_quotas_hold_even_with_capacity_free_and_count_work_on_cordoned_nodes(pool: PgPool) {
    let store = Store::new(pool);
    let a = node(&store, "gpu-a", 8, false).await;
    node(&store, "gpu-b", 8, false).await;
    let scope = org(&store, "alice").await;
    let other = org(&store, "bob").await;
    let mut tx = store.begin().await.unwrap();
    store
        .quota_set(&mut tx, scope.org_id(), "h100-80gb", "pod", 4)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let placer = Placer::new(store.clone());
    let first = create(&store, &scope, pod("whole", 2)).await;
    let second = create(&store, &scope, pod("whole", 2)).await;
    let third = create(&store, &scope, pod("whole", 2)).await;
    let bobs = create(&store, &other, pod("whole", 8)).await;
    placer.pass().await.unwrap();
    assert_eq!(get(&store, &first).await.state, "scheduled");
    assert_eq!(get(&store, &second).await.state, "scheduled");
    assert_eq!(
        get(&store, &bobs).await.state,
        "scheduled",
        "quotas are per org"
    );
    let w = get(&store, &third).await;
    assert_eq!(w.state, "pending");
    assert!(
        w.state_reason.contains("org quota for h100-80gb pods is 4"),
        "{}",
        w.state_reason
    );

    // Work on a cordoned node still counts against the quota.
    let mut tx = store.begin().await.unwrap();
    store
        .node_set_admin_state(&mut tx, a, AdminState::Cordoned)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    placer.pass().await.unwrap();
    assert_eq!(get(&store, &third).await.state, "pending");

    // Freeing one of the org's pods makes room under the quota (on a node that takes work).
    node(&store, "gpu-c", 8, false).await;
    release(&store, &first, "terminated").await;
    placer.pass().await.unwrap();
    let w = get(&store, &third).await;
    assert_eq!(w.state, "scheduled", "{}", w.state_reason);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn when_demand_exceeds_supply_the_least_served_org_goes_first(pool: PgPool) {
    let store = Store::new(pool);
    node(&store, "gpu-a", 8, false).await;
    let alice = org(&store, "alice").await;
    let bob = org(&store, "bob").await;
    let placer = Placer::new(store.clone());
    let hers = create(&store, &alice, pod("whole", 6)).await;
    placer.pass().await.unwrap();
    assert_eq!(get(&store, &hers).await.state, "scheduled");
    // Two GPUs left; Alice asks first, Bob (who holds nothing) second.
    let alice_more = create(&store, &alice, pod("whole", 2)).await;
    let bobs = create(&store, &bob, pod("whole", 2)).await;
    placer.pass().await.unwrap();
    assert_eq!(get(&store, &bobs).await.state, "scheduled");
    assert_eq!(get(&store, &alice_more).await.state, "pending");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn on_demand_work_preempts_spot_work_which_is_told_and_queued_again(pool: PgPool) {
    let store = Store::new(pool);
    let n = node(&store, "gpu-a", 8, false).await;
    let scope = org(&store, "alice").await;
    let placer = Placer::new(store.clone());
    let spot = create(
        &store,
        &scope,
        NewWorkload {
            tier: "spot",
            ..pod("whole", 8)
        },
    )
    .await;
    placer.pass().await.unwrap();
    let spot_placed = get(&store, &spot).await;
    assert_eq!(spot_placed.state, "scheduled");
    let on_demand = create(&store, &scope, pod("whole", 4)).await;
    let out = placer.pass().await.unwrap();
    assert_eq!((out.placed, out.preempted), (1, 1));
    assert_eq!(get(&store, &on_demand).await.state, "scheduled");
    let spot_now = get(&store, &spot).await;
    assert_eq!(spot_now.state, "pending");
    assert!(
        spot_now.state_reason.contains("preempted"),
        "{}",
        spot_now.state_reason
    );
    // The agent was told: the spot pod's assignment left the node's log as a removal.
    let events = store.assignment_events_after(n, 0, 10).await.unwrap();
    let removed = events
        .iter()
        .find(|e| e.op == "remove")
        .expect("a removal event");
    assert_eq!(Some(removed.assignment_id), spot_placed.assignment_id);
}

async fn observe(
    store: &Store,
    node: NodeId,
    w: &WorkloadRecord,
    state: &'static str,
    reason: &str,
) {
    let a = get(store, w).await.assignment_id.expect("placed");
    store
        .observed_report(
            node,
            0,
            &[kiln_store::ObservedRecord {
                assignment_id: a,
                generation: 1,
                state,
                reason: reason.into(),
                exit_code: None,
                ports: serde_json::json!([]),
                observed_at: time::OffsetDateTime::now_utc(),
                runtime_ms: 0,
            }],
            false,
        )
        .await
        .unwrap();
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_workload_follows_what_its_node_observes_and_its_history_is_kept(pool: PgPool) {
    let store = Store::new(pool);
    let n = node(&store, "gpu-a", 8, false).await;
    let scope = org(&store, "alice").await;
    let w = create(&store, &scope, pod("whole", 2)).await;
    Placer::new(store.clone()).pass().await.unwrap();

    observe(
        &store,
        n,
        &w,
        "pending",
        "this agent has no runtime for pods yet",
    )
    .await;
    let now = get(&store, &w).await;
    assert_eq!(
        (now.state.as_str(), now.state_reason.as_str()),
        ("scheduled", "this agent has no runtime for pods yet")
    );
    observe(&store, n, &w, "starting", "pulling image 43%").await;
    assert_eq!(get(&store, &w).await.state, "starting");
    observe(&store, n, &w, "running", "").await;
    assert_eq!(get(&store, &w).await.state, "running");
    observe(
        &store,
        n,
        &w,
        "failed",
        "container exited 137: out of memory",
    )
    .await;
    let now = get(&store, &w).await;
    assert_eq!(
        (now.state.as_str(), now.state_reason.as_str()),
        ("failed", "container exited 137: out of memory")
    );
    assert_eq!(
        allocations(&store).await,
        0,
        "a failed pod gives its GPUs back"
    );

    let history: Vec<(String,)> = sqlx::query_as(
        "SELECT state FROM workload_state_history WHERE workload_id = $1 ORDER BY id",
    )
    .bind(w.id)
    .fetch_all(store.pool())
    .await
    .unwrap();
    let states: Vec<&str> = history.iter().map(|h| h.0.as_str()).collect();
    assert_eq!(
        states,
        ["pending", "scheduled", "starting", "running", "failed"]
    );
}

/// Poll until `check` holds, for up to 10 s (the running placer's own timer is 10 minutes, so
/// only its notices can make it act in time).
async fn within_10s(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_running_placer_acts_on_notices_for_new_work_and_freed_capacity(pool: PgPool) {
    let store = Store::new(pool);
    node(&store, "gpu-a", 8, false).await;
    let scope = org(&store, "alice").await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(
        Placer::new(store.clone()).run(Duration::from_secs(600), async {
            let _ = stop_rx.await;
        }),
    );
    let first = create(&store, &scope, pod("whole", 8)).await;
    within_10s("the first pod to be placed", async || {
        get(&store, &first).await.state == "scheduled"
    })
    .await;
    let second = create(&store, &scope, pod("whole", 8)).await;
    within_10s("the second pod to say why it waits", async || {
        get(&store, &second)
            .await
            .state_reason
            .starts_with("waiting for capacity")
    })
    .await;
    // Freed capacity is given back in the placer's cached view by the notice alone.
    release(&store, &first, "terminated").await;
    within_10s("the second pod to be placed", async || {
        get(&store, &second).await.state == "scheduled"
    })
    .await;
    let _ = stop_tx.send(());
    running.await.unwrap();
}
