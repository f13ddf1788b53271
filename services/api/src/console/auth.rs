//! Sign up, sign in, sign out.

use askama::Template;
use axum::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::session::{self, Cookies, PendingCookies, Resolved};
use super::{Chrome, Failure, Flash, FormErrors, error_page, log_error, render, see_other};
use crate::error::ApiError;
use crate::ops;
use crate::state::{AppState, Caller, ClientInfo};
use crate::views::{LoginInput, LogoutInput, SignupInput};

/// Where to go after signing in: a path on this site, never another site.
fn safe_next(next: &str) -> &str {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.starts_with("/login")
        && !next.starts_with("/signup")
        && !next.starts_with("/logout")
        && next.len() <= 2048
        && !next.chars().any(|c| c.is_control() || c == '\\');
    if ok { next } else { "/" }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    chrome: Chrome,
    email: String,
    next: String,
    errors: FormErrors,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct LoginQuery {
    next: String,
}

/// The sign-in page (or, when already signed in, onwards).
pub(super) async fn login_page(
    State(state): State<AppState>,
    client: ClientInfo,
    headers: HeaderMap,
    axum::Extension(pending): axum::Extension<PendingCookies>,
    Flash(flash): Flash,
    Query(q): Query<LoginQuery>,
) -> Response {
    let jar = Cookies::parse(&headers);
    if let Ok(Resolved::User(_)) = session::resolve(&state, &jar, &client, Some(&pending)).await {
        return see_other(safe_next(&q.next));
    }
    let page = LoginPage {
        chrome: Chrome::signed_out(flash),
        email: String::new(),
        next: safe_next(&q.next).to_owned(),
        errors: FormErrors::default(),
    };
    render(StatusCode::OK, &page)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct LoginForm {
    email: String,
    password: String,
    next: String,
}

pub(super) async fn login(
    State(state): State<AppState>,
    client: ClientInfo,
    Form(form): Form<LoginForm>,
) -> Response {
    let input = LoginInput {
        email: form.email.clone(),
        password: form.password,
    };
    let next = safe_next(&form.next).to_owned();
    let failure = match ops::identity::login(&state, &input, &client).await {
        Ok(pair) => {
            return session::with_cookies(
                see_other(&next),
                session::session_cookies(&state, &pair),
            );
        }
        Err(ApiError::Unauthenticated(_)) => Failure {
            status: StatusCode::UNAUTHORIZED,
            errors: FormErrors::default(),
            alert: Some("The email or password is wrong.".into()),
        },
        Err(e) => match Failure::from_error(
            e,
            &[
                ("email", "email", "Email"),
                ("password", "password", "Password"),
            ],
        ) {
            Ok(f) => f,
            Err(e) => return unexpected(e),
        },
    };
    let page = LoginPage {
        chrome: Chrome {
            user: None,
            notice: None,
            alert: failure.alert,
        },
        email: form.email,
        next,
        errors: failure.errors,
    };
    render(failure.status, &page)
}

#[derive(Template)]
#[template(path = "signup.html")]
struct SignupPage {
    chrome: Chrome,
    name: String,
    email: String,
    errors: FormErrors,
}

pub(super) async fn signup_page(Flash(flash): Flash) -> Response {
    let page = SignupPage {
        chrome: Chrome::signed_out(flash),
        name: String::new(),
        email: String::new(),
        errors: FormErrors::default(),
    };
    render(StatusCode::OK, &page)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct SignupForm {
    name: String,
    email: String,
    password: String,
}

pub(super) async fn signup(
    State(state): State<AppState>,
    client: ClientInfo,
    Form(form): Form<SignupForm>,
) -> Response {
    let input = SignupInput {
        email: form.email.clone(),
        password: form.password,
        name: form.name.clone(),
    };
    let result = async {
        let mut tx = state.store.begin().await?;
        let view = ops::identity::signup(&state, &mut tx, &input, &client).await?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok::<_, ApiError>(view)
    }
    .await;
    let failure = match result {
        Ok(view) => {
            let notice = format!(
                "Welcome to Kiln! Your account for {} is ready — sign in to continue.",
                view.user.email
            );
            return session::redirect_with_notice(&state, "/login", &notice);
        }
        Err(e) => match Failure::from_error(
            e,
            &[
                ("email", "email", "Email"),
                ("password", "password", "Password"),
                ("name", "name", "Name"),
            ],
        ) {
            Ok(f) => f,
            Err(e) => return unexpected(e),
        },
    };
    let page = SignupPage {
        chrome: Chrome {
            user: None,
            notice: None,
            alert: failure.alert,
        },
        name: form.name,
        email: form.email,
        errors: failure.errors,
    };
    render(failure.status, &page)
}

/// Sign out: end the session the cookies belong to, and forget them.
pub(super) async fn logout(
    State(state): State<AppState>,
    client: ClientInfo,
    headers: HeaderMap,
) -> Response {
    let jar = Cookies::parse(&headers);
    let refresh_token = jar.get(session::REFRESH_COOKIE).map(str::to_owned);
    let caller = match jar.get(session::ACCESS_COOKIE) {
        Some(token) => state
            .authenticate(token)
            .await
            .ok()
            .map(|principal| Caller { principal, client }),
        None => None,
    };
    if caller.is_some() || refresh_token.is_some() {
        match ops::identity::logout(&state, caller.as_ref(), &LogoutInput { refresh_token }).await {
            // Already over (expired, revoked, or never was): the cookies go all the same.
            Ok(()) | Err(ApiError::Unauthenticated(_) | ApiError::BadRequest(_)) => {}
            Err(e) => log_error(&e),
        }
    }
    let mut cookies = session::clear_session_cookies(&state);
    cookies.extend(session::flash_cookie(&state, "You have signed out."));
    session::with_cookies(see_other("/login"), cookies)
}

fn unexpected(err: ApiError) -> Response {
    if matches!(err, ApiError::Internal(_)) {
        log_error(&err);
    }
    error_page(
        None,
        err.status(),
        "Something went wrong",
        "Kiln could not finish that just now. Try again in a moment.",
    )
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(
            safe_next("/orgs/org_1/members?cursor=x"),
            "/orgs/org_1/members?cursor=x"
        );
        assert_eq!(safe_next("//evil.example/x"), "/");
        assert_eq!(safe_next("/\\evil.example"), "/");
        assert_eq!(safe_next("https://evil.example"), "/");
        assert_eq!(safe_next("/login"), "/");
        assert_eq!(safe_next(""), "/");
    }
}
