//! Opaque secrets: 256 random bits, base62 text with a type prefix, kept only as a digest.

use rand::RngCore;
use sha2::{Digest, Sha256};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn base62(bytes: &[u8]) -> String {
    // Big-number base conversion; 32 bytes give 43 digits.
    let mut digits: Vec<u8> = Vec::with_capacity(44);
    let mut num: Vec<u8> = bytes.to_vec();
    while num.iter().any(|&b| b != 0) {
        let mut rem: u32 = 0;
        for b in num.iter_mut() {
            let acc = (rem << 8) | u32::from(*b);
            *b = (acc / 62) as u8;
            rem = acc % 62;
        }
        digits.push(ALPHABET[rem as usize]);
    }
    while digits.len() < 43 {
        digits.push(ALPHABET[0]);
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

/// SHA-256 of a secret: what the database stores and looks up by. A fast digest is right here
/// because the secrets carry 256 bits of entropy; passwords use argon2 instead.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SecretDigest(pub [u8; 32]);

impl SecretDigest {
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A random secret such as a refresh token: `<prefix>_<43 base62 chars>`.
#[derive(Clone)]
pub struct OpaqueSecret(String);

impl OpaqueSecret {
    pub fn generate(prefix: &str) -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(format!("{prefix}_{}", base62(&bytes)))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn digest(&self) -> SecretDigest {
        SecretDigest::of(&self.0)
    }
}

impl std::fmt::Debug for OpaqueSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpaqueSecret(…)")
    }
}

/// An API key: `kiln_<43 base62 chars>`. Its first 12 characters are the visible prefix.
#[derive(Clone)]
pub struct ApiKeySecret(OpaqueSecret);

impl ApiKeySecret {
    pub const PREFIX: &'static str = "kiln";
    pub const VISIBLE_CHARS: usize = 12;

    pub fn generate() -> Self {
        Self(OpaqueSecret::generate(Self::PREFIX))
    }
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
    pub fn digest(&self) -> SecretDigest {
        self.0.digest()
    }
    /// The part of the key that may be shown again later (`kiln_AbC1234`).
    pub fn visible_prefix(&self) -> String {
        self.expose().chars().take(Self::VISIBLE_CHARS).collect()
    }
    /// Whether a bearer token is shaped like an API key (as opposed to a JWT).
    pub fn looks_like(token: &str) -> bool {
        token.starts_with("kiln_")
            && token.len() == 5 + 43
            && token[5..].bytes().all(|b| b.is_ascii_alphanumeric())
    }
}

impl std::fmt::Debug for ApiKeySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeySecret({}…)", self.visible_prefix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_carry_256_bits_and_a_visible_prefix() {
        let k = ApiKeySecret::generate();
        assert!(ApiKeySecret::looks_like(k.expose()), "{}", k.expose());
        assert_eq!(k.visible_prefix().len(), 12);
        assert!(k.expose().starts_with(&k.visible_prefix()));
        // 62^43 > 2^256.
        assert!(43.0 * 62f64.log2() >= 256.0);
        assert_ne!(ApiKeySecret::generate().expose(), k.expose());
        assert!(!format!("{k:?}").contains(&k.expose()[12..]));
    }

    #[test]
    fn base62_is_fixed_width() {
        assert_eq!(base62(&[0u8; 32]).len(), 43);
        assert_eq!(base62(&[255u8; 32]).len(), 43);
    }

    #[test]
    fn digests_are_stable_and_distinct() {
        assert_eq!(SecretDigest::of("a"), SecretDigest::of("a"));
        assert_ne!(SecretDigest::of("a"), SecretDigest::of("b"));
    }
}
