//! An org's pods: the list with the "New pod" form, one pod's page, delete, and the two live
//! streams that page reads with `EventSource` — its state and its logs.
//!
//! The streams are the REST ones (`ops::pods::watch`, `ops::pods::follow_logs`) served again
//! under `/orgs/{org}/pods/{pod}/…`, because REST takes only bearer tokens and the console's
//! session lives in `HttpOnly` cookies that the page's script cannot read. Each stream ends with
//! an `end` event, so the page closes it instead of letting `EventSource` reconnect for ever.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use kiln_domain::Permission;
use serde::Deserialize;

use super::orgs::{OrgNav, PageQuery, load_org};
use super::session::redirect_with_notice;
use super::{Chrome, Ctx, Failure, FormErrors, SelectOption, render, when};
use crate::error::{ApiError, FieldError};
use crate::ops::{self, parse_org};
use crate::views::{CreatePodInput, EnvValueInput, EnvValueView, GpuRequest, PodView};

/// The image the form offers first: `KILN_DEMO_IMAGE` (what `make up` builds), else the demo
/// model's usual tag.
fn demo_image() -> String {
    std::env::var("KILN_DEMO_IMAGE")
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "kiln/demo-model:1".to_owned())
}

/// Lines of output the pod page shows first before following.
const LOG_TAIL: usize = 200;

// ---- how a pod reads ----

/// The badge colour of a state (the page's script has the same table).
fn state_class(state: &str) -> &'static str {
    match state {
        "running" => "badge-ok",
        "failed" => "badge-danger",
        "terminated" | "stopped" => "badge-off",
        _ => "badge-warn",
    }
}

/// "2 × h100-80gb", "h100-80gb · MIG 3g.40gb", "h100-80gb · 10 GiB share", or "none".
fn gpu_text(gpu: Option<&GpuRequest>) -> String {
    let Some(g) = gpu else {
        return "none (CPU only)".to_owned();
    };
    if let Some(p) = &g.mig_profile {
        return format!("{} · MIG {p}", g.gpu_type);
    }
    if let Some(s) = &g.share {
        return format!(
            "{} · {} GiB share",
            g.gpu_type,
            s.memory_gib.unwrap_or_default()
        );
    }
    format!("{} × {}", g.count.unwrap_or(1), g.gpu_type)
}

/// An exposed port: `host:port` once the agent has bound it.
pub(super) struct PortLink {
    pub container_port: i64,
    /// `host:port`, when known.
    pub address: Option<String>,
}

fn ports(view: &PodView) -> Vec<PortLink> {
    view.ports
        .iter()
        .map(|p| PortLink {
            container_port: p.container_port,
            address: match (&p.host, p.host_port) {
                (Some(h), Some(hp)) => Some(format!("{h}:{hp}")),
                _ => None,
            },
        })
        .collect()
}

pub(super) struct PodRow {
    pub id: String,
    pub name: String,
    pub image: String,
    pub gpu: String,
    pub state: String,
    pub state_class: &'static str,
    pub reason: String,
    pub node: String,
    pub ports: Vec<PortLink>,
    pub created_at: String,
    /// It will not change again (its ports will never be bound).
    pub ended: bool,
}

fn row(v: PodView) -> PodRow {
    PodRow {
        gpu: gpu_text(v.gpu.as_ref()),
        state_class: state_class(&v.state),
        ports: ports(&v),
        node: v.node.clone().unwrap_or_default(),
        created_at: when(&v.created_at),
        ended: ops::pods::is_final(&v.state),
        id: v.id,
        name: v.name,
        image: v.image,
        state: v.state,
        reason: v.state_reason,
    }
}

// ---- the list and the form ----

/// A GPU type in the form's select, with its MIG profiles.
pub(super) struct GpuChoice {
    pub id: String,
    pub label: String,
    pub selected: bool,
    pub mig_profiles: Vec<SelectOption>,
}

#[derive(Template)]
#[template(path = "pods.html")]
struct PodsPage {
    chrome: Chrome,
    org: OrgNav,
    pods: Vec<PodRow>,
    next_cursor: Option<String>,
    can_create: bool,
    form: CreatePodForm,
    gpu_types: Vec<GpuChoice>,
    restart_options: Vec<SelectOption>,
    /// Secret values are never sent back; after a failure the page asks for them again.
    secrets_dropped: bool,
    errors: FormErrors,
}

/// The "New pod" form as posted.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct CreatePodForm {
    pub name: String,
    pub image: String,
    pub gpu_type: String,
    pub gpu_count: String,
    pub mig_profile: String,
    pub cpu: String,
    pub memory_gib: String,
    pub ports: String,
    /// `KEY=value` lines.
    pub env: String,
    /// `KEY=value` lines stored encrypted.
    pub env_secret: String,
    /// Arguments separated by spaces.
    pub command: String,
    pub restart_policy: String,
    /// A checkbox: present when ticked.
    pub spot: Option<String>,
}

impl CreatePodForm {
    fn fresh() -> Self {
        Self {
            image: demo_image(),
            gpu_count: "1".to_owned(),
            restart_policy: "on_failure".to_owned(),
            ..Self::default()
        }
    }
}

async fn pods_page(
    ctx: &Ctx,
    raw_org: &str,
    cursor: Option<&str>,
    mut form: CreatePodForm,
    failure: Option<Failure>,
) -> Result<Response, ApiError> {
    let (id, role, nav) = load_org(ctx, raw_org, "pods").await?;
    let list = ops::pods::list(&ctx.state, &ctx.caller, id, Some(50), cursor).await?;
    let can_create = role.allows(Permission::WorkloadWrite);
    let catalog = if can_create {
        ops::catalog::list(&ctx.state, &ctx.caller).await?.items
    } else {
        Vec::new()
    };
    let gpu_types = catalog
        .into_iter()
        .map(|t| {
            let this = t.id == form.gpu_type;
            GpuChoice {
                label: format!(
                    "{} — {}, {} GiB ({} free)",
                    t.id, t.name, t.memory_gib, t.available.whole
                ),
                selected: this,
                mig_profiles: t
                    .mig_profiles
                    .iter()
                    .map(|p| SelectOption {
                        value: p.clone().into(),
                        label: p.clone().into(),
                        selected: this && *p == form.mig_profile,
                    })
                    .collect(),
                id: t.id,
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
    let secrets_dropped = !form.env_secret.trim().is_empty();
    if secrets_dropped {
        // Keep the names, never the values.
        form.env_secret = form
            .env_secret
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| format!("{}=", k.trim())))
            .collect::<Vec<_>>()
            .join("\n");
    }
    let restart_options = ops::pods::RESTART_POLICIES
        .iter()
        .map(|p| SelectOption {
            value: (*p).into(),
            label: match *p {
                "on_failure" => "On failure (up to 3 restarts)",
                "always" => "Always",
                _ => "Never",
            }
            .into(),
            selected: *p == form.restart_policy,
        })
        .collect();
    let page = PodsPage {
        chrome,
        org: nav,
        pods: list.items.into_iter().map(row).collect(),
        next_cursor: list.next_cursor,
        can_create,
        form,
        gpu_types,
        restart_options,
        secrets_dropped,
        errors,
    };
    Ok(render(status, &page))
}

pub(super) async fn list(
    ctx: Ctx,
    Path(org): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let r = pods_page(
        &ctx,
        &org,
        q.cursor.as_deref(),
        CreatePodForm::fresh(),
        None,
    )
    .await;
    ctx.finish(r).await
}

/// Which textarea each env name came from, so errors land beside the right one.
#[derive(Default)]
struct EnvOrigin {
    secret: BTreeSet<String>,
}

/// `KEY=value` lines into `env` (marked secret or not); problems go to `problems`.
fn parse_env_lines(
    text: &str,
    secret: bool,
    field: &str,
    env: &mut BTreeMap<String, EnvValueInput>,
    origin: &mut EnvOrigin,
    problems: &mut Vec<FieldError>,
) {
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            problems.push(FieldError {
                field: field.to_owned(),
                message: format!("line {} is not `KEY=value`", n + 1),
            });
            continue;
        };
        let key = key.trim().to_owned();
        if env.contains_key(&key) {
            problems.push(FieldError {
                field: field.to_owned(),
                message: format!("`{key}` is given twice"),
            });
            continue;
        }
        if secret {
            origin.secret.insert(key.clone());
            env.insert(
                key,
                EnvValueInput::Detailed {
                    value: value.to_owned(),
                    secret: true,
                },
            );
        } else {
            env.insert(key, EnvValueInput::Plain(value.to_owned()));
        }
    }
}

/// The form as the API's input. What cannot even be read (a port that is not a number) is
/// reported here, in the same shape as the ops' own validation.
fn to_input(form: &CreatePodForm) -> Result<(CreatePodInput, EnvOrigin), ApiError> {
    let mut problems = Vec::new();
    let mut problem = |field: &str, message: String| {
        problems.push(FieldError {
            field: field.to_owned(),
            message,
        })
    };
    let gpu_type = form.gpu_type.trim();
    let gpu = if gpu_type.is_empty() {
        None
    } else if !form.mig_profile.trim().is_empty() {
        Some(GpuRequest {
            gpu_type: gpu_type.to_owned(),
            mig_profile: Some(form.mig_profile.trim().to_owned()),
            ..GpuRequest::default()
        })
    } else {
        let count = match form.gpu_count.trim() {
            "" => Some(1),
            c => c.parse::<i64>().ok().or_else(|| {
                problem("gpu.count", "must be a whole number".to_owned());
                None
            }),
        };
        Some(GpuRequest {
            gpu_type: gpu_type.to_owned(),
            count: Some(count.unwrap_or(1)),
            ..GpuRequest::default()
        })
    };
    let cpu = match form.cpu.trim() {
        "" => None,
        c => c.parse::<f64>().ok().or_else(|| {
            problem("cpu", "must be a number of cores, like 2 or 0.5".to_owned());
            None
        }),
    };
    let memory_gib = match form.memory_gib.trim() {
        "" => None,
        m => m.parse::<i64>().ok().or_else(|| {
            problem("memory_gib", "must be a whole number of GiB".to_owned());
            None
        }),
    };
    let mut ports = Vec::new();
    for p in form
        .ports
        .split([',', ' '])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match p.parse::<i64>() {
            Ok(n) => ports.push(n),
            Err(_) => problem(
                "ports",
                format!("`{p}` is not a port: list numbers separated by commas"),
            ),
        }
    }
    let command: Vec<String> = form.command.split_whitespace().map(str::to_owned).collect();
    let mut env = BTreeMap::new();
    let mut origin = EnvOrigin::default();
    parse_env_lines(
        &form.env,
        false,
        "env",
        &mut env,
        &mut origin,
        &mut problems,
    );
    parse_env_lines(
        &form.env_secret,
        true,
        "env_secret",
        &mut env,
        &mut origin,
        &mut problems,
    );
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let input = CreatePodInput {
        name: form.name.trim().to_owned(),
        image: form.image.trim().to_owned(),
        gpu,
        cpu,
        memory_gib,
        disk_gib: None,
        env: (!env.is_empty()).then_some(env),
        ports: (!ports.is_empty()).then_some(ports),
        command: (!command.is_empty()).then_some(command),
        spot: Some(form.spot.is_some()),
        restart_policy: Some(form.restart_policy.trim().to_owned()).filter(|p| !p.is_empty()),
    };
    Ok((input, origin))
}

/// An env variable's error (`env.KEY`) belongs beside the textarea the variable came from.
fn place_env_errors(err: ApiError, origin: &EnvOrigin) -> ApiError {
    match err {
        ApiError::Validation(list) => ApiError::Validation(
            list.into_iter()
                .map(
                    |FieldError { field, message }| match field.strip_prefix("env.") {
                        Some(key) => FieldError {
                            field: if origin.secret.contains(key) {
                                "env_secret.var".to_owned()
                            } else {
                                "env.var".to_owned()
                            },
                            message: format!("`{key}` {message}"),
                        },
                        None => FieldError { field, message },
                    },
                )
                .collect(),
        ),
        other => other,
    }
}

/// (the ops' field, the form's field, the label the user sees)
const FIELDS: &[(&str, &str, &str)] = &[
    ("name", "name", "Name"),
    ("image", "image", "Image"),
    ("gpu", "gpu_type", "GPU"),
    ("gpu.type", "gpu_type", "GPU type"),
    ("gpu.count", "gpu_count", "GPU count"),
    ("gpu.mig_profile", "mig_profile", "MIG profile"),
    ("cpu", "cpu", "CPU"),
    ("memory_gib", "memory_gib", "Memory"),
    ("ports", "ports", "Ports"),
    ("command", "command", "Command"),
    ("restart_policy", "restart_policy", "Restart policy"),
    ("env", "env", "Environment"),
    ("env.var", "env", "Variable"),
    ("env_secret", "env_secret", "Secret environment"),
    ("env_secret.var", "env_secret", "Secret variable"),
];

pub(super) async fn create(
    ctx: Ctx,
    Path(org): Path<String>,
    Form(form): Form<CreatePodForm>,
) -> Response {
    let result = async {
        let org_id = parse_org(&org)?;
        let (input, origin) = to_input(&form)?;
        let mut tx = ctx.state.store.begin().await?;
        let pod = ops::pods::create(&ctx.state, &mut tx, &ctx.caller, org_id, &input)
            .await
            .map_err(|e| place_env_errors(e, &origin))?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok::<_, ApiError>(pod)
    }
    .await;
    let r = match result {
        Ok(pod) => Ok(redirect_with_notice(
            &ctx.state,
            &format!("/orgs/{org}/pods/{}", pod.id),
            &format!(
                "Created the pod {}. It is {}: this page follows it live.",
                pod.name, pod.state
            ),
        )),
        Err(e) => match Failure::from_error(e, FIELDS) {
            Ok(f) => pods_page(&ctx, &org, None, form, Some(f)).await,
            Err(e) => Err(e),
        },
    };
    ctx.finish(r).await
}

// ---- one pod ----

pub(super) struct EnvRow {
    pub key: String,
    /// The value, or `None` for a secret.
    pub value: Option<String>,
}

#[derive(Template)]
#[template(path = "pod.html")]
struct PodPage {
    chrome: Chrome,
    org: OrgNav,
    pod: PodRow,
    gpus: String,
    cpu: String,
    memory_gib: i64,
    env: Vec<EnvRow>,
    command: String,
    restart_policy: String,
    spot: bool,
    updated_at: String,
    can_delete: bool,
    ended: bool,
}

async fn pod_page(ctx: &Ctx, raw_org: &str, raw_pod: &str) -> Result<Response, ApiError> {
    let (id, role, nav) = load_org(ctx, raw_org, "pods").await?;
    let v = ops::pods::get(&ctx.state, &ctx.caller, id, raw_pod).await?;
    let ended = ops::pods::is_final(&v.state);
    let env = v
        .env
        .iter()
        .map(|(k, val)| EnvRow {
            key: k.clone(),
            value: match val {
                EnvValueView::Plain(s) => Some(s.clone()),
                EnvValueView::Secret { .. } => None,
            },
        })
        .collect();
    let page = PodPage {
        chrome: ctx.chrome(Some(&nav.id)).await?,
        gpus: v.gpus.join(", "),
        cpu: if v.cpu == 1.0 {
            "1 core".to_owned()
        } else {
            format!("{} cores", v.cpu)
        },
        memory_gib: v.memory_gib,
        env,
        command: v.command.join(" "),
        restart_policy: v.restart_policy.clone(),
        spot: v.spot,
        updated_at: when(&v.updated_at),
        can_delete: role.allows(Permission::WorkloadWrite) && v.state != "terminated",
        ended,
        pod: row(v),
        org: nav,
    };
    Ok(render(StatusCode::OK, &page))
}

pub(super) async fn show(ctx: Ctx, Path((org, pod)): Path<(String, String)>) -> Response {
    let r = pod_page(&ctx, &org, &pod).await;
    ctx.finish(r).await
}

pub(super) async fn delete(ctx: Ctx, Path((org, pod)): Path<(String, String)>) -> Response {
    let result = async {
        let org_id = parse_org(&org)?;
        let mut tx = ctx.state.store.begin().await?;
        let view = ops::pods::delete(&ctx.state, &mut tx, &ctx.caller, org_id, &pod).await?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok::<_, ApiError>(view)
    }
    .await;
    let r = match result {
        Ok(v) => Ok(redirect_with_notice(
            &ctx.state,
            &format!("/orgs/{org}/pods/{}", v.id),
            &format!(
                "Deleted the pod {}: it is {} and its capacity is free.",
                v.name, v.state
            ),
        )),
        Err(e) => Err(e),
    };
    ctx.finish(r).await
}

// ---- the live streams ----

fn end_event() -> Event {
    Event::default().event("end").data("end")
}

fn sse<S>(events: S) -> Response
where
    S: futures::Stream<Item = Event> + Send + 'static,
{
    let events = events
        .chain(futures::stream::once(async { end_event() }))
        .map(Ok::<_, Infallible>);
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// `event: pod` with the pod view now and at each change, then `event: end`.
pub(super) async fn events(ctx: Ctx, Path((org, pod)): Path<(String, String)>) -> Response {
    let r = async {
        let org_id = parse_org(&org)?;
        let views = ops::pods::watch(&ctx.state, &ctx.caller, org_id, &pod).await?;
        Ok(sse(views.map(|v| {
            Event::default()
                .event("pod")
                .data(serde_json::to_string(&v).unwrap_or_default())
        })))
    }
    .await;
    ctx.finish(r).await
}

/// `event: log` for the last lines, then each new one (id: its cursor; a reconnecting
/// `EventSource` resumes after `Last-Event-ID`), then `event: end` once the pod has ended.
pub(super) async fn logs(
    ctx: Ctx,
    Path((org, pod)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let r = async {
        let org_id = parse_org(&org)?;
        let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok());
        let lines =
            ops::pods::follow_logs(&ctx.state, &ctx.caller, org_id, &pod, LOG_TAIL, resume).await?;
        Ok(sse(lines.map(|l| {
            Event::default()
                .event("log")
                .id(l.cursor.clone())
                .data(serde_json::to_string(&l).unwrap_or_default())
        })))
    }
    .await;
    ctx.finish(r).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_reads_as_the_api_input() {
        let form = CreatePodForm {
            name: "demo".into(),
            image: "kiln/demo-model:1".into(),
            gpu_type: "h100-80gb".into(),
            gpu_count: "2".into(),
            ports: "8000, 9000".into(),
            env: "MODEL=tiny\r\n\nGREETING=a=b".into(),
            env_secret: "TOKEN=hunter2".into(),
            command: "serve --port 8000".into(),
            restart_policy: "always".into(),
            spot: Some("on".into()),
            ..CreatePodForm::default()
        };
        let Ok((input, origin)) = to_input(&form) else {
            panic!("a valid form")
        };
        assert_eq!(input.ports, Some(vec![8000, 9000]));
        assert_eq!(input.gpu.as_ref().and_then(|g| g.count), Some(2));
        assert_eq!(
            input.command,
            Some(vec!["serve".into(), "--port".into(), "8000".into()])
        );
        let env = input.env.unwrap_or_default();
        assert_eq!(env["GREETING"], EnvValueInput::Plain("a=b".into()));
        assert_eq!(
            env["TOKEN"],
            EnvValueInput::Detailed {
                value: "hunter2".into(),
                secret: true
            }
        );
        assert!(origin.secret.contains("TOKEN"));
        assert_eq!(input.spot, Some(true));

        let bad = CreatePodForm {
            ports: "80, http".into(),
            env: "NOEQUALS".into(),
            ..CreatePodForm::default()
        };
        let Err(ApiError::Validation(list)) = to_input(&bad) else {
            panic!("problems")
        };
        let fields: Vec<&str> = list.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["ports", "env"]);
    }

    #[test]
    fn env_errors_go_beside_their_textarea() {
        let origin = EnvOrigin {
            secret: ["TOKEN".to_owned()].into(),
        };
        let err = ApiError::Validation(vec![
            FieldError {
                field: "env.TOKEN".into(),
                message: "is bad".into(),
            },
            FieldError {
                field: "env.1X".into(),
                message: "is bad".into(),
            },
        ]);
        let ApiError::Validation(list) = place_env_errors(err, &origin) else {
            panic!("validation")
        };
        assert_eq!(list[0].field, "env_secret.var");
        assert_eq!(list[1].field, "env.var");
        assert_eq!(list[1].message, "`1X` is bad");
        assert_eq!(gpu_text(None), "none (CPU only)");
        assert_eq!(state_class("running"), "badge-ok");
    }
}
