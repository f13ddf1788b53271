//! Time: [`Timestamp`] is unix microseconds everywhere (exactly Postgres `timestamptz`'s
//! precision, so the adapter never rounds), and UTC calendar [`Month`]s for invoices.

use std::fmt;

use time::{Date, OffsetDateTime, UtcOffset};

pub const MICROS_PER_SECOND: i64 = 1_000_000;

/// An instant, in microseconds since the unix epoch (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const fn from_secs(secs: i64) -> Self {
        Self(secs * MICROS_PER_SECOND)
    }

    /// The whole second this instant falls in (rounded towards minus infinity). Billing counts
    /// the ticks between two instants as `b.second() - a.second()`, which is additive.
    pub const fn second(self) -> i64 {
        self.0.div_euclid(MICROS_PER_SECOND)
    }

    /// Whole seconds billed for `[self, end)`: the second ticks in `(self, end]`.
    pub fn billed_seconds_until(self, end: Timestamp) -> i64 {
        end.second() - self.second()
    }

    pub fn from_offset_datetime(t: OffsetDateTime) -> Option<Self> {
        i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000))
            .ok()
            .map(Self)
    }

    pub fn to_offset_datetime(self) -> Option<OffsetDateTime> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000).ok()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A UTC calendar month: the unit of invoices and budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    pub year: i32,
    /// 1..=12
    pub month: u8,
}

impl Month {
    pub fn new(year: i32, month: u8) -> Option<Self> {
        let m = time::Month::try_from(month).ok()?;
        Date::from_calendar_date(year, m, 1).ok()?;
        Some(Self { year, month })
    }

    /// The month `t` falls in. Panics only for instants outside `time`'s range (±9999 years).
    pub fn of(t: Timestamp) -> Self {
        let dt = t
            .to_offset_datetime()
            .expect("timestamp within ±9999 years");
        Self {
            year: dt.year(),
            month: u8::from(dt.month()),
        }
    }

    /// The first instant of the month.
    pub fn start(self) -> Timestamp {
        let m = time::Month::try_from(self.month).expect("valid month");
        let date = Date::from_calendar_date(self.year, m, 1).expect("valid date");
        let dt = date.midnight().assume_offset(UtcOffset::UTC);
        Timestamp::from_offset_datetime(dt).expect("in range")
    }

    pub fn next(self) -> Self {
        if self.month == 12 {
            Self {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Self {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The first instant after the month (the next month's start).
    pub fn end(self) -> Timestamp {
        self.next().start()
    }

    pub fn contains(self, t: Timestamp) -> bool {
        self.start() <= t && t < self.end()
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_round_towards_minus_infinity_and_add_up() {
        assert_eq!(Timestamp(1_999_999).second(), 1);
        assert_eq!(Timestamp(-1).second(), -1);
        let (a, b, c) = (
            Timestamp(10_900_000),
            Timestamp(11_100_000),
            Timestamp(13_000_000),
        );
        assert_eq!(a.billed_seconds_until(b), 1);
        assert_eq!(
            Timestamp(10_100_000).billed_seconds_until(Timestamp(10_900_000)),
            0
        );
        assert_eq!(
            a.billed_seconds_until(b) + b.billed_seconds_until(c),
            a.billed_seconds_until(c)
        );
    }

    #[test]
    fn months() {
        // 2026-11-22T00:00:00Z
        let t = Timestamp::from_secs(1_795_305_600);
        let m = Month::of(t);
        assert_eq!(m.to_string(), "2026-11");
        assert_eq!(m.start(), Timestamp::from_secs(1_793_491_200));
        assert_eq!(m.end(), Month::new(2026, 12).unwrap().start());
        assert_eq!(
            Month::new(2026, 12).unwrap().next(),
            Month::new(2027, 1).unwrap()
        );
        assert!(m.contains(t) && !m.contains(m.end()) && m.contains(m.start()));
        assert_eq!(Month::of(Timestamp(m.end().0 - 1)), m);
        assert!(Month::new(2026, 13).is_none());
    }

    #[test]
    fn offset_datetime_round_trip() {
        let t = Timestamp(1_795_305_600_123_456);
        assert_eq!(
            Timestamp::from_offset_datetime(t.to_offset_datetime().unwrap()),
            Some(t)
        );
    }
}
