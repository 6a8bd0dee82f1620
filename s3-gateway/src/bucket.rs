//! One archive target's bucket: a thin layer over aws-sdk-s3 that names objects under the
//! target's prefix, maps the SDK's errors to [`ArchiveError`]s a user can act on, and retries
//! what is worth retrying (the endpoint down, throttled or failing with a 5xx) for a bounded
//! time, so that an S3 server restarting under a push delays it rather than failing it.

use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    retry::RetryConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use crate::error::{ArchiveError, Result};

/// Where and how to reach a target. The secret never appears in `Debug` output.
#[derive(Clone)]
pub struct TargetConfig {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Object names start with this (empty, or ending in '/').
    pub prefix: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub path_style: bool,
    pub storage_class: Option<String>,
    /// Retention every written object gets (needs a bucket with object lock enabled).
    pub object_lock: Option<ObjectLockRule>,
    /// Client-side encryption: every object and document is sealed with the target's key
    /// (None: stored as the pool stores them).
    pub cipher: Option<std::sync::Arc<crate::crypt::Cipher>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    Governance,
    Compliance,
}

impl LockMode {
    pub fn parse(s: &str) -> Option<LockMode> {
        match s {
            "GOVERNANCE" => Some(LockMode::Governance),
            "COMPLIANCE" => Some(LockMode::Compliance),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectLockRule {
    pub mode: LockMode,
    pub days: u32,
}

impl std::fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("path_style", &self.path_style)
            .field("storage_class", &self.storage_class)
            .field("object_lock", &self.object_lock)
            .field("cipher", &self.cipher)
            .finish()
    }
}

/// Whether an endpoint is addressed by IP or as localhost, where virtual-hosted bucket names
/// cannot resolve: path-style addressing is then the default.
pub fn path_style_default(endpoint: &str) -> bool {
    let host = endpoint
        .split("://")
        .nth(1)
        .unwrap_or(endpoint)
        .split('/')
        .next()
        .unwrap_or("");
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok()
}

/// Checks the fields of a target before any request is made.
pub fn validate(cfg: &TargetConfig) -> Result<()> {
    let bad = |m: String| Err(ArchiveError::Invalid(m));
    let ep = cfg.endpoint.as_str();
    let Some(rest) = ep
        .strip_prefix("https://")
        .or_else(|| ep.strip_prefix("http://"))
    else {
        return bad(format!(
            "endpoint {ep:?} must be an http:// or https:// URL"
        ));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return bad(format!("endpoint {ep:?} names no host"));
    }
    let b = cfg.bucket.as_str();
    let bucket_ok = (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && !b.starts_with(['-', '.'])
        && !b.ends_with(['-', '.']);
    if !bucket_ok {
        return bad(format!(
            "bucket {b:?} is not a valid bucket name (3-63 lowercase letters, digits, '-' and '.')"
        ));
    }
    if cfg.prefix.len() > 512 || cfg.prefix.starts_with('/') || cfg.prefix.contains("//") {
        return bad(format!(
            "prefix {:?} must be relative, at most 512 bytes, without empty parts",
            cfg.prefix
        ));
    }
    if cfg.access_key_id.is_empty() || cfg.secret_access_key.is_empty() {
        return bad("access_key_id and secret_access_key must not be empty".into());
    }
    if cfg.region.is_empty() {
        return bad("region must not be empty".into());
    }
    Ok(())
}

/// Normalises a prefix: no leading '/', one trailing '/' unless empty.
pub fn normalise_prefix(p: &str) -> String {
    let p = p.trim_matches('/');
    if p.is_empty() {
        String::new()
    } else {
        format!("{p}/")
    }
}

/// An object as a LIST names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Relative to the target's prefix.
    pub key: String,
    pub size: u64,
    pub modified_unix: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Bucket {
    client: Client,
    cfg: std::sync::Arc<TargetConfig>,
    /// How long transient failures are retried before a call gives up.
    retry_for: Duration,
}

impl Bucket {
    pub fn new(cfg: TargetConfig) -> Result<Bucket> {
        validate(&cfg)?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .build();
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(cfg.region.clone()))
            .endpoint_url(cfg.endpoint.trim_end_matches('/'))
            .credentials_provider(Credentials::new(
                cfg.access_key_id.clone(),
                cfg.secret_access_key.clone(),
                None,
                None,
                "maas-archive-target",
            ))
            .force_path_style(cfg.path_style)
            .http_client(http)
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            // Checksums only where S3 requires them: S3-compatible servers differ in their
            // support of the newer trailing checksums, and packs carry their own CRCs.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Ok(Bucket {
            client: Client::from_conf(conf),
            cfg: std::sync::Arc::new(cfg),
            retry_for: Duration::from_secs(120),
        })
    }

    /// How long transient failures are retried (default two minutes).
    pub fn with_retry_for(mut self, d: Duration) -> Self {
        self.retry_for = d;
        self
    }

    pub fn config(&self) -> &TargetConfig {
        &self.cfg
    }

    /// The target's cipher, when it encrypts.
    pub fn cipher(&self) -> Option<&crate::crypt::Cipher> {
        self.cfg.cipher.as_deref()
    }

    /// The full object name of `rel` under the target's prefix.
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.cfg.prefix)
    }

    fn map_err<E, R>(&self, e: SdkError<E, R>, key: Option<&str>) -> ArchiveError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        let endpoint = self.cfg.endpoint.clone();
        match &e {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                return ArchiveError::Unreachable {
                    endpoint,
                    detail: DisplayErrorContext(&e).to_string(),
                };
            }
            SdkError::ResponseError(_) => {
                return ArchiveError::Service {
                    detail: DisplayErrorContext(&e).to_string(),
                    transient: true,
                };
            }
            _ => {}
        }
        let status = e.raw_response().map(|r| r.status_code()).unwrap_or(0);
        let code = e.code().unwrap_or("").to_string();
        let detail = match (e.code(), e.message()) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.to_string(),
            _ => format!("HTTP {status}"),
        };
        let bucket = self.cfg.bucket.clone();
        match code.as_str() {
            "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "InvalidToken"
            | "ExpiredToken"
            | "AuthorizationHeaderMalformed" => ArchiveError::Credentials { detail },
            "NoSuchBucket" => ArchiveError::NoSuchBucket { bucket, endpoint },
            "NoSuchKey" => ArchiveError::Missing {
                key: key.unwrap_or("").to_string(),
            },
            "AccessDenied" | "AllAccessDisabled" => ArchiveError::AccessDenied { bucket, detail },
            "NotImplemented" => ArchiveError::Service {
                detail,
                transient: false,
            },
            "SlowDown" | "Throttling" | "RequestTimeout" | "InternalError"
            | "ServiceUnavailable" => ArchiveError::Service {
                detail,
                transient: true,
            },
            _ => match status {
                // HEAD answers carry no error body: only the status says what went wrong.
                404 if key.is_some() => ArchiveError::Missing {
                    key: key.unwrap_or("").to_string(),
                },
                404 => ArchiveError::NoSuchBucket { bucket, endpoint },
                403 => ArchiveError::Credentials {
                    detail: "HTTP 403 Forbidden (wrong credentials, or no access to the bucket)"
                        .into(),
                },
                s if s >= 500 || s == 429 => ArchiveError::Service {
                    detail,
                    transient: true,
                },
                _ => ArchiveError::Service {
                    detail,
                    transient: false,
                },
            },
        }
    }

    /// Runs `op` until it succeeds, fails for good, or transient failures have lasted
    /// `retry_for`.
    async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut delay = Duration::from_millis(250);
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && start.elapsed() + delay < self.retry_for => {
                    tracing::warn!(error = %e, what, retry_in_ms = delay.as_millis() as u64, "archive request failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Checks the bucket exists and the credentials are good (no retries: a user is waiting).
    pub async fn head_bucket(&self) -> Result<()> {
        self.client
            .head_bucket()
            .bucket(&self.cfg.bucket)
            .send()
            .await
            .map_err(|e| self.map_err(e, None))?;
        Ok(())
    }

    /// Whether the bucket has S3 Object Lock enabled.
    pub async fn object_lock_enabled(&self) -> Result<bool> {
        match self
            .client
            .get_object_lock_configuration()
            .bucket(&self.cfg.bucket)
            .send()
            .await
        {
            Ok(r) => Ok(r
                .object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                .is_some_and(|e| e.as_str() == "Enabled")),
            Err(e) => {
                // A server without object lock at all (s3s-fs) says NotImplemented.
                if matches!(
                    e.code(),
                    Some("ObjectLockConfigurationNotFoundError" | "NotImplemented")
                ) {
                    return Ok(false);
                }
                match self.map_err(e, None) {
                    ArchiveError::Service {
                        transient: false, ..
                    }
                    | ArchiveError::Missing { .. } => Ok(false),
                    other => Err(other),
                }
            }
        }
    }

    pub async fn put(&self, rel: &str, body: Bytes) -> Result<()> {
        let key = self.key(rel);
        self.retrying(&key, || async {
            let mut req = self
                .client
                .put_object()
                .bucket(&self.cfg.bucket)
                .key(&key)
                .body(ByteStream::from(body.clone()));
            if let Some(sc) = &self.cfg.storage_class {
                req = req.storage_class(sc.as_str().into());
            }
            if let Some(lock) = self.cfg.object_lock {
                use md5::Digest as _;
                let until = std::time::SystemTime::now()
                    + Duration::from_secs(u64::from(lock.days) * 86_400);
                req = req
                    .object_lock_mode(match lock.mode {
                        LockMode::Governance => aws_sdk_s3::types::ObjectLockMode::Governance,
                        LockMode::Compliance => aws_sdk_s3::types::ObjectLockMode::Compliance,
                    })
                    .object_lock_retain_until_date(aws_smithy_types::DateTime::from(until))
                    .content_md5(aws_smithy_types::base64::encode(md5::Md5::digest(&body)));
            }
            req.send()
                .await
                .map(|_| ())
                .map_err(|e| self.map_err(e, Some(&key)))
        })
        .await
    }

    /// The whole object, or None if it does not exist.
    pub async fn get(&self, rel: &str) -> Result<Option<Bytes>> {
        let key = self.key(rel);
        let r = self
            .retrying(&key, || async {
                let out = self
                    .client
                    .get_object()
                    .bucket(&self.cfg.bucket)
                    .key(&key)
                    .send()
                    .await
                    .map_err(|e| self.map_err(e, Some(&key)))?;
                out.body
                    .collect()
                    .await
                    .map(|b| b.into_bytes())
                    .map_err(|e| ArchiveError::Service {
                        detail: format!("reading {key}: {e}"),
                        transient: true,
                    })
            })
            .await;
        match r {
            Ok(b) => Ok(Some(b)),
            Err(ArchiveError::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Bytes `[start, start + len)` of an object; anything but exactly that is an error.
    pub async fn get_range(&self, rel: &str, start: u64, len: u64) -> Result<Bytes> {
        let key = self.key(rel);
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.retrying(&key, || async {
            let out = self
                .client
                .get_object()
                .bucket(&self.cfg.bucket)
                .key(&key)
                .range(format!("bytes={start}-{}", start + len - 1))
                .send()
                .await
                .map_err(|e| self.map_err(e, Some(&key)))?;
            let b = out
                .body
                .collect()
                .await
                .map(|b| b.into_bytes())
                .map_err(|e| ArchiveError::Service {
                    detail: format!("reading {key}: {e}"),
                    transient: true,
                })?;
            if b.len() as u64 != len {
                return Err(ArchiveError::Damaged {
                    key: key.clone(),
                    detail: format!(
                        "asked for {len} bytes at {start}, got {} (the object is shorter than recorded)",
                        b.len()
                    ),
                });
            }
            Ok(b)
        })
        .await
    }

    /// An object's length, or None if it does not exist.
    pub async fn head(&self, rel: &str) -> Result<Option<u64>> {
        let key = self.key(rel);
        let r = self
            .retrying(&key, || async {
                self.client
                    .head_object()
                    .bucket(&self.cfg.bucket)
                    .key(&key)
                    .send()
                    .await
                    .map(|o| o.content_length().unwrap_or(0).max(0) as u64)
                    .map_err(|e| self.map_err(e, Some(&key)))
            })
            .await;
        match r {
            Ok(n) => Ok(Some(n)),
            Err(ArchiveError::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn delete(&self, rel: &str) -> Result<()> {
        let key = self.key(rel);
        self.retrying(&key, || async {
            self.client
                .delete_object()
                .bucket(&self.cfg.bucket)
                .key(&key)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.map_err(e, Some(&key)))
        })
        .await
    }

    /// Every object under `rel_prefix` (names relative to the target's prefix) with its
    /// length. Only import and verify/repair list; nothing on a hot path does.
    pub async fn list(&self, rel_prefix: &str) -> Result<Vec<(String, u64)>> {
        Ok(self
            .list_detailed(rel_prefix)
            .await?
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect())
    }

    /// As [`Bucket::list`], with each object's modification time.
    pub async fn list_detailed(&self, rel_prefix: &str) -> Result<Vec<Listed>> {
        let prefix = self.key(rel_prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .retrying(&prefix, || async {
                    self.client
                        .list_objects_v2()
                        .bucket(&self.cfg.bucket)
                        .prefix(&prefix)
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| self.map_err(e, None))
                })
                .await?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    let rel = k.strip_prefix(&self.cfg.prefix).unwrap_or(k);
                    out.push(Listed {
                        key: rel.to_string(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        modified_unix: o.last_modified().map(|t| t.secs()),
                    });
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }
}

/// The HTTP status of a raw response, whatever the SDK's response type.
pub trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TargetConfig {
        TargetConfig {
            endpoint: "http://127.0.0.1:9000".into(),
            region: "us-east-1".into(),
            bucket: "maas-archive".into(),
            prefix: String::new(),
            access_key_id: "AKID".into(),
            secret_access_key: "very-secret".into(),
            path_style: true,
            storage_class: None,
            object_lock: None,
            cipher: None,
        }
    }

    #[test]
    fn path_style_is_the_default_for_addresses_and_localhost() {
        assert!(path_style_default("http://127.0.0.1:9000"));
        assert!(path_style_default("http://localhost:9000/"));
        assert!(path_style_default("https://[::1]:9000"));
        assert!(path_style_default("http://10.0.0.7"));
        assert!(!path_style_default("https://s3.eu-west-1.amazonaws.com"));
        assert!(!path_style_default("https://rgw.example.org:7480"));
    }

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let s = format!("{:?}", cfg());
        assert!(!s.contains("very-secret"), "{s}");
        assert!(s.contains("AKID"));
    }

    #[test]
    fn invalid_targets_are_refused_before_any_request() {
        assert!(validate(&cfg()).is_ok());
        let mut c = cfg();
        c.endpoint = "ftp://x".into();
        assert!(validate(&c).is_err());
        let mut c = cfg();
        c.bucket = "Upper_Case".into();
        assert!(validate(&c).is_err());
        let mut c = cfg();
        c.secret_access_key.clear();
        assert!(validate(&c).is_err());
        let mut c = cfg();
        c.prefix = "/abs".into();
        assert!(validate(&c).is_err());
    }

    #[test]
    fn prefixes_are_normalised() {
        assert_eq!(normalise_prefix(""), "");
        assert_eq!(normalise_prefix("/site-a/"), "site-a/");
        assert_eq!(normalise_prefix("a/b"), "a/b/");
    }
}
