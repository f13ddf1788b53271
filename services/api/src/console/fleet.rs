//! The operators' fleet page: every node as a row of GPU cells, coloured by allocation (free /
//! allocated) and health (healthy / degraded / unhealthy), with MIG instances drawn as slices
//! inside their GPU, and cordon / uncordon / drain buttons. Anyone but an operator gets the same
//! "not found" page as for an unknown address (`ops::fleet::require_operator`).
//!
//! No inline styles (the CSP forbids them): positions and widths are classes
//! (`mig-start-N`, `mig-size-N`, `util-N`) defined in `console.css`.

use askama::Template;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;

use super::orgs::PageQuery;
use super::session::redirect_with_notice;
use super::{Chrome, Ctx, Failure, render, when};
use crate::error::ApiError;
use crate::ops;
use crate::views::{GpuTypeCapacityView, GpuView, NodeView};

/// Nodes per page.
const PAGE: i64 = 100;

pub(super) struct NodeRow {
    pub id: String,
    pub hostname: String,
    pub state: String,
    pub state_class: &'static str,
    pub admin_state: String,
    pub liveness: String,
    pub last_heartbeat: String,
    pub versions: String,
    pub summary: String,
    pub gpus: Vec<GpuCell>,
    pub can_cordon: bool,
    pub can_uncordon: bool,
    pub can_drain: bool,
}

pub(super) struct GpuCell {
    pub uuid: String,
    pub index: i32,
    pub label: String,
    /// `gpu-free` or `gpu-allocated`.
    pub alloc_class: &'static str,
    pub allocated: bool,
    /// healthy, degraded or unhealthy (also the class `gpu-<health>`).
    pub health: String,
    /// The hover text: model, health and its reason, what runs there.
    pub title: String,
    pub util: String,
    /// `util-0` … `util-10`: the utilisation bar's width in tenths.
    pub util_class: String,
    pub memory: String,
    pub temperature: String,
    pub mig: Vec<MigCell>,
}

pub(super) struct MigCell {
    pub profile: String,
    pub start: i32,
    pub size: i32,
    pub allocated: bool,
    pub title: String,
}

#[derive(Template)]
#[template(path = "fleet.html")]
struct FleetPage {
    chrome: Chrome,
    capacity: Vec<GpuTypeCapacityView>,
    nodes: Vec<NodeRow>,
    next_cursor: Option<String>,
}

pub(super) async fn page(ctx: Ctx, Query(q): Query<PageQuery>) -> Response {
    let r = fleet_page(&ctx, q.cursor.as_deref(), None).await;
    ctx.finish(r).await
}

async fn fleet_page(
    ctx: &Ctx,
    cursor: Option<&str>,
    failure: Option<Failure>,
) -> Result<Response, ApiError> {
    let list = ops::fleet::list(&ctx.state, &ctx.caller, Some(PAGE), cursor).await?;
    let capacity = ops::fleet::capacity(&ctx.state, &ctx.caller).await?.items;
    let mut chrome = ctx.chrome(None).await?;
    let status = match failure {
        Some(f) => {
            chrome.alert = f.alert;
            f.status
        }
        None => StatusCode::OK,
    };
    Ok(render(
        status,
        &FleetPage {
            chrome,
            capacity,
            nodes: list.items.iter().map(node_row).collect(),
            next_cursor: list.next_cursor,
        },
    ))
}

fn node_row(n: &NodeView) -> NodeRow {
    let s = &n.gpu_summary;
    let mut summary = format!("{} GPU{}", s.count, if s.count == 1 { "" } else { "s" });
    if !s.gpu_types.is_empty() {
        summary.push_str(&format!(" · {}", s.gpu_types.join(", ")));
    }
    if s.count > 0 {
        summary.push_str(&format!(" · {} allocated", s.allocated));
    }
    if s.unhealthy > 0 {
        summary.push_str(&format!(" · {} unhealthy", s.unhealthy));
    }
    if s.degraded > 0 {
        summary.push_str(&format!(" · {} degraded", s.degraded));
    }
    if let Some(u) = s.mean_sm_util_pct {
        summary.push_str(&format!(" · mean SM {u:.0}%"));
    }
    let admin = n.admin_state.as_str();
    let retired = admin == "retired";
    NodeRow {
        id: n.id.clone(),
        hostname: n.hostname.clone(),
        state: n.state.clone(),
        state_class: match n.state.as_str() {
            "ready" => "badge-ok",
            "cordoned" | "draining" => "badge-warn",
            "unreachable" | "lost" => "badge-danger",
            _ => "badge-off",
        },
        admin_state: n.admin_state.clone(),
        liveness: n.liveness.clone(),
        last_heartbeat: n
            .last_heartbeat_at
            .as_deref()
            .map_or_else(|| "never".to_owned(), when),
        versions: if n.driver_version.is_empty() {
            format!("agent {}", n.agent_version)
        } else {
            format!(
                "agent {} · driver {} · CUDA {}",
                n.agent_version, n.driver_version, n.cuda_version
            )
        },
        summary,
        gpus: n.gpus.iter().map(gpu_cell).collect(),
        can_cordon: !retired && admin != "cordoned",
        can_uncordon: !retired && admin != "active",
        can_drain: !retired && admin != "draining",
    }
}

fn gpu_cell(g: &GpuView) -> GpuCell {
    let mut title = format!("GPU {} · {} · {}", g.index, g.model, g.health);
    if !g.health_reason.is_empty() {
        title.push_str(&format!(": {}", g.health_reason));
    }
    for a in &g.assignments {
        title.push_str(&format!("\n{} {} ({})", a.kind, a.id, a.state));
    }
    let util = g.sm_util_pct.map(|u| u.clamp(0, 100));
    GpuCell {
        uuid: g.uuid.clone(),
        index: g.index,
        label: g.gpu_type.clone().unwrap_or_else(|| g.model.clone()),
        alloc_class: if g.allocated {
            "gpu-allocated"
        } else {
            "gpu-free"
        },
        allocated: g.allocated,
        health: g.health.clone(),
        title,
        util: util.map_or_else(|| "—".to_owned(), |u| format!("{u}%")),
        util_class: format!("util-{}", (util.unwrap_or(0) + 5) / 10),
        memory: match g.memory_used_mib {
            Some(used) => format!(
                "{:.0}/{:.0} GiB",
                used as f64 / 1024.0,
                g.memory_mib as f64 / 1024.0
            ),
            None => format!("{:.0} GiB", g.memory_mib as f64 / 1024.0),
        },
        temperature: g
            .temperature_c
            .map_or_else(String::new, |t| format!("{t}°C")),
        mig: g
            .mig_instances
            .iter()
            // Slices outside the GPU's eight would not draw; the detail API still lists them.
            .filter(|m| m.start >= 0 && m.size >= 1 && m.start + m.size <= 8)
            .map(|m| MigCell {
                profile: m.profile.clone(),
                start: m.start,
                size: m.size,
                allocated: m.allocated,
                title: format!(
                    "MIG {} · slices {}–{} · {}",
                    m.profile,
                    m.start,
                    m.start + m.size - 1,
                    if m.allocated { "allocated" } else { "free" }
                ),
            })
            .collect(),
    }
}

/// `POST /admin/fleet/{node}/{cordon|uncordon|drain}`: the same operations as the REST API,
/// then back to the fleet page with a notice (or the page with the reason it did not work).
pub(super) async fn act(ctx: Ctx, Path((node, action)): Path<(String, String)>) -> Response {
    let result = match action.as_str() {
        "cordon" => ops::fleet::cordon(&ctx.state, &ctx.caller, &node).await,
        "uncordon" => ops::fleet::uncordon(&ctx.state, &ctx.caller, &node).await,
        "drain" => ops::fleet::drain(&ctx.state, &ctx.caller, &node).await,
        _ => Err(ApiError::NotFound("page")),
    };
    let r = match result {
        Ok(n) => {
            let done = match action.as_str() {
                "cordon" => "Cordoned",
                "uncordon" => "Uncordoned",
                _ => "Draining",
            };
            Ok(redirect_with_notice(
                &ctx.state,
                "/admin/fleet",
                &format!("{done} {} ({}): it is now {}.", n.hostname, n.id, n.state),
            ))
        }
        // Someone else than an operator learns nothing, whatever the node.
        Err(e @ ApiError::NotFound(_)) => Err(e),
        Err(e) => match Failure::from_error(e, &[]) {
            Ok(f) => fleet_page(&ctx, None, Some(f)).await,
            Err(e) => Err(e),
        },
    };
    ctx.finish(r).await
}
