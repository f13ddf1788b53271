//! Reads: the same as `GET /v1/me`, `/v1/orgs…`, members, API keys, the audit log, pods,
//! endpoints, instances, the image catalog and (for operators) `/v1/admin/nodes…` and `/v1/admin/capacity`.
//!
//! Root fields are nullable so that one failing field does not null its siblings.

use async_graphql::{Context, ID, Object, Result};

use super::{caller, gql, page_limit, state};
use crate::ops::{self, parse_org};
use crate::views::*;

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// The caller (the signed-in user, or the user who created the API key) and their memberships.
    async fn me(&self, ctx: &Context<'_>) -> Result<Option<MeView>> {
        Ok(Some(
            ops::identity::me(state(ctx), caller(ctx)?)
                .await
                .map_err(gql)?,
        ))
    }

    /// Orgs the caller belongs to.
    async fn orgs(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Page size, 1–200 (default 50).")] limit: Option<i32>,
        #[graphql(desc = "`nextCursor` from the previous page.")] cursor: Option<String>,
    ) -> Result<Option<OrgList>> {
        let list = ops::orgs::list(
            state(ctx),
            caller(ctx)?,
            page_limit(limit),
            cursor.as_deref(),
        )
        .await
        .map_err(gql)?;
        Ok(Some(list))
    }

    /// One org the caller belongs to (`not-found` otherwise).
    async fn org(&self, ctx: &Context<'_>, id: ID) -> Result<Option<OrgView>> {
        let caller = caller(ctx)?;
        let org = parse_org(&id).map_err(gql)?;
        Ok(Some(
            ops::orgs::get(state(ctx), caller, org).await.map_err(gql)?,
        ))
    }

    /// The org's members.
    async fn members(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "Page size, 1–200 (default 50).")] limit: Option<i32>,
        #[graphql(desc = "`nextCursor` from the previous page.")] cursor: Option<String>,
    ) -> Result<Option<MemberList>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        let list = ops::orgs::members(
            state(ctx),
            caller,
            org,
            page_limit(limit),
            cursor.as_deref(),
        )
        .await
        .map_err(gql)?;
        Ok(Some(list))
    }

    /// The org's API keys (never their secrets).
    async fn api_keys(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "Page size, 1–200 (default 50).")] limit: Option<i32>,
        #[graphql(desc = "`nextCursor` from the previous page.")] cursor: Option<String>,
    ) -> Result<Option<ApiKeyList>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        let list = ops::api_keys::list(
            state(ctx),
            caller,
            org,
            page_limit(limit),
            cursor.as_deref(),
        )
        .await
        .map_err(gql)?;
        Ok(Some(list))
    }

    /// The org's audit log, newest first (admins and owners).
    async fn audit_log(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "Page size, 1–200 (default 50).")] limit: Option<i32>,
        #[graphql(desc = "`nextCursor` from the previous page.")] cursor: Option<String>,
    ) -> Result<Option<AuditList>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        let list = ops::audit::list(
            state(ctx),
            caller,
            org,
            page_limit(limit),
            cursor.as_deref(),
        )
        .await
        .map_err(gql)?;
        Ok(Some(list))
    }

    /// The org's pods, newest first (secret env values are never shown).
    async fn pods(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "Page size, 1–200 (default 50).")] limit: Option<i32>,
        #[graphql(desc = "`nextCursor` from the previous page.")] cursor: Option<String>,
    ) -> Result<Option<PodList>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        let list = ops::pods::list(
            state(ctx),
            caller,
            org,
            page_limit(limit),
            cursor.as_deref(),
        )
        .await
        .map_err(gql)?;
        Ok(Some(list))
    }

    /// One pod of the org (`not-found` otherwise).
    async fn pod(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "The pod's id (`pod_…`).")] id: ID,
    ) -> Result<Option<PodView>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        Ok(Some(
            ops::pods::get(state(ctx), caller, org, &id)
                .await
                .map_err(gql)?,
        ))
    }

    /// The org's instances (VMs with whole GPUs passed through), newest first; the same as
    /// `GET /v1/orgs/{org}/instances`.
    async fn instances(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "Page size, 1–200 (default 50).")] limit: Option<i32>,
        #[graphql(desc = "`nextCursor` from the previous page.")] cursor: Option<String>,
    ) -> Result<Option<InstanceList>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        let list = ops::instances::list(
            state(ctx),
            caller,
            org,
            page_limit(limit),
            cursor.as_deref(),
        )
        .await
        .map_err(gql)?;
        Ok(Some(list))
    }

    /// One instance of the org, with how to reach it over SSH once its node reports the port
    /// (`not-found` otherwise).
    async fn instance(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "The instance's id (`ins_…`).")] id: ID,
    ) -> Result<Option<InstanceView>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        Ok(Some(
            ops::instances::get(state(ctx), caller, org, &id)
                .await
                .map_err(gql)?,
        ))
    }

    /// The instance's serial console: its last `tail` lines, oldest first (the same as
    /// `GET …/instances/{id}/console`).
    async fn instance_console(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "The instance's id (`ins_…`).")] id: ID,
        #[graphql(desc = "How many recent lines, 0–5000 (default 100).")] tail: Option<i32>,
    ) -> Result<Option<Vec<LogLineView>>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        let tail = ops::pods::parse_tail(tail.map(i64::from)).map_err(gql)?;
        Ok(Some(
            ops::instances::console(state(ctx), caller, org, &id, tail)
                .await
                .map_err(gql)?,
        ))
    }

    /// The VM images instances can be created from (active ones), by name; the same as
    /// `GET /v1/images`.
    async fn images(&self, ctx: &Context<'_>) -> Result<Option<VmImageList>> {
        Ok(Some(
            ops::images::list(state(ctx), caller(ctx)?)
                .await
                .map_err(gql)?,
        ))
    }

    /// The org's endpoints, newest first, each with its URL and live replicas.
    async fn endpoints(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "Page size, 1–200 (default 50).")] limit: Option<i32>,
        #[graphql(desc = "`nextCursor` from the previous page.")] cursor: Option<String>,
    ) -> Result<Option<EndpointList>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        let list = ops::endpoints::list(
            state(ctx),
            caller,
            org,
            page_limit(limit),
            cursor.as_deref(),
        )
        .await
        .map_err(gql)?;
        Ok(Some(list))
    }

    /// One endpoint of the org (`not-found` otherwise).
    async fn endpoint(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "The endpoint's id (`ep_…`).")] id: ID,
    ) -> Result<Option<EndpointView>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        Ok(Some(
            ops::endpoints::get(state(ctx), caller, org, &id)
                .await
                .map_err(gql)?,
        ))
    }

    /// The orgs an endpoint of the org is granted to.
    async fn endpoint_grants(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "The endpoint's id (`ep_…`).")] id: ID,
    ) -> Result<Option<EndpointGrantList>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        Ok(Some(
            ops::endpoints::grants(state(ctx), caller, org, &id)
                .await
                .map_err(gql)?,
        ))
    }

    /// Other orgs' endpoints the org's API keys may call, with their URL and price.
    async fn granted_endpoints(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
    ) -> Result<Option<GrantedEndpointList>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        Ok(Some(
            ops::endpoints::granted(state(ctx), caller, org)
                .await
                .map_err(gql)?,
        ))
    }

    /// An endpoint's traffic over the last `minutes` (default 60, at most a day): calls,
    /// requests per second, errors and latency percentiles per bucket, and totals — what the
    /// console's charts draw (`GET …/endpoints/{id}/traffic`).
    async fn endpoint_traffic(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "The endpoint's id (`ep_…`).")] id: ID,
        minutes: Option<i64>,
    ) -> Result<Option<EndpointTrafficView>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        Ok(Some(
            ops::endpoints::traffic(state(ctx), caller, org, &id, minutes)
                .await
                .map_err(gql)?,
        ))
    }

    /// The pod's last `tail` lines of output, oldest first (follow them with the `podLogs`
    /// subscription).
    async fn pod_logs(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "The pod's id (`pod_…`).")] id: ID,
        #[graphql(desc = "How many recent lines, 0–5000 (default 100).")] tail: Option<i32>,
    ) -> Result<Option<Vec<LogLineView>>> {
        let caller = caller(ctx)?;
        let org = parse_org(&org_id).map_err(gql)?;
        let tail = ops::pods::parse_tail(tail.map(i64::from)).map_err(gql)?;
        Ok(Some(
            ops::pods::logs(state(ctx), caller, org, &id, tail)
                .await
                .map_err(gql)?,
        ))
    }

    /// Operators only (`not-found` for anyone else): nodes, oldest first, with their GPUs and
    /// what runs on each.
    async fn nodes(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Page size, 1–200 (default 50).")] limit: Option<i32>,
        #[graphql(desc = "`nextCursor` from the previous page.")] cursor: Option<String>,
    ) -> Result<Option<NodeList>> {
        let list = ops::fleet::list(
            state(ctx),
            caller(ctx)?,
            page_limit(limit),
            cursor.as_deref(),
        )
        .await
        .map_err(gql)?;
        Ok(Some(list))
    }

    /// Operators only: one node in full, with its newest GPU events.
    async fn node(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The node's id (`node_…`).")] id: ID,
    ) -> Result<Option<NodeDetailView>> {
        Ok(Some(
            ops::fleet::get(state(ctx), caller(ctx)?, &id)
                .await
                .map_err(gql)?,
        ))
    }

    /// Every GPU type with its MIG profiles and live availability (any signed-in caller); the
    /// same as `GET /v1/gpu-types`.
    async fn gpu_types(&self, ctx: &Context<'_>) -> Result<Option<ops::catalog::GpuTypeList>> {
        Ok(Some(
            ops::catalog::list(state(ctx), caller(ctx)?)
                .await
                .map_err(gql)?,
        ))
    }

    /// Operators only: GPU capacity per GPU type.
    async fn fleet_capacity(&self, ctx: &Context<'_>) -> Result<Option<FleetCapacityView>> {
        Ok(Some(
            ops::fleet::capacity(state(ctx), caller(ctx)?)
                .await
                .map_err(gql)?,
        ))
    }
}
