//! Closed-loop HTTP/1.1 load: N tasks, each with one keep-alive connection made with hyper's
//! low-level client, each sending its next request when the previous answer has been read.
//!
//! A request counts when it starts after the warm-up and completes before the end of the
//! measured window; its latency goes into the histogram when the answer is 200, else it is an
//! error. The load stops at the end of the window or when the request budget is spent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::header::{AUTHORIZATION, HOST, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

/// A request still unanswered this long after the window closes is abandoned.
const GRACE: Duration = Duration::from_secs(5);

pub struct Plan {
    /// Must be a loopback address: this is a load generator.
    pub addr: SocketAddr,
    pub path: String,
    pub authorization: String,
    pub connections: u32,
    pub warmup: Duration,
    pub duration: Duration,
    pub max_requests: u64,
}

pub struct Report {
    pub ok: u64,
    pub errors: u64,
    pub measured: Duration,
    /// Latency of the successful measured requests, in microseconds.
    pub latency: Histogram<u64>,
}

struct Window {
    from: Instant,
    until: Instant,
}

impl Window {
    fn counts(&self, started: Instant, finished: Instant) -> bool {
        started >= self.from && finished <= self.until
    }
}

pub async fn run(plan: Plan) -> Result<Report> {
    anyhow::ensure!(
        plan.addr.ip().is_loopback(),
        "load targets loopback only, not {}",
        plan.addr
    );
    let start = Instant::now();
    let window = Arc::new(Window {
        from: start + plan.warmup,
        until: start + plan.warmup + plan.duration,
    });
    let budget = Arc::new(AtomicU64::new(plan.max_requests));
    let host = HeaderValue::from_str(&plan.addr.to_string()).context("Host header")?;
    let auth = HeaderValue::from_str(&plan.authorization).context("Authorization header")?;
    let path: Arc<str> = plan.path.into();

    // A JoinSet aborts its tasks when dropped, so a cancelled run stops its load at once.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..plan.connections {
        tasks.spawn(connection_loop(
            plan.addr,
            Arc::clone(&path),
            host.clone(),
            auth.clone(),
            Arc::clone(&window),
            Arc::clone(&budget),
        ));
    }

    let mut report = Report {
        ok: 0,
        errors: 0,
        measured: plan.duration,
        latency: new_histogram()?,
    };
    while let Some(joined) = tasks.join_next().await {
        let part = joined.context("load task panicked")??;
        report.ok += part.ok;
        report.errors += part.errors;
        report
            .latency
            .add(&part.latency)
            .context("merging histograms")?;
    }
    if budget.load(Ordering::Relaxed) == 0 {
        eprintln!("kiln-bench: request budget spent before the window ended");
    }
    Ok(report)
}

fn new_histogram() -> Result<Histogram<u64>> {
    // 1 µs .. 60 s, 3 significant figures.
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// Log the first few transport errors only: a dead server would otherwise flood stderr.
fn log_error(what: std::fmt::Arguments<'_>) {
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    match LOGGED.fetch_add(1, Ordering::Relaxed) {
        n if n < 5 => eprintln!("kiln-bench: {what}"),
        5 => eprintln!("kiln-bench: (further transport errors not shown)"),
        _ => {}
    }
}

fn take_one(budget: &AtomicU64) -> bool {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

async fn connection_loop(
    addr: SocketAddr,
    path: Arc<str>,
    host: HeaderValue,
    auth: HeaderValue,
    window: Arc<Window>,
    budget: Arc<AtomicU64>,
) -> Result<Report> {
    let mut report = Report {
        ok: 0,
        errors: 0,
        measured: Duration::ZERO,
        latency: new_histogram()?,
    };
    let hard_stop = window.until + GRACE;

    'connect: while Instant::now() < window.until {
        let opened = Instant::now();
        let stream = match timeout_at(window.until, TcpStream::connect(addr)).await {
            Err(_) => break,
            Ok(Err(err)) => {
                if window.counts(opened, Instant::now()) {
                    report.errors += 1;
                }
                log_error(format_args!("connect {addr}: {err}"));
                // Do not spin on a refused connection.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Ok(Ok(stream)) => stream,
        };
        stream.set_nodelay(true).ok();
        let (mut sender, conn) =
            match timeout_at(hard_stop, http1::handshake(TokioIo::new(stream))).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(err)) => {
                    log_error(format_args!("handshake: {err}"));
                    report.errors += 1;
                    continue;
                }
                Err(_) => break,
            };
        let driver = tokio::spawn(conn);

        while Instant::now() < window.until {
            if sender.is_closed() {
                // The server closed this keep-alive connection: open another.
                driver.abort();
                continue 'connect;
            }
            if !take_one(&budget) {
                break 'connect;
            }
            let mut req = Request::get(&*path)
                .body(Empty::<Bytes>::new())
                .context("building the request")?;
            req.headers_mut().insert(HOST, host.clone());
            req.headers_mut().insert(AUTHORIZATION, auth.clone());

            let started = Instant::now();
            let answer = timeout_at(hard_stop, async {
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                resp.into_body().collect().await?;
                Ok::<_, hyper::Error>(status)
            })
            .await;
            let finished = Instant::now();
            let counts = window.counts(started, finished);
            match answer {
                Ok(Ok(StatusCode::OK)) => {
                    if counts {
                        report.ok += 1;
                        let micros = (finished - started).as_micros();
                        report
                            .latency
                            .saturating_record(micros.try_into().unwrap_or(u64::MAX));
                    }
                }
                Ok(Ok(_status)) => {
                    if counts {
                        report.errors += 1;
                    }
                }
                Ok(Err(err)) => {
                    // The connection is unusable: count it and open another.
                    if counts {
                        report.errors += 1;
                    }
                    log_error(format_args!("request failed: {err}"));
                    driver.abort();
                    continue 'connect;
                }
                Err(_) => {
                    report.errors += 1;
                    driver.abort();
                    break 'connect;
                }
            }
        }
        drop(sender);
        driver.abort();
    }
    Ok(report)
}
