//! Credentials, with no I/O: the data store keeps what these functions produce.
//!
//! * [`password`] — argon2id hashing at OWASP's minimum parameters, and a constant-work check
//!   for unknown accounts so login time does not reveal whether an email exists.
//! * [`jwt`] — short-lived access tokens (HS256 pinned, `iss`, `aud`, `exp`, `nbf`, `kid`) signed
//!   by the newest key of a [`jwt::KeyRing`]; older keys keep verifying until they retire, so a
//!   rotation logs nobody out.
//! * [`secret`] — opaque secrets (refresh tokens, API keys, bootstrap tokens): 256 random bits,
//!   stored only as a SHA-256 digest.

pub mod jwt;
pub mod password;
pub mod sealed;
pub mod secret;

pub use jwt::{AccessClaims, JwtError, KeyRing, SigningKey};
pub use password::{PasswordError, PasswordHasher};
pub use sealed::{SecretBox, SecretError, SecretsKeyError, pod_env_context};
pub use secret::{ApiKeySecret, OpaqueSecret, SecretDigest};
