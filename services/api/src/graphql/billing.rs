//! Billing in GraphQL: the same operations as REST's `/v1/orgs/{org}/balance`, `…/ledger`,
//! `…/usage`, `…/invoices` and `POST …/credits`, merged into the root types.

use async_graphql::{Context, ID, Object, Result};

use super::{caller, gql, page_limit, state};
use crate::ops::billing::{
    AddCreditsInput, BalanceView, InvoiceList, InvoiceView, PostingList, PostingView, UsageParams,
    UsageView,
};
use crate::ops::{self, parse_org};

#[derive(Default)]
pub struct BillingQuery;

#[Object]
impl BillingQuery {
    /// The org's balance and credit terms.
    async fn balance(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
    ) -> Result<Option<BalanceView>> {
        let org = parse_org(&org_id).map_err(gql)?;
        Ok(Some(
            ops::billing::balance(state(ctx), caller(ctx)?, org)
                .await
                .map_err(gql)?,
        ))
    }

    /// The org's ledger postings, newest first.
    async fn ledger(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "Page size, 1–200 (default 50).")] limit: Option<i32>,
        #[graphql(desc = "`nextCursor` from the previous page.")] cursor: Option<String>,
    ) -> Result<Option<PostingList>> {
        let org = parse_org(&org_id).map_err(gql)?;
        Ok(Some(
            ops::billing::ledger(
                state(ctx),
                caller(ctx)?,
                org,
                page_limit(limit),
                cursor.as_deref(),
            )
            .await
            .map_err(gql)?,
        ))
    }

    /// Metered usage and cost over `[from, to)` grouped by `workload`, `gpu_type` or `day`.
    async fn usage(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "RFC 3339 or YYYY-MM-DD; default: the start of this month.")] from: Option<
            String,
        >,
        #[graphql(desc = "RFC 3339 or YYYY-MM-DD, exclusive; default: now.")] to: Option<String>,
        #[graphql(desc = "`workload` (default), `gpu_type` or `day`.")] group_by: Option<String>,
    ) -> Result<Option<UsageView>> {
        let org = parse_org(&org_id).map_err(gql)?;
        let params = UsageParams {
            from,
            to,
            group_by,
            format: None,
        };
        Ok(Some(
            ops::billing::usage(state(ctx), caller(ctx)?, org, &params)
                .await
                .map_err(gql)?,
        ))
    }

    /// The org's monthly invoices, newest month first.
    async fn invoices(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "Page size, 1–200 (default 50).")] limit: Option<i32>,
        #[graphql(desc = "`nextCursor` from the previous page.")] cursor: Option<String>,
    ) -> Result<Option<InvoiceList>> {
        let org = parse_org(&org_id).map_err(gql)?;
        Ok(Some(
            ops::billing::invoices(
                state(ctx),
                caller(ctx)?,
                org,
                page_limit(limit),
                cursor.as_deref(),
            )
            .await
            .map_err(gql)?,
        ))
    }

    /// One invoice of the org (`not-found` otherwise).
    async fn invoice(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The org's id (`org_…`).")] org_id: ID,
        #[graphql(desc = "The invoice's id (`inv_…`).")] id: ID,
    ) -> Result<Option<InvoiceView>> {
        let org = parse_org(&org_id).map_err(gql)?;
        Ok(Some(
            ops::billing::invoice(state(ctx), caller(ctx)?, org, &id)
                .await
                .map_err(gql)?,
        ))
    }
}

#[derive(Default)]
pub struct BillingMutation;

#[Object]
impl BillingMutation {
    /// Operators: credit the org, idempotent on `reference` (the same reference answers the
    /// first posting and credits nothing more).
    async fn add_credits(
        &self,
        ctx: &Context<'_>,
        org_id: ID,
        input: AddCreditsInput,
    ) -> Result<Option<PostingView>> {
        let st = state(ctx);
        let org = parse_org(&org_id).map_err(gql)?;
        let mut tx = st.store.begin().await.map_err(|e| gql(e.into()))?;
        let (_, view) = ops::billing::add_credits(st, &mut tx, caller(ctx)?, org, &input)
            .await
            .map_err(gql)?;
        tx.commit()
            .await
            .map_err(|e| gql(kiln_store::StoreError::from(e).into()))?;
        Ok(Some(view))
    }
}
