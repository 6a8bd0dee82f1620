//! Checking a target before it is stored: the endpoint answers, the credentials are good,
//! the bucket exists, accepts writes and deletes, holds nothing but a MaaS archive under the
//! prefix, and has object lock when a lock is asked for. Each failure is an [`ArchiveError`]
//! naming what to fix.

use crate::bucket::Bucket;
use crate::error::{ArchiveError, Result};
use crate::manifest::{BUCKET_MANIFEST, BucketManifest};

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetCheck {
    /// The prefix already held a MaaS archive (an import can find snapshots there).
    pub existing_archive: bool,
    /// Object lock asked for and enabled on the bucket.
    pub object_lock: bool,
}

/// Before a push relies on the pool's records of what the target holds: the prefix's
/// manifest is still there. Gone while the pool records packs, the prefix was deleted or
/// emptied behind MaaS's back (`ARCHIVE_PREFIX_LOST`): a push would publish snapshots naming
/// packs that no longer exist. Gone while nothing is recorded, it is written again.
pub async fn ensure_prefix(bucket: &Bucket, pool: &maas_pool::Pool, target: &str) -> Result<()> {
    let found = bucket.get(BUCKET_MANIFEST).await?;
    if found.is_none() {
        // A 404 does not always say whether the object or the bucket is missing.
        bucket.head_bucket().await?;
    }
    match found {
        // Still a MaaS archive, and still one this target may write (plain, or its key).
        Some(b) => BucketManifest::parse(&b)?.admits(bucket.cipher()),
        None if pool.archive_packs(target)?.is_empty() => {
            write_manifest(bucket, &pool.pool_id().to_string()).await
        }
        None => Err(ArchiveError::PrefixLost {
            key: bucket.key(BUCKET_MANIFEST),
        }),
    }
}

/// Makes the prefix a MaaS archive (plain, or sealed with the target's key).
async fn write_manifest(bucket: &Bucket, pool_uuid: &str) -> Result<()> {
    let m = BucketManifest::new(
        pool_uuid,
        crate::now_rfc3339(),
        bucket.cipher().map(|c| c.key_id().to_string()),
    );
    let body = serde_json::to_vec_pretty(&m)
        .map_err(|e| ArchiveError::Internal(format!("bucket manifest: {e}")))?;
    bucket.put(BUCKET_MANIFEST, body.into()).await
}

pub async fn check(
    bucket: &Bucket,
    pool_uuid: &str,
    want_object_lock: bool,
) -> Result<TargetCheck> {
    bucket.head_bucket().await?;
    let object_lock = want_object_lock && bucket.object_lock_enabled().await?;
    if want_object_lock && !object_lock {
        return Err(ArchiveError::ObjectLockUnavailable {
            bucket: bucket.config().bucket.clone(),
        });
    }
    let existing_archive = match bucket.get(BUCKET_MANIFEST).await? {
        Some(b) => {
            BucketManifest::parse(&b)?.admits(bucket.cipher())?;
            true
        }
        None => {
            write_manifest(bucket, pool_uuid).await?;
            false
        }
    };
    // Deletes are needed to reclaim space; find out now, not at the first cleanup.
    let probe = format!("probe/{:016x}", rand::random::<u64>());
    bucket
        .put(&probe, bytes::Bytes::from_static(b"maas write probe"))
        .await?;
    bucket.delete(&probe).await?;
    Ok(TargetCheck {
        existing_archive,
        object_lock,
    })
}
