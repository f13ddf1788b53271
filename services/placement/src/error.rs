//! Errors: a request the core cannot even consider, or a snapshot that contradicts itself.
//! "Does not fit now" is not an error; it is [`crate::Decision::Unschedulable`].

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlacementError {
    #[error("GPU type {gpu_type} has no MIG geometry; MIG work can be placed on {supported}")]
    NoMigGeometry { gpu_type: String, supported: String },

    #[error("{profile} is not a MIG profile of {gpu_type}; valid profiles are {valid}")]
    UnknownMigProfile {
        gpu_type: String,
        profile: String,
        valid: String,
    },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// The snapshot (or a placement applied to it) breaks an invariant: a GPU or slice would be
    /// held twice, a MIG slice sits at an invalid position, an allocation is unknown, …
    #[error("inconsistent snapshot: {0}")]
    Inconsistent(String),
}
