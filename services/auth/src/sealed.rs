//! Encryption of tenant secrets at rest (secret env values of pods), shared by the API (which
//! seals) and the fleet service (which opens them as it streams an assignment to its node).
//!
//! ChaCha20-Poly1305 under the deployment's `KILN_SECRETS_KEY` (32 bytes, base64). Each value
//! gets a fresh random 96-bit nonce; what is stored is `base64(nonce ‖ ciphertext ‖ tag)`. The
//! associated data binds a ciphertext to its org and variable name, so a value copied into
//! another org's or another variable's row does not decrypt.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};

const NONCE_LEN: usize = 12;

/// Why `KILN_SECRETS_KEY` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error(
    "KILN_SECRETS_KEY must be 32 random bytes, base64-encoded (e.g. `openssl rand -base64 32`): {0}"
)]
pub struct SecretsKeyError(&'static str);

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("encryption failed")]
    Encrypt,
    #[error("a stored secret is not one this key sealed")]
    Decrypt,
}

/// The deployment's secrets key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(…)")
    }
}

impl SecretBox {
    /// Parse the base64 key from the configuration.
    pub fn from_base64(raw: &str) -> Result<Self, SecretsKeyError> {
        let bytes = STANDARD
            .decode(raw.trim())
            .map_err(|_| SecretsKeyError("it is not valid base64"))?;
        if bytes.len() != 32 {
            return Err(SecretsKeyError("it does not decode to 32 bytes"));
        }
        let cipher = ChaCha20Poly1305::new_from_slice(&bytes)
            .map_err(|_| SecretsKeyError("it does not decode to 32 bytes"))?;
        Ok(Self { cipher })
    }

    /// Seal `plaintext`, bound to `context` (e.g. `org_…/pod-env/KEY`).
    pub fn seal(&self, context: &str, plaintext: &str) -> Result<String, SecretError> {
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ct = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Encrypt)?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(STANDARD.encode(out))
    }

    /// Open what [`seal`](Self::seal) produced with the same `context`.
    pub fn open(&self, context: &str, sealed: &str) -> Result<String, SecretError> {
        let bytes = STANDARD.decode(sealed).map_err(|_| SecretError::Decrypt)?;
        if bytes.len() < NONCE_LEN {
            return Err(SecretError::Decrypt);
        }
        let (nonce, ct) = bytes.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SecretError::Decrypt)?;
        let pt = self
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Decrypt)?;
        String::from_utf8(pt).map_err(|_| SecretError::Decrypt)
    }
}

/// The associated data of a pod's secret env value.
pub fn pod_env_context(org: kiln_domain::OrgId, key: &str) -> String {
    format!("{org}/pod-env/{key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretBox {
        SecretBox::from_base64(&STANDARD.encode([7u8; 32])).unwrap()
    }

    #[test]
    fn seals_and_opens_with_the_same_context_only() {
        let k = key();
        let sealed = k.seal("org_1/pod-env/TOKEN", "hunter2").unwrap();
        assert!(!sealed.contains("hunter2"));
        assert_eq!(k.open("org_1/pod-env/TOKEN", &sealed).unwrap(), "hunter2");
        assert!(k.open("org_2/pod-env/TOKEN", &sealed).is_err());
        assert!(k.open("org_1/pod-env/OTHER", &sealed).is_err());
        let again = k.seal("org_1/pod-env/TOKEN", "hunter2").unwrap();
        assert_ne!(sealed, again, "a fresh nonce every time");
        let other = SecretBox::from_base64(&STANDARD.encode([8u8; 32])).unwrap();
        assert!(other.open("org_1/pod-env/TOKEN", &sealed).is_err());
    }

    #[test]
    fn refuses_keys_that_are_not_32_bytes_of_base64() {
        assert!(SecretBox::from_base64("not base64!").is_err());
        assert!(SecretBox::from_base64(&STANDARD.encode([1u8; 16])).is_err());
    }
}
