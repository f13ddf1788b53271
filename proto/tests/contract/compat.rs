//! "An agent of a newer or older minor version still works": messages written by a peer that
//! knows more (or fewer) fields, enum values or oneof cases decode without error.

use kiln_proto::node::v1::{
    AssignmentEvent, GpuHealth, HeartbeatRequest, PROTOCOL_VERSION, ProtocolVersion,
    assignment_event,
};
use prost::Message;

/// `HeartbeatRequest` as a future minor version might define it: every field of today's, plus
/// new ones (a scalar, a string and a nested message) under fresh field numbers.
#[derive(Clone, PartialEq, Message)]
struct HeartbeatRequestNext {
    #[prost(string, tag = "1")]
    node_id: String,
    #[prost(int64, tag = "2")]
    sent_at_unix_ms: i64,
    #[prost(uint64, tag = "3")]
    last_applied_revision: u64,
    #[prost(uint64, tag = "5")]
    uptime_s: u64,
    #[prost(string, tag = "40")]
    kernel_version: String,
    #[prost(message, optional, tag = "41")]
    agent_protocol: Option<ProtocolVersion>,
}

/// `HeartbeatRequest` as an older minor version might have defined it: only the first field.
#[derive(Clone, PartialEq, Message)]
struct HeartbeatRequestOld {
    #[prost(string, tag = "1")]
    node_id: String,
}

#[test]
fn a_message_from_a_newer_minor_version_decodes_ignoring_unknown_fields() {
    let newer = HeartbeatRequestNext {
        node_id: "node_0190".into(),
        sent_at_unix_ms: 1_700_000_000_000,
        last_applied_revision: 42,
        uptime_s: 3600,
        kernel_version: "6.8.0".into(),
        agent_protocol: Some(ProtocolVersion { major: 1, minor: 7 }),
    };
    let decoded = HeartbeatRequest::decode(newer.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded.node_id, "node_0190");
    assert_eq!(decoded.sent_at_unix_ms, 1_700_000_000_000);
    assert_eq!(decoded.last_applied_revision, 42);
    assert!(decoded.gpu_health.is_empty());
}

#[test]
fn a_message_from_an_older_minor_version_decodes_with_defaults() {
    let older = HeartbeatRequestOld {
        node_id: "node_0190".into(),
    };
    let decoded = HeartbeatRequest::decode(older.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded.node_id, "node_0190");
    assert_eq!(decoded.last_applied_revision, 0);
    assert!(decoded.gpu_health.is_empty());
    // And the other way round: today's message decodes as the older one.
    let today = HeartbeatRequest {
        node_id: "node_0190".into(),
        last_applied_revision: 9,
        ..Default::default()
    };
    let old = HeartbeatRequestOld::decode(today.encode_to_vec().as_slice()).unwrap();
    assert_eq!(old.node_id, "node_0190");
}

/// A `GpuHealthStatus` written by hand: field 1 (uuid) and field 2 (health) with an enum value
/// this version has never heard of.
#[test]
fn an_unknown_enum_value_reads_as_unspecified() {
    #[derive(Clone, PartialEq, Message)]
    struct GpuHealthStatusNext {
        #[prost(string, tag = "1")]
        uuid: String,
        #[prost(int32, tag = "2")]
        health: i32,
    }
    let bytes = GpuHealthStatusNext {
        uuid: "GPU-1".into(),
        health: 42,
    }
    .encode_to_vec();
    let decoded = kiln_proto::node::v1::GpuHealthStatus::decode(bytes.as_slice()).unwrap();
    assert_eq!(decoded.health, 42, "the raw value is kept");
    assert_eq!(decoded.health(), GpuHealth::Unspecified);
}

#[test]
fn an_unknown_oneof_case_decodes_as_no_event() {
    #[derive(Clone, PartialEq, Message)]
    struct AssignmentEventNext {
        #[prost(uint64, tag = "1")]
        revision: u64,
        // A future event kind.
        #[prost(message, optional, tag = "7")]
        bookmark: Option<ProtocolVersion>,
    }
    let bytes = AssignmentEventNext {
        revision: 12,
        bookmark: Some(ProtocolVersion::default()),
    }
    .encode_to_vec();
    let decoded = AssignmentEvent::decode(bytes.as_slice()).unwrap();
    assert_eq!(decoded.revision, 12);
    assert!(decoded.event.is_none());
    // A known case still decodes as itself.
    let known = AssignmentEvent {
        revision: 13,
        event: Some(assignment_event::Event::Remove(Default::default())),
    };
    let decoded = AssignmentEvent::decode(known.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, known);
}

#[test]
fn same_major_versions_are_compatible_whatever_the_minor() {
    let newer = ProtocolVersion {
        major: PROTOCOL_VERSION.major,
        minor: PROTOCOL_VERSION.minor + 3,
    };
    let next_major = ProtocolVersion {
        major: PROTOCOL_VERSION.major + 1,
        minor: 0,
    };
    assert!(PROTOCOL_VERSION.is_compatible_with(&newer));
    assert!(newer.is_compatible_with(&PROTOCOL_VERSION));
    assert!(!PROTOCOL_VERSION.is_compatible_with(&next_major));
    assert_eq!(PROTOCOL_VERSION.to_string(), "1.4");
}
