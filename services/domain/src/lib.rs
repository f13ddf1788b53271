//! Kiln's domain vocabulary, shared by every control-plane crate.
//!
//! Everything here is plain data and pure functions: typed identifiers with their public
//! prefixes (`org_…`), inputs parsed into validated types at the edge (`Email`, `Password`,
//! `OrgName`), and the one permission table that says what each org role may do. No crate
//! below the HTTP/GraphQL edge ever handles a bare `Uuid` or an unvalidated string.

pub mod ids;
pub mod inputs;
pub mod node;
pub mod roles;
pub mod workload;

pub use ids::{
    ApiKeyId, AssignmentId, EndpointId, IdParseError, InstanceId, InvoiceId, NodeId, NodeTokenId,
    OrgId, PodId, PostingId, PriceVersionId, SessionId, UserId, WorkloadId,
};
pub use inputs::{ApiKeyName, Email, InputError, OrgName, Password, PersonName};
pub use node::{AdminState, Liveness, LivenessPolicy, NodeState, NodeStateParseError};
pub use roles::{Permission, Role, RoleParseError};
pub use workload::{ImageRef, WorkloadName, env_key_problem};
