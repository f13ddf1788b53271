//! The CPU, memory and disk the agent offers besides GPUs: what the operator configured, else
//! what the host reports.

use std::path::Path;

use kiln_proto::node::v1::HostCapacity;

use crate::config::CapacityOverrides;

/// The host's capacity, each value from `overrides` when set, else measured: logical CPUs
/// (`available_parallelism`, which honours CPU affinity and cgroup quotas), `MemTotal` from
/// `/proc/meminfo`, and the space available to unprivileged users on the state directory's
/// file system. A value that cannot be measured is 0 (and logged), never a guess.
pub fn host_capacity(overrides: &CapacityOverrides, state_dir: &Path) -> HostCapacity {
    let cpu_cores = overrides.cpu_cores.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "could not count CPUs; reporting 0 cores");
                0
            })
    });
    let memory_mib = overrides.memory_mib.unwrap_or_else(|| {
        match std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| meminfo_total_mib(&t))
        {
            Some(m) => m,
            None => {
                tracing::warn!("could not read MemTotal from /proc/meminfo; reporting 0 MiB");
                0
            }
        }
    });
    let disk_gib = overrides.disk_gib.unwrap_or_else(|| match disk_available_gib(state_dir) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, dir = %state_dir.display(), "could not stat the state directory's file system; reporting 0 GiB");
            0
        }
    });
    HostCapacity {
        cpu_cores,
        memory_mib,
        disk_gib,
    }
}

/// `MemTotal` in MiB from the text of `/proc/meminfo` (which states it in kB).
pub fn meminfo_total_mib(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(value / 1024),
        Some(_) => None,
    }
}

fn disk_available_gib(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize) >> 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses_kb() {
        let text = "MemTotal:       263845236 kB\nMemFree:         1000 kB\n";
        assert_eq!(meminfo_total_mib(text), Some(263845236 / 1024));
        assert_eq!(meminfo_total_mib("MemFree: 1 kB\n"), None);
        assert_eq!(meminfo_total_mib("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn overrides_win_and_measurements_are_plausible() {
        let dir = tempfile::tempdir().unwrap();
        let measured = host_capacity(&CapacityOverrides::default(), dir.path());
        assert!(measured.cpu_cores >= 1);
        assert!(measured.memory_mib > 0);
        let fixed = host_capacity(
            &CapacityOverrides {
                cpu_cores: Some(64),
                memory_mib: Some(512 * 1024),
                disk_gib: Some(3000),
            },
            dir.path(),
        );
        assert_eq!(
            fixed,
            HostCapacity {
                cpu_cores: 64,
                memory_mib: 512 * 1024,
                disk_gib: 3000
            }
        );
    }
}
