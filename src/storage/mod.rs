//! Where a repository keeps its objects: a local directory or an object
//! store (S3, Azure Blob Storage and GCS, by the same `object_store`
//! code). Keys are `/`-separated relative paths, the same on every backend.
//!
//! The one write the WAL rules rest on is `put_if_absent`: it publishes a
//! complete object under a key only if nothing is there, and says so when
//! something is. Locally that is a fsynced temporary file hard-linked into
//! place; on an object store its create-only write (cloud.rs). Nothing is ever
//! half-visible: a reader finds the whole object or none.

mod cloud;
mod local;
mod s3;

use std::fmt;
use std::io;

pub use cloud::Cloud;
pub use local::Local;
pub use s3::S3Config;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {op} {key} in {store}")]
    Io {
        op: &'static str,
        key: String,
        store: String,
        #[source]
        source: io::Error,
    },
    /// An object store's error, shown in full: its Display names the
    /// request that failed. Never holds a credential.
    #[error("cannot {op} {key} in {store}: {detail}")]
    Remote {
        op: &'static str,
        key: String,
        store: String,
        detail: String,
    },
    #[error("{0}")]
    BadLocation(String),
}

/// What `put_if_absent` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The object is now stored under the key.
    Created,
    /// Another object was already there; nothing was written.
    Exists,
}

/// An object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub modified: Option<std::time::SystemTime>,
}

/// What a bucket does to keep objects from being deleted or rewritten.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Protection {
    /// `Enabled`, `Suspended`, or none when never turned on.
    pub versioning: Option<String>,
    /// Object Lock is enabled on the bucket.
    pub object_lock: bool,
    /// The bucket's default retention: every new object version is locked
    /// for this long after it is written.
    pub default_retention: Option<Retention>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Retention {
    /// `GOVERNANCE` or `COMPLIANCE`.
    pub mode: String,
    pub days: u64,
}

impl Protection {
    /// Until when an object written at `modified` stays locked by the
    /// default retention, if it still is at `now`.
    pub fn locked_until(
        &self,
        modified: Option<std::time::SystemTime>,
        now: std::time::SystemTime,
    ) -> Option<std::time::SystemTime> {
        let r = self.default_retention.as_ref()?;
        // An object whose time is unknown is taken as written just now.
        let until = modified.unwrap_or(now) + std::time::Duration::from_secs(r.days * 86_400);
        (until > now).then_some(until)
    }
}

pub trait Store: Send + Sync {
    /// Where it is, as it may be shown: no credential.
    fn location(&self) -> String;
    /// The whole object, or none.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores `body` under `key` unless an object is there.
    fn put_if_absent(&self, key: &str, body: &[u8]) -> Result<Put, StoreError>;
    /// Stores `body` under `key`, replacing what is there.
    fn put(&self, key: &str, body: &[u8]) -> Result<(), StoreError>;
    /// Every object whose key starts with `prefix`, sorted by key. A local
    /// store also lists the temporary files of a writer that died
    /// (`fsutil::TEMP_PREFIX`): a caller reports them, none reads them.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;
    /// Removes the object; a missing one is not an error.
    fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Versioning and Object Lock, where the store has them.
    fn protection(&self) -> Result<Option<Protection>, StoreError> {
        Ok(None)
    }

    /// `put_if_absent`, where an object already there with exactly
    /// `body` counts as created: the create of a retried request whose
    /// first answer was lost (a 5xx after the write, a dropped
    /// connection) finds its own object, and that is success. Only for
    /// objects whose bytes are fixed by their content (pieces, labels):
    /// a different object is still `Exists`.
    fn put_new_or_same(&self, key: &str, body: &[u8]) -> Result<Put, StoreError> {
        match self.put_if_absent(key, body)? {
            Put::Created => Ok(Put::Created),
            Put::Exists => match self.get(key)? {
                Some(stored) if stored == body => {
                    tracing::info!(
                        key,
                        "the object is already stored with these bytes: a retried create"
                    );
                    Ok(Put::Created)
                }
                _ => Ok(Put::Exists),
            },
        }
    }
}

/// Whether `store` refuses to overwrite on a create: writes a probe
/// object twice with `put_if_absent` and reads it back. A store that
/// ignores `If-None-Match: *` (some S3-compatible servers and gateways)
/// answers the second write with success and keeps its bytes; the
/// never-overwrite rule of WAL and backups then does not hold. The probe
/// is deleted after (under Object Lock its versions stay until the lock
/// ends).
pub fn probe_create_only(store: &dyn Store, key: &str) -> Result<bool, StoreError> {
    let first = store.put_if_absent(key, b"reentry create-only probe: first\n")?;
    let second = store.put_if_absent(key, b"reentry create-only probe: second\n")?;
    let kept = store.get(key)?;
    let _ = store.delete(key);
    Ok(first == Put::Created
        && second == Put::Exists
        && kept.as_deref() == Some(&b"reentry create-only probe: first\n"[..]))
}

/// An object store service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    S3,
    Azure,
    Gcs,
}

impl Scheme {
    const ALL: [Scheme; 3] = [Scheme::S3, Scheme::Azure, Scheme::Gcs];

    fn credentials(self) -> &'static str {
        match self {
            Scheme::S3 => "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or the AWS config",
            Scheme::Azure => "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or a SAS",
            Scheme::Gcs => "GOOGLE_SERVICE_ACCOUNT or GOOGLE_APPLICATION_CREDENTIALS",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::S3 => "s3",
            Scheme::Azure => "az",
            Scheme::Gcs => "gs",
        })
    }
}

/// A repository location: `s3://bucket/prefix`, `az://container/prefix`,
/// `gs://bucket/prefix` or a local path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(std::path::PathBuf),
    Object {
        scheme: Scheme,
        bucket: String,
        prefix: String,
    },
}

impl Location {
    pub fn parse(s: &str) -> Result<Location, StoreError> {
        for scheme in Scheme::ALL {
            let Some(rest) = s.strip_prefix(&format!("{scheme}://")) else {
                continue;
            };
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::BadLocation(format!(
                    "{s}: no bucket; write {scheme}://BUCKET/PREFIX"
                )));
            }
            if bucket.contains('@') || bucket.contains(':') {
                return Err(StoreError::BadLocation(format!(
                    "a {scheme}:// location takes no credentials; use {}",
                    scheme.credentials()
                )));
            }
            return Ok(Location::Object {
                scheme,
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(StoreError::BadLocation(format!(
                "{scheme}:// repositories are not supported; use s3://, az:// or gs://BUCKET/PREFIX, or a path"
            )));
        }
        Ok(Location::Local(s.into()))
    }

    /// Opens the store it names.
    pub fn open(&self) -> Result<Box<dyn Store>, StoreError> {
        Ok(match self {
            Location::Local(p) => Box::new(Local::new(p.clone())),
            Location::Object {
                scheme,
                bucket,
                prefix,
            } => Box::new(match scheme {
                Scheme::S3 => Cloud::s3(bucket, prefix, &S3Config::default())?,
                Scheme::Azure => Cloud::azure(bucket, prefix)?,
                Scheme::Gcs => Cloud::gcs(bucket, prefix)?,
            }),
        })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Object {
                scheme,
                bucket,
                prefix,
            } if prefix.is_empty() => write!(f, "{scheme}://{bucket}"),
            Location::Object {
                scheme,
                bucket,
                prefix,
            } => write!(f, "{scheme}://{bucket}/{prefix}"),
        }
    }
}

/// A key is relative, `/`-separated, without empty, `.` or `..` parts: on
/// a local store it cannot leave the repository.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty()
        || key.starts_with('/')
        || key
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(StoreError::BadLocation(format!(
            "{key:?} is not a valid object key"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_show_without_secrets() {
        assert_eq!(
            Location::parse("s3://wal-bucket/prod/db1/").unwrap(),
            Location::Object {
                scheme: Scheme::S3,
                bucket: "wal-bucket".into(),
                prefix: "prod/db1".into()
            }
        );
        for (url, scheme) in [("az://c/p", Scheme::Azure), ("gs://b/p", Scheme::Gcs)] {
            let l = Location::parse(url).unwrap();
            assert!(matches!(&l, Location::Object { scheme: s, .. } if *s == scheme));
            assert_eq!(l.to_string(), url);
        }
        let e = Location::parse("az://account:key@c/x").unwrap_err();
        assert!(!e.to_string().contains("key@"), "{e}");
        assert_eq!(
            Location::parse("s3://b").unwrap().to_string(),
            "s3://b".to_string()
        );
        assert_eq!(
            Location::parse("/var/lib/repo").unwrap(),
            Location::Local("/var/lib/repo".into())
        );
        let e = Location::parse("s3://AKIA:secret@bucket/x").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(Location::parse("s3:///x").is_err());
        assert!(Location::parse("hdfs://b/x")
            .unwrap_err()
            .to_string()
            .contains("hdfs://"));
    }

    #[test]
    fn keys_cannot_leave_the_repository() {
        for bad in ["", "/etc/passwd", "a/../../b", "a//b", "./a", "a/"] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        check_key("archive/000000010000000000000001").unwrap();
    }
}
