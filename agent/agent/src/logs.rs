//! Shipping workloads' output to the control plane: pods' containers (tailed here) and
//! instances' serial consoles (tailed by [`crate::qemu`], shipped through [`LogShipper::ship`]).
//!
//! For each running container the runtime asks [`LogShipper::follow`] to tail its output
//! (`docker logs --follow --timestamps`). Lines go, in order per container, into one bounded
//! channel that the agent's session drains into the `PushLogs` stream ([`LogShipper::lines`]).
//! A tail ends when its container stops; the next observation of the container running again
//! (a restart) follows it anew from the last line's timestamp, so a line is shipped once.
//!
//! What is not shipped: output written before this agent process started (it was shipped by
//! the previous run, or written while no agent ran), and lines that arrive while the channel is
//! full because the control plane is unreachable (counted and logged). The control plane keeps
//! a window of recent output, not an archive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptions;
use futures::StreamExt;
use kiln_proto::node::v1::{LogLine, LogSource};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;

/// Lines buffered while the control plane does not take them.
pub const CHANNEL_LINES: usize = 16 * 1024;
/// The longest line shipped, in bytes (the contract's limit).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

#[derive(Debug)]
struct Shared {
    /// The container each assignment's tail follows.
    following: HashMap<String, String>,
    /// Per assignment: the timestamp (unix ns) of the last line shipped.
    shipped_until: HashMap<String, i128>,
}

/// Tails containers' output into one channel.
#[derive(Debug, Clone)]
pub struct LogShipper {
    tx: mpsc::Sender<LogLine>,
    rx: Arc<Mutex<Option<mpsc::Receiver<LogLine>>>>,
    shared: Arc<Mutex<Shared>>,
    /// Lines before this (unix ns) are not shipped.
    started_ns: i128,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for LogShipper {
    fn default() -> Self {
        Self::new()
    }
}

impl LogShipper {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL_LINES);
        Self {
            tx,
            rx: Arc::new(Mutex::new(Some(rx))),
            shared: Arc::new(Mutex::new(Shared {
                following: HashMap::new(),
                shipped_until: HashMap::new(),
            })),
            started_ns: OffsetDateTime::now_utc().unix_timestamp_nanos(),
            dropped: Arc::default(),
        }
    }

    /// The lines to push; `None` after the first call (there is one consumer).
    pub fn lines(&self) -> Option<mpsc::Receiver<LogLine>> {
        self.rx.lock().expect("not poisoned").take()
    }

    /// Tail `container` (running, for `assignment_id`) unless it is already tailed.
    pub fn follow(&self, docker: &Docker, assignment_id: &str, container: &str) {
        let since_ns = {
            let mut shared = self.shared.lock().expect("not poisoned");
            if shared.following.get(assignment_id).map(String::as_str) == Some(container) {
                return;
            }
            shared
                .following
                .insert(assignment_id.to_owned(), container.to_owned());
            shared
                .shipped_until
                .get(assignment_id)
                .copied()
                .unwrap_or(self.started_ns)
        };
        let this = self.clone();
        let docker = docker.clone();
        let assignment_id = assignment_id.to_owned();
        let container = container.to_owned();
        tokio::spawn(async move {
            this.tail(&docker, &assignment_id, &container, since_ns)
                .await;
            let mut shared = this.shared.lock().expect("not poisoned");
            if shared.following.get(&assignment_id) == Some(&container) {
                shared.following.remove(&assignment_id);
            }
        });
    }

    /// Forget an assignment (it was removed).
    pub fn forget(&self, assignment_id: &str) {
        let mut shared = self.shared.lock().expect("not poisoned");
        shared.following.remove(assignment_id);
        shared.shipped_until.remove(assignment_id);
    }

    /// Queues one line of an assignment's output (clipped to [`MAX_LINE_BYTES`]); dropped, and
    /// counted, while the channel is full. Also how other runtimes (an instance's serial
    /// console) ship lines.
    pub fn ship(&self, assignment_id: &str, source: LogSource, text: &str, at_unix_ms: i128) {
        let line = LogLine {
            assignment_id: assignment_id.to_owned(),
            source: source as i32,
            text: clip(text).to_owned(),
            at_unix_ms: i64::try_from(at_unix_ms).unwrap_or(0),
        };
        if self.tx.try_send(line).is_err() {
            let n = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n + 1,
                    "log lines dropped: the control plane is not taking them"
                );
            }
        }
    }

    async fn tail(&self, docker: &Docker, assignment_id: &str, container: &str, since_ns: i128) {
        let since_s = i32::try_from(since_ns / 1_000_000_000).unwrap_or(0);
        let mut stream = docker.logs(
            container,
            Some(LogsOptions {
                follow: true,
                stdout: true,
                stderr: true,
                since: since_s,
                timestamps: true,
                ..Default::default()
            }),
        );
        let mut last_ns = since_ns;
        while let Some(frame) = stream.next().await {
            let Ok(frame) = frame else { break };
            let (source, bytes) = match &frame {
                LogOutput::StdOut { message } => (LogSource::Stdout, message),
                LogOutput::StdErr { message } => (LogSource::Stderr, message),
                LogOutput::Console { message } => (LogSource::Stdout, message),
                LogOutput::StdIn { .. } => continue,
            };
            for (at_ns, text) in parse_frame(&String::from_utf8_lossy(bytes), last_ns) {
                if at_ns <= since_ns {
                    // Already shipped (the tail restarted from a whole second before it).
                    continue;
                }
                last_ns = at_ns;
                self.ship(assignment_id, source, text, at_ns / 1_000_000);
                self.shared
                    .lock()
                    .expect("not poisoned")
                    .shipped_until
                    .insert(assignment_id.to_owned(), at_ns);
            }
        }
    }
}

/// The lines of one frame of `docker logs --timestamps` output: `(unix ns, text)` each. A line
/// without a readable timestamp takes the previous one's.
pub fn parse_frame(frame: &str, mut last_ns: i128) -> Vec<(i128, &str)> {
    let mut out = Vec::new();
    for raw in frame.split_inclusive('\n') {
        let raw = raw.strip_suffix('\n').unwrap_or(raw);
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let (at, text) = match raw.split_once(' ') {
            Some((ts, rest)) => match OffsetDateTime::parse(ts, &Rfc3339) {
                Ok(t) => (t.unix_timestamp_nanos(), rest),
                Err(_) => (last_ns, raw),
            },
            None => match OffsetDateTime::parse(raw, &Rfc3339) {
                Ok(t) => (t.unix_timestamp_nanos(), ""),
                Err(_) => (last_ns, raw),
            },
        };
        last_ns = at;
        out.push((at, text));
    }
    out
}

fn clip(text: &str) -> &str {
    if text.len() <= MAX_LINE_BYTES {
        return text;
    }
    let mut end = MAX_LINE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_into_timestamped_lines() {
        let lines = parse_frame(
            "2026-11-22T07:00:01.000000002Z hello world\n2026-11-22T07:00:02Z second\n",
            0,
        );
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].1, "hello world");
        assert_eq!(lines[1].1, "second");
        assert_eq!(lines[1].0 - lines[0].0, 999_999_998);
    }

    #[test]
    fn a_line_without_a_timestamp_keeps_the_previous_one() {
        let lines = parse_frame("no timestamp here\n", 42);
        assert_eq!(lines, vec![(42, "no timestamp here")]);
    }

    #[test]
    fn long_lines_are_clipped_on_a_character_boundary() {
        let s = "ü".repeat(MAX_LINE_BYTES);
        assert!(clip(&s).len() <= MAX_LINE_BYTES);
        assert!(clip(&s).chars().all(|c| c == 'ü'));
    }
}
