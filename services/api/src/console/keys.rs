//! An org's API keys: list, create (the secret is shown once, in the answer to the form), revoke.

use std::collections::HashMap;

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use kiln_domain::{Permission, Role};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;

use super::orgs::{OrgNav, PageQuery, load_org};
use super::session::redirect_with_notice;
use super::{Chrome, Ctx, Failure, FormErrors, SelectOption, render, role_options, when};
use crate::error::ApiError;
use crate::ops::{self, parse_org};
use crate::views::{ApiKeyCreatedView, CreateApiKeyInput};

pub(super) struct KeyRow {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub role: String,
    pub created_by: String,
    pub created_at: String,
    pub last_used_at: String,
    pub expires: String,
    pub status: &'static str,
    pub status_class: &'static str,
    pub active: bool,
    pub can_revoke: bool,
}

#[derive(Template)]
#[template(path = "api_keys.html")]
struct KeysPage {
    chrome: Chrome,
    org: OrgNav,
    created: Option<ApiKeyCreatedView>,
    keys: Vec<KeyRow>,
    next_cursor: Option<String>,
    form_name: String,
    role_options: Vec<SelectOption>,
    expiry_options: Vec<SelectOption>,
    errors: FormErrors,
}

/// The expiries offered, in days ("" for never).
const EXPIRIES: [(&str, &str); 5] = [
    ("", "Never"),
    ("7", "In 7 days"),
    ("30", "In 30 days"),
    ("90", "In 90 days"),
    ("365", "In a year"),
];

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct CreateKeyForm {
    name: String,
    role: String,
    /// Days until the key expires; empty for never.
    expires: String,
}

struct Shown {
    created: Option<ApiKeyCreatedView>,
    failure: Option<Failure>,
}

async fn keys_page(
    ctx: &Ctx,
    raw_org: &str,
    cursor: Option<&str>,
    form: CreateKeyForm,
    shown: Shown,
) -> Result<Response, ApiError> {
    let (id, role, nav) = load_org(ctx, raw_org, "api-keys").await?;
    let list = ops::api_keys::list(&ctx.state, &ctx.caller, id, Some(200), cursor).await?;
    // Name the people who made the keys (as far as the first page of members goes).
    let people: HashMap<String, String> =
        ops::orgs::members(&ctx.state, &ctx.caller, id, Some(200), None)
            .await
            .map(|l| l.items.into_iter().map(|m| (m.user_id, m.email)).collect())
            .unwrap_or_default();
    let me = ctx.user_id.to_string();
    let now = time::OffsetDateTime::now_utc();
    let revoke_any = role.allows(Permission::ApiKeyRevokeAny);
    let keys = list
        .items
        .into_iter()
        .map(|k| {
            let expired = k
                .expires_at
                .as_deref()
                .and_then(|e| time::OffsetDateTime::parse(e, &Rfc3339).ok())
                .is_some_and(|e| e <= now);
            let (status, status_class, active) = if k.revoked_at.is_some() {
                ("revoked", "badge-danger", false)
            } else if expired {
                ("expired", "badge-off", false)
            } else {
                ("active", "badge-ok", true)
            };
            let mine = k.created_by.as_deref() == Some(me.as_str());
            KeyRow {
                created_by: match &k.created_by {
                    Some(u) if *u == me => "you".to_owned(),
                    Some(u) => people
                        .get(u)
                        .cloned()
                        .unwrap_or_else(|| "a former member".to_owned()),
                    None => "—".to_owned(),
                },
                created_at: when(&k.created_at),
                last_used_at: k
                    .last_used_at
                    .as_deref()
                    .map(when)
                    .unwrap_or_else(|| "never".to_owned()),
                expires: match (&k.revoked_at, &k.expires_at) {
                    (Some(r), _) => format!("on {}", when(r)),
                    (None, Some(e)) if expired => format!("on {}", when(e)),
                    (None, Some(e)) => format!("expires {}", when(e)),
                    (None, None) => String::new(),
                },
                status,
                status_class,
                active,
                can_revoke: k.revoked_at.is_none() && (mine || revoke_any),
                id: k.id,
                name: k.name,
                prefix: k.prefix,
                role: k.role,
            }
        })
        .collect();
    let mut chrome = ctx.chrome(Some(&nav.id)).await?;
    let (status, errors) = match shown.failure {
        Some(f) => {
            chrome.alert = f.alert;
            (f.status, f.errors)
        }
        None if shown.created.is_some() => (StatusCode::CREATED, FormErrors::default()),
        None => (StatusCode::OK, FormErrors::default()),
    };
    let wanted_role = if form.role.is_empty() {
        Role::Member.min(role).as_str().to_owned()
    } else {
        form.role
    };
    let page = KeysPage {
        chrome,
        org: nav,
        created: shown.created,
        keys,
        next_cursor: list.next_cursor,
        form_name: form.name,
        role_options: role_options(role, &wanted_role),
        expiry_options: EXPIRIES
            .iter()
            .map(|(v, l)| SelectOption {
                value: (*v).into(),
                label: (*l).into(),
                selected: *v == form.expires,
            })
            .collect(),
        errors,
    };
    Ok(render(status, &page))
}

pub(super) async fn list(
    ctx: Ctx,
    Path(org): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let r = keys_page(
        &ctx,
        &org,
        q.cursor.as_deref(),
        CreateKeyForm::default(),
        Shown {
            created: None,
            failure: None,
        },
    )
    .await;
    ctx.finish(r).await
}

pub(super) async fn create(
    ctx: Ctx,
    Path(org): Path<String>,
    Form(form): Form<CreateKeyForm>,
) -> Response {
    let result = async {
        let org_id = parse_org(&org)?;
        let expires_at = match form.expires.trim() {
            "" => None,
            days => match days.parse::<i64>() {
                Ok(d) if (1..=3660).contains(&d) => {
                    let at = time::OffsetDateTime::now_utc() + time::Duration::days(d);
                    Some(
                        at.replace_nanosecond(0)
                            .unwrap_or(at)
                            .format(&Rfc3339)
                            .map_err(ApiError::internal)?,
                    )
                }
                _ => {
                    return Err(ApiError::field(
                        "expires_at",
                        "must be one of the offered choices",
                    ));
                }
            },
        };
        let input = CreateApiKeyInput {
            name: form.name.clone(),
            role: Some(form.role.clone()).filter(|r| !r.is_empty()),
            expires_at,
        };
        let mut tx = ctx.state.store.begin().await?;
        let created =
            ops::api_keys::create(&ctx.state, &mut tx, &ctx.caller, org_id, &input).await?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok::<_, ApiError>(created)
    }
    .await;
    let r = match result {
        // Answer with the page itself: the secret is in this one response and nowhere else.
        Ok(created) => {
            keys_page(
                &ctx,
                &org,
                None,
                CreateKeyForm::default(),
                Shown {
                    created: Some(created),
                    failure: None,
                },
            )
            .await
        }
        Err(e) => match Failure::from_error(
            e,
            &[
                ("name", "name", "Name"),
                ("role", "role", "Role"),
                ("expires_at", "expires", "Expiry"),
            ],
        ) {
            Ok(f) => {
                keys_page(
                    &ctx,
                    &org,
                    None,
                    form,
                    Shown {
                        created: None,
                        failure: Some(f),
                    },
                )
                .await
            }
            Err(e) => Err(e),
        },
    };
    ctx.finish(r).await
}

pub(super) async fn revoke(ctx: Ctx, Path((org, key)): Path<(String, String)>) -> Response {
    let result = async {
        let org_id = parse_org(&org)?;
        let mut tx = ctx.state.store.begin().await?;
        let revoked = ops::api_keys::revoke(&ctx.state, &mut tx, &ctx.caller, org_id, &key).await?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok::<_, ApiError>(revoked)
    }
    .await;
    let r = match result {
        Ok(k) => Ok(redirect_with_notice(
            &ctx.state,
            &format!("/orgs/{org}/api-keys"),
            &format!("Revoked the key {} ({}…).", k.name, k.prefix),
        )),
        Err(e) => match Failure::from_error(e, &[]) {
            Ok(f) => {
                keys_page(
                    &ctx,
                    &org,
                    None,
                    CreateKeyForm::default(),
                    Shown {
                        created: None,
                        failure: Some(f),
                    },
                )
                .await
            }
            Err(e) => Err(e),
        },
    };
    ctx.finish(r).await
}
