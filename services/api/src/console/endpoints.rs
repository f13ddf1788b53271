//! An org's endpoints: the list, and one endpoint's page — its URL with a curl example to
//! copy, its replicas, its limits and autoscaling, and its traffic of the last hour as charts
//! (calls per second, latency percentiles, errors) drawn on the server as SVG, with the
//! usage totals. Deploying is done with the API or `kiln endpoints create` (the page says so).

use askama::Template;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;

use super::orgs::{OrgNav, PageQuery, load_org};
use super::{Chrome, Ctx, render, when};
use crate::error::ApiError;
use crate::ops;
use crate::views::{EndpointTrafficView, EndpointView};

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
        let page = EndpointsPage {
            chrome: ctx.chrome(Some(&nav.id)).await?,
            org: nav,
            endpoints: list.items.iter().map(row).collect(),
            next_cursor: list.next_cursor,
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

async fn endpoint_page(ctx: &Ctx, raw_org: &str, raw_ep: &str) -> Result<Response, ApiError> {
    let (id, _, nav) = load_org(ctx, raw_org, "endpoints").await?;
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
    let page = EndpointPage {
        chrome: ctx.chrome(Some(&nav.id)).await?,
        org: nav,
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
    Ok(render(StatusCode::OK, &page))
}

pub(super) async fn show(ctx: Ctx, Path((org, ep)): Path<(String, String)>) -> Response {
    let r = endpoint_page(&ctx, &org, &ep).await;
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
