//! Instance fixtures for tests of the tenant surfaces (CLI, GraphQL, console) without agents:
//! a catalog image as an operator would add it, a valid SSH key, and the report an agent sends
//! once a VM is up with its SSH port forwarded.

use kiln_domain::NodeId;
use kiln_store::{ObservedRecord, Store, VmImageFields};
use serde_json::json;

/// A valid OpenSSH ed25519 public key (its private half was thrown away).
pub const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6g1EstSOloEsw6B7RZmpmLfXXEVREzR+PLntGMBjnh ada@laptop";

/// Put the active image `name` (login user `root`, at least 1 GiB of disk) in the catalog, as
/// an operator's `PUT /v1/admin/images/{name}` does.
pub async fn catalog_image(store: &Store, name: &str) {
    let mut tx = store.begin().await.unwrap();
    store
        .vm_image_put(
            &mut tx,
            name,
            &VmImageFields {
                description: "A tiny test guest",
                kernel: "/var/lib/kiln/images/tiny/vmlinuz",
                initrd: "/var/lib/kiln/images/tiny/initrd.img",
                disk: "",
                kernel_args: "console=ttyS0",
                login_user: "root",
                min_disk_gib: 1,
                status: "active",
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// What `node`'s agent reports once every instance placed there is running with the guest's
/// port 22 forwarded to `ssh_port` on the host (as `ReportObserved` records it).
pub async fn report_running(store: &Store, node: NodeId, ssh_port: i64) {
    let assignments = store.assignment_list(node).await.unwrap();
    let revision = assignments
        .iter()
        .map(|a| u64::try_from(a.revision).unwrap_or_default())
        .max()
        .unwrap_or_default();
    let rows: Vec<ObservedRecord> = assignments
        .iter()
        .map(|a| ObservedRecord {
            assignment_id: a.id,
            generation: a.generation,
            state: "running",
            reason: "the VM is up".into(),
            exit_code: None,
            ports: json!([{"port": 22, "protocol": "tcp", "host_port": ssh_port}]),
            observed_at: time::OffsetDateTime::now_utc(),
            runtime_ms: 0,
        })
        .collect();
    store
        .observed_report(node, revision, &rows, false)
        .await
        .unwrap();
}
