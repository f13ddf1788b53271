//! Sign-up, sign-in, token refresh, sign-out and `me`.

use kiln_auth::{OpaqueSecret, SecretDigest};
use kiln_domain::{Email, Password, PersonName, Role};
use kiln_ratelimit::{Decision, Limit};
use kiln_store::{AuditEvent, Principal, RefreshOutcome};
use sqlx::PgConnection;

use super::Checks;
use crate::error::ApiError;
use crate::state::{AppState, Caller, ClientInfo, now_unix};
use crate::views::*;

const REFRESH_PREFIX: &str = "krt";

async fn limit(state: &AppState, bucket: &str, key: &str, limit: Limit) -> Result<(), ApiError> {
    match state.limiter.hit(bucket, key, limit).await {
        Decision::Allowed { .. } => Ok(()),
        Decision::Limited { retry_after } => {
            metrics::counter!("kiln_rate_limited_total", "bucket" => bucket.to_owned())
                .increment(1);
            Err(ApiError::RateLimited { retry_after })
        }
    }
}

fn ip_key(client: &ClientInfo) -> &str {
    client.ip.as_deref().unwrap_or("unknown")
}

async fn hash_password(state: &AppState, password: Password) -> Result<String, ApiError> {
    let hasher = state.hasher.clone();
    tokio::task::spawn_blocking(move || hasher.hash(password.expose()))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

/// Create an account and its personal org.
pub async fn signup(
    state: &AppState,
    conn: &mut PgConnection,
    input: &SignupInput,
    client: &ClientInfo,
) -> Result<SignupView, ApiError> {
    limit(
        state,
        "signup-ip",
        ip_key(client),
        Limit::per_hour(state.config.signup_limit_per_ip),
    )
    .await?;
    let account_key = input.email.trim().to_lowercase();
    limit(
        state,
        "signup-account",
        &account_key,
        Limit::per_hour(state.config.signup_limit_per_account),
    )
    .await?;
    let mut checks = Checks::default();
    let email = checks.take(Email::parse("email", &input.email));
    let name = checks.take(PersonName::parse("name", &input.name));
    let password = match &email {
        Some(e) => checks.take(Password::new_for("password", &input.password, e)),
        None => {
            // Still report the password's own problems alongside the email's.
            let probe = Email::from_trusted(String::new());
            checks.take(Password::new_for("password", &input.password, &probe))
        }
    };
    checks.finish()?;
    let (Some(email), Some(name), Some(password)) = (email, name, password) else {
        return Err(ApiError::BadRequest("invalid sign-up".into()));
    };
    let hash = hash_password(state, password).await?;
    let (user, org) = state
        .store
        .user_create_with_personal_org(conn, &email, &name, &hash)
        .await
        .map_err(|e| match e {
            kiln_store::StoreError::Conflict { .. } => {
                ApiError::field("email", "an account with this email already exists")
            }
            other => other.into(),
        })?;
    state
        .store
        .audit_record(
            conn,
            &AuditEvent::by_user(
                Some(org.id),
                user.id,
                "auth.signup",
                user.id.to_string(),
                client.ip.clone(),
                serde_json::json!({}),
            ),
        )
        .await?;
    Ok(SignupView {
        user: (&user).into(),
        org: OrgView::new(&org, Role::Owner),
    })
}

async fn issue_pair(
    state: &AppState,
    user: kiln_domain::UserId,
    session: kiln_domain::SessionId,
    refresh: &OpaqueSecret,
) -> Result<TokenPairView, ApiError> {
    let ring = state.keyring();
    let access = ring
        .issue(user, session, now_unix())
        .map_err(ApiError::internal)?;
    Ok(TokenPairView {
        access_token: access,
        refresh_token: refresh.expose().to_owned(),
        expires_in: ring.ttl_secs(),
        token_type: "Bearer".into(),
    })
}

/// Sign in with email and password. Takes one argon2 evaluation whether or not the account
/// exists, so timing does not reveal which emails have accounts.
pub async fn login(
    state: &AppState,
    input: &LoginInput,
    client: &ClientInfo,
) -> Result<TokenPairView, ApiError> {
    limit(
        state,
        "login-ip",
        ip_key(client),
        Limit::per_minute(state.config.login_limit_per_ip),
    )
    .await?;
    let account_key = input.email.trim().to_lowercase();
    limit(
        state,
        "login-account",
        &account_key,
        Limit::per_minute(state.config.login_limit_per_account),
    )
    .await?;
    let mut checks = Checks::default();
    let email = checks.take(Email::parse("email", &input.email));
    let password = checks.take(Password::offered("password", &input.password));
    checks.finish()?;
    let (Some(email), Some(password)) = (email, password) else {
        return Err(ApiError::BadRequest("invalid sign-in".into()));
    };
    let found = state.store.user_credentials(&email).await?;
    let hasher = state.hasher.clone();
    let stored = found.as_ref().map(|(_, h)| h.clone());
    let ok =
        tokio::task::spawn_blocking(move || hasher.verify(password.expose(), stored.as_deref()))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?;
    let known = found.as_ref().map(|(u, _)| u.id);
    let Some((user, _)) = found.filter(|_| ok) else {
        metrics::counter!("kiln_logins_total", "outcome" => "failed").increment(1);
        if let Some(user_id) = known {
            // Recorded off the response path, so a failure for a real account answers exactly
            // as fast as one for an unknown email.
            let (store, ip) = (state.store.clone(), client.ip.clone());
            tokio::spawn(async move {
                let event = AuditEvent::by_user(
                    None,
                    user_id,
                    "auth.login_failed",
                    user_id.to_string(),
                    ip,
                    serde_json::json!({}),
                );
                if let Err(error) = store.audit_record_now(&event).await {
                    tracing::warn!(%error, "could not record a failed sign-in");
                }
            });
        }
        return Err(ApiError::Unauthenticated("the email or password is wrong"));
    };
    let refresh = OpaqueSecret::generate(REFRESH_PREFIX);
    let lifetime = time::Duration::days(state.config.session_ttl_days.max(1));
    let session = state
        .store
        .session_create(
            user.id,
            &refresh.digest(),
            lifetime,
            client.ip.as_deref(),
            client.user_agent.as_deref(),
        )
        .await?;
    state
        .store
        .audit_record_now(&AuditEvent::by_user(
            None,
            user.id,
            "auth.login",
            session.to_string(),
            client.ip.clone(),
            serde_json::json!({ "user_agent": client.user_agent }),
        ))
        .await?;
    metrics::counter!("kiln_logins_total", "outcome" => "ok").increment(1);
    issue_pair(state, user.id, session, &refresh).await
}

/// Exchange a refresh token for a new pair. The old token is spent; presenting a spent token
/// again revokes the whole session (someone else may hold a copy).
pub async fn refresh(
    state: &AppState,
    input: &RefreshInput,
    client: &ClientInfo,
) -> Result<TokenPairView, ApiError> {
    let token = input.refresh_token.trim();
    if token.is_empty() {
        return Err(ApiError::field("refresh_token", "is required"));
    }
    if token.len() > 200 {
        return Err(ApiError::Unauthenticated("the refresh token is invalid"));
    }
    let new = OpaqueSecret::generate(REFRESH_PREFIX);
    match state
        .store
        .refresh_token_exchange(&SecretDigest::of(token), &new.digest())
        .await?
    {
        RefreshOutcome::Rotated {
            session_id,
            user_id,
        } => issue_pair(state, user_id, session_id, &new).await,
        RefreshOutcome::Reused {
            session_id,
            user_id,
        } => {
            state.forget_session(session_id);
            tracing::warn!(%session_id, %user_id, "refresh token reused; session revoked");
            state
                .store
                .audit_record_now(&AuditEvent::by_user(
                    None,
                    user_id,
                    "auth.refresh_reuse",
                    session_id.to_string(),
                    client.ip.clone(),
                    serde_json::json!({ "revoked": true }),
                ))
                .await?;
            Err(ApiError::Unauthenticated(
                "the refresh token was already used; the session has been revoked",
            ))
        }
        RefreshOutcome::Invalid => Err(ApiError::Unauthenticated(
            "the refresh token is invalid or expired",
        )),
    }
}

/// End a session: the caller's own, or the one a presented refresh token belongs to.
pub async fn logout(
    state: &AppState,
    caller: Option<&Caller>,
    input: &LogoutInput,
) -> Result<(), ApiError> {
    let session = if let Some(token) = input
        .refresh_token
        .as_deref()
        .filter(|t| !t.trim().is_empty())
    {
        state
            .store
            .session_of_refresh_token(&SecretDigest::of(token.trim()))
            .await?
    } else {
        match caller.map(|c| &c.principal) {
            Some(Principal::User {
                session_id,
                user_id,
                ..
            }) => Some((*session_id, *user_id)),
            Some(Principal::ApiKey { .. }) => {
                return Err(ApiError::BadRequest(
                    "API keys have no session; revoke the key instead".into(),
                ));
            }
            None => {
                return Err(ApiError::Unauthenticated(
                    "sign in, or pass the refresh_token to end",
                ));
            }
        }
    };
    let Some((session, user)) = session else {
        return Err(ApiError::Unauthenticated("the refresh token is invalid"));
    };
    state.store.session_revoke(session, "logout").await?;
    state.forget_session(session);
    state
        .store
        .audit_record_now(&AuditEvent::by_user(
            None,
            user,
            "auth.logout",
            session.to_string(),
            caller.and_then(|c| c.client.ip.clone()),
            serde_json::json!({}),
        ))
        .await?;
    Ok(())
}

/// The caller and their memberships.
pub async fn me(state: &AppState, caller: &Caller) -> Result<MeView, ApiError> {
    match &caller.principal {
        Principal::User { user_id, .. } => {
            if let Some(cached) = state.me_cached(*user_id) {
                return Ok((*cached).clone());
            }
            let me = state.store.me(*user_id).await?;
            let view = MeView {
                user: (&me.user).into(),
                memberships: me
                    .memberships
                    .into_iter()
                    .map(|m| MembershipView {
                        org_id: kiln_domain::OrgId::from_uuid(m.org_id).to_string(),
                        org_name: m.org_name,
                        role: m.role,
                        personal: m.personal,
                    })
                    .collect(),
                api_key: None,
            };
            state.me_remember(*user_id, std::sync::Arc::new(view.clone()));
            Ok(view)
        }
        Principal::ApiKey {
            key_id,
            org_id,
            role,
            created_by,
        } => {
            let creator = created_by.ok_or(ApiError::NotFound("user"))?;
            let user = state.store.user_get(creator).await?;
            let scope = state
                .store
                .authorize(&caller.principal, *org_id, kiln_domain::Permission::OrgRead)
                .await?;
            let org = state.store.org_get(&scope).await?;
            Ok(MeView {
                user: (&user).into(),
                memberships: vec![MembershipView {
                    org_id: org.id.to_string(),
                    org_name: org.name,
                    role: role.to_string(),
                    personal: org.personal,
                }],
                api_key: Some(ApiKeyPrincipalView {
                    id: key_id.to_string(),
                    org_id: org_id.to_string(),
                    role: role.to_string(),
                }),
            })
        }
    }
}
