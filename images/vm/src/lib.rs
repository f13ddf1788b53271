//! Kiln's tiny VM guest image. The image itself is built by `scripts/build-vm-image.sh`; this
//! crate holds its contract (see `README.md`) and the test that boots it under QEMU TCG and logs
//! in over SSH (`tests/boot.rs`).

use std::path::PathBuf;

/// The console line the guest prints once its SSH server runs.
pub const READY_LINE: &str = "kiln-guest: ready";

/// The script that builds the image (kernel + initramfs) into a cache directory.
pub fn build_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-vm-image.sh")
}
