//! The pure core of Kiln billing: plain functions over plain data, no I/O, no async, no floats.
//!
//! * [`money`] — [`Money`]: integer micro-units of a typed currency, checked arithmetic only.
//! * [`time`] — [`Timestamp`] (unix microseconds, the precision of Postgres `timestamptz`) and
//!   calendar [`Month`]s.
//! * [`price`] — the versioned [`PriceBook`]; [`PriceBook::price_at`] picks the version in effect.
//! * [`meter`] — billable intervals from a workload's state history.
//! * [`rate`] — intervals and usage events into [`Charge`]s, incrementally and idempotently.
//! * [`ledger`] — a double-entry, append-only ledger with idempotent postings and promo credits.
//! * [`limits`] — credit-limit and budget decisions.
//! * [`invoice`] — monthly invoice lines that reconcile with the ledger.
//!
//! # The rounding rule
//!
//! Usage is integer seconds: an interval `[a, b)` counts the whole-second ticks in `(a, b]`,
//! `secs = floor(b / 1s) - floor(a / 1s)`, which is additive under any split. Within one billable
//! interval (a running period, or a stopped instance's storage period) starting at `S`, the money
//! accrued up to `t` is `F(t) = floor(N(t) / D)` where `N(t)` is the exact integer sum over the
//! seconds in `[S, t)` of (price in effect × quantity × spot factor in basis points) and `D` is the
//! product's fixed denominator (seconds per price period × quantity denominator × 10 000). A
//! charge for `[x, y)` is `F(y) - F(x)`. Charges therefore telescope: however an interval is cut —
//! at price versions, month boundaries, or by rating every minute — the sum of its charges is
//! exactly `floor(N(end) / D)`, the charge for the whole interval, never more than the exact
//! amount and less by under one micro-unit per interval. Endpoint calls are rated in aggregates
//! ([`calls`]): each component (requests, prompt tokens, completion tokens) of an aggregate is
//! rounded down to a micro once.

pub mod calls;
pub mod invoice;
pub mod ledger;
pub mod limits;
pub mod meter;
pub mod money;
pub mod price;
pub mod rate;
pub mod time;

pub use calls::{MeteredCall, RESALE_DETAIL, RatedCalls, Resale, is_billable, rate_calls};
pub use invoice::{Invoice, InvoiceLine, invoice, ledger_charged_in_month};
pub use ledger::{
    Account, Ledger, LedgerError, OrgFunds, Posted, Posting, PostingError, fold_balances, post,
};
pub use limits::{AlertLevel, CreditPolicy, Decision, Operation, budget_decision, credit_decision};
pub use meter::{BillableInterval, IntervalKind, State, Transition, meter};
pub use money::{Currency, Money, MoneyError, Usd};
pub use price::{EndpointPrices, GpuPrices, PriceBook, PriceBookError, PriceVersion, Prices};
pub use rate::{
    Charge, GpuRequest, Product, RateError, Tier, Unit, UsageEvent, WorkloadKind, WorkloadShape,
    rate, rate_until, rate_usage, usage_charges,
};
pub use time::{Month, Timestamp};
