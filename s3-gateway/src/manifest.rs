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
    /// "none": objects are stored as the pool stores them.
    pub encryption: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layout {
    pub packs: String,
    pub snapshots: String,
}

impl BucketManifest {
    pub fn new(pool: &str, created_at: String) -> Self {
        BucketManifest {
            format: BUCKET_FORMAT.into(),
            version: FORMAT_VERSION,
            created_at,
            created_by_pool: pool.into(),
            layout: Layout {
                packs: "packs/<first 2 hex digits>/<BLAKE3 of the pack, 64 hex digits>".into(),
                snapshots: "snapshots/<snapshot id>.json".into(),
            },
            encryption: "none".into(),
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
        if m.encryption != "none" {
            return Err(ArchiveError::Unsupported {
                what: BUCKET_MANIFEST.into(),
                detail: format!("encryption {:?}", m.encryption),
            });
        }
        Ok(m)
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
        let m = BucketManifest::new("pool", "2026-12-07T00:00:00Z".into());
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
    }
}
