//! The recent output of workloads (a pod's stdout/stderr, an instance's serial console).
//!
//! Agents have no inbound port, so output flows agent → fleet service (`PushLogs`) → here. Each
//! workload has one Redis stream, `{namespace}:logs:{workload}`, capped at about
//! [`DEFAULT_MAX_LINES`] entries (`XADD MAXLEN ~`) and expiring [`RETENTION`] after its last line.
//! It is a window onto recent output for `kiln pods logs [-f]` and the console, not an archive:
//! Postgres never sees log lines, and a lost Redis loses only this window.
//!
//! Stream entry ids (`<ms>-<seq>`) are the cursor a follower resumes from (the SSE `id:`), so a
//! reconnecting client gets exactly the lines after the last one it saw.

use std::time::Duration;

use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use uuid::Uuid;

/// Lines kept per workload (approximately: Redis trims whole macro nodes).
pub const DEFAULT_MAX_LINES: usize = 10_000;
/// The longest line kept, in bytes; longer lines are cut (at a character boundary).
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// How long a workload's window outlives its last line.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("the log store (Redis) is unreachable: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Which stream of the workload a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Stdout,
    Stderr,
    /// An instance's serial console.
    Console,
    /// Written by the agent about the workload ("restarting after exit 1").
    Agent,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Stdout => "stdout",
            Source::Stderr => "stderr",
            Source::Console => "console",
            Source::Agent => "agent",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "stdout" => Source::Stdout,
            "stderr" => Source::Stderr,
            "console" => Source::Console,
            "agent" => Source::Agent,
            _ => return None,
        })
    }
}

/// A line to append.
#[derive(Debug, Clone, Copy)]
pub struct NewLine<'a> {
    pub source: Source,
    pub text: &'a str,
    pub at_unix_ms: i64,
}

/// A stored line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The stream entry id: the cursor to resume after this line.
    pub cursor: String,
    pub source: Source,
    pub text: String,
    pub at_unix_ms: i64,
}

/// Whether `raw` is a cursor this store hands out (`<ms>-<seq>`), so client input never
/// reaches Redis unchecked.
pub fn is_cursor(raw: &str) -> bool {
    let Some((ms, seq)) = raw.split_once('-') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    digits(ms) && digits(seq)
}

/// `text` cut to at most [`MAX_LINE_BYTES`], at a character boundary.
pub fn clip(text: &str) -> &str {
    if text.len() <= MAX_LINE_BYTES {
        return text;
    }
    let mut end = MAX_LINE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The log windows of every workload, over one Redis.
#[derive(Clone)]
pub struct LogStore {
    client: redis::Client,
    conn: ConnectionManager,
    namespace: String,
    max_lines: usize,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("namespace", &self.namespace)
            .field("max_lines", &self.max_lines)
            .finish()
    }
}

impl LogStore {
    /// Connect; keys live under `namespace` (replicas of one deployment share it).
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, LogError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client.clone()).await?;
        Ok(Self {
            client,
            conn,
            namespace: namespace.to_owned(),
            max_lines: DEFAULT_MAX_LINES,
        })
    }

    /// Keep about `n` lines per workload instead of [`DEFAULT_MAX_LINES`].
    pub fn with_max_lines(mut self, n: usize) -> Self {
        self.max_lines = n.max(1);
        self
    }

    fn key(&self, workload: Uuid) -> String {
        format!("{}:logs:{}", self.namespace, workload.simple())
    }

    /// Append lines in order (one round trip), trimming the window and renewing its expiry.
    pub async fn append(&self, workload: Uuid, lines: &[NewLine<'_>]) -> Result<(), LogError> {
        if lines.is_empty() {
            return Ok(());
        }
        let key = self.key(workload);
        let mut pipe = redis::pipe();
        for line in lines {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.max_lines)
                .arg("*")
                .arg("t")
                .arg(line.at_unix_ms)
                .arg("s")
                .arg(line.source.as_str())
                .arg("l")
                .arg(clip(line.text))
                .ignore();
        }
        pipe.cmd("EXPIRE")
            .arg(&key)
            .arg(RETENTION.as_secs())
            .ignore();
        let mut conn = self.conn.clone();
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// The last `n` lines, oldest first.
    pub async fn tail(&self, workload: Uuid, n: usize) -> Result<Vec<LogLine>, LogError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let reply: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(self.key(workload))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(n)
            .query_async(&mut conn)
            .await?;
        let mut lines: Vec<LogLine> = reply.ids.iter().filter_map(line).collect();
        lines.reverse();
        Ok(lines)
    }

    /// Up to `n` lines after `cursor` (see [`is_cursor`]), oldest first.
    pub async fn after(
        &self,
        workload: Uuid,
        cursor: &str,
        n: usize,
    ) -> Result<Vec<LogLine>, LogError> {
        let mut conn = self.conn.clone();
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.key(workload))
            .arg(format!("({cursor}"))
            .arg("+")
            .arg("COUNT")
            .arg(n)
            .query_async(&mut conn)
            .await?;
        Ok(reply.ids.iter().filter_map(line).collect())
    }

    /// A connection of its own for blocking reads (a blocked read would stall every other
    /// command on a shared connection).
    pub async fn follower(&self) -> Result<Follower, LogError> {
        let conn = self.client.get_multiplexed_async_connection().await?;
        Ok(Follower {
            conn,
            store: self.clone(),
        })
    }
}

/// Waits for new lines of a workload.
pub struct Follower {
    conn: MultiplexedConnection,
    store: LogStore,
}

impl Follower {
    /// Lines after `cursor` (`"$"` for "only lines from now on"), waiting up to `block` for the
    /// first; empty when none came.
    pub async fn wait(
        &mut self,
        workload: Uuid,
        cursor: &str,
        block: Duration,
        n: usize,
    ) -> Result<Vec<LogLine>, LogError> {
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(n)
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(self.store.key(workload))
            .arg(cursor)
            .query_async(&mut self.conn)
            .await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .filter_map(|id| line(&id))
            .collect())
    }
}

fn line(entry: &StreamId) -> Option<LogLine> {
    let text: String = entry.get("l")?;
    let source = entry
        .get::<String>("s")
        .and_then(|s| Source::parse(&s))
        .unwrap_or(Source::Stdout);
    Some(LogLine {
        cursor: entry.id.clone(),
        source,
        text,
        at_unix_ms: entry.get("t").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_stream_ids_only() {
        assert!(is_cursor("1700000000000-0"));
        assert!(is_cursor("0-0"));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1-2-3",
            "$",
            "+",
            "1700000000000",
            "a-1",
            "1 -1",
        ] {
            assert!(!is_cursor(bad), "{bad:?}");
        }
    }

    #[test]
    fn long_lines_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_LINE_BYTES);
        let cut = clip(&long);
        assert!(cut.len() <= MAX_LINE_BYTES && cut.len() >= MAX_LINE_BYTES - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(clip("short"), "short");
    }
}
