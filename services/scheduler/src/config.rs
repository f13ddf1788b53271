//! `kiln-scheduler`'s settings, from flags or the environment.

use std::net::SocketAddr;
use std::time::Duration;

use kiln_domain::LivenessPolicy;

#[derive(Debug, Clone, clap::Args)]
pub struct SchedulerConfig {
    /// Where agents dial in (gRPC, HTTP/2).
    #[arg(long, env = "KILN_FLEET_LISTEN", default_value = "127.0.0.1:7070")]
    pub fleet_listen: SocketAddr,
    /// `/healthz` and `/metrics`.
    #[arg(
        long,
        env = "KILN_SCHEDULER_OPS_LISTEN",
        default_value = "127.0.0.1:9091"
    )]
    pub ops_listen: SocketAddr,
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    #[arg(long, env = "KILN_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Heartbeats and metrics samples go through a second pool whose commits do not wait for
    /// the WAL flush (they may be lost in a database crash; the next report restates them).
    /// Set by `main` to the database URL; `None` writes them through the main pool.
    #[arg(skip)]
    pub liveness_database_url: Option<String>,
    /// How often agents heartbeat.
    #[arg(long, env = "KILN_HEARTBEAT_INTERVAL_MS", default_value_t = 10_000)]
    pub heartbeat_interval_ms: u64,
    /// Silence after which a node is unreachable (its work is kept).
    #[arg(long, env = "KILN_NODE_UNREACHABLE_AFTER_MS", default_value_t = 30_000)]
    pub node_unreachable_after_ms: u64,
    /// Silence after which a node is lost (its work is handed back to the scheduler).
    #[arg(long, env = "KILN_NODE_LOST_AFTER_MS", default_value_t = 300_000)]
    pub node_lost_after_ms: u64,
    /// How often the lifecycle controller looks for silent nodes.
    #[arg(long, env = "KILN_LIFECYCLE_TICK_MS", default_value_t = 1_000)]
    pub lifecycle_tick_ms: u64,
    /// How often the placer looks for pending work when nothing woke it.
    #[arg(long, env = "KILN_PLACEMENT_TICK_MS", default_value_t = 1_000)]
    pub placement_tick_ms: u64,
    /// How often the autoscaler reads endpoints' load (a call held at zero replicas waits up
    /// to this long before a replica is asked for).
    #[arg(long, env = "KILN_AUTOSCALE_TICK_MS", default_value_t = 1_000)]
    pub autoscale_tick_ms: u64,
    /// How long a verified node credential is trusted without asking Postgres again.
    /// Revocations evict at once (Postgres NOTIFY); this bounds a missed notice.
    #[arg(long, env = "KILN_NODE_CREDENTIAL_CACHE_MS", default_value_t = 60_000)]
    pub node_credential_cache_ms: u64,

    /// Where workload output pushed by agents is kept (the API reads it from there). Unset:
    /// agents' `PushLogs` is refused and pod logs stay empty.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix for every Redis key of this deployment (the API's `KILN_REDIS_NAMESPACE`).
    #[arg(long, env = "KILN_REDIS_NAMESPACE", default_value = "kiln")]
    pub redis_namespace: String,
    /// The key pods' secret env values are sealed with (the API's `KILN_SECRETS_KEY`): the
    /// fleet service opens them as it streams a pod to its node. Unset: such pods fail there.
    #[arg(long, env = "KILN_SECRETS_KEY", hide_env_values = true)]
    pub secrets_key: Option<String>,
    /// After SIGTERM: no new placement pass starts, agents' streams end (they reconnect to
    /// another replica), passes under way finish; after this long whatever is still running
    /// is cut off (its transaction rolls back) and the process exits.
    #[arg(long, env = "KILN_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
}

/// A setting that makes no sense, said plainly.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error(
        "KILN_NODE_LOST_AFTER_MS ({lost} ms) must be longer than KILN_NODE_UNREACHABLE_AFTER_MS ({unreachable} ms)"
    )]
    LostBeforeUnreachable { lost: u64, unreachable: u64 },
    #[error(
        "KILN_NODE_UNREACHABLE_AFTER_MS ({unreachable} ms) must be longer than KILN_HEARTBEAT_INTERVAL_MS ({heartbeat} ms), or every node flaps"
    )]
    UnreachableBeforeHeartbeat { unreachable: u64, heartbeat: u64 },
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("KILN_HEARTBEAT_INTERVAL_MS", self.heartbeat_interval_ms),
            ("KILN_LIFECYCLE_TICK_MS", self.lifecycle_tick_ms),
            (
                "KILN_DB_MAX_CONNECTIONS",
                u64::from(self.db_max_connections),
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.node_unreachable_after_ms <= self.heartbeat_interval_ms {
            return Err(ConfigError::UnreachableBeforeHeartbeat {
                unreachable: self.node_unreachable_after_ms,
                heartbeat: self.heartbeat_interval_ms,
            });
        }
        if self.node_lost_after_ms <= self.node_unreachable_after_ms {
            return Err(ConfigError::LostBeforeUnreachable {
                lost: self.node_lost_after_ms,
                unreachable: self.node_unreachable_after_ms,
            });
        }
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn lifecycle_tick(&self) -> Duration {
        Duration::from_millis(self.lifecycle_tick_ms)
    }

    pub fn placement_tick(&self) -> Duration {
        Duration::from_millis(self.placement_tick_ms.max(10))
    }

    pub fn autoscale_tick(&self) -> Duration {
        Duration::from_millis(self.autoscale_tick_ms.max(50))
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn credential_cache(&self) -> Duration {
        Duration::from_millis(self.node_credential_cache_ms)
    }

    pub fn liveness_policy(&self) -> LivenessPolicy {
        LivenessPolicy {
            unreachable_after: Duration::from_millis(self.node_unreachable_after_ms),
            lost_after: Duration::from_millis(self.node_lost_after_ms),
        }
    }
}
