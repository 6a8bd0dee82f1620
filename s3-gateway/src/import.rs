//! Re-importing a bucket (a fresh installation after a disaster, or another site): the only
//! place, with verify, that lists the bucket. Every pack's index is read from its tail (two
//! ranged GETs) and recorded in the pool, so that restores know where each object is; every
//! snapshot manifest whose packs are all there is returned for the catalog.

use std::collections::HashSet;

use maas_pool::Pool;

use crate::Archive;
use crate::bucket::Bucket;
use crate::error::{ArchiveError, Result};
use crate::manifest::SnapshotManifest;
use crate::pack::{TRAILER_LEN, parse_index, parse_trailer};

#[derive(Debug, Default)]
pub struct ImportScan {
    /// Snapshots whose packs are all in the bucket.
    pub snapshots: Vec<SnapshotManifest>,
    /// Manifests naming packs the bucket does not hold (skipped), by key.
    pub incomplete: Vec<String>,
    pub packs_indexed: u64,
    pub packs_known: u64,
}

pub fn scan_bucket(
    archive: &Archive,
    pool: &Pool,
    bucket: &Bucket,
    target: &str,
    progress: &mut dyn FnMut(f64),
) -> Result<ImportScan> {
    let mut scan = ImportScan::default();
    let known: HashSet<String> = pool
        .archive_packs(target)?
        .into_iter()
        .map(|(_, p)| p.key)
        .collect();
    let packs = archive.block_on(bucket.list("packs/"))?;
    let total = packs.len().max(1) as f64;
    let mut present = HashSet::new();
    for (i, (key, len)) in packs.iter().enumerate() {
        present.insert(key.clone());
        if known.contains(key) {
            scan.packs_known += 1;
            continue;
        }
        if *len < (TRAILER_LEN + 16) as u64 {
            tracing::warn!(pack = %key, len, "import: skipped an object too short to be a pack");
            continue;
        }
        let tail = archive.block_on(bucket.get_range(
            key,
            len - TRAILER_LEN as u64,
            TRAILER_LEN as u64,
        ))?;
        let t = parse_trailer(&tail, *len).map_err(|e| e.at(bucket.key(key)))?;
        let index = archive.block_on(bucket.get_range(key, t.index_offset, t.index_len()))?;
        let entries =
            parse_index(&index, &t, bucket.cipher()).map_err(|e| e.at(bucket.key(key)))?;
        pool.archive_record_pack(target, key, *len, &entries)?;
        scan.packs_indexed += 1;
        progress((i + 1) as f64 / total * 0.8);
    }
    for (key, _) in archive.block_on(bucket.list("snapshots/"))? {
        let Some(id) = SnapshotManifest::id_of_key(&key) else {
            continue;
        };
        let m = match archive.block_on(SnapshotManifest::fetch(bucket, id)) {
            Ok(m) => m,
            // Deleted since the listing.
            Err(ArchiveError::Missing { .. }) => continue,
            Err(e) => return Err(e),
        };
        if m.meta.id != id {
            tracing::warn!(manifest = %key, id = %m.meta.id, "import: a manifest names another snapshot than its object name; skipped");
            scan.incomplete.push(bucket.key(&key));
            continue;
        }
        if m.packs.iter().all(|p| present.contains(p)) {
            scan.snapshots.push(m);
        } else {
            tracing::warn!(manifest = %key, "import: a snapshot names packs the bucket does not hold; skipped");
            scan.incomplete.push(bucket.key(&key));
        }
    }
    progress(1.0);
    Ok(scan)
}
