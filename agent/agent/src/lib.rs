//! `kiln-agent`, the Kiln node agent: one per GPU host.
//!
//! It dials out to the control plane's `NodeControl` gRPC service (no inbound port on the host),
//! joins once with an operator's bootstrap token and keeps the node credential it gets
//! (`<state_dir>/credential.json`, 0600), then in every session registers the host's GPUs
//! (from [`kiln_inventory`]: NVML, or a declared simulated inventory), heartbeats with per-GPU
//! health, streams GPU metrics, and applies the assignment events of its node's resumable stream,
//! persisting the applied revision (`<state_dir>/state.json`) before acknowledging it so that a
//! restart neither misses nor replays an event.
//!
//! * [`config`] — the TOML file and the flags that override it.
//! * [`credential`] — the node credential on disk.
//! * [`state`] — the applied state and the pure rules for applying an event.
//! * [`backoff`] — reconnect backoff with full jitter and the stuck-stream check.
//! * [`convert`] — inventory and samples to wire messages.
//! * [`load`] — what is placed on each GPU, for the GPU source.
//! * [`runtime`] — the `Runtime` trait, the placeholder, and the per-kind dispatch.
//! * [`docker`] — pods as Docker containers.
//! * [`qemu`] — instances as QEMU VMs (QMP, cloud-init seed, qcow2 overlays, VFIO planning).
//! * [`agent`] — start-up, joining and the session loop.

pub mod agent;
pub mod backoff;
pub mod capacity;
pub mod config;
pub mod convert;
pub mod credential;
pub mod docker;
mod fsutil;
pub mod load;
pub mod logs;
pub mod qemu;
pub mod runtime;
pub mod state;

pub use agent::{AgentError, Outcome, Shutdown, run};
pub use config::Config;

/// Exit code: stopped on request (SIGTERM/SIGINT).
pub const EXIT_STOPPED: u8 = 0;
/// Exit code: an unexpected failure (the async runtime or signal handlers could not start).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: refused to start (bad configuration, no usable GPU source, no credential and no
/// bootstrap token, a refused token, a credential file readable by others, an unreadable state).
pub const EXIT_REFUSED: u8 = 2;
/// Exit code: the control plane rejected the node credential (revoked, or the node retired).
pub const EXIT_REVOKED: u8 = 3;
