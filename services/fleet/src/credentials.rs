//! Verified node credentials, remembered for a while so a heartbeat costs no credential lookup.
//!
//! Keyed by the credential's digest (the secret itself is never kept). Entries expire after a
//! TTL, and the [`WatchHub`](crate::WatchHub) evicts a node's entries the moment its credential
//! is revoked anywhere, so the cache can be long-lived without making revocation slow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_auth::SecretDigest;
use kiln_domain::NodeId;

/// Past this many entries, expired ones are swept on insert.
const SWEEP_ABOVE: usize = 50_000;

/// Credential digest → (node, when verified).
type Entries = HashMap<Vec<u8>, (NodeId, Instant)>;

#[derive(Debug, Clone)]
pub struct CredentialCache {
    ttl: Duration,
    entries: Arc<Mutex<Entries>>,
}

impl CredentialCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node of a credential verified less than the TTL ago.
    pub fn get(&self, digest: &SecretDigest) -> Option<NodeId> {
        let entries = self.lock();
        let (node, at) = entries.get(digest.as_bytes())?;
        (at.elapsed() < self.ttl).then_some(*node)
    }

    pub fn insert(&self, digest: &SecretDigest, node: NodeId) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.lock();
        if entries.len() > SWEEP_ABOVE {
            let ttl = self.ttl;
            entries.retain(|_, (_, at)| at.elapsed() < ttl);
        }
        entries.insert(digest.as_bytes().to_vec(), (node, Instant::now()));
    }

    /// Forget every credential of `node` (it was revoked).
    pub fn evict(&self, node: NodeId) {
        self.lock().retain(|_, (n, _)| *n != node);
    }

    /// Forget everything (revocations may have been missed).
    pub fn clear(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_revocation_evicts_at_once() {
        let cache = CredentialCache::new(Duration::from_secs(60));
        let (a, b) = (NodeId::new(), NodeId::new());
        let (da, db) = (SecretDigest::of("a"), SecretDigest::of("b"));
        cache.insert(&da, a);
        cache.insert(&db, b);
        assert_eq!(cache.get(&da), Some(a));
        cache.evict(a);
        assert_eq!(cache.get(&da), None);
        assert_eq!(cache.get(&db), Some(b));

        let none = CredentialCache::new(Duration::ZERO);
        none.insert(&da, a);
        assert_eq!(none.get(&da), None);
    }
}
