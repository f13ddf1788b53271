//! An org's instances: the list with the "New instance" form (an image from the catalog, whole
//! GPUs, SSH keys pasted in), one instance's page (where it runs, the SSH command to copy, its
//! serial console's last lines) and its power buttons: stop, start, reboot, terminate.
//!
//! Every action is an [`ops::instances`] call, the same as REST and GraphQL; the page is
//! rendered on the server and read again after each action (post/redirect/get).

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use kiln_domain::Permission;
use serde::Deserialize;

use super::orgs::{OrgNav, PageQuery, load_org};
use super::session::redirect_with_notice;
use super::{Chrome, Ctx, Failure, FormErrors, SelectOption, render, when};
use crate::error::{ApiError, FieldError};
use crate::ops::instances::Power;
use crate::ops::{self, parse_org};
use crate::views::{CreateInstanceInput, InstanceView};

/// Serial console lines the instance page shows.
const CONSOLE_TAIL: usize = 100;

// ---- how an instance reads ----

/// The badge colour of a state (the same table as pods').
fn state_class(state: &str) -> &'static str {
    match state {
        "running" => "badge-ok",
        "failed" => "badge-danger",
        "terminated" | "stopped" => "badge-off",
        _ => "badge-warn",
    }
}

pub(super) struct InstanceRow {
    pub id: String,
    pub name: String,
    pub image: String,
    /// "2 × h100-80gb"
    pub gpu: String,
    pub state: String,
    pub state_class: &'static str,
    pub reason: String,
    pub node: String,
    /// `ssh -p PORT user@host`, once its node reports the port.
    pub ssh: Option<String>,
    pub created_at: String,
}

fn row(v: &InstanceView) -> InstanceRow {
    InstanceRow {
        id: v.id.clone(),
        name: v.name.clone(),
        image: v.image.clone(),
        gpu: format!("{} × {}", v.gpu_count, v.gpu_type),
        state: v.state.clone(),
        state_class: state_class(&v.state),
        reason: v.state_reason.clone(),
        node: v.node.clone().unwrap_or_default(),
        ssh: v.ssh.as_ref().map(|s| s.command.clone()),
        created_at: when(&v.created_at),
    }
}

// ---- the list and the form ----

#[derive(Template)]
#[template(path = "instances.html")]
struct InstancesPage {
    chrome: Chrome,
    org: OrgNav,
    instances: Vec<InstanceRow>,
    next_cursor: Option<String>,
    can_create: bool,
    form: CreateInstanceForm,
    images: Vec<SelectOption>,
    gpu_types: Vec<SelectOption>,
    errors: FormErrors,
}

/// The "New instance" form as posted.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct CreateInstanceForm {
    pub name: String,
    pub image: String,
    pub gpu_type: String,
    pub gpu_count: String,
    pub disk_gib: String,
    /// OpenSSH public keys, one a line.
    pub ssh_public_keys: String,
    /// A checkbox: present when ticked.
    pub spot: Option<String>,
}

impl CreateInstanceForm {
    fn fresh() -> Self {
        Self {
            gpu_count: "1".to_owned(),
            ..Self::default()
        }
    }
}

async fn instances_page(
    ctx: &Ctx,
    raw_org: &str,
    cursor: Option<&str>,
    form: CreateInstanceForm,
    failure: Option<Failure>,
) -> Result<Response, ApiError> {
    let (id, role, nav) = load_org(ctx, raw_org, "instances").await?;
    let list = ops::instances::list(&ctx.state, &ctx.caller, id, Some(50), cursor).await?;
    let can_create = role.allows(Permission::WorkloadWrite);
    let (images, gpu_types) = if can_create {
        let images = ops::images::list(&ctx.state, &ctx.caller).await?.items;
        let gpu_types = ops::catalog::list(&ctx.state, &ctx.caller).await?.items;
        let first_image = images.first().map(|i| i.name.clone()).unwrap_or_default();
        let chosen_image = if form.image.is_empty() {
            first_image
        } else {
            form.image.clone()
        };
        let first_type = gpu_types.first().map(|t| t.id.clone()).unwrap_or_default();
        let chosen_type = if form.gpu_type.is_empty() {
            first_type
        } else {
            form.gpu_type.clone()
        };
        (
            images
                .into_iter()
                .map(|i| SelectOption {
                    selected: i.name == chosen_image,
                    label: if i.description.is_empty() {
                        format!("{} (log in as {})", i.name, i.login_user).into()
                    } else {
                        format!(
                            "{} — {} (log in as {})",
                            i.name, i.description, i.login_user
                        )
                        .into()
                    },
                    value: i.name.into(),
                })
                .collect(),
            gpu_types
                .into_iter()
                .map(|t| SelectOption {
                    selected: t.id == chosen_type,
                    label: format!(
                        "{} — {}, {} GiB ({} free)",
                        t.id, t.name, t.memory_gib, t.available.whole
                    )
                    .into(),
                    value: t.id.into(),
                })
                .collect(),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let mut chrome = ctx.chrome(Some(&nav.id)).await?;
    let (status, errors) = match failure {
        Some(f) => {
            chrome.alert = f.alert;
            (f.status, f.errors)
        }
        None => (StatusCode::OK, FormErrors::default()),
    };
    let page = InstancesPage {
        chrome,
        org: nav,
        instances: list.items.iter().map(row).collect(),
        next_cursor: list.next_cursor,
        can_create,
        form,
        images,
        gpu_types,
        errors,
    };
    Ok(render(status, &page))
}

pub(super) async fn list(
    ctx: Ctx,
    Path(org): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let r = instances_page(
        &ctx,
        &org,
        q.cursor.as_deref(),
        CreateInstanceForm::fresh(),
        None,
    )
    .await;
    ctx.finish(r).await
}

/// The form as the API's input, and the textarea line each key came from. What cannot even be
/// read (a count that is not a number) is reported here, in the shape of the ops' validation.
fn to_input(form: &CreateInstanceForm) -> Result<(CreateInstanceInput, Vec<usize>), ApiError> {
    let mut problems = Vec::new();
    let mut number = |field: &str, raw: &str, what: &str| match raw.trim() {
        "" => None,
        n => n.parse::<i64>().ok().or_else(|| {
            problems.push(FieldError {
                field: field.to_owned(),
                message: format!("must be a whole number of {what}"),
            });
            None
        }),
    };
    let gpu_count = number("gpu_count", &form.gpu_count, "GPUs").unwrap_or(1);
    let disk_gib = number("disk_gib", &form.disk_gib, "GiB");
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let (lines, keys): (Vec<usize>, Vec<String>) = form
        .ssh_public_keys
        .lines()
        .enumerate()
        .map(|(n, l)| (n + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(n, l)| (n, l.to_owned()))
        .unzip();
    Ok((
        CreateInstanceInput {
            name: form.name.trim().to_owned(),
            gpu_type: form.gpu_type.trim().to_owned(),
            gpu_count,
            image: form.image.trim().to_owned(),
            ssh_public_keys: keys,
            disk_gib,
            spot: Some(form.spot.is_some()),
        },
        lines,
    ))
}

/// `ssh_public_keys[i]` is the textarea's key on line `lines[i]`: say which line.
fn place_key_errors(err: ApiError, lines: &[usize]) -> ApiError {
    match err {
        ApiError::Validation(list) => ApiError::Validation(
            list.into_iter()
                .map(|FieldError { field, message }| {
                    let line = field
                        .strip_prefix("ssh_public_keys[")
                        .and_then(|r| r.strip_suffix(']'))
                        .and_then(|i| i.parse::<usize>().ok())
                        .and_then(|i| lines.get(i));
                    match line {
                        Some(n) => FieldError {
                            field: "ssh_public_keys.key".to_owned(),
                            message: format!("on line {n} {message}"),
                        },
                        None => FieldError { field, message },
                    }
                })
                .collect(),
        ),
        other => other,
    }
}

/// (the ops' field, the form's field, the label the user sees)
const FIELDS: &[(&str, &str, &str)] = &[
    ("name", "name", "Name"),
    ("image", "image", "Image"),
    ("gpu_type", "gpu_type", "GPU type"),
    ("gpu_count", "gpu_count", "GPU count"),
    ("disk_gib", "disk_gib", "Disk"),
    ("ssh_public_keys", "ssh_public_keys", "SSH keys:"),
    ("ssh_public_keys.key", "ssh_public_keys", "The SSH key"),
];

pub(super) async fn create(
    ctx: Ctx,
    Path(org): Path<String>,
    Form(form): Form<CreateInstanceForm>,
) -> Response {
    let result = async {
        let org_id = parse_org(&org)?;
        let (input, lines) = to_input(&form)?;
        let mut tx = ctx.state.store.begin().await?;
        let view = ops::instances::create(&ctx.state, &mut tx, &ctx.caller, org_id, &input)
            .await
            .map_err(|e| place_key_errors(e, &lines))?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok::<_, ApiError>(view)
    }
    .await;
    let r = match result {
        Ok(v) => Ok(redirect_with_notice(
            &ctx.state,
            &format!("/orgs/{org}/instances/{}", v.id),
            &format!(
                "Created the instance {}. It is {}: the SSH command appears here once it runs.",
                v.name, v.state
            ),
        )),
        Err(e) => match Failure::from_error(e, FIELDS) {
            Ok(f) => instances_page(&ctx, &org, None, form, Some(f)).await,
            Err(e) => Err(e),
        },
    };
    ctx.finish(r).await
}

// ---- one instance ----

#[derive(Template)]
#[template(path = "instance.html")]
struct InstancePage {
    chrome: Chrome,
    org: OrgNav,
    instance: InstanceRow,
    power: String,
    gpus: String,
    cpu: String,
    memory_gib: i64,
    disk_gib: i64,
    reboot_count: i64,
    key_count: usize,
    spot: bool,
    updated_at: String,
    /// The serial console's last lines, oldest first; `None` when the log store cannot be read.
    console: Option<Vec<String>>,
    can_stop: bool,
    can_start: bool,
    can_reboot: bool,
    can_terminate: bool,
}

async fn instance_page(
    ctx: &Ctx,
    raw_org: &str,
    raw_instance: &str,
    failure: Option<(StatusCode, String)>,
) -> Result<Response, ApiError> {
    let (id, role, nav) = load_org(ctx, raw_org, "instances").await?;
    let v = ops::instances::get(&ctx.state, &ctx.caller, id, raw_instance).await?;
    let console = match ops::instances::console(
        &ctx.state,
        &ctx.caller,
        id,
        raw_instance,
        CONSOLE_TAIL,
    )
    .await
    {
        Ok(lines) => Some(lines.into_iter().map(|l| l.text).collect()),
        Err(ApiError::Unavailable(_)) => None,
        Err(e) => return Err(e),
    };
    let write = role.allows(Permission::WorkloadWrite);
    let live = v.state != "terminated";
    let on = v.power == "running";
    let mut chrome = ctx.chrome(Some(&nav.id)).await?;
    let status = match failure {
        Some((status, alert)) => {
            chrome.alert = Some(alert);
            status
        }
        None => StatusCode::OK,
    };
    let page = InstancePage {
        chrome,
        org: nav,
        power: v.power.clone(),
        gpus: v.gpus.join(", "),
        cpu: if v.cpu == 1.0 {
            "1 core".to_owned()
        } else {
            format!("{} cores", v.cpu)
        },
        memory_gib: v.memory_gib,
        disk_gib: v.disk_gib,
        reboot_count: v.reboot_count,
        key_count: v.ssh_public_keys.len(),
        spot: v.spot,
        updated_at: when(&v.updated_at),
        console,
        can_stop: write && live && on && !matches!(v.state.as_str(), "stopped" | "failed"),
        can_start: write
            && live
            && (!on || matches!(v.state.as_str(), "stopped" | "stopping" | "failed")),
        can_reboot: write
            && on
            && v.node.is_some()
            && matches!(v.state.as_str(), "scheduled" | "starting" | "running"),
        can_terminate: write && live,
        instance: row(&v),
    };
    Ok(render(status, &page))
}

pub(super) async fn show(ctx: Ctx, Path((org, instance)): Path<(String, String)>) -> Response {
    let r = instance_page(&ctx, &org, &instance, None).await;
    ctx.finish(r).await
}

/// `POST /orgs/{org}/instances/{instance}/{stop|start|reboot|terminate}`.
pub(super) async fn act(
    ctx: Ctx,
    Path((org, instance, action)): Path<(String, String, String)>,
) -> Response {
    let result = async {
        let org_id = parse_org(&org)?;
        let what = match action.as_str() {
            "terminate" => None,
            other => Some(Power::parse(other).ok_or(ApiError::NotFound("page"))?),
        };
        let mut tx = ctx.state.store.begin().await?;
        let view = match what {
            Some(p) => {
                ops::instances::power(&ctx.state, &mut tx, &ctx.caller, org_id, &instance, p)
                    .await?
            }
            None => {
                ops::instances::delete(&ctx.state, &mut tx, &ctx.caller, org_id, &instance).await?
            }
        };
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok::<_, ApiError>((what, view))
    }
    .await;
    let r = match result {
        Ok((what, v)) => {
            let notice = match what {
                Some(Power::Stop) => format!(
                    "Stopping the instance {}: its GPUs are given back, its disk is kept.",
                    v.name
                ),
                Some(Power::Start) => {
                    format!("Starting the instance {}: it is {}.", v.name, v.state)
                }
                Some(Power::Reboot) => format!("Rebooting the instance {}.", v.name),
                None => format!(
                    "Terminated the instance {}: its disk is destroyed and its capacity is free.",
                    v.name
                ),
            };
            Ok(redirect_with_notice(
                &ctx.state,
                &format!("/orgs/{org}/instances/{}", v.id),
                &notice,
            ))
        }
        // A refused power change (a conflict) is explained on the instance's own page.
        Err(ApiError::Conflict(msg)) => {
            instance_page(
                &ctx,
                &org,
                &instance,
                Some((StatusCode::CONFLICT, super::sentence(&msg))),
            )
            .await
        }
        Err(e) => Err(e),
    };
    ctx.finish(r).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_reads_as_the_api_input_and_key_errors_name_their_line() {
        let form = CreateInstanceForm {
            name: " trainer ".into(),
            image: "kiln-tiny".into(),
            gpu_type: "h100-80gb".into(),
            gpu_count: "2".into(),
            disk_gib: "".into(),
            ssh_public_keys: "# laptop\nssh-ed25519 AAAA one\r\n\nssh-rsa BBBB two\n".into(),
            spot: None,
        };
        let Ok((input, lines)) = to_input(&form) else {
            panic!("a valid form")
        };
        assert_eq!(input.name, "trainer");
        assert_eq!(input.gpu_count, 2);
        assert_eq!(input.disk_gib, None);
        assert_eq!(
            input.ssh_public_keys,
            ["ssh-ed25519 AAAA one", "ssh-rsa BBBB two"]
        );
        assert_eq!(lines, [2, 4]);
        assert_eq!(input.spot, Some(false));

        let err = ApiError::Validation(vec![FieldError {
            field: "ssh_public_keys[1]".into(),
            message: "is bad".into(),
        }]);
        let ApiError::Validation(list) = place_key_errors(err, &lines) else {
            panic!("validation")
        };
        assert_eq!(list[0].field, "ssh_public_keys.key");
        assert_eq!(list[0].message, "on line 4 is bad");

        let bad = CreateInstanceForm {
            gpu_count: "two".into(),
            disk_gib: "lots".into(),
            ..CreateInstanceForm::default()
        };
        let Err(ApiError::Validation(list)) = to_input(&bad) else {
            panic!("problems")
        };
        let fields: Vec<&str> = list.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["gpu_count", "disk_gib"]);
        assert_eq!(state_class("stopped"), "badge-off");
    }
}
