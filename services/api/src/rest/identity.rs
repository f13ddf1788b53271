//! `/v1/auth/*` and `/v1/me`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::extract::{Auth, IdempotencyKey, JsonBody, MaybeAuth};
use super::idempotent;
use crate::error::{ApiError, Problem};
use crate::ops;
use crate::state::{AppState, ClientInfo};
use crate::views::*;

/// Create an account and its personal org.
#[utoipa::path(post, path = "/v1/auth/signup", tag = "identity", request_body = SignupInput,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for the same key and body")),
    responses((status = 201, body = SignupView), (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn signup(
    State(state): State<AppState>,
    client: ClientInfo,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<SignupInput>,
) -> Result<Response, ApiError> {
    // Anonymous callers are scoped by the email they sign up with.
    let principal = format!(
        "signup:{}",
        hex::encode(Sha256::digest(
            body.value.email.trim().to_lowercase().as_bytes()
        ))
    );
    let (st, input) = (state.clone(), body.value);
    idempotent(
        &state,
        None,
        principal,
        key,
        body.fingerprint,
        StatusCode::CREATED,
        move |conn| {
            Box::pin(async move { ops::identity::signup(&st, conn, &input, &client).await })
        },
    )
    .await
}

/// Sign in; answers an access token and a refresh token.
#[utoipa::path(post, path = "/v1/auth/login", tag = "identity", request_body = LoginInput,
    responses((status = 200, body = TokenPairView), (status = 401, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn login(
    State(state): State<AppState>,
    client: ClientInfo,
    body: JsonBody<LoginInput>,
) -> Result<Json<TokenPairView>, ApiError> {
    ops::identity::login(&state, &body.value, &client)
        .await
        .map(Json)
}

/// Exchange a refresh token for a new pair. Reusing a spent refresh token revokes the session.
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "identity", request_body = RefreshInput,
    responses((status = 200, body = TokenPairView), (status = 401, body = Problem)))]
pub async fn refresh(
    State(state): State<AppState>,
    client: ClientInfo,
    body: JsonBody<RefreshInput>,
) -> Result<Json<TokenPairView>, ApiError> {
    ops::identity::refresh(&state, &body.value, &client)
        .await
        .map(Json)
}

/// End the session (the caller's, or the one the given refresh token belongs to).
#[utoipa::path(post, path = "/v1/auth/logout", tag = "identity", request_body = LogoutInput,
    responses((status = 204), (status = 401, body = Problem)), security((), ("bearer" = [])))]
pub async fn logout(
    State(state): State<AppState>,
    MaybeAuth(caller): MaybeAuth,
    body: JsonBody<LogoutInput>,
) -> Result<Response, ApiError> {
    ops::identity::logout(&state, caller.as_ref(), &body.value).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The signed-in user and their memberships.
#[utoipa::path(get, path = "/v1/me", tag = "identity",
    responses((status = 200, body = MeView), (status = 401, body = Problem)), security(("bearer" = [])))]
pub async fn me(
    State(state): State<AppState>,
    Auth(caller): Auth,
) -> Result<Json<MeView>, ApiError> {
    ops::identity::me(&state, &caller).await.map(Json)
}
