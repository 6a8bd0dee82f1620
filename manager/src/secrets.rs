//! Secrets at rest in the catalog. CHAP secrets are sealed with XChaCha20-Poly1305 under a
//! key kept outside the catalog (`catalog.secret_key_file`, by default `DATA_DIR/catalog.key`,
//! mode 0600), so a copy of the catalog (a dump, a backup of the database, a replica) does not
//! give away the secrets that guard the exports.
//!
//! The exports table's `chap` column holds JSON: the user names in clear (they are shown by the
//! API and are not secret) and the secrets sealed,
//! `{"user": "...", "mutual_user": "...", "sealed": "maas-sealed:v1:<key id>:<hex>"}`. The
//! sealed blob is bound to its export and user names (associated data), so it cannot be moved
//! to another export or user. Rows written before encryption (`{"user", "secret", ...}` in
//! clear) still load, and are sealed at start ([`seal_legacy_rows`]).
//!
//! A row that does not open (another key, damage, bad JSON) never falls back to "no CHAP": its
//! export stays down and says why ([`crate::engine::Engine::restore`]).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use maas_api as api;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// File name of the key in the data directory when `catalog.secret_key_file` is empty.
pub const KEY_FILE: &str = "catalog.key";
/// First part of a key file: its format and version.
const KEY_MAGIC: &str = "maas-catalog-key:v1:";
/// First part of a sealed value.
const SEALED_MAGIC: &str = "maas-sealed:v1:";
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("catalog key file {path}: {source}")]
    KeyIo {
        path: String,
        source: std::io::Error,
    },
    #[error("catalog key file {path} is not a MaaS catalog key ({detail})")]
    KeyFormat { path: String, detail: String },
    #[error(
        "sealed with another catalog key (key id {found}; this server's key is {ours}): was the key file replaced or lost?"
    )]
    WrongKey { found: String, ours: String },
    #[error("does not decrypt under this server's key: damaged or tampered with")]
    Damaged,
    #[error("unreadable: {0}")]
    Malformed(String),
    #[error("cannot seal: {0}")]
    Seal(String),
}

/// The key that seals catalog secrets. `Debug` shows its id, never the key.
pub struct Vault {
    key: Zeroizing<[u8; 32]>,
    id: String,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("key_id", &self.id)
            .finish_non_exhaustive()
    }
}

fn key_io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::KeyIo {
        path: path.display().to_string(),
        source,
    }
}

impl Vault {
    /// A vault over `key` (tests, tools).
    pub fn from_key(key: [u8; 32]) -> Vault {
        let digest = blake3::derive_key("maas catalog key id v1", &key);
        Vault {
            id: hex::encode(&digest[..8]),
            key: Zeroizing::new(key),
        }
    }

    /// The key's public id (a hash of it), written next to every sealed value.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Loads the key from `path`, or creates it (random, mode 0600) if there is none. An
    /// existing file more open than 0600 is tightened (and logged); one that does not hold a
    /// key is an error (never replaced: sealed secrets would be lost with it).
    pub fn load_or_create(path: &Path) -> Result<Vault, SecretError> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Vault::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vault::create(path),
            Err(e) => Err(key_io(path)(e)),
        }
    }

    fn load(path: &Path) -> Result<Vault, SecretError> {
        maas_pool::fsmode::restrict_path(path, maas_pool::fsmode::PRIVATE_FILE)
            .map_err(key_io(path))?;
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(key_io(path))?);
        let bad = |detail: &str| SecretError::KeyFormat {
            path: path.display().to_string(),
            detail: detail.into(),
        };
        let hex_key = text
            .trim()
            .strip_prefix(KEY_MAGIC)
            .ok_or_else(|| bad("it does not start with maas-catalog-key:v1:"))?;
        let mut key = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_key, &mut key[..]).map_err(|_| bad("not 64 hex digits"))?;
        Ok(Vault::from_key(*key))
    }

    fn create(path: &Path) -> Result<Vault, SecretError> {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::Rng::fill(&mut rand::thread_rng(), &mut key[..]);
        let text = Zeroizing::new(format!("{KEY_MAGIC}{}\n", hex::encode(&key[..])));
        // Written whole to a temporary file, then linked in place: the key file appears
        // complete or not at all, and an existing one is never overwritten.
        let tmp = tmp_path(path);
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(maas_pool::fsmode::PRIVATE_FILE)
            .open(&tmp)
            .map_err(key_io(&tmp))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(key_io(&tmp))?;
        drop(f);
        let linked = std::fs::hard_link(&tmp, path).map_err(key_io(path));
        let _ = std::fs::remove_file(&tmp);
        linked?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(key_io(dir))?;
        }
        let v = Vault::from_key(*key);
        tracing::info!(path = %path.display(), key_id = %v.id, "catalog key created (mode 0600): keep it with backups of the catalog, the CHAP secrets cannot be read without it");
        Ok(v)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(&self.key[..]))
    }

    /// Seals `plain` under a random nonce, bound to `context` (what the value is and whose).
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Result<String, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::Rng::fill(&mut rand::thread_rng(), &mut nonce[..]);
        let ct = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: context,
                },
            )
            .map_err(|_| SecretError::Seal("encryption failed".into()))?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        Ok(format!("{SEALED_MAGIC}{}:{}", self.id, hex::encode(blob)))
    }

    /// Opens a value sealed by [`Vault::seal`] with the same `context`.
    pub fn open(&self, context: &[u8], sealed: &str) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        let rest = sealed
            .strip_prefix(SEALED_MAGIC)
            .ok_or_else(|| SecretError::Malformed("not a sealed value".into()))?;
        let (id, hex_blob) = rest
            .split_once(':')
            .ok_or_else(|| SecretError::Malformed("no key id".into()))?;
        if id != self.id {
            return Err(SecretError::WrongKey {
                found: id.chars().take(32).collect(),
                ours: self.id.clone(),
            });
        }
        let blob = hex::decode(hex_blob)
            .map_err(|_| SecretError::Malformed("sealed value is not hex".into()))?;
        if blob.len() < NONCE_LEN + 16 {
            return Err(SecretError::Malformed("sealed value is too short".into()));
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        self.cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: context,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SecretError::Damaged)
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".tmp");
    PathBuf::from(p)
}

/// The `chap` column as stored: user names in clear, secrets sealed (or, in rows from before
/// encryption, in clear).
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredChap {
    user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mutual_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
    /// Legacy rows only.
    #[serde(default, skip_serializing)]
    secret: Option<String>,
    /// Legacy rows only.
    #[serde(default, skip_serializing)]
    mutual_secret: Option<String>,
}

/// What is sealed: the secrets.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedChap {
    secret: String,
    #[serde(default)]
    mutual_secret: Option<String>,
}

/// Associated data of an export's CHAP secrets: the export and both user names.
fn chap_context(export_id: &str, user: &str, mutual_user: Option<&str>) -> Vec<u8> {
    let mut c = b"maas exports.chap v1\0".to_vec();
    for part in [export_id, user, mutual_user.unwrap_or("")] {
        c.extend_from_slice(&(part.len() as u64).to_le_bytes());
        c.extend_from_slice(part.as_bytes());
    }
    c
}

/// The `chap` column for `chap` on export `export_id`: secrets sealed.
pub fn seal_chap(vault: &Vault, export_id: &str, chap: &api::Chap) -> Result<String, SecretError> {
    let inner = Zeroizing::new(
        serde_json::to_vec(&SealedChap {
            secret: chap.secret.clone(),
            mutual_secret: chap.mutual_secret.clone(),
        })
        .map_err(|e| SecretError::Seal(e.to_string()))?,
    );
    let ctx = chap_context(export_id, &chap.user, chap.mutual_user.as_deref());
    let stored = StoredChap {
        user: chap.user.clone(),
        mutual_user: chap.mutual_user.clone(),
        sealed: Some(vault.seal(&ctx, &inner)?),
        ..Default::default()
    };
    serde_json::to_string(&stored).map_err(|e| SecretError::Seal(e.to_string()))
}

/// An opened `chap` column.
#[derive(Debug)]
pub struct OpenedChap {
    pub chap: api::Chap,
    /// The row held its secrets in clear (written before encryption): reseal it.
    pub legacy: bool,
}

/// Opens the `chap` column of export `export_id`. Any doubt is an error: the caller must not
/// serve the export without CHAP.
pub fn open_chap(vault: &Vault, export_id: &str, column: &str) -> Result<OpenedChap, SecretError> {
    let stored: StoredChap = serde_json::from_str(column)
        .map_err(|e| SecretError::Malformed(format!("CHAP column is not valid: {e}")))?;
    let (secret, mutual_secret, legacy) = match (stored.sealed, stored.secret) {
        (Some(sealed), None) if stored.mutual_secret.is_none() => {
            let ctx = chap_context(export_id, &stored.user, stored.mutual_user.as_deref());
            let plain = vault.open(&ctx, &sealed)?;
            let inner: SealedChap = serde_json::from_slice(&plain)
                .map_err(|e| SecretError::Malformed(format!("sealed CHAP secrets: {e}")))?;
            (inner.secret, inner.mutual_secret, false)
        }
        (None, Some(secret)) => (secret, stored.mutual_secret, true),
        _ => {
            return Err(SecretError::Malformed(
                "CHAP column holds neither sealed nor legacy secrets".into(),
            ));
        }
    };
    if stored.user.is_empty() || secret.is_empty() {
        return Err(SecretError::Malformed("empty CHAP user or secret".into()));
    }
    if stored.mutual_user.is_some() != mutual_secret.is_some()
        || mutual_secret.as_deref() == Some("")
    {
        return Err(SecretError::Malformed(
            "mutual CHAP user without secret, or secret without user".into(),
        ));
    }
    Ok(OpenedChap {
        chap: api::Chap {
            user: stored.user,
            secret,
            mutual_user: stored.mutual_user,
            mutual_secret,
        },
        legacy,
    })
}

/// The secret column of an `nvme-tcp` export: the negotiation settings in clear (the API shows
/// them), the DH-HMAC-CHAP secrets sealed.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredDhChap {
    dhchap: api::DhChapInfo,
    sealed: String,
}

/// What is sealed of DH-HMAC-CHAP: the secrets.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedDhChap {
    host_secret: String,
    #[serde(default)]
    ctrl_secret: Option<String>,
}

fn dhchap_context(export_id: &str, info: &api::DhChapInfo) -> Vec<u8> {
    let mut c = b"maas exports.dhchap v1\0".to_vec();
    let parts = [
        export_id,
        info.hash.as_deref().unwrap_or(""),
        info.dhgroup.as_deref().unwrap_or(""),
        if info.ctrl_secret { "ctrl" } else { "" },
    ];
    for part in parts {
        c.extend_from_slice(&(part.len() as u64).to_le_bytes());
        c.extend_from_slice(part.as_bytes());
    }
    c
}

/// The secret column for DH-HMAC-CHAP settings `d` on export `export_id`: secrets sealed.
pub fn seal_dhchap(vault: &Vault, export_id: &str, d: &api::DhChap) -> Result<String, SecretError> {
    let info = api::DhChapInfo {
        ctrl_secret: d.ctrl_secret.is_some(),
        hash: d.hash.clone(),
        dhgroup: d.dhgroup.clone(),
    };
    let inner = Zeroizing::new(
        serde_json::to_vec(&SealedDhChap {
            host_secret: d.host_secret.clone(),
            ctrl_secret: d.ctrl_secret.clone(),
        })
        .map_err(|e| SecretError::Seal(e.to_string()))?,
    );
    let sealed = vault.seal(&dhchap_context(export_id, &info), &inner)?;
    serde_json::to_string(&StoredDhChap {
        dhchap: info,
        sealed,
    })
    .map_err(|e| SecretError::Seal(e.to_string()))
}

/// Opens the DH-HMAC-CHAP column of export `export_id`. Any doubt is an error: the caller must
/// not serve the export without authentication.
pub fn open_dhchap(
    vault: &Vault,
    export_id: &str,
    column: &str,
) -> Result<api::DhChap, SecretError> {
    let stored: StoredDhChap = serde_json::from_str(column)
        .map_err(|e| SecretError::Malformed(format!("DH-HMAC-CHAP column is not valid: {e}")))?;
    let plain = vault.open(&dhchap_context(export_id, &stored.dhchap), &stored.sealed)?;
    let inner: SealedDhChap = serde_json::from_slice(&plain)
        .map_err(|e| SecretError::Malformed(format!("sealed DH-HMAC-CHAP secrets: {e}")))?;
    if inner.host_secret.is_empty() || inner.ctrl_secret.is_some() != stored.dhchap.ctrl_secret {
        return Err(SecretError::Malformed(
            "DH-HMAC-CHAP secrets do not match their settings".into(),
        ));
    }
    Ok(api::DhChap {
        host_secret: inner.host_secret,
        ctrl_secret: inner.ctrl_secret,
        hash: stored.dhchap.hash,
        dhgroup: stored.dhchap.dhgroup,
    })
}

/// The DH-HMAC-CHAP settings of a secret column, without opening the secrets (for the API).
pub fn dhchap_info(column: &str) -> Option<api::DhChapInfo> {
    serde_json::from_str::<StoredDhChap>(column)
        .ok()
        .map(|s| s.dhchap)
}

/// User names of a `chap` column, without opening the secrets (for the API's `ChapInfo`).
pub fn chap_users(column: &str) -> Option<api::ChapInfo> {
    let stored: StoredChap = serde_json::from_str(column).ok()?;
    Some(api::ChapInfo {
        user: stored.user,
        mutual_user: stored.mutual_user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dhchap_secrets_are_sealed_bound_to_their_export_and_settings() {
        let vault = Vault::from_key([7u8; 32]);
        let d = api::DhChap {
            host_secret: "DHHC-1:00:aGVsbG8gd29ybGQgc2VjcmV0IGtleSAzMmJ5dGVzIQ==:".into(),
            ctrl_secret: Some("DHHC-1:00:Y29udHJvbGxlciBzZWNyZXQga2V5IDMyIGJ5dGVzIQ==:".into()),
            hash: Some("sha384".into()),
            dhgroup: None,
        };
        let col = seal_dhchap(&vault, "exp-1", &d).unwrap();
        assert!(
            !col.contains("aGVsbG8") && !col.contains("Y29udHJvbGxlcn"),
            "{col}"
        );
        assert_eq!(open_dhchap(&vault, "exp-1", &col).unwrap(), d);
        assert!(
            open_dhchap(&vault, "exp-2", &col).is_err(),
            "bound to its export"
        );
        let edited = col.replace("sha384", "sha256");
        assert!(
            open_dhchap(&vault, "exp-1", &edited).is_err(),
            "bound to its settings"
        );
        assert!(open_dhchap(&Vault::from_key([8u8; 32]), "exp-1", &col).is_err());
        assert!(open_dhchap(&vault, "exp-1", "{\"host_secret\":\"x\"}").is_err());
        assert_eq!(dhchap_info(&col).unwrap().hash.as_deref(), Some("sha384"));
    }

    fn chap(mutual: bool) -> api::Chap {
        api::Chap {
            user: "backup".into(),
            secret: "one-way-s3cret".into(),
            mutual_user: mutual.then(|| "maas".into()),
            mutual_secret: mutual.then(|| "mutual-s3cret".into()),
        }
    }

    #[test]
    fn sealed_chap_opens_only_for_its_export_and_key() {
        let v = Vault::from_key([7; 32]);
        for mutual in [false, true] {
            let col = seal_chap(&v, "exp-1", &chap(mutual)).unwrap();
            assert!(!col.contains("s3cret"), "{col}");
            assert!(col.contains(v.id()), "{col}");
            let o = open_chap(&v, "exp-1", &col).unwrap();
            assert_eq!(o.chap, chap(mutual));
            assert!(!o.legacy);
            assert_eq!(chap_users(&col).unwrap().user, "backup");
            // Moved to another export: refused.
            assert!(matches!(
                open_chap(&v, "exp-2", &col),
                Err(SecretError::Damaged)
            ));
            // Another key: refused, and said so.
            let other = Vault::from_key([8; 32]);
            assert!(matches!(
                open_chap(&other, "exp-1", &col),
                Err(SecretError::WrongKey { .. })
            ));
            // A user name changed in clear: refused (it is bound to the secrets).
            let renamed = col.replace("\"backup\"", "\"intruder\"");
            assert!(matches!(
                open_chap(&v, "exp-1", &renamed),
                Err(SecretError::Damaged)
            ));
            // Mutual dropped in clear: refused.
            if mutual {
                let v2 = col.replace(",\"mutual_user\":\"maas\"", "");
                assert_ne!(v2, col);
                assert!(open_chap(&v, "exp-1", &v2).is_err());
            }
        }
    }

    #[test]
    fn damaged_or_malformed_columns_never_open() {
        let v = Vault::from_key([7; 32]);
        let col = seal_chap(&v, "exp-1", &chap(true)).unwrap();
        // One hex digit of the ciphertext changed.
        let pos = col.rfind('"').unwrap() - 3;
        let mut bytes = col.clone().into_bytes();
        bytes[pos] = if bytes[pos] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(bytes).unwrap();
        assert!(matches!(
            open_chap(&v, "exp-1", &flipped),
            Err(SecretError::Damaged)
        ));
        for bad in [
            "",
            "not json",
            "{}",
            r#"{"user":"u"}"#,
            r#"{"user":"u","secret":""}"#,
            r#"{"user":"","secret":"0123456789ab"}"#,
            r#"{"user":"u","secret":"0123456789ab","mutual_user":"m"}"#,
            r#"{"user":"u","secret":"0123456789ab","mutual_secret":"x"}"#,
            r#"{"user":"u","sealed":"maas-sealed:v1:00:zz"}"#,
            r#"{"user":"u","sealed":"garbage"}"#,
            r#"{"user":"u","sealed":"maas-sealed:v1:x","secret":"s"}"#,
            r#"{"user":"u","secret":"0123456789ab","extra":1}"#,
        ] {
            assert!(open_chap(&v, "exp-1", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn legacy_plaintext_rows_open_and_say_so() {
        let v = Vault::from_key([7; 32]);
        let legacy = serde_json::to_string(&chap(true)).unwrap();
        let o = open_chap(&v, "exp-1", &legacy).unwrap();
        assert!(o.legacy);
        assert_eq!(o.chap, chap(true));
    }

    #[test]
    fn key_file_is_created_private_reloaded_and_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(KEY_FILE);
        let v = Vault::load_or_create(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Vault::load_or_create(&p).unwrap();
        assert_eq!(again.id(), v.id());
        let sealed = v.seal(b"ctx", b"hello").unwrap();
        assert_eq!(&again.open(b"ctx", &sealed).unwrap()[..], b"hello");
        assert!(!format!("{v:?}").contains(&hex::encode(&v.key[..])));
        std::fs::write(&p, "garbage").unwrap();
        assert!(matches!(
            Vault::load_or_create(&p),
            Err(SecretError::KeyFormat { .. })
        ));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "garbage");
    }
}
