//! Inputs parsed into validated types at the edge. A value of one of these types is known good;
//! every constructor says precisely what was wrong so the API can answer per field.

use std::fmt;

use serde::Serialize;

/// One field that failed validation, with a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InputError {
    pub field: &'static str,
    pub message: String,
}

impl InputError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// A normalised email address: trimmed and lower-cased, so `Ada@Example.COM ` and
/// `ada@example.com` are one account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, InputError> {
        let s = raw.trim().to_lowercase();
        let bad = |m: &str| Err(InputError::new(field, m));
        if s.is_empty() {
            return bad("is required");
        }
        if s.len() > 254 {
            return bad("must be at most 254 characters");
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad("must not contain spaces");
        }
        let Some((local, domain)) = s.rsplit_once('@') else {
            return bad("must look like name@example.com");
        };
        if local.is_empty() || local.len() > 64 || local.contains('@') {
            return bad("must look like name@example.com");
        }
        if domain.len() < 3
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
            || domain.contains("..")
            || !domain
                .chars()
                .all(|c| c.is_alphanumeric() || c == '.' || c == '-')
        {
            return bad("must have a valid domain, like name@example.com");
        }
        Ok(Self(s))
    }

    /// For values already normalised and stored (from the database).
    pub fn from_trusted(s: String) -> Self {
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn local_part(&self) -> &str {
        self.0.rsplit_once('@').map_or(self.0.as_str(), |(l, _)| l)
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A password that meets the policy: at least 12 characters, at most 256, and not the email
/// (nor its local part). Never printed.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub const MIN_CHARS: usize = 12;
    pub const MAX_CHARS: usize = 256;

    /// Check a new password against the policy.
    pub fn new_for(field: &'static str, raw: &str, email: &Email) -> Result<Self, InputError> {
        let n = raw.chars().count();
        if n < Self::MIN_CHARS {
            return Err(InputError::new(
                field,
                format!("must be at least {} characters", Self::MIN_CHARS),
            ));
        }
        if n > Self::MAX_CHARS {
            return Err(InputError::new(
                field,
                format!("must be at most {} characters", Self::MAX_CHARS),
            ));
        }
        let lowered = raw.trim().to_lowercase();
        if lowered == email.as_str() || lowered == email.local_part() {
            return Err(InputError::new(field, "must not be your email address"));
        }
        if raw.chars().all(|c| c == raw.chars().next().unwrap_or(' ')) {
            return Err(InputError::new(field, "must not be one character repeated"));
        }
        Ok(Self(raw.to_owned()))
    }

    /// A password offered at sign-in: not checked against the policy (old passwords stay
    /// valid), only bounded so hashing cannot be abused.
    pub fn offered(field: &'static str, raw: &str) -> Result<Self, InputError> {
        if raw.is_empty() {
            return Err(InputError::new(field, "is required"));
        }
        if raw.chars().count() > Self::MAX_CHARS {
            return Err(InputError::new(field, "is too long"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(…)")
    }
}

macro_rules! short_text {
    ($(#[$doc:meta])* $name:ident, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const MAX_CHARS: usize = $max;

            pub fn parse(field: &'static str, raw: &str) -> Result<Self, InputError> {
                let s = raw.trim();
                if s.is_empty() {
                    return Err(InputError::new(field, "is required"));
                }
                if s.chars().count() > Self::MAX_CHARS {
                    return Err(InputError::new(
                        field,
                        format!("must be at most {} characters", Self::MAX_CHARS),
                    ));
                }
                if has_control(s) {
                    return Err(InputError::new(field, "must not contain control characters"));
                }
                Ok(Self(s.to_owned()))
            }

            pub fn from_trusted(s: String) -> Self {
                Self(s)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

short_text!(/// An organisation's display name.
    OrgName, 100);
short_text!(/// A person's display name.
    PersonName, 100);
short_text!(/// A label for an API key.
    ApiKeyName, 100);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised() {
        let e = Email::parse("email", "  Ada.Lovelace@Example.COM ").unwrap();
        assert_eq!(e.as_str(), "ada.lovelace@example.com");
        assert_eq!(e.local_part(), "ada.lovelace");
    }

    #[test]
    fn bad_emails_say_what_is_wrong() {
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a da@example.com",
            "ada@.com",
            "ada@ex..com",
        ] {
            let err = Email::parse("email", bad).unwrap_err();
            assert_eq!(err.field, "email");
            assert!(!err.message.is_empty());
        }
    }

    #[test]
    fn password_policy() {
        let email = Email::parse("email", "ada@example.com").unwrap();
        assert!(Password::new_for("password", "short", &email).is_err());
        assert!(Password::new_for("password", "ada@example.com", &email).is_err());
        assert!(Password::new_for("password", "ADA@EXAMPLE.COM", &email).is_err());
        assert!(Password::new_for("password", "aaaaaaaaaaaaaaaa", &email).is_err());
        assert!(Password::new_for("password", &"x".repeat(300), &email).is_err());
        assert!(Password::new_for("password", "correct horse battery", &email).is_ok());
        // Length counts characters, not bytes.
        assert!(Password::new_for("password", "ééééééabcdef", &email).is_ok());
        assert!(Password::new_for("password", "éééééé", &email).is_err());
    }

    #[test]
    fn password_debug_never_shows_the_secret() {
        let p = Password::offered("password", "hunter2hunter2").unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(OrgName::parse("name", "  Acme  ").unwrap().as_str(), "Acme");
        assert!(OrgName::parse("name", "   ").is_err());
        assert!(OrgName::parse("name", &"x".repeat(101)).is_err());
        assert!(OrgName::parse("name", "a\u{0}b").is_err());
    }
}
