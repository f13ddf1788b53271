//! Reconnect pacing and the stuck-stream check: small pure pieces of the session loop.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter: the `n`th consecutive failure waits a uniformly random
/// time in `0..=min(cap, base * 2^n)`, so a control plane that comes back is not hit by every
/// agent at the same instant. A session that lasted long enough resets it.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// A session that lasted at least this long counts as healthy.
    healthy_after: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(
            Duration::from_millis(200),
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, healthy_after: Duration) -> Self {
        Self {
            base,
            cap,
            healthy_after,
            failures: 0,
        }
    }

    /// The upper bound of the next wait: `min(cap, base * 2^failures)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Records the end of a session that lasted `lasted`, and returns how long to wait before
    /// the next attempt.
    pub fn next_delay(&mut self, lasted: Duration, rng: &mut impl Rng) -> Duration {
        if lasted >= self.healthy_after {
            self.failures = 0;
        }
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.gen_range(0..=ms))
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Notices a watch stream that has stopped delivering: the server says (in each heartbeat
/// response) that revisions up to `latest` exist, and the agent has not applied them after
/// more than `patience` heartbeats.
///
/// The target is the `latest` seen when the agent first fell behind; reaching it resets the
/// count, so a stream that keeps delivering while new events keep arriving is not "stuck".
#[derive(Debug, Clone)]
pub struct StuckDetector {
    patience: u32,
    behind: Option<(u64, u32)>,
}

impl StuckDetector {
    pub fn new(patience: u32) -> Self {
        Self {
            patience,
            behind: None,
        }
    }

    /// Records a heartbeat response; true when the stream counts as stuck.
    pub fn observe(&mut self, latest: u64, applied: u64) -> bool {
        match &mut self.behind {
            Some((target, _)) if applied >= *target => {
                self.behind = None;
                if latest > applied {
                    self.behind = Some((latest, 0));
                }
                false
            }
            Some((_, count)) => {
                *count += 1;
                *count > self.patience
            }
            None if latest > applied => {
                self.behind = Some((latest, 0));
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn delays_stay_within_exponential_bounds_and_cap() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::default();
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let ceiling = b.ceiling();
            ceilings.push(ceiling.as_millis());
            for _ in 0..50 {
                let mut probe = b.clone();
                let d = probe.next_delay(Duration::ZERO, &mut rng);
                assert!(d <= ceiling, "{d:?} > {ceiling:?}");
            }
            b.next_delay(Duration::ZERO, &mut rng);
        }
        assert_eq!(
            ceilings,
            vec![
                200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000, 10000, 10000, 10000
            ]
        );
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut b = Backoff::default();
        for _ in 0..10 {
            b.next_delay(Duration::ZERO, &mut rng);
        }
        let delays: std::collections::BTreeSet<_> = (0..100)
            .map(|_| b.clone().next_delay(Duration::ZERO, &mut rng))
            .collect();
        assert!(delays.len() > 50, "full jitter, not a fixed delay");
    }

    #[test]
    fn a_long_session_resets_the_backoff() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut b = Backoff::default();
        for _ in 0..8 {
            b.next_delay(Duration::from_secs(1), &mut rng);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(10));
        let d = b.next_delay(Duration::from_secs(31), &mut rng);
        assert!(d <= Duration::from_millis(200));
        assert_eq!(b.failures(), 1);
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let b = Backoff {
            failures: u32::MAX,
            ..Backoff::default()
        };
        assert_eq!(b.ceiling(), Duration::from_secs(10));
    }

    #[test]
    fn stuck_after_more_than_patience_heartbeats_behind() {
        let mut d = StuckDetector::new(3);
        assert!(!d.observe(5, 5));
        assert!(!d.observe(6, 5)); // falls behind: target 6
        assert!(!d.observe(6, 5)); // 1
        assert!(!d.observe(6, 5)); // 2
        assert!(!d.observe(6, 5)); // 3
        assert!(d.observe(6, 5)); // 4 > 3: stuck
    }

    #[test]
    fn a_delivering_stream_is_not_stuck() {
        let mut d = StuckDetector::new(3);
        // New events keep arriving, and the agent keeps catching up with the old target.
        let mut applied = 0;
        for latest in (1..100).step_by(2) {
            assert!(
                !d.observe(latest, applied),
                "latest {latest} applied {applied}"
            );
            applied = latest;
        }
        assert!(!d.observe(applied, applied));
        assert!(!d.observe(applied, applied));
    }
}
