//! `<prefix>keys/<pool uuid>.json`: the digest keys of each pool that pushed to the prefix,
//! so that a fresh installation re-importing the bucket can check every object against its
//! digest (and then re-key it for its own pool). The keys are not the pool's secret: they let
//! their holder check, and confirm the content of, objects that pool wrote — which the bucket
//! holds in the clear anyway (targets without encryption). With client-side encryption the
//! document is sealed with the target's key like everything else (see crate::crypt).

use serde::{Deserialize, Serialize};

use maas_pool::import::DigestKeys;

use crate::bucket::Bucket;
use crate::crypt::{Sealed, open_document, seal_document};
use crate::error::{ArchiveError, Result};

pub const KEYS_FORMAT: &str = "maas-digest-keys";

#[derive(Debug, Serialize, Deserialize)]
struct KeysDoc {
    format: String,
    version: u32,
    pool: String,
    chunk_key: String,
    node_key: String,
}

pub fn key_name(pool: &str) -> String {
    format!("keys/{pool}.json")
}

/// Writes the pool's keys unless the bucket holds them already.
pub async fn ensure_keys(bucket: &Bucket, pool: &str, keys: &DigestKeys) -> Result<()> {
    let name = key_name(pool);
    if bucket.head(&name).await?.is_some() {
        return Ok(());
    }
    let doc = KeysDoc {
        format: KEYS_FORMAT.into(),
        version: 1,
        pool: pool.into(),
        chunk_key: hex::encode(keys.chunk),
        node_key: hex::encode(keys.node),
    };
    let body = serde_json::to_vec_pretty(&doc)
        .map_err(|e| ArchiveError::Internal(format!("keys document: {e}")))?;
    let body = seal_document(bucket.cipher(), Sealed::DigestKeys(pool), body);
    bucket.put(&name, body.into()).await
}

/// The keys of the pool that wrote objects to the bucket.
pub async fn read_keys(bucket: &Bucket, pool: &str) -> Result<DigestKeys> {
    let name = key_name(pool);
    let body = bucket
        .get(&name)
        .await?
        .ok_or_else(|| ArchiveError::Missing {
            key: bucket.key(&name),
        })?;
    let body = open_document(
        bucket.cipher(),
        Sealed::DigestKeys(pool),
        &body,
        &bucket.key(&name),
    )?;
    let damaged = |detail: String| ArchiveError::Damaged {
        key: bucket.key(&name),
        detail,
    };
    let doc: KeysDoc = serde_json::from_slice(&body).map_err(|e| damaged(e.to_string()))?;
    if doc.format != KEYS_FORMAT || doc.version != 1 || doc.pool != pool {
        return Err(ArchiveError::Unsupported {
            what: bucket.key(&name),
            detail: format!(
                "format {:?} version {} pool {}",
                doc.format, doc.version, doc.pool
            ),
        });
    }
    let key = |h: &str| -> Result<[u8; 32]> {
        let mut k = [0u8; 32];
        hex::decode_to_slice(h, &mut k).map_err(|e| damaged(format!("key: {e}")))?;
        Ok(k)
    };
    Ok(DigestKeys {
        chunk: key(&doc.chunk_key)?,
        node: key(&doc.node_key)?,
    })
}

/// The digest keys of the pool that wrote `manifest`'s snapshot, when it is not `pool` (None:
/// `pool` wrote it and checks it with its own keys).
pub async fn writer_keys(
    bucket: &Bucket,
    pool: &maas_pool::Pool,
    manifest: &crate::manifest::SnapshotManifest,
) -> Result<Option<DigestKeys>> {
    if manifest.pool == pool.pool_id().to_string() {
        return Ok(None);
    }
    Ok(Some(read_keys(bucket, &manifest.pool).await?))
}
