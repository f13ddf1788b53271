//! Synthetic gauges: a pure function from (GPU envelope, what is placed, noise) to a reading.
//!
//! The point is not physics but plausibility for everything above the source: dashboards,
//! the fleet page and the scheduler's health view should see an idle GPU idle (0–3 % SM, a
//! few MiB used, near idle power and temperature) and a loaded GPU track the placed work
//! (SM ≈ busy fraction, memory used = placed memory, power and temperature rising linearly
//! with SM activity up to the model's TDP and full-load temperature). Noise is small and from a
//! seeded generator, so tests are reproducible.

use crate::Load;
use crate::sim::spec::GpuSpec;

/// splitmix64: tiny, seedable, good enough for jitter.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform integer in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
}

/// One synthetic reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gauges {
    pub sm_util_pct: u32,
    pub mem_util_pct: u32,
    pub memory_used_mib: u64,
    pub power_w: u32,
    pub temperature_c: u32,
}

/// Most MiB the driver's own bookkeeping adds to memory used.
pub(crate) const MEMORY_JITTER_MIB: u64 = 4;

pub(crate) fn gauges(gpu: &GpuSpec, load: Load, rng: &mut Rng) -> Gauges {
    let busy = if load.busy_fraction.is_finite() {
        load.busy_fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let sm = if busy > 0.0 {
        (busy * 100.0).round() as i64 + rng.range(-3, 3)
    } else {
        rng.range(0, 3)
    }
    .clamp(0, 100);
    // Memory bandwidth follows compute at roughly half (typical of training/inference mixes).
    let mem_util = if busy > 0.0 {
        sm * 55 / 100 + rng.range(-2, 2)
    } else {
        rng.range(0, 1)
    }
    .clamp(0, 100);
    let memory_used =
        (load.memory_mib + rng.range(0, MEMORY_JITTER_MIB as i64) as u64).min(gpu.memory_mib);
    let activity = sm as f64 / 100.0;
    let power = (f64::from(gpu.idle_power_w)
        + f64::from(gpu.tdp_w - gpu.idle_power_w) * activity * 0.95)
        .round() as i64
        + rng.range(-2, 2);
    let temp = (f64::from(gpu.idle_temp_c) + f64::from(gpu.max_temp_c - gpu.idle_temp_c) * activity)
        .round() as i64
        + rng.range(-1, 1);
    Gauges {
        sm_util_pct: sm as u32,
        mem_util_pct: mem_util as u32,
        memory_used_mib: memory_used,
        power_w: power.clamp(0, i64::from(gpu.tdp_w)) as u32,
        temperature_c: temp.max(0) as u32,
    }
}
