//! A blocking client of maasd's REST API, shared by `maasctl` and the probe (feature `client`):
//! bearer token, HTTPS trusted by CA or by pinned fingerprint ([`tls`]), errors that carry the
//! server's stable code and request id, and pagination followed to the end.

pub mod tls;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use zeroize::Zeroizing;

use crate::{ErrorBody, List};

/// What a call to maasd failed with.
#[derive(Debug)]
pub enum ClientError {
    /// maasd answered with an error (its stable code, message and request id).
    Api { status: u16, body: ErrorBody },
    /// Anything else: unreachable server, refused certificate, unexpected answer, bad input.
    Other(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Api { status, body } => {
                write!(f, "{} ({}): {}", body.code, status, body.message)?;
                if let Some(field) = &body.field {
                    write!(f, " [field: {field}]")?;
                }
                write!(f, " [request {}]", body.request_id)
            }
            ClientError::Other(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// The server's stable error code, if the server answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } => Some(&body.code),
            ClientError::Other(_) => None,
        }
    }

    /// True when maasd could not be reached at all (not an answer, not a TLS refusal), so a
    /// caller may retry later.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Other(s) if s.starts_with("cannot reach "))
    }
}

pub type R<T> = Result<T, ClientError>;

/// How to reach maasd.
#[derive(Debug, Clone, Default)]
pub struct Connect<'a> {
    /// `https://host:port` or `http://host:port`, without `/api/v1`.
    pub base: &'a str,
    pub token: Option<Zeroizing<String>>,
    /// PEM file of the CA (or the server's own certificate) to trust.
    pub ca_cert: Option<&'a Path>,
    /// SHA-256 fingerprint of the server's certificate to trust.
    pub fingerprint: Option<&'a str>,
    /// Per request (default 60 s).
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<Zeroizing<String>>,
    agent: ureq::Agent,
    /// What the TLS verifier refused, for an error that says what to do.
    tls: Option<Arc<tls::Verifier>>,
}

impl Client {
    pub fn new(c: Connect<'_>) -> R<Client> {
        let base = c.base.trim_end_matches('/').to_string();
        let mut builder =
            ureq::AgentBuilder::new().timeout(c.timeout.unwrap_or(Duration::from_secs(60)));
        let mut verifier = None;
        if base.starts_with("https://") {
            let v = Arc::new(tls::Verifier::new(c.ca_cert, c.fingerprint)?);
            builder = builder.tls_config(Arc::new(v.client_config()?));
            verifier = Some(v);
        } else if !base.starts_with("http://") {
            return Err(ClientError::Other(format!(
                "{base} is not an http:// or https:// URL"
            )));
        } else if c.ca_cert.is_some() || c.fingerprint.is_some() {
            return Err(ClientError::Other(format!(
                "--ca-cert / --fingerprint (MAAS_CA_CERT / MAAS_TLS_FINGERPRINT) apply to https:// \
                 URLs, and {base} is not one: use https://, or unset them to talk plain HTTP"
            )));
        }
        Ok(Client {
            base,
            token: c.token,
            agent: builder.build(),
            tls: verifier,
        })
    }

    /// The server's URL (without `/api/v1`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request to `/api/v1{path}`; `204` is `Value::Null`.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> R<Value> {
        self.request(method, path, body.map(Body::Json))
    }

    /// One request with a body of another type (e.g. `application/x-ndjson`).
    pub fn send_bytes(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> R<Value> {
        self.request(method, path, Some(Body::Bytes(content_type, body)))
    }

    fn request(&self, method: &str, path: &str, body: Option<Body<'_>>) -> R<Value> {
        let r = self.send(method, path, body)?;
        if r.status() == 204 {
            return Ok(Value::Null);
        }
        let url = r.get_url().to_string();
        r.into_json()
            .map_err(|e| ClientError::Other(format!("bad response from {url}: {e}")))
    }

    /// A GET whose answer is text of another type than JSON (e.g. a manifest's JSON lines),
    /// read up to `max` bytes (more is an error, not a truncated answer).
    pub fn get_text(&self, path: &str, max: u64) -> R<String> {
        use std::io::Read as _;
        let r = self.send("GET", path, None)?;
        let url = r.get_url().to_string();
        let mut text = String::new();
        r.into_reader()
            .take(max.saturating_add(1))
            .read_to_string(&mut text)
            .map_err(|e| ClientError::Other(format!("reading the answer of {url}: {e}")))?;
        if text.len() as u64 > max {
            return Err(ClientError::Other(format!(
                "the answer of {url} is larger than {max} bytes"
            )));
        }
        Ok(text)
    }

    /// Sends one request; a successful response, or the server's error.
    fn send(&self, method: &str, path: &str, body: Option<Body<'_>>) -> R<ureq::Response> {
        let url = format!("{}/api/v1{}", self.base, path);
        let mut req = self.agent.request(method, &url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {}", t.as_str()));
        }
        let res = match body {
            Some(Body::Json(b)) => req.send_json(b),
            Some(Body::Bytes(ct, b)) => req.set("Content-Type", ct).send_bytes(b),
            None => req.call(),
        };
        match res {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, r)) => {
                let text = r.into_string().unwrap_or_default();
                match serde_json::from_str::<ErrorBody>(&text) {
                    Ok(body) => Err(ClientError::Api { status, body }),
                    Err(_) => Err(ClientError::Other(format!(
                        "HTTP {status} from {url}: {text}"
                    ))),
                }
            }
            Err(e) => match self.tls.as_ref().and_then(|v| v.rejected()) {
                Some(r) => Err(ClientError::Other(r.advice(&self.base))),
                None => Err(ClientError::Other(format!("cannot reach {url}: {e}"))),
            },
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> R<T> {
        typed(self.call("GET", path, None)?)
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str, body: Option<Value>) -> R<T> {
        typed(self.call("POST", path, body)?)
    }

    /// Follows `next_cursor` to the end.
    pub fn list<T: DeserializeOwned>(&self, path: &str) -> R<Vec<T>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let p = match &cursor {
                Some(c) => format!("{path}{sep}cursor={c}"),
                None => path.to_string(),
            };
            let page: List<T> = self.get(&p)?;
            out.extend(page.items);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }
}

enum Body<'a> {
    Json(Value),
    Bytes(&'a str, &'a [u8]),
}

/// A JSON value as the type the caller expects.
pub fn typed<T: DeserializeOwned>(v: Value) -> R<T> {
    serde_json::from_value(v).map_err(|e| ClientError::Other(format!("unexpected response: {e}")))
}
