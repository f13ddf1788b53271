//! GraphQL at `/graphql` (placeholder until the GraphQL surface lands).

use axum::Router;

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
}
