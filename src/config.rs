//! `reentry.toml`: defaults for how this host runs the tool. What a re-entry
//! run does lives in a playbook; how one invocation runs is a flag.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backup::stored::{Algorithm, Compression};

pub const DEFAULT_FILE: &str = "reentry.toml";

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// The repository; relative paths are relative to the config file.
    pub repo: Option<PathBuf>,
    /// The checksum new WAL files and backup objects record: blake3, or
    /// sha256 where a FIPS-approved hash is required.
    #[serde(default)]
    pub checksum: Algorithm,
    #[serde(default)]
    pub wal: WalConfig,
    #[serde(default)]
    pub encryption: EncryptionConfig,
    #[serde(default)]
    pub signing: SigningConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub kafka: KafkaConfig,
}

/// How the `kafka` commands reach the cluster when no flag or variable
/// says (a playbook has its own `[kafka]`). Passwords are not kept here:
/// they come from the environment only.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KafkaConfig {
    pub bootstrap: Option<String>,
    pub security_protocol: Option<String>,
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub ssl_ca: Option<String>,
    pub ssl_certificate: Option<String>,
    pub ssl_key: Option<String>,
    /// Any other librdkafka property.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
}

/// Grandfather-father-son retention for `backup expire`; its flags win.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionConfig {
    pub keep_daily: Option<usize>,
    pub keep_weekly: Option<usize>,
    pub keep_monthly: Option<usize>,
    pub keep_yearly: Option<usize>,
    pub pitr_days: Option<f64>,
}

/// Client-side encryption with age (crypt.rs).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EncryptionConfig {
    /// Public keys (age1…) new objects are encrypted to.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// An age identity file to decrypt with; relative to the config file.
    pub identity_file: Option<PathBuf>,
}

/// Signed backup labels (sign.rs).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SigningConfig {
    /// The private key labels are signed with (PKCS#8 PEM), only on the
    /// host that backs up; relative to the config file.
    pub key_file: Option<PathBuf>,
    /// Public keys (ed25519:…) a label's signature must verify with.
    #[serde(default)]
    pub verify_keys: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WalConfig {
    #[serde(default)]
    pub compress: Compression,
    #[serde(default = "default_level")]
    pub compress_level: i32,
}

impl Default for WalConfig {
    fn default() -> WalConfig {
        WalConfig {
            compress: Compression::None,
            compress_level: default_level(),
        }
    }
}

fn default_level() -> i32 {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error(
        "no repository given: pass --repo DIR, set REENTRY_REPO, or set `repo` in {DEFAULT_FILE}"
    )]
    NoRepo,
    #[error("--repo: {0}")]
    BadRepo(String),
    #[error("{0}")]
    Keys(String),
}

impl Config {
    /// Loads `path`. A missing default file is an empty config; a missing
    /// file named on the command line is an error.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_FILE), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default())
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.clone(),
            message,
        })?;
        if let Some(dir) = path.parent() {
            // An s3:// location is not a path.
            if let Some(repo) = config
                .repo
                .as_ref()
                .filter(|r| !r.to_string_lossy().contains("://"))
            {
                config.repo = Some(dir.join(repo));
            }
            if let Some(f) = &config.encryption.identity_file {
                config.encryption.identity_file = Some(dir.join(f));
            }
            if let Some(f) = &config.signing.key_file {
                config.signing.key_file = Some(dir.join(f));
            }
        }
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        if !(1..=22).contains(&config.wal.compress_level) {
            return Err(format!(
                "wal.compress-level = {} is out of range: zstd levels are 1 to 22",
                config.wal.compress_level
            ));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_repo_and_wal_settings() {
        let c =
            Config::parse("repo = \"/srv/r\"\n[wal]\ncompress = \"zstd\"\ncompress-level = 3\n")
                .unwrap();
        assert_eq!(c.repo.as_deref(), Some(Path::new("/srv/r")));
        assert_eq!(
            (c.wal.compress, c.wal.compress_level),
            (Compression::Zstd, 3)
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_located() {
        let e = Config::parse("repo = \"/srv/r\"\n[wal]\ncompresion = \"zstd\"\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("compresion"), "{e}");
        let e = Config::parse("[wal]\ncompress = \"lz4\"\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("lz4"), "{e}");
        let e = Config::parse("[wal]\ncompress-level = 40\n").unwrap_err();
        assert!(e.contains("compress-level"), "{e}");
    }

    #[test]
    fn the_example_config_parses() {
        let c = Config::parse(include_str!("../reentry.example.toml")).unwrap();
        assert_eq!(c.wal.compress, Compression::Zstd);
    }

    #[test]
    fn a_relative_repo_is_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("reentry.toml");
        std::fs::write(&file, "repo = \"repo\"\n").unwrap();
        let c = Config::load(Some(&file)).unwrap();
        assert_eq!(c.repo.unwrap(), dir.path().join("repo"));
        std::fs::write(&file, "[signing]\nkey-file = \"signing.pem\"\n").unwrap();
        let c = Config::load(Some(&file)).unwrap();
        assert_eq!(c.signing.key_file.unwrap(), dir.path().join("signing.pem"));
        assert!(matches!(
            Config::load(Some(&dir.path().join("nope.toml"))),
            Err(ConfigError::Read { .. })
        ));
    }
}
