//! GraphQL at `/graphql`: `GET` serves the GraphQL Playground, `POST` executes.
//!
//! The schema is a thin adapter over [`crate::ops`], exactly like the REST handlers, so both
//! surfaces share one authorisation and validation path and answer with the same data (the
//! output and input types are the ones in [`crate::views`]). Errors carry the REST problem's
//! `detail` as their message and `extensions: {code, status}` (plus `fields` for validation).
//!
//! Authentication happens in the HTTP handler: a bearer token is verified with
//! [`AppState::authenticate`] and the resulting `Option<Caller>` is put in the request's data.
//! A token that fails to authenticate does not fail the whole request; every field that needs
//! a caller answers that failure instead (so `login` still works with a stale token attached).
//!
//! The checked-in `schema.graphql` is [`schema_sdl`]'s output; a test fails when they drift.

mod billing;
mod error;
mod mutation;
mod query;
mod subscription;

use async_graphql::http::{GraphQLPlaygroundConfig, playground_source};
use async_graphql::{Context, MergedObject, Schema};
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use bytes::Bytes;

pub(crate) use self::error::gql;
pub use self::mutation::MutationRoot;
pub use self::query::QueryRoot;
pub use self::subscription::SubscriptionRoot;
use crate::error::ApiError;
use crate::rest::extract::{bearer, client_info};
use crate::state::{AppState, Caller, ClientInfo};

/// The deepest selection a query may make. Kiln's own types nest at most three levels, but the
/// standard introspection query (used by the playground and code generators) needs 13, and 15
/// with graphql-js 17's deeper type references.
pub const MAX_DEPTH: usize = 15;
/// The most fields one query may select (aliases count), so one request stays cheap.
pub const MAX_COMPLEXITY: usize = 500;

/// Every read: the identity, workload and fleet fields and billing's.
#[derive(MergedObject)]
pub struct Query(QueryRoot, billing::BillingQuery);

/// Every write.
#[derive(MergedObject)]
pub struct Mutation(MutationRoot, billing::BillingMutation);

pub type KilnSchema = Schema<Query, Mutation, SubscriptionRoot>;

/// Build the schema. Introspection stays on: the schema is public (and checked in).
pub fn schema() -> KilnSchema {
    Schema::build(
        Query(QueryRoot, billing::BillingQuery),
        Mutation(MutationRoot, billing::BillingMutation),
        SubscriptionRoot,
    )
    .limit_depth(MAX_DEPTH)
    .limit_complexity(MAX_COMPLEXITY)
    .finish()
}

/// The schema in SDL, as checked in at `services/api/schema.graphql`.
pub fn schema_sdl() -> String {
    schema().sdl()
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/graphql", get(playground).post(execute))
        .layer(Extension(schema()))
}

async fn playground() -> Html<String> {
    Html(playground_source(
        GraphQLPlaygroundConfig::new("/graphql").title("Kiln GraphQL"),
    ))
}

/// The outcome of reading the bearer token, kept in the request's data next to `Option<Caller>`
/// when the token was present but did not authenticate.
struct AuthFailure(async_graphql::Error);

async fn execute(
    State(state): State<AppState>,
    Extension(schema): Extension<KilnSchema>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let client = client_info(&parts, &state);
    let wants_stream = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let token = bearer(&parts).map(str::to_owned);
    let json_ct = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|ct| ct == "application/json" || ct.ends_with("+json"));
    if !json_ct {
        return request_error(ApiError::BadRequest(
            "send the GraphQL request as JSON with `Content-Type: application/json`".into(),
        ));
    }
    // Read through axum's extractor so the app's body-size limit applies.
    let bytes = match Bytes::from_request(Request::from_parts(parts, body), &state).await {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return request_error(ApiError::PayloadTooLarge);
        }
        Err(_) => {
            return request_error(ApiError::BadRequest(
                "could not read the request body".into(),
            ));
        }
    };
    let request: async_graphql::Request = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(_) => {
            return request_error(ApiError::BadRequest(
                "the body must be one GraphQL request: {\"query\": …, \"variables\": {…}, \"operationName\": …}".into(),
            ));
        }
    };

    let (caller, failure) = match token {
        None => (None, None),
        Some(token) => match state.authenticate(&token).await {
            Ok(principal) => (
                Some(Caller {
                    principal,
                    client: client.clone(),
                }),
                None,
            ),
            Err(e) => (None, Some(AuthFailure(gql(e)))),
        },
    };
    let mut request = request.data(state).data(client).data(caller);
    if let Some(failure) = failure {
        request = request.data(failure);
    }
    if wants_stream {
        return no_store(event_stream(&schema, request));
    }
    let response = schema.execute(request).await;
    no_store(Json(response).into_response())
}

/// Any operation (subscriptions included) as server-sent events: `next` per result, then
/// `complete` (GraphQL over SSE, distinct connections mode).
fn event_stream(schema: &KilnSchema, request: async_graphql::Request) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt;
    let results = schema.execute_stream(request).map(|r| {
        Ok::<_, std::convert::Infallible>(
            Event::default()
                .event("next")
                .data(serde_json::to_string(&r).unwrap_or_default()),
        )
    });
    let complete = futures::stream::once(async {
        Ok::<_, std::convert::Infallible>(Event::default().event("complete").data(""))
    });
    Sse::new(results.chain(complete))
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response()
}

/// An error before execution (the body is not a GraphQL request): GraphQL-shaped, with the
/// HTTP status of the problem.
fn request_error(err: ApiError) -> Response {
    let status = err.status();
    let e = gql(err);
    let mut error = async_graphql::ServerError::new(e.message, None);
    error.extensions = e.extensions;
    let body = async_graphql::Response::from_errors(vec![error]);
    no_store((status, Json(body)).into_response())
}

/// Answers hold tokens and secrets: never cache them.
fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The application state.
fn state<'a>(ctx: &Context<'a>) -> &'a AppState {
    ctx.data_unchecked::<AppState>()
}

/// The client's address and user agent.
fn client<'a>(ctx: &Context<'a>) -> &'a ClientInfo {
    ctx.data_unchecked::<ClientInfo>()
}

/// The caller if a valid token came with the request; an error if a token came and was invalid.
fn optional_caller<'a>(ctx: &Context<'a>) -> async_graphql::Result<Option<&'a Caller>> {
    if let Some(AuthFailure(e)) = ctx.data_opt::<AuthFailure>() {
        return Err(e.clone());
    }
    Ok(ctx.data_opt::<Option<Caller>>().and_then(Option::as_ref))
}

/// The caller, or `unauthenticated`.
fn caller<'a>(ctx: &Context<'a>) -> async_graphql::Result<&'a Caller> {
    optional_caller(ctx)?.ok_or_else(|| {
        gql(ApiError::Unauthenticated(
            "send `Authorization: Bearer <token>` (an access token or an API key)",
        ))
    })
}

/// `limit` as the operations take it.
fn page_limit(limit: Option<i32>) -> Option<i64> {
    limit.map(i64::from)
}
