//! HTTP to the Kiln API: bearer auth (saved session or `KILN_API_KEY`), transparent token
//! refresh, `Idempotency-Key` on creating calls, and problem+json errors.

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::config::{Config, ConfigError, Store};

/// Refresh when the access token has less than this left.
const REFRESH_MARGIN: time::Duration = time::Duration::seconds(30);
/// Page size when listing everything.
const PAGE: &str = "200";
/// A bound on pages fetched, against a server that never stops paging.
const MAX_PAGES: usize = 1000;

/// An RFC 9457 problem document as the API sends it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Problem {
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let title = if self.title.is_empty() {
            "Request failed"
        } else {
            &self.title
        };
        write!(f, "{title}")?;
        if self.errors.is_empty() {
            if !self.detail.is_empty() {
                write!(f, ": {}", self.detail)?;
            }
        } else {
            // For validation errors the detail repeats the field errors; list those instead.
            for e in &self.errors {
                write!(f, "\n  {}: {}", e.field, e.message)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{problem}")]
    Api {
        problem: Problem,
        hint: Option<&'static str>,
    },
    #[error("not signed in to {0}: run `kiln login` (or set KILN_API_KEY)")]
    NotSignedIn(String),
    #[error("you are signed in to {saved}, not {wanted}: run `kiln login --api-url {wanted}`")]
    OtherServer { saved: String, wanted: String },
    #[error("your session has expired or was revoked: run `kiln login` to sign in again")]
    SessionExpired,
    #[error("cannot reach the Kiln API at {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("the API answered {status} with a body that is not JSON")]
    BadResponse { status: StatusCode },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { problem, .. } => Some(problem.status),
            _ => None,
        }
    }

    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ClientError::Api { hint, .. } => *hint,
            _ => None,
        }
    }
}

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Who the calls are made as.
#[derive(Debug, Clone)]
enum Credential {
    /// `KILN_API_KEY`.
    ApiKey(String),
    /// The session saved by `kiln login` (loaded on first use).
    Session(Option<Config>),
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    store: Store,
    credential: Credential,
}

impl Client {
    pub fn new(base: &str, store: Store, api_key: Option<String>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("kiln-cli/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Transport {
                url: base.to_owned(),
                reason: root_cause(&e),
            })?;
        let credential = match api_key {
            Some(key) => Credential::ApiKey(key),
            None => Credential::Session(None),
        };
        Ok(Self {
            http,
            base: normalize_url(base),
            store,
            credential,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn uses_api_key(&self) -> bool {
        matches!(self.credential, Credential::ApiKey(_))
    }

    // ---- authenticated calls ----

    pub async fn get(&mut self, path: &str) -> Result<Value> {
        self.authed(Method::GET, path, &[], None, None).await
    }

    /// Every page of a list, as one `{items, next_cursor: null}`.
    pub async fn list_all(&mut self, path: &str) -> Result<Value> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut query = vec![("limit", PAGE.to_owned())];
            if let Some(c) = cursor.take() {
                query.push(("cursor", c));
            }
            let mut page = self.authed(Method::GET, path, &query, None, None).await?;
            if let Some(Value::Array(more)) = page.get_mut("items").map(Value::take) {
                items.extend(more);
            }
            match page.get("next_cursor").and_then(Value::as_str) {
                Some(c) if !c.is_empty() => cursor = Some(c.to_owned()),
                _ => break,
            }
        }
        Ok(json!({ "items": items, "next_cursor": null }))
    }

    /// A creating `POST`, with a fresh `Idempotency-Key` (kept across the retry after a refresh).
    pub async fn create(&mut self, path: &str, body: &Value) -> Result<Value> {
        let key = uuid::Uuid::new_v4().to_string();
        self.authed(Method::POST, path, &[], Some(body), Some(&key))
            .await
    }

    /// A `POST` that changes something in place (no `Idempotency-Key`: doing it twice is harmless).
    pub async fn post(&mut self, path: &str, body: &Value) -> Result<Value> {
        self.authed(Method::POST, path, &[], Some(body), None).await
    }

    pub async fn patch(&mut self, path: &str, body: &Value) -> Result<Value> {
        self.authed(Method::PATCH, path, &[], Some(body), None)
            .await
    }

    /// A `PUT` that sets something to the body (doing it twice is harmless).
    pub async fn put(&mut self, path: &str, body: &Value) -> Result<Value> {
        self.authed(Method::PUT, path, &[], Some(body), None).await
    }

    pub async fn delete(&mut self, path: &str) -> Result<Value> {
        self.authed(Method::DELETE, path, &[], None, None).await
    }

    /// A call with an explicit bearer token, no refresh (e.g. right after login).
    pub async fn get_with_token(&self, path: &str, token: &str) -> Result<Value> {
        self.send(Method::GET, path, &[], None, None, Some(token))
            .await
    }

    /// A call without credentials (login, refresh, logout by refresh token).
    pub async fn anonymous(&self, method: Method, path: &str, body: &Value) -> Result<Value> {
        self.send(method, path, &[], Some(body), None, None).await
    }

    async fn authed(
        &mut self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Value> {
        let token = self.token().await?;
        match self
            .send(
                method.clone(),
                path,
                query,
                body,
                idempotency_key,
                Some(&token),
            )
            .await
        {
            Err(e) if e.status() == Some(401) => match self.credential {
                Credential::ApiKey(_) => Err(match e {
                    ClientError::Api { problem, .. } => ClientError::Api {
                        problem,
                        hint: Some("check the key in KILN_API_KEY: it may be revoked or expired"),
                    },
                    other => other,
                }),
                Credential::Session(_) => {
                    // The token may have been revoked or signed with a retired key: refresh once.
                    self.refresh(Some(&token)).await?;
                    let token = self.token().await?;
                    self.send(method, path, query, body, idempotency_key, Some(&token))
                        .await
                }
            },
            other => other,
        }
    }

    /// A usable bearer token, refreshing the session first when its access token is (nearly) expired.
    async fn token(&mut self) -> Result<String> {
        if let Credential::ApiKey(key) = &self.credential {
            return Ok(key.clone());
        }
        let session = self.session()?;
        if let Some(token) = fresh_access(&session) {
            return Ok(token);
        }
        let stale = session.access_token.clone();
        self.refresh(stale.as_deref()).await?;
        let session = self.session()?;
        session
            .access_token
            .clone()
            .ok_or(ClientError::SessionExpired)
    }

    /// The saved session for this API, loaded once.
    fn session(&mut self) -> Result<Config> {
        if let Credential::Session(Some(c)) = &self.credential {
            return Ok(c.clone());
        }
        let config = self.store.load()?;
        self.check_session(&config)?;
        self.credential = Credential::Session(Some(config.clone()));
        Ok(config)
    }

    fn check_session(&self, config: &Config) -> Result<()> {
        if !config.has_session() {
            return Err(ClientError::NotSignedIn(self.base.clone()));
        }
        match config.api_url.as_deref().map(normalize_url) {
            Some(saved) if saved != self.base => Err(ClientError::OtherServer {
                saved,
                wanted: self.base.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Exchange the refresh token for a new pair and save it. `stale` is the access token that
    /// was found expired or rejected: if another `kiln` process has refreshed in the meantime,
    /// its new tokens are used instead (a refresh token works once; reuse revokes the session).
    async fn refresh(&mut self, stale: Option<&str>) -> Result<()> {
        let store = self.store.clone();
        let locked = store.lock()?;
        let mut config = locked.load()?;
        self.check_session(&config)?;
        if config.access_token.as_deref() != stale && fresh_access(&config).is_some() {
            self.credential = Credential::Session(Some(config));
            return Ok(());
        }
        let Some(refresh_token) = config.refresh_token.clone() else {
            return Err(ClientError::SessionExpired);
        };
        let pair = match self
            .anonymous(
                Method::POST,
                "/v1/auth/refresh",
                &json!({ "refresh_token": refresh_token }),
            )
            .await
        {
            Ok(pair) => pair,
            Err(e) if matches!(e.status(), Some(400 | 401 | 422)) => {
                // The session is over; forget the dead tokens so the next command says so at once.
                config.clear_session();
                locked.save(&config)?;
                self.credential = Credential::Session(Some(config));
                return Err(ClientError::SessionExpired);
            }
            Err(e) => return Err(e),
        };
        let tokens = TokenPair::from_value(&pair).ok_or(ClientError::BadResponse {
            status: StatusCode::OK,
        })?;
        tokens.apply(&mut config);
        locked.save(&config)?;
        self.credential = Credential::Session(Some(config));
        Ok(())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        idempotency_key: Option<&str>,
        token: Option<&str>,
    ) -> Result<Value> {
        let url = format!("{}{}", self.base, path);
        let mut req = self
            .http
            .request(method, &url)
            .header("accept", "application/json, application/problem+json");
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(k) = idempotency_key {
            req = req.header("idempotency-key", k);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let transport = |e: reqwest::Error| ClientError::Transport {
            url: self.base.clone(),
            reason: root_cause(&e),
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(transport)?;
        if status.is_success() {
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|_| ClientError::BadResponse { status });
        }
        Err(api_error(status, &bytes))
    }

    /// An authenticated `GET` whose answer is read as it comes (plain text, or server-sent
    /// events with `Accept: text/event-stream`): the response, once its status is a success.
    /// No overall timeout; `last_event_id` resumes an event stream.
    pub async fn open_stream(
        &mut self,
        path: &str,
        query: &[(&str, String)],
        last_event_id: Option<&str>,
    ) -> Result<reqwest::Response> {
        let mut refreshed = false;
        loop {
            let token = self.token().await?;
            let url = format!("{}{}", self.base, path);
            let mut req = self
                .http
                .get(&url)
                .query(query)
                .bearer_auth(&token)
                .timeout(Duration::from_secs(365 * 24 * 3600))
                .header(
                    "accept",
                    "text/event-stream, text/plain, application/problem+json",
                );
            if let Some(id) = last_event_id {
                req = req.header("last-event-id", id);
            }
            let resp = req.send().await.map_err(|e| ClientError::Transport {
                url: self.base.clone(),
                reason: root_cause(&e),
            })?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED
                && !refreshed
                && matches!(self.credential, Credential::Session(_))
            {
                refreshed = true;
                self.refresh(Some(&token)).await?;
                continue;
            }
            let bytes = resp.bytes().await.unwrap_or_default();
            return Err(api_error(status, &bytes));
        }
    }
}

/// A failed answer as the error the CLI shows (the problem document when there is one).
fn api_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    {
        let mut problem: Problem = serde_json::from_slice(bytes).unwrap_or_else(|_| Problem {
            title: status
                .canonical_reason()
                .unwrap_or("Request failed")
                .to_owned(),
            detail: String::from_utf8_lossy(bytes)
                .chars()
                .take(300)
                .collect::<String>()
                .trim()
                .to_owned(),
            ..Problem::default()
        });
        problem.status = status.as_u16();
        ClientError::Api {
            problem,
            hint: None,
        }
    }
}

/// What login and refresh answer.
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_at: OffsetDateTime,
}

impl TokenPair {
    pub fn from_value(v: &Value) -> Option<Self> {
        let expires_in = v.get("expires_in")?.as_i64()?;
        Some(Self {
            access_token: v.get("access_token")?.as_str()?.to_owned(),
            refresh_token: v.get("refresh_token")?.as_str()?.to_owned(),
            expires_at: OffsetDateTime::now_utc() + time::Duration::seconds(expires_in),
        })
    }

    pub fn apply(self, config: &mut Config) {
        config.access_token = Some(self.access_token);
        config.refresh_token = Some(self.refresh_token);
        config.access_expires_at = Some(
            self.expires_at
                .replace_nanosecond(0)
                .unwrap_or(self.expires_at),
        );
    }
}

/// The access token, if it has more than [`REFRESH_MARGIN`] left.
fn fresh_access(config: &Config) -> Option<String> {
    let expires = config.access_expires_at?;
    (expires - OffsetDateTime::now_utc() > REFRESH_MARGIN)
        .then(|| config.access_token.clone())
        .flatten()
}

pub fn normalize_url(url: &str) -> String {
    url.trim().trim_end_matches('/').to_owned()
}

/// Percent-encode one path segment (IDs typed by the user end up in URLs).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The innermost cause of a transport error ("Connection refused (os error 111)"), which is
/// what a person needs; reqwest's own message repeats the URL.
fn root_cause(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "the request timed out".into();
    }
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
