//! GPU passthrough planning (VFIO) as pure logic over a snapshot of sysfs, plus the small
//! adapters that read the real `/sys` into that snapshot and (on a GPU host) rebind devices.
//!
//! A GPU can only be given to a VM with its whole IOMMU group: every device of the group must be
//! bound to `vfio-pci` (bridges excepted: they stay with their own driver), so a group holding an
//! unrelated device (a NIC, an NVMe disk) is refused rather than taken from the host. The plan
//! says which devices to bind (and what to bind them back to on release), which `-device
//! vfio-pci,host=…` arguments QEMU gets (the GPU and its audio function), and the NUMA node to
//! keep the guest's memory on.

use std::collections::BTreeMap;
use std::path::Path;

/// PCI class codes (the upper 16 bits of sysfs `class`: base class and subclass).
const CLASS_DISPLAY: u32 = 0x03;
const CLASS_PCI_BRIDGE: u32 = 0x0604;
const CLASS_HOST_BRIDGE: u32 = 0x0600;
pub const VFIO_DRIVER: &str = "vfio-pci";

/// One PCI device as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// `0000:3b:00.0`, lowercase.
    pub address: String,
    /// sysfs `class`, e.g. 0x030200 (3D controller).
    pub class: u32,
    /// The bound driver's name, if any.
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// `None` when sysfs says -1 (no NUMA information).
    pub numa_node: Option<u32>,
}

impl PciDevice {
    fn class16(&self) -> u32 {
        self.class >> 8
    }
    fn is_bridge(&self) -> bool {
        matches!(self.class16(), CLASS_PCI_BRIDGE | CLASS_HOST_BRIDGE)
    }
    fn is_display(&self) -> bool {
        self.class >> 16 == CLASS_DISPLAY
    }
    /// `0000:3b:00` — the device without its function.
    fn slot(&self) -> &str {
        self.address
            .rsplit_once('.')
            .map(|(s, _)| s)
            .unwrap_or(&self.address)
    }
}

/// What sysfs says about PCI devices and IOMMU groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SysfsSnapshot {
    /// Whether the kernel has IOMMU groups at all (`/sys/kernel/iommu_groups` not empty).
    pub iommu_enabled: bool,
    pub devices: BTreeMap<String, PciDevice>,
}

/// Why a GPU cannot be passed through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassthroughError {
    #[error(
        "the host has no IOMMU enabled (no IOMMU groups): enable VT-d/AMD-Vi and boot with intel_iommu=on or amd_iommu=on"
    )]
    NoIommu,
    #[error("GPU {uuid}: no PCI bus id is known for it")]
    UnknownGpu { uuid: String },
    #[error("GPU {uuid}: the PCI device {address} is not on this host")]
    DeviceMissing { uuid: String, address: String },
    #[error("GPU {uuid}: the device {address} is not a display controller (class {class:#08x})")]
    NotAGpu {
        uuid: String,
        address: String,
        class: u32,
    },
    #[error("GPU {uuid}: the device {address} is in no IOMMU group")]
    NoIommuGroup { uuid: String, address: String },
    #[error(
        "GPU {uuid}: IOMMU group {group} is not viable: {other} (class {class:#08x}, driver {driver}) shares it and is neither the GPU's function, a bridge nor bound to vfio-pci"
    )]
    GroupNotViable {
        uuid: String,
        group: u32,
        other: String,
        class: u32,
        driver: String,
    },
}

/// One device to bind to `vfio-pci`, and the driver to give it back to on release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebind {
    pub address: String,
    pub original_driver: Option<String>,
}

/// The plan for an instance's GPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassthroughPlan {
    /// Devices to bind to vfio-pci now (those already bound are not listed).
    pub bind: Vec<Rebind>,
    /// Host addresses QEMU gets as `-device vfio-pci,host=…`: each GPU and its audio function.
    pub vfio_hosts: Vec<String>,
    /// The NUMA node of the GPUs when they all share one.
    pub numa_node: Option<u32>,
}

/// `00000000:3B:00.0` (NVML) or `0000:3b:00.0` (sysfs) → `0000:3b:00.0`.
pub fn normalize_address(bus_id: &str) -> String {
    let lower = bus_id.trim().to_ascii_lowercase();
    match lower.split_once(':') {
        Some((domain, rest)) if domain.len() > 4 => {
            format!("{}:{rest}", &domain[domain.len() - 4..])
        }
        _ => lower,
    }
}

/// Plans passing `gpus` (UUID → PCI bus id, `None` when unknown) through, or says why not.
pub fn plan(
    snapshot: &SysfsSnapshot,
    gpus: &[(String, Option<String>)],
) -> Result<PassthroughPlan, PassthroughError> {
    let mut out = PassthroughPlan::default();
    if gpus.is_empty() {
        return Ok(out);
    }
    if !snapshot.iommu_enabled {
        return Err(PassthroughError::NoIommu);
    }
    let mut numa: Vec<Option<u32>> = Vec::new();
    for (uuid, bus_id) in gpus {
        let address = normalize_address(
            bus_id
                .as_deref()
                .ok_or(PassthroughError::UnknownGpu { uuid: uuid.clone() })?,
        );
        let gpu =
            snapshot
                .devices
                .get(&address)
                .ok_or_else(|| PassthroughError::DeviceMissing {
                    uuid: uuid.clone(),
                    address: address.clone(),
                })?;
        if !gpu.is_display() {
            return Err(PassthroughError::NotAGpu {
                uuid: uuid.clone(),
                address,
                class: gpu.class,
            });
        }
        let group = gpu
            .iommu_group
            .ok_or_else(|| PassthroughError::NoIommuGroup {
                uuid: uuid.clone(),
                address: address.clone(),
            })?;
        numa.push(gpu.numa_node);
        out.vfio_hosts.push(address.clone());
        for member in snapshot
            .devices
            .values()
            .filter(|d| d.iommu_group == Some(group))
        {
            let own_function = member.slot() == gpu.slot();
            if member.address != gpu.address {
                if member.is_bridge() {
                    continue;
                }
                let bound = member.driver.as_deref() == Some(VFIO_DRIVER);
                if own_function {
                    // The card's other functions (audio, USB-C) go to the VM with it.
                    out.vfio_hosts.push(member.address.clone());
                } else if !(own_function || bound) {
                    return Err(PassthroughError::GroupNotViable {
                        uuid: uuid.clone(),
                        group,
                        other: member.address.clone(),
                        class: member.class,
                        driver: member.driver.clone().unwrap_or_else(|| "none".into()),
                    });
                }
            }
            if member.driver.as_deref() != Some(VFIO_DRIVER)
                && !out.bind.iter().any(|b| b.address == member.address)
            {
                out.bind.push(Rebind {
                    address: member.address.clone(),
                    original_driver: member.driver.clone(),
                });
            }
        }
    }
    out.numa_node = match numa.first() {
        Some(Some(first)) if numa.iter().all(|n| *n == Some(*first)) => Some(*first),
        _ => None,
    };
    Ok(out)
}

/// Reads `root` (`/sys` on a host) into a snapshot: `bus/pci/devices/*/{class, numa_node,
/// driver, iommu_group}` and whether `kernel/iommu_groups` has any group.
pub fn read_sysfs(root: &Path) -> std::io::Result<SysfsSnapshot> {
    let iommu_enabled = std::fs::read_dir(root.join("kernel/iommu_groups"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    let mut devices = BTreeMap::new();
    let dir = root.join("bus/pci/devices");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(SysfsSnapshot {
                iommu_enabled,
                devices,
            });
        }
        Err(e) => return Err(e),
    };
    let link_name = |p: &Path| -> Option<String> {
        std::fs::read_link(p)
            .ok()?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    };
    for entry in entries {
        let entry = entry?;
        let address = entry.file_name().to_string_lossy().to_ascii_lowercase();
        let path = entry.path();
        let read = |name: &str| {
            std::fs::read_to_string(path.join(name))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let class =
            u32::from_str_radix(read("class").trim_start_matches("0x"), 16).unwrap_or_default();
        let numa_node = read("numa_node")
            .parse::<i64>()
            .ok()
            .and_then(|n| if n < 0 { None } else { u32::try_from(n).ok() });
        devices.insert(
            address.clone(),
            PciDevice {
                address,
                class,
                driver: link_name(&path.join("driver")),
                iommu_group: link_name(&path.join("iommu_group")).and_then(|g| g.parse().ok()),
                numa_node,
            },
        );
    }
    Ok(SysfsSnapshot {
        iommu_enabled,
        devices,
    })
}

/// Binds the plan's devices to vfio-pci (`driver_override`, unbind, `drivers_probe`).
pub fn bind(root: &Path, plan: &PassthroughPlan) -> std::io::Result<()> {
    for d in &plan.bind {
        set_driver(root, &d.address, Some(VFIO_DRIVER))?;
    }
    Ok(())
}

/// Gives the plan's devices back to the drivers they had.
pub fn release(root: &Path, plan: &PassthroughPlan) -> std::io::Result<()> {
    for d in &plan.bind {
        set_driver(root, &d.address, None)?;
    }
    Ok(())
}

fn set_driver(root: &Path, address: &str, driver: Option<&str>) -> std::io::Result<()> {
    let dev = root.join("bus/pci/devices").join(address);
    // An empty override hands the device back to whichever driver matches it.
    std::fs::write(dev.join("driver_override"), driver.unwrap_or("\n"))?;
    if dev.join("driver").exists() {
        std::fs::write(dev.join("driver/unbind"), address)?;
    }
    std::fs::write(root.join("bus/pci/drivers_probe"), address)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(address: &str, class: u32, driver: Option<&str>, group: u32) -> PciDevice {
        PciDevice {
            address: address.into(),
            class,
            driver: driver.map(str::to_owned),
            iommu_group: Some(group),
            numa_node: Some(1),
        }
    }

    fn snapshot(devs: Vec<PciDevice>) -> SysfsSnapshot {
        SysfsSnapshot {
            iommu_enabled: true,
            devices: devs.into_iter().map(|d| (d.address.clone(), d)).collect(),
        }
    }

    fn gpu(uuid: &str, bus: &str) -> (String, Option<String>) {
        (uuid.into(), Some(bus.into()))
    }

    #[test]
    fn a_gpu_goes_with_its_audio_function_and_bridges_stay() {
        let s = snapshot(vec![
            dev("0000:3a:00.0", 0x060400, Some("pcieport"), 7),
            dev("0000:3b:00.0", 0x030000, Some("nvidia"), 7),
            dev("0000:3b:00.1", 0x040300, Some("snd_hda_intel"), 7),
            dev("0000:5e:00.0", 0x020000, Some("ixgbe"), 9),
        ]);
        let p = plan(&s, &[gpu("GPU-a", "00000000:3B:00.0")]).unwrap();
        assert_eq!(p.vfio_hosts, ["0000:3b:00.0", "0000:3b:00.1"]);
        assert_eq!(
            p.bind,
            [
                Rebind {
                    address: "0000:3b:00.0".into(),
                    original_driver: Some("nvidia".into())
                },
                Rebind {
                    address: "0000:3b:00.1".into(),
                    original_driver: Some("snd_hda_intel".into())
                },
            ]
        );
        assert_eq!(p.numa_node, Some(1));
    }

    #[test]
    fn devices_already_on_vfio_are_not_bound_again() {
        let s = snapshot(vec![
            dev("0000:3b:00.0", 0x030200, Some(VFIO_DRIVER), 7),
            dev("0000:3c:00.0", 0x010802, Some(VFIO_DRIVER), 7),
        ]);
        let p = plan(&s, &[gpu("GPU-a", "0000:3b:00.0")]).unwrap();
        assert!(p.bind.is_empty());
        assert_eq!(p.vfio_hosts, ["0000:3b:00.0"]);
    }

    #[test]
    fn a_group_shared_with_another_device_is_refused() {
        let s = snapshot(vec![
            dev("0000:3b:00.0", 0x030000, Some("nvidia"), 7),
            dev("0000:3c:00.0", 0x010802, Some("nvme"), 7),
        ]);
        let err = plan(&s, &[gpu("GPU-a", "0000:3b:00.0")]).unwrap_err();
        assert_eq!(
            err,
            PassthroughError::GroupNotViable {
                uuid: "GPU-a".into(),
                group: 7,
                other: "0000:3c:00.0".into(),
                class: 0x010802,
                driver: "nvme".into()
            }
        );
        assert!(err.to_string().contains("IOMMU group 7 is not viable"));
    }

    #[test]
    fn refusals_say_why() {
        let s = snapshot(vec![
            dev("0000:3b:00.0", 0x030000, None, 7),
            dev("0000:5e:00.0", 0x020000, Some("ixgbe"), 9),
        ]);
        let no_iommu = SysfsSnapshot {
            iommu_enabled: false,
            ..s.clone()
        };
        assert_eq!(
            plan(&no_iommu, &[gpu("GPU-a", "0000:3b:00.0")]),
            Err(PassthroughError::NoIommu)
        );
        assert!(matches!(
            plan(&s, &[gpu("GPU-b", "0000:99:00.0")]),
            Err(PassthroughError::DeviceMissing { .. })
        ));
        assert!(matches!(
            plan(&s, &[("GPU-c".into(), None)]),
            Err(PassthroughError::UnknownGpu { .. })
        ));
        assert!(matches!(
            plan(&s, &[gpu("GPU-d", "0000:5e:00.0")]),
            Err(PassthroughError::NotAGpu { .. })
        ));
        let mut ungrouped = s.clone();
        ungrouped
            .devices
            .get_mut("0000:3b:00.0")
            .unwrap()
            .iommu_group = None;
        assert!(matches!(
            plan(&ungrouped, &[gpu("GPU-a", "0000:3b:00.0")]),
            Err(PassthroughError::NoIommuGroup { .. })
        ));
        // No GPUs: nothing to plan, whatever the host.
        assert_eq!(plan(&no_iommu, &[]), Ok(PassthroughPlan::default()));
    }

    #[test]
    fn gpus_on_different_numa_nodes_are_not_pinned() {
        let mut b = dev("0000:86:00.0", 0x030200, None, 8);
        b.numa_node = Some(0);
        let s = snapshot(vec![dev("0000:3b:00.0", 0x030200, None, 7), b]);
        let p = plan(
            &s,
            &[gpu("GPU-a", "0000:3b:00.0"), gpu("GPU-b", "0000:86:00.0")],
        )
        .unwrap();
        assert_eq!(p.numa_node, None);
        assert_eq!(p.vfio_hosts.len(), 2);
    }

    #[test]
    fn addresses_are_normalized() {
        assert_eq!(normalize_address("00000000:3B:00.0"), "0000:3b:00.0");
        assert_eq!(normalize_address("0000:3b:00.1"), "0000:3b:00.1");
    }

    /// A fake sysfs tree, as the kernel lays it out (symlinks for driver and iommu_group).
    #[test]
    fn the_reader_and_binder_work_on_a_sysfs_tree() {
        use std::os::unix::fs::symlink;
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let devices = root.join("bus/pci/devices");
        std::fs::create_dir_all(root.join("kernel/iommu_groups/7/devices")).unwrap();
        std::fs::create_dir_all(root.join("bus/pci/drivers/nvidia")).unwrap();
        for (addr, class, driver, numa) in [
            ("0000:3b:00.0", "0x030200", Some("nvidia"), "1"),
            ("0000:3b:00.1", "0x040300", None, "-1"),
        ] {
            let d = devices.join(addr);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("class"), format!("{class}\n")).unwrap();
            std::fs::write(d.join("numa_node"), format!("{numa}\n")).unwrap();
            symlink(root.join("kernel/iommu_groups/7"), d.join("iommu_group")).unwrap();
            if let Some(driver) = driver {
                symlink(root.join("bus/pci/drivers").join(driver), d.join("driver")).unwrap();
            }
        }
        let s = read_sysfs(root).unwrap();
        assert!(s.iommu_enabled);
        let g = &s.devices["0000:3b:00.0"];
        assert_eq!(g.class, 0x030200);
        assert_eq!(g.driver.as_deref(), Some("nvidia"));
        assert_eq!(g.iommu_group, Some(7));
        assert_eq!(g.numa_node, Some(1));
        assert_eq!(s.devices["0000:3b:00.1"].numa_node, None);
        assert_eq!(s.devices["0000:3b:00.1"].driver, None);

        let p = plan(&s, &[gpu("GPU-a", "0000:3b:00.0")]).unwrap();
        assert_eq!(p.bind.len(), 2);
        bind(root, &p).unwrap();
        assert_eq!(
            std::fs::read_to_string(devices.join("0000:3b:00.0/driver_override")).unwrap(),
            VFIO_DRIVER
        );
        assert_eq!(
            std::fs::read_to_string(root.join("bus/pci/drivers/nvidia/unbind")).unwrap(),
            "0000:3b:00.0"
        );
        release(root, &p).unwrap();
        assert_eq!(
            std::fs::read_to_string(devices.join("0000:3b:00.1/driver_override")).unwrap(),
            "\n"
        );
        // A host without PCI devices or IOMMU groups reads as such.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(read_sysfs(empty.path()).unwrap(), SysfsSnapshot::default());
    }
}
