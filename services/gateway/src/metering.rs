//! Metering: one usage event per completed call, durable before the caller has the whole answer,
//! ingested into Postgres exactly once.
//!
//! * The gateway relays a replica's answer one chunk behind; when the replica's answer ends, it
//!   appends the call's [`UsageEvent`] to a Redis stream (`{namespace}:usage`) and only then
//!   sends the last chunk. So a call whose answer the caller received in full has its event in
//!   Redis — a gateway killed at any moment loses no completed call's event (a call cut off
//!   before its end is not completed, and is not metered).
//! * Each event carries an id minted by the gateway. [`Ingester`]s (one per gateway replica, in
//!   one consumer group) read the stream, insert into `usage_events` with `ON CONFLICT (id) DO
//!   NOTHING`, then acknowledge; entries left pending by a dead ingester are claimed after
//!   [`CLAIM_IDLE`]. Redelivery therefore never counts an event twice.
//! * Tokens: an OpenAI-style `usage` object in the answer (a JSON body, or the server-sent event
//!   that carries it when streaming) gives `prompt_tokens` and `completion_tokens`.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::{StreamId, StreamReadReply};
use time::OffsetDateTime;
use uuid::Uuid;

/// How much of an answer is kept to find its `usage` object (the rest is relayed, not kept).
pub const USAGE_SCAN_BYTES: usize = 1024 * 1024;
/// By default, entries pending this long with a consumer that does not acknowledge them are
/// taken over ([`Ingester::with_claim_idle`]).
pub const CLAIM_IDLE: Duration = Duration::from_secs(30);
const GROUP: &str = "ingest";
const BATCH: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    #[error("the usage stream (Redis) is unreachable: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("storing usage failed: {0}")]
    Store(#[from] kiln_store::StoreError),
}

/// One completed call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UsageEvent {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub org_id: Uuid,
    pub api_key_id: Option<Uuid>,
    pub replica_id: Option<Uuid>,
    pub status: u16,
    pub duration_ms: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub at_unix_ms: i64,
    /// The org whose key made the call, when it is not the endpoint's (a granted org).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_org_id: Option<Uuid>,
    /// What that org pays the endpoint's owner for the call (the endpoint's price then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resale: Option<kiln_store::EndpointPrice>,
}

impl UsageEvent {
    fn row(&self) -> kiln_store::UsageEventRow {
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        kiln_store::UsageEventRow {
            id: self.id,
            endpoint_id: self.endpoint_id,
            org_id: self.org_id,
            api_key_id: self.api_key_id,
            replica_id: self.replica_id,
            status: i32::from(self.status),
            duration_ms: i(self.duration_ms),
            request_bytes: i(self.request_bytes),
            response_bytes: i(self.response_bytes),
            prompt_tokens: self.prompt_tokens.map(i),
            completion_tokens: self.completion_tokens.map(i),
            occurred_at: OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(self.at_unix_ms) * 1_000_000,
            )
            .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            caller_org_id: self.caller_org_id,
            resale: self.resale,
        }
    }
}

/// `(prompt_tokens, completion_tokens)` from an answer's `usage` object: the JSON body's, or
/// the last server-sent event's that has one. `None`s when there is none.
pub fn usage_of(body: &[u8]) -> (Option<u64>, Option<u64>) {
    let from = |v: &serde_json::Value| {
        let u = v.get("usage")?;
        Some((
            u.get("prompt_tokens").and_then(|t| t.as_u64()),
            u.get("completion_tokens").and_then(|t| t.as_u64()),
        ))
    };
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        return from(&v).unwrap_or((None, None));
    }
    let text = String::from_utf8_lossy(body);
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d.trim()).ok())
        .filter_map(|v| from(&v))
        .next_back()
        .unwrap_or((None, None))
}

/// Appends events to the usage stream.
#[derive(Clone)]
pub struct Meter {
    conn: ConnectionManager,
    key: String,
}

impl Meter {
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, MeterError> {
        let client = redis::Client::open(url)?;
        Ok(Self {
            conn: ConnectionManager::new(client).await?,
            key: stream_key(namespace),
        })
    }

    /// Append one event; returns once Redis has it.
    pub async fn record(&self, event: &UsageEvent) -> Result<(), MeterError> {
        let mut conn = self.conn.clone();
        let body = serde_json::to_string(event).unwrap_or_default();
        let _: String = redis::cmd("XADD")
            .arg(&self.key)
            .arg("*")
            .arg("e")
            .arg(body)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

fn stream_key(namespace: &str) -> String {
    format!("{namespace}:usage")
}

/// Moves events from the stream into Postgres.
pub struct Ingester {
    store: kiln_store::Store,
    client: redis::Client,
    key: String,
    consumer: String,
    claim_idle: Duration,
}

impl Ingester {
    pub fn new(store: kiln_store::Store, url: &str, namespace: &str) -> Result<Self, MeterError> {
        Ok(Self {
            store,
            client: redis::Client::open(url)?,
            key: stream_key(namespace),
            consumer: format!("gw-{}", Uuid::new_v4().simple()),
            claim_idle: CLAIM_IDLE,
        })
    }

    /// Take over another ingester's entries once they have been pending this long (and look
    /// for such entries this often). Shorter: a dead gateway's events land sooner; too short:
    /// a slow but live ingester's batch is stored twice (harmless, the insert is idempotent).
    pub fn with_claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle.max(Duration::from_millis(100));
        self
    }

    /// Ingest until the process ends, reconnecting after failures.
    pub async fn run(self) {
        loop {
            if let Err(e) = self.follow().await {
                tracing::warn!(error = %e, "usage ingester failed; retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn follow(&self) -> Result<(), MeterError> {
        // A connection of its own: it blocks on XREADGROUP.
        let mut conn = self.client.get_multiplexed_async_connection().await?;
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(e.into());
        }
        let mut last_claim = tokio::time::Instant::now();
        loop {
            // Our own pending entries first (after a reconnect), then new ones.
            let mine = self.read(&mut conn, "0", None).await?;
            let n = if mine > 0 {
                mine
            } else {
                self.read(&mut conn, ">", Some(1000)).await?
            };
            let _ = n;
            if last_claim.elapsed() >= self.claim_idle {
                self.claim(&mut conn).await?;
                last_claim = tokio::time::Instant::now();
            }
        }
    }

    /// Read, store and acknowledge one batch; answers how many entries it handled.
    async fn read(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        from: &str,
        block_ms: Option<u64>,
    ) -> Result<usize, MeterError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(BATCH);
        if let Some(ms) = block_ms {
            cmd.arg("BLOCK").arg(ms);
        }
        cmd.arg("STREAMS").arg(&self.key).arg(from);
        let reply: Option<StreamReadReply> = cmd.query_async(conn).await?;
        let entries: Vec<StreamId> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect();
        self.store_and_ack(conn, &entries).await
    }

    async fn store_and_ack(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        entries: &[StreamId],
    ) -> Result<usize, MeterError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let rows: Vec<kiln_store::UsageEventRow> = entries
            .iter()
            .filter_map(|e| e.get::<String>("e"))
            .filter_map(|s| serde_json::from_str::<UsageEvent>(&s).ok())
            .map(|e| e.row())
            .collect();
        // Stored (idempotently) before acknowledged: a crash in between redelivers, and the
        // redelivery inserts nothing.
        self.store.usage_events_insert(&rows).await?;
        let mut ack = redis::cmd("XACK");
        ack.arg(&self.key).arg(GROUP);
        for e in entries {
            ack.arg(&e.id);
        }
        let _: i64 = ack.query_async(conn).await?;
        Ok(entries.len())
    }

    /// Take over entries another (dead) ingester left pending, and store them.
    async fn claim(&self, conn: &mut redis::aio::MultiplexedConnection) -> Result<(), MeterError> {
        let reply: redis::Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.key)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(self.claim_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(BATCH)
            .query_async(conn)
            .await?;
        // [next-cursor, [[id, [field, value, …]], …], deleted-ids]: our own pending now.
        if let redis::Value::Array(parts) = reply
            && parts.len() >= 2
            && matches!(&parts[1], redis::Value::Array(a) if !a.is_empty())
        {
            self.read(conn, "0", None).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_json_and_from_the_last_event_that_has_it() {
        let json =
            br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        assert_eq!(usage_of(json), (Some(3), Some(5)));
        let sse = b"data: {\"choices\":[{\"text\":\"a \"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
        assert_eq!(usage_of(sse), (Some(2), Some(1)));
        assert_eq!(usage_of(b"plain text"), (None, None));
        assert_eq!(usage_of(br#"{"no":"usage"}"#), (None, None));
    }
}
