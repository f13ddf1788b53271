//! Live data: the same streams as `GET …/pods/{pod}/events` and `…/logs?follow=true`.
//!
//! Subscriptions are served over HTTP as server-sent events (the "distinct connections" mode of
//! GraphQL over SSE): `POST /graphql` with `Accept: text/event-stream` answers one `next` event
//! per result and a final `complete`. The same bearer token as any other request authenticates
//! it, so browsers (cookies) and CLIs need nothing WebSocket-specific.

use async_graphql::{Context, ID, Result, Subscription};
use futures::Stream;

use super::{caller, gql, state};
use crate::ops::{self, parse_org};
use crate::views::*;

pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// The pod now, then again each time its state, reason, node or ports change, until it
    /// ends (`terminated`, `failed`, `stopped`).
    async fn pod_events(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "The pod's id (`pod_…`).")] id: ID,
    ) -> Result<impl Stream<Item = PodView> + use<>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        ops::pods::watch(state(ctx), caller, org, &id)
            .await
            .map_err(gql)
    }

    /// The pod's output: the last `tail` lines, then new ones as they come, until the pod has
    /// ended and its last lines are out.
    async fn pod_logs(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "The pod's id (`pod_…`).")] id: ID,
        #[graphql(desc = "Recent lines to send first, 0–5000 (default 100).")] tail: Option<i32>,
    ) -> Result<impl Stream<Item = LogLineView> + use<>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        let tail = ops::pods::parse_tail(tail.map(i64::from)).map_err(gql)?;
        ops::pods::follow_logs(state(ctx), caller, org, &id, tail, None)
            .await
            .map_err(gql)
    }
}
