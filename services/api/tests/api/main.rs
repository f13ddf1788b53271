//! Integration tests of the REST API: a real kiln-api on an ephemeral port, a fresh database
//! per test, real Redis. One file per resource.

mod api_keys;
mod audit;
mod auth;
mod billing;
mod binary;
mod catalog;
mod endpoints;
mod idempotency;
mod instances;
mod isolation;
mod members;
mod nodes;
mod openapi;
mod orgs;
mod pods;
mod quotas;

use kiln_testkit::serde_json::Value;
use reqwest::StatusCode;

/// Assert a problem+json answer with the given status; returns the problem.
#[track_caller]
pub fn assert_problem(status: StatusCode, body: &Value, expected: StatusCode) {
    assert_eq!(status, expected, "unexpected status; body: {body}");
    assert_eq!(
        body["status"].as_u64(),
        Some(u64::from(expected.as_u16())),
        "problem body: {body}"
    );
    assert!(
        body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("https://")),
        "problem type: {body}"
    );
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "problem: {body}"
    );
}

/// The field names a validation problem lists.
pub fn error_fields(body: &Value) -> Vec<String> {
    body["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["field"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
