//! `kiln-api` settings: flags, or the environment variables named beside each, with defaults
//! suited to the local stack.

use std::net::SocketAddr;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct ApiConfig {
    /// Address to serve REST, GraphQL and the console on.
    #[arg(long, env = "KILN_API_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://kiln:kiln@127.0.0.1:5432/kiln"
    )]
    pub database_url: String,
    /// Maximum PostgreSQL connections in this process's pool.
    /// Small pools serve more requests per second on few cores (fewer backends to switch between).
    #[arg(long, env = "KILN_DB_MAX_CONNECTIONS", default_value_t = 8)]
    pub db_max_connections: u32,
    /// How long a user's `/v1/me` answer may be reused, in milliseconds (0 = never). Membership
    /// changes made through this process forget it at once; other replicas within this bound.
    #[arg(long, env = "KILN_ME_CACHE_MS", default_value_t = 1000)]
    pub me_cache_ms: u64,
    /// Redis URL (rate limits and session-revocation fan-out).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Prefix for every Redis key this deployment uses.
    #[arg(long, env = "KILN_REDIS_NAMESPACE", default_value = "kiln")]
    pub redis_namespace: String,
    /// The URL users reach this API at (links in the console, `iss` of tokens).
    #[arg(long, env = "KILN_PUBLIC_URL", default_value = "http://127.0.0.1:8080")]
    pub public_url: String,
    /// Access-token lifetime in seconds.
    #[arg(long, env = "KILN_ACCESS_TOKEN_TTL_SECS", default_value_t = 900)]
    pub access_token_ttl_secs: i64,
    /// Session (refresh-token family) lifetime in days.
    #[arg(long, env = "KILN_SESSION_TTL_DAYS", default_value_t = 30)]
    pub session_ttl_days: i64,
    /// Rotate the JWT signing key when the newest is older than this many hours.
    #[arg(long, env = "KILN_SIGNING_KEY_ROTATE_HOURS", default_value_t = 24 * 7)]
    pub signing_key_rotate_hours: i64,
    /// Sign-in attempts allowed per client IP per minute.
    #[arg(long, env = "KILN_LOGIN_LIMIT_PER_IP", default_value_t = 30)]
    pub login_limit_per_ip: u32,
    /// Sign-in attempts allowed per account per minute.
    #[arg(long, env = "KILN_LOGIN_LIMIT_PER_ACCOUNT", default_value_t = 10)]
    pub login_limit_per_account: u32,
    /// Sign-ups allowed per client IP per hour.
    #[arg(long, env = "KILN_SIGNUP_LIMIT_PER_IP", default_value_t = 20)]
    pub signup_limit_per_ip: u32,
    /// Sign-up attempts allowed per email address per hour.
    #[arg(long, env = "KILN_SIGNUP_LIMIT_PER_ACCOUNT", default_value_t = 5)]
    pub signup_limit_per_account: u32,
    /// Take the client address from `X-Forwarded-For` (only behind a trusted proxy).
    #[arg(long, env = "KILN_TRUST_FORWARDED_FOR", default_value_t = false)]
    pub trust_forwarded_for: bool,
    /// Operator account to create or update at start-up (with `--admin-password`).
    #[arg(long, env = "KILN_ADMIN_EMAIL")]
    pub admin_email: Option<String>,
    /// The operator account's password.
    #[arg(long, env = "KILN_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// Mark session cookies `Secure` (set when serving over HTTPS).
    #[arg(long, env = "KILN_SECURE_COOKIES", default_value_t = false)]
    pub secure_cookies: bool,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "KILN_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// The key that encrypts secret environment values of pods at rest: 32 random bytes,
    /// base64-encoded (`openssl rand -base64 32`). Without it, pods with secret env values are
    /// refused; a malformed value stops start-up.
    #[arg(long, env = "KILN_SECRETS_KEY", hide_env_values = true)]
    pub secrets_key: Option<String>,
    /// The shared secret the payment provider signs webhooks with (HMAC-SHA256). Without it,
    /// `POST /v1/billing/webhook` answers 404.
    #[arg(long, env = "KILN_BILLING_WEBHOOK_SECRET", hide_env_values = true)]
    pub billing_webhook_secret: Option<String>,
    /// How long after a month ends its invoices become final (kiln-billing's setting of the
    /// same name; on-demand invoices before then are drafts).
    #[arg(long, env = "KILN_INVOICE_CLOSE_DELAY_MS", default_value_t = 3_600_000)]
    pub invoice_close_delay_ms: u64,
    /// The gateway's public base URL: endpoints' URLs are `<this>/v1/endpoints/<id>`.
    #[arg(
        long,
        env = "KILN_GATEWAY_URL",
        default_value = "http://127.0.0.1:8090"
    )]
    pub gateway_url: String,
    /// CPU and memory an instance (VM) gets per GPU it has, e.g. `cpu_millis=8000,memory_mib=65536`
    /// (either may be left out; empty: 8 cores and 64 GiB per GPU).
    #[arg(long, env = "KILN_INSTANCE_SHAPE", default_value = "", value_parser = crate::ops::instances::parse_shape)]
    pub instance_shape: crate::ops::instances::Shape,
    /// On SIGTERM: stop accepting, end live streams, let requests in flight finish for at most
    /// this many seconds, then exit.
    #[arg(long, env = "KILN_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
}

impl ApiConfig {
    /// Settings for tests: everything default except what the caller sets.
    pub fn for_tests(database_url: String, redis_url: String, namespace: String) -> Self {
        Self {
            listen: ([127, 0, 0, 1], 0).into(),
            database_url,
            db_max_connections: 8,
            me_cache_ms: 1000,
            redis_url,
            redis_namespace: namespace,
            public_url: "http://127.0.0.1".into(),
            access_token_ttl_secs: 900,
            session_ttl_days: 30,
            signing_key_rotate_hours: 24 * 7,
            login_limit_per_ip: 1000,
            login_limit_per_account: 1000,
            signup_limit_per_ip: 1000,
            signup_limit_per_account: 1000,
            trust_forwarded_for: false,
            admin_email: None,
            admin_password: None,
            secure_cookies: false,
            max_body_bytes: 1024 * 1024,
            // A fixed key for tests only (32 bytes of 0x6b, base64).
            secrets_key: Some("a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=".into()),
            billing_webhook_secret: Some("test-webhook-secret".into()),
            invoice_close_delay_ms: 3_600_000,
            gateway_url: "http://127.0.0.1:8090".into(),
            instance_shape: crate::ops::instances::Shape::default(),
            shutdown_grace_secs: 25,
        }
    }

    pub fn invoice_close_delay(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.invoice_close_delay_ms)
    }
}
