//! TLS for the REST API (rustls with ring). The certificate chain and key come from the
//! configuration (`api.tls_cert_file`, `api.tls_key_file`, PEM) or, when none is given, from
//! a self-signed certificate that maasd generates at its first start into `DATA_DIR/tls/`
//! (key 0600) and reuses afterwards, so that clients can pin its SHA-256 fingerprint, which
//! is logged at every start. `api.tls = false` serves plain HTTP (behind a TLS-terminating
//! proxy); beyond loopback maasd then warns loudly ([`plain_http_warning`]).

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

use crate::config::Config;

/// Folder of the generated certificate, under the data directory.
pub const TLS_DIR: &str = "tls";
/// The generated certificate (PEM, mode 0600 like all of the data directory), what clients
/// trust with `--ca-cert` / `curl --cacert`.
pub const CERT_FILE: &str = "api-cert.pem";
/// The generated certificate's private key (PEM, mode 0600).
pub const KEY_FILE: &str = "api-key.pem";
/// How long a generated certificate is valid.
const GENERATED_VALIDITY_YEARS: i32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error(
        "{cert} exists but its key {key} is missing; restore the key, or delete {cert} to \
         generate a new certificate (its fingerprint changes: clients that pinned it must pin \
         the new one)"
    )]
    KeyMissing { cert: PathBuf, key: PathBuf },
    #[error("generating the self-signed certificate: {0}")]
    Generate(String),
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(String),
}

/// Where the served certificate came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// `api.tls_cert_file` / `api.tls_key_file`.
    Configured { cert: PathBuf },
    /// Self-signed under `DATA_DIR/tls/`; `created` on this start.
    Generated { cert: PathBuf, created: bool },
}

/// A ready rustls server configuration and what to log about it.
#[derive(Debug)]
pub struct ApiTls {
    pub config: rustls::ServerConfig,
    /// SHA-256 of the end-entity certificate (DER), `AB:CD:...`.
    pub fingerprint: String,
    pub source: CertSource,
}

/// The SHA-256 fingerprint of a DER certificate, as OpenSSL prints it: `AB:CD:...`.
pub fn fingerprint(der: &[u8]) -> String {
    let d = sha2::Sha256::digest(der);
    d.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether `listen` (host:port) only accepts connections from this machine.
pub fn is_loopback(listen: &str) -> bool {
    match listen.parse::<SocketAddr>() {
        Ok(a) => a.ip().to_canonical().is_loopback(),
        Err(_) => false,
    }
}

/// The warning to log when the API serves plain HTTP on `listen`: None on loopback (a local
/// proxy or local clients only), else what is exposed and what to do about it.
pub fn plain_http_warning(listen: &str) -> Option<String> {
    if is_loopback(listen) {
        return None;
    }
    Some(format!(
        "THE REST API LISTENS ON {listen}, BEYOND LOOPBACK, WITHOUT TLS: API tokens and CHAP \
         secrets cross the network in clear and anyone on the path can act as an admin. Set \
         api.tls = true (the default: maasd generates a self-signed certificate, or give \
         api.tls_cert_file and api.tls_key_file), or keep api.tls = false only with \
         api.listen on 127.0.0.1 behind a TLS-terminating proxy"
    ))
}

/// Names the generated certificate is valid for: localhost, 127.0.0.1, ::1, this host's name
/// and the listen address when it is a specific IP.
pub fn subject_alt_names(listen: &str) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Some(h) = hostname()
        && !names.contains(&h)
    {
        names.push(h);
    }
    if let Ok(a) = listen.parse::<SocketAddr>() {
        let ip = a.ip().to_canonical();
        if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
            names.push(ip.to_string());
        }
    }
    names
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname(2) writes at most buf.len() bytes into a buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let h = std::str::from_utf8(&buf[..end]).ok()?.trim().to_string();
    (!h.is_empty()).then_some(h)
}

/// rustls with *ring* (no C toolchain beyond cc, unlike aws-lc-rs). rustls 0.23.48 deprecates
/// ring's provider for lacking post-quantum key exchange (X25519MLKEM768), which is only
/// offered by aws-lc-rs; classical ECDHE is what the API's clients (curl, browsers) also do.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server configuration for this chain and key (HTTP/1.1 and HTTP/2 by ALPN).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        source: e,
    })
}

/// The certificates of a PEM file, end-entity first.
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(chain)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        detail: format!("no usable private key ({e})"),
    })
}

/// The API's TLS configuration: the configured files, else the generated certificate (made on
/// the first start). Call only when `api.tls` is on.
pub fn load_or_generate(cfg: &Config) -> Result<ApiTls, TlsError> {
    let (cert, key, source) = if !cfg.api.tls_cert_file.as_os_str().is_empty() {
        let cert = cfg.api.tls_cert_file.clone();
        (
            cert.clone(),
            cfg.api.tls_key_file.clone(),
            CertSource::Configured { cert },
        )
    } else {
        let dir = cfg.data.dir.join(TLS_DIR);
        let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        let created = ensure_generated(&dir, &cert, &key, &cfg.api.listen)?;
        (cert.clone(), key, CertSource::Generated { cert, created })
    };
    if matches!(source, CertSource::Configured { .. }) {
        warn_if_readable(&key);
    }
    let chain = load_chain(&cert)?;
    let fingerprint = fingerprint(chain[0].as_ref());
    let key = load_key(&key)?;
    Ok(ApiTls {
        config: server_config(chain, key)?,
        fingerprint,
        source,
    })
}

/// A configured key is the operator's file (maasd does not change it), but one that other
/// users can read is worth a warning.
fn warn_if_readable(key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(key)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            key = %key.display(),
            mode = format!("{:04o}", meta.permissions().mode() & 0o7777),
            "the REST API's TLS private key can be read by other users: chmod 600 it"
        );
    }
}

/// Generates the self-signed certificate unless it exists; true when it was made now.
fn ensure_generated(dir: &Path, cert: &Path, key: &Path, listen: &str) -> Result<bool, TlsError> {
    use maas_pool::fsmode::{PRIVATE_FILE, private_dir, restrict_path};
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |e| TlsError::Write { path, source: e }
    };
    private_dir(dir).map_err(werr(dir))?;
    if cert.exists() {
        if !key.exists() {
            return Err(TlsError::KeyMissing {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            });
        }
        // Like everything in the data directory: 0600, tightened (and logged) if wider.
        restrict_path(key, PRIVATE_FILE).map_err(werr(key))?;
        restrict_path(cert, PRIVATE_FILE).map_err(werr(cert))?;
        return Ok(false);
    }
    let (cert_pem, key_pem) = generate(listen)?;
    // The key first, then the certificate, each complete (temporary file, sync, rename): a
    // crash leaves either no certificate (generated again) or both.
    write_private(key, key_pem.as_bytes(), PRIVATE_FILE)?;
    // The certificate is public, but the data directory is private throughout (0700, files
    // 0600): it is copied out (or pinned by fingerprint) for clients.
    write_private(cert, cert_pem.as_bytes(), PRIVATE_FILE)?;
    Ok(true)
}

/// A self-signed certificate (ECDSA P-256) for [`subject_alt_names`]; (cert PEM, key PEM).
pub fn generate(listen: &str) -> Result<(String, String), TlsError> {
    let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = rcgen::CertificateParams::new(subject_alt_names(listen)).map_err(gen_err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "maasd REST API (self-signed)");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "MaaS");
    use chrono::Datelike;
    let now = chrono::Utc::now() - chrono::Duration::days(1);
    let (m, d) = (now.month() as u8, now.day().min(28) as u8);
    params.not_before = rcgen::date_time_ymd(now.year(), m, d);
    params.not_after = rcgen::date_time_ymd(now.year() + GENERATED_VALIDITY_YEARS, m, d);
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut serial[..]);
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let key = rcgen::KeyPair::generate().map_err(gen_err)?;
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let werr = |e| TlsError::Write {
        path: path.to_path_buf(),
        source: e,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(werr)?;
    maas_pool::fsmode::restrict_file(&f, &tmp, mode).map_err(werr)?;
    f.write_all(data).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(werr)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_decision() {
        for l in [
            "127.0.0.1:8080",
            "127.3.4.5:1",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(is_loopback(l), "{l}");
            assert_eq!(plain_http_warning(l), None, "{l}");
        }
        for l in [
            "0.0.0.0:8080",
            "[::]:8080",
            "192.0.2.7:8080",
            "[2001:db8::1]:443",
            "not an address",
        ] {
            assert!(!is_loopback(l), "{l}");
            let w = plain_http_warning(l).unwrap();
            assert!(w.contains(l) && w.contains("WITHOUT TLS"), "{w}");
            assert!(w.contains("api.tls = true"), "says what to do: {w}");
        }
    }

    #[test]
    fn names_cover_loopback_host_and_listen_ip() {
        let n = subject_alt_names("192.0.2.7:8443");
        for want in ["localhost", "127.0.0.1", "::1", "192.0.2.7"] {
            assert!(n.iter().any(|x| x == want), "{want} in {n:?}");
        }
        if let Some(h) = hostname() {
            assert!(n.contains(&h), "{h} in {n:?}");
        }
        assert!(
            !subject_alt_names("0.0.0.0:1")
                .iter()
                .any(|x| x == "0.0.0.0")
        );
    }

    #[test]
    fn generated_certificate_is_kept_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.data.dir = dir.path().join("data");
        std::fs::create_dir_all(&cfg.data.dir).unwrap();
        let first = load_or_generate(&cfg).unwrap();
        assert!(matches!(
            first.source,
            CertSource::Generated { created: true, .. }
        ));
        let key = cfg.data.dir.join(TLS_DIR).join(KEY_FILE);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_generate(&cfg).unwrap();
        assert!(matches!(
            again.source,
            CertSource::Generated { created: false, .. }
        ));
        assert_eq!(first.fingerprint, again.fingerprint);
        assert_eq!(first.fingerprint.len(), 32 * 3 - 1);
        std::fs::remove_file(&key).unwrap();
        assert!(matches!(
            load_or_generate(&cfg),
            Err(TlsError::KeyMissing { .. })
        ));
    }
}
