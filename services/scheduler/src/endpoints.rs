//! The endpoint controller: every live endpoint keeps `desired_replicas` live replicas. A
//! replica that failed, was lost with its node or was removed is replaced; each top-up happens
//! under the endpoint's row lock, so two scheduler replicas never add the same replica twice.

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

    /// One pass: top up every endpoint short of replicas; answers how many were added.
    pub async fn pass(&self) -> Result<i64, kiln_store::StoreError> {
        let mut added = 0;
        for s in self.store.endpoint_replica_shortfalls().await? {
            let n = self.store.endpoint_top_up(s.endpoint_id).await?;
            if n > 0 {
                tracing::info!(endpoint = %s.endpoint_id, added = n, "endpoint replicas replaced");
            }
            added += n;
        }
        Ok(added)
    }

    /// Pass every `every` until `stop`.
    pub async fn run(self, every: Duration, stop: impl Future<Output = ()> + Send) {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "endpoint controller pass failed; retrying");
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}
