//! [`ApiError`] as a GraphQL error: the same external message as the REST problem's `detail`,
//! with `extensions: { code, status }` (and `fields` for validation), never internal detail.

use async_graphql::{ErrorExtensionValues, Value};

use crate::error::ApiError;

/// Turn an operation's error into a GraphQL error. Internal errors are logged here, once, with
/// their whole chain; the caller sees only the generic message.
pub(crate) fn gql(err: ApiError) -> async_graphql::Error {
    if matches!(err, ApiError::Internal(_)) {
        log_chain(&err);
    }
    let problem = err.problem();
    let mut ext = ErrorExtensionValues::default();
    ext.set("code", err.code());
    ext.set("status", i32::from(problem.status));
    let message = if let ApiError::Validation(errors) = &err {
        // Name fields as the GraphQL schema does (`expires_at` → `expiresAt`).
        let fields: Vec<Value> = errors
            .iter()
            .map(|e| {
                let mut o = async_graphql::indexmap::IndexMap::new();
                o.insert(
                    async_graphql::Name::new("field"),
                    Value::from(camel_case(&e.field)),
                );
                o.insert(
                    async_graphql::Name::new("message"),
                    Value::from(e.message.clone()),
                );
                Value::Object(o)
            })
            .collect();
        ext.set("fields", Value::List(fields));
        errors
            .iter()
            .map(|e| format!("{}: {}", camel_case(&e.field), e.message))
            .collect::<Vec<_>>()
            .join("; ")
    } else {
        problem.detail
    };
    async_graphql::Error {
        message,
        source: None,
        extensions: Some(ext),
    }
}

/// `snake_case` → `camelCase`; names without underscores are unchanged.
fn camel_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut upper = false;
    for c in s.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn log_chain(err: &ApiError) {
    let mut chain = String::new();
    let mut src: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = src {
        if !chain.is_empty() {
            chain.push_str(": ");
        }
        chain.push_str(&e.to_string());
        src = e.source();
    }
    tracing::error!(error = %chain, surface = "graphql", "request failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_follow_the_schema() {
        assert_eq!(camel_case("expires_at"), "expiresAt");
        assert_eq!(camel_case("refresh_token"), "refreshToken");
        assert_eq!(camel_case("email"), "email");
    }

    #[test]
    fn internal_errors_say_nothing_about_the_inside() {
        let e = gql(ApiError::internal(std::io::Error::other(
            "connection to 10.0.0.7:5432 refused",
        )));
        assert!(!e.message.contains("10.0.0.7"), "{}", e.message);
        let ext = e.extensions.expect("extensions");
        assert_eq!(ext.get("code"), Some(&Value::from("internal")));
        assert_eq!(ext.get("status"), Some(&Value::from(500)));
    }
}
