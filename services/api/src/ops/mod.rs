//! The operations behind every surface. REST handlers, GraphQL resolvers and console pages are
//! thin adapters over these functions, so authorisation and validation have one code path.
//!
//! Creating operations take the transaction they run in (`&mut PgConnection`) so the REST layer
//! can claim an `Idempotency-Key` in the same transaction.

pub mod api_keys;
pub mod audit;
pub mod billing;
pub mod catalog;
pub mod endpoints;
pub mod fleet;
pub mod identity;
pub mod images;
pub mod instances;
pub mod orgs;
pub mod pods;
pub mod quotas;

use kiln_domain::{OrgId, UserId};
use kiln_store::PageRequest;

use crate::error::{ApiError, FieldError};

/// Parse an org id from a path: anything malformed is simply an org that does not exist.
pub fn parse_org(raw: &str) -> Result<OrgId, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound("org"))
}

pub fn parse_user(raw: &str) -> Result<UserId, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound("member"))
}

/// `?limit=&cursor=` for lists ordered by a typed id.
pub fn page<T: std::str::FromStr + Copy>(
    limit: Option<i64>,
    cursor: Option<&str>,
    to_uuid: impl Fn(T) -> uuid::Uuid,
) -> Result<PageRequest, ApiError> {
    let mut errors = Vec::new();
    let limit = match limit {
        None => PageRequest::DEFAULT_LIMIT,
        Some(n) if (1..=i64::from(PageRequest::MAX_LIMIT)).contains(&n) => n as u32,
        Some(_) => {
            errors.push(FieldError {
                field: "limit".into(),
                message: format!("must be between 1 and {}", PageRequest::MAX_LIMIT),
            });
            PageRequest::DEFAULT_LIMIT
        }
    };
    let after = match cursor.filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => match c.parse::<T>() {
            Ok(id) => Some(to_uuid(id)),
            Err(_) => {
                errors.push(FieldError {
                    field: "cursor".into(),
                    message: "is not a cursor this list gave out".into(),
                });
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    Ok(PageRequest { limit, after })
}

/// Collects per-field validation errors so one response reports all of them.
#[derive(Default)]
pub struct Checks(Vec<FieldError>);

impl Checks {
    pub fn take<T>(&mut self, r: Result<T, kiln_domain::InputError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(e.into());
                None
            }
        }
    }
    pub fn push(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
    /// How many problems were found so far.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.0))
        }
    }
}

/// Parse a role name as a field.
pub fn parse_role(
    field: &'static str,
    raw: &str,
) -> Result<kiln_domain::Role, kiln_domain::InputError> {
    raw.trim().to_lowercase().parse().map_err(|_| {
        kiln_domain::InputError::new(field, "must be one of owner, admin, member, viewer")
    })
}
