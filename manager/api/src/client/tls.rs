//! How a client (maasctl, the probe) decides to trust an HTTPS server: the certificates of
//! `--ca-cert` (else the system's CAs), checked for the URL's name by webpki; and/or
//! `--fingerprint`, which accepts exactly the server certificate with that SHA-256 (chain and
//! names are then not consulted: the pin is the trust). Whatever is refused is remembered, so
//! the error can show the fingerprint that was seen and how to trust it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{ClientError, R};

/// A certificate the verifier refused.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub fingerprint: String,
    pub reason: String,
    pub pinned: bool,
}

impl Rejected {
    /// The error message: what was seen, and the flags that would trust it.
    pub fn advice(&self, base: &str) -> String {
        let fp = &self.fingerprint;
        if self.pinned {
            format!(
                "refusing {base}: {}. The server's certificate has SHA-256 fingerprint {fp}. \
                 This is not the server you pinned, or its certificate changed (a new one is \
                 generated when DATA_DIR/tls is deleted): check the fingerprint maasd logs at \
                 start (sha256_fingerprint=...) before pinning the new one with \
                 --fingerprint {fp} (or MAAS_TLS_FINGERPRINT)",
                self.reason
            )
        } else {
            format!(
                "refusing {base}: its TLS certificate is not trusted here ({}). The \
                 server's certificate has SHA-256 fingerprint {fp}. If that is your maasd \
                 (it logs sha256_fingerprint=... at start), pin it with --fingerprint {fp} \
                 (or MAAS_TLS_FINGERPRINT), or trust its certificate file with --ca-cert \
                 DATA_DIR/tls/api-cert.pem (or MAAS_CA_CERT); a CA-signed certificate needs \
                 its CA with --ca-cert",
                self.reason
            )
        }
    }
}

#[derive(Debug)]
pub struct Verifier {
    provider: Arc<CryptoProvider>,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// Why there is no webpki verifier (no usable CA certificate).
    no_roots: String,
    /// Pinned fingerprints, upper-case hex without separators.
    pin: Option<String>,
    rejected: Mutex<Option<Rejected>>,
}

/// SHA-256 of a DER certificate as `AB:CD:...`.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn normalise(fp: &str) -> String {
    let t = fp.trim();
    let t = t
        .strip_prefix("sha256:")
        .or_else(|| t.strip_prefix("SHA256:"))
        .unwrap_or(t);
    t.chars()
        .filter(|c| !matches!(c, ':' | ' '))
        .collect::<String>()
        .to_ascii_uppercase()
}

impl Verifier {
    pub fn new(ca_cert: Option<&Path>, pin: Option<&str>) -> R<Verifier> {
        // ring, as maasd.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pin = match pin {
            None => None,
            Some(p) => {
                let n = normalise(p);
                if n.len() != 64 || !n.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(ClientError::Other(format!(
                        "--fingerprint {p:?} is not a SHA-256 fingerprint (64 hex digits, \
                         colons optional, as maasd logs it)"
                    )));
                }
                Some(n)
            }
        };
        let mut roots = rustls::RootCertStore::empty();
        let mut no_roots = String::new();
        match ca_cert {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ClientError::Other(format!("--ca-cert {}: {e}", path.display()))
                })?;
                let certs = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        ClientError::Other(format!("--ca-cert {}: {e}", path.display()))
                    })?;
                if certs.is_empty() {
                    return Err(ClientError::Other(format!(
                        "--ca-cert {}: no PEM certificate in it",
                        path.display()
                    )));
                }
                for c in certs {
                    roots.add(c).map_err(|e| {
                        ClientError::Other(format!("--ca-cert {}: {e}", path.display()))
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    no_roots = "this machine has no CA certificates".into();
                }
            }
        }
        let webpki = if roots.is_empty() || (pin.is_some() && ca_cert.is_none()) {
            None
        } else {
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| ClientError::Other(format!("TLS setup: {e}")))?,
            )
        };
        Ok(Verifier {
            provider,
            webpki,
            no_roots,
            pin,
            rejected: Mutex::new(None),
        })
    }

    pub fn client_config(self: &Arc<Self>) -> R<rustls::ClientConfig> {
        Ok(
            rustls::ClientConfig::builder_with_provider(self.provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| ClientError::Other(format!("TLS setup: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(self.clone())
                .with_no_client_auth(),
        )
    }

    /// The last certificate refused, if any.
    pub fn rejected(&self) -> Option<Rejected> {
        self.rejected.lock().ok().and_then(|r| r.clone())
    }

    fn reject(&self, fp: String, reason: String, pinned: bool) {
        if let Ok(mut r) = self.rejected.lock() {
            *r = Some(Rejected {
                fingerprint: fp,
                reason,
                pinned,
            });
        }
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity.as_ref());
        if let Some(pin) = &self.pin {
            if normalise(&fp) != *pin {
                self.reject(
                    fp,
                    "the certificate's fingerprint is not the one pinned with --fingerprint".into(),
                    true,
                );
                return Err(rustls::Error::General(
                    "certificate fingerprint does not match the pin".into(),
                ));
            }
            if self.webpki.is_none() {
                return Ok(ServerCertVerified::assertion());
            }
        }
        match &self.webpki {
            Some(v) => v
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .inspect_err(|e| self.reject(fp, e.to_string(), false)),
            None => {
                self.reject(fp, self.no_roots.clone(), false);
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_compare_without_colons_or_case() {
        let fp = fingerprint(b"x");
        assert_eq!(
            normalise(&fp),
            normalise(&fp.to_lowercase().replace(':', ""))
        );
        assert_eq!(normalise(&format!("sha256:{fp}")), normalise(&fp));
        assert!(Verifier::new(None, Some("AB:CD")).is_err());
        assert!(Verifier::new(None, Some(&fp)).is_ok());
    }
}
