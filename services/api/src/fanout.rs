//! Cross-replica invalidation over Redis pub/sub.
//!
//! Each replica keeps two short-lived caches (live sessions, `/v1/me` answers). When one replica
//! revokes a session or changes someone's memberships it evicts locally and publishes the fact on
//! `<namespace>:invalidate`; every replica's listener evicts too, so a logout takes effect
//! everywhere within a round trip rather than within the caches' TTLs. Redis may lose a message
//! (or be down): the TTLs still bound how long anything stale can be served.

use std::time::Duration;

use futures::StreamExt;
use kiln_domain::{SessionId, UserId};
use redis::aio::ConnectionManager;

use crate::state::AppState;

/// What to forget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    Session(SessionId),
    Me(UserId),
}

impl Invalidation {
    fn encode(self) -> String {
        match self {
            Invalidation::Session(s) => format!("session:{s}"),
            Invalidation::Me(u) => format!("me:{u}"),
        }
    }

    fn decode(s: &str) -> Option<Self> {
        let (kind, id) = s.split_once(':')?;
        match kind {
            "session" => id.parse().ok().map(Invalidation::Session),
            "me" => id.parse().ok().map(Invalidation::Me),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct Fanout {
    client: redis::Client,
    publisher: ConnectionManager,
    channel: String,
}

impl Fanout {
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1);
        let publisher = ConnectionManager::new_with_config(client.clone(), config).await?;
        Ok(Self {
            client,
            publisher,
            channel: format!("{namespace}:invalidate"),
        })
    }

    /// Tell every replica (best effort, in the background).
    pub fn publish(&self, what: Invalidation) {
        let mut conn = self.publisher.clone();
        let channel = self.channel.clone();
        tokio::spawn(async move {
            let sent: Result<i64, _> = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(what.encode())
                .query_async(&mut conn)
                .await;
            if let Err(error) = sent {
                tracing::warn!(%error, "could not publish an invalidation; other replicas rely on cache TTLs");
            }
        });
    }

    /// Listen until aborted, evicting what other replicas announce; reconnects with backoff.
    /// `ready` fires once the first subscription is in place.
    pub fn spawn_listener(
        &self,
        state: AppState,
        ready: tokio::sync::oneshot::Sender<()>,
    ) -> tokio::task::JoinHandle<()> {
        let (client, channel) = (self.client.clone(), self.channel.clone());
        tokio::spawn(async move {
            let mut ready = Some(ready);
            let mut backoff = Duration::from_millis(100);
            loop {
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                        Ok(()) => {
                            backoff = Duration::from_millis(100);
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(());
                            }
                            let mut messages = pubsub.on_message();
                            while let Some(msg) = messages.next().await {
                                let Ok(payload) = msg.get_payload::<String>() else {
                                    continue;
                                };
                                match Invalidation::decode(&payload) {
                                    Some(what) => state.evict_local(what),
                                    None => {
                                        tracing::debug!(%payload, "ignoring an unknown invalidation")
                                    }
                                }
                            }
                            tracing::warn!("invalidation subscription ended; reconnecting");
                        }
                        Err(error) => {
                            tracing::warn!(%error, "could not subscribe to invalidations")
                        }
                    },
                    Err(error) => tracing::warn!(%error, "could not connect for invalidations"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidations_round_trip_and_garbage_is_ignored() {
        for what in [
            Invalidation::Session(SessionId::new()),
            Invalidation::Me(UserId::new()),
        ] {
            assert_eq!(Invalidation::decode(&what.encode()), Some(what));
        }
        assert_eq!(Invalidation::decode("session:nope"), None);
        assert_eq!(Invalidation::decode("other:usr_0"), None);
        assert_eq!(Invalidation::decode(""), None);
    }
}
