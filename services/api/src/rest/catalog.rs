//! `/v1/gpu-types`: the GPU catalog with live availability, for any signed-in caller.

use axum::Json;
use axum::extract::State;

use super::extract::Auth;
use crate::error::{ApiError, Problem};
use crate::ops;
use crate::ops::catalog::GpuTypeView;
use crate::state::AppState;

/// The GPU catalog with live availability.
///
/// Every GPU type Kiln can place, sorted by id: its marketing name and memory, its MIG
/// profiles, the prices in effect now and what is free of it right now — whole GPUs,
/// per MIG profile how many more instances of that profile alone would fit, time-sliced share
/// room, and the total and unhealthy GPU counts. Lists every type present in the fleet and every
/// MIG-capable type (A100 40GB/80GB, H100 80GB) even with none present (all zero). Computed at
/// request time; capacity can be taken by the time a request is placed. Any user token or API
/// key may read it. The answer is a bare JSON array (API.md's contract), not a paginated
/// `{items}` list: the catalog is a handful of entries.
#[utoipa::path(get, path = "/v1/gpu-types", tag = "catalog",
    responses((status = 200, body = [GpuTypeView]), (status = 401, body = Problem)),
    security(("bearer" = [])))]
pub async fn gpu_types(
    State(state): State<AppState>,
    Auth(caller): Auth,
) -> Result<Json<Vec<GpuTypeView>>, ApiError> {
    ops::catalog::list(&state, &caller)
        .await
        .map(|list| Json(list.items))
}
