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

use super::{check_key, ObjectInfo, Protection, Put, Retention, Store, StoreError};

pub struct S3 {
    store: AmazonS3,
    bucket: String,
    prefix: String,
    rt: tokio::runtime::Runtime,
    region: String,
    endpoint: Option<String>,
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
        // Every upload carries a CRC64-NVME checksum, which S3 checks on
        // arrival, and names its algorithm as the AWS SDKs do: a bucket
        // with an Object Lock default retention refuses uploads without
        // one (Content-MD5 or a checksum), and a CRC costs little.
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-amz-sdk-checksum-algorithm",
            http::HeaderValue::from_static("CRC64NVME"),
        );
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(120))
            .with_default_headers(headers);
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry)
            .with_client_options(client)
            .with_checksum_algorithm(object_store::aws::Checksum::CRC64NVME);
        // `from_env` reads AWS_ENDPOINT; the SDKs' name is AWS_ENDPOINT_URL.
        let endpoint = over
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT").ok());
        if let Some(url) = &endpoint {
            b = b
                .with_allow_http(url.starts_with("http://"))
                .with_endpoint(url);
        }
        let region = over.region.clone().or_else(|| {
            (std::env::var_os("AWS_REGION").is_none()
                && std::env::var_os("AWS_DEFAULT_REGION").is_none())
            .then(|| "us-east-1".to_owned())
        });
        if let Some(r) = &region {
            b = b.with_region(r);
        }
        let region = region
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".to_owned());
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
            region,
            endpoint,
        })
    }

    /// The bucket's URL: path style on an endpoint of one's own, as
    /// object_store addresses it, virtual-hosted on AWS.
    fn bucket_url(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("{}/{}", e.trim_end_matches('/'), self.bucket),
            None => format!("https://{}.s3.{}.amazonaws.com", self.bucket, self.region),
        }
    }

    /// A signed `GET` of a bucket subresource (`?versioning`,
    /// `?object-lock`): its XML, or none when S3 answers 404.
    fn bucket_get(&self, sub: &str) -> Result<Option<String>, StoreError> {
        use object_store::aws::AwsAuthorizer;
        use object_store::client::HttpRequestBody;
        let url = format!("{}?{sub}", self.bucket_url());
        let what = format!("?{sub}");
        let remote = |detail: String| StoreError::Remote {
            op: "read",
            key: what.clone(),
            store: self.location(),
            detail: redact(&detail),
        };
        self.rt.block_on(async {
            let cred = self
                .store
                .credentials()
                .get_credential()
                .await
                .map_err(|e| remote(e.to_string()))?;
            let mut req = http::Request::builder()
                .method("GET")
                .uri(&url)
                .body(HttpRequestBody::from(Vec::new()))
                .map_err(|e| remote(e.to_string()))?;
            AwsAuthorizer::new(&cred, "s3", &self.region)
                .try_authorize(&mut req, None)
                .map_err(|e| remote(e.to_string()))?;
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .map_err(|e| remote(e.to_string()))?;
            let mut get = client.get(&url);
            for (k, v) in req.headers() {
                get = get.header(k.as_str(), v.as_bytes());
            }
            let resp = get.send().await.map_err(|e| remote(e.to_string()))?;
            let status = resp.status();
            let text = resp.text().await.map_err(|e| remote(e.to_string()))?;
            if status.as_u16() == 404 {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(remote(format!(
                    "{status}: {}",
                    tag(&text, "Code").unwrap_or(&text)
                )));
            }
            Ok(Some(text))
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

/// The text of the first `<name>` element of an XML answer.
fn tag<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(xml[start..end].trim())
}

/// What `?versioning` and `?object-lock` answered.
fn protection_of(versioning: Option<&str>, lock: Option<&str>) -> Protection {
    let lock = lock.unwrap_or_default();
    let default_retention = tag(lock, "DefaultRetention").and_then(|r| {
        let days = match (tag(r, "Days"), tag(r, "Years")) {
            (Some(d), _) => d.parse().ok()?,
            (None, Some(y)) => y.parse::<u64>().ok()? * 365,
            _ => return None,
        };
        Some(Retention {
            mode: tag(r, "Mode").unwrap_or("GOVERNANCE").to_owned(),
            days,
        })
    });
    Protection {
        versioning: versioning
            .and_then(|v| tag(v, "Status"))
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        object_lock: tag(lock, "ObjectLockEnabled") == Some("Enabled"),
        default_retention,
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

    fn protection(&self) -> Result<Option<Protection>, StoreError> {
        let versioning = self.bucket_get("versioning")?;
        let lock = self.bucket_get("object-lock")?;
        Ok(Some(protection_of(versioning.as_deref(), lock.as_deref())))
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
    fn versioning_and_object_lock_answers_read() {
        let p = protection_of(
            Some("<VersioningConfiguration><Status>Enabled</Status></VersioningConfiguration>"),
            Some(
                "<ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled>\
                 <Rule><DefaultRetention><Mode>COMPLIANCE</Mode><Years>1</Years>\
                 </DefaultRetention></Rule></ObjectLockConfiguration>",
            ),
        );
        assert_eq!(p.versioning.as_deref(), Some("Enabled"));
        assert!(p.object_lock);
        assert_eq!(
            p.default_retention,
            Some(Retention {
                mode: "COMPLIANCE".into(),
                days: 365
            })
        );
        let none = protection_of(Some("<VersioningConfiguration/>"), None);
        assert_eq!(none, Protection::default());
    }

    #[test]
    fn credentials_in_error_text_are_cut() {
        let s = "Error performing PUT http://h/b/k?X-Amz-Signature=abc in 1ms";
        assert_eq!(redact(s), "Error performing PUT http://h/b/k?[redacted]");
        assert_eq!(redact("plain"), "plain");
    }
}
