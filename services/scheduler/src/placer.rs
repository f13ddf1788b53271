//! The placement loop: pending workloads → decisions from the pure core → committed capacity.
//!
//! Each pass, in one transaction: lock a batch of pending workloads (`FOR UPDATE SKIP LOCKED`,
//! highest priority first, so replicas split the queue), decide each with
//! [`kiln_placement::place_indexed`] on a cached, indexed view of the fleet (kept in step with
//! what this placer commits and with capacity freed anywhere, per `freed:<id>` notices; read
//! again after a lost race, a listener reconnect, or 30 s; and never used to refuse), and commit the batch in a
//! few set-based statements ([`kiln_store::Store::placements_commit_batch`]). The schema
//! refuses double allocation, so a race lost to another replica is a `Conflict`: the batch is
//! rolled back to its savepoint and committed one by one on a fresh view.
//! A workload that cannot be placed keeps the core's reasons as its `state_reason`. Passes run
//! when `kiln_workloads_pending` is notified (work created, capacity freed) and on a timer.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_domain::{NodeId, WorkloadId};
use kiln_placement::{
    Allocation, AllocationId, Decision, FleetIndex, FleetSnapshot, Gpu, GpuAssignment, GpuDemand,
    GpuUse, MigSlice, Node, Placement, PlacementRequest, Policy, Product, QuotaKey, Resources,
    Tier,
};
use kiln_proto::node::v1 as pb;
use kiln_store::{
    AssignmentKind, FREED, GpuHold, PENDING_CHANNEL, PlaceError, PlacementCommit, SchedFleet,
    Store, StoreError, WorkloadRecord,
};
use prost::Message;
use sqlx::postgres::PgListener;
use uuid::Uuid;

/// Workloads decided per pass (and per transaction).
pub const BATCH: i64 = 256;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassOutcome {
    pub claimed: usize,
    pub placed: usize,
    pub unschedulable: usize,
    /// Lost a race or found the fleet changed; retried next pass.
    pub conflicts: usize,
    pub preempted: usize,
}

/// The longest a cached view of the fleet is used before it is read again (so new nodes are
/// seen). Capacity freed anywhere is released in it (`kiln_workloads_pending` notices
/// `freed:<workload>`), a lost race or a listener reconnect drops it, a refusal is only ever made on a view read in the same pass,
/// and a decision the view got wrong (a node cordoned or a GPU sick since) fails its commit's
/// checks and is retried on a fresh view — so age costs efficiency, never correctness.
const MAX_VIEW_AGE: Duration = Duration::from_secs(30);

/// More freed workloads than this between two passes: read the fleet again instead.
const MAX_FREED: usize = 10_000;

struct View {
    index: FleetIndex,
    loaded: Instant,
}

#[derive(Clone)]
pub struct Placer {
    store: Store,
    policy: Policy,
    batch: i64,
    view: Arc<tokio::sync::Mutex<Option<View>>>,
    /// The view must be read again (the listener reconnected, so notices may be lost).
    stale: Arc<AtomicBool>,
    /// Workloads that gave capacity back since the last pass, per their notices.
    freed: Arc<std::sync::Mutex<Vec<Uuid>>>,
}

impl std::fmt::Debug for Placer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placer")
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

/// A decision waiting to be committed.
struct Decided<'w> {
    workload: &'w WorkloadRecord,
    req: PlacementRequest,
    placement: Placement,
}

impl Placer {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            policy: Policy::default(),
            batch: BATCH,
            view: Arc::default(),
            stale: Arc::default(),
            freed: Arc::default(),
        }
    }

    /// Decide at most `batch` workloads per pass (smaller batches let replicas interleave).
    pub fn with_batch(mut self, batch: i64) -> Self {
        self.batch = batch.max(1);
        self
    }

    async fn load(&self, conn: &mut sqlx::PgConnection) -> Result<View, StoreError> {
        let rows = self.store.sched_fleet(conn, None).await?;
        Ok(View {
            index: FleetIndex::new(snapshot(&rows)),
            loaded: Instant::now(),
        })
    }

    /// One pass over up to a batch of pending workloads.
    pub async fn pass(&self) -> Result<PassOutcome, StoreError> {
        let mut guard = self.view.lock().await;
        // Taken out for the pass and put back only if the pass commits, so a rolled-back
        // pass can never leave a view that counts capacity it did not get.
        let cached = guard.take();
        let mut tx = self.store.begin().await?;
        let claimed = self
            .store
            .workloads_claim_pending(&mut tx, self.batch)
            .await?;
        let mut out = PassOutcome {
            claimed: claimed.len(),
            ..PassOutcome::default()
        };
        if claimed.is_empty() {
            tx.commit().await?;
            *guard = cached;
            // Nothing this replica could claim: none waits but what another replica holds
            // (and reports). No extra query on the idle tick.
            metrics::gauge!("kiln_scheduler_pending_workloads").set(0.0);
            return Ok(out);
        }
        let started = std::time::Instant::now();
        let stale = self.stale.swap(false, Ordering::SeqCst);
        let freed = std::mem::take(&mut *self.freed.lock().unwrap_or_else(|p| p.into_inner()));
        let (mut view, mut fresh) = match cached {
            Some(mut v)
                if !stale
                    && freed.len() <= MAX_FREED
                    && !freed.contains(&Uuid::nil())
                    && v.loaded.elapsed() < MAX_VIEW_AGE =>
            {
                // Capacity freed elsewhere is given back in the view, not by re-reading it.
                for id in &freed {
                    let _ = v.index.release(&AllocationId(id.to_string()));
                }
                (v, false)
            }
            _ => (self.load(&mut tx).await?, true),
        };
        let mut batch: Vec<Decided<'_>> = Vec::new();
        let mut singles: Vec<Decided<'_>> = Vec::new();
        // Fair share: when demand exceeds supply, the least-served org goes first (dominant
        // resource fairness in the core), then priority, then age.
        let mut understood: Vec<(&WorkloadRecord, PlacementRequest)> = Vec::new();
        for w in &claimed {
            match request(w) {
                Some(req) => understood.push((w, req)),
                None => {
                    let id = WorkloadId::from_uuid(w.id);
                    let why = "the request cannot be understood by this scheduler";
                    self.store
                        .workload_release(&mut tx, id, "failed", why)
                        .await?;
                }
            }
        }
        let pending: Vec<kiln_placement::Pending> = understood
            .iter()
            .map(|(w, r)| kiln_placement::Pending {
                request: r.clone(),
                submitted_at: (w.created_at.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
            })
            .collect();
        let order = kiln_placement::fair_order(&pending, view.index.fleet());
        for (w, req) in order.into_iter().map(|k| understood[k].clone()) {
            let id = WorkloadId::from_uuid(w.id);
            let mut decision = kiln_placement::place_indexed(&req, &view.index, &self.policy);
            if matches!(decision, Ok(Decision::Unschedulable(_))) && !fresh {
                // Never refuse on an old view: read the fleet again and decide again.
                view = self.load(&mut tx).await?;
                fresh = true;
                decision = kiln_placement::place_indexed(&req, &view.index, &self.policy);
            }
            match decision {
                Err(e) => {
                    self.store
                        .workload_release(&mut tx, id, "failed", &format!("cannot be placed: {e}"))
                        .await?;
                }
                Ok(Decision::Unschedulable(u)) => {
                    out.unschedulable += 1;
                    let reason = refusal(&u, &req, &view.index, &self.policy);
                    self.store.workload_set_reason(&mut tx, id, &reason).await?;
                }
                Ok(Decision::Placed(p)) => {
                    let simple =
                        p.preempt.is_empty() && !matches!(p.gpus, GpuAssignment::Share { .. });
                    if simple {
                        // Held in the view at once, so the rest of the batch sees it taken. A
                        // view that cannot take it is stale (it still holds this workload's
                        // old placement, say): decide it alone on a fresh view.
                        let alloc = AllocationId(w.id.to_string());
                        if view.index.apply(&self.policy, &req, &p, alloc).is_err() {
                            singles.push(Decided {
                                workload: w,
                                req,
                                placement: p,
                            });
                            continue;
                        }
                        batch.push(Decided {
                            workload: w,
                            req,
                            placement: p,
                        });
                    } else {
                        singles.push(Decided {
                            workload: w,
                            req,
                            placement: p,
                        });
                    }
                }
            }
        }

        // The batch in a handful of statements; on a lost race, one by one on a fresh view.
        let holds_of: Vec<Vec<GpuHold>> = batch
            .iter()
            .map(|d| holds(&d.placement, &self.policy))
            .collect();
        // Each traced workload's placement is a span under its creator's trace, kept open to
        // the end of the pass; its context goes on to the agent in the assignment.
        let mut spans: Vec<tracing::Span> = Vec::new();
        let specs: Vec<Vec<u8>> = batch
            .iter()
            .map(|d| {
                let (span, trace_parent) = placement_span(d.workload);
                spans.extend(span);
                assignment_spec(d.workload, &d.placement, &trace_parent)
            })
            .collect();
        let commits: Vec<PlacementCommit<'_>> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, d)| commit_of(d, &holds_of[i], &specs[i]))
            .collect();
        let mut waits = Vec::new();
        match self.store.placements_commit_batch(&mut tx, &commits).await {
            Ok(ids) => {
                out.placed += ids.len();
                let now = time::OffsetDateTime::now_utc();
                waits.extend(
                    batch
                        .iter()
                        .map(|d| (now - d.workload.created_at).as_seconds_f64()),
                );
            }
            Err(PlaceError::Conflict(why)) => {
                out.conflicts += 1;
                tracing::debug!(
                    why,
                    size = batch.len(),
                    "batch conflict; committing one by one"
                );
                view = self.load(&mut tx).await?;
                fresh = true;
                singles.append(&mut batch);
            }
            Err(PlaceError::Store(e)) => return Err(e),
        }
        if !singles.is_empty() && !fresh {
            view = self.load(&mut tx).await?;
        }
        for d in singles {
            self.commit_one(&mut tx, &mut view, d, &mut out).await?;
        }
        tx.commit().await?;
        if out.placed > 0 {
            metrics::counter!("kiln_scheduler_placements_total").increment(out.placed as u64);
        }
        metrics::histogram!("kiln_scheduler_pass_seconds").record(started.elapsed().as_secs_f64());
        // From the workload's creation to its placement committed (batch placements; the rare
        // one-by-one path after a lost race is not timed).
        for w in waits {
            metrics::histogram!("kiln_scheduler_placement_wait_seconds").record(w.max(0.0));
        }
        drop(spans);
        *guard = Some(view);
        drop(guard);
        self.record_queue_depth().await;
        Ok(out)
    }

    /// `kiln_scheduler_pending_workloads`: the queue's depth after a pass that placed work.
    async fn record_queue_depth(&self) {
        match self.store.workloads_pending_count().await {
            Ok(n) => metrics::gauge!("kiln_scheduler_pending_workloads").set(n as f64),
            Err(e) => tracing::debug!(error = %e, "counting pending workloads"),
        }
    }

    /// Decide again on `view` and commit one placement by itself (shares, preemption, and
    /// batches that lost a race).
    async fn commit_one(
        &self,
        tx: &mut sqlx::PgConnection,
        view: &mut View,
        d: Decided<'_>,
        out: &mut PassOutcome,
    ) -> Result<(), StoreError> {
        let w = d.workload;
        let id = WorkloadId::from_uuid(w.id);
        let p = match kiln_placement::place_indexed(&d.req, &view.index, &self.policy) {
            Ok(Decision::Placed(p)) => p,
            Ok(Decision::Unschedulable(u)) => {
                out.unschedulable += 1;
                let reason = refusal(&u, &d.req, &view.index, &self.policy);
                return self.store.workload_set_reason(tx, id, &reason).await;
            }
            Err(_) => return Ok(()),
        };
        // Preempted spot work goes back to the queue, with notice to its agent (its
        // assignment is removed) and a reason it can read.
        for victim in &p.preempt {
            let Ok(v) = Uuid::parse_str(&victim.0) else {
                continue;
            };
            self.store
                .workload_release(
                    tx,
                    WorkloadId::from_uuid(v),
                    "pending",
                    "preempted: on-demand work needed this spot capacity",
                )
                .await?;
            let _ = view.index.release(victim);
            out.preempted += 1;
        }
        let holds = holds(&p, &self.policy);
        let (_span, trace_parent) = placement_span(w);
        let spec = assignment_spec(w, &p, &trace_parent);
        let decided = Decided {
            workload: w,
            req: d.req,
            placement: p,
        };
        let Some(commit) = commit_of(&decided, &holds, &spec) else {
            return Ok(());
        };
        match self.store.placement_commit(tx, &commit).await {
            Ok(_) => {
                out.placed += 1;
                let _ = view.index.apply(
                    &self.policy,
                    &decided.req,
                    &decided.placement,
                    AllocationId(w.id.to_string()),
                );
            }
            Err(PlaceError::Conflict(why)) => {
                out.conflicts += 1;
                tracing::debug!(workload = %id, why, "placement conflict; retrying next pass");
                *view = self.load(tx).await?;
            }
            Err(PlaceError::Store(e)) => return Err(e),
        }
        Ok(())
    }

    /// Pass until stopped: right away while passes find work, else when woken or every
    /// `every`.
    pub async fn run(self, every: Duration, stop: impl Future<Output = ()> + Send) {
        let (wake_tx, mut wake_rx) = tokio::sync::watch::channel(());
        let pool = self.store.pool().clone();
        let stale = self.stale.clone();
        let freed = self.freed.clone();
        let listener = tokio::spawn(async move {
            loop {
                if let Err(e) = listen(&pool, &wake_tx, &freed).await {
                    tracing::warn!(error = %e, "pending-work listener failed; reconnecting");
                }
                stale.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        tokio::pin!(stop);
        loop {
            // No pass starts once asked to stop (a pass under way runs to its commit, or is
            // rolled back whole if the process is cut off).
            tokio::select! {
                biased;
                () = &mut stop => break,
                () = std::future::ready(()) => {}
            }
            let busy = match self.pass().await {
                Ok(o) => o.claimed as i64 == self.batch || o.conflicts > 0,
                Err(e) => {
                    tracing::error!(error = %e, "scheduling pass failed; retrying");
                    false
                }
            };
            if busy {
                continue;
            }
            tokio::select! {
                biased;
                () = &mut stop => break,
                _ = wake_rx.changed() => {}
                () = tokio::time::sleep(every) => {}
            }
        }
        listener.abort();
    }
}

/// A pending workload's `state_reason`: why nothing fits now, counted per cause, and the
/// nearest requests that would place at this moment.
fn refusal(
    u: &kiln_placement::Unschedulable,
    req: &PlacementRequest,
    index: &FleetIndex,
    policy: &Policy,
) -> String {
    let alternatives = kiln_placement::alternatives(req, index, policy, 3);
    if alternatives.is_empty() {
        format!("waiting for capacity: {u}")
    } else {
        let words: Vec<String> = alternatives.iter().map(kiln_placement::describe).collect();
        format!(
            "waiting for capacity: {u}; would place now: {}",
            words.join(", ")
        )
    }
}

fn commit_of<'a>(
    d: &Decided<'_>,
    holds: &'a [GpuHold],
    spec: &'a [u8],
) -> Option<PlacementCommit<'a>> {
    let node = Uuid::parse_str(&d.placement.node_id).ok()?;
    Some(PlacementCommit {
        workload: WorkloadId::from_uuid(d.workload.id),
        node: NodeId::from_uuid(node),
        holds,
        assignment_spec: spec,
        assignment_kind: if d.workload.kind == "instance" {
            AssignmentKind::Instance
        } else {
            AssignmentKind::Pod
        },
    })
}

async fn listen(
    pool: &sqlx::PgPool,
    wake: &tokio::sync::watch::Sender<()>,
    freed: &std::sync::Mutex<Vec<Uuid>>,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(PENDING_CHANNEL).await?;
    let _ = wake.send(());
    loop {
        let note = listener.recv().await?;
        if let Some(id) = note.payload().strip_prefix(FREED)
            // `freed:*` means "capacity was freed behind the store's back: read it all again".
            && let Ok(id) = if id == "*" { Ok(Uuid::nil()) } else { Uuid::parse_str(id) }
        {
            let mut freed = freed.lock().unwrap_or_else(|p| p.into_inner());
            if freed.len() <= MAX_FREED {
                freed.push(id);
            }
        }
        let _ = wake.send(());
    }
}

/// The placement core's request for a workload; `None` for one it cannot express.
pub fn request(w: &WorkloadRecord) -> Option<PlacementRequest> {
    let gpu = match w.gpu_mode.as_str() {
        "none" => GpuDemand::None,
        "whole" => GpuDemand::Whole {
            count: u32::try_from(w.gpu_count).ok()?,
            passthrough: false,
        },
        "passthrough" => GpuDemand::Whole {
            count: u32::try_from(w.gpu_count).ok()?,
            passthrough: true,
        },
        "mig" => GpuDemand::Mig {
            profile: w.mig_profile.clone()?,
        },
        "share" => GpuDemand::Share {
            memory_mib: u64::try_from(w.share_memory_mib?).ok()?,
        },
        _ => return None,
    };
    Some(PlacementRequest {
        org: w.org_id.to_string(),
        product: product(&w.kind),
        tier: tier(&w.tier),
        priority: w.priority,
        gpu_type: w.gpu_type.clone().unwrap_or_default(),
        gpu,
        require_nvlink: false,
        cpu_millis: w.cpu_millis.max(0) as u64,
        memory_mib: w.memory_mib.max(0) as u64,
        disk_gib: w.disk_gib.max(0) as u64,
    })
}

fn product(kind: &str) -> Product {
    match kind {
        "instance" => Product::Instance,
        "endpoint_replica" => Product::Endpoint,
        _ => Product::Pod,
    }
}

fn tier(t: &str) -> Tier {
    if t == "spot" {
        Tier::Spot
    } else {
        Tier::OnDemand
    }
}

/// The core's view of the schedulable fleet.
pub fn snapshot(rows: &SchedFleet) -> FleetSnapshot {
    use std::collections::HashMap;
    let mut nodes: Vec<Node> = rows
        .nodes
        .iter()
        .map(|n| {
            Node::new(
                &n.id.to_string(),
                Resources {
                    cpu_millis: n.cpu_millis_free.max(0) as u64,
                    memory_mib: n.memory_mib_free.max(0) as u64,
                    disk_gib: n.disk_gib_free.max(0) as u64,
                },
                Vec::new(),
            )
        })
        .collect();
    let pos: HashMap<Uuid, usize> = rows
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id, i))
        .collect();
    // GPU index by UUID per node, for NVLink peers (the wire names peers by UUID).
    let mut index_of: HashMap<(Uuid, &str), u32> = HashMap::new();
    for g in &rows.gpus {
        index_of.insert((g.node_id, g.uuid.as_str()), g.idx.max(0) as u32);
    }
    for g in &rows.gpus {
        let Some(&p) = pos.get(&g.node_id) else {
            continue;
        };
        let mut gpu = Gpu::new(
            &g.uuid,
            g.idx.max(0) as u32,
            g.gpu_type.as_deref().unwrap_or(""),
            g.memory_mib.max(0) as u64,
        );
        gpu.numa_node = g.numa_node.map(|n| n.max(0) as u32);
        gpu.iommu_group = g.iommu_group.map(|n| n.max(0) as u32);
        gpu.healthy = g.healthy;
        gpu.mig_enabled = g.mig_enabled;
        gpu.nvlink_peers = g
            .nvlink_peers
            .iter()
            .filter_map(|u| index_of.get(&(g.node_id, u.as_str())).copied())
            .collect();
        nodes[p].gpus.push(gpu);
    }
    let mut seen: std::collections::HashSet<(Uuid, Uuid)> = std::collections::HashSet::new();
    for a in &rows.allocations {
        let Some(&p) = pos.get(&a.node_id) else {
            continue;
        };
        let id = AllocationId(a.workload_id.to_string());
        let node = &mut nodes[p];
        if let Some(gpu) = node.gpus.iter_mut().find(|g| g.uuid == a.gpu_uuid) {
            match a.mode.as_str() {
                "whole" => gpu.used = GpuUse::Whole(id.clone()),
                "mig" => {
                    let slice = MigSlice {
                        alloc: id.clone(),
                        profile: a.mig_profile.clone().unwrap_or_default(),
                        start: a.slot_start.clamp(0, 255) as u8,
                        size: (a.slot_end - a.slot_start).clamp(0, 255) as u8,
                    };
                    match &mut gpu.used {
                        GpuUse::Mig(v) => v.push(slice),
                        other => *other = GpuUse::Mig(vec![slice]),
                    }
                }
                _ => {
                    let share = kiln_placement::Share {
                        alloc: id.clone(),
                        memory_mib: (a.slot_end - a.slot_start).max(0) as u64,
                    };
                    match &mut gpu.used {
                        GpuUse::Shared(v) => v.push(share),
                        other => *other = GpuUse::Shared(vec![share]),
                    }
                }
            }
        }
        if seen.insert((a.node_id, a.workload_id)) {
            node.allocations.push(Allocation {
                id,
                org: a.org_id.to_string(),
                product: product(&a.kind),
                tier: tier(&a.tier),
                priority: a.priority,
                resources: Resources {
                    cpu_millis: a.cpu_millis.max(0) as u64,
                    memory_mib: a.memory_mib.max(0) as u64,
                    disk_gib: a.disk_gib.max(0) as u64,
                },
            });
        }
    }
    let mut fleet = FleetSnapshot::new(nodes);
    // Quota usage: what the ready nodes hold (as the core counts it), plus what is held on
    // nodes that take no new work (cordoned, draining, unreachable) — it still counts.
    fleet.usage = kiln_placement::usage_from_nodes(&fleet.nodes);
    for a in rows
        .allocations
        .iter()
        .filter(|a| !pos.contains_key(&a.node_id))
    {
        let units = match a.mode.as_str() {
            "whole" => kiln_placement::UNITS_PER_GPU,
            "mig" => (a.slot_end - a.slot_start).max(0) as u64,
            _ => kiln_placement::share_units(
                (a.slot_end - a.slot_start).max(0) as u64,
                a.gpu_memory_mib.max(0) as u64,
            ),
        };
        fleet.usage.add(
            QuotaKey::new(&a.org_id.to_string(), &a.gpu_type, product(&a.kind)),
            units,
        );
    }
    for q in &rows.quotas {
        let product = match q.product.as_str() {
            "instance" => Product::Instance,
            "endpoint" => Product::Endpoint,
            _ => Product::Pod,
        };
        fleet.quotas.set(
            QuotaKey::new(&q.org_id.to_string(), &q.gpu_type, product),
            q.max_gpus.max(0) as u64,
        );
    }
    fleet
}

fn holds(p: &Placement, policy: &Policy) -> Vec<GpuHold> {
    match &p.gpus {
        GpuAssignment::None => Vec::new(),
        GpuAssignment::Whole { gpu_uuids } => gpu_uuids
            .iter()
            .map(|u| GpuHold::Whole {
                gpu_uuid: u.clone(),
            })
            .collect(),
        GpuAssignment::Mig {
            gpu_uuid,
            profile,
            start,
            size,
        } => vec![GpuHold::Mig {
            gpu_uuid: gpu_uuid.clone(),
            profile: profile.clone(),
            start: i64::from(*start),
            size: i64::from(*size),
        }],
        GpuAssignment::Share {
            gpu_uuid,
            memory_mib,
        } => vec![GpuHold::Share {
            gpu_uuid: gpu_uuid.clone(),
            memory_mib: i64::try_from(*memory_mib).unwrap_or(i64::MAX),
            max_tenants: i64::from(policy.share_tenants_per_gpu),
        }],
    }
}

/// The span of placing `w`, a child of the trace that created it, and that span's own
/// `traceparent` for the assignment. No span for a workload created without tracing.
fn placement_span(w: &WorkloadRecord) -> (Option<tracing::Span>, String) {
    if w.trace_parent.is_empty() {
        return (None, String::new());
    }
    let span = tracing::info_span!("place", workload = %WorkloadId::from_uuid(w.id));
    kiln_telemetry::set_remote_parent(&span, &w.trace_parent);
    let trace_parent = span
        .in_scope(kiln_telemetry::current_traceparent)
        .unwrap_or_default();
    (Some(span), trace_parent)
}

/// The agent's desired state for a placed workload: the kind's spec from the workload row
/// (image, command, env, ports for pods; image, keys for instances), the GPUs placed, and the
/// trace the agent applies it under (`trace_parent`, empty without tracing).
pub fn assignment_spec(w: &WorkloadRecord, p: &Placement, trace_parent: &str) -> Vec<u8> {
    let text = |k: &str| {
        w.spec
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let strings = |k: &str| -> Vec<String> {
        w.spec
            .get(k)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let ports: Vec<pb::PortSpec> = w
        .spec
        .get("ports")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_u64())
                .map(|port| pb::PortSpec {
                    port: port as u32,
                    protocol: pb::Protocol::Tcp as i32,
                    name: String::new(),
                })
                .collect()
        })
        .unwrap_or_default();
    let cpu_millis = u32::try_from(w.cpu_millis).unwrap_or(u32::MAX);
    let memory_mib = w.memory_mib.max(0) as u64;
    let kind = if w.kind == "instance" {
        let gpu_uuids = match &p.gpus {
            GpuAssignment::Whole { gpu_uuids } => gpu_uuids.clone(),
            _ => Vec::new(),
        };
        pb::assignment::Kind::Instance(pb::InstanceSpec {
            image: text("image"),
            cpu_millis,
            memory_mib,
            disk_gib: w.disk_gib.max(0) as u64,
            gpu_uuids,
            ssh_authorized_keys: strings("ssh_public_keys"),
            ports,
            hostname: w.name.clone(),
            org_id: kiln_domain::OrgId::from_uuid(w.org_id).to_string(),
            power: instance_power(&w.spec) as i32,
            reboot_count: w
                .spec
                .get("reboot_count")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            image_source: Some(vm_image(&w.spec)),
        })
    } else {
        let gpus = match &p.gpus {
            GpuAssignment::None => None,
            GpuAssignment::Whole { gpu_uuids } => {
                Some(pb::gpu_allocation::Kind::Whole(pb::WholeGpus {
                    gpu_uuids: gpu_uuids.clone(),
                }))
            }
            GpuAssignment::Mig {
                gpu_uuid,
                profile,
                start,
                ..
            } => Some(pb::gpu_allocation::Kind::Mig(pb::MigSlice {
                gpu_uuid: gpu_uuid.clone(),
                profile: profile.clone(),
                start: u32::from(*start),
                mig_device_uuid: String::new(),
            })),
            GpuAssignment::Share {
                gpu_uuid,
                memory_mib,
            } => Some(pb::gpu_allocation::Kind::Share(pb::GpuShare {
                gpu_uuid: gpu_uuid.clone(),
                memory_cap_mib: *memory_mib,
            })),
        };
        let string_map = |field: &str| -> std::collections::HashMap<String, String> {
            w.spec
                .get(field)
                .and_then(|v| v.as_object())
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                        .collect()
                })
                .unwrap_or_default()
        };
        let restart_policy = match w.spec.get("restart_policy").and_then(|v| v.as_str()) {
            Some("always") => pb::RestartPolicy::Always,
            Some("never") => pb::RestartPolicy::Never,
            _ => pb::RestartPolicy::OnFailure,
        };
        pb::assignment::Kind::Pod(pb::PodSpec {
            org_id: kiln_domain::OrgId::from_uuid(w.org_id).to_string(),
            image: text("image"),
            command: strings("command"),
            env: string_map("env"),
            // Still sealed: the fleet service opens them as it streams the assignment.
            env_sealed: string_map("env_secret"),
            restart_policy: restart_policy as i32,
            ports,
            cpu_millis,
            memory_mib,
            gpus: gpus.map(|k| pb::GpuAllocation { kind: Some(k) }),
        })
    };
    pb::Assignment {
        kind: Some(kind),
        trace_parent: trace_parent.to_string(),
        ..pb::Assignment::default()
    }
    .encode_to_vec()
}

/// The power an instance's spec asks for (`spec.power`, set by the API's stop and start).
pub fn instance_power(spec: &serde_json::Value) -> pb::PowerState {
    match spec.get("power").and_then(|v| v.as_str()) {
        Some("stopped") => pb::PowerState::Stopped,
        _ => pb::PowerState::Running,
    }
}

/// The catalog image an instance was created from: the API copies the catalog row into
/// `spec.image_source` at creation, so a later change to the catalog never swaps the base disk
/// under an instance's overlay.
pub fn vm_image(spec: &serde_json::Value) -> pb::VmImage {
    let src = spec.get("image_source");
    let text = |k: &str| {
        src.and_then(|s| s.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    pb::VmImage {
        name: spec
            .get("image")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned(),
        kernel: text("kernel"),
        initrd: text("initrd"),
        disk: text("disk"),
        kernel_args: text("kernel_args"),
        login_user: text("login_user"),
    }
}
