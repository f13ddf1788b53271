//! The one public error type. Every failure a caller can see becomes an RFC 9457
//! `application/problem+json` document; internal details are logged, never sent.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_domain::InputError;
use kiln_store::{AuthzError, StoreError};
use serde::Serialize;

/// One invalid field.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl From<InputError> for FieldError {
    fn from(e: InputError) -> Self {
        Self {
            field: e.field.to_owned(),
            message: e.message,
        }
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("authentication required")]
    Unauthenticated(&'static str),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("the Idempotency-Key was used with a different request")]
    IdempotencyMismatch,
    #[error("a request with this Idempotency-Key is still in progress")]
    IdempotencyInProgress,
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    #[error("payload too large")]
    PayloadTooLarge,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The org is out of credit (402).
    #[error("payment required: {0}")]
    PaymentRequired(String),
    /// A dependency is down for a moment (e.g. the log store); retrying later may work.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError::Validation(vec![FieldError {
            field: field.to_owned(),
            message: message.into(),
        }])
    }

    pub fn internal(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        ApiError::Internal(Box::new(e))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) | ApiError::IdempotencyMismatch => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::IdempotencyInProgress => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PaymentRequired(_) => StatusCode::PAYMENT_REQUIRED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short machine-readable code (the last segment of the problem `type`; GraphQL's `code`).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Validation(_) => "validation",
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::Conflict(_) => "conflict",
            ApiError::IdempotencyMismatch => "idempotency-key-reused",
            ApiError::IdempotencyInProgress => "idempotency-key-in-progress",
            ApiError::RateLimited { .. } => "rate-limited",
            ApiError::PayloadTooLarge => "payload-too-large",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::PaymentRequired(_) => "payment-required",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// What the caller is told. Never includes internal detail.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        let (title, detail, errors) = match self {
            ApiError::Validation(errs) => (
                "Your request has invalid fields",
                errs.iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
                errs.clone(),
            ),
            ApiError::BadRequest(d) => ("Bad request", d.clone(), vec![]),
            ApiError::Unauthenticated(d) => ("Authentication required", (*d).to_owned(), vec![]),
            ApiError::Forbidden(d) => ("Forbidden", d.clone(), vec![]),
            ApiError::NotFound(what) => ("Not found", format!("{what} not found"), vec![]),
            ApiError::Conflict(d) => ("Conflict", d.clone(), vec![]),
            ApiError::IdempotencyInProgress => (
                "Request in progress",
                "a request with this Idempotency-Key is still being processed; retry shortly to get its answer".to_owned(),
                vec![],
            ),
            ApiError::IdempotencyMismatch => (
                "Idempotency-Key reused",
                "this Idempotency-Key was already used with a different request body".to_owned(),
                vec![],
            ),
            ApiError::RateLimited { retry_after } => (
                "Too many requests",
                format!("slow down; retry after {} seconds", retry_after.as_secs()),
                vec![],
            ),
            ApiError::MethodNotAllowed => (
                "Method not allowed",
                "this resource does not support that method".to_owned(),
                vec![],
            ),
            ApiError::PaymentRequired(d) => ("Payment required", d.clone(), vec![]),
            ApiError::Unavailable(d) => ("Service unavailable", d.clone(), vec![]),
            ApiError::PayloadTooLarge => (
                "Payload too large",
                "the request body is too large".to_owned(),
                vec![],
            ),
            ApiError::Internal(_) => (
                "Internal error",
                "something went wrong on our side; it has been logged".to_owned(),
                vec![],
            ),
        };
        Problem {
            kind: format!("https://kiln.dev/problems/{}", self.code()),
            title: title.to_owned(),
            status: status.as_u16(),
            detail,
            errors,
        }
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        ApiError::Validation(vec![e.into()])
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { what } => ApiError::NotFound(what),
            StoreError::Conflict { what } => ApiError::Conflict(format!("{what} already exists")),
            StoreError::LastOwner => {
                ApiError::Conflict("an org must keep at least one owner".into())
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<AuthzError> for ApiError {
    fn from(e: AuthzError) -> Self {
        match e {
            AuthzError::NotFound => ApiError::NotFound("org"),
            AuthzError::Forbidden { role } => {
                ApiError::Forbidden(format!("your role `{role}` may not do this"))
            }
            AuthzError::Store(s) => s.into(),
        }
    }
}

/// Log the whole error chain once, where the error is turned into a response.
fn log_chain(err: &ApiError) {
    let mut chain = String::new();
    let mut src: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = src {
        if !chain.is_empty() {
            chain.push_str(": ");
        }
        chain.push_str(&e.to_string());
        src = e.source();
    }
    tracing::error!(error = %chain, "request failed");
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Internal(_)) {
            log_chain(&self);
        }
        let problem = self.problem();
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut resp = (self.status(), body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let ApiError::RateLimited { retry_after } = &self
            && let Ok(v) = HeaderValue::from_str(&retry_after.as_secs().max(1).to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if let ApiError::IdempotencyInProgress | ApiError::Unavailable(_) = &self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ApiError::Unauthenticated(_) = &self {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
