#![allow(clippy::unwrap_used, clippy::expect_used)]
//! HTTPS for the REST API, against the real maasd: the self-signed certificate it generates at
//! first start (kept private, reused, its fingerprint logged and equal to what it serves), a
//! configured certificate from a CA, maasctl refusing an unknown certificate (with what to do)
//! and accepting it pinned or trusted, and third-party clients (curl, openssl) trusting it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;
use maas_tests::maasd::{MaasdBuilder, fingerprint, pem_fingerprint};

fn builder(dir: &Path) -> MaasdBuilder {
    Maasd::builder(MAASD, dir)
}

/// The `sha256_fingerprint=` fields maasd logged, in order.
fn logged_fingerprints(m: &Maasd) -> Vec<String> {
    m.log()
        .lines()
        .filter_map(|l| l.split("sha256_fingerprint=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// maasctl against `m`'s URL with only `env` for trust and token (no config file).
fn maasctl(m: &Maasd, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_maasctl"));
    c.env("MAAS_URL", m.base_url())
        .env("MAAS_TOKEN_FILE", m.dir.join("data/admin.token"))
        .env("MAASCTL_CONFIG", m.dir.join("no-such-config.toml"))
        .env_remove("MAAS_TOKEN")
        .env_remove("MAAS_CA_CERT")
        .env_remove("MAAS_TLS_FINGERPRINT")
        .stdin(std::process::Stdio::null())
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl (scripts/test-all.sh installs it)")
}

/// The SHA-256 fingerprint of the certificate the server at `port` presents, as OpenSSL reads
/// it off the wire (a third party, not our code).
fn served_fingerprint(port: u16) -> String {
    let sh = format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername localhost </dev/null 2>/dev/null \
         | openssl x509 -noout -fingerprint -sha256"
    );
    let out = Command::new("sh").args(["-c", &sh]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .split_once('=')
        .map(|(_, fp)| fp.to_string())
        .unwrap_or_else(|| panic!("no fingerprint from openssl: {text:?}"))
}

#[test]
fn https_by_default_with_a_generated_certificate_whose_fingerprint_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    // The runner trusts only data/tls/api-cert.pem: it reaching /health proves HTTPS with it.
    let mut m = builder(dir.path()).start();
    assert!(m.base_url().starts_with("https://"));
    let cert = m.ca_cert();
    let key = m.dir.join("data/tls/api-key.pem");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600, "the private key is private");
    assert_eq!(mode(&m.dir.join("data/tls")), 0o700);
    let on_disk = pem_fingerprint(&cert);
    assert_eq!(
        logged_fingerprints(&m),
        vec![on_disk.clone()],
        "{}",
        m.log()
    );
    assert_eq!(
        served_fingerprint(m.port),
        on_disk,
        "what is served is what was logged"
    );
    // Names: localhost and 127.0.0.1 (and ::1, the host name), as OpenSSL reads them.
    let sans = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    let sans = String::from_utf8_lossy(&sans.stdout);
    for want in [
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "IP Address:0:0:0:0:0:0:0:1",
    ] {
        assert!(sans.contains(want), "{want} in {sans}");
    }

    // curl trusts it with --cacert, by IP and by name; without, it refuses (exit 60).
    let cacert = cert.to_str().unwrap();
    for host in ["127.0.0.1", "localhost"] {
        let o = curl(&[
            "--cacert",
            cacert,
            &format!("https://{host}:{}/api/v1/health", m.port),
        ]);
        assert!(o.status.success(), "curl {host}: {}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("\"status\""));
    }
    let o = curl(&[&format!("https://127.0.0.1:{}/api/v1/health", m.port)]);
    assert_eq!(o.status.code(), Some(60), "curl must not trust it unasked");
    // Plain HTTP on the HTTPS port gets no API answer.
    let o = curl(&[&format!("http://127.0.0.1:{}/api/v1/health", m.port)]);
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("\"status\""),
        "plain HTTP answered"
    );

    // A restart reuses the certificate: pinned clients keep working.
    m.restart();
    assert_eq!(
        logged_fingerprints(&m),
        vec![on_disk.clone(), on_disk.clone()]
    );
    assert_eq!(served_fingerprint(m.port), on_disk);
    assert!(m.log().contains("new=false"), "{}", m.log());
}

#[test]
fn maasctl_refuses_an_unknown_certificate_and_accepts_it_pinned_or_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let m = builder(dir.path()).start();
    let fp = pem_fingerprint(&m.ca_cert());

    // Not trusted: refused, with the fingerprint seen and the flags that would trust it.
    let o = maasctl(&m, &[], &["health"]);
    let err = stderr(&o);
    assert!(!o.status.success(), "an unknown certificate was accepted");
    assert!(err.contains(&fp), "shows the fingerprint it saw: {err}");
    assert!(
        err.contains(&format!("--fingerprint {fp}")) && err.contains("--ca-cert"),
        "says what to do: {err}"
    );

    // Pinned (as logged, or lower case without colons; flag or environment): accepted.
    let bare = fp.replace(':', "").to_lowercase();
    for env in [
        vec![],
        vec![("MAAS_TLS_FINGERPRINT", fp.as_str())],
        vec![("MAAS_TLS_FINGERPRINT", bare.as_str())],
    ] {
        let args: Vec<&str> = if env.is_empty() {
            vec!["--fingerprint", &fp, "health"]
        } else {
            vec!["health"]
        };
        let o = maasctl(&m, &env, &args);
        assert!(o.status.success(), "{env:?}: {}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("ok"));
    }
    // The certificate trusted as a CA file (flag or environment): accepted.
    let ca = m.ca_cert();
    let ca = ca.to_str().unwrap();
    let o = maasctl(&m, &[], &["--ca-cert", ca, "volume", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = maasctl(&m, &[("MAAS_CA_CERT", ca)], &["health"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Another pin, or another certificate as CA: refused.
    let wrong = fingerprint(b"not the server's certificate");
    let o = maasctl(&m, &[], &["--fingerprint", &wrong, "health"]);
    let err = stderr(&o);
    assert!(!o.status.success(), "a mismatched pin was accepted");
    assert!(err.contains(&fp) && err.contains("pinned"), "{err}");
    let other = dir.path().join("other.pem");
    let (other_pem, _) = maas_manager::tls::generate("127.0.0.1:1").unwrap();
    std::fs::write(&other, other_pem).unwrap();
    let o = maasctl(&m, &[], &["--ca-cert", other.to_str().unwrap(), "health"]);
    assert!(!o.status.success(), "another certificate was trusted");
    assert!(stderr(&o).contains(&fp), "{}", stderr(&o));
    // Trust settings on a plain http:// URL are refused, never silently ignored.
    let o = maasctl(
        &m,
        &[("MAAS_URL", &format!("http://127.0.0.1:{}", m.port))],
        &["--ca-cert", ca, "health"],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("https://"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn https_with_a_configured_certificate_from_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    // A CA and a server certificate it signs (as an operator's PKI would issue).
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "MaaS test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let (ca_pem, cert_pem, key_pem) = (
        dir.path().join("ca.pem"),
        dir.path().join("api.pem"),
        dir.path().join("api.key"),
    );
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    std::fs::write(&cert_pem, leaf.pem()).unwrap();
    std::fs::write(&key_pem, leaf_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_pem, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The runner trusts only the CA: coming up proves maasd serves the configured chain.
    let m = builder(dir.path())
        .env("MAAS_API_TLS_CERT_FILE", cert_pem.to_str().unwrap())
        .env("MAAS_API_TLS_KEY_FILE", key_pem.to_str().unwrap())
        .trust(&ca_pem)
        .start();
    assert!(!m.dir.join("data/tls").exists(), "nothing generated");
    let leaf_fp = fingerprint(leaf.der());
    assert_eq!(logged_fingerprints(&m), vec![leaf_fp.clone()]);
    assert_eq!(served_fingerprint(m.port), leaf_fp);
    let o = curl(&[
        "--cacert",
        ca_pem.to_str().unwrap(),
        &format!("https://localhost:{}/api/v1/health", m.port),
    ]);
    assert!(o.status.success(), "curl: {}", stderr(&o));
    let o = maasctl(&m, &[], &["--ca-cert", ca_pem.to_str().unwrap(), "health"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Unknown to maasctl without the CA: refused with the leaf's fingerprint.
    let o = maasctl(&m, &[], &["health"]);
    assert!(
        !o.status.success() && stderr(&o).contains(&leaf_fp),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_bad_certificate_setting_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let r = builder(dir.path())
        .env("MAAS_API_TLS_CERT_FILE", missing.to_str().unwrap())
        .env("MAAS_API_TLS_KEY_FILE", missing.to_str().unwrap())
        .try_start(&[]);
    let refused = r.expect_err("started without its certificate");
    assert!(!refused.status.success());
    assert!(refused.log.contains("missing.pem"), "{}", refused.log);
    // Only one of the two: refused as a configuration error, naming the setting.
    let r = builder(dir.path())
        .env("MAAS_API_TLS_CERT_FILE", missing.to_str().unwrap())
        .try_start(&[]);
    let refused = r.expect_err("started with half a TLS setting");
    assert!(refused.log.contains("api.tls_cert_file"), "{}", refused.log);
}

#[test]
fn plain_http_on_loopback_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let m = builder(dir.path()).plain_http().start();
    assert!(m.base_url().starts_with("http://"));
    assert_eq!(m.ok("GET", "/health", None)["status"], "ok");
    assert!(
        !m.dir.join("data/tls").exists(),
        "no certificate made for plain HTTP"
    );
    // Loopback: no warning (the beyond-loopback warning is unit-tested in maas_manager::tls;
    // tests never listen beyond loopback).
    assert!(!m.log().contains("WITHOUT TLS"), "{}", m.log());
    assert!(m.log().contains("plain HTTP"), "{}", m.log());
    let o = maasctl(&m, &[], &["health"]);
    assert!(o.status.success(), "{}", stderr(&o));
}
