//! S3 for the repository (cloud.rs does the rest): the client, and the
//! bucket's versioning and Object Lock, which object_store does not read.
//!
//! Region, endpoint and credentials come from the usual AWS variables
//! (`AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), as every
//! AWS tool reads them.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};

use super::cloud::{client_options, redact, retry, Cloud};
use super::{Protection, Retention, Scheme, Store, StoreError};

/// What may override the environment's S3 settings.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

/// Signed requests to the bucket itself (`?versioning`, `?object-lock`).
pub struct BucketApi {
    client: AmazonS3,
    bucket: String,
    region: String,
    endpoint: Option<String>,
}

impl Cloud {
    /// An S3 bucket and key prefix, configured from the environment with
    /// `over` on top.
    pub fn s3(bucket: &str, prefix: &str, over: &S3Config) -> Result<Cloud, StoreError> {
        // Every upload carries a CRC64-NVME checksum, which S3 checks on
        // arrival, and names its algorithm as the AWS SDKs do: a bucket
        // with an Object Lock default retention refuses uploads without
        // one (Content-MD5 or a checksum), and a CRC costs little.
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-amz-sdk-checksum-algorithm",
            http::HeaderValue::from_static("CRC64NVME"),
        );
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry())
            .with_client_options(client_options().with_default_headers(headers))
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
        let client = b.build().map_err(|e| {
            StoreError::BadLocation(format!("s3://{bucket}: {}", redact(&e.to_string())))
        })?;
        let api = BucketApi {
            client: client.clone(),
            bucket: bucket.to_owned(),
            region,
            endpoint,
        };
        Cloud::new(Arc::new(client), Scheme::S3, bucket, prefix, Some(api))
    }
}

impl BucketApi {
    /// The bucket's URL: path style on an endpoint of one's own, as
    /// object_store addresses it, virtual-hosted on AWS.
    fn bucket_url(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("{}/{}", e.trim_end_matches('/'), self.bucket),
            None => format!("https://{}.s3.{}.amazonaws.com", self.bucket, self.region),
        }
    }

    pub(super) fn protection(&self, on: &Cloud) -> Result<Protection, StoreError> {
        let versioning = self.bucket_get(on, "versioning")?;
        let lock = self.bucket_get(on, "object-lock")?;
        Ok(protection_of(versioning.as_deref(), lock.as_deref()))
    }

    /// A signed `GET` of a bucket subresource (`?versioning`,
    /// `?object-lock`): its XML, or none when S3 answers 404.
    fn bucket_get(&self, on: &Cloud, sub: &str) -> Result<Option<String>, StoreError> {
        use object_store::aws::AwsAuthorizer;
        use object_store::client::HttpRequestBody;
        let url = format!("{}?{sub}", self.bucket_url());
        let what = format!("?{sub}");
        let remote = |detail: String| StoreError::Remote {
            op: "read",
            key: what.clone(),
            store: on.location(),
            detail: redact(&detail),
        };
        on.rt().block_on(async {
            let cred = self
                .client
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
}
