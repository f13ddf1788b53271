//! `kiln-billing`'s settings, from flags or the environment.

use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct BillingConfig {
    /// `/healthz` and `/metrics`.
    #[arg(
        long,
        env = "KILN_BILLING_OPS_LISTEN",
        default_value = "127.0.0.1:9092"
    )]
    pub ops_listen: SocketAddr,
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    #[arg(long, env = "KILN_DB_MAX_CONNECTIONS", default_value_t = 8)]
    pub db_max_connections: u32,
    /// How often usage is rated into charges (and limits, promotional expiry and month close
    /// looked at). Balances are current to within this plus `KILN_RATING_SETTLE_MS`.
    #[arg(long, env = "KILN_RATING_TICK_MS", default_value_t = 15_000)]
    pub rating_tick_ms: u64,
    /// How far behind now rating stops, so state changes still committing are seen.
    #[arg(long, env = "KILN_RATING_SETTLE_MS", default_value_t = 2_000)]
    pub rating_settle_ms: u64,
    /// How long an org's running work keeps going after it runs out of credit.
    #[arg(long, env = "KILN_BILLING_GRACE_MS", default_value_t = 300_000)]
    pub grace_ms: u64,
    /// How long after a month ends its final invoices are written (late charges rated first).
    #[arg(long, env = "KILN_INVOICE_CLOSE_DELAY_MS", default_value_t = 3_600_000)]
    pub invoice_close_delay_ms: u64,
    /// After SIGTERM no new tick starts and the one under way finishes (each of its
    /// transactions commits); after this long it is cut off (what it had not committed rolls
    /// back, to be done again by the next replica's tick) and the process exits.
    #[arg(long, env = "KILN_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
}

impl BillingConfig {
    /// Settings for tests: a database URL and nothing else changed.
    pub fn for_tests(database_url: String) -> Self {
        Self {
            ops_listen: "127.0.0.1:0".parse().expect("literal address"),
            database_url,
            db_max_connections: 4,
            rating_tick_ms: 100,
            rating_settle_ms: 0,
            grace_ms: 0,
            invoice_close_delay_ms: 3_600_000,
            shutdown_grace_secs: 25,
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.rating_tick_ms.max(10))
    }

    pub fn settle(&self) -> Duration {
        Duration::from_millis(self.rating_settle_ms)
    }

    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }

    pub fn invoice_close_delay(&self) -> Duration {
        Duration::from_millis(self.invoice_close_delay_ms)
    }
}
