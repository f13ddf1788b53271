//! Org roles and the permission table: the one place that says who may do what in an org.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A member's (or API key's) role in one org. Ordered by power: `Viewer < Member < Admin < Owner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Member,
    Admin,
    Owner,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role `{0}` (expected owner, admin, member or viewer)")]
pub struct RoleParseError(pub String);

impl Role {
    pub const ALL: [Role; 4] = [Role::Owner, Role::Admin, Role::Member, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Viewer => "viewer",
        }
    }

    /// Whether this role may do `permission`. The whole policy is this match.
    pub fn allows(self, permission: Permission) -> bool {
        use Permission::*;
        let least = match permission {
            OrgRead | MemberRead | WorkloadRead | BillingRead => Role::Viewer,
            ApiKeyRead | ApiKeyCreate | WorkloadWrite => Role::Member,
            OrgUpdate | MemberManage | ApiKeyRevokeAny | AuditRead => Role::Admin,
            OwnerManage | OrgDelete | BillingManage => Role::Owner,
        };
        self >= least
    }

    /// Whether someone holding `self` may hand `granted` to a member or an API key.
    /// Nobody grants more than they hold, and only owners make owners.
    pub fn may_grant(self, granted: Role) -> bool {
        granted <= self && (granted != Role::Owner || self == Role::Owner)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = RoleParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "owner" => Ok(Role::Owner),
            "admin" => Ok(Role::Admin),
            "member" => Ok(Role::Member),
            "viewer" => Ok(Role::Viewer),
            other => Err(RoleParseError(other.to_owned())),
        }
    }
}

/// Something a principal may want to do inside one org.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// See the org itself.
    OrgRead,
    /// Rename the org.
    OrgUpdate,
    /// Delete the org.
    OrgDelete,
    /// List members.
    MemberRead,
    /// Add, re-role and remove non-owner members.
    MemberManage,
    /// Add, promote or demote owners.
    OwnerManage,
    /// List API keys.
    ApiKeyRead,
    /// Create API keys (with a role no higher than the creator's).
    ApiKeyCreate,
    /// Revoke API keys that someone else created.
    ApiKeyRevokeAny,
    /// Read the audit log.
    AuditRead,
    /// See instances, pods and endpoints.
    WorkloadRead,
    /// Create, change and delete instances, pods and endpoints.
    WorkloadWrite,
    /// See balance, usage, ledger and invoices.
    BillingRead,
    /// Change billing settings.
    BillingManage,
}

impl Permission {
    pub const ALL: [Permission; 14] = [
        Permission::OrgRead,
        Permission::OrgUpdate,
        Permission::OrgDelete,
        Permission::MemberRead,
        Permission::MemberManage,
        Permission::OwnerManage,
        Permission::ApiKeyRead,
        Permission::ApiKeyCreate,
        Permission::ApiKeyRevokeAny,
        Permission::AuditRead,
        Permission::WorkloadRead,
        Permission::WorkloadWrite,
        Permission::BillingRead,
        Permission::BillingManage,
    ];

    /// True for permissions that only read.
    pub fn is_read(self) -> bool {
        matches!(
            self,
            Permission::OrgRead
                | Permission::MemberRead
                | Permission::ApiKeyRead
                | Permission::AuditRead
                | Permission::WorkloadRead
                | Permission::BillingRead
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_only_read_and_cannot_even_read_keys_or_audit() {
        for p in Permission::ALL {
            let expected =
                p.is_read() && !matches!(p, Permission::ApiKeyRead | Permission::AuditRead);
            assert_eq!(Role::Viewer.allows(p), expected, "{p:?}");
        }
    }

    #[test]
    fn powers_are_monotonic_in_role() {
        for p in Permission::ALL {
            let mut seen = false;
            for r in [Role::Viewer, Role::Member, Role::Admin, Role::Owner] {
                if seen {
                    assert!(r.allows(p), "{r} lost {p:?} that a lesser role had");
                }
                seen |= r.allows(p);
            }
            assert!(Role::Owner.allows(p), "owner must be able to do {p:?}");
        }
    }

    #[test]
    fn only_owners_make_owners_and_nobody_grants_above_themselves() {
        assert!(Role::Owner.may_grant(Role::Owner));
        assert!(!Role::Admin.may_grant(Role::Owner));
        assert!(Role::Admin.may_grant(Role::Admin));
        assert!(!Role::Member.may_grant(Role::Admin));
        assert!(Role::Member.may_grant(Role::Viewer));
    }

    #[test]
    fn parses_its_own_names_only() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("Owner".parse::<Role>().is_err());
        assert!("root".parse::<Role>().is_err());
    }
}
