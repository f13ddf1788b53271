//! The contract between a node agent and the control plane: gRPC over tonic, messages in protobuf.
//!
//! The source of truth is the `.proto` files under `proto/kiln/`; the Rust beside them in
//! `src/gen/` is generated from them and checked in, so building this crate needs neither `protoc`
//! nor a build script. The `contract` test regenerates the code (pure Rust: `protox` and
//! `tonic-prost-build`) and fails when the checked-in copy has drifted; rerun it with
//! `UPDATE_SNAPSHOTS=1` to accept a change to a `.proto` file.
//!
//! Agents dial out: the agent is the client ([`node::v1::node_control_client`]) and the control
//! plane serves [`node::v1::node_control_server`]. The compatibility rules (same major version
//! works, fields are only ever added) are written at the top of `node.proto`.

pub mod node {
    /// `kiln.node.v1`: joining, inventory, heartbeats, metrics, assignments and observed state.
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]

        include!("gen/kiln.node.v1.rs");

        /// The protocol version this build speaks. Bump `minor` for every additive change to
        /// `kiln.node.v1`; a breaking change is a new package, never a new major here.
        pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion { major: 1, minor: 4 };

        impl ProtocolVersion {
            /// Whether a peer speaking `other` can talk to one speaking `self`: the same major
            /// version, whatever the minor versions.
            pub fn is_compatible_with(&self, other: &ProtocolVersion) -> bool {
                self.major == other.major
            }
        }

        impl std::fmt::Display for ProtocolVersion {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}.{}", self.major, self.minor)
            }
        }
    }
}

/// How a node credential travels: `authorization: Bearer <credential>` in the gRPC metadata of
/// every call but `Join`.
pub mod auth {
    use tonic::metadata::{AsciiMetadataValue, MetadataMap, errors::InvalidMetadataValue};

    /// The metadata key carrying the node credential.
    pub const AUTHORIZATION: &str = "authorization";

    const BEARER: &str = "Bearer ";

    /// The metadata value for a node credential.
    pub fn bearer(credential: &str) -> Result<AsciiMetadataValue, InvalidMetadataValue> {
        format!("{BEARER}{credential}").parse()
    }

    /// The node credential a request carries, if it carries one in the expected form.
    pub fn credential(metadata: &MetadataMap) -> Option<&str> {
        let value = metadata.get(AUTHORIZATION)?.to_str().ok()?;
        let credential = value.strip_prefix(BEARER)?.trim();
        (!credential.is_empty()).then_some(credential)
    }
}
