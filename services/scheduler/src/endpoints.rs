//! The endpoint controller: every live endpoint keeps `desired_replicas` live replicas. A
//! replica that failed, was lost with its node or was removed is replaced, and when the
//! autoscaler lowers the count the surplus is terminated; each change happens under the
//! endpoint's row lock, so two scheduler replicas never add or remove the same replica twice.

use std::future::Future;
use std::time::Duration;

use kiln_store::Store;

pub struct EndpointController {
    store: Store,
}

impl EndpointController {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// One pass: bring every endpoint to its desired replicas; answers the replicas added
    /// and removed.
    pub async fn pass(&self) -> Result<(i64, i64), kiln_store::StoreError> {
        let (mut added, mut removed) = (0, 0);
        for s in self.store.endpoint_replica_imbalances().await? {
            let n = self
                .store
                .endpoint_reconcile_replicas(s.endpoint_id)
                .await?;
            if n > 0 {
                tracing::info!(endpoint = %s.endpoint_id, added = n, "endpoint replicas added");
                added += n;
            } else if n < 0 {
                tracing::info!(endpoint = %s.endpoint_id, removed = -n, "endpoint replicas removed");
                removed -= n;
            }
        }
        Ok((added, removed))
    }

    /// Pass every `every` until `stop`.
    pub async fn run(self, every: Duration, stop: impl Future<Output = ()> + Send) {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "endpoint controller pass failed; retrying");
            }
            tokio::select! {
                biased;
                () = &mut stop => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}
