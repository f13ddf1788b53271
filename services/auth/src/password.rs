//! argon2id password hashes (PHC strings).

use argon2::password_hash::{
    PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString, rand_core::OsRng,
};
use argon2::{Algorithm, Argon2, Params, Version};

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("stored password hash is malformed")]
    MalformedHash(#[source] argon2::password_hash::Error),
    #[error("hashing failed")]
    Hash(#[source] argon2::password_hash::Error),
    #[error("argon2 parameters are invalid")]
    Params(#[source] argon2::Error),
}

/// Hashes and verifies passwords with argon2id.
#[derive(Clone)]
pub struct PasswordHasher {
    argon: Argon2<'static>,
    /// A hash of a random password, verified against when an account does not exist so that
    /// both paths cost one argon2 evaluation.
    dummy_hash: String,
}

impl PasswordHasher {
    /// OWASP's minimum for argon2id: 19 MiB of memory, 2 iterations, 1 lane.
    pub const MEMORY_KIB: u32 = 19 * 1024;
    pub const ITERATIONS: u32 = 2;
    pub const LANES: u32 = 1;

    pub fn new() -> Result<Self, PasswordError> {
        Self::with_params(Self::MEMORY_KIB, Self::ITERATIONS, Self::LANES)
    }

    /// Stronger settings are allowed; weaker than OWASP's minimum are refused.
    pub fn with_params(
        memory_kib: u32,
        iterations: u32,
        lanes: u32,
    ) -> Result<Self, PasswordError> {
        let memory_kib = memory_kib.max(Self::MEMORY_KIB);
        let iterations = iterations.max(Self::ITERATIONS);
        let params = Params::new(memory_kib, iterations, lanes.max(1), None)
            .map_err(PasswordError::Params)?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let salt = SaltString::generate(&mut OsRng);
        let random = crate::secret::OpaqueSecret::generate("dummy");
        let dummy_hash = argon
            .hash_password(random.expose().as_bytes(), &salt)
            .map_err(PasswordError::Hash)?
            .to_string();
        Ok(Self { argon, dummy_hash })
    }

    /// Hash a new password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
    pub fn hash(&self, password: &str) -> Result<String, PasswordError> {
        let salt = SaltString::generate(&mut OsRng);
        Ok(self
            .argon
            .hash_password(password.as_bytes(), &salt)
            .map_err(PasswordError::Hash)?
            .to_string())
    }

    /// Check `password` against a stored hash; `None` (no such account) still does the work.
    pub fn verify(&self, password: &str, stored: Option<&str>) -> Result<bool, PasswordError> {
        let (phc, exists) = match stored {
            Some(h) => (h, true),
            None => (self.dummy_hash.as_str(), false),
        };
        let parsed = PasswordHash::new(phc).map_err(PasswordError::MalformedHash)?;
        let ok = self
            .argon
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        Ok(ok && exists)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_at_owasp_minimum_and_verify() {
        let h = PasswordHasher::new().unwrap();
        let phc = h.hash("correct horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(h.verify("correct horse battery", Some(&phc)).unwrap());
        assert!(!h.verify("wrong horse battery", Some(&phc)).unwrap());
    }

    #[test]
    fn unknown_accounts_never_verify() {
        let h = PasswordHasher::new().unwrap();
        assert!(!h.verify("anything at all", None).unwrap());
    }

    #[test]
    fn weaker_parameters_are_raised_to_the_minimum() {
        let h = PasswordHasher::with_params(1024, 1, 1).unwrap();
        assert!(
            h.hash("correct horse battery")
                .unwrap()
                .contains("m=19456,t=2,p=1")
        );
    }

    #[test]
    fn salts_differ() {
        let h = PasswordHasher::new().unwrap();
        assert_ne!(
            h.hash("same password!").unwrap(),
            h.hash("same password!").unwrap()
        );
    }
}
