//! Wakes the assignment streams this replica holds when a node's log grows, wherever the change
//! was written.
//!
//! Every assignment change sends `NOTIFY kiln_node_assignments, '<node uuid>:<revision>'` in its
//! transaction (see `kiln_store::fleet`). Each replica runs one `LISTEN` connection and keeps a
//! `watch` channel per node whose stream it currently holds; the map is only "who here is
//! waiting", never the source of truth — a woken stream re-reads the log from Postgres. If the
//! listener connection drops, notifications may have been missed, so every waiting stream is
//! woken to re-read; streams also re-read on a timer, so a lost wake-up costs latency, not
//! correctness.
//!
//! The same connection listens for credential revocations (`kiln_node_credentials`), so a
//! revoked node is refused by every replica at once rather than when its cache entry expires.

use std::time::Duration;

use kiln_domain::NodeId;
use kiln_store::{ASSIGNMENT_CHANNEL, CREDENTIAL_CHANNEL, Wakers};

use crate::credentials::CredentialCache;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use uuid::Uuid;

/// The per-replica registry of waiting streams, fed by Postgres notifications.
#[derive(Debug, Clone)]
pub struct WatchHub {
    nodes: Wakers<NodeId>,
    credentials: CredentialCache,
}

impl WatchHub {
    /// A hub that also evicts revoked credentials from `credentials`.
    pub fn new(credentials: CredentialCache) -> Self {
        Self {
            nodes: Wakers::default(),
            credentials,
        }
    }

    /// A receiver that changes whenever `node`'s log may have grown (the value is the newest
    /// revision heard of).
    pub fn subscribe(&self, node: NodeId) -> watch::Receiver<u64> {
        self.nodes.subscribe(node)
    }

    /// Wake the streams of `node`, if any are held here.
    pub fn wake(&self, node: NodeId, revision: u64) {
        self.nodes.wake(node, revision);
    }

    /// Wake every stream held here (after notifications may have been missed).
    pub fn wake_all(&self) {
        self.nodes.wake_all();
    }

    /// Streams currently held by this replica.
    pub fn held(&self) -> usize {
        self.nodes.held()
    }

    /// Listen for assignment notifications until the process ends, reconnecting with a pause
    /// when the connection fails.
    pub async fn run(self, pool: PgPool) {
        loop {
            match self.listen_once(&pool).await {
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "assignment listener failed; reconnecting"),
            }
            self.wake_all();
            self.credentials.clear();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn listen_once(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener
            .listen_all([ASSIGNMENT_CHANNEL, CREDENTIAL_CHANNEL])
            .await?;
        // Anything sent before LISTEN took effect was missed.
        self.wake_all();
        self.credentials.clear();
        loop {
            let note = listener.recv().await?;
            if note.channel() == CREDENTIAL_CHANNEL {
                match Uuid::parse_str(note.payload()) {
                    Ok(node) => self.credentials.evict(NodeId::from_uuid(node)),
                    Err(_) => self.credentials.clear(),
                }
                continue;
            }
            match parse(note.payload()) {
                Some((node, revision)) => self.wake(node, revision),
                None => tracing::warn!(payload = note.payload(), "malformed assignment notice"),
            }
        }
    }
}

fn parse(payload: &str) -> Option<(NodeId, u64)> {
    let (node, revision) = payload.split_once(':')?;
    let node = NodeId::from_uuid(Uuid::parse_str(node).ok()?);
    Some((node, revision.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_names_a_node_and_a_revision() {
        let id = Uuid::now_v7();
        assert_eq!(
            parse(&format!("{id}:42")),
            Some((NodeId::from_uuid(id), 42))
        );
        assert_eq!(parse("nonsense"), None);
        assert_eq!(parse(&format!("{id}:x")), None);
    }

    #[tokio::test]
    async fn a_wake_reaches_only_that_nodes_streams() {
        let hub = WatchHub::new(CredentialCache::new(std::time::Duration::ZERO));
        let a = NodeId::new();
        let b = NodeId::new();
        let mut ra = hub.subscribe(a);
        let rb = hub.subscribe(b);
        hub.wake(a, 7);
        assert!(ra.has_changed().unwrap());
        assert_eq!(*ra.borrow_and_update(), 7);
        assert!(!rb.has_changed().unwrap());
        hub.wake_all();
        assert!(rb.has_changed().unwrap());
        drop(ra);
        drop(rb);
        let _c = hub.subscribe(NodeId::new());
        assert_eq!(hub.held(), 1, "dropped streams are forgotten");
    }
}
