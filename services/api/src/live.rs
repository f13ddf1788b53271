//! Live views: wake the server-sent-event streams this replica serves when a workload changes.
//!
//! A trigger sends `NOTIFY kiln_workload_changed '<uuid>'` on every change of a workload's state,
//! reason or node (`migrations/…07_workload_notify.sql`). Each replica keeps one `LISTEN`
//! connection and a `watch` channel per workload someone here is watching; a woken stream
//! re-reads the workload from Postgres, so a lost notice costs latency (streams also re-read on
//! a timer), never correctness.

use std::time::Duration;

use kiln_store::Wakers;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use uuid::Uuid;

pub const CHANNEL: &str = "kiln_workload_changed";

#[derive(Debug, Clone, Default)]
pub struct LiveHub {
    watched: Wakers<Uuid>,
}

impl LiveHub {
    /// A receiver that changes whenever `workload` may have changed.
    pub fn subscribe(&self, workload: Uuid) -> watch::Receiver<u64> {
        self.watched.subscribe(workload)
    }

    fn wake(&self, workload: Option<Uuid>) {
        match workload {
            Some(id) => self.watched.wake(id, 0),
            None => self.watched.wake_all(),
        }
    }

    /// Listen until the process ends, reconnecting after failures (and waking everyone then,
    /// since notices may have been missed).
    pub fn spawn(&self, pool: PgPool) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = hub.listen(&pool).await {
                    tracing::warn!(error = %e, "workload listener failed; reconnecting");
                }
                hub.wake(None);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    async fn listen(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        self.wake(None);
        loop {
            let note = listener.recv().await?;
            self.wake(Uuid::parse_str(note.payload()).ok());
        }
    }
}
