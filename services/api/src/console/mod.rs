//! The web console: server-rendered HTML (askama templates in `services/api/templates/`) with a
//! little plain JavaScript, served by `kiln-api` itself.
//!
//! Every page is a thin adapter over the same [`ops`](crate::ops) functions as REST and GraphQL,
//! so authorisation, validation and auditing have one code path; the console never runs SQL.
//! What the console adds is only what a browser needs:
//!
//! * **Session** ([`session`]): sign-in stores the access token and the refresh token in
//!   `HttpOnly`, `SameSite=Strict` cookies (`Secure` when configured). A request whose access
//!   token has expired or is rejected is refreshed transparently with the refresh cookie, and the
//!   new pair is set on the response; when that fails too, the browser is sent to `/login`.
//! * **CSRF**: `SameSite=Strict` cookies, and every state-changing request whose `Origin` header
//!   is present and names another host than `Host` is refused ([`guard`]).
//! * **Forms** post `application/x-www-form-urlencoded`; a failed operation re-renders the page
//!   with each field's message next to the field and the user's input kept (never a password).
//!   Successes redirect (post/redirect/get) with a one-shot flash message — except creating an
//!   API key, whose answer carries the secret that is shown exactly once.
//! * **Headers**: a strict Content-Security-Policy (no inline script or style), no framing, and
//!   `Cache-Control: no-store` on pages, which can hold secrets.

mod audit;
mod auth;
mod billing;
mod endpoints;
mod fleet;
mod instances;
mod keys;
mod orgs;
mod pods;
mod session;

use std::borrow::Cow;

use askama::Template;
use axum::Router;
use axum::extract::{Path, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use kiln_domain::Role;

use crate::error::{ApiError, FieldError};
use crate::state::AppState;
use crate::views::MembershipView;

pub(crate) use session::{Ctx, Flash};

/// The console's routes: `/`, `/login`, `/signup`, `/logout`, `/switch`, `/orgs/…` (with an
/// org's instances and their power actions, its pods and their live `…/events` and `…/logs` streams), the operators' `/admin/fleet`,
/// `/static/…`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(orgs::dashboard))
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/signup", get(auth::signup_page).post(auth::signup))
        .route("/logout", post(auth::logout))
        .route("/switch", get(orgs::switch))
        .route(
            "/orgs",
            get(|| async { Redirect::to("/") }).post(orgs::create),
        )
        .route("/orgs/{org}", get(orgs::overview))
        .route(
            "/orgs/{org}/members",
            get(orgs::members).post(orgs::member_add),
        )
        .route("/orgs/{org}/members/{user}/role", post(orgs::member_role))
        .route(
            "/orgs/{org}/members/{user}/remove",
            post(orgs::member_remove),
        )
        .route(
            "/orgs/{org}/instances",
            get(instances::list).post(instances::create),
        )
        .route("/orgs/{org}/instances/{instance}", get(instances::show))
        .route(
            "/orgs/{org}/instances/{instance}/{action}",
            post(instances::act),
        )
        .route("/orgs/{org}/pods", get(pods::list).post(pods::create))
        .route("/orgs/{org}/pods/{pod}", get(pods::show))
        .route("/orgs/{org}/pods/{pod}/delete", post(pods::delete))
        .route("/orgs/{org}/pods/{pod}/events", get(pods::events))
        .route("/orgs/{org}/pods/{pod}/logs", get(pods::logs))
        .route("/orgs/{org}/endpoints", get(endpoints::list))
        .route("/orgs/{org}/endpoints/{endpoint}", get(endpoints::show))
        .route(
            "/orgs/{org}/endpoints/{endpoint}/price",
            post(endpoints::set_price),
        )
        .route(
            "/orgs/{org}/endpoints/{endpoint}/grants",
            post(endpoints::grant),
        )
        .route(
            "/orgs/{org}/endpoints/{endpoint}/grants/{grantee}/revoke",
            post(endpoints::revoke),
        )
        .route("/orgs/{org}/api-keys", get(keys::list).post(keys::create))
        .route("/orgs/{org}/api-keys/{key}/revoke", post(keys::revoke))
        .route("/orgs/{org}/audit-log", get(audit::list))
        .route("/orgs/{org}/billing", get(billing::page))
        .route(
            "/orgs/{org}/billing/invoices/{invoice}",
            get(billing::invoice_page),
        )
        .route(
            "/orgs/{org}/billing/invoices/{invoice}/{format}",
            get(billing::invoice_download),
        )
        .route("/admin/fleet", get(fleet::page))
        .route("/admin/fleet/{node}/{action}", post(fleet::act))
        .route("/static/{file}", get(asset))
        .layer(middleware::from_fn(guard))
}

// ---- static assets, embedded in the binary ----

const CSS: &str = include_str!("../../static/console.css");
const JS: &str = include_str!("../../static/console.js");
const LOGO: &str = include_str!("../../static/kiln.svg");

async fn asset(Path(file): Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        "kiln.svg" => (LOGO, "image/svg+xml"),
        _ => return (StatusCode::NOT_FOUND, "not found").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

// ---- the guard around every console route ----

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'";

/// Refuses cross-site form posts, hands extractors a place to put `Set-Cookie` headers (a
/// transparent refresh happens inside an extractor), and sets the security headers.
async fn guard(mut req: Request, next: Next) -> Response {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && !same_origin(req.headers(), req.uri().authority().map(|a| a.as_str())) {
        tracing::warn!(origin = ?req.headers().get(header::ORIGIN), host = ?req.headers().get(header::HOST), "console refused a cross-origin request");
        return error_page(
            None,
            StatusCode::FORBIDDEN,
            "Request refused",
            "This form was sent from another site, so Kiln did not act on it. Go back to the console and try again.",
        );
    }
    let pending = session::PendingCookies::default();
    req.extensions_mut().insert(pending.clone());
    let mut resp = next.run(req).await;
    let headers = resp.headers_mut();
    for cookie in pending.take() {
        headers.append(header::SET_COOKIE, cookie);
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    resp
}

/// Whether a request's `Origin` (when it has one) names the host the request was sent to.
fn same_origin(headers: &HeaderMap, uri_authority: Option<&str>) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(host) = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(uri_authority)
    else {
        return false;
    };
    let Ok(origin) = url::Url::parse(origin.to_str().unwrap_or("null")) else {
        return false;
    };
    let (Some(origin_host), Some(origin_port)) =
        (origin.host_str(), origin.port_or_known_default())
    else {
        return false;
    };
    let (host_name, host_port) = split_host_port(host);
    let host_port = match host_port {
        Some(p) => p,
        None => match origin.scheme() {
            "https" => 443,
            "http" => 80,
            _ => return false,
        },
    };
    origin_host.eq_ignore_ascii_case(host_name) && origin_port == host_port
}

/// `example.com:8080` → (`example.com`, Some(8080)); `[::1]:80` → (`[::1]`, Some(80)).
fn split_host_port(host: &str) -> (&str, Option<u16>) {
    let host = host.trim();
    let split_at = if host.starts_with('[') {
        host.find(']').map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    match split_at {
        Some(i) if host[i..].starts_with(':') => (&host[..i], host[i + 1..].parse().ok()),
        _ => (host, None),
    }
}

// ---- what every page shows ----

/// The frame around a page: the top bar (when signed in) and the flash messages.
pub(crate) struct Chrome {
    pub user: Option<UserBar>,
    pub notice: Option<String>,
    pub alert: Option<String>,
}

impl Chrome {
    pub fn signed_out(notice: Option<String>) -> Self {
        Self {
            user: None,
            notice,
            alert: None,
        }
    }
}

pub(crate) struct UserBar {
    pub email: String,
    pub name: String,
    pub orgs: Vec<MembershipView>,
    /// The org being looked at, or empty.
    pub current_org: String,
    /// Operators get the fleet page in the top bar.
    pub is_operator: bool,
}

/// Field errors of a failed form, each shown beside its field.
#[derive(Default)]
pub(crate) struct FormErrors(Vec<(String, String)>);

impl FormErrors {
    pub fn has(&self, field: &str) -> bool {
        self.0.iter().any(|(f, _)| f == field)
    }

    pub fn get(&self, field: &str) -> Option<String> {
        let messages: Vec<&str> = self
            .0
            .iter()
            .filter(|(f, _)| f == field)
            .map(|(_, m)| m.as_str())
            .collect();
        (!messages.is_empty()).then(|| messages.join(" "))
    }
}

/// How a form's failure is shown: messages by field (with the label the user sees), anything
/// else as a banner above the page.
pub(crate) struct Failure {
    pub status: StatusCode,
    pub errors: FormErrors,
    pub alert: Option<String>,
}

impl Failure {
    /// Sort an operation's error into what the form shows, or give it back when it needs a page
    /// of its own (not found, signed out, internal). `fields` maps an operation's field name to
    /// (the form's field name, its label).
    pub fn from_error(err: ApiError, fields: &[(&str, &str, &str)]) -> Result<Self, ApiError> {
        let (status, errors, alert) = match err {
            ApiError::Validation(list) => {
                let (mut known, mut other) = (Vec::new(), Vec::new());
                for FieldError { field, message } in list {
                    match fields.iter().find(|(f, _, _)| *f == field) {
                        Some((_, form_field, label)) => {
                            known.push(((*form_field).to_owned(), format!("{label} {message}.")))
                        }
                        None => other.push(format!("{field} {message}")),
                    }
                }
                let alert = if other.is_empty() {
                    None
                } else {
                    Some(sentence(&other.join("; ")))
                };
                (StatusCode::UNPROCESSABLE_ENTITY, FormErrors(known), alert)
            }
            ApiError::Conflict(msg) => (
                StatusCode::CONFLICT,
                FormErrors::default(),
                Some(sentence(&msg)),
            ),
            ApiError::Forbidden(msg) => (
                StatusCode::FORBIDDEN,
                FormErrors::default(),
                Some(format!("Not allowed: {}", sentence(&msg))),
            ),
            ApiError::BadRequest(msg) => (
                StatusCode::BAD_REQUEST,
                FormErrors::default(),
                Some(sentence(&msg)),
            ),
            ApiError::RateLimited { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                FormErrors::default(),
                Some(format!(
                    "Too many attempts. Try again in {} seconds.",
                    retry_after.as_secs().max(1)
                )),
            ),
            ApiError::NotFound(what) if what != "org" => (
                StatusCode::NOT_FOUND,
                FormErrors::default(),
                Some(sentence(&format!("{what} not found"))),
            ),
            other => return Err(other),
        };
        Ok(Self {
            status,
            errors,
            alert,
        })
    }
}

/// "an org must keep at least one owner" → "An org must keep at least one owner."
pub(crate) fn sentence(msg: &str) -> String {
    let msg = msg.trim();
    let mut chars = msg.chars();
    let mut out = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect::<String>(),
        None => return String::new(),
    };
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

/// One `<option>` of a role or expiry `<select>`.
pub(crate) struct SelectOption {
    pub value: Cow<'static, str>,
    pub label: Cow<'static, str>,
    pub selected: bool,
}

/// The roles `role` may hand out, with `current` selected.
pub(crate) fn role_options(role: Role, current: &str) -> Vec<SelectOption> {
    Role::ALL
        .into_iter()
        .filter(|r| role.may_grant(*r))
        .map(|r| SelectOption {
            value: r.as_str().into(),
            label: r.as_str().into(),
            selected: r.as_str() == current,
        })
        .collect()
}

/// "2025-03-01T12:34:56Z" → "2025-03-01 12:34 UTC".
pub(crate) fn when(rfc3339: &str) -> String {
    match time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339) {
        Ok(t) => {
            let t = t.to_offset(time::UtcOffset::UTC);
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            )
        }
        Err(_) => rfc3339.to_owned(),
    }
}

// ---- responses ----

pub(crate) fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(error) => {
            tracing::error!(%error, "console template failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
                .into_response()
        }
    }
}

/// `303 See Other`: after a form post, the browser GETs `to`.
pub(crate) fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    chrome: Chrome,
    code: u16,
    title: &'a str,
    message: &'a str,
    back: &'a str,
    back_label: &'a str,
}

/// A whole-page error, with the top bar when the user is known.
pub(crate) fn error_page(
    user: Option<UserBar>,
    status: StatusCode,
    title: &str,
    message: &str,
) -> Response {
    let signed_in = user.is_some();
    let page = ErrorPage {
        chrome: Chrome {
            user,
            notice: None,
            alert: None,
        },
        code: status.as_u16(),
        title,
        message,
        back: "/",
        back_label: if signed_in {
            "Back to your organisations"
        } else {
            "Back to Kiln"
        },
    };
    render(status, &page)
}

/// Log an error's whole chain once, where it is turned into a page.
pub(crate) fn log_error(err: &ApiError) {
    let mut chain = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = source {
        if !chain.is_empty() {
            chain.push_str(": ");
        }
        chain.push_str(&e.to_string());
        source = e.source();
    }
    tracing::error!(error = %chain, "console request failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).expect("host"));
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).expect("origin"));
        }
        h
    }

    #[test]
    fn origin_must_match_host_when_present() {
        assert!(same_origin(&headers(None, "127.0.0.1:8080"), None));
        assert!(same_origin(
            &headers(Some("http://127.0.0.1:8080"), "127.0.0.1:8080"),
            None
        ));
        assert!(same_origin(
            &headers(Some("https://kiln.example"), "kiln.example"),
            None
        ));
        assert!(same_origin(
            &headers(Some("https://Kiln.Example:443"), "kiln.example"),
            None
        ));
        assert!(same_origin(
            &headers(Some("http://[::1]:8080"), "[::1]:8080"),
            None
        ));
        assert!(!same_origin(
            &headers(Some("http://evil.example"), "127.0.0.1:8080"),
            None
        ));
        assert!(!same_origin(
            &headers(Some("http://127.0.0.1:9999"), "127.0.0.1:8080"),
            None
        ));
        assert!(!same_origin(&headers(Some("null"), "127.0.0.1:8080"), None));
        assert!(!same_origin(
            &headers(Some("https://kiln.example"), "kiln.example:8443"),
            None
        ));
    }

    #[test]
    fn messages_read_as_sentences() {
        assert_eq!(
            sentence("an org must keep at least one owner"),
            "An org must keep at least one owner."
        );
        assert_eq!(sentence("Done!"), "Done!");
        assert_eq!(when("2025-03-01T12:34:56Z"), "2025-03-01 12:34 UTC");
    }

    #[test]
    fn validation_errors_land_beside_their_fields() {
        let err = ApiError::Validation(vec![
            FieldError {
                field: "password".into(),
                message: "must be at least 12 characters".into(),
            },
            FieldError {
                field: "limit".into(),
                message: "must be between 1 and 200".into(),
            },
        ]);
        let Ok(f) = Failure::from_error(err, &[("password", "password", "Password")]) else {
            panic!("a form failure")
        };
        assert_eq!(f.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            f.errors.get("password").as_deref(),
            Some("Password must be at least 12 characters.")
        );
        assert_eq!(f.alert.as_deref(), Some("Limit must be between 1 and 200."));
        assert!(Failure::from_error(ApiError::NotFound("org"), &[]).is_err());
    }
}
