//! Reclaiming bucket space after archived snapshots are deleted: the objects every remaining
//! snapshot of the target needs are found by walking their indexes (read from the bucket,
//! checked); every pack none of whose objects is needed is forgotten by the pool, then
//! deleted from the bucket; and every pack that is *mostly* dead (less than
//! [`GcOptions::repack_below`] of its bytes still needed) is repacked: its live objects are
//! read back (one GET per pack), checked with the keys of the pool that wrote them, written
//! into new packs, and the old pack deleted. Chunks the pool still reads from the target
//! (lazily mounted snapshots and their clones) are needed too, and their packs are never
//! repacked (a read in flight may hold their old place). The caller keeps every other user
//! of the target's packs out while this runs (pushes, mounts, restores, verifies).
//!
//! Repacking is ordered so that a crash at any point leaves every remaining snapshot whole,
//! both for this pool and for an import of the bucket: new packs are uploaded; manifests that
//! will change list old and new packs; the pool records the new places; manifests list only
//! the new packs; old packs are forgotten and deleted. A crash before the pool records new
//! packs leaves them in the bucket unreferenced (a later import indexes them; nothing relies
//! on them); after, the old packs are dead and the next reclamation deletes them, rewriting
//! any manifest that still lists them first — every reclamation checks every remaining
//! manifest against the pool's records before it deletes anything.

use std::collections::{BTreeSet, HashMap, HashSet};

use maas_pool::Pool;
use maas_pool::archive::{ArchivedObject, PackRec};
use maas_pool::import::DigestKeys;
use maas_pool::types::Digest;

use crate::Archive;
use crate::bucket::Bucket;
use crate::error::{ArchiveError, Result};
use crate::manifest::SnapshotManifest;
use crate::pack::PackWriter;
use crate::restore::read_manifest;
use crate::verify::{check_pack, parse_digest, pool_objects_from_archive};

/// A repack reads an old pack whole into memory: larger ones (another writer's) stay.
const MAX_REPACK_READ: u64 = 256 << 20;

#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// A pack whose needed bytes are less than this share of its size is repacked.
    pub repack_below: f64,
    /// Size of the packs a repack writes (as a push's).
    pub pack_bytes: usize,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            repack_below: 0.5,
            pack_bytes: crate::push::PushOptions::default().pack_bytes,
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub packs_deleted: u64,
    pub bytes_freed: u64,
    /// Packs kept because some of their objects are still needed.
    pub packs_kept: u64,
    /// Mostly dead packs whose live objects were moved into new packs (counted in
    /// `packs_deleted` and `bytes_freed` too).
    pub packs_repacked: u64,
    /// New packs written by the repack, and the bytes of live objects they hold.
    pub packs_written: u64,
    pub bytes_rewritten: u64,
    /// Snapshot manifests rewritten to name the packs now holding their objects.
    pub manifests_rewritten: u64,
    /// Why mostly dead packs were not repacked this time (the bucket failed a request):
    /// they stay as they are, whole, and the next reclamation tries again.
    pub repack_deferred: Option<String>,
    /// Why nothing was reclaimed this time: a remaining copy could not be read, so what it
    /// needs is unknown and every pack stays until a later reclamation can read it.
    pub deferred: Option<String>,
}

/// What the remaining snapshots need.
struct Live {
    /// Object -> which writer's keys check it (index into `keys`).
    writer: HashMap<Digest, usize>,
    keys: Vec<Option<DigestKeys>>,
    /// Each remaining snapshot's manifest and objects.
    snapshots: Vec<(SnapshotManifest, Vec<Digest>)>,
}

/// Deletes the packs of `target` that no snapshot in `keep` (ids of the target's remaining
/// copies) needs, and repacks those mostly dead. Each copy's objects are checked with the
/// keys of the pool that wrote it.
pub fn collect(
    archive: &Archive,
    pool: &Pool,
    bucket: &Bucket,
    target: &str,
    keep: &[String],
    opts: GcOptions,
) -> Result<GcReport> {
    let live = match live_objects(archive, pool, bucket, target, keep) {
        Ok(l) => l,
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
    // Chunks of lazily mounted snapshots (and their clones) that only the target has.
    let remote: HashSet<Digest> = pool.remote_objects(target)?.into_iter().collect();
    let packs: HashMap<u64, PackRec> = pool.archive_packs(target)?.into_iter().collect();
    // Per pack: its live objects, and whether a lazy mount reads from it.
    let mut live_in: HashMap<u64, Vec<(Digest, ArchivedObject)>> = HashMap::new();
    let mut pinned: HashSet<u64> = HashSet::new();
    for (d, loc) in pool.archive_objects(target)? {
        if remote.contains(&d) {
            pinned.insert(loc.pack);
        } else if live.writer.contains_key(&d) {
            live_in.entry(loc.pack).or_default().push((d, loc));
        }
    }
    let mut report = GcReport::default();
    let now = chrono::Utc::now().timestamp();
    let locked_until = |p: &PackRec| {
        bucket
            .config()
            .object_lock
            .map(|l| p.stored_unix + i64::from(l.days) * 86_400)
    };
    let mut dead: Vec<u64> = Vec::new();
    let mut repack: Vec<u64> = Vec::new();
    for (n, p) in &packs {
        let objs = live_in.get(n);
        if objs.is_none() && !pinned.contains(n) {
            dead.push(*n);
            continue;
        }
        report.packs_kept += 1;
        let live_bytes: u64 = objs
            .map(|o| o.iter().map(|(_, l)| u64::from(l.len)).sum())
            .unwrap_or(0);
        if !pinned.contains(n)
            && p.bytes <= MAX_REPACK_READ
            && (live_bytes as f64) < opts.repack_below * p.bytes as f64
            // Under object lock the old pack cannot go before its retention ends.
            && locked_until(p).is_none_or(|u| u <= now)
        {
            repack.push(*n);
        }
    }
    repack.sort_unstable();
    // Manifests a repack rewrote (listing old and new packs), as they now are in the bucket.
    let mut interim: HashMap<String, BTreeSet<String>> = HashMap::new();
    if !repack.is_empty() {
        match repack_packs(
            archive,
            pool,
            bucket,
            target,
            &live,
            &packs,
            &live_in,
            &repack,
            opts,
            &mut interim,
            &mut report,
        ) {
            Ok(moved) => {
                report.packs_kept -= moved.len() as u64;
                dead.extend(moved);
            }
            // Deleting a snapshot does not fail because a repack could not finish: every
            // pack stays until the pool's records no longer name it.
            Err(e) => {
                tracing::warn!(target_id = target, error = %e, "mostly dead packs not repacked this time; the next reclamation retries");
                report.repack_deferred = Some(e.to_string());
            }
        }
    }
    // Before anything is deleted: every remaining manifest names the packs now holding its
    // objects (an import relies on them). Packs a manifest names that could not be checked
    // stay, whatever the records say.
    let mut protected: HashSet<String> = HashSet::new();
    for (m, objects) in &live.snapshots {
        let in_bucket: BTreeSet<String> = interim
            .get(&m.meta.id)
            .cloned()
            .unwrap_or_else(|| m.packs.iter().cloned().collect());
        let now_in = match packs_of(pool, target, objects) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(target_id = target, snapshot = %m.meta.id, error = %e, "manifest not checked against the pool's records; the packs it names are kept");
                protected.extend(in_bucket);
                continue;
            }
        };
        if in_bucket != now_in {
            write_manifest(archive, bucket, m, now_in)?;
            report.manifests_rewritten += 1;
        }
    }
    dead.retain(|n| packs.get(n).is_none_or(|p| !protected.contains(&p.key)));
    if dead.is_empty() {
        return Ok(report);
    }
    // A dead record may name the same object as a live one (a pack written again with the
    // same bytes, hence the same name, after an import recorded the first): forgotten, not
    // deleted.
    let dead_set: HashSet<u64> = dead.iter().copied().collect();
    let live_keys: HashSet<String> = pool
        .archive_packs(target)?
        .into_iter()
        .filter(|(n, _)| !dead_set.contains(n))
        .map(|(_, p)| p.key)
        .collect();
    // Forget first: should the deletes fail half-way, the pool never counts on a pack that
    // may be gone (a pack left behind is garbage a later check lists, never data relied on).
    pool.archive_forget_packs(target, &dead)?;
    for n in &dead {
        let Some(p) = packs.get(n) else { continue };
        if live_keys.contains(&p.key) {
            continue;
        }
        archive.block_on(bucket.delete(&p.key))?;
        report.packs_deleted += 1;
        report.bytes_freed += p.bytes;
    }
    tracing::info!(
        target_id = target,
        packs_deleted = report.packs_deleted,
        bytes_freed = report.bytes_freed,
        packs_kept = report.packs_kept,
        packs_repacked = report.packs_repacked,
        bytes_rewritten = report.bytes_rewritten,
        manifests_rewritten = report.manifests_rewritten,
        "archive space reclaimed"
    );
    Ok(report)
}

/// The packs holding `objects`, from the pool's records.
fn packs_of(pool: &Pool, target: &str, objects: &[Digest]) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut seen: HashSet<u64> = HashSet::new();
    for d in objects {
        let (loc, pack) = pool
            .archive_locate(target, d)?
            .ok_or_else(|| ArchiveError::Internal(format!("object {d} has no record")))?;
        if seen.insert(loc.pack) {
            out.insert(pack.key);
        }
    }
    Ok(out)
}

fn write_manifest(
    archive: &Archive,
    bucket: &Bucket,
    m: &SnapshotManifest,
    packs: BTreeSet<String>,
) -> Result<()> {
    let mut m = m.clone();
    m.packs = packs.into_iter().collect();
    archive.block_on(m.store(bucket))
}

/// Moves the live objects of packs `old` into new packs (see the module's ordering). Returns
/// the old packs that no longer hold anything needed. A pack whose live objects do not all
/// read back whole stays as it is (its damage is for a verify to report, not to copy).
#[allow(clippy::too_many_arguments)]
fn repack_packs(
    archive: &Archive,
    pool: &Pool,
    bucket: &Bucket,
    target: &str,
    live: &Live,
    packs: &HashMap<u64, PackRec>,
    live_in: &HashMap<u64, Vec<(Digest, ArchivedObject)>>,
    old: &[u64],
    opts: GcOptions,
    interim: &mut HashMap<String, BTreeSet<String>>,
    report: &mut GcReport,
) -> Result<Vec<u64>> {
    let cipher = bucket.config().cipher.clone();
    let mut writer = PackWriter::new(cipher.clone());
    // The new packs uploaded: name, length, objects (their bytes are dropped once sent).
    let mut written: Vec<(String, u64, Vec<maas_pool::archive::PackEntry>)> = Vec::new();
    let mut moved: Vec<u64> = Vec::new();
    for n in old {
        let (Some(p), Some(objs)) = (packs.get(n), live_in.get(n)) else {
            continue;
        };
        let objs: Vec<_> = objs
            .iter()
            .map(|(d, loc)| (*d, loc.offset, loc.len, loc.kind))
            .collect();
        let writer_keys = |d: &Digest| {
            live.writer
                .get(d)
                .and_then(|w| live.keys.get(*w))
                .and_then(|k| k.as_ref())
        };
        // Exactly the recorded length: a bucket handing back more is not read whole.
        let checked = archive
            .block_on(bucket.get_range(&p.key, 0, p.bytes))
            .and_then(|bytes| check_pack(pool, bucket, &p.key, &bytes, &objs, writer_keys));
        let objects = match checked {
            Ok(o) => o,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                tracing::error!(target_id = target, pack = %p.key, error = %e, "a mostly dead pack was not repacked: some of its live objects do not read back whole (verify the snapshots of this target)");
                continue;
            }
        };
        for (d, kind, stored) in objects {
            report.bytes_rewritten += stored.len() as u64;
            writer.add(d, kind, &stored);
            if writer.len() >= opts.pack_bytes {
                let next = writer.fresh();
                let full = std::mem::replace(&mut writer, next).finish();
                archive.block_on(bucket.put(&full.key, full.bytes.clone()))?;
                written.push((full.key, full.bytes.len() as u64, full.entries));
            }
        }
        moved.push(*n);
    }
    if !writer.is_empty() {
        let last = writer.finish();
        archive.block_on(bucket.put(&last.key, last.bytes.clone()))?;
        written.push((last.key, last.bytes.len() as u64, last.entries));
    }
    if moved.is_empty() {
        return Ok(moved);
    }
    // Manifests that will change list old and new packs while the pool's records move.
    let old_keys: HashSet<&str> = moved
        .iter()
        .filter_map(|n| packs.get(n).map(|p| p.key.as_str()))
        .collect();
    for (m, _) in &live.snapshots {
        if m.packs.iter().any(|k| old_keys.contains(k.as_str())) {
            let mut both: BTreeSet<String> = m.packs.iter().cloned().collect();
            both.extend(written.iter().map(|w| w.0.clone()));
            write_manifest(archive, bucket, m, both.clone())?;
            interim.insert(m.meta.id.clone(), both);
        }
    }
    for (key, len, entries) in &written {
        pool.archive_record_pack(target, key, *len, entries)?;
    }
    report.packs_written = written.len() as u64;
    report.packs_repacked = moved.len() as u64;
    Ok(moved)
}

/// Every object (index nodes and chunks) the snapshots in `keep` need, read from the bucket.
fn live_objects(
    archive: &Archive,
    pool: &Pool,
    bucket: &Bucket,
    target: &str,
    keep: &[String],
) -> Result<Live> {
    let mut live = Live {
        writer: HashMap::new(),
        keys: Vec::new(),
        snapshots: Vec::new(),
    };
    let mut writers: HashMap<String, usize> = HashMap::new();
    for id in keep {
        let m = read_manifest(archive, bucket, id)?;
        let w = match writers.get(&m.pool) {
            Some(w) => *w,
            None => {
                let keys = archive.block_on(crate::keys::writer_keys(bucket, pool, &m))?;
                live.keys.push(keys);
                writers.insert(m.pool.clone(), live.keys.len() - 1);
                live.keys.len() - 1
            }
        };
        let keys = live.keys[w].clone();
        let objects: Vec<Digest> = match &m.root {
            Some(root) => {
                let root = parse_digest(root, id)?;
                pool_objects_from_archive(archive, pool, bucket, target, &root, keys.as_ref())?
                    .into_iter()
                    .map(|(d, _)| d)
                    .collect()
            }
            None => Vec::new(),
        };
        for d in &objects {
            live.writer.entry(*d).or_insert(w);
        }
        live.snapshots.push((m, objects));
    }
    Ok(live)
}
