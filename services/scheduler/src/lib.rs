//! `kiln-scheduler`: the control-plane process that faces the fleet.
//!
//! It hosts three things, all safe to run as several replicas over one Postgres:
//!
//! * the node-control gRPC service ([`kiln_fleet`]) agents dial out to, and
//! * the node [`lifecycle`] controller, which marks silent nodes unreachable and then lost
//!   (handing their work back), with conditional updates so replicas racing do each transition
//!   once.
//!
//! * the [`placer`], which turns pending workloads into committed placements with the pure
//!   [`kiln_placement`] core; replicas split the queue with `SKIP LOCKED` and the schema refuses
//!   any double allocation a race would cause.

pub mod autoscaler;
pub mod config;
pub mod endpoints;
pub mod lifecycle;
pub mod placer;

use std::future::Future;
use std::sync::Arc;

use kiln_fleet::{FleetConfig, NodeControlService};
use kiln_store::Store;
use tokio::net::TcpListener;

pub use autoscaler::Autoscaler;
pub use config::SchedulerConfig;
pub use endpoints::EndpointController;
pub use lifecycle::LifecycleController;
pub use placer::Placer;

/// Everything a running scheduler needs, bound to its listeners.
pub struct Scheduler {
    pub store: Store,
    pub config: SchedulerConfig,
    pub fleet_listener: TcpListener,
    pub ops_listener: TcpListener,
}

impl Scheduler {
    /// Serve node control and ops, and run the lifecycle controller, until `shutdown`; then
    /// start no new pass, end the agents' streams (they reconnect to another replica), give up
    /// the autoscaler's leadership, let what is under way finish, and return. The caller bounds
    /// how long that may take (`KILN_SHUTDOWN_GRACE_SECS` in the binary) and closes the pool.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Scheduler {
            store,
            config,
            fleet_listener,
            ops_listener,
        } = self;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let fleet_config = FleetConfig {
            heartbeat_interval: config.heartbeat_interval(),
            credential_cache_ttl: config.credential_cache(),
            ..FleetConfig::default()
        };
        let health_store = store.clone();
        let health: kiln_telemetry::HealthCheck = Arc::new(move || {
            let store = health_store.clone();
            Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
        });
        let ops = kiln_telemetry::ops_router::<()>("kiln-scheduler", health);
        let ops_stop = stopped(stop_rx.clone());
        let ops_task = tokio::spawn(async move {
            axum::serve(ops_listener, ops)
                .with_graceful_shutdown(ops_stop)
                .await
        });

        let controller = LifecycleController::new(store.clone(), config.liveness_policy());
        let tick = config.lifecycle_tick();
        let controller_stop = stopped(stop_rx.clone());
        let controller_task = tokio::spawn(controller.run(tick, controller_stop));

        let (liveness, own_liveness_pool) = match &config.liveness_database_url {
            Some(url) => (
                Store::connect_relaxed(url, config.db_max_connections).await?,
                true,
            ),
            None => (store.clone(), false),
        };
        let mut service = NodeControlService::new(store.clone(), fleet_config)
            .with_liveness_store(liveness.clone());
        if let Some(raw) = &config.secrets_key {
            service = service.with_secrets(kiln_auth::SecretBox::from_base64(raw)?);
        }
        let mut autoscaler_task = None;
        if let Some(url) = &config.redis_url {
            let logs = kiln_logs::LogStore::connect(url, &config.redis_namespace)
                .await
                .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))?;
            service = service.with_logs(logs);
            // The gateways record endpoints' load in Redis; without it nothing autoscales
            // (endpoints keep their desired replicas).
            let admission =
                kiln_ratelimit::admission::Admission::connect(url, &config.redis_namespace)
                    .await
                    .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))?;
            let autoscaler = Autoscaler::new(store.clone(), admission);
            autoscaler_task = Some(tokio::spawn(
                autoscaler.run(config.autoscale_tick(), stopped(stop_rx.clone())),
            ));
        }
        let placer = Placer::new(store.clone());
        let placer_stop = stopped(stop_rx.clone());
        let placer_task = tokio::spawn(placer.run(config.placement_tick(), placer_stop));
        let endpoints = EndpointController::new(store.clone());
        let endpoints_task =
            tokio::spawn(endpoints.run(config.placement_tick(), stopped(stop_rx.clone())));
        tracing::info!(
            fleet = %fleet_listener.local_addr()?,
            "kiln-scheduler serving node control"
        );
        kiln_fleet::serve_service(
            fleet_listener,
            service,
            store.pool().clone(),
            stopped(stop_rx),
        )
        .await?;
        controller_task.await?;
        placer_task.await?;
        endpoints_task.await?;
        if let Some(t) = autoscaler_task {
            t.await?;
        }
        ops_task.await??;
        if own_liveness_pool {
            liveness.pool().close().await;
        }
        Ok(())
    }
}
