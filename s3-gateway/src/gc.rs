//! Reclaiming bucket space after archived snapshots are deleted: the objects every remaining
//! snapshot of the target needs are found by walking their indexes (read from the bucket,
//! checked), and every pack none of whose objects is needed is forgotten by the pool, then
//! deleted from the bucket. Chunks the pool still reads from the target (lazily mounted
//! snapshots and their clones) are needed too. A pack only partly needed stays (repacking the mostly dead ones
//! is a later step). The caller keeps pushes to the target out while this runs: a push could
//! otherwise rely on an object in a pack being deleted.

use std::collections::{HashMap, HashSet};

use maas_pool::Pool;
use maas_pool::index::Node;
use maas_pool::types::Digest;

use crate::Archive;
use crate::bucket::Bucket;
use crate::error::{ArchiveError, Result};
use crate::restore::read_manifest;
use crate::verify::{fetch_object_from, parse_digest};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub packs_deleted: u64,
    pub bytes_freed: u64,
    /// Packs kept because some of their objects are still needed.
    pub packs_kept: u64,
    /// Why nothing was reclaimed this time: a remaining copy could not be read, so what it
    /// needs is unknown and every pack stays until a later reclamation can read it.
    pub deferred: Option<String>,
}

/// Deletes the packs of `target` that no snapshot in `keep` (ids of the target's remaining
/// copies) needs. Each copy's objects are checked with the keys of the pool that wrote it.
pub fn collect(
    archive: &Archive,
    pool: &Pool,
    bucket: &Bucket,
    target: &str,
    keep: &[String],
) -> Result<GcReport> {
    let live = match live_objects(archive, pool, bucket, target, keep) {
        Ok(mut l) => {
            // Chunks of lazily mounted snapshots (and their clones) that only the target has.
            l.extend(pool.remote_objects(target)?);
            l
        }
        Err(e) => {
            // Deleting one snapshot must not fail because another copy is damaged or the
            // bucket hiccuped; but a pack is deleted only when it is known to be dead.
            tracing::warn!(
                target_id = target,
                error = %e,
                "archive space not reclaimed: a remaining copy could not be read (verify it); the next deletion retries"
            );
            return Ok(GcReport {
                deferred: Some(e.to_string()),
                ..Default::default()
            });
        }
    };
    let mut needed: HashSet<u64> = HashSet::new();
    for (d, loc) in pool.archive_objects(target)? {
        if live.contains(&d) {
            needed.insert(loc.pack);
        }
    }
    let packs: HashMap<u64, maas_pool::archive::PackRec> =
        pool.archive_packs(target)?.into_iter().collect();
    let dead: Vec<u64> = packs
        .keys()
        .filter(|n| !needed.contains(n))
        .copied()
        .collect();
    let mut report = GcReport {
        packs_kept: needed.len() as u64,
        ..Default::default()
    };
    if dead.is_empty() {
        return Ok(report);
    }
    // Forget first: should the deletes fail half-way, the pool never counts on a pack that
    // may be gone (a pack left behind is garbage a later verify lists, never data relied on).
    pool.archive_forget_packs(target, &dead)?;
    for n in &dead {
        let Some(p) = packs.get(n) else { continue };
        archive.block_on(bucket.delete(&p.key))?;
        report.packs_deleted += 1;
        report.bytes_freed += p.bytes;
    }
    tracing::info!(
        target_id = target,
        packs_deleted = report.packs_deleted,
        bytes_freed = report.bytes_freed,
        packs_kept = report.packs_kept,
        "archive space reclaimed"
    );
    Ok(report)
}

/// Every object (index nodes and chunks) the snapshots in `keep` need, read from the bucket.
fn live_objects(
    archive: &Archive,
    pool: &Pool,
    bucket: &Bucket,
    target: &str,
    keep: &[String],
) -> Result<HashSet<Digest>> {
    let mut live: HashSet<Digest> = HashSet::new();
    for id in keep {
        let m = read_manifest(archive, bucket, id)?;
        let keys = archive.block_on(crate::keys::writer_keys(bucket, pool, &m))?;
        let Some(root) = &m.root else { continue };
        let root = parse_digest(root, id)?;
        if !live.insert(root) {
            continue;
        }
        let node = |d: &Digest| -> Result<Node> {
            let (_, raw) =
                archive.block_on(fetch_object_from(bucket, pool, target, d, keys.as_ref()))?;
            Node::decode(&raw).map_err(|e| ArchiveError::Damaged {
                key: format!("index node {d}"),
                detail: e.to_string(),
            })
        };
        for leaf in node(&root)?.children() {
            if live.insert(*leaf) {
                live.extend(node(leaf)?.children().copied());
            }
        }
    }
    Ok(live)
}
