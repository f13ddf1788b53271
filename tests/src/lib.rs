//! Helpers for Kiln's end-to-end tests (the tests themselves are in `tests/`).
//!
//! * [`Chromedriver`]: a chromedriver process on a free loopback port, started by the test and
//!   killed (with the browsers it started) when the guard drops — also when the test panics.
//! * [`Browser`]: a headless Chromium session over WebDriver (fantoccini) that saves numbered
//!   PNG screenshots of each step into [`screenshot_dir`].
//!
//! Chromium and chromedriver come from the OS packages (`/usr/bin/chromium`,
//! `/usr/bin/chromedriver`); `KILN_CHROMIUM` and `KILN_CHROMEDRIVER` point elsewhere.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

pub use fantoccini;

/// How long any one step may take before the test fails.
pub const STEP: Duration = Duration::from_secs(20);

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Where screenshots go: `$KILN_SCREENSHOT_DIR`, else `<workspace>/target/screenshots`.
pub fn screenshot_dir() -> PathBuf {
    match std::env::var_os("KILN_SCREENSHOT_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("screenshots"),
    }
}

/// A chromedriver process; dropping it kills the process group (chromedriver and the
/// Chromium processes it started).
pub struct Chromedriver {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl Chromedriver {
    pub async fn start() -> Self {
        let bin = env_or("KILN_CHROMEDRIVER", "/usr/bin/chromedriver");
        // Ask the OS for a free port, then hand it to chromedriver (it cannot report one back).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let child = Command::new(&bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own process group, so the guard can end chromedriver and its browsers together.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin} (install the chromium-driver package): {e}"));
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("http client");
        let status = format!("{}/status", driver.url);
        kiln_testkit::eventually("chromedriver to be ready", STEP, || {
            let (http, status) = (http.clone(), status.clone());
            async move {
                let body: serde_json::Value =
                    http.get(&status).send().await.ok()?.json().await.ok()?;
                body["value"]["ready"].as_bool().filter(|r| *r)
            }
        })
        .await;
        driver
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The group's id is chromedriver's pid; `kill -- -PGID` reaches every process in it.
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg("--")
            .arg(format!("-{}", self.child.id()))
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium session that takes numbered screenshots.
pub struct Browser {
    pub client: Client,
    shots: PathBuf,
    taken: AtomicU32,
}

impl Browser {
    /// Open Chromium through `driver`; screenshots go to `screenshot_dir()/<name>/`.
    pub async fn open(driver: &Chromedriver, name: &str) -> Self {
        let binary = env_or("KILN_CHROMIUM", "/usr/bin/chromium");
        let caps = json!({
            "goog:chromeOptions": {
                "binary": binary,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"],
            }
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!("a JSON object")
        };
        // chromedriver speaks plain HTTP on loopback: no TLS connector needed.
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .unwrap_or_else(|e| panic!("start a Chromium session ({binary}): {e}"));
        let shots = screenshot_dir().join(name);
        std::fs::create_dir_all(&shots)
            .unwrap_or_else(|e| panic!("create {}: {e}", shots.display()));
        Self {
            client,
            shots,
            taken: AtomicU32::new(0),
        }
    }

    /// Save a PNG of the page as `NN-<step>.png`; returns its path.
    pub async fn screenshot(&self, step: &str) -> PathBuf {
        let n = self.taken.fetch_add(1, Ordering::Relaxed) + 1;
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot {step}: {e}"));
        let path = self.shots.join(format!("{n:02}-{step}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Wait (up to [`STEP`]) for an element matching `css`.
    pub async fn wait_for(&self, css: &str) -> Element {
        match self
            .client
            .wait()
            .at_most(STEP)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(element) => element,
            Err(e) => {
                let here = self
                    .client
                    .current_url()
                    .await
                    .map(|u| u.to_string())
                    .unwrap_or_default();
                panic!("waiting for `{css}` on {here}: {e}")
            }
        }
    }

    /// Wait (up to [`STEP`]) until the browser is at `path` (with its query, if any).
    pub async fn wait_for_path(&self, path: &str) {
        let target = self
            .client
            .current_url()
            .await
            .expect("current url")
            .join(path)
            .expect("a path");
        if let Err(e) = self.client.wait().at_most(STEP).for_url(&target).await {
            let here = self
                .client
                .current_url()
                .await
                .map(|u| u.to_string())
                .unwrap_or_default();
            panic!("waiting to reach {target}, still at {here}: {e}");
        }
    }

    /// Type into the field `css` (emptied first).
    pub async fn fill(&self, css: &str, text: &str) {
        let field = self.wait_for(css).await;
        field
            .clear()
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        field
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    pub async fn click(&self, css: &str) {
        self.wait_for(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// The visible text of the first element matching `css` (waiting for it).
    pub async fn text(&self, css: &str) -> String {
        self.wait_for(css)
            .await
            .text()
            .await
            .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    /// The current `value` of a form field.
    pub async fn value(&self, css: &str) -> String {
        self.wait_for(css)
            .await
            .prop("value")
            .await
            .unwrap_or_else(|e| panic!("value of {css}: {e}"))
            .unwrap_or_default()
    }

    /// Accept a `confirm()` dialog, waiting (up to [`STEP`]) for it to open.
    pub async fn accept_dialog(&self) {
        let deadline = tokio::time::Instant::now() + STEP;
        while self.client.get_alert_text().await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "no dialog opened");
            tokio::task::yield_now().await;
        }
        self.client.accept_alert().await.expect("accept the dialog");
    }

    pub async fn close(self) {
        let _ = self.client.close().await;
    }
}
