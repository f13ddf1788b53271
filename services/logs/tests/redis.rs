//! The log window against the real Redis of this machine (`REDIS_URL`), a namespace per test.

use std::time::{Duration, Instant};

use kiln_logs::{LogStore, NewLine, Source};
use uuid::Uuid;

async fn store(max: usize) -> LogStore {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let ns = format!("test-logs-{}", Uuid::new_v4().simple());
    LogStore::connect(&url, &ns)
        .await
        .expect("redis (run `scripts/services.sh start`)")
        .with_max_lines(max)
}

fn lines(texts: &[&'static str]) -> Vec<NewLine<'static>> {
    texts
        .iter()
        .map(|t| NewLine {
            source: Source::Stdout,
            text: t,
            at_unix_ms: 1,
        })
        .collect()
}

#[tokio::test]
async fn tail_returns_the_newest_lines_in_order_and_workloads_do_not_mix() {
    let logs = store(100).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    logs.append(a, &lines(&["one", "two", "three"]))
        .await
        .unwrap();
    logs.append(b, &lines(&["other"])).await.unwrap();
    let tail: Vec<String> = logs
        .tail(a, 2)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(tail, ["two", "three"]);
    let all = logs.tail(a, 100).await.unwrap();
    assert_eq!(all.len(), 3);
    let after: Vec<String> = logs
        .after(a, &all[0].cursor, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(
        after,
        ["two", "three"],
        "after a cursor: strictly later lines"
    );
    assert!(logs.tail(Uuid::new_v4(), 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_window_is_capped() {
    let logs = store(100).await;
    let w = Uuid::new_v4();
    let many: Vec<String> = (0..1000).map(|i| format!("line {i}")).collect();
    let batch: Vec<NewLine<'_>> = many
        .iter()
        .map(|t| NewLine {
            source: Source::Stderr,
            text: t,
            at_unix_ms: 5,
        })
        .collect();
    logs.append(w, &batch).await.unwrap();
    let kept = logs.tail(w, 5000).await.unwrap();
    assert!(
        kept.len() < 1000 && kept.len() >= 100,
        "kept {}",
        kept.len()
    );
    assert_eq!(kept.last().unwrap().text, "line 999");
    assert_eq!(kept.last().unwrap().source, Source::Stderr);
}

#[tokio::test]
async fn a_follower_wakes_for_a_line_appended_later() {
    let logs = store(100).await;
    let w = Uuid::new_v4();
    let mut follower = logs.follower().await.unwrap();
    let writer = logs.clone();
    let started = Instant::now();
    let append = tokio::spawn(async move {
        // Appended while the follower is (most likely) blocked; either way it must see it.
        writer.append(w, &lines(&["late"])).await.unwrap();
    });
    let mut got = Vec::new();
    let mut cursor = "0-0".to_owned();
    while got.is_empty() && started.elapsed() < Duration::from_secs(10) {
        got = follower
            .wait(w, &cursor, Duration::from_secs(2), 10)
            .await
            .unwrap();
        if let Some(last) = got.last() {
            cursor = last.cursor.clone();
        }
    }
    append.await.unwrap();
    assert_eq!(
        got.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
        ["late"]
    );
    let none = follower
        .wait(w, &cursor, Duration::from_millis(50), 10)
        .await
        .unwrap();
    assert!(none.is_empty(), "nothing after the last line");
}
