//! Tests of the simulated source, the shipped inventories and source selection.

use std::path::{Path, PathBuf};

use super::*;

fn inventory_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("inventories")
        .join(name)
}

fn load(name: &str) -> SimulatedSource {
    SimulatedSource::load(&inventory_path(name), SimulatedOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn full_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Writes a file the way the fault-file docs ask: temporary file, then rename.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const MINIMAL: &str = r#"
hostname = "t"
[gpu]
type_id = "l40s-48gb"
model = "NVIDIA L40S"
count = 2
memory_mib = 46068
tdp_w = 350
idle_power_w = 35
idle_temp_c = 28
max_temp_c = 80
"#;

// --- shipped inventories -------------------------------------------------------------------

#[test]
fn h100_inventory_is_an_8_gpu_nvswitch_host() {
    let inv = load("h100-sxm-8x.toml").inventory().unwrap();
    assert_eq!(inv.gpus.len(), 8);
    assert_eq!(inv.hostname, "sim-h100-0");
    for (i, gpu) in inv.gpus.iter().enumerate() {
        assert_eq!(gpu.index, i as u32);
        assert_eq!(gpu.memory_mib, 81559);
        assert_eq!(gpu.gpu_type.as_deref(), Some("h100-80gb"));
        assert_eq!(
            gpu_type_for(&gpu.name, gpu.memory_mib).as_deref(),
            Some("h100-80gb"),
            "the model name maps to the same type id on a real host"
        );
        assert!(gpu.mig.capable && !gpu.mig.enabled && gpu.mig.instances.is_empty());
        assert_eq!(gpu.nvlink_peers.len(), 7);
        assert_eq!(gpu.numa_node, Some(if i < 4 { 0 } else { 1 }));
    }
    let names: Vec<_> = inv.gpus[0]
        .mig
        .profiles
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"
        ]
    );
    let p1g = &inv.gpus[0].mig.profiles[0];
    assert_eq!((p1g.compute_slices, p1g.placements.len()), (1, 7));
    // NVSwitch: every pair is connected.
    for a in 0..8 {
        for b in 0..8 {
            assert_eq!(inv.nvlink_connected(a, b), a != b, "{a}-{b}");
        }
    }
    let mut bus: Vec<_> = inv.gpus.iter().map(|g| g.pci_bus_id.clone()).collect();
    assert_eq!(bus[0], "00000000:18:00.0");
    assert_eq!(bus[4], "00000000:98:00.0", "second socket's buses");
    bus.dedup();
    assert_eq!(bus.len(), 8);
}

#[test]
fn a100_inventory_is_a_fully_connected_4_gpu_board() {
    let inv = load("a100-40gb-4x.toml").inventory().unwrap();
    assert_eq!(inv.gpus.len(), 4);
    assert!(inv.gpus.iter().all(|g| g.memory_mib == 40960
        && g.gpu_type.as_deref() == Some("a100-40gb")
        && g.mig.capable
        && g.numa_node == Some(0)));
    assert_eq!(
        gpu_type_for(&inv.gpus[0].name, 40960).as_deref(),
        Some("a100-40gb")
    );
    for a in 0..4 {
        for b in 0..4 {
            assert_eq!(inv.nvlink_connected(a, b), a != b);
        }
    }
    assert_eq!(inv.gpus[0].mig.profiles[0].name, "1g.5gb");
}

#[test]
fn l40s_inventory_is_pcie_only_without_mig() {
    let inv = load("l40s-2x.toml").inventory().unwrap();
    assert_eq!(inv.gpus.len(), 2);
    assert!(inv.gpus.iter().all(|g| g.memory_mib == 46068
        && g.gpu_type.as_deref() == Some("l40s-48gb")
        && !g.mig.capable
        && g.mig.profiles.is_empty()
        && g.nvlink_peers.is_empty()));
    assert_eq!(
        gpu_type_for(&inv.gpus[0].name, 46068).as_deref(),
        Some("l40s-48gb")
    );
    assert!(inv.nvlink_matrix.iter().flatten().all(|c| !c));
}

#[test]
fn inventory_and_samples_round_trip_through_json() {
    let src = load("h100-sxm-8x.toml");
    let inv = src.inventory().unwrap();
    let back: HostInventory = serde_json::from_str(&serde_json::to_string(&inv).unwrap()).unwrap();
    assert_eq!(back, inv);
    let samples = src.sample().unwrap();
    let back: Vec<GpuSample> =
        serde_json::from_str(&serde_json::to_string(&samples).unwrap()).unwrap();
    assert_eq!(back, samples);
}

// --- identity ------------------------------------------------------------------------------

#[test]
fn uuids_are_stable_across_loads_and_distinct_across_hosts() {
    let a = load("h100-sxm-8x.toml").inventory().unwrap();
    let b = load("h100-sxm-8x.toml").inventory().unwrap();
    assert_eq!(a, b, "a restart reports the same GPUs");
    let mut uuids: Vec<_> = a.gpus.iter().map(|g| g.uuid.clone()).collect();
    assert!(uuids.iter().all(|u| u.starts_with("GPU-") && u.len() == 40));
    uuids.sort();
    uuids.dedup();
    assert_eq!(uuids.len(), 8);

    let other = SimulatedSource::load(
        &inventory_path("h100-sxm-8x.toml"),
        SimulatedOptions {
            hostname: Some("sim-h100-1".into()),
            fault_file: None,
        },
    )
    .unwrap()
    .inventory()
    .unwrap();
    assert_eq!(other.hostname, "sim-h100-1", "configured host name wins");
    assert!(other.gpus.iter().all(|g| !uuids.contains(&g.uuid)));
}

// --- synthetic utilisation -----------------------------------------------------------------

#[test]
fn idle_gpus_look_idle() {
    let src = load("h100-sxm-8x.toml");
    for _ in 0..20 {
        for s in src.sample().unwrap() {
            assert!(s.sm_util_pct.unwrap() <= 3, "{s:?}");
            assert!(s.mem_util_pct.unwrap() <= 1, "{s:?}");
            assert!(s.memory_used_mib.unwrap() <= 4, "{s:?}");
            // 0–3 % SM activity: idle power plus at most a few percent of the envelope.
            assert!((68..=92).contains(&s.power_w.unwrap()), "{s:?}");
            assert!((29..=33).contains(&s.temperature_c.unwrap()), "{s:?}");
            assert_eq!(s.health, Health::Healthy);
            assert!(s.xid_events.is_empty());
        }
    }
}

#[test]
fn utilisation_follows_the_placed_load() {
    let src = load("h100-sxm-8x.toml");
    src.set_load(
        2,
        Load {
            memory_mib: 40_000,
            busy_fraction: 0.8,
        },
    )
    .unwrap();
    src.set_load(
        5,
        Load {
            memory_mib: 81_559,
            busy_fraction: 1.0,
        },
    )
    .unwrap();
    for _ in 0..20 {
        let samples = src.sample().unwrap();
        let idle = &samples[0];
        let busy = &samples[2];
        let full = &samples[5];
        assert!((77..=83).contains(&busy.sm_util_pct.unwrap()), "{busy:?}");
        let used = busy.memory_used_mib.unwrap();
        assert!((40_000..=40_004).contains(&used), "{busy:?}");
        assert_eq!(
            full.memory_used_mib,
            Some(81_559),
            "never above the GPU's memory"
        );
        assert!(full.power_w.unwrap() <= 700, "within TDP: {full:?}");
        assert!(full.power_w.unwrap() > 600, "{full:?}");
        assert!(busy.power_w.unwrap() > idle.power_w.unwrap() + 300);
        assert!(busy.temperature_c.unwrap() > idle.temperature_c.unwrap() + 25);
        assert!(full.temperature_c.unwrap() <= 79);
        assert!(busy.mem_util_pct.unwrap() > 30);
    }
    // Removing the work brings the GPU back to idle.
    src.set_load(2, Load::IDLE).unwrap();
    let s = &src.sample().unwrap()[2];
    assert!(
        s.sm_util_pct.unwrap() <= 3 && s.memory_used_mib.unwrap() <= 4,
        "{s:?}"
    );
}

#[test]
fn set_load_on_a_missing_gpu_is_an_error() {
    let err = load("l40s-2x.toml").set_load(2, Load::IDLE).unwrap_err();
    assert!(matches!(
        err,
        InventoryError::UnknownGpu { index: 2, count: 2 }
    ));
}

// --- faults --------------------------------------------------------------------------------

#[test]
fn injected_unhealthy_shows_until_cleared() {
    let src = load("a100-40gb-4x.toml");
    src.inject(Fault::Unhealthy {
        gpu: 1,
        reason: "thermal shutdown".into(),
    })
    .unwrap();
    for _ in 0..2 {
        let s = src.sample().unwrap();
        assert_eq!(
            s[1].health,
            Health::Unhealthy {
                reason: "thermal shutdown".into()
            }
        );
        assert!(s[0].health.is_healthy() && s[2].health.is_healthy());
    }
    src.clear(1).unwrap();
    assert!(src.sample().unwrap()[1].health.is_healthy());
}

#[test]
fn xids_are_reported_once_and_fatal_ones_mark_unhealthy() {
    let src = load("h100-sxm-8x.toml");
    src.inject(Fault::Xid { gpu: 3, code: 79 }).unwrap();
    src.inject(Fault::Xid { gpu: 4, code: 13 }).unwrap();
    let s = src.sample().unwrap();
    assert_eq!(s[3].xid_events, [XidEvent { code: 79 }]);
    assert!(!s[3].health.is_healthy());
    assert_eq!(s[4].xid_events, [XidEvent { code: 13 }]);
    assert!(
        s[4].health.is_healthy(),
        "XID 13 is the application's fault"
    );

    let s = src.sample().unwrap();
    assert!(s[3].xid_events.is_empty(), "reported once");
    assert!(!s[3].health.is_healthy(), "stays unhealthy");

    src.clear(3).unwrap();
    assert!(src.sample().unwrap()[3].health.is_healthy());
}

#[test]
fn ecc_faults_grow_the_counters_and_clear_resets_them() {
    let src = load("l40s-2x.toml");
    src.inject(Fault::Ecc {
        gpu: 0,
        corrected: 5,
        uncorrected: 1,
    })
    .unwrap();
    let s = &src.sample().unwrap()[0];
    assert_eq!((s.ecc_corrected, s.ecc_uncorrected), (Some(5), Some(1)));
    src.clear(0).unwrap();
    let s = &src.sample().unwrap()[0];
    assert_eq!((s.ecc_corrected, s.ecc_uncorrected), (Some(0), Some(0)));
    assert!(src.inject(Fault::Xid { gpu: 9, code: 79 }).is_err());
}

#[test]
fn fault_file_controls_a_running_source_from_outside() {
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults.toml");
    let src = SimulatedSource::load(
        &inventory_path("h100-sxm-8x.toml"),
        SimulatedOptions {
            hostname: None,
            fault_file: Some(faults.clone()),
        },
    )
    .unwrap();
    assert!(
        src.sample().unwrap().iter().all(|s| s.health.is_healthy()),
        "a missing fault file is no faults"
    );

    write_atomically(
        &faults,
        "[[gpu]]\nindex = 6\nunhealthy = \"double-bit ECC error\"\n\n[[gpu]]\nindex = 2\nxid = [48]\n",
    );
    let s = src.sample().unwrap();
    assert_eq!(
        s[6].health,
        Health::Unhealthy {
            reason: "double-bit ECC error".into()
        }
    );
    assert_eq!(s[2].xid_events, [XidEvent { code: 48 }]);
    assert!(!s[2].health.is_healthy());
    assert!(s[0].health.is_healthy());

    let s = src.sample().unwrap();
    assert!(
        s[2].xid_events.is_empty(),
        "an XID in the file is reported once"
    );
    assert!(
        !s[2].health.is_healthy() && !s[6].health.is_healthy(),
        "level"
    );

    // Healing GPU 6 only: the file states what is broken now.
    write_atomically(&faults, "[[gpu]]\nindex = 2\nxid = [48]\n");
    let s = src.sample().unwrap();
    assert!(s[6].health.is_healthy());
    assert!(!s[2].health.is_healthy());

    std::fs::remove_file(&faults).unwrap();
    assert!(src.sample().unwrap().iter().all(|s| s.health.is_healthy()));

    // Listing the XID again is a new event.
    write_atomically(&faults, "[[gpu]]\nindex = 2\nxid = [48]\n");
    assert_eq!(src.sample().unwrap()[2].xid_events, [XidEvent { code: 48 }]);

    write_atomically(&faults, "[[gpu]]\nindex = 8\nunhealthy = \"x\"\n");
    let err = src.sample().unwrap_err();
    assert!(
        matches!(err, InventoryError::ParseFaultFile { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("index 8"), "{err}");

    write_atomically(&faults, "[[gpu]]\nindx = 1\n");
    let err = src.sample().unwrap_err().to_string();
    assert!(err.contains("indx") && err.contains("line 2"), "{err}");
}

// --- bad declarations ----------------------------------------------------------------------

fn parse_err(text: &str) -> InventoryError {
    SimulatedSource::from_toml(text, "test.toml", SimulatedOptions::default()).unwrap_err()
}

#[test]
fn minimal_declaration_parses_with_defaults() {
    let src =
        SimulatedSource::from_toml(MINIMAL, "test.toml", SimulatedOptions::default()).unwrap();
    let inv = src.inventory().unwrap();
    assert_eq!(inv.driver_version, "550.90.07");
    assert_eq!(inv.gpus.len(), 2);
    assert!(
        inv.gpus
            .iter()
            .all(|g| g.numa_node == Some(0) && g.nvlink_peers.is_empty())
    );
}

#[test]
fn missing_field_is_named() {
    let err = parse_err(&MINIMAL.replace("memory_mib = 46068\n", ""));
    assert!(
        matches!(err, InventoryError::ParseInventory { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("test.toml") && msg.contains("memory_mib"),
        "{msg}"
    );
}

#[test]
fn misspelt_field_is_named() {
    let msg = parse_err(&MINIMAL.replace("tdp_w", "tdp_watts")).to_string();
    assert!(msg.contains("tdp_watts") && msg.contains("line 8"), "{msg}");
}

#[test]
fn wrong_type_is_named() {
    let msg = parse_err(&MINIMAL.replace("count = 2", "count = \"two\"")).to_string();
    assert!(msg.contains("line 6") && msg.contains("\"two\""), "{msg}");
}

#[test]
fn bad_nvlink_spec_says_what_is_accepted() {
    let msg = parse_err(&format!("{MINIMAL}nvlink = \"mesh\"\n")).to_string();
    assert!(
        msg.contains("mesh") && msg.contains(r#""all", "none""#),
        "{msg}"
    );

    let err = parse_err(&format!("{MINIMAL}nvlink = [[0, 2]]\n"));
    assert!(
        matches!(&err, InventoryError::InvalidInventory { field, .. } if field == "gpu.nvlink[0]"),
        "{err:?}"
    );
}

#[test]
fn impossible_declarations_name_the_field() {
    let cases = [
        (MINIMAL.replace("count = 2", "count = 0"), "gpu.count"),
        (
            MINIMAL.replace("idle_power_w = 35", "idle_power_w = 400"),
            "gpu.idle_power_w",
        ),
        (format!("{MINIMAL}numa_nodes = 3\n"), "gpu.numa_nodes"),
        (format!("{MINIMAL}mig_enabled = true\n"), "gpu.mig_enabled"),
        (format!("{MINIMAL}mig_capable = true\n"), "mig_profiles"),
    ];
    for (text, field) in cases {
        let err = parse_err(&text);
        match &err {
            InventoryError::InvalidInventory { field: f, .. } => assert_eq!(f, field, "{err}"),
            other => panic!("{field}: {other:?}"),
        }
        assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
    }
}

#[test]
fn declared_mig_instances_are_validated_and_reported() {
    let base = std::fs::read_to_string(inventory_path("h100-sxm-8x.toml"))
        .unwrap()
        .replace("mig_enabled = false", "mig_enabled = true");
    let good = format!(
        "{base}\n[[mig_instances]]\ngpu = 1\nprofile = \"3g.40gb\"\nstart = 4\n\n\
         [[mig_instances]]\ngpu = 1\nprofile = \"1g.10gb\"\nstart = 0\n"
    );
    let src = SimulatedSource::from_toml(&good, "h100", SimulatedOptions::default()).unwrap();
    let inv = src.inventory().unwrap();
    let mig = &inv.gpus[1].mig;
    assert!(mig.enabled);
    assert_eq!(mig.instances.len(), 2);
    assert_eq!(mig.instances[0].profile, "1g.10gb");
    assert_eq!(
        mig.instances[1].placement,
        Some(MigPlacement { start: 4, size: 4 })
    );
    assert!(mig.instances.iter().all(|m| m.uuid.starts_with("MIG-")));
    assert_eq!(src.inventory().unwrap(), inv, "MIG UUIDs are stable too");

    let bad_start =
        format!("{base}\n[[mig_instances]]\ngpu = 0\nprofile = \"3g.40gb\"\nstart = 2\n");
    let err = parse_err(&bad_start);
    assert!(err.to_string().contains("mig_instances[0].start"), "{err}");

    let overlap = format!(
        "{base}\n[[mig_instances]]\ngpu = 0\nprofile = \"3g.40gb\"\nstart = 0\n\n\
         [[mig_instances]]\ngpu = 0\nprofile = \"2g.20gb\"\nstart = 2\n"
    );
    let err = parse_err(&overlap);
    assert!(err.to_string().contains("overlaps"), "{err}");

    let unknown = format!("{base}\n[[mig_instances]]\ngpu = 0\nprofile = \"1g.5gb\"\nstart = 0\n");
    assert!(
        parse_err(&unknown)
            .to_string()
            .contains("mig_instances[0].profile")
    );
}

#[test]
fn unreadable_inventory_file_names_the_path() {
    let err = SimulatedSource::load(
        Path::new("/nonexistent/inv.toml"),
        SimulatedOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, InventoryError::ReadInventory { .. }));
    assert!(err.to_string().contains("/nonexistent/inv.toml"));
}

// --- choosing a source ---------------------------------------------------------------------

#[test]
fn no_usable_source_is_a_clear_error() {
    let config = SourceConfig {
        nvml_library: Some("/nonexistent/libnvidia-ml.so.1".into()),
        ..SourceConfig::default()
    };
    let err = open_source(&config).unwrap_err();
    assert!(matches!(err, InventoryError::NoSource { .. }), "{err:?}");
    let chain = full_chain(&err);
    assert!(chain.starts_with("no GPU source is usable"), "{chain}");
    assert!(chain.contains("/nonexistent/libnvidia-ml.so.1"), "{chain}");
}

#[test]
fn falls_back_to_the_simulated_inventory_without_nvml() {
    let config = SourceConfig {
        nvml_library: Some("/nonexistent/libnvidia-ml.so.1".into()),
        hostname: Some("node-x".into()),
        simulated: Some(SimulatedConfig {
            inventory: inventory_path("l40s-2x.toml"),
            fault_file: None,
        }),
        ..SourceConfig::default()
    };
    let opened = open_source(&config).unwrap();
    assert!(matches!(opened.kind, SourceKind::Simulated { .. }));
    assert!(matches!(
        opened.nvml_unavailable,
        Some(InventoryError::NvmlLibraryMissing { .. })
    ));
    let inv = opened.source.inventory().unwrap();
    assert_eq!(inv.hostname, "node-x");
    assert_eq!(inv.gpus.len(), 2);

    let disabled = SourceConfig {
        nvml: NvmlPolicy::Disabled,
        ..config.clone()
    };
    let opened = open_source(&disabled).unwrap();
    assert!(matches!(
        opened.nvml_unavailable,
        Some(InventoryError::NvmlDisabled)
    ));
}

#[test]
fn a_broken_simulated_inventory_is_not_silently_skipped() {
    let config = SourceConfig {
        nvml: NvmlPolicy::Disabled,
        simulated: Some(SimulatedConfig {
            inventory: "/nonexistent/inv.toml".into(),
            fault_file: None,
        }),
        ..SourceConfig::default()
    };
    assert!(matches!(
        open_source(&config).unwrap_err(),
        InventoryError::ReadInventory { .. }
    ));
}

#[test]
fn source_config_reads_from_toml() {
    let config: SourceConfig = toml::from_str(
        "nvml = \"disabled\"\n[simulated]\ninventory = \"a.toml\"\nfault_file = \"f.toml\"\n",
    )
    .unwrap();
    assert_eq!(config.nvml, NvmlPolicy::Disabled);
    assert_eq!(
        config.simulated.unwrap().fault_file.as_deref(),
        Some(Path::new("f.toml"))
    );
    assert_eq!(
        toml::from_str::<SourceConfig>("").unwrap(),
        SourceConfig::default()
    );
}
