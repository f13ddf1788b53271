//! The saved session and preferences: `$XDG_CONFIG_HOME/kiln/config.toml`, mode 0600.
//!
//! Every change is a read-modify-write under an exclusive lock on a sibling lock file, so two
//! `kiln` processes never lose each other's writes, and a token refresh done by one is seen by
//! the other (refresh tokens are single use: spending one twice revokes the session).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot find a configuration directory: set XDG_CONFIG_HOME or HOME")]
    NoConfigDir,
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("cannot write the configuration: {0}")]
    Serialize(#[from] toml::ser::Error),
}

/// What `kiln login` saves. Every field is optional so a partial or hand-edited file still loads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// The API the session below belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// When the access token expires (RFC 3339).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub access_expires_at: Option<OffsetDateTime>,
    /// The org commands act on when `--org` / `KILN_ORG` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
}

impl Config {
    pub fn has_session(&self) -> bool {
        self.access_token.is_some() || self.refresh_token.is_some()
    }

    pub fn clear_session(&mut self) {
        self.access_token = None;
        self.refresh_token = None;
        self.access_expires_at = None;
    }
}

/// The config file's location and access to it.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// `$XDG_CONFIG_HOME/kiln/config.toml` when XDG_CONFIG_HOME is set (on every platform), else
    /// the platform's config directory.
    pub fn locate() -> Result<Self, ConfigError> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(dirs::config_dir)
            .ok_or(ConfigError::NoConfigDir)?;
        Ok(Self {
            path: base.join("kiln").join("config.toml"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved config, or the default when there is none yet.
    pub fn load(&self) -> Result<Config, ConfigError> {
        match fs::read_to_string(&self.path) {
            Ok(text) => toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: self.path.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Io {
                action: "read",
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Take the lock, re-read the file, let `change` edit it, write it back if it changed.
    /// Returns what `change` returned and the config as saved.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut Config) -> T,
    ) -> Result<(T, Config), ConfigError> {
        let locked = self.lock()?;
        let mut config = locked.load()?;
        let out = change(&mut config);
        locked.save(&config)?;
        Ok((out, config))
    }

    /// An exclusive lock on the config, held until the returned guard is dropped.
    pub fn lock(&self) -> Result<Locked<'_>, ConfigError> {
        let dir = self.dir();
        create_private_dir(dir).map_err(|source| ConfigError::Io {
            action: "create",
            path: dir.to_owned(),
            source,
        })?;
        let lock_path = self.path.with_extension("toml.lock");
        let io = |source| ConfigError::Io {
            action: "lock",
            path: lock_path.clone(),
            source,
        };
        let file = private_options()
            .write(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io)?;
        file.lock().map_err(io)?;
        Ok(Locked {
            store: self,
            _file: file,
        })
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Write atomically: a private temp file in the same directory, then rename over.
    fn write(&self, config: &Config) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(config)?;
        let tmp = self
            .path
            .with_extension(format!("toml.tmp{}", std::process::id()));
        let io = |action, source| ConfigError::Io {
            action,
            path: self.path.clone(),
            source,
        };
        let result = (|| {
            let _ = fs::remove_file(&tmp);
            let mut file = private_options().write(true).create_new(true).open(&tmp)?;
            file.write_all(b"# Written by `kiln`. Holds your session tokens: keep it private.\n")?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e| io("write", e))
    }
}

fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// The config, locked against other `kiln` processes.
pub struct Locked<'a> {
    store: &'a Store,
    _file: File,
}

impl Locked<'_> {
    pub fn load(&self) -> Result<Config, ConfigError> {
        self.store.load()
    }

    /// Save `config` unless the file already holds exactly that.
    pub fn save(&self, config: &Config) -> Result<(), ConfigError> {
        if &self.store.load()? == config {
            return Ok(());
        }
        self.store.write(config)
    }
}
