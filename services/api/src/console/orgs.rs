//! The dashboard, creating and switching orgs, an org's overview and its members.

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use kiln_domain::{OrgId, Permission, Role};
use serde::Deserialize;

use super::session::redirect_with_notice;
use super::{
    Chrome, Ctx, Failure, FormErrors, SelectOption, render, role_options, see_other, when,
};
use crate::error::ApiError;
use crate::ops::{self, parse_org, parse_user};
use crate::views::{AddMemberInput, CreateOrgInput, MembershipView, UpdateMemberInput};

/// The org a page is about, and what the signed-in person may do in it.
pub(super) struct OrgNav {
    pub id: String,
    pub name: String,
    pub role: String,
    pub personal: bool,
    pub created_at: String,
    /// Which tab is open.
    pub tab: &'static str,
    pub can_keys: bool,
    pub can_audit: bool,
    pub can_manage: bool,
}

/// Load the org of `/orgs/{org}/…` through `ops` (another org's id is simply not found).
pub(super) async fn load_org(
    ctx: &Ctx,
    raw: &str,
    tab: &'static str,
) -> Result<(OrgId, Role, OrgNav), ApiError> {
    let id = parse_org(raw)?;
    let org = ops::orgs::get(&ctx.state, &ctx.caller, id).await?;
    let role: Role = org.role.parse().map_err(ApiError::internal)?;
    let nav = OrgNav {
        id: org.id,
        name: org.name,
        role: org.role,
        personal: org.personal,
        created_at: when(&org.created_at),
        tab,
        can_keys: role.allows(Permission::ApiKeyRead),
        can_audit: role.allows(Permission::AuditRead),
        can_manage: role.allows(Permission::MemberManage),
    };
    Ok((id, role, nav))
}

// ---- dashboard ----

#[derive(Template)]
#[template(path = "dashboard.html")]
struct DashboardPage {
    chrome: Chrome,
    name: String,
    orgs: Vec<MembershipView>,
    org_name: String,
    errors: FormErrors,
}

async fn dashboard_page(
    ctx: &Ctx,
    org_name: String,
    failure: Option<Failure>,
) -> Result<Response, ApiError> {
    let mut chrome = ctx.chrome(None).await?;
    let (orgs, name) = match &chrome.user {
        Some(bar) => (bar.orgs.clone(), bar.name.clone()),
        None => (Vec::new(), String::new()),
    };
    let (status, errors) = match failure {
        Some(f) => {
            chrome.alert = f.alert;
            (f.status, f.errors)
        }
        None => (StatusCode::OK, FormErrors::default()),
    };
    Ok(render(
        status,
        &DashboardPage {
            chrome,
            name,
            orgs,
            org_name,
            errors,
        },
    ))
}

pub(super) async fn dashboard(ctx: Ctx) -> Response {
    let r = dashboard_page(&ctx, String::new(), None).await;
    ctx.finish(r).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct CreateOrgForm {
    name: String,
}

pub(super) async fn create(ctx: Ctx, Form(form): Form<CreateOrgForm>) -> Response {
    let input = CreateOrgInput {
        name: form.name.clone(),
    };
    let result = async {
        let mut tx = ctx.state.store.begin().await?;
        let org = ops::orgs::create(&ctx.state, &mut tx, &ctx.caller, &input).await?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok::<_, ApiError>(org)
    }
    .await;
    let r = match result {
        Ok(org) => Ok(redirect_with_notice(
            &ctx.state,
            &format!("/orgs/{}", org.id),
            &format!("Created the organisation {}.", org.name),
        )),
        Err(e) => match Failure::from_error(e, &[("name", "name", "Name")]) {
            Ok(f) => dashboard_page(&ctx, form.name, Some(f)).await,
            Err(e) => Err(e),
        },
    };
    ctx.finish(r).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct SwitchQuery {
    org: String,
}

/// The org switcher's target (a plain GET form, so it works without JavaScript).
pub(super) async fn switch(Query(q): Query<SwitchQuery>) -> Response {
    match parse_org(q.org.trim()) {
        Ok(org) => see_other(&format!("/orgs/{org}")),
        Err(_) => see_other("/"),
    }
}

// ---- overview ----

#[derive(Template)]
#[template(path = "org_overview.html")]
struct OverviewPage {
    chrome: Chrome,
    org: OrgNav,
    role_summary: &'static str,
}

fn role_summary(role: Role) -> &'static str {
    match role {
        Role::Owner => {
            "As an owner you can do everything: manage members (owners too), API keys, billing, and read the audit log."
        }
        Role::Admin => {
            "As an admin you can manage members (except owners), revoke any API key and read the audit log."
        }
        Role::Member => {
            "As a member you can run workloads and create API keys; you can revoke the keys you created."
        }
        Role::Viewer => {
            "As a viewer you can see the organisation and its members, but not change anything."
        }
    }
}

pub(super) async fn overview(ctx: Ctx, Path(org): Path<String>) -> Response {
    let r = async {
        let (_, role, nav) = load_org(&ctx, &org, "overview").await?;
        let chrome = ctx.chrome(Some(&nav.id)).await?;
        Ok(render(
            StatusCode::OK,
            &OverviewPage {
                chrome,
                org: nav,
                role_summary: role_summary(role),
            },
        ))
    }
    .await;
    ctx.finish(r).await
}

// ---- members ----

pub(super) struct MemberRow {
    pub user_id: String,
    pub email: String,
    pub name: String,
    pub role: String,
    pub joined_at: String,
    pub is_me: bool,
    pub editable: bool,
    pub removable: bool,
    pub roles: Vec<SelectOption>,
}

#[derive(Template)]
#[template(path = "members.html")]
struct MembersPage {
    chrome: Chrome,
    org: OrgNav,
    members: Vec<MemberRow>,
    next_cursor: Option<String>,
    add_email: String,
    add_roles: Vec<SelectOption>,
    errors: FormErrors,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct PageQuery {
    pub cursor: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct AddMemberForm {
    email: String,
    role: String,
}

async fn members_page(
    ctx: &Ctx,
    raw_org: &str,
    cursor: Option<&str>,
    form: AddMemberForm,
    failure: Option<Failure>,
) -> Result<Response, ApiError> {
    let (id, role, nav) = load_org(ctx, raw_org, "members").await?;
    let list = ops::orgs::members(&ctx.state, &ctx.caller, id, Some(200), cursor).await?;
    let me = ctx.user_id.to_string();
    let members = list
        .items
        .into_iter()
        .map(|m| {
            let is_me = m.user_id == me;
            let theirs_is_owner = m.role == Role::Owner.as_str();
            // What the ops allow: managing takes MemberManage, touching an owner takes an owner;
            // anyone may leave. The server checks again.
            let reachable = nav.can_manage && (!theirs_is_owner || role == Role::Owner);
            MemberRow {
                roles: role_options(role, &m.role),
                editable: reachable,
                removable: reachable || is_me,
                joined_at: when(&m.joined_at),
                is_me,
                user_id: m.user_id,
                email: m.email,
                name: m.name,
                role: m.role,
            }
        })
        .collect();
    let mut chrome = ctx.chrome(Some(&nav.id)).await?;
    let (status, errors) = match failure {
        Some(f) => {
            chrome.alert = f.alert;
            (f.status, f.errors)
        }
        None => (StatusCode::OK, FormErrors::default()),
    };
    let wanted_role = if form.role.is_empty() {
        Role::Member.min(role).as_str().to_owned()
    } else {
        form.role
    };
    let page = MembersPage {
        chrome,
        members,
        next_cursor: list.next_cursor,
        add_email: form.email,
        add_roles: role_options(role, &wanted_role),
        errors,
        org: nav,
    };
    Ok(render(status, &page))
}

pub(super) async fn members(
    ctx: Ctx,
    Path(org): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let r = members_page(
        &ctx,
        &org,
        q.cursor.as_deref(),
        AddMemberForm::default(),
        None,
    )
    .await;
    ctx.finish(r).await
}

pub(super) async fn member_add(
    ctx: Ctx,
    Path(org): Path<String>,
    Form(form): Form<AddMemberForm>,
) -> Response {
    let input = AddMemberInput {
        email: form.email.clone(),
        role: form.role.clone(),
    };
    let result = async {
        let org_id = parse_org(&org)?;
        let mut tx = ctx.state.store.begin().await?;
        let member =
            ops::orgs::member_add(&ctx.state, &mut tx, &ctx.caller, org_id, &input).await?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok::<_, ApiError>(member)
    }
    .await;
    let r = match result {
        Ok(m) => Ok(redirect_with_notice(
            &ctx.state,
            &format!("/orgs/{org}/members"),
            &format!("Added {} as {}.", m.email, m.role),
        )),
        Err(e) => {
            match Failure::from_error(e, &[("email", "email", "Email"), ("role", "role", "Role")]) {
                Ok(f) => members_page(&ctx, &org, None, form, Some(f)).await,
                Err(e) => Err(e),
            }
        }
    };
    ctx.finish(r).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RoleForm {
    role: String,
}

pub(super) async fn member_role(
    ctx: Ctx,
    Path((org, user)): Path<(String, String)>,
    Form(form): Form<RoleForm>,
) -> Response {
    let result = async {
        let (org_id, user_id) = (parse_org(&org)?, parse_user(&user)?);
        let mut tx = ctx.state.store.begin().await?;
        let member = ops::orgs::member_update(
            &ctx.state,
            &mut tx,
            &ctx.caller,
            org_id,
            user_id,
            &UpdateMemberInput { role: form.role },
        )
        .await?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok::<_, ApiError>(member)
    }
    .await;
    let r = match result {
        Ok(m) => Ok(redirect_with_notice(
            &ctx.state,
            &format!("/orgs/{org}/members"),
            &format!("{} is now {}.", m.email, m.role),
        )),
        Err(e) => match Failure::from_error(e, &[]) {
            Ok(f) => members_page(&ctx, &org, None, AddMemberForm::default(), Some(f)).await,
            Err(e) => Err(e),
        },
    };
    ctx.finish(r).await
}

pub(super) async fn member_remove(ctx: Ctx, Path((org, user)): Path<(String, String)>) -> Response {
    let result = async {
        let (org_id, user_id) = (parse_org(&org)?, parse_user(&user)?);
        let mut tx = ctx.state.store.begin().await?;
        ops::orgs::member_remove(&ctx.state, &mut tx, &ctx.caller, org_id, user_id).await?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok::<_, ApiError>(user_id == ctx.user_id)
    }
    .await;
    let r = match result {
        Ok(true) => Ok(redirect_with_notice(
            &ctx.state,
            "/",
            "You left the organisation.",
        )),
        Ok(false) => Ok(redirect_with_notice(
            &ctx.state,
            &format!("/orgs/{org}/members"),
            "Member removed.",
        )),
        Err(e) => match Failure::from_error(e, &[]) {
            Ok(f) => members_page(&ctx, &org, None, AddMemberForm::default(), Some(f)).await,
            Err(e) => Err(e),
        },
    };
    ctx.finish(r).await
}
