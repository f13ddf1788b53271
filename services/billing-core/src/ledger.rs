//! A double-entry, append-only ledger. Every posting's lines sum to zero (positive = value held
//! by or attributed to the account), every posting has an idempotency key, and balances are
//! derived from postings, never edited.
//!
//! Account names (as stored): `org:<id>:balance` (paid credit; negative = drawn on the credit
//! limit), `org:<id>:promo:<grant>` (one per promotional grant, so each has its own expiry),
//! `revenue:gpu`, `revenue:storage`, `revenue:inference`, `external:payments` (money that came in
//! from outside: negative by what was paid), `expense:promotions` (promotional credit given away).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::money::{Money, MoneyError};
use crate::rate::{Charge, Product};
use crate::time::Timestamp;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Account {
    OrgBalance(Uuid),
    OrgPromo { org: Uuid, grant: String },
    RevenueGpu,
    RevenueStorage,
    RevenueInference,
    ExternalPayments,
    ExpensePromotions,
}

impl Account {
    /// The org whose account this is, if it is an org's.
    pub fn org(&self) -> Option<Uuid> {
        match self {
            Self::OrgBalance(org) | Self::OrgPromo { org, .. } => Some(*org),
            _ => None,
        }
    }

    /// Where the revenue of a product goes.
    pub fn revenue_for(product: Product) -> Self {
        match product {
            Product::InstanceGpu | Product::PodGpu | Product::MigSlice | Product::GpuShare => {
                Self::RevenueGpu
            }
            Product::Storage => Self::RevenueStorage,
            Product::InferenceRequests
            | Product::InferencePromptTokens
            | Product::InferenceCompletionTokens => Self::RevenueInference,
        }
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OrgBalance(org) => write!(f, "org:{org}:balance"),
            Self::OrgPromo { org, grant } => write!(f, "org:{org}:promo:{grant}"),
            Self::RevenueGpu => f.write_str("revenue:gpu"),
            Self::RevenueStorage => f.write_str("revenue:storage"),
            Self::RevenueInference => f.write_str("revenue:inference"),
            Self::ExternalPayments => f.write_str("external:payments"),
            Self::ExpensePromotions => f.write_str("expense:promotions"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown account {0:?}")]
pub struct UnknownAccount(pub String);

impl FromStr for Account {
    type Err = UnknownAccount;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownAccount(s.to_string());
        Ok(match s {
            "revenue:gpu" => Self::RevenueGpu,
            "revenue:storage" => Self::RevenueStorage,
            "revenue:inference" => Self::RevenueInference,
            "external:payments" => Self::ExternalPayments,
            "expense:promotions" => Self::ExpensePromotions,
            _ => {
                let rest = s.strip_prefix("org:").ok_or_else(unknown)?;
                let (id, rest) = rest.split_once(':').ok_or_else(unknown)?;
                let org = Uuid::parse_str(id).map_err(|_| unknown())?;
                match rest.split_once(':') {
                    None if rest == "balance" => Self::OrgBalance(org),
                    Some(("promo", grant)) if !grant.is_empty() => Self::OrgPromo {
                        org,
                        grant: grant.to_string(),
                    },
                    _ => return Err(unknown()),
                }
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostingError {
    #[error("a posting needs an idempotency key")]
    EmptyKey,
    #[error("a posting needs at least two non-zero lines")]
    TooFewLines,
    #[error("a posting line is zero")]
    ZeroLine,
    #[error("posting lines sum to {0} micros, not zero")]
    Unbalanced(i128),
    #[error("amount must be positive")]
    NonPositiveAmount,
}

/// A balanced set of lines under an idempotency key. `at` is when it accrued (a charge's
/// period start, a top-up's receipt time): invoices attribute postings to months by it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Posting {
    key: String,
    at: Timestamp,
    lines: Vec<(Account, Money)>,
}

impl Posting {
    /// Refuses any posting whose lines do not sum to zero (exactly, in `i128`, so no overflow
    /// can hide an imbalance), that has fewer than two lines, or a zero line.
    pub fn new(
        key: impl Into<String>,
        at: Timestamp,
        lines: Vec<(Account, Money)>,
    ) -> Result<Self, PostingError> {
        let key = key.into();
        if key.is_empty() {
            return Err(PostingError::EmptyKey);
        }
        if lines.len() < 2 {
            return Err(PostingError::TooFewLines);
        }
        if lines.iter().any(|(_, m)| m.is_zero()) {
            return Err(PostingError::ZeroLine);
        }
        let sum: i128 = lines.iter().map(|(_, m)| i128::from(m.micros)).sum();
        if sum != 0 {
            return Err(PostingError::Unbalanced(sum));
        }
        Ok(Self { key, at, lines })
    }

    /// A paid top-up (operator credit or payment webhook), idempotent on `reference`.
    pub fn top_up(
        org: Uuid,
        amount: Money,
        reference: &str,
        at: Timestamp,
    ) -> Result<Self, PostingError> {
        if amount.micros <= 0 {
            return Err(PostingError::NonPositiveAmount);
        }
        Self::new(
            format!("topup:{reference}"),
            at,
            vec![
                (
                    Account::ExternalPayments,
                    Money::from_micros(-amount.micros),
                ),
                (Account::OrgBalance(org), amount),
            ],
        )
    }

    /// Promotional credit for `org` (its own account per `grant`, so each grant has its own
    /// expiry), idempotent on the grant.
    pub fn promo_grant(
        org: Uuid,
        grant: &str,
        amount: Money,
        at: Timestamp,
    ) -> Result<Self, PostingError> {
        if amount.micros <= 0 {
            return Err(PostingError::NonPositiveAmount);
        }
        let account = Account::OrgPromo {
            org,
            grant: grant.to_string(),
        };
        let neg = Money::from_micros(-amount.micros);
        Self::new(
            format!("promo:{org}:{grant}"),
            at,
            vec![(Account::ExpensePromotions, neg), (account, amount)],
        )
    }

    /// The unspent `remaining` of an expired promo account, posted back out to
    /// `expense:promotions` at its expiry; one per account.
    pub fn promo_expiry(
        account: Account,
        remaining: Money,
        expired_at: Timestamp,
    ) -> Result<Self, PostingError> {
        if remaining.micros <= 0 {
            return Err(PostingError::NonPositiveAmount);
        }
        Self::new(
            format!("promo-expiry:{account}"),
            expired_at,
            vec![
                (account, Money::from_micros(-remaining.micros)),
                (Account::ExpensePromotions, remaining),
            ],
        )
    }

    /// The posting of a charge: `promos` (the org's promotional accounts usable at the charge's
    /// start with their positive balances, soonest expiry first) are spent first, the rest is
    /// drawn from the paid balance (which may go negative: the credit limit is enforced by
    /// [`crate::limits`], not by refusing to record what was used). The revenue account of the
    /// product receives the whole amount. A ledger kept elsewhere (a database) calls this with
    /// the promos it read under the org's lock; [`Ledger::post_charge`] with its own.
    pub fn for_charge(charge: &Charge, promos: &[(Account, Money)]) -> Result<Self, LedgerError> {
        if charge.amount.micros <= 0 {
            return Err(PostingError::NonPositiveAmount.into());
        }
        let mut remaining = charge.amount;
        let mut lines = Vec::new();
        for (account, balance) in promos {
            if remaining.is_zero() {
                break;
            }
            if balance.micros <= 0 || account.org() != Some(charge.org) {
                continue;
            }
            let take = (*balance).min(remaining);
            remaining = remaining.checked_sub(take)?;
            lines.push((account.clone(), take.checked_neg()?));
        }
        if !remaining.is_zero() {
            lines.push((Account::OrgBalance(charge.org), remaining.checked_neg()?));
        }
        lines.push((Account::revenue_for(charge.product), charge.amount));
        Ok(Self::new(charge.key.clone(), charge.start, lines)?)
    }

    /// A caller's payment for calls to another org's endpoint (`charge.org` pays `payee`, the
    /// owner). Drawn from the caller's paid balance only: promotional credit is the operator's
    /// gift to that org and is not turned into money for another.
    pub fn for_resale(charge: &Charge, payee: Uuid) -> Result<Self, LedgerError> {
        if charge.amount.micros <= 0 {
            return Err(PostingError::NonPositiveAmount.into());
        }
        if payee == charge.org {
            return Err(PostingError::TooFewLines.into());
        }
        Ok(Self::new(
            charge.key.clone(),
            charge.start,
            vec![
                (
                    Account::OrgBalance(charge.org),
                    charge.amount.checked_neg()?,
                ),
                (Account::OrgBalance(payee), charge.amount),
            ],
        )?)
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn at(&self) -> Timestamp {
        self.at
    }

    pub fn lines(&self) -> &[(Account, Money)] {
        &self.lines
    }

    /// Whether this posting records a charge (rated usage), by its key.
    pub fn is_charge(&self) -> bool {
        self.key.starts_with("charge:") || self.key.starts_with("usage:")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posted {
    /// Appended.
    New,
    /// The same key with the same lines was already there: nothing changed.
    Duplicate,
    /// Nothing to post (a zero-amount charge).
    Nothing,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("key {0:?} was already posted with different lines")]
    KeyConflict(String),
    #[error(transparent)]
    Posting(#[from] PostingError),
    #[error(transparent)]
    Money(#[from] MoneyError),
}

/// What an org can spend: paid balance and unexpired promotional credit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrgFunds {
    pub paid: Money,
    pub promo: Money,
}

impl OrgFunds {
    pub fn total(self) -> Result<Money, MoneyError> {
        self.paid.checked_add(self.promo)
    }
}

/// The ledger: postings in order, plus derived state (balances, promo expiries) kept in step.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    postings: Vec<Posting>,
    by_key: HashMap<String, usize>,
    balances: BTreeMap<Account, Money>,
    promo_expiry: BTreeMap<Account, Timestamp>,
}

/// Balances by folding postings: the definition the ledger's running balances must equal.
pub fn fold_balances<'a>(
    postings: impl IntoIterator<Item = &'a Posting>,
) -> Result<BTreeMap<Account, Money>, MoneyError> {
    let mut out: BTreeMap<Account, Money> = BTreeMap::new();
    for p in postings {
        for (account, amount) in &p.lines {
            let b = out.entry(account.clone()).or_default();
            *b = b.checked_add(*amount)?;
        }
    }
    Ok(out)
}

/// Appends `posting` to `ledger` (see [`Ledger::post`]).
pub fn post(ledger: &mut Ledger, posting: Posting) -> Result<Posted, LedgerError> {
    ledger.post(posting)
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn postings(&self) -> &[Posting] {
        &self.postings
    }

    pub fn get(&self, key: &str) -> Option<&Posting> {
        self.by_key.get(key).map(|&i| &self.postings[i])
    }

    pub fn contains(&self, key: &str) -> bool {
        self.by_key.contains_key(key)
    }

    pub fn balances(&self) -> &BTreeMap<Account, Money> {
        &self.balances
    }

    pub fn balance(&self, account: &Account) -> Money {
        self.balances.get(account).copied().unwrap_or_default()
    }

    /// Idempotent on the key: the same key with the same lines (and time) is a no-op; with
    /// anything different it is an error. All or nothing: an overflow changes nothing.
    pub fn post(&mut self, posting: Posting) -> Result<Posted, LedgerError> {
        if let Some(existing) = self.get(&posting.key) {
            return if *existing == posting {
                Ok(Posted::Duplicate)
            } else {
                Err(LedgerError::KeyConflict(posting.key))
            };
        }
        let mut updated = Vec::with_capacity(posting.lines.len());
        for (account, amount) in &posting.lines {
            let current = updated
                .iter()
                .rev()
                .find(|(a, _)| a == account)
                .map(|(_, m): &(Account, Money)| *m)
                .unwrap_or_else(|| self.balance(account));
            updated.push((account.clone(), current.checked_add(*amount)?));
        }
        for (account, balance) in updated {
            self.balances.insert(account, balance);
        }
        self.by_key.insert(posting.key.clone(), self.postings.len());
        self.postings.push(posting);
        Ok(Posted::New)
    }

    /// Grants promotional credit to `org`, spendable until `expires_at`; idempotent on `grant`.
    pub fn grant_promo(
        &mut self,
        org: Uuid,
        grant: &str,
        amount: Money,
        expires_at: Timestamp,
        at: Timestamp,
    ) -> Result<Posted, LedgerError> {
        let account = Account::OrgPromo {
            org,
            grant: grant.to_string(),
        };
        let posting = Posting::promo_grant(org, grant, amount, at)?;
        if let Some(&known) = self.promo_expiry.get(&account)
            && known != expires_at
        {
            return Err(LedgerError::KeyConflict(posting.key));
        }
        let posted = self.post(posting)?;
        self.promo_expiry.insert(account, expires_at);
        Ok(posted)
    }

    /// The org's promo accounts usable at `at`, soonest expiry first, with their balances.
    fn usable_promos(&self, org: Uuid, at: Timestamp) -> Vec<(Account, Money)> {
        let mut promos: Vec<(Timestamp, Account, Money)> = self
            .promo_expiry
            .iter()
            .filter(|(a, expires)| a.org() == Some(org) && **expires > at)
            .map(|(a, expires)| (*expires, a.clone(), self.balance(a)))
            .filter(|(_, _, balance)| balance.micros > 0)
            .collect();
        promos.sort();
        promos.into_iter().map(|(_, a, m)| (a, m)).collect()
    }

    pub fn org_funds(&self, org: Uuid, at: Timestamp) -> Result<OrgFunds, MoneyError> {
        let promo = Money::checked_sum(self.usable_promos(org, at).into_iter().map(|(_, m)| m))?;
        Ok(OrgFunds {
            paid: self.balance(&Account::OrgBalance(org)),
            promo,
        })
    }

    /// Posts a charge under its own key: promotional credit usable at the charge's start is
    /// spent first (soonest expiry first), the rest from the paid balance (which may go
    /// negative: the credit limit is enforced by [`crate::limits`], not by refusing to record
    /// what was used). Posting an already posted charge is a no-op, whatever the balances now.
    pub fn post_charge(&mut self, charge: &Charge) -> Result<Posted, LedgerError> {
        if self.contains(&charge.key) {
            return Ok(Posted::Duplicate);
        }
        if charge.amount.micros < 0 {
            return Err(PostingError::NonPositiveAmount.into());
        }
        if charge.amount.is_zero() {
            return Ok(Posted::Nothing);
        }
        let promos = self.usable_promos(charge.org, charge.start);
        self.post(Posting::for_charge(charge, &promos)?)
    }

    /// Posts the unspent remainder of every promo grant expired by `now` back out to
    /// `expense:promotions`. Returns the keys posted. Idempotent.
    pub fn expire_promos(&mut self, now: Timestamp) -> Result<Vec<String>, LedgerError> {
        let expired: Vec<(Account, Timestamp, Money)> = self
            .promo_expiry
            .iter()
            .filter(|(_, expires)| **expires <= now)
            .map(|(a, e)| (a.clone(), *e, self.balance(a)))
            .filter(|(_, _, balance)| balance.micros > 0)
            .collect();
        let mut keys = Vec::new();
        for (account, expires, balance) in expired {
            let posting = Posting::promo_expiry(account, balance, expires)?;
            keys.push(posting.key.clone());
            self.post(posting)?;
        }
        Ok(keys)
    }
}
