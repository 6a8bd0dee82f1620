//! Checking a target against its bucket, and repairing what can be repaired: the one job
//! besides import that lists the bucket. It finds
//!
//! - packs the pool records that the bucket lost (deleted or never there): every snapshot
//!   whose manifest names one is damaged; repaired, the pool forgets them, so that pushing a
//!   damaged snapshot again re-sends what was lost;
//! - manifests that cannot be read (damaged, sealed with another key);
//! - orphan packs: in the bucket, recorded by no one here and named by no manifest (left by a
//!   push or repack cut short before its record). Repaired, those older than a grace period
//!   are deleted. The grace keeps packs of a push still under way — another installation's
//!   sharing the prefix too, whose packs this pool does not record and whose manifest comes
//!   last.
//!
//! A repair deletes, so the caller runs it alone on the target (as reclamation); a check
//! only reads.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use maas_pool::Pool;

use crate::Archive;
use crate::bucket::Bucket;
use crate::error::Result;
use crate::manifest::SnapshotManifest;

#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    pub repair: bool,
    /// Orphan packs younger than this are left alone.
    pub orphan_grace: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            repair: false,
            orphan_grace: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub packs_listed: u64,
    pub packs_recorded: u64,
    pub manifests_read: u64,
    /// Recorded packs the bucket does not hold.
    pub packs_missing: Vec<String>,
    /// Snapshots whose manifest names a pack the bucket does not hold.
    pub snapshots_damaged: Vec<String>,
    /// Manifests that could not be read, with why.
    pub manifests_unreadable: Vec<(String, String)>,
    /// Orphan packs past the grace period (deleted when repairing), and those within it.
    pub orphans: Vec<String>,
    pub orphans_young: u64,
    /// What a repair did.
    pub packs_forgotten: u64,
    pub orphans_deleted: u64,
    pub bytes_freed: u64,
}

pub fn check_target(
    archive: &Archive,
    pool: &Pool,
    bucket: &Bucket,
    target: &str,
    opts: CheckOptions,
    progress: &mut dyn FnMut(f64),
) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let listed = archive.block_on(bucket.list_detailed("packs/"))?;
    r.packs_listed = listed.len() as u64;
    let present: HashMap<&str, &crate::bucket::Listed> =
        listed.iter().map(|o| (o.key.as_str(), o)).collect();
    let recorded = pool.archive_packs(target)?;
    r.packs_recorded = recorded.len() as u64;
    let recorded_keys: HashSet<&str> = recorded.iter().map(|(_, p)| p.key.as_str()).collect();
    // Not listed is not yet lost: a store whose listing lags its writes would otherwise have
    // a repair forget packs it holds. Each one is asked for by name.
    let mut missing: Vec<u64> = Vec::new();
    let mut confirmed: HashSet<String> = HashSet::new();
    for (n, p) in &recorded {
        if present.contains_key(p.key.as_str()) {
            continue;
        }
        if archive.block_on(bucket.head(&p.key))?.is_some() {
            confirmed.insert(p.key.clone());
            continue;
        }
        missing.push(*n);
        r.packs_missing.push(bucket.key(&p.key));
    }
    progress(0.2);
    // Every manifest in the bucket: what it names is not an orphan, what it names and the
    // bucket lacks damages it.
    let mut named: HashSet<String> = HashSet::new();
    let manifests = archive.block_on(bucket.list("snapshots/"))?;
    let total = manifests.len().max(1) as f64;
    for (i, (key, _)) in manifests.iter().enumerate() {
        progress(0.2 + 0.7 * i as f64 / total);
        let Some(id) = SnapshotManifest::id_of_key(key) else {
            continue;
        };
        let m = match archive.block_on(SnapshotManifest::fetch(bucket, id)) {
            Ok(m) => m,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                r.manifests_unreadable
                    .push((bucket.key(key), e.to_string()));
                continue;
            }
        };
        r.manifests_read += 1;
        let mut lost = false;
        for p in &m.packs {
            if present.contains_key(p.as_str()) || confirmed.contains(p) {
                continue;
            }
            // Not in the listing (a push published since it was taken, or a lagging
            // listing): asked for by name before the snapshot is called damaged.
            if archive.block_on(bucket.head(p))?.is_some() {
                confirmed.insert(p.clone());
            } else {
                lost = true;
            }
        }
        if lost {
            r.snapshots_damaged.push(m.meta.id.clone());
        }
        named.extend(m.packs);
    }
    let now = chrono::Utc::now().timestamp();
    let grace = opts.orphan_grace.as_secs() as i64;
    let mut old_orphans = Vec::new();
    for o in &listed {
        if recorded_keys.contains(o.key.as_str()) || named.contains(&o.key) {
            continue;
        }
        // No time from the server: treated as young, never deleted.
        if o.modified_unix.is_some_and(|t| now - t >= grace) {
            r.orphans.push(bucket.key(&o.key));
            old_orphans.push(o);
        } else {
            r.orphans_young += 1;
        }
    }
    // What an unreadable manifest names is unknown: no pack is called an orphan then.
    if !r.manifests_unreadable.is_empty() {
        r.orphans_young += old_orphans.len() as u64;
        r.orphans.clear();
        old_orphans.clear();
    }
    if opts.repair {
        if !missing.is_empty() {
            pool.archive_forget_packs(target, &missing)?;
            r.packs_forgotten = missing.len() as u64;
        }
        for o in old_orphans {
            archive.block_on(bucket.delete(&o.key))?;
            r.orphans_deleted += 1;
            r.bytes_freed += o.size;
        }
    }
    progress(1.0);
    tracing::info!(
        target_id = target,
        packs_listed = r.packs_listed,
        packs_missing = r.packs_missing.len(),
        snapshots_damaged = r.snapshots_damaged.len(),
        manifests_unreadable = r.manifests_unreadable.len(),
        orphans = r.orphans.len(),
        orphans_young = r.orphans_young,
        repaired = opts.repair,
        "archive target checked"
    );
    Ok(r)
}
