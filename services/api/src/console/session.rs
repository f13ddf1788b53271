//! The console's session: the token pair from `ops::identity::login` kept in cookies, and the
//! transparent refresh when the access token has expired or is rejected.
//!
//! Refresh tokens are single use, and presenting a spent one revokes the whole session. A
//! browser can send two requests with the same (expired) cookies at once — two tabs reloading —
//! so concurrent refreshes of one token on this replica share a single exchange: the first does
//! it, the others wait for its answer, which is remembered for [`REFRESH_GRACE`].

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use kiln_domain::UserId;
use kiln_store::Principal;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::{Chrome, UserBar, error_page, log_error, see_other};
use crate::error::ApiError;
use crate::ops;
use crate::rest::extract::client_info;
use crate::state::{AppState, Caller, ClientInfo};
use crate::views::{RefreshInput, TokenPairView};

pub(crate) const ACCESS_COOKIE: &str = "kiln_access";
pub(crate) const REFRESH_COOKIE: &str = "kiln_refresh";
const FLASH_COOKIE: &str = "kiln_flash";

/// How long the answer to one refresh is handed to concurrent requests that present the same
/// refresh token.
const REFRESH_GRACE: Duration = Duration::from_secs(20);

// ---- cookies ----

/// The request's cookies, by name (the first of duplicate names wins).
pub(crate) struct Cookies(Vec<(String, String)>);

impl Cookies {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut out = Vec::new();
        for value in headers.get_all(header::COOKIE) {
            let Ok(value) = value.to_str() else { continue };
            for pair in value.split(';') {
                if let Some((name, v)) = pair.split_once('=') {
                    out.push((
                        name.trim().to_owned(),
                        v.trim().trim_matches('"').to_owned(),
                    ));
                }
            }
        }
        Self(out)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }
}

fn cookie(state: &AppState, name: &str, value: &str, max_age: i64) -> Option<HeaderValue> {
    let secure = if state.config.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
    ))
    .ok()
}

/// `Set-Cookie` headers that keep a freshly issued token pair.
pub(crate) fn session_cookies(state: &AppState, pair: &TokenPairView) -> Vec<HeaderValue> {
    let session_secs = state.config.session_ttl_days.max(1) * 86_400;
    [
        cookie(
            state,
            ACCESS_COOKIE,
            &pair.access_token,
            pair.expires_in.max(1),
        ),
        cookie(state, REFRESH_COOKIE, &pair.refresh_token, session_secs),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// `Set-Cookie` headers that forget the session.
pub(crate) fn clear_session_cookies(state: &AppState) -> Vec<HeaderValue> {
    [
        cookie(state, ACCESS_COOKIE, "", 0),
        cookie(state, REFRESH_COOKIE, "", 0),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// A one-shot message for the next page (after a redirect).
pub(crate) fn flash_cookie(state: &AppState, message: &str) -> Option<HeaderValue> {
    let short: String = message.chars().take(300).collect();
    let encoded: String = url::form_urlencoded::byte_serialize(short.as_bytes()).collect();
    cookie(state, FLASH_COOKIE, &encoded, 60)
}

/// Add `Set-Cookie` headers to a response.
pub(crate) fn with_cookies(
    mut resp: Response,
    cookies: impl IntoIterator<Item = HeaderValue>,
) -> Response {
    for c in cookies {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}

/// Redirect with a flash message.
pub(crate) fn redirect_with_notice(state: &AppState, to: &str, notice: &str) -> Response {
    with_cookies(see_other(to), flash_cookie(state, notice))
}

/// `Set-Cookie` headers an extractor wants on the response; the console's guard adds them.
#[derive(Clone, Default)]
pub(crate) struct PendingCookies(Arc<Mutex<Vec<HeaderValue>>>);

impl PendingCookies {
    pub fn push(&self, cookies: impl IntoIterator<Item = HeaderValue>) {
        if let Ok(mut v) = self.0.lock() {
            v.extend(cookies);
        }
    }

    pub fn take(&self) -> Vec<HeaderValue> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// The flash message a redirect left for this page, if any. Reading it clears it.
pub(crate) struct Flash(pub Option<String>);

impl FromRequestParts<AppState> for Flash {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let jar = Cookies::parse(&parts.headers);
        Ok(Flash(take_flash(&jar, parts, state)))
    }
}

fn take_flash(jar: &Cookies, parts: &Parts, state: &AppState) -> Option<String> {
    let raw = jar.get(FLASH_COOKIE)?;
    if let Some(pending) = parts.extensions.get::<PendingCookies>() {
        pending.push(cookie(state, FLASH_COOKIE, "", 0));
    }
    let text = url::form_urlencoded::parse(format!("m={raw}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())?;
    let text = text
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>();
    (!text.is_empty()).then_some(text)
}

// ---- who is signed in ----

pub(crate) enum Resolved {
    /// A live session (possibly just refreshed; the new cookies are pending).
    User(Principal),
    /// No session, or one that has ended.
    SignedOut,
}

/// Find the signed-in person from the cookies, refreshing the access token when needed. New
/// cookies go to `pending`.
pub(crate) async fn resolve(
    state: &AppState,
    jar: &Cookies,
    client: &ClientInfo,
    pending: Option<&PendingCookies>,
) -> Result<Resolved, ApiError> {
    if let Some(token) = jar.get(ACCESS_COOKIE) {
        match state.authenticate(token).await {
            Ok(p @ Principal::User { .. }) => return Ok(Resolved::User(p)),
            // The console is for people; an API key in a cookie is not a session.
            Ok(Principal::ApiKey { .. }) | Err(ApiError::Unauthenticated(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let Some(refresh) = jar.get(REFRESH_COOKIE) else {
        return Ok(Resolved::SignedOut);
    };
    // Without a place to put the new cookies the refreshed pair would be lost, and the next
    // request would present the spent token (which revokes the session).
    let Some(pending) = pending else {
        return Ok(Resolved::SignedOut);
    };
    let pair = match refresh_once(state, refresh, client).await {
        Ok(pair) => pair,
        Err(ApiError::Unauthenticated(_) | ApiError::Validation(_)) => {
            return Ok(Resolved::SignedOut);
        }
        Err(e) => return Err(e),
    };
    match state.authenticate(&pair.access_token).await {
        Ok(p @ Principal::User { .. }) => {
            pending.push(session_cookies(state, &pair));
            Ok(Resolved::User(p))
        }
        Ok(Principal::ApiKey { .. }) | Err(ApiError::Unauthenticated(_)) => Ok(Resolved::SignedOut),
        Err(e) => Err(e),
    }
}

/// One refresh exchange, shared by the requests that present the same refresh token.
type Flight = Arc<OnceCell<TokenPairView>>;
/// In-flight and recent exchanges, by SHA-256 of the refresh token, with when they began.
type Flights = HashMap<[u8; 32], (Instant, Flight)>;

static REFRESHES: LazyLock<Mutex<Flights>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// `ops::identity::refresh`, once per refresh token on this replica (see the module docs).
async fn refresh_once(
    state: &AppState,
    refresh_token: &str,
    client: &ClientInfo,
) -> Result<TokenPairView, ApiError> {
    let input = RefreshInput {
        refresh_token: refresh_token.to_owned(),
    };
    let digest: [u8; 32] = Sha256::digest(refresh_token.as_bytes()).into();
    let flight = {
        let Ok(mut map) = REFRESHES.lock() else {
            return ops::identity::refresh(state, &input, client).await;
        };
        map.retain(|_, (at, _)| at.elapsed() < REFRESH_GRACE);
        map.entry(digest)
            .or_insert_with(|| (Instant::now(), Flight::default()))
            .1
            .clone()
    };
    // A failed exchange leaves the cell empty, so a waiter tries again itself: if the token was
    // merely unlucky (the database was away) it still works; if it was spent, it stays refused.
    flight
        .get_or_try_init(|| ops::identity::refresh(state, &input, client))
        .await
        .cloned()
}

// ---- the signed-in page context ----

/// Where a signed-out visitor goes: the sign-in page, coming back here afterwards (for GETs).
fn to_login(state: &AppState, parts: &Parts, had_cookies: bool) -> Response {
    let back = (parts.method == Method::GET)
        .then(|| parts.uri.path_and_query().map(|pq| pq.as_str().to_owned()))
        .flatten()
        .filter(|pq| pq != "/");
    let to = match back {
        Some(pq) => format!(
            "/login?next={}",
            url::form_urlencoded::byte_serialize(pq.as_bytes()).collect::<String>()
        ),
        None => "/login".to_owned(),
    };
    let resp = see_other(&to);
    if had_cookies {
        with_cookies(resp, clear_session_cookies(state))
    } else {
        resp
    }
}

/// A console page's context: a signed-in person (else a redirect to `/login`).
pub(crate) struct Ctx {
    pub state: AppState,
    pub caller: Caller,
    pub user_id: UserId,
    pub flash: Option<String>,
}

impl FromRequestParts<AppState> for Ctx {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let jar = Cookies::parse(&parts.headers);
        let client = client_info(parts, state);
        let pending = parts.extensions.get::<PendingCookies>().cloned();
        let had_cookies = jar.get(ACCESS_COOKIE).is_some() || jar.get(REFRESH_COOKIE).is_some();
        match resolve(state, &jar, &client, pending.as_ref()).await {
            Ok(Resolved::User(principal)) => {
                let Some(user_id) = principal.user_id() else {
                    return Err(to_login(state, parts, had_cookies));
                };
                let flash = take_flash(&jar, parts, state);
                Ok(Ctx {
                    state: state.clone(),
                    caller: Caller { principal, client },
                    user_id,
                    flash,
                })
            }
            Ok(Resolved::SignedOut) => Err(to_login(state, parts, had_cookies)),
            Err(e) => {
                log_error(&e);
                Err(error_page(
                    None,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Kiln is having trouble",
                    "We could not check your session just now. Try again in a moment.",
                ))
            }
        }
    }
}

impl Ctx {
    /// The top bar and flash messages, with `current_org` chosen in the switcher.
    pub async fn chrome(&self, current_org: Option<&str>) -> Result<Chrome, ApiError> {
        Ok(Chrome {
            user: Some(self.user_bar(current_org).await?),
            notice: self.flash.clone(),
            alert: None,
        })
    }

    async fn user_bar(&self, current_org: Option<&str>) -> Result<UserBar, ApiError> {
        let me = ops::identity::me(&self.state, &self.caller).await?;
        Ok(UserBar {
            email: me.user.email,
            name: me.user.name,
            orgs: me.memberships,
            current_org: current_org.unwrap_or_default().to_owned(),
            is_operator: me.user.is_operator,
        })
    }

    /// Turn a failed page into the page that explains it.
    pub async fn fail(&self, err: ApiError) -> Response {
        let (status, title, message): (StatusCode, &str, String) = match &err {
            ApiError::Unauthenticated(_) => {
                return with_cookies(see_other("/login"), clear_session_cookies(&self.state));
            }
            ApiError::NotFound(what) => (
                StatusCode::NOT_FOUND,
                "Not found",
                format!("This {what} does not exist, or you do not have access to it."),
            ),
            ApiError::Forbidden(msg) => {
                (StatusCode::FORBIDDEN, "Not allowed", super::sentence(msg))
            }
            ApiError::RateLimited { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                "Slow down",
                format!(
                    "Too many requests. Try again in {} seconds.",
                    retry_after.as_secs().max(1)
                ),
            ),
            ApiError::Internal(_) => {
                log_error(&err);
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Something went wrong",
                    "Something went wrong on our side. It has been logged; try again in a moment."
                        .to_owned(),
                )
            }
            other => (
                other.status(),
                "That did not work",
                super::sentence(&other.problem().detail),
            ),
        };
        let bar = self.user_bar(None).await.ok();
        error_page(bar, status, title, &message)
    }

    /// The page, or the page that explains why not.
    pub async fn finish(&self, result: Result<Response, ApiError>) -> Response {
        match result {
            Ok(resp) => resp,
            Err(e) => self.fail(e).await,
        }
    }
}
