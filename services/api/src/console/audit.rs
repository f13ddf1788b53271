//! An org's audit log (admins and owners; `ops::audit::list` says who).

use askama::Template;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;

use super::orgs::{OrgNav, PageQuery, load_org};
use super::{Chrome, Ctx, render, when};
use crate::ops;

pub(super) struct EventRow {
    pub created_at: String,
    pub actor: String,
    pub ip: String,
    pub action: String,
    pub target: String,
    /// Event details as (key, value) lines.
    pub details: Vec<(String, String)>,
}

#[derive(Template)]
#[template(path = "audit_log.html")]
struct AuditPage {
    chrome: Chrome,
    org: OrgNav,
    events: Vec<EventRow>,
    next_cursor: Option<String>,
}

pub(super) async fn list(
    ctx: Ctx,
    Path(org): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let r = async {
        let (id, _, nav) = load_org(&ctx, &org, "audit-log").await?;
        let log =
            ops::audit::list(&ctx.state, &ctx.caller, id, Some(50), q.cursor.as_deref()).await?;
        let events = log
            .items
            .into_iter()
            .map(|e| EventRow {
                created_at: when(&e.created_at),
                actor: match (e.actor_email, e.actor_api_key_id) {
                    (Some(email), Some(key)) => format!("{email} (API key {key})"),
                    (Some(email), None) => email,
                    (None, Some(key)) => format!("API key {key}"),
                    (None, None) => "Kiln".to_owned(),
                },
                ip: e.ip.unwrap_or_default(),
                action: e.action,
                target: e.target.unwrap_or_default(),
                details: details(&e.details.0),
            })
            .collect();
        let chrome = ctx.chrome(Some(&nav.id)).await?;
        Ok(render(
            StatusCode::OK,
            &AuditPage {
                chrome,
                org: nav,
                events,
                next_cursor: log.next_cursor,
            },
        ))
    }
    .await;
    ctx.finish(r).await
}

/// `{"name": "ci", "role": "member"}` → [("name", "ci"), ("role", "member")].
fn details(value: &serde_json::Value) -> Vec<(String, String)> {
    let show = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "—".to_owned(),
        other => other.to_string(),
    };
    match value {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.replace('_', " "), show(v)))
            .collect(),
        serde_json::Value::Null => Vec::new(),
        other => vec![("details".to_owned(), show(other))],
    }
}
