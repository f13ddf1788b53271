//! Monthly invoices: a month's charges grouped by product, GPU type and detail (MIG profile).

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::ledger::Ledger;
use crate::money::{Money, MoneyError};
use crate::rate::{Charge, Product, Unit};
use crate::time::Month;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvoiceLine {
    pub product: Product,
    pub gpu_type: Option<String>,
    pub detail: Option<String>,
    pub unit: Unit,
    pub quantity: i64,
    pub amount: Money,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invoice {
    pub org: Uuid,
    pub month: Month,
    /// Ordered by product, GPU type, detail.
    pub lines: Vec<InvoiceLine>,
    pub total: Money,
}

/// The invoice of `org` for `month` from its charges (others' and other months' are ignored; a
/// charge belongs to the month of its start, and rating never lets a charge cross a month).
/// Charges are deduplicated by key, as the ledger does.
pub fn invoice(org: Uuid, month: Month, charges: &[Charge]) -> Result<Invoice, MoneyError> {
    let mut seen = std::collections::HashSet::new();
    let mut groups: BTreeMap<(Product, Option<String>, Option<String>), InvoiceLine> =
        BTreeMap::new();
    for c in charges {
        if c.org != org || Month::of(c.start) != month || !seen.insert(c.key.as_str()) {
            continue;
        }
        let line = groups
            .entry((c.product, c.gpu_type.clone(), c.detail.clone()))
            .or_insert_with(|| InvoiceLine {
                product: c.product,
                gpu_type: c.gpu_type.clone(),
                detail: c.detail.clone(),
                unit: c.unit,
                quantity: 0,
                amount: Money::ZERO,
            });
        line.quantity = line
            .quantity
            .checked_add(c.quantity)
            .ok_or(MoneyError::Overflow)?;
        line.amount = line.amount.checked_add(c.amount)?;
    }
    let lines: Vec<InvoiceLine> = groups.into_values().collect();
    let total = Money::checked_sum(lines.iter().map(|l| l.amount))?;
    Ok(Invoice {
        org,
        month,
        lines,
        total,
    })
}

/// What the ledger charged `org` in `month`: the sum drawn from the org's accounts by charge
/// postings accruing in that month. An invoice reconciles when its total equals this.
pub fn ledger_charged_in_month(
    ledger: &Ledger,
    org: Uuid,
    month: Month,
) -> Result<Money, MoneyError> {
    let mut total = Money::ZERO;
    for p in ledger
        .postings()
        .iter()
        .filter(|p| p.is_charge() && month.contains(p.at()))
    {
        for (account, amount) in p.lines() {
            if account.org() == Some(org) {
                total = total.checked_sub(*amount)?;
            }
        }
    }
    Ok(total)
}
