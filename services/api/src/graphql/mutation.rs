//! Writes: the same as the REST `POST`/`PATCH`/`DELETE` calls (identity, pods, endpoints,
//! instances and their power, operators' node actions).
//!
//! Operations that write tenant data run in one transaction each, begun and committed here just
//! as the REST handlers do. Root fields are nullable: when a later mutation in the same request
//! fails, the earlier ones (which took effect) still report their result — including an API
//! key's secret, which is shown only once.

use async_graphql::{Context, ID, Object, Result};
use kiln_store::{StoreError, Tx};

use super::{caller, client, gql, optional_caller, state};
use crate::error::ApiError;
use crate::ops::instances::Power;
use crate::ops::{self, parse_org, parse_user};
use crate::state::AppState;
use crate::views::*;

pub struct MutationRoot;

async fn begin(state: &AppState) -> Result<Tx> {
    state.store.begin().await.map_err(|e| gql(e.into()))
}

async fn commit(tx: Tx) -> Result<()> {
    tx.commit()
        .await
        .map_err(|e| gql(ApiError::from(StoreError::from(e))))
}

/// A power change of an instance in its own transaction, as `POST …/instances/{id}/{stop|start|reboot}`.
async fn power(ctx: &Context<'_>, org_id: ID, id: ID, what: Power) -> Result<Option<InstanceView>> {
    let (st, caller) = (state(ctx), caller(ctx)?);
    let org = parse_org(&org_id).map_err(gql)?;
    let mut tx = begin(st).await?;
    let view = ops::instances::power(st, &mut tx, caller, org, &id, what)
        .await
        .map_err(gql)?;
    commit(tx).await?;
    Ok(Some(view))
}

#[Object]
impl MutationRoot {
    /// Create an account and its personal org (the new user is its owner).
    async fn signup(&self, ctx: &Context<'_>, input: SignupInput) -> Result<Option<SignupView>> {
        let st = state(ctx);
        let mut tx = begin(st).await?;
        let view = ops::identity::signup(st, &mut tx, &input, client(ctx))
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Sign in: an access token and a refresh token.
    async fn login(&self, ctx: &Context<'_>, input: LoginInput) -> Result<Option<TokenPairView>> {
        Ok(Some(
            ops::identity::login(state(ctx), &input, client(ctx))
                .await
                .map_err(gql)?,
        ))
    }

    /// Exchange a refresh token for a new pair. The old one is spent; presenting it again ends
    /// the session.
    async fn refresh(
        &self,
        ctx: &Context<'_>,
        input: RefreshInput,
    ) -> Result<Option<TokenPairView>> {
        Ok(Some(
            ops::identity::refresh(state(ctx), &input, client(ctx))
                .await
                .map_err(gql)?,
        ))
    }

    /// End the session: the caller's, or the one the given refresh token belongs to.
    async fn logout(
        &self,
        ctx: &Context<'_>,
        #[graphql(default)] input: LogoutInput,
    ) -> Result<Option<bool>> {
        ops::identity::logout(state(ctx), optional_caller(ctx)?, &input)
            .await
            .map_err(gql)?;
        Ok(Some(true))
    }

    /// Create an org; the caller becomes its owner.
    async fn create_org(
        &self,
        ctx: &Context<'_>,
        input: CreateOrgInput,
    ) -> Result<Option<OrgView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let mut tx = begin(st).await?;
        let view = ops::orgs::create(st, &mut tx, caller, &input)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Add someone who has signed up, with a role.
    async fn add_member(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        input: AddMemberInput,
    ) -> Result<Option<MemberView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let org = parse_org(&org_id).map_err(gql)?;
        let mut tx = begin(st).await?;
        let view = ops::orgs::member_add(st, &mut tx, caller, org, &input)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Change a member's role. An org always keeps at least one owner.
    async fn update_member(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        user_id: ID,
        input: UpdateMemberInput,
    ) -> Result<Option<MemberView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let (org, user) = (
            parse_org(&org_id).map_err(gql)?,
            parse_user(&user_id).map_err(gql)?,
        );
        let mut tx = begin(st).await?;
        let view = ops::orgs::member_update(st, &mut tx, caller, org, user, &input)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Remove a member (or leave, when it is yourself).
    async fn remove_member(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        user_id: ID,
    ) -> Result<Option<bool>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let (org, user) = (
            parse_org(&org_id).map_err(gql)?,
            parse_user(&user_id).map_err(gql)?,
        );
        let mut tx = begin(st).await?;
        ops::orgs::member_remove(st, &mut tx, caller, org, user)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(true))
    }

    /// Create an API key. The answer holds the secret `key`, shown this once.
    async fn create_api_key(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        input: CreateApiKeyInput,
    ) -> Result<Option<ApiKeyCreatedView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let org = parse_org(&org_id).map_err(gql)?;
        let mut tx = begin(st).await?;
        let view = ops::api_keys::create(st, &mut tx, caller, org, &input)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Revoke an API key; it stops working at once. Answers the revoked key.
    async fn revoke_api_key(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        key_id: ID,
    ) -> Result<Option<ApiKeyView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let org = parse_org(&org_id).map_err(gql)?;
        let mut tx = begin(st).await?;
        let view = ops::api_keys::revoke(st, &mut tx, caller, org, &key_id)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Create a pod (`pending` until the scheduler places it). Secret env values are stored
    /// encrypted and never shown again.
    async fn create_pod(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        input: CreatePodInput,
    ) -> Result<Option<PodView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let org = parse_org(&org_id).map_err(gql)?;
        let mut tx = begin(st).await?;
        let view = ops::pods::create(st, &mut tx, caller, org, &input)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Delete a pod: it becomes `terminated` and its capacity is free at once. Answers the pod.
    async fn delete_pod(&self, ctx: &Context<'_>, org_id: ID, id: ID) -> Result<Option<PodView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let org = parse_org(&org_id).map_err(gql)?;
        let mut tx = begin(st).await?;
        let view = ops::pods::delete(st, &mut tx, caller, org, &id)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Create an instance (as `POST /v1/orgs/{org}/instances`): a VM of a catalog image with
    /// whole GPUs passed through, `pending` until the scheduler places it.
    async fn create_instance(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        input: CreateInstanceInput,
    ) -> Result<Option<InstanceView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let org = parse_org(&org_id).map_err(gql)?;
        let mut tx = begin(st).await?;
        let view = ops::instances::create(st, &mut tx, caller, org, &input)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Power an instance off: its GPUs are given back, its disk stays on its node.
    async fn stop_instance(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        id: ID,
    ) -> Result<Option<InstanceView>> {
        power(ctx, org_id, id, Power::Stop).await
    }

    /// Power a stopped instance on again, on its node (`conflict` when it has no GPUs free).
    async fn start_instance(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        id: ID,
    ) -> Result<Option<InstanceView>> {
        power(ctx, org_id, id, Power::Start).await
    }

    /// Reboot a running instance.
    async fn reboot_instance(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        id: ID,
    ) -> Result<Option<InstanceView>> {
        power(ctx, org_id, id, Power::Reboot).await
    }

    /// Terminate an instance (as `DELETE …/instances/{id}`): its disk is destroyed, its
    /// capacity freed and billing stops. Answers the instance.
    async fn terminate_instance(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        id: ID,
    ) -> Result<Option<InstanceView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let org = parse_org(&org_id).map_err(gql)?;
        let mut tx = begin(st).await?;
        let view = ops::instances::delete(st, &mut tx, caller, org, &id)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Deploy a model server as an endpoint (as `POST /v1/orgs/{org}/endpoints`).
    async fn create_endpoint(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        input: CreateEndpointInput,
    ) -> Result<Option<EndpointView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let org = parse_org(&org_id).map_err(gql)?;
        let mut tx = begin(st).await?;
        let view = ops::endpoints::create(st, &mut tx, caller, org, &input)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Delete an endpoint: calls stop at once and its replicas are terminated.
    async fn delete_endpoint(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        id: ID,
    ) -> Result<Option<EndpointView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let org = parse_org(&org_id).map_err(gql)?;
        let mut tx = begin(st).await?;
        let view = ops::endpoints::delete(st, &mut tx, caller, org, &id)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Set (or with `price: null` remove) what orgs granted the endpoint pay per call (as
    /// `PUT`/`DELETE /v1/orgs/{org}/endpoints/{id}/price`).
    async fn set_endpoint_price(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        id: ID,
        price: Option<EndpointPriceSpec>,
    ) -> Result<Option<EndpointView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let org = parse_org(&org_id).map_err(gql)?;
        let mut tx = begin(st).await?;
        let view = ops::endpoints::set_price(st, &mut tx, caller, org, &id, price.as_ref())
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Let another org's API keys call the endpoint (as `POST …/endpoints/{id}/grants`).
    async fn grant_endpoint(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        id: ID,
        #[graphql(desc = "The org to grant (`org_…`).")] grantee: ID,
    ) -> Result<Option<EndpointGrantView>> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let org = parse_org(&org_id).map_err(gql)?;
        let input = CreateEndpointGrantInput {
            org: grantee.to_string(),
        };
        let mut tx = begin(st).await?;
        let view = ops::endpoints::grant(st, &mut tx, caller, org, &id, &input)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(Some(view))
    }

    /// Take a grant back (as `DELETE …/endpoints/{id}/grants/{grantee}`).
    async fn revoke_endpoint_grant(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        id: ID,
        grantee: ID,
    ) -> Result<bool> {
        let (st, caller) = (state(ctx), caller(ctx)?);
        let org = parse_org(&org_id).map_err(gql)?;
        let mut tx = begin(st).await?;
        ops::endpoints::revoke_grant(st, &mut tx, caller, org, &id, &grantee)
            .await
            .map_err(gql)?;
        commit(tx).await?;
        Ok(true)
    }

    /// Operators only: cordon a node (it keeps its work, takes no new work).
    async fn cordon_node(&self, ctx: &Context<'_>, id: ID) -> Result<Option<NodeView>> {
        Ok(Some(
            ops::fleet::cordon(state(ctx), caller(ctx)?, &id)
                .await
                .map_err(gql)?,
        ))
    }

    /// Operators only: uncordon a node (it takes new work again; ends a drain).
    async fn uncordon_node(&self, ctx: &Context<'_>, id: ID) -> Result<Option<NodeView>> {
        Ok(Some(
            ops::fleet::uncordon(state(ctx), caller(ctx)?, &id)
                .await
                .map_err(gql)?,
        ))
    }

    /// Operators only: drain a node (no new work; its work is moved or stopped).
    async fn drain_node(&self, ctx: &Context<'_>, id: ID) -> Result<Option<NodeView>> {
        Ok(Some(
            ops::fleet::drain(state(ctx), caller(ctx)?, &id)
                .await
                .map_err(gql)?,
        ))
    }
}
