//! Money: integer micro-units of a currency that is part of the type, so amounts in different
//! currencies cannot be added by mistake. Only checked arithmetic: overflow is an error.

use std::fmt;
use std::marker::PhantomData;

/// A currency, as a marker type.
pub trait Currency: Copy + Eq + Ord + fmt::Debug + Default + std::hash::Hash {
    /// ISO 4217 code, as carried in the API's `{"amount_micros", "currency"}`.
    const CODE: &'static str;
}

/// US dollars, the only currency so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd;

impl Currency for Usd {
    const CODE: &'static str = "USD";
}

/// Arithmetic that would not fit in an `i64` of micro-units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("money arithmetic overflowed")]
    Overflow,
}

/// An amount in micro-units (1e-6) of currency `C`. Signed: ledger lines are debits and credits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money<C: Currency = Usd> {
    pub micros: i64,
    currency: PhantomData<C>,
}

impl<C: Currency> Money<C> {
    pub const ZERO: Self = Self::from_micros(0);

    pub const fn from_micros(micros: i64) -> Self {
        Self {
            micros,
            currency: PhantomData,
        }
    }

    pub fn currency(&self) -> &'static str {
        C::CODE
    }

    pub fn is_zero(self) -> bool {
        self.micros == 0
    }

    pub fn is_negative(self) -> bool {
        self.micros < 0
    }

    pub fn checked_add(self, other: Self) -> Result<Self, MoneyError> {
        self.micros
            .checked_add(other.micros)
            .map(Self::from_micros)
            .ok_or(MoneyError::Overflow)
    }

    pub fn checked_sub(self, other: Self) -> Result<Self, MoneyError> {
        self.micros
            .checked_sub(other.micros)
            .map(Self::from_micros)
            .ok_or(MoneyError::Overflow)
    }

    pub fn checked_neg(self) -> Result<Self, MoneyError> {
        self.micros
            .checked_neg()
            .map(Self::from_micros)
            .ok_or(MoneyError::Overflow)
    }

    pub fn checked_mul(self, factor: i64) -> Result<Self, MoneyError> {
        self.micros
            .checked_mul(factor)
            .map(Self::from_micros)
            .ok_or(MoneyError::Overflow)
    }

    /// The sum of `amounts`, or an error if any partial sum overflows.
    pub fn checked_sum<I: IntoIterator<Item = Self>>(amounts: I) -> Result<Self, MoneyError> {
        amounts.into_iter().try_fold(Self::ZERO, Self::checked_add)
    }

    /// An exact `i128` micro-unit count narrowed to money, or an overflow error.
    pub fn try_from_i128(micros: i128) -> Result<Self, MoneyError> {
        i64::try_from(micros)
            .map(Self::from_micros)
            .map_err(|_| MoneyError::Overflow)
    }

    pub fn min(self, other: Self) -> Self {
        if self <= other { self } else { other }
    }
}

impl<C: Currency> fmt::Debug for Money<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}µ{}", self.micros, C::CODE)
    }
}

/// `12.345600 USD`: exact decimal rendering, for humans and invoices.
impl<C: Currency> fmt::Display for Money<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.micros < 0 { "-" } else { "" };
        let abs = self.micros.unsigned_abs();
        write!(
            f,
            "{sign}{}.{:06} {}",
            abs / 1_000_000,
            abs % 1_000_000,
            C::CODE
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type M = Money<Usd>;

    #[test]
    fn arithmetic_is_checked_and_never_wraps() {
        assert_eq!(
            M::from_micros(i64::MAX).checked_add(M::from_micros(1)),
            Err(MoneyError::Overflow)
        );
        assert_eq!(
            M::from_micros(i64::MIN).checked_sub(M::from_micros(1)),
            Err(MoneyError::Overflow)
        );
        assert_eq!(
            M::from_micros(i64::MIN).checked_neg(),
            Err(MoneyError::Overflow)
        );
        assert_eq!(
            M::from_micros(i64::MAX / 2 + 1).checked_mul(2),
            Err(MoneyError::Overflow)
        );
        assert_eq!(
            M::try_from_i128(i128::from(i64::MAX) + 1),
            Err(MoneyError::Overflow)
        );
        assert_eq!(
            M::checked_sum([M::from_micros(1), M::from_micros(2), M::from_micros(-3)]),
            Ok(M::ZERO)
        );
        assert_eq!(
            M::checked_sum([
                M::from_micros(i64::MAX),
                M::from_micros(1),
                M::from_micros(-5)
            ]),
            Err(MoneyError::Overflow)
        );
    }

    #[test]
    fn renders_exact_decimals() {
        assert_eq!(M::from_micros(1_234_500).to_string(), "1.234500 USD");
        assert_eq!(M::from_micros(-5).to_string(), "-0.000005 USD");
        assert_eq!(
            M::from_micros(i64::MIN).to_string(),
            "-9223372036854.775808 USD"
        );
        assert_eq!(M::ZERO.currency(), "USD");
    }
}
