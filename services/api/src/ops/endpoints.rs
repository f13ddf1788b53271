//! Endpoints: a tenant's model server, run as replicas (workloads of kind `endpoint_replica`,
//! placed and run exactly like pods) and called through the gateway at the endpoint's URL.
//!
//! Each replica is validated as a pod would be (image, GPU, CPU, memory, env with sealed
//! secrets, command), with the endpoint's port as its one exposed port and restart policy
//! `always`. Creating an endpoint records it with `min_replicas` pending replicas; the
//! scheduler's endpoint controller keeps that many live; deleting it terminates them.

use kiln_domain::{EndpointId, OrgId, Permission};
use kiln_store::{
    Autoscaling, EndpointLimits, EndpointPrice, EndpointRecord, NewEndpoint, OrgScope, RateLimit,
    ReplicaTemplate,
};
use sqlx::PgConnection;

use super::orgs::audit;
use super::{Checks, page};
use crate::error::{ApiError, FieldError};
use crate::state::{AppState, Caller};
use crate::views::*;

/// Most replicas an endpoint may have.
pub const MAX_REPLICAS: i64 = 64;
const MAX_HEALTH_PATH: usize = 256;

/// An endpoint id from a path: anything malformed is an endpoint that does not exist.
pub fn parse_endpoint(raw: &str) -> Result<EndpointId, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound("endpoint"))
}

pub async fn list(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<EndpointList, ApiError> {
    let page = page::<EndpointId>(limit, cursor, |e| e.as_uuid())?;
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::WorkloadRead)
        .await?;
    let p = state.store.endpoint_list(&scope, page).await?;
    let mut conn = acquire(state).await?;
    let mut items = Vec::with_capacity(p.items.len());
    for e in &p.items {
        items.push(view(state, &mut conn, &scope, e).await?);
    }
    Ok(EndpointList {
        items,
        next_cursor: p.next_cursor,
    })
}

async fn acquire(state: &AppState) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, ApiError> {
    Ok(state
        .store
        .pool()
        .acquire()
        .await
        .map_err(kiln_store::StoreError::from)?)
}

pub async fn get(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    endpoint: &str,
) -> Result<EndpointView, ApiError> {
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::WorkloadRead)
        .await?;
    let id = parse_endpoint(endpoint)?;
    let mut conn = acquire(state).await?;
    let e = state
        .store
        .endpoint_get(&mut conn, &scope, id.as_uuid())
        .await?;
    view(state, &mut conn, &scope, &e).await
}

/// Longest window [`traffic`] shows, minutes.
pub const MAX_TRAFFIC_MINUTES: i64 = 7 * 24 * 60;

/// Endpoint traffic over the last `minutes` (1 minute–7 days, default 60), in about 60
/// buckets of whole minutes; buckets without calls are included, as zeros.
pub async fn traffic(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    endpoint: &str,
    minutes: Option<i64>,
) -> Result<EndpointTrafficView, ApiError> {
    let minutes = minutes.unwrap_or(60);
    if !(1..=MAX_TRAFFIC_MINUTES).contains(&minutes) {
        return Err(ApiError::field(
            "minutes",
            format!("must be between 1 and {MAX_TRAFFIC_MINUTES}"),
        ));
    }
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::WorkloadRead)
        .await?;
    let id = parse_endpoint(endpoint)?;
    let mut conn = acquire(state).await?;
    // Exists and is this org's (else 404).
    state
        .store
        .endpoint_get(&mut conn, &scope, id.as_uuid())
        .await?;
    // About 60 buckets, each a whole number of minutes.
    let bucket_s = ((minutes + 59) / 60).max(1) * 60;
    // Whole seconds: Postgres keeps microseconds, and the buckets must meet exactly.
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let to = now - time::Duration::seconds(now.unix_timestamp().rem_euclid(bucket_s))
        + time::Duration::seconds(bucket_s);
    let from = to - time::Duration::minutes(minutes);
    let (rows, totals) = state
        .store
        .endpoint_traffic(&mut conn, id.as_uuid(), from, bucket_s)
        .await?;
    let buckets = traffic_buckets(from, to, bucket_s, &rows);
    Ok(EndpointTrafficView {
        from: ts(from),
        to: ts(to),
        bucket_seconds: bucket_s,
        buckets,
        calls: totals.calls,
        errors: totals.errors,
        prompt_tokens: totals.prompt_tokens,
        completion_tokens: totals.completion_tokens,
    })
}

/// Every bucket from `from` to `to`, the stored ones' figures where they have calls.
fn traffic_buckets(
    from: time::OffsetDateTime,
    to: time::OffsetDateTime,
    bucket_s: i64,
    rows: &[kiln_store::TrafficBucket],
) -> Vec<TrafficBucketView> {
    let mut out = Vec::new();
    let mut start = from;
    while start < to {
        let row = rows.iter().find(|r| r.start == start);
        let calls = row.map_or(0, |r| r.calls);
        out.push(TrafficBucketView {
            start: ts(start),
            calls,
            requests_per_second: calls as f64 / bucket_s as f64,
            errors: row.map_or(0, |r| r.errors),
            p50_ms: row.and_then(|r| r.p50_ms),
            p99_ms: row.and_then(|r| r.p99_ms),
        });
        start += time::Duration::seconds(bucket_s);
    }
    out
}

/// Validate and record a new endpoint with its first replicas.
pub async fn create(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    input: &CreateEndpointInput,
) -> Result<EndpointView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::WorkloadWrite)
        .await?;
    super::billing::ensure_in_credit(state, conn, &scope).await?;
    let mut checks = Checks::default();
    let port_ok = (1..=65535).contains(&input.port);
    if !port_ok {
        checks.push("port", "must be a port the server listens on, 1-65535");
    }
    let health_path = input.health_path.clone().unwrap_or_else(|| "/".into());
    if !health_path.starts_with('/')
        || health_path.len() > MAX_HEALTH_PATH
        || health_path
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        checks.push(
            "health_path",
            "must be a path starting with `/`, at most 256 characters, without spaces",
        );
    }
    let min = input.min_replicas.unwrap_or(1);
    let max = input.max_replicas.unwrap_or(min.max(1));
    if !(0..=MAX_REPLICAS).contains(&min) {
        checks.push(
            "min_replicas",
            format!("must be between 0 and {MAX_REPLICAS}"),
        );
    }
    if !(1..=MAX_REPLICAS).contains(&max) {
        checks.push(
            "max_replicas",
            format!("must be between 1 and {MAX_REPLICAS}"),
        );
    } else if max < min {
        checks.push("max_replicas", "must be at least min_replicas");
    }
    let limits = limits(&mut checks, input.limits.as_ref());
    let autoscaling = autoscaling(&mut checks, input.autoscaling.as_ref());
    let price = input
        .price
        .as_ref()
        .and_then(|p| price(&mut checks, "price", p));
    // Each replica is a pod in all but name: the same validation, the port as its one port.
    let as_pod = CreatePodInput {
        name: input.name.clone(),
        image: input.image.clone(),
        gpu: input.gpu.clone(),
        cpu: input.cpu,
        memory_gib: input.memory_gib,
        disk_gib: None,
        env: input.env.clone(),
        ports: port_ok.then(|| vec![input.port]),
        command: input.command.clone(),
        spot: input.spot,
        restart_policy: Some("always".into()),
    };
    let pod = match super::pods::validate(state, conn, &scope, &as_pod).await {
        Ok(pod) => Some(pod),
        Err(ApiError::Validation(errors)) => {
            for FieldError { field, message } in errors {
                checks.push(&field, message);
            }
            None
        }
        Err(e) => return Err(e),
    };
    checks.finish()?;
    let Some(pod) = pod else {
        return Err(ApiError::BadRequest("invalid endpoint".into()));
    };
    let record = state
        .store
        .endpoint_create(
            conn,
            &scope,
            &NewEndpoint {
                name: pod.name.as_str(),
                port: input.port as i32,
                health_path: &health_path,
                min_replicas: min as i32,
                max_replicas: max as i32,
                limits,
                autoscaling,
                replica: ReplicaTemplate {
                    tier: if pod.spot { "spot" } else { "on_demand" }.into(),
                    gpu_mode: pod.gpu.mode().into(),
                    gpu_type: pod.gpu.gpu_type().map(str::to_owned),
                    gpu_count: pod.gpu.count(),
                    mig_profile: pod.gpu.mig_profile().map(str::to_owned),
                    share_memory_mib: pod.gpu.share_memory_mib(),
                    cpu_millis: pod.cpu_millis,
                    memory_mib: pod.memory_gib * 1024,
                    disk_gib: pod.disk_gib,
                    spec: pod.spec,
                },
                price,
            },
        )
        .await
        .map_err(|e| match e {
            kiln_store::StoreError::Conflict { .. } => {
                ApiError::field("name", "an endpoint with this name already exists")
            }
            e => e.into(),
        })?;
    let id = EndpointId::from_uuid(record.id);
    let event = audit(
        &scope,
        caller,
        "endpoint.create",
        id.to_string(),
        serde_json::json!({
            "name": record.name,
            "image": pod.image.as_str(),
            "gpu": input.gpu,
            "min_replicas": min,
            "max_replicas": max,
            "limits": limits_view(&limits),
            "autoscaling": autoscaling_view(&autoscaling),
            "price": price.map(|p| price_view(&p)),
        }),
    );
    state.store.audit_record(conn, &event).await?;
    view(state, conn, &scope, &record).await
}

/// The highest price of one request, or of 1,000 tokens: 1,000 USD.
pub const MAX_PRICE_MICROS: i64 = 1_000_000_000;

/// An endpoint's price from the request (missing parts are free); problems go to `checks`
/// under `field`.
fn price(checks: &mut Checks, field: &str, input: &EndpointPriceSpec) -> Option<EndpointPrice> {
    let before = checks.len();
    if input
        .currency
        .as_deref()
        .is_some_and(|c| !c.eq_ignore_ascii_case(super::billing::CURRENCY))
    {
        checks.push(&format!("{field}.currency"), "only USD is supported");
    }
    let mut part = |name: &str, value: Option<i64>| {
        let v = value.unwrap_or(0);
        if !(0..=MAX_PRICE_MICROS).contains(&v) {
            checks.push(
                &format!("{field}.{name}"),
                format!("must be between 0 and {MAX_PRICE_MICROS} micro-units"),
            );
        }
        v
    };
    let price = EndpointPrice {
        per_request_micros: part("per_request_micros", input.per_request_micros),
        per_1k_prompt_tokens_micros: part(
            "per_1k_prompt_tokens_micros",
            input.per_1k_prompt_tokens_micros,
        ),
        per_1k_completion_tokens_micros: part(
            "per_1k_completion_tokens_micros",
            input.per_1k_completion_tokens_micros,
        ),
    };
    (checks.len() == before).then_some(price)
}

pub fn price_view(p: &EndpointPrice) -> EndpointPriceSpec {
    EndpointPriceSpec {
        per_request_micros: Some(p.per_request_micros),
        per_1k_prompt_tokens_micros: Some(p.per_1k_prompt_tokens_micros),
        per_1k_completion_tokens_micros: Some(p.per_1k_completion_tokens_micros),
        currency: Some(super::billing::CURRENCY.to_owned()),
    }
}

/// Set the price granted orgs pay per call (`None`: they call free). Calls already answered
/// keep the price they were answered under.
pub async fn set_price(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    endpoint: &str,
    input: Option<&EndpointPriceSpec>,
) -> Result<EndpointView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::WorkloadWrite)
        .await?;
    let id = parse_endpoint(endpoint)?;
    let mut checks = Checks::default();
    let new = input.and_then(|p| price(&mut checks, "price", p));
    checks.finish()?;
    let e = state
        .store
        .endpoint_price_set(conn, &scope, id.as_uuid(), new)
        .await?;
    let event = audit(
        &scope,
        caller,
        "endpoint.price",
        id.to_string(),
        serde_json::json!({ "price": new.map(|p| price_view(&p)) }),
    );
    state.store.audit_record(conn, &event).await?;
    view(state, conn, &scope, &e).await
}

fn grant_view(g: &kiln_store::EndpointGrantRecord) -> EndpointGrantView {
    EndpointGrantView {
        endpoint: EndpointId::from_uuid(g.endpoint_id).to_string(),
        org: OrgId::from_uuid(g.org_id).to_string(),
        org_name: g.org_name.clone(),
        created_at: ts(g.created_at),
    }
}

/// Let `input.org`'s API keys call the endpoint (billed the endpoint's price, paid to its
/// owner). Granting an org twice answers the first grant.
pub async fn grant(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    endpoint: &str,
    input: &CreateEndpointGrantInput,
) -> Result<EndpointGrantView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::WorkloadWrite)
        .await?;
    let id = parse_endpoint(endpoint)?;
    // An endpoint that is not the org's is not found, whatever the grantee.
    state.store.endpoint_get(conn, &scope, id.as_uuid()).await?;
    let Ok(grantee) = input.org.trim().parse::<OrgId>() else {
        return Err(ApiError::field("org", "must be an org id, `org_…`"));
    };
    if grantee == org {
        return Err(ApiError::field(
            "org",
            "is the endpoint's own org, whose keys call it already",
        ));
    }
    let g = state
        .store
        .endpoint_grant_add(conn, &scope, id.as_uuid(), grantee.as_uuid())
        .await
        .map_err(|e| match e {
            kiln_store::StoreError::NotFound { what: "org" } => {
                ApiError::field("org", "no org has this id")
            }
            e => e.into(),
        })?;
    let event = audit(
        &scope,
        caller,
        "endpoint.grant",
        id.to_string(),
        serde_json::json!({ "org": grantee.to_string() }),
    );
    state.store.audit_record(conn, &event).await?;
    Ok(grant_view(&g))
}

/// Take a grant back: the org's keys get 404 from the gateways at once.
pub async fn revoke_grant(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    endpoint: &str,
    grantee: &str,
) -> Result<(), ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::WorkloadWrite)
        .await?;
    let id = parse_endpoint(endpoint)?;
    let grantee: OrgId = grantee.parse().map_err(|_| ApiError::NotFound("grant"))?;
    if !state
        .store
        .endpoint_grant_remove(conn, &scope, id.as_uuid(), grantee.as_uuid())
        .await?
    {
        return Err(ApiError::NotFound("grant"));
    }
    let event = audit(
        &scope,
        caller,
        "endpoint.revoke_grant",
        id.to_string(),
        serde_json::json!({ "org": grantee.to_string() }),
    );
    state.store.audit_record(conn, &event).await?;
    Ok(())
}

/// The orgs an endpoint is granted to.
pub async fn grants(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    endpoint: &str,
) -> Result<EndpointGrantList, ApiError> {
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::WorkloadRead)
        .await?;
    let id = parse_endpoint(endpoint)?;
    let mut conn = acquire(state).await?;
    // Exists and is this org's (else 404).
    state
        .store
        .endpoint_get(&mut conn, &scope, id.as_uuid())
        .await?;
    let items = state
        .store
        .endpoint_grant_list(&mut conn, &scope, id.as_uuid())
        .await?;
    Ok(EndpointGrantList {
        items: items.iter().map(grant_view).collect(),
        next_cursor: None,
    })
}

/// Other orgs' endpoints this org's API keys may call, with their URL and price.
pub async fn granted(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
) -> Result<GrantedEndpointList, ApiError> {
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::WorkloadRead)
        .await?;
    let rows = state.store.endpoints_granted_to(&scope).await?;
    let gateway = state.config.gateway_url.trim_end_matches('/');
    Ok(GrantedEndpointList {
        items: rows
            .iter()
            .map(|g| {
                let id = EndpointId::from_uuid(g.endpoint_id).to_string();
                GrantedEndpointView {
                    url: format!("{gateway}/v1/endpoints/{id}"),
                    id,
                    name: g.endpoint_name.clone(),
                    owner_org: OrgId::from_uuid(g.owner_org_id).to_string(),
                    owner_org_name: g.owner_org_name.clone(),
                    price: g.price().map(|p| price_view(&p)),
                    granted_at: ts(g.created_at),
                }
            })
            .collect(),
        next_cursor: None,
    })
}

/// Most requests per second (and burst, and calls in flight) one key may be given.
pub const MAX_PER_KEY: f64 = 100_000.0;
/// The same for an endpoint in total.
pub const MAX_TOTAL: f64 = 1_000_000.0;

/// The endpoint's limits from the request, defaults filled in; problems go to `checks`.
fn limits(checks: &mut Checks, input: Option<&EndpointLimitsSpec>) -> EndpointLimits {
    let defaults = EndpointLimits::default();
    let per_key = input.and_then(|l| l.per_key.as_ref());
    let total = input.and_then(|l| l.total.as_ref());
    let per_key_rate =
        call_rate(checks, "limits.per_key", per_key, MAX_PER_KEY).unwrap_or(defaults.per_key_rate);
    let per_key_concurrency = concurrent(checks, "limits.per_key", per_key, MAX_PER_KEY)
        .unwrap_or(defaults.per_key_concurrency);
    EndpointLimits {
        per_key_rate,
        per_key_concurrency,
        total_rate: call_rate(checks, "limits.total", total, MAX_TOTAL),
        total_concurrency: concurrent(checks, "limits.total", total, MAX_TOTAL),
    }
}

fn call_rate(
    checks: &mut Checks,
    field: &str,
    limit: Option<&CallLimit>,
    max: f64,
) -> Option<RateLimit> {
    let limit = limit?;
    let Some(rate) = limit.requests_per_second else {
        if limit.burst.is_some() {
            checks.push(
                &format!("{field}.burst"),
                "needs requests_per_second (the rate the burst refills at)",
            );
        }
        return None;
    };
    if !(rate.is_finite() && rate > 0.0 && rate <= max) {
        checks.push(
            &format!("{field}.requests_per_second"),
            format!("must be more than 0 and at most {max}"),
        );
        return None;
    }
    let burst = limit
        .burst
        .unwrap_or_else(|| ((rate * 2.0).ceil() as i64).clamp(1, max as i64));
    if !(1..=max as i64).contains(&burst) {
        checks.push(
            &format!("{field}.burst"),
            format!("must be between 1 and {max}"),
        );
        return None;
    }
    Some(RateLimit {
        per_second: rate,
        burst: burst as i32,
    })
}

fn concurrent(
    checks: &mut Checks,
    field: &str,
    limit: Option<&CallLimit>,
    max: f64,
) -> Option<i32> {
    let n = limit?.concurrent?;
    if !(1..=max as i64).contains(&n) {
        checks.push(
            &format!("{field}.concurrent"),
            format!("must be between 1 and {max}"),
        );
        return None;
    }
    Some(n as i32)
}

/// The endpoint's autoscaling from the request, defaults filled in.
fn autoscaling(checks: &mut Checks, input: Option<&AutoscalingSpec>) -> Autoscaling {
    let d = Autoscaling::default();
    let mut field =
        |name: &str, value: Option<i64>, range: std::ops::RangeInclusive<i64>, default: i32| {
            match value {
                None => default,
                Some(v) if range.contains(&v) => v as i32,
                Some(_) => {
                    checks.push(
                        &format!("autoscaling.{name}"),
                        format!("must be between {} and {}", range.start(), range.end()),
                    );
                    default
                }
            }
        };
    let input = input.cloned().unwrap_or_default();
    Autoscaling {
        target_concurrency: field(
            "target_concurrency",
            input.target_concurrency,
            1..=10_000,
            d.target_concurrency,
        ),
        scale_down_window_s: field(
            "scale_down_window_s",
            input.scale_down_window_s,
            0..=86_400,
            d.scale_down_window_s,
        ),
        scale_to_zero_after_s: field(
            "scale_to_zero_after_s",
            input.scale_to_zero_after_s,
            1..=604_800,
            d.scale_to_zero_after_s,
        ),
    }
}

pub fn autoscaling_view(a: &Autoscaling) -> AutoscalingSpec {
    AutoscalingSpec {
        target_concurrency: Some(i64::from(a.target_concurrency)),
        scale_down_window_s: Some(i64::from(a.scale_down_window_s)),
        scale_to_zero_after_s: Some(i64::from(a.scale_to_zero_after_s)),
    }
}

/// The tenant's view of an endpoint's limits.
pub fn limits_view(l: &EndpointLimits) -> EndpointLimitsSpec {
    EndpointLimitsSpec {
        per_key: Some(CallLimit {
            requests_per_second: Some(l.per_key_rate.per_second),
            burst: Some(i64::from(l.per_key_rate.burst)),
            concurrent: Some(i64::from(l.per_key_concurrency)),
        }),
        total: (l.total_rate.is_some() || l.total_concurrency.is_some()).then(|| CallLimit {
            requests_per_second: l.total_rate.map(|r| r.per_second),
            burst: l.total_rate.map(|r| i64::from(r.burst)),
            concurrent: l.total_concurrency.map(i64::from),
        }),
    }
}

/// Delete an endpoint: calls stop at once (404), replicas are terminated and their capacity
/// freed. Deleting a deleted endpoint changes nothing.
pub async fn delete(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    endpoint: &str,
) -> Result<EndpointView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::WorkloadWrite)
        .await?;
    let id = parse_endpoint(endpoint)?;
    let reason = "the endpoint was deleted";
    if state
        .store
        .endpoint_delete(conn, &scope, id.as_uuid(), reason)
        .await?
    {
        let event = audit(
            &scope,
            caller,
            "endpoint.delete",
            id.to_string(),
            serde_json::json!({}),
        );
        state.store.audit_record(conn, &event).await?;
    }
    let e = state.store.endpoint_get(conn, &scope, id.as_uuid()).await?;
    view(state, conn, &scope, &e).await
}

/// The tenant's view of an endpoint and its live replicas.
pub async fn view(
    state: &AppState,
    conn: &mut PgConnection,
    scope: &OrgScope,
    e: &EndpointRecord,
) -> Result<EndpointView, ApiError> {
    let replicas = if e.state == "deleted" {
        Vec::new()
    } else {
        state.store.endpoint_replicas(conn, scope, e.id).await?
    };
    let template = e.replica();
    let image = template
        .as_ref()
        .and_then(|t| t.spec.get("image"))
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let gpu = template.as_ref().and_then(|t| {
        super::pods::gpu_request(
            &t.gpu_mode,
            t.gpu_type.clone(),
            t.gpu_count,
            t.mig_profile.clone(),
            t.share_memory_mib,
        )
    });
    let endpoint_state = if e.state == "deleted" {
        "deleted"
    } else if replicas.iter().any(|r| r.state == "running") {
        "ready"
    } else if replicas.is_empty() {
        "idle"
    } else {
        "starting"
    };
    let id = EndpointId::from_uuid(e.id).to_string();
    Ok(EndpointView {
        url: format!(
            "{}/v1/endpoints/{id}",
            state.config.gateway_url.trim_end_matches('/')
        ),
        id,
        name: e.name.clone(),
        image,
        gpu,
        port: i64::from(e.port),
        health_path: e.health_path.clone(),
        min_replicas: i64::from(e.min_replicas),
        max_replicas: i64::from(e.max_replicas),
        desired_replicas: i64::from(e.desired_replicas),
        limits: limits_view(&e.limits()),
        autoscaling: autoscaling_view(&e.autoscaling),
        price: e.price().map(|p| price_view(&p)),
        state: endpoint_state.into(),
        replicas: replicas
            .iter()
            .map(|r| EndpointReplicaView {
                id: kiln_domain::WorkloadId::from_uuid(r.id).to_string(),
                state: r.state.clone(),
                state_reason: r.state_reason.clone(),
                node: r
                    .node_id
                    .map(|n| kiln_domain::NodeId::from_uuid(n).to_string()),
                created_at: ts(r.created_at),
            })
            .collect(),
        created_at: ts(e.created_at),
        updated_at: ts(e.updated_at),
    })
}
