//! Access tokens: HS256 JWTs signed by the newest key of a ring, verified by any live key.
//!
//! Keys are identified by `kid`. The data store persists the ring so every API replica signs
//! and verifies with the same keys; rotation adds a key and later retires the old one once no
//! token it signed can still be unexpired.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use kiln_domain::{SessionId, UserId};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("the key ring has no signing key")]
    NoSigningKey,
    #[error("token names no key id")]
    MissingKid,
    #[error("token was signed by unknown key `{kid}`")]
    UnknownKid { kid: String },
    #[error("token is invalid")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    #[error("token subject is malformed")]
    BadSubject,
    #[error("signing failed")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// One HMAC key of the ring.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub secret: Vec<u8>,
    /// When the key was created, in Unix microseconds; the newest signs. (Seconds are too coarse:
    /// two keys made in one second would tie and the signer would be a coin toss.)
    pub created_at: i64,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .finish()
    }
}

impl SigningKey {
    /// A fresh 256-bit key with a random kid.
    pub fn generate(created_at_micros: i64) -> Self {
        use rand::RngCore;
        let mut secret = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let kid = format!("k{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Self {
            kid,
            secret,
            created_at: created_at_micros,
        }
    }
}

/// The claims of a Kiln access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    /// The user, `usr_…`.
    pub sub: String,
    /// The session (refresh-token family), `ses_…`.
    pub sid: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
}

impl AccessClaims {
    pub fn user_id(&self) -> Result<UserId, JwtError> {
        self.sub.parse().map_err(|_| JwtError::BadSubject)
    }
    pub fn session_id(&self) -> Result<SessionId, JwtError> {
        self.sid.parse().map_err(|_| JwtError::BadSubject)
    }
}

/// The set of live keys plus the token parameters.
#[derive(Clone)]
pub struct KeyRing {
    issuer: String,
    audience: String,
    ttl_secs: i64,
    signer: Option<(String, EncodingKey)>,
    verifiers: HashMap<String, DecodingKey>,
}

impl KeyRing {
    pub const ALGORITHM: Algorithm = Algorithm::HS256;

    pub fn new(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        ttl_secs: i64,
        keys: &[SigningKey],
    ) -> Self {
        let signer = keys
            .iter()
            .max_by_key(|k| (k.created_at, k.kid.clone()))
            .map(|k| (k.kid.clone(), EncodingKey::from_secret(&k.secret)));
        let verifiers = keys
            .iter()
            .map(|k| (k.kid.clone(), DecodingKey::from_secret(&k.secret)))
            .collect();
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            ttl_secs,
            signer,
            verifiers,
        }
    }

    pub fn ttl_secs(&self) -> i64 {
        self.ttl_secs
    }

    pub fn signing_kid(&self) -> Option<&str> {
        self.signer.as_ref().map(|(k, _)| k.as_str())
    }

    pub fn knows(&self, kid: &str) -> bool {
        self.verifiers.contains_key(kid)
    }

    /// Issue an access token for `user` in `session`, valid from `now` for the ring's TTL.
    pub fn issue(
        &self,
        user: UserId,
        session: SessionId,
        now_unix: i64,
    ) -> Result<String, JwtError> {
        let (kid, key) = self.signer.as_ref().ok_or(JwtError::NoSigningKey)?;
        let mut header = Header::new(Self::ALGORITHM);
        header.kid = Some(kid.clone());
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user.to_string(),
            sid: session.to_string(),
            iat: now_unix,
            nbf: now_unix,
            exp: now_unix + self.ttl_secs,
        };
        jsonwebtoken::encode(&header, &claims, key).map_err(JwtError::Sign)
    }

    /// The `kid` a token names, without verifying anything (to decide whether to reload keys).
    pub fn kid_of(token: &str) -> Result<String, JwtError> {
        jsonwebtoken::decode_header(token)
            .map_err(JwtError::Invalid)?
            .kid
            .ok_or(JwtError::MissingKid)
    }

    /// Verify signature (HS256 only), issuer, audience, expiry and not-before.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, JwtError> {
        let kid = Self::kid_of(token)?;
        let key = self
            .verifiers
            .get(&kid)
            .ok_or(JwtError::UnknownKid { kid })?;
        let mut validation = Validation::new(Self::ALGORITHM);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<AccessClaims>(token, key, &validation)
            .map(|d| d.claims)
            .map_err(JwtError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn ring(keys: &[SigningKey]) -> KeyRing {
        KeyRing::new("kiln", "kiln-api", 900, keys)
    }

    #[test]
    fn round_trip() {
        let k = SigningKey::generate(now());
        let r = ring(&[k]);
        let (u, s) = (UserId::new(), SessionId::new());
        let t = r.issue(u, s, now()).unwrap();
        let c = r.verify(&t).unwrap();
        assert_eq!(c.user_id().unwrap(), u);
        assert_eq!(c.session_id().unwrap(), s);
        assert_eq!(c.exp - c.iat, 900);
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_and_signs_with_the_newest() {
        let old = SigningKey::generate(now() - 100);
        let t_old = ring(std::slice::from_ref(&old))
            .issue(UserId::new(), SessionId::new(), now())
            .unwrap();
        let new = SigningKey::generate(now());
        let rotated = ring(&[old.clone(), new.clone()]);
        assert_eq!(rotated.signing_kid(), Some(new.kid.as_str()));
        assert!(rotated.verify(&t_old).is_ok());
        // Once the old key retires its tokens die.
        let retired = ring(&[new]);
        assert!(matches!(
            retired.verify(&t_old),
            Err(JwtError::UnknownKid { .. })
        ));
    }

    #[test]
    fn expired_wrong_audience_wrong_issuer_and_forged_tokens_are_refused() {
        let k = SigningKey::generate(now());
        let r = ring(std::slice::from_ref(&k));
        let expired = r
            .issue(UserId::new(), SessionId::new(), now() - 10_000)
            .unwrap();
        assert!(r.verify(&expired).is_err());
        let other_aud = KeyRing::new("kiln", "somebody-else", 900, std::slice::from_ref(&k));
        assert!(
            r.verify(
                &other_aud
                    .issue(UserId::new(), SessionId::new(), now())
                    .unwrap()
            )
            .is_err()
        );
        let other_iss = KeyRing::new("evil", "kiln-api", 900, std::slice::from_ref(&k));
        assert!(
            r.verify(
                &other_iss
                    .issue(UserId::new(), SessionId::new(), now())
                    .unwrap()
            )
            .is_err()
        );
        let future = r
            .issue(UserId::new(), SessionId::new(), now() + 3600)
            .unwrap();
        assert!(
            r.verify(&future).is_err(),
            "nbf in the future must be refused"
        );
        // Same kid, different secret: a forgery.
        let forged_key = SigningKey {
            kid: k.kid.clone(),
            secret: vec![7; 32],
            created_at: now(),
        };
        let forged = ring(&[forged_key])
            .issue(UserId::new(), SessionId::new(), now())
            .unwrap();
        assert!(r.verify(&forged).is_err());
    }

    #[test]
    fn the_algorithm_is_pinned() {
        let k = SigningKey::generate(now());
        let r = ring(std::slice::from_ref(&k));
        let t = r.issue(UserId::new(), SessionId::new(), now()).unwrap();
        // Re-head the token as alg=none and as HS512: both refused.
        let parts: Vec<&str> = t.split('.').collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        for alg in ["none", "HS512"] {
            let header = b64.encode(format!(
                r#"{{"alg":"{alg}","typ":"JWT","kid":"{}"}}"#,
                k.kid
            ));
            let t2 = format!("{header}.{}.{}", parts[1], parts[2]);
            assert!(r.verify(&t2).is_err(), "{alg}");
        }
    }
}
