//! MIG slice geometry per GPU model and the choice of a start position.
//!
//! A MIG-capable GPU has 8 memory slices and 7 compute slices. A GPU-instance profile occupies
//! `size` consecutive memory slices starting at one of a fixed set of positions (NVML's
//! `nvmlGpuInstancePlacement_t`: `start`, `size`) and `compute_slices` of the 7 compute slices.
//! The tables below are NVIDIA's published placements (MIG user guide, "Supported MIG
//! profiles") and match `agent/inventory/inventories/*.toml`.
//!
//! Choosing a position: of the free valid starts on a GPU, take the one after which the largest
//! profiles keep the most placeable positions (compared largest profile first), so that a
//! `1g` slice does not land in the middle of a GPU and block a later `4g` or `3g`.

use crate::error::PlacementError;
use crate::snapshot::MigSlice;

/// Memory slices per MIG-capable GPU.
pub const MEMORY_SLICES: u8 = 8;
/// Compute slices (GPCs available to MIG) per MIG-capable GPU.
pub const COMPUTE_SLICES: u8 = 7;

/// One GPU-instance profile and where it may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigProfile {
    /// `nvidia-smi` name, `<compute>g.<memory>gb`.
    pub name: &'static str,
    pub compute_slices: u8,
    /// Memory of one instance as `nvidia-smi` reports it.
    pub memory_mib: u64,
    /// Memory slices occupied.
    pub size: u8,
    /// Valid start slices.
    pub starts: &'static [u8],
}

impl MigProfile {
    /// Bit mask of the memory slices the profile occupies when started at `start`.
    pub fn mask_at(&self, start: u8) -> u8 {
        span_mask(start, self.size)
    }
}

fn span_mask(start: u8, size: u8) -> u8 {
    let bits: u16 = ((1u16 << size) - 1) << start;
    (bits & 0xff) as u8
}

/// The MIG profiles of one GPU model, smallest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigGeometry {
    /// The API's GPU type id.
    pub gpu_type: &'static str,
    pub profiles: &'static [MigProfile],
}

const fn p(
    name: &'static str,
    compute_slices: u8,
    memory_mib: u64,
    size: u8,
    starts: &'static [u8],
) -> MigProfile {
    MigProfile {
        name,
        compute_slices,
        memory_mib,
        size,
        starts,
    }
}

const ALL_SEVEN: &[u8] = &[0, 1, 2, 3, 4, 5, 6];
const EVEN_FOUR: &[u8] = &[0, 2, 4, 6];
const EVEN_THREE: &[u8] = &[0, 2, 4];
const HALVES: &[u8] = &[0, 4];
const ZERO: &[u8] = &[0];

/// A100 40GB (SXM4 / PCIe).
pub const A100_40GB: MigGeometry = MigGeometry {
    gpu_type: "a100-40gb",
    profiles: &[
        p("1g.5gb", 1, 4864, 1, ALL_SEVEN),
        p("1g.10gb", 1, 9984, 2, EVEN_FOUR),
        p("2g.10gb", 2, 9984, 2, EVEN_THREE),
        p("3g.20gb", 3, 20096, 4, HALVES),
        p("4g.20gb", 4, 20096, 4, ZERO),
        p("7g.40gb", 7, 40448, 8, ZERO),
    ],
};

/// A100 80GB (SXM4 / PCIe).
pub const A100_80GB: MigGeometry = MigGeometry {
    gpu_type: "a100-80gb",
    profiles: &[
        p("1g.10gb", 1, 9984, 1, ALL_SEVEN),
        p("1g.20gb", 1, 20096, 2, EVEN_FOUR),
        p("2g.20gb", 2, 20096, 2, EVEN_THREE),
        p("3g.40gb", 3, 40448, 4, HALVES),
        p("4g.40gb", 4, 40448, 4, ZERO),
        p("7g.80gb", 7, 81152, 8, ZERO),
    ],
};

/// H100 80GB (SXM5 / PCIe).
pub const H100_80GB: MigGeometry = MigGeometry {
    gpu_type: "h100-80gb",
    profiles: &[
        p("1g.10gb", 1, 9984, 1, ALL_SEVEN),
        p("1g.20gb", 1, 20096, 2, EVEN_FOUR),
        p("2g.20gb", 2, 20096, 2, EVEN_THREE),
        p("3g.40gb", 3, 40448, 4, HALVES),
        p("4g.40gb", 4, 40448, 4, ZERO),
        p("7g.80gb", 7, 81152, 8, ZERO),
    ],
};

/// Every GPU model the core can place MIG work on.
pub const GEOMETRIES: &[MigGeometry] = &[A100_40GB, A100_80GB, H100_80GB];

/// The MIG geometry of GPU type `gpu_type`, if it is MIG-capable.
pub fn geometry(gpu_type: &str) -> Option<&'static MigGeometry> {
    GEOMETRIES.iter().find(|g| g.gpu_type == gpu_type)
}

/// The geometry and profile for a MIG request, or why the request is meaningless.
pub fn lookup(
    gpu_type: &str,
    profile: &str,
) -> Result<(&'static MigGeometry, &'static MigProfile), PlacementError> {
    let geom = geometry(gpu_type).ok_or_else(|| PlacementError::NoMigGeometry {
        gpu_type: gpu_type.to_owned(),
        supported: GEOMETRIES
            .iter()
            .map(|g| g.gpu_type)
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let prof = geom
        .profile(profile)
        .ok_or_else(|| PlacementError::UnknownMigProfile {
            gpu_type: gpu_type.to_owned(),
            profile: profile.to_owned(),
            valid: geom
                .profiles
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    Ok((geom, prof))
}

/// Which memory slices are taken and how many compute slices are used on one GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub memory_mask: u8,
    pub compute_used: u8,
}

impl Occupancy {
    pub fn free_memory_slices(&self) -> u8 {
        MEMORY_SLICES - self.memory_mask.count_ones() as u8
    }
}

impl MigGeometry {
    pub fn profile(&self, name: &str) -> Option<&'static MigProfile> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// Occupancy of a GPU holding `slices`. A profile unknown to the table is charged its
    /// memory size in compute slices (never less than it could really use).
    pub fn occupancy(&self, slices: &[MigSlice]) -> Occupancy {
        let mut occ = Occupancy::default();
        for s in slices {
            occ.memory_mask |=
                span_mask(s.start.min(7), s.size.min(MEMORY_SLICES - s.start.min(7)));
            let compute = self
                .profile(&s.profile)
                .map_or(s.size.min(COMPUTE_SLICES), |p| p.compute_slices);
            occ.compute_used = occ.compute_used.saturating_add(compute);
        }
        occ
    }

    /// Whether `profile` can start at `start` on a GPU with occupancy `occ`.
    pub fn fits_at(&self, profile: &MigProfile, start: u8, occ: Occupancy) -> bool {
        profile.starts.contains(&start)
            && occ.memory_mask & profile.mask_at(start) == 0
            && occ.compute_used + profile.compute_slices <= COMPUTE_SLICES
    }

    /// Free valid starts of `profile`, lowest first.
    pub fn free_starts<'a>(
        &'a self,
        profile: &'a MigProfile,
        occ: Occupancy,
    ) -> impl Iterator<Item = u8> + 'a {
        profile
            .starts
            .iter()
            .copied()
            .filter(move |&s| self.fits_at(profile, s, occ))
    }

    /// For each profile, largest first, how many positions are still placeable with `occ`.
    /// Compared lexicographically, a bigger vector is a GPU that stays more useful.
    pub fn headroom(&self, occ: Occupancy) -> [u8; 8] {
        let mut out = [0u8; 8];
        for (slot, prof) in out.iter_mut().zip(self.profiles.iter().rev()) {
            *slot = self.free_starts(prof, occ).count() as u8;
        }
        out
    }

    /// The start for `profile` on a GPU with `occ` that keeps the largest future profiles
    /// placeable (ties: the lowest start), with the headroom left afterwards.
    pub fn best_start(&self, profile: &MigProfile, occ: Occupancy) -> Option<(u8, [u8; 8])> {
        let mut best: Option<(u8, [u8; 8])> = None;
        for start in self.free_starts(profile, occ) {
            let after = Occupancy {
                memory_mask: occ.memory_mask | profile.mask_at(start),
                compute_used: occ.compute_used + profile.compute_slices,
            };
            let h = self.headroom(after);
            if best.is_none_or(|(_, bh)| h > bh) {
                best = Some((start, h));
            }
        }
        best
    }

    /// Checks that `slices` is a layout the hardware could hold: known profiles at valid
    /// starts with their own sizes, no memory slice used twice, at most 7 compute slices.
    pub fn validate(&self, slices: &[MigSlice]) -> Result<(), String> {
        let mut occ = Occupancy::default();
        for s in slices {
            let prof = self
                .profile(&s.profile)
                .ok_or_else(|| format!("{} is not a {} profile", s.profile, self.gpu_type))?;
            if s.size != prof.size || !prof.starts.contains(&s.start) {
                return Err(format!(
                    "{} at start {} size {} is not a valid {} placement",
                    s.profile, s.start, s.size, self.gpu_type
                ));
            }
            if !self.fits_at(prof, s.start, occ) {
                return Err(format!(
                    "{} at start {} overlaps another slice or exceeds the compute slices",
                    s.profile, s.start
                ));
            }
            occ.memory_mask |= prof.mask_at(s.start);
            occ.compute_used += prof.compute_slices;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::AllocationId;

    fn slice(profile: &str, start: u8, size: u8) -> MigSlice {
        MigSlice {
            alloc: AllocationId(format!("{profile}@{start}")),
            profile: profile.into(),
            start,
            size,
        }
    }

    #[test]
    fn tables_match_nvidia_geometry() {
        for g in GEOMETRIES {
            assert_eq!(g.profiles.len(), 6);
            for p in g.profiles {
                for &s in p.starts {
                    assert!(s + p.size <= MEMORY_SLICES, "{} {}", g.gpu_type, p.name);
                }
                assert!(p.compute_slices <= COMPUTE_SLICES);
            }
        }
        let (_, p) = lookup("a100-40gb", "3g.20gb").unwrap();
        assert_eq!((p.size, p.starts), (4, &[0u8, 4][..]));
        let (_, p) = lookup("h100-80gb", "1g.10gb").unwrap();
        assert_eq!((p.size, p.starts.len()), (1, 7));
        assert!(matches!(
            lookup("l40s-48gb", "1g.10gb"),
            Err(PlacementError::NoMigGeometry { .. })
        ));
        assert!(matches!(
            lookup("h100-80gb", "1g.5gb"),
            Err(PlacementError::UnknownMigProfile { .. })
        ));
    }

    #[test]
    fn small_slice_goes_to_the_end_keeping_the_big_profiles() {
        let g = &H100_80GB;
        let one = g.profile("1g.10gb").unwrap();
        // On an empty GPU a 1g must not start at 0 (it would block 4g.40gb, which only starts
        // at 0): it goes to the upper half, where a 3g.40gb at 4 is lost but 4g.40gb at 0 stays.
        let (start, _) = g.best_start(one, Occupancy::default()).unwrap();
        assert!(start >= 4, "start {start}");
        // With 4g.40gb at 0, the 1g lands so that 2g.20gb positions survive.
        let occ = g.occupancy(&[slice("4g.40gb", 0, 4)]);
        let (start, h) = g.best_start(one, occ).unwrap();
        assert_eq!(start, 6);
        // A 2g.20gb still fits at 4 afterwards.
        assert!(h[3] >= 1);
    }

    #[test]
    fn compute_slices_limit_seven() {
        let g = &A100_40GB;
        // 4g at 0 + 3g at 4 uses all 7 compute slices and all 8 memory slices.
        let occ = g.occupancy(&[slice("4g.20gb", 0, 4), slice("3g.20gb", 4, 4)]);
        assert_eq!(occ.compute_used, 7);
        assert!(g.best_start(g.profile("1g.5gb").unwrap(), occ).is_none());
        // Seven 1g.5gb fill every compute slice; the eighth memory slice is unreachable.
        let sevens: Vec<_> = (0..7).map(|s| slice("1g.5gb", s, 1)).collect();
        assert!(g.validate(&sevens).is_ok());
        let occ = g.occupancy(&sevens);
        assert_eq!(occ.free_memory_slices(), 1);
        assert!(g.best_start(g.profile("1g.5gb").unwrap(), occ).is_none());
    }

    #[test]
    fn validate_rejects_bad_layouts() {
        let g = &A100_40GB;
        assert!(g.validate(&[slice("3g.20gb", 2, 4)]).is_err());
        assert!(g.validate(&[slice("3g.20gb", 0, 2)]).is_err());
        assert!(
            g.validate(&[slice("2g.10gb", 0, 2), slice("1g.5gb", 1, 1)])
                .is_err()
        );
        assert!(
            g.validate(&[slice("2g.10gb", 0, 2), slice("1g.5gb", 2, 1)])
                .is_ok()
        );
    }
}
