//! Per-key wake-ups for the long-lived streams a replica serves (an agent's assignment stream,
//! a pod's live view), fed by Postgres `NOTIFY`. The map only says who here is waiting; a woken
//! stream re-reads Postgres, so a lost wake-up costs latency, never correctness.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// Waiting streams by key; cheap to clone (shared).
#[derive(Debug)]
pub struct Wakers<K> {
    waiting: Arc<Mutex<HashMap<K, watch::Sender<u64>>>>,
}

impl<K> Clone for Wakers<K> {
    fn clone(&self) -> Self {
        Self {
            waiting: self.waiting.clone(),
        }
    }
}

impl<K> Default for Wakers<K> {
    fn default() -> Self {
        Self {
            waiting: Arc::default(),
        }
    }
}

impl<K: Hash + Eq + Copy> Wakers<K> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, watch::Sender<u64>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that changes whenever `key` may have changed (its value is the last number
    /// woken with, or unchanged by [`wake_all`](Self::wake_all)).
    pub fn subscribe(&self, key: K) -> watch::Receiver<u64> {
        let mut waiting = self.lock();
        // Forget keys nobody here waits on any more.
        waiting.retain(|_, tx| tx.receiver_count() > 0);
        waiting
            .entry(key)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Wake the streams waiting on `key`, if any are here.
    pub fn wake(&self, key: K, value: u64) {
        if let Some(tx) = self.lock().get(&key) {
            tx.send_replace(value);
        }
    }

    /// Wake every stream here (after notices may have been missed).
    pub fn wake_all(&self) {
        for tx in self.lock().values() {
            tx.send_modify(|_| {});
        }
    }

    /// Streams currently waiting here.
    pub fn held(&self) -> usize {
        self.lock().values().map(|tx| tx.receiver_count()).sum()
    }
}
