//! The small JSON documents that make a bucket self-describing:
//!
//! - `<prefix>maas-archive.json`: what this prefix holds (format, version, layout). Written
//!   when the first target is created on the prefix; a target whose prefix holds something
//!   else, or a newer format, is refused.
//! - `<prefix>snapshots/<snapshot id>.json`: one per archived snapshot, written last, once
//!   every object it references is in the bucket — a snapshot is visible in the bucket only
//!   when it is whole. It names the snapshot's root index node and the packs holding its
//!   objects.
//!
//! How to read a snapshot out of a bucket without MaaS: read its manifest; read the trailer
//! (last 32 bytes) and index of each pack it lists (see [`crate::pack`]) to learn where each
//! object is; the root node (the manifest's `root`) lists the leaf nodes' digests, each leaf
//! lists 4096 chunk digests (or none for an all-zero chunk) for consecutive chunks of
//! `chunk_size` bytes; each object is in maas-pool's object format (object.rs: a 64-byte
//! header, then zstd or raw frames); nodes in index.rs's node format. Concatenating the
//! chunks (zeros for absent ones) up to `size` gives the image.
//!
//! An encrypted prefix (`encryption: "xchacha20-poly1305"` in maas-archive.json) needs the
//! archive key (the recovery key's first 64 hex digits): derive the subkeys with BLAKE3
//! `derive_key` ("maas archive 2026-12 object encryption" for objects, "... document
//! encryption" for the rest); each sealed thing is `24-byte nonce || XChaCha20-Poly1305
//! ciphertext and tag` with associated data naming it (see crate::crypt): snapshot manifests
//! and digest keys are JSON envelopes (`format: "maas-sealed"`, `sealed`: hex), a pack's
//! index is sealed whole, each object in a pack alone.

use serde::{Deserialize, Serialize};

use crate::error::{ArchiveError, Result};

pub const BUCKET_MANIFEST: &str = "maas-archive.json";
pub const BUCKET_FORMAT: &str = "maas-archive";
pub const SNAPSHOT_FORMAT: &str = "maas-snapshot";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BucketManifest {
    pub format: String,
    pub version: u32,
    pub created_at: String,
    /// The pool (UUID) that created the prefix; others may write to it too.
    pub created_by_pool: String,
    pub layout: Layout,
    /// "none": objects are stored as the pool stores them; "xchacha20-poly1305": every
    /// object, pack index and document is sealed with the archive key named by `key_id`
    /// (see crate::crypt). A prefix is one or the other, never both.
    pub encryption: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layout {
    pub packs: String,
    pub snapshots: String,
}

impl BucketManifest {
    /// The manifest of a new prefix; `key_id` when its objects are encrypted.
    pub fn new(pool: &str, created_at: String, key_id: Option<String>) -> Self {
        BucketManifest {
            format: BUCKET_FORMAT.into(),
            version: FORMAT_VERSION,
            created_at,
            created_by_pool: pool.into(),
            layout: Layout {
                packs: "packs/<first 2 hex digits>/<BLAKE3 of the pack, 64 hex digits>".into(),
                snapshots: "snapshots/<snapshot id>.json".into(),
            },
            encryption: if key_id.is_some() {
                crate::crypt::ALGORITHM.into()
            } else {
                "none".into()
            },
            key_id,
        }
    }

    /// Parses a manifest found in the bucket, refusing other formats and newer versions.
    pub fn parse(b: &[u8]) -> Result<Self> {
        let m: BucketManifest =
            serde_json::from_slice(b).map_err(|e| ArchiveError::Unsupported {
                what: BUCKET_MANIFEST.into(),
                detail: format!("not a MaaS archive manifest: {e}"),
            })?;
        if m.format != BUCKET_FORMAT {
            return Err(ArchiveError::Unsupported {
                what: BUCKET_MANIFEST.into(),
                detail: format!("format {:?}", m.format),
            });
        }
        if m.version != FORMAT_VERSION {
            return Err(ArchiveError::Unsupported {
                what: BUCKET_MANIFEST.into(),
                detail: format!("version {} (this build reads {FORMAT_VERSION})", m.version),
            });
        }
        let known = match m.encryption.as_str() {
            "none" => m.key_id.is_none(),
            crate::crypt::ALGORITHM => m.key_id.is_some(),
            _ => false,
        };
        if !known {
            return Err(ArchiveError::Unsupported {
                what: BUCKET_MANIFEST.into(),
                detail: format!("encryption {:?}", m.encryption),
            });
        }
        Ok(m)
    }

    /// Whether a target with `cipher` (or none) may use the prefix this manifest describes:
    /// the same key, or no encryption on either side.
    pub fn admits(&self, cipher: Option<&crate::crypt::Cipher>) -> Result<()> {
        match (&self.key_id, cipher) {
            (None, None) => Ok(()),
            (Some(id), Some(c)) if id == c.key_id() => Ok(()),
            (Some(id), Some(c)) => Err(ArchiveError::KeyMismatch {
                detail: format!(
                    "the prefix is encrypted with key {id}; the recovery key given is key {}",
                    c.key_id()
                ),
            }),
            (Some(id), None) => Err(ArchiveError::KeyRequired {
                detail: format!(
                    "the prefix is encrypted (key {id}): give its recovery key (\"recovery_key\") to use it"
                ),
            }),
            (None, Some(_)) => Err(ArchiveError::EncryptionMismatch {
                detail: "the prefix holds an unencrypted MaaS archive: an encrypted target needs a prefix of its own (a bucket holds only ciphertext or none)".into(),
            }),
        }
    }
}

/// What a snapshot is, as the caller (the manager) describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub id: String,
    pub volume: String,
    pub volume_name: String,
    pub size: u64,
    pub block_size: u32,
    pub created_at: String,
    pub locked_until: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotManifest {
    pub format: String,
    pub version: u32,
    #[serde(flatten)]
    pub meta: SnapshotMeta,
    pub chunk_size: u64,
    /// The pool (UUID) whose digest key named the objects.
    pub pool: String,
    /// Digest of the root index node (hex); null for an all-zero image.
    pub root: Option<String>,
    /// Blocks already lost when the snapshot was sealed: they read as errors.
    #[serde(default)]
    pub damaged_blocks: Vec<u64>,
    pub objects: u64,
    /// Bytes of the snapshot's objects as stored (compressed).
    pub stored_bytes: u64,
    /// The packs holding the snapshot's objects.
    pub packs: Vec<String>,
    pub archived_at: String,
}

impl SnapshotManifest {
    pub fn key(id: &str) -> String {
        format!("snapshots/{id}.json")
    }

    /// The snapshot id in a manifest's object name (`snapshots/<id>.json`).
    pub fn id_of_key(key: &str) -> Option<&str> {
        key.strip_prefix("snapshots/")?.strip_suffix(".json")
    }

    /// Snapshot `id`'s manifest from the bucket: opened (an encrypted target's), parsed.
    pub async fn fetch(bucket: &crate::Bucket, id: &str) -> Result<SnapshotManifest> {
        let key = bucket.key(&Self::key(id));
        let body = bucket
            .get(&Self::key(id))
            .await?
            .ok_or_else(|| ArchiveError::Missing { key: key.clone() })?;
        let body = crate::crypt::open_document(
            bucket.cipher(),
            crate::crypt::Sealed::SnapshotManifest(id),
            &body,
            &key,
        )?;
        Self::parse(&body, &key)
    }

    /// Writes the manifest (sealed for an encrypted target), replacing an earlier one.
    pub async fn store(&self, bucket: &crate::Bucket) -> Result<()> {
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| ArchiveError::Internal(format!("manifest: {e}")))?;
        let body = crate::crypt::seal_document(
            bucket.cipher(),
            crate::crypt::Sealed::SnapshotManifest(&self.meta.id),
            body,
        );
        bucket.put(&Self::key(&self.meta.id), body.into()).await
    }

    pub fn parse(b: &[u8], key: &str) -> Result<Self> {
        let m: SnapshotManifest = serde_json::from_slice(b).map_err(|e| ArchiveError::Damaged {
            key: key.into(),
            detail: format!("not a snapshot manifest: {e}"),
        })?;
        if m.format != SNAPSHOT_FORMAT || m.version != FORMAT_VERSION {
            return Err(ArchiveError::Unsupported {
                what: key.into(),
                detail: format!("format {:?} version {}", m.format, m.version),
            });
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_manifests_of_other_formats_or_versions_are_refused() {
        let m = BucketManifest::new("pool", "2026-12-07T00:00:00Z".into(), None);
        let b = serde_json::to_vec(&m).unwrap();
        assert_eq!(BucketManifest::parse(&b).unwrap(), m);
        let mut n = m.clone();
        n.version = 2;
        assert!(BucketManifest::parse(&serde_json::to_vec(&n).unwrap()).is_err());
        let mut n = m.clone();
        n.format = "restic".into();
        assert!(BucketManifest::parse(&serde_json::to_vec(&n).unwrap()).is_err());
        assert!(BucketManifest::parse(b"{}").is_err());
        assert!(BucketManifest::parse(b"\xff").is_err());
        let mut n = m.clone();
        n.encryption = "rot13".into();
        assert!(BucketManifest::parse(&serde_json::to_vec(&n).unwrap()).is_err());
        // Encrypted without naming its key: refused.
        n.encryption = crate::crypt::ALGORITHM.into();
        assert!(BucketManifest::parse(&serde_json::to_vec(&n).unwrap()).is_err());
    }

    #[test]
    fn a_prefix_admits_only_its_own_key() {
        use crate::crypt::{ArchiveKey, Cipher};
        let k = ArchiveKey::generate();
        let c = Cipher::new(&k);
        let plain = BucketManifest::new("pool", "t".into(), None);
        let sealed = BucketManifest::new("pool", "t".into(), Some(k.key_id()));
        let sealed = BucketManifest::parse(&serde_json::to_vec(&sealed).unwrap()).unwrap();
        assert!(plain.admits(None).is_ok());
        assert!(sealed.admits(Some(&c)).is_ok());
        let code = |r: Result<()>| r.unwrap_err().code();
        assert_eq!(code(sealed.admits(None)), "ARCHIVE_KEY_REQUIRED");
        let other = Cipher::new(&ArchiveKey::generate());
        assert_eq!(code(sealed.admits(Some(&other))), "ARCHIVE_KEY_MISMATCH");
        assert_eq!(code(plain.admits(Some(&c))), "ARCHIVE_ENCRYPTION_MISMATCH");
    }
}
