//! The endpoint autoscaler: moves each endpoint's `desired_replicas` within `[min, max]` from
//! the load the gateways record in Redis (calls in flight — including calls held while a
//! replica starts — and a counter of calls admitted; `kiln_ratelimit::admission`). The endpoint
//! controller then adds or removes replicas to match.
//!
//! The decision ([`decide`]) is a plain function over plain data:
//! * wanted = ⌈in flight ÷ target_concurrency⌉; a running endpoint keeps at least 1 until it
//!   has had no call for `scale_to_zero_after` (then 0, when `min` is 0), and one at zero
//!   gets a replica only when a call is in flight (held by a gateway: the cold start);
//! * up at once (a call held at zero replicas is a cold start: it is waited for);
//! * down only to the most that was wanted over the last `scale_down_window` (stabilisation:
//!   a dip does not drop replicas that the next burst needs again); to zero at once once idle.
//!
//! One scheduler replica decides at a time: the one holding a session advisory lock, so two
//! schedulers with different histories never fight over the count.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use kiln_domain::EndpointId;
use kiln_ratelimit::admission::{Admission, Load};
use kiln_store::{ScalingTarget, Store};
use uuid::Uuid;

/// An endpoint's scaling bounds and behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    pub target_concurrency: u32,
    pub scale_down_window: Duration,
    pub scale_to_zero_after: Duration,
}

impl Policy {
    pub fn of(t: &ScalingTarget) -> Self {
        let n = |v: i32| u32::try_from(v).unwrap_or(0);
        Self {
            min: n(t.min_replicas),
            max: n(t.max_replicas).max(1),
            target_concurrency: n(t.autoscaling.target_concurrency).max(1),
            scale_down_window: Duration::from_secs(u64::from(n(t.autoscaling.scale_down_window_s))),
            scale_to_zero_after: Duration::from_secs(u64::from(
                n(t.autoscaling.scale_to_zero_after_s).max(1),
            )),
        }
    }
}

/// What the autoscaler remembers of one endpoint between decisions.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// (when, replicas wanted then), oldest first, within the scale-down window.
    wanted: VecDeque<(Duration, u32)>,
    /// The last call counter read, and when the endpoint last had a call.
    last_admitted: Option<u64>,
    last_active: Duration,
}

/// The replicas endpoint should have now. `now` is any monotonic clock's reading.
pub fn decide(
    policy: &Policy,
    history: &mut History,
    now: Duration,
    load: Load,
    current: u32,
) -> u32 {
    // The first reading cannot tell whether calls came lately: count it as activity, so a
    // restarted autoscaler never scales an endpoint to zero before a full idle period.
    let called = history
        .last_admitted
        .is_none_or(|last| last != load.admitted);
    history.last_admitted = Some(load.admitted);
    if called || load.in_flight > 0 {
        history.last_active = now;
    }
    let idle = now.saturating_sub(history.last_active) >= policy.scale_to_zero_after;
    let by_load = u32::try_from(
        load.in_flight
            .div_ceil(u64::from(policy.target_concurrency)),
    )
    .unwrap_or(u32::MAX);
    // A replica that exists stays until the endpoint has been idle long enough; none is
    // started without a call waiting for it.
    let floor = if idle || current == 0 { 0 } else { 1 };
    let wanted = by_load.max(floor).clamp(policy.min, policy.max);

    history.wanted.push_back((now, wanted));
    while history
        .wanted
        .front()
        .is_some_and(|(at, _)| now.saturating_sub(*at) > policy.scale_down_window)
    {
        history.wanted.pop_front();
    }
    if wanted >= current || wanted == 0 {
        return wanted;
    }
    // Down, but only as far as the window's highest want.
    let most = history
        .wanted
        .iter()
        .map(|(_, w)| *w)
        .max()
        .unwrap_or(wanted);
    most.min(current)
}

/// Runs [`decide`] for every live endpoint and records the result.
pub struct Autoscaler {
    store: Store,
    admission: Admission,
    histories: HashMap<Uuid, History>,
    /// The connection holding the leader lock, when this replica leads.
    leader: Option<sqlx::pool::PoolConnection<sqlx::Postgres>>,
    /// Where that connection comes from: not the store's pool, which it would hold forever.
    lock_pool: sqlx::PgPool,
    started: tokio::time::Instant,
}

/// The advisory lock key of the autoscaler's leader ("kiln-as" in ASCII).
const LEADER_LOCK: i64 = 0x006b_696c_6e2d_6173;

impl Autoscaler {
    pub fn new(store: Store, admission: Admission) -> Self {
        Self {
            lock_pool: store.dedicated_pool(),
            store,
            admission,
            histories: HashMap::new(),
            leader: None,
            started: tokio::time::Instant::now(),
        }
    }

    /// Whether this replica leads (takes the lock when free; notices when its session died).
    async fn lead(&mut self) -> Result<bool, sqlx::Error> {
        if let Some(conn) = self.leader.as_mut() {
            if sqlx::query("SELECT 1").execute(&mut **conn).await.is_ok() {
                return Ok(true);
            }
            // The session (and with it the lock) is gone; start over.
            self.leader = None;
            self.histories.clear();
        }
        let mut conn = self.lock_pool.acquire().await?;
        let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        if got {
            // Held for this process's life (or until its session fails).
            self.leader = Some(conn);
            tracing::info!("this scheduler now runs the endpoint autoscaler");
        }
        Ok(got)
    }

    /// One pass; answers how many endpoints' desired replicas changed.
    pub async fn pass(&mut self) -> anyhow::Result<usize> {
        if !self.lead().await? {
            return Ok(0);
        }
        let now = self.started.elapsed();
        let targets = self.store.endpoint_scaling_targets().await?;
        self.histories
            .retain(|id, _| targets.iter().any(|t| t.id == *id));
        let mut changed = 0;
        for t in &targets {
            let scope = EndpointId::from_uuid(t.id).to_string();
            let load = match self.admission.load(&scope).await {
                Ok(load) => load,
                Err(error) => {
                    // Without the load nothing is decided (never a blind scale-down).
                    tracing::warn!(%error, "endpoint load unavailable; not scaling");
                    return Ok(changed);
                }
            };
            let current = u32::try_from(t.desired_replicas).unwrap_or(0);
            let history = self.histories.entry(t.id).or_default();
            let desired = decide(&Policy::of(t), history, now, load, current);
            if desired != current
                && self
                    .store
                    .endpoint_set_desired(t.id, i32::try_from(desired).unwrap_or(i32::MAX))
                    .await?
            {
                tracing::info!(endpoint = %scope, from = current, to = desired, in_flight = load.in_flight, "endpoint scaled");
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Pass every `every` until `stop`.
    pub async fn run(mut self, every: Duration, stop: impl Future<Output = ()> + Send) {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "autoscaler pass failed; retrying");
            }
            tokio::select! {
                biased;
                () = &mut stop => break,
                () = tokio::time::sleep(every) => {}
            }
        }
        self.resign().await;
    }

    /// Give up leadership at once (another replica takes it at its next pass) rather than
    /// when this process's connections happen to close.
    async fn resign(&mut self) {
        if let Some(mut conn) = self.leader.take() {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(LEADER_LOCK)
                .execute(&mut *conn)
                .await;
            if let Err(error) = unlocked {
                tracing::warn!(%error, "releasing the autoscaler lock failed; closing its session");
            }
            // Closing the session releases the lock in any case.
            let _ = conn.close().await;
            tracing::info!("this scheduler no longer runs the endpoint autoscaler");
        }
        self.lock_pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        min: 0,
        max: 8,
        target_concurrency: 4,
        scale_down_window: Duration::from_secs(60),
        scale_to_zero_after: Duration::from_secs(300),
    };

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn load(in_flight: u64, admitted: u64) -> Load {
        Load {
            in_flight,
            admitted,
        }
    }

    #[test]
    fn a_call_at_zero_starts_a_replica_at_once() {
        let mut h = History::default();
        // At zero without calls: stays there.
        assert_eq!(decide(&POLICY, &mut h, s(0), load(0, 10), 0), 0);
        assert_eq!(decide(&POLICY, &mut h, s(5), load(0, 10), 0), 0);
        // A call is held for a replica: wanted at once.
        assert_eq!(decide(&POLICY, &mut h, s(6), load(1, 11), 0), 1);
        // Served; the replica stays while calls came lately, and goes after the idle period.
        assert_eq!(decide(&POLICY, &mut h, s(7), load(0, 11), 1), 1);
        assert_eq!(decide(&POLICY, &mut h, s(305), load(0, 11), 1), 1);
        assert_eq!(decide(&POLICY, &mut h, s(306), load(0, 11), 1), 0);
    }

    #[test]
    fn scales_up_at_once_and_down_only_after_the_window() {
        let mut h = History::default();
        assert_eq!(decide(&POLICY, &mut h, s(0), load(4, 1), 1), 1);
        assert_eq!(
            decide(&POLICY, &mut h, s(1), load(20, 30), 1),
            5,
            "⌈20/4⌉ at once"
        );
        // The burst ends: 5 are kept while the window remembers them...
        assert_eq!(decide(&POLICY, &mut h, s(2), load(2, 60), 5), 5);
        assert_eq!(decide(&POLICY, &mut h, s(61), load(2, 90), 5), 5);
        // ...and dropped once it no longer does (calls still come: at least one stays).
        assert_eq!(decide(&POLICY, &mut h, s(62), load(2, 95), 5), 1);
        assert_eq!(decide(&POLICY, &mut h, s(63), load(0, 99), 1), 1);
        // A second burst that ends: again down only after the window.
        assert_eq!(decide(&POLICY, &mut h, s(70), load(12, 120), 1), 3);
        assert_eq!(decide(&POLICY, &mut h, s(100), load(0, 121), 3), 3);
        assert_eq!(decide(&POLICY, &mut h, s(131), load(0, 122), 3), 1);
    }

    #[test]
    fn goes_to_zero_only_after_the_idle_period_and_never_below_min() {
        let mut h = History::default();
        assert_eq!(
            decide(&POLICY, &mut h, s(0), load(0, 7), 1),
            1,
            "first reading: active"
        );
        assert_eq!(decide(&POLICY, &mut h, s(299), load(0, 7), 1), 1);
        assert_eq!(decide(&POLICY, &mut h, s(300), load(0, 7), 1), 0);
        let kept = Policy { min: 2, ..POLICY };
        let mut h = History::default();
        assert_eq!(decide(&kept, &mut h, s(0), load(0, 0), 2), 2);
        assert_eq!(decide(&kept, &mut h, s(1000), load(0, 0), 2), 2);
    }

    #[test]
    fn never_above_max() {
        let mut h = History::default();
        assert_eq!(decide(&POLICY, &mut h, s(0), load(1000, 1), 1), 8);
    }
}
