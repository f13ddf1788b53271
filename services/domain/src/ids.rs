//! Typed identifiers. On the wire an ID is `<prefix>_<32 hex digits>` (a UUIDv7, so IDs sort by
//! creation time and make good list cursors); inside Kiln it is a newtype over `Uuid`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why a string is not an ID of the expected type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {kind} id (expected `{prefix}_` followed by 32 hex digits)")]
pub struct IdParseError {
    pub kind: &'static str,
    pub prefix: &'static str,
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new, time-ordered ID.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}_{}", $prefix, self.0.simple())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let err = IdParseError { kind: $kind, prefix: $prefix };
                let rest = s
                    .strip_prefix($prefix)
                    .and_then(|r| r.strip_prefix('_'))
                    .ok_or_else(|| err.clone())?;
                if rest.len() != 32 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(err);
                }
                Uuid::parse_str(rest).map(Self).map_err(|_| err)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

typed_id!(/// An organisation (a tenant).
    OrgId, "org", "org");
typed_id!(/// A person who signs in.
    UserId, "usr", "user");
typed_id!(/// An API key (the id, never the secret).
    ApiKeyId, "key", "api key");
typed_id!(/// A sign-in session: one refresh-token family.
    SessionId, "ses", "session");
typed_id!(/// A GPU host that joined the fleet.
    NodeId, "node", "node");
typed_id!(/// A one-time node bootstrap token (the id, never the secret).
    NodeTokenId, "ntk", "node token");
typed_id!(/// One piece of work (a pod or an instance) placed on a node, as its agent sees it.
    AssignmentId, "asg", "assignment");
typed_id!(/// A unit of work the scheduler places (a pod, an instance or an endpoint replica); the
    /// public API names it by kind (`pod_…`, `ins_…`) with the same UUID.
    WorkloadId, "wl", "workload");
typed_id!(/// A tenant's pod: a workload of kind `pod`, with the same UUID as its workload row.
    PodId, "pod", "pod");
typed_id!(/// A tenant's instance (a VM): a workload of kind `instance`, with the same UUID as its
    /// workload row.
    InstanceId, "ins", "instance");
typed_id!(/// A tenant's endpoint: a model server behind the gateway, run as replicas.
    EndpointId, "ep", "endpoint");

typed_id!(/// One posting of the billing ledger (a charge, a top-up, a promotional grant …).
    PostingId, "txn", "ledger posting");
typed_id!(/// A monthly invoice of an org.
    InvoiceId, "inv", "invoice");
typed_id!(/// A version of the price catalog.
    PriceVersionId, "prc", "price version");

impl From<InstanceId> for WorkloadId {
    fn from(i: InstanceId) -> Self {
        WorkloadId::from_uuid(i.as_uuid())
    }
}

impl From<PodId> for WorkloadId {
    fn from(p: PodId) -> Self {
        WorkloadId::from_uuid(p.as_uuid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_string_form() {
        let id = OrgId::new();
        let s = id.to_string();
        assert!(s.starts_with("org_"));
        assert_eq!(s.len(), 4 + 32);
        assert_eq!(s.parse::<OrgId>().unwrap(), id);
    }

    #[test]
    fn refuses_another_types_prefix_and_garbage() {
        let user = UserId::new().to_string();
        assert!(user.parse::<OrgId>().is_err());
        assert!("org_".parse::<OrgId>().is_err());
        assert!("org_zz".parse::<OrgId>().is_err());
        assert!(
            "org_0123456789abcdef0123456789abcdeg"
                .parse::<OrgId>()
                .is_err()
        );
        assert!(
            "org-0123456789abcdef0123456789abcdef"
                .parse::<OrgId>()
                .is_err()
        );
        assert!(
            "org_0123456789abcdef0123456789abcdef"
                .parse::<OrgId>()
                .is_ok()
        );
    }

    #[test]
    fn new_ids_sort_by_creation() {
        let a = OrgId::new();
        let b = OrgId::new();
        assert!(a < b);
    }
}
