//! An org's endpoints: the list, and one endpoint's page — its URL with a curl example to
//! copy, its replicas, its limits and autoscaling, and its traffic of the last hour as charts
//! (calls per second, latency percentiles, errors) drawn on the server as SVG, with the
//! usage totals. Deploying is done with the API or `kiln endpoints create` (the page says so).
//! Sharing is done here too: the endpoint's price for other orgs, the orgs it is granted to
//! (grant by org id, revoke), and on the list page the other orgs' endpoints this org may call.

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use kiln_domain::Permission;

use super::orgs::{OrgNav, PageQuery, load_org};
use super::session::redirect_with_notice;
use super::{Chrome, Ctx, render, when};
use crate::error::{ApiError, FieldError};
use crate::ops::{self, parse_org};
use crate::views::{
    CreateEndpointGrantInput, EndpointPriceSpec, EndpointTrafficView, EndpointView,
    GrantedEndpointView,
};

pub(super) struct EndpointRow {
    pub id: String,
    pub name: String,
    pub url: String,
    pub state: String,
    pub state_class: &'static str,
    pub replicas: String,
    pub image: String,
    pub created_at: String,
}

fn state_class(state: &str) -> &'static str {
    match state {
        "ready" => "badge-ok",
        "idle" | "deleted" => "badge-off",
        _ => "badge-warn",
    }
}

fn row(e: &EndpointView) -> EndpointRow {
    let running = e.replicas.iter().filter(|r| r.state == "running").count();
    EndpointRow {
        id: e.id.clone(),
        name: e.name.clone(),
        url: e.url.clone(),
        state: e.state.clone(),
        state_class: state_class(&e.state),
        replicas: format!(
            "{running} running / {} of {}..{}",
            e.desired_replicas, e.min_replicas, e.max_replicas
        ),
        image: e.image.clone(),
        created_at: when(&e.created_at),
    }
}

#[derive(Template)]
#[template(path = "endpoints.html")]
struct EndpointsPage {
    chrome: Chrome,
    org: OrgNav,
    endpoints: Vec<EndpointRow>,
    next_cursor: Option<String>,
    /// Other orgs' endpoints this org's keys may call.
    granted: Vec<GrantedRow>,
}

pub(super) struct GrantedRow {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub url: String,
    pub price: String,
}

/// `2000 µ$ per call, 0 µ$ per 1k prompt and 0 µ$ per 1k completion tokens`, or `free`.
fn price_text(p: Option<&EndpointPriceSpec>) -> String {
    match p {
        None => "free (no price set)".to_owned(),
        Some(p) => format!(
            "{} µ$ per call, {} µ$ per 1k prompt and {} µ$ per 1k completion tokens",
            p.per_request_micros.unwrap_or_default(),
            p.per_1k_prompt_tokens_micros.unwrap_or_default(),
            p.per_1k_completion_tokens_micros.unwrap_or_default()
        ),
    }
}

fn granted_row(g: &GrantedEndpointView) -> GrantedRow {
    GrantedRow {
        id: g.id.clone(),
        name: g.name.clone(),
        owner: g.owner_org_name.clone(),
        url: g.url.clone(),
        price: price_text(g.price.as_ref()),
    }
}

pub(super) async fn list(
    ctx: Ctx,
    Path(org): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let r = async {
        let (id, _, nav) = load_org(&ctx, &org, "endpoints").await?;
        let list = ops::endpoints::list(&ctx.state, &ctx.caller, id, Some(50), q.cursor.as_deref())
            .await?;
        let granted = ops::endpoints::granted(&ctx.state, &ctx.caller, id).await?;
        let page = EndpointsPage {
            chrome: ctx.chrome(Some(&nav.id)).await?,
            org: nav,
            endpoints: list.items.iter().map(row).collect(),
            next_cursor: list.next_cursor,
            granted: granted.items.iter().map(granted_row).collect(),
        };
        Ok::<_, ApiError>(render(StatusCode::OK, &page))
    }
    .await;
    ctx.finish(r).await
}

pub(super) struct ReplicaRow {
    pub id: String,
    pub state: String,
    pub state_class: &'static str,
    pub reason: String,
    pub node: String,
    pub created_at: String,
}

/// One chart: an SVG drawn from a series, with its title and the latest/peak figure.
pub(super) struct Chart {
    pub id: &'static str,
    pub title: &'static str,
    pub summary: String,
    pub svg: String,
}

#[derive(Template)]
#[template(path = "endpoint.html")]
struct EndpointPage {
    chrome: Chrome,
    org: OrgNav,
    endpoint: EndpointRow,
    curl: String,
    port: i64,
    health_path: String,
    limits: String,
    autoscaling: String,
    replicas: Vec<ReplicaRow>,
    charts: Vec<Chart>,
    traffic: EndpointTrafficView,
    price: String,
    /// The price's parts as the form shows them (empty: none set).
    price_form: [String; 3],
    grants: Vec<GrantRow>,
    /// The viewer may change the price and the grants.
    can_share: bool,
}

pub(super) struct GrantRow {
    pub org: String,
    pub org_name: String,
    pub created_at: String,
}

const CHART_W: f64 = 600.0;
const CHART_H: f64 = 120.0;

/// An SVG line chart of `series` (one line each, `None` gaps break a line), scaled to the
/// highest value; the axis labels are the peak and the window. Pure: figures in, markup out.
pub(super) fn line_chart(series: &[(&str, Vec<Option<f64>>)], unit: &str) -> String {
    let peak = series
        .iter()
        .flat_map(|(_, s)| s.iter().flatten())
        .fold(0.0_f64, |m, v| m.max(*v));
    let top = if peak > 0.0 { peak * 1.1 } else { 1.0 };
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {CHART_W} {CHART_H}\" preserveAspectRatio=\"none\" \
         role=\"img\" aria-label=\"peak {peak:.2} {unit}\">\
         <line class=\"chart-axis\" x1=\"0\" y1=\"{CHART_H}\" x2=\"{CHART_W}\" y2=\"{CHART_H}\"/>"
    );
    for (class, points) in series {
        let n = points.len().max(2) - 1;
        let mut path = String::new();
        let mut pen_down = false;
        for (i, p) in points.iter().enumerate() {
            match p {
                Some(v) => {
                    let x = CHART_W * i as f64 / n as f64;
                    let y = CHART_H - CHART_H * v / top;
                    path.push_str(&format!(
                        "{}{x:.1},{y:.1} ",
                        if pen_down { "L" } else { "M" }
                    ));
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        if !path.is_empty() {
            svg.push_str(&format!(
                "<path class=\"chart-line {class}\" d=\"{}\"/>",
                path.trim_end()
            ));
        }
    }
    svg.push_str(&format!(
        "<text class=\"chart-label\" x=\"4\" y=\"12\">{peak:.2} {unit}</text></svg>"
    ));
    svg
}

fn charts(t: &EndpointTrafficView) -> Vec<Chart> {
    let rps: Vec<Option<f64>> = t
        .buckets
        .iter()
        .map(|b| Some(b.requests_per_second))
        .collect();
    let p50: Vec<Option<f64>> = t.buckets.iter().map(|b| b.p50_ms).collect();
    let p99: Vec<Option<f64>> = t.buckets.iter().map(|b| b.p99_ms).collect();
    let errors: Vec<Option<f64>> = t.buckets.iter().map(|b| Some(b.errors as f64)).collect();
    let peak = |s: &[Option<f64>]| s.iter().flatten().fold(0.0_f64, |m, v| m.max(*v));
    vec![
        Chart {
            id: "chart-requests",
            title: "Requests per second",
            summary: format!("peak {:.2}/s", peak(&rps)),
            svg: line_chart(&[("line-calls", rps.clone())], "req/s"),
        },
        Chart {
            id: "chart-latency",
            title: "Latency (p50, p99)",
            summary: format!("p99 peak {:.0} ms", peak(&p99)),
            svg: line_chart(&[("line-p50", p50), ("line-p99", p99)], "ms"),
        },
        Chart {
            id: "chart-errors",
            title: "Errors (5xx) per bucket",
            summary: format!("{} in the window", t.errors),
            svg: line_chart(&[("line-errors", errors)], "errors"),
        },
    ]
}

async fn endpoint_page(
    ctx: &Ctx,
    raw_org: &str,
    raw_ep: &str,
    failure: Option<(StatusCode, String)>,
) -> Result<Response, ApiError> {
    let (id, role, nav) = load_org(ctx, raw_org, "endpoints").await?;
    let e = ops::endpoints::get(&ctx.state, &ctx.caller, id, raw_ep).await?;
    let traffic = ops::endpoints::traffic(&ctx.state, &ctx.caller, id, raw_ep, Some(60)).await?;
    let per_key = e.limits.per_key.clone().unwrap_or_default();
    let limits = format!(
        "per key {}/s (burst {}), {} in flight; {}",
        per_key.requests_per_second.unwrap_or_default(),
        per_key.burst.unwrap_or_default(),
        per_key.concurrent.unwrap_or_default(),
        match &e.limits.total {
            None => "no limit in total".to_owned(),
            Some(t) => format!(
                "in total {}{}",
                t.requests_per_second
                    .map(|r| format!("{r}/s"))
                    .unwrap_or_else(|| "any rate".into()),
                t.concurrent
                    .map(|n| format!(", {n} in flight"))
                    .unwrap_or_default()
            ),
        }
    );
    let a = &e.autoscaling;
    let autoscaling = format!(
        "{} calls in flight per replica; down after {} s of less load; to zero after {} s idle{}",
        a.target_concurrency.unwrap_or_default(),
        a.scale_down_window_s.unwrap_or_default(),
        a.scale_to_zero_after_s.unwrap_or_default(),
        if e.min_replicas > 0 {
            " (not below min_replicas)"
        } else {
            ""
        }
    );
    let curl = format!(
        "curl -H \"Authorization: Bearer $KILN_API_KEY\" -H 'content-type: application/json' \\\n  {}/v1/completions -d '{{\"prompt\": \"hello\"}}'",
        e.url
    );
    let replicas = e
        .replicas
        .iter()
        .map(|r| ReplicaRow {
            id: r.id.clone(),
            state: r.state.clone(),
            state_class: match r.state.as_str() {
                "running" => "badge-ok",
                "failed" => "badge-danger",
                _ => "badge-warn",
            },
            reason: r.state_reason.clone(),
            node: r.node.clone().unwrap_or_default(),
            created_at: when(&r.created_at),
        })
        .collect();
    let grants = ops::endpoints::grants(&ctx.state, &ctx.caller, id, raw_ep).await?;
    let part = |v: Option<i64>| {
        e.price
            .as_ref()
            .map(|_| v.unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    let price_form = [
        part(e.price.as_ref().and_then(|p| p.per_request_micros)),
        part(e.price.as_ref().and_then(|p| p.per_1k_prompt_tokens_micros)),
        part(
            e.price
                .as_ref()
                .and_then(|p| p.per_1k_completion_tokens_micros),
        ),
    ];
    let mut chrome = ctx.chrome(Some(&nav.id)).await?;
    let status = match failure {
        Some((status, alert)) => {
            chrome.alert = Some(alert);
            status
        }
        None => StatusCode::OK,
    };
    let page = EndpointPage {
        chrome,
        org: nav,
        price: price_text(e.price.as_ref()),
        price_form,
        grants: grants
            .items
            .iter()
            .map(|g| GrantRow {
                org: g.org.clone(),
                org_name: g.org_name.clone(),
                created_at: when(&g.created_at),
            })
            .collect(),
        can_share: role.allows(Permission::WorkloadWrite) && e.state != "deleted",
        endpoint: row(&e),
        curl,
        port: e.port,
        health_path: e.health_path.clone(),
        limits,
        autoscaling,
        replicas,
        charts: charts(&traffic),
        traffic,
    };
    Ok(render(status, &page))
}

pub(super) async fn show(ctx: Ctx, Path((org, ep)): Path<(String, String)>) -> Response {
    let r = endpoint_page(&ctx, &org, &ep, None).await;
    ctx.finish(r).await
}

/// The price form: three micro-unit amounts (empty = 0), or `free` to remove the price.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(super) struct PriceForm {
    per_request_micros: String,
    per_1k_prompt_tokens_micros: String,
    per_1k_completion_tokens_micros: String,
    free: Option<String>,
}

impl PriceForm {
    fn spec(&self) -> Result<Option<EndpointPriceSpec>, ApiError> {
        if self.free.is_some() {
            return Ok(None);
        }
        let mut errors = Vec::new();
        let mut part = |field: &str, raw: &str| {
            let raw = raw.trim();
            if raw.is_empty() {
                return None;
            }
            raw.parse::<i64>().map(Some).unwrap_or_else(|_| {
                errors.push(FieldError {
                    field: format!("price.{field}"),
                    message: "must be a whole number of micro-units".into(),
                });
                None
            })
        };
        let spec = EndpointPriceSpec {
            per_request_micros: part("per_request_micros", &self.per_request_micros),
            per_1k_prompt_tokens_micros: part(
                "per_1k_prompt_tokens_micros",
                &self.per_1k_prompt_tokens_micros,
            ),
            per_1k_completion_tokens_micros: part(
                "per_1k_completion_tokens_micros",
                &self.per_1k_completion_tokens_micros,
            ),
            currency: None,
        };
        if errors.is_empty() {
            Ok(Some(spec))
        } else {
            Err(ApiError::Validation(errors))
        }
    }
}

/// A refused sharing change, told on the endpoint's own page; anything else as usual.
async fn share_result(
    ctx: &Ctx,
    org: &str,
    ep: &str,
    result: Result<String, ApiError>,
) -> Result<Response, ApiError> {
    match result {
        Ok(notice) => Ok(redirect_with_notice(
            &ctx.state,
            &format!("/orgs/{org}/endpoints/{ep}"),
            &notice,
        )),
        Err(ApiError::Validation(errors)) => {
            let label = |field: &str| match field {
                "org" => "The org",
                "price.per_request_micros" => "Per call",
                "price.per_1k_prompt_tokens_micros" => "Per 1k prompt tokens",
                "price.per_1k_completion_tokens_micros" => "Per 1k completion tokens",
                _ => "The price",
            };
            let alert = errors
                .iter()
                .map(|e| super::sentence(&format!("{}: {}", label(&e.field), e.message)))
                .collect::<Vec<_>>()
                .join(" ");
            endpoint_page(
                ctx,
                org,
                ep,
                Some((StatusCode::UNPROCESSABLE_ENTITY, alert)),
            )
            .await
        }
        Err(e) => Err(e),
    }
}

/// `POST /orgs/{org}/endpoints/{endpoint}/price`.
pub(super) async fn set_price(
    ctx: Ctx,
    Path((org, ep)): Path<(String, String)>,
    Form(form): Form<PriceForm>,
) -> Response {
    let result = async {
        let org_id = parse_org(&org)?;
        let spec = form.spec()?;
        let mut tx = ctx.state.store.begin().await?;
        let v =
            ops::endpoints::set_price(&ctx.state, &mut tx, &ctx.caller, org_id, &ep, spec.as_ref())
                .await?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok(format!(
            "The price of {} for granted orgs is now {}.",
            v.name,
            price_text(v.price.as_ref())
        ))
    }
    .await;
    let r = share_result(&ctx, &org, &ep, result).await;
    ctx.finish(r).await
}

/// `POST /orgs/{org}/endpoints/{endpoint}/grants` with the org to grant.
pub(super) async fn grant(
    ctx: Ctx,
    Path((org, ep)): Path<(String, String)>,
    Form(form): Form<CreateEndpointGrantInput>,
) -> Response {
    let result = async {
        let org_id = parse_org(&org)?;
        let mut tx = ctx.state.store.begin().await?;
        let g = ops::endpoints::grant(&ctx.state, &mut tx, &ctx.caller, org_id, &ep, &form).await?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok(format!(
            "Granted to {} ({}): its API keys may call this endpoint now.",
            g.org_name, g.org
        ))
    }
    .await;
    let r = share_result(&ctx, &org, &ep, result).await;
    ctx.finish(r).await
}

/// `POST /orgs/{org}/endpoints/{endpoint}/grants/{grantee}/revoke`.
pub(super) async fn revoke(
    ctx: Ctx,
    Path((org, ep, grantee)): Path<(String, String, String)>,
) -> Response {
    let result = async {
        let org_id = parse_org(&org)?;
        let mut tx = ctx.state.store.begin().await?;
        ops::endpoints::revoke_grant(&ctx.state, &mut tx, &ctx.caller, org_id, &ep, &grantee)
            .await?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok(format!(
            "Revoked {grantee}'s grant: its keys can no longer call this endpoint."
        ))
    }
    .await;
    let r = share_result(&ctx, &org, &ep, result).await;
    ctx.finish(r).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_scales_to_its_peak_and_breaks_at_gaps() {
        let svg = line_chart(&[("a", vec![Some(0.0), Some(5.0), None, Some(10.0)])], "ms");
        // Two pieces: a line to the peak's half, then a new one at the gap's far side.
        assert!(
            svg.contains("d=\"M0.0,120.0 L200.0,65.5 M600.0,10.9\""),
            "{svg}"
        );
        assert!(svg.contains("10.00 ms"));
        let empty = line_chart(&[("a", vec![None, None])], "ms");
        assert!(!empty.contains("<path"), "{empty}");
    }
}
