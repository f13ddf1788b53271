//! The node credential on disk: `<state_dir>/credential.json`, mode 0600.
//!
//! Written once, after a successful `Join`; read at every later start. The bootstrap token is
//! one-time, so an agent that has this file never joins again.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The credential file's name inside the state directory.
pub const CREDENTIAL_FILE: &str = "credential.json";

/// What `Join` returned, kept for every later start.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub node_id: String,
    pub node_credential: String,
    /// The control plane that issued it (a credential is only good there).
    pub control_plane: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("node_id", &self.node_id)
            .field("node_credential", &"<redacted>")
            .field("control_plane", &self.control_plane)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "credential file {} has mode {mode:04o}, readable by others than its owner; \
         fix it with `chmod 600 {}` (and consider the credential leaked: revoke it and join \
         again with a new bootstrap token)",
        path.display(), path.display()
    )]
    LoosePermissions { path: PathBuf, mode: u32 },
    #[error("could not read credential file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "credential file {} is not valid ({message}); remove it and join again with a new \
         bootstrap token",
        path.display()
    )]
    Parse { path: PathBuf, message: String },
    #[error("could not write credential file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether a file mode gives anything to group or others.
pub fn is_owner_only(mode: u32) -> bool {
    mode & 0o077 == 0
}

impl Credential {
    /// Reads the credential file; `Ok(None)` when there is none. Refuses a file that group or
    /// others could read or write.
    pub fn load(path: &Path) -> Result<Option<Self>, CredentialError> {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CredentialError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let mode = meta.permissions().mode() & 0o7777;
        if !is_owner_only(mode) {
            return Err(CredentialError::LoosePermissions {
                path: path.to_owned(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| CredentialError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cred: Credential = serde_json::from_str(&text).map_err(|e| CredentialError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if cred.node_credential.is_empty() || cred.node_id.is_empty() {
            return Err(CredentialError::Parse {
                path: path.to_owned(),
                message: "node_id or node_credential is empty".into(),
            });
        }
        Ok(Some(cred))
    }

    /// Writes the credential file atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), CredentialError> {
        let bytes = serde_json::to_vec_pretty(self).expect("a credential serialises");
        crate::fsutil::write_atomic(path, &bytes, 0o600).map_err(|source| CredentialError::Write {
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred() -> Credential {
        Credential {
            node_id: "node_0123".into(),
            node_credential: "kiln_ncr_secret".into(),
            control_plane: "http://127.0.0.1:7070".into(),
        }
    }

    #[test]
    fn saved_with_mode_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CREDENTIAL_FILE);
        assert!(Credential::load(&path).unwrap().is_none());
        cred().save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(Credential::load(&path).unwrap(), Some(cred()));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn looser_permissions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CREDENTIAL_FILE);
        cred().save(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o666] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = Credential::load(&path).unwrap_err();
            assert!(
                matches!(err, CredentialError::LoosePermissions { mode: m, .. } if m == mode),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains("chmod 600"));
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Credential::load(&path).unwrap().is_some());
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        assert!(!format!("{:?}", cred()).contains("secret"));
    }

    #[test]
    fn mode_check() {
        assert!(is_owner_only(0o600));
        assert!(is_owner_only(0o400));
        assert!(!is_owner_only(0o640));
        assert!(!is_owner_only(0o602));
    }
}
