//! A repository in an object store, through the `object_store` crate: S3
//! (s3.rs), Azure Blob Storage and Google Cloud Storage, by the same code.
//!
//! `put_if_absent` is each service's own create-only write: `PutObject`
//! with `If-None-Match: *` on S3, `Put Blob` with `If-None-Match: *` on
//! Azure, an upload with `x-goog-if-generation-match: 0` on GCS. Each
//! answers 412 (or 409) when the key exists, and exactly one of several
//! racing writers succeeds. Credentials come from each service's usual
//! variables; none is ever part of a location or an error shown.

use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};

use super::s3::BucketApi;
use super::{check_key, ObjectInfo, Protection, Put, Scheme, Store, StoreError};

pub struct Cloud {
    store: Arc<dyn ObjectStore>,
    scheme: Scheme,
    bucket: String,
    prefix: String,
    rt: tokio::runtime::Runtime,
    /// S3's bucket settings (versioning, Object Lock), read with requests
    /// object_store does not make.
    s3: Option<BucketApi>,
}

/// A few retries of 5xx, 429 and lost connections, for 20 s at most:
/// archive_command is retried by PostgreSQL itself, and a stuck push holds
/// back every segment after it.
pub(super) fn retry() -> RetryConfig {
    RetryConfig {
        max_retries: 4,
        retry_timeout: Duration::from_secs(20),
        ..RetryConfig::default()
    }
}

pub(super) fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120))
}

impl Cloud {
    pub(super) fn new(
        store: Arc<dyn ObjectStore>,
        scheme: Scheme,
        bucket: &str,
        prefix: &str,
        s3: Option<BucketApi>,
    ) -> Result<Cloud, StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::BadLocation(format!("cannot start the I/O runtime: {e}")))?;
        Ok(Cloud {
            store,
            scheme,
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            rt,
            s3,
        })
    }

    /// An Azure Blob Storage container, configured from the `AZURE_*`
    /// variables (`AZURE_STORAGE_ACCOUNT_NAME` and `AZURE_STORAGE_ACCOUNT_KEY`,
    /// a SAS, a managed identity; `AZURE_STORAGE_USE_EMULATOR` with
    /// `AZURITE_BLOB_STORAGE_URL` for Azurite).
    pub fn azure(container: &str, prefix: &str) -> Result<Cloud, StoreError> {
        let store = object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_container_name(container)
            .with_retry(retry())
            .with_client_options(client_options())
            .build()
            .map_err(|e| {
                StoreError::BadLocation(format!("az://{container}: {}", redact(&e.to_string())))
            })?;
        Cloud::new(Arc::new(store), Scheme::Azure, container, prefix, None)
    }

    /// A Google Cloud Storage bucket, configured from the `GOOGLE_*`
    /// variables (`GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_APPLICATION_CREDENTIALS`).
    pub fn gcs(bucket: &str, prefix: &str) -> Result<Cloud, StoreError> {
        let store = object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry())
            .with_client_options(client_options())
            .build()
            .map_err(|e| {
                StoreError::BadLocation(format!("gs://{bucket}: {}", redact(&e.to_string())))
            })?;
        Cloud::new(Arc::new(store), Scheme::Gcs, bucket, prefix, None)
    }

    pub(super) fn rt(&self) -> &tokio::runtime::Runtime {
        &self.rt
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
/// URL and the request, never the secret key, but a pre-signed query, a
/// SAS or an echoed header could; anything after a credential-looking
/// field is cut. Markers match in any case (HTTP header and query names
/// are written every way).
pub(super) fn redact(s: &str) -> String {
    const MARKERS: [&str; 8] = [
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "authorization",
        "secret",
        "sig=",
        "sharedkey",
        "bearer",
    ];
    // ASCII lowercasing keeps every byte offset.
    let lower = s.to_ascii_lowercase();
    match MARKERS.iter().filter_map(|m| lower.find(m)).min() {
        Some(i) => format!("{}[redacted]", &s[..i]),
        None => s.to_owned(),
    }
}

impl Store for Cloud {
    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("{}://{}", self.scheme, self.bucket)
        } else {
            format!("{}://{}/{}", self.scheme, self.bucket, self.prefix)
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(key)?;
        self.rt.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => match r.bytes().await {
                    // Moved, not copied, when the body is one buffer of
                    // its own (as a collected response is): `to_vec` copied
                    // every object a second time.
                    Ok(b) => Ok(Some(Vec::from(b))),
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

    fn protection(&self) -> Result<Option<Protection>, StoreError> {
        match &self.s3 {
            Some(api) => api.protection(self).map(Some),
            None => Ok(None),
        }
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
    fn redaction_finds_credentials_in_any_case_and_session_tokens() {
        for text in [
            "GET /b/k?x-amz-signature=abc123",
            "GET /b/k?X-Amz-Security-Token=abc123",
            "header AUTHORIZATION: abc123",
            "header authorization: bearer abc123",
        ] {
            let r = redact(text);
            assert!(!r.contains("abc123") && r.ends_with("[redacted]"), "{r}");
        }
        assert_eq!(redact("GET /b/k: 404"), "GET /b/k: 404");
    }

    #[test]
    fn credentials_in_error_text_are_cut() {
        let s = "Error performing PUT http://h/b/k?X-Amz-Signature=abc in 1ms";
        assert_eq!(redact(s), "Error performing PUT http://h/b/k?[redacted]");
        let sas = "Error performing GET https://a.blob.core.windows.net/c/k?sv=2022&sig=abc";
        assert_eq!(
            redact(sas),
            "Error performing GET https://a.blob.core.windows.net/c/k?sv=2022&[redacted]"
        );
        assert_eq!(redact("plain"), "plain");
    }
}
