//! A repository in an S3 bucket, through the `object_store` crate.
//!
//! Region, endpoint and credentials come from the usual AWS variables
//! (`AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), as every
//! AWS tool reads them. A create-only write is a `PutObject` with
//! `If-None-Match: *`: S3 answers 412 when the key exists, and exactly one
//! of several racing writers succeeds.

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use std::time::Duration;

use super::{check_key, ObjectInfo, Put, Store, StoreError};

pub struct S3 {
    store: AmazonS3,
    bucket: String,
    prefix: String,
    rt: tokio::runtime::Runtime,
}

/// What may override the environment's S3 settings.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl S3 {
    /// The bucket and key prefix, configured from the environment.
    pub fn from_env(bucket: &str, prefix: &str) -> Result<S3, StoreError> {
        S3::new(bucket, prefix, &S3Config::default())
    }

    /// The environment's settings, with `over` on top.
    pub fn new(bucket: &str, prefix: &str, over: &S3Config) -> Result<S3, StoreError> {
        // A few retries of 5xx, 429 and lost connections, for 20 s at
        // most: archive_command is retried by PostgreSQL itself, and a
        // stuck push holds back every segment after it.
        let retry = RetryConfig {
            max_retries: 4,
            retry_timeout: Duration::from_secs(20),
            ..RetryConfig::default()
        };
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(120));
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry)
            .with_client_options(client);
        // `from_env` reads AWS_ENDPOINT; the SDKs' name is AWS_ENDPOINT_URL.
        let endpoint = over
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT").ok());
        if let Some(url) = endpoint {
            b = b
                .with_allow_http(url.starts_with("http://"))
                .with_endpoint(url);
        }
        let region = over.region.clone().or_else(|| {
            (std::env::var_os("AWS_REGION").is_none()
                && std::env::var_os("AWS_DEFAULT_REGION").is_none())
            .then(|| "us-east-1".to_owned())
        });
        if let Some(r) = region {
            b = b.with_region(r);
        }
        if let Some(k) = &over.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &over.secret_access_key {
            b = b.with_secret_access_key(k);
        }
        let store = b.build().map_err(|e| {
            StoreError::BadLocation(format!("s3://{bucket}: {}", redact(&e.to_string())))
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::BadLocation(format!("cannot start the I/O runtime: {e}")))?;
        Ok(S3 {
            store,
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            rt,
        })
    }

    fn path(&self, key: &str) -> Result<ObjPath, StoreError> {
        check_key(key)?;
        Ok(ObjPath::from(self.full(key)))
    }

    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn err(&self, op: &'static str, key: &str, e: object_store::Error) -> StoreError {
        StoreError::Remote {
            op,
            key: key.to_owned(),
            store: self.location(),
            detail: redact(&e.to_string()),
        }
    }
}

/// An error's text as it may be shown: object_store's messages name the
/// URL and the request, never the secret key, but a pre-signed query or
/// an echoed header could; anything after a credential-looking field
/// is cut.
fn redact(s: &str) -> String {
    const MARKERS: [&str; 4] = [
        "X-Amz-Signature",
        "X-Amz-Credential",
        "Authorization",
        "secret",
    ];
    match MARKERS.iter().filter_map(|m| s.find(m)).min() {
        Some(i) => format!("{}[redacted]", &s[..i]),
        None => s.to_owned(),
    }
}

impl Store for S3 {
    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(key)?;
        self.rt.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => match r.bytes().await {
                    Ok(b) => Ok(Some(b.to_vec())),
                    Err(e) => Err(self.err("read", key, e)),
                },
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err("read", key, e)),
            }
        })
    }

    fn put_if_absent(&self, key: &str, body: &[u8]) -> Result<Put, StoreError> {
        let path = self.path(key)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let payload = PutPayload::from(body.to_vec());
        self.rt.block_on(async {
            match self.store.put_opts(&path, payload, opts).await {
                Ok(_) => Ok(Put::Created),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(Put::Exists),
                Err(e) => Err(self.err("write", key, e)),
            }
        })
    }

    fn put(&self, key: &str, body: &[u8]) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let payload = PutPayload::from(body.to_vec());
        self.rt
            .block_on(self.store.put(&path, payload))
            .map(|_| ())
            .map_err(|e| self.err("write", key, e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        // object_store lists by whole path segments: list the directory
        // part and keep the keys that start with the prefix.
        let dir = prefix.rfind('/').map(|i| &prefix[..i]).unwrap_or("");
        let full_dir = if dir.is_empty() {
            self.prefix.clone()
        } else {
            self.full(dir)
        };
        let list_path = (!full_dir.is_empty()).then(|| ObjPath::from(full_dir.as_str()));
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(list_path.as_ref()).try_collect())
            .map_err(|e| self.err("list", prefix, e))?;
        let mut out: Vec<ObjectInfo> = metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref().strip_prefix(&strip)?.to_owned();
                key.starts_with(prefix).then_some(ObjectInfo {
                    key,
                    size: m.size,
                    modified: Some(m.last_modified.into()),
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        self.rt.block_on(async {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.err("delete", key, e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_error_text_are_cut() {
        let s = "Error performing PUT http://h/b/k?X-Amz-Signature=abc in 1ms";
        assert_eq!(redact(s), "Error performing PUT http://h/b/k?[redacted]");
        assert_eq!(redact("plain"), "plain");
    }
}
