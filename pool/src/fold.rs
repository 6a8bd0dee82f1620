//! Sealing: folding a volume's overlay into sealed, content-addressed chunks and a new index.
//!
//! The overlay is frozen (a new one takes further writes, so I/O continues), each dirty chunk is
//! rebuilt from its base chunk plus the frozen blocks, hashed, deduplicated and compressed on the
//! CPU pool, and only the leaves covering dirty chunks are rewritten: the cost is O(changed
//! data), never O(volume size). One metadata transaction then switches the volume's base, adds
//! the snapshot (for a seal) and moves the reference counts. A fold without a snapshot is the
//! WAL's checkpoint: it lets the log's segments be freed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;
use rayon::prelude::*;

use crate::error::{PoolError, Result};
use crate::index::{LEAF_FANOUT, Level, Node};
use crate::io::{self, AlignedBuf, Op};
use crate::meta::{self, OBJECTS, ObjRec, SNAPSHOTS, SnapshotRec};
use crate::object::ObjectKind;
use crate::overlay::{Loc, Overlay, Slot};
use crate::pool::{PoolInner, SnapshotInfo, VolumeState, now_unix};
use crate::refs::{self, RefDelta};
use crate::types::{BLOCK, Digest, VolumeId};

/// Objects written by one fold, not yet in the metadata store.
#[derive(Default)]
pub(crate) struct NewObjects {
    /// None while another worker of this fold is writing it.
    pub(crate) map: Mutex<HashMap<Digest, Option<ObjRec>>>,
}

impl NewObjects {
    pub(crate) fn extents(&self) -> Vec<crate::types::Extent> {
        self.map
            .lock()
            .values()
            .flatten()
            .map(|r| r.extent)
            .collect()
    }
}

const GROUP: usize = 32;

impl PoolInner {
    /// Stores an object already encoded (stored bytes named `d`, checked by the caller) unless
    /// it exists.
    pub(crate) fn store_encoded(
        &self,
        kind: ObjectKind,
        d: &Digest,
        stored: &[u8],
        new: &NewObjects,
    ) -> Result<()> {
        {
            let mut m = new.map.lock();
            if m.contains_key(d) || self.shared.meta.has_local_object(d)? {
                return Ok(());
            }
            m.insert(*d, None);
        }
        match self.shared.write_encoded(kind, d, stored) {
            Ok(rec) => {
                new.map.lock().insert(*d, Some(rec));
                Ok(())
            }
            Err(e) => {
                new.map.lock().remove(d);
                Err(e)
            }
        }
    }

    /// Stores `raw` unless an identical object exists; returns its digest.
    pub(crate) fn store(&self, kind: ObjectKind, raw: &[u8], new: &NewObjects) -> Result<Digest> {
        let d = self.shared.keys.digest(kind, raw);
        {
            let mut m = new.map.lock();
            if m.contains_key(&d) {
                return Ok(d);
            }
            if self.shared.meta.has_local_object(&d)? {
                return Ok(d);
            }
            m.insert(d, None);
        }
        match self.shared.write_object(kind, &d, raw) {
            Ok(rec) => {
                new.map.lock().insert(d, Some(rec));
                Ok(d)
            }
            Err(e) => {
                new.map.lock().remove(&d);
                Err(e)
            }
        }
    }

    /// Rebuilds chunk `c` from the base and the frozen overlay; None if it is all zero. Blocks
    /// known lost (damaged in the frozen overlay or the base), and log blocks that fail their
    /// CRC now, are sealed as zeroes and reported in `damage` as (block, LSN): a fold never
    /// seals data that failed its check, and the damage stays recorded over the placeholder.
    fn build_chunk(
        &self,
        c: u64,
        frozen: &Overlay,
        base_root: Option<Digest>,
        base_damaged: &BTreeMap<u64, u64>,
        damage: &Mutex<Vec<(u64, u64)>>,
    ) -> Result<Option<AlignedBuf>> {
        let cs = self.geo.chunk_size;
        let cb = cs / BLOCK;
        let mut raw = AlignedBuf::zeroed(cs as usize);
        let range = c * cb..(c + 1) * cb;
        let covered = frozen.blocks.range(range.clone()).count() as u64 == cb;
        if !covered
            && !frozen.chunk_zeroed(c)
            && let Some(d) = self.chunk_digest(base_root, c)?
        {
            raw.copy_from_slice(&self.shared.chunk(&d)?);
            for (&b, _) in base_damaged.range(range.clone()) {
                if !frozen.blocks.contains_key(&b) {
                    let at = ((b - c * cb) * BLOCK) as usize;
                    raw[at..at + 4096].fill(0);
                }
            }
        }
        let mut pending: Vec<(Loc, usize)> = Vec::new();
        for (b, slot) in frozen.blocks.range(range) {
            let at = ((b - c * cb) * BLOCK) as usize;
            match slot {
                Slot::Zero => raw[at..at + 4096].fill(0),
                Slot::Damaged(lsn) => {
                    raw[at..at + 4096].fill(0);
                    damage.lock().push((*b, *lsn));
                }
                Slot::Data(loc) => {
                    if !self.wal.read_from_memory(loc, &mut raw[at..at + 4096]) {
                        pending.push((*loc, at));
                    }
                }
            }
        }
        if !pending.is_empty() {
            let mut ops = Vec::with_capacity(pending.len());
            let mut taken: Vec<Option<&mut [u8]>> = raw.chunks_mut(4096).map(Some).collect();
            for (loc, at) in &pending {
                let d = self.shared.device(loc.device)?;
                if let Some(buf) = taken[at / 4096].take() {
                    ops.push(Op::Read {
                        file: d.file(),
                        offset: loc.offset,
                        buf,
                    });
                }
            }
            io::run_batch(&mut ops).map_err(|e| PoolError::io("read of write-ahead log", e))?;
            drop(ops);
            for (loc, at) in &pending {
                let block = &mut raw[*at..*at + 4096];
                if let Err(e) = self.wal.check_read(loc, block) {
                    let b = c * cb + (*at / 4096) as u64;
                    tracing::error!(block = b, error = %e, "fold: a log block failed its check; it stays recorded as damaged");
                    block.fill(0);
                    damage.lock().push((b, loc.lsn));
                }
            }
        }
        if raw.iter().all(|&x| x == 0) {
            Ok(None)
        } else {
            Ok(Some(raw))
        }
    }

    pub(crate) fn fold(
        &self,
        v: &Arc<VolumeState>,
        snapshot: bool,
        progress: Option<&(dyn Fn(f64) + Sync)>,
    ) -> Result<Option<SnapshotInfo>> {
        let _seal = v.seal_lock.lock();
        let span = tracing::info_span!("fold", volume = v.id, snapshot);
        let _e = span.enter();
        let started = std::time::Instant::now();
        let pin = self.shared.pin.read();
        let (frozen, base_root, base_damaged, size, cut) = {
            let mut ov = v.ov.write();
            if ov.deleted {
                return Err(PoolError::VolumeDeleted(VolumeId(v.id)));
            }
            if ov.active.is_empty() && !snapshot {
                return Ok(None);
            }
            let cut = self.wal.cut();
            let frozen = Arc::new(std::mem::take(&mut ov.active));
            ov.frozen = Some(frozen.clone());
            (frozen, ov.base_root, ov.base_damaged.clone(), ov.size, cut)
        };
        let new = NewObjects::default();
        let base = Base {
            root: base_root,
            damaged: &base_damaged,
        };
        let res = self.fold_frozen(v, &frozen, base, size, cut, snapshot, &new, progress);
        match res {
            Ok((new_root, new_damaged, snap, zeroed)) => {
                {
                    let mut ov = v.ov.write();
                    ov.base_root = new_root;
                    ov.base_damaged = new_damaged;
                    ov.frozen = None;
                }
                v.folded_lsn.store(cut, Ordering::SeqCst);
                // The frozen blocks are in chunks now: the log cleaner may drop their segments.
                self.wal.release_folded(frozen.data_locs());
                self.shared.dead.lock().extend(zeroed);
                drop(pin);
                self.gc_log()?;
                self.shared.reclaim()?;
                tracing::info!(
                    blocks = frozen.blocks.len(),
                    new_objects = new.map.lock().len(),
                    ms = started.elapsed().as_millis() as u64,
                    snapshot = ?snap.as_ref().map(|s| s.id),
                    "volume folded"
                );
                Ok(snap)
            }
            Err(e) => {
                // Nothing was committed: the frozen overlay goes back under the active one.
                {
                    let mut ov = v.ov.write();
                    let newer = std::mem::take(&mut ov.active);
                    let mut merged = (*frozen).clone();
                    merged.merge_newer(&newer, self.geo.chunk_size / BLOCK);
                    ov.active = merged;
                    ov.frozen = None;
                }
                let mut a = self.shared.alloc.lock();
                for e in new.extents() {
                    a.free(e);
                }
                tracing::warn!(error = %e, "fold failed; the volume keeps its live data in the WAL");
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn fold_frozen(
        &self,
        v: &VolumeState,
        frozen: &Overlay,
        base: Base<'_>,
        size: u64,
        cut: u64,
        snapshot: bool,
        new: &NewObjects,
        progress: Option<&(dyn Fn(f64) + Sync)>,
    ) -> Result<(
        Option<Digest>,
        BTreeMap<u64, u64>,
        Option<SnapshotInfo>,
        Vec<Digest>,
    )> {
        let base_root = base.root;
        let damage = Mutex::new(Vec::new());
        let cb = self.geo.chunk_size / BLOCK;
        let nchunks = self.geo.chunks_for(size);
        let nleaves = self.geo.leaves_for(size);
        let block_chunks = frozen.dirty_block_chunks(cb);
        let block_leaves: HashSet<u64> = block_chunks.iter().map(|c| c / LEAF_FANOUT).collect();
        let mut zero_leaves: HashSet<u64> = HashSet::new();
        let mut work: Vec<u64> = block_chunks.clone();
        for (&s, &e) in &frozen.zeroed {
            let e = e.min(nchunks);
            if s >= e {
                continue;
            }
            for leaf in s / LEAF_FANOUT..e.div_ceil(LEAF_FANOUT) {
                let lo = leaf * LEAF_FANOUT;
                let hi = ((leaf + 1) * LEAF_FANOUT).min(nchunks);
                if s <= lo && e >= hi && !block_leaves.contains(&leaf) {
                    zero_leaves.insert(leaf);
                } else {
                    work.extend(s.max(lo)..e.min(hi));
                }
            }
        }
        work.sort_unstable();
        work.dedup();

        // Dirty chunks -> digests, in parallel groups (bounded memory).
        let mut changes: BTreeMap<u64, Option<Digest>> = BTreeMap::new();
        let total = work.len().max(1) as f64;
        for (gi, group) in work.chunks(GROUP).enumerate() {
            if let Some(p) = progress {
                // Rebuilding chunks is the bulk of a seal; the index and commit follow.
                p(0.95 * (gi * GROUP) as f64 / total);
            }
            let out: Vec<Result<(u64, Option<Digest>)>> = self.cpu.install(|| {
                group
                    .par_iter()
                    .map(|&c| {
                        let d =
                            match self.build_chunk(c, frozen, base_root, base.damaged, &damage)? {
                                None => None,
                                Some(raw) => Some(self.store(ObjectKind::Chunk, &raw, new)?),
                            };
                        Ok((c, d))
                    })
                    .collect()
            });
            for r in out {
                let (c, d) = r?;
                changes.insert(c, d);
            }
        }

        // Leaves.
        let old_root: Option<Arc<Node>> = base_root.map(|r| self.shared.node(&r)).transpose()?;
        let old_leaf = |l: u64| -> Option<Digest> {
            old_root
                .as_ref()
                .and_then(|r| r.entries.get(l as usize).copied().flatten())
        };
        let mut by_leaf: BTreeMap<u64, Vec<(u64, Option<Digest>)>> = BTreeMap::new();
        for (c, d) in &changes {
            by_leaf.entry(c / LEAF_FANOUT).or_default().push((*c, *d));
        }
        let mut leaf_changes: BTreeMap<u64, Option<Digest>> = BTreeMap::new();
        for l in &zero_leaves {
            leaf_changes.insert(*l, None);
        }
        for (l, ch) in by_leaf {
            let mut node = match old_leaf(l) {
                Some(d) => (*self.shared.node(&d)?).clone(),
                None => Node::empty(Level::Leaf, LEAF_FANOUT as usize),
            };
            for (c, d) in ch {
                node.entries[(c % LEAF_FANOUT) as usize] = d;
            }
            let d = if node.is_all_none() {
                None
            } else {
                let raw = node.encode();
                let d = self.store(ObjectKind::Node, &raw, new)?;
                self.shared
                    .node_cache
                    .put(d, Arc::new(node), raw.len() + 64);
                Some(d)
            };
            leaf_changes.insert(l, d);
        }

        // Root.
        let new_root = if leaf_changes.is_empty() {
            base_root
        } else {
            let mut root = match &old_root {
                Some(r) => (**r).clone(),
                None => Node::empty(Level::Root, 0),
            };
            root.entries.resize(nleaves as usize, None);
            for (l, d) in leaf_changes {
                if let Some(e) = root.entries.get_mut(l as usize) {
                    *e = d;
                }
            }
            if root.is_all_none() {
                None
            } else {
                let raw = root.encode();
                let d = self.store(ObjectKind::Node, &raw, new)?;
                self.shared
                    .node_cache
                    .put(d, Arc::new(root), raw.len() + 64);
                Some(d)
            }
        };

        // Make the new objects durable before the metadata that names them.
        if !new.map.lock().is_empty() {
            self.shared.sync_all()?;
        }

        let new_damaged = damaged_after(base.damaged, frozen, cb, damage.into_inner());
        let tx = self.shared.meta.begin_write()?;
        {
            let mut t = tx.open_table(meta::DAMAGED)?;
            for b in base.damaged.keys() {
                if !new_damaged.contains_key(b) {
                    t.remove((v.id, *b))?;
                }
            }
            for (b, lsn) in &new_damaged {
                if base.damaged.get(b) != Some(lsn) {
                    t.insert((v.id, *b), *lsn)?;
                }
            }
        }
        // Objects a concurrent fold stored first: their copies here are freed once this commits.
        // Not before: should anything fail until then, the caller frees every extent this fold
        // wrote, these too, and freeing them twice would hand the same space out twice.
        let mut dup = Vec::new();
        {
            let mut t = tx.open_table(OBJECTS)?;
            for (d, rec) in new.map.lock().iter() {
                let Some(rec) = rec else { continue };
                if let Some(e) = crate::meta::insert_new_object(&mut t, d, rec)? {
                    dup.push(e);
                }
            }
        }
        let mut delta = RefDelta::default();
        if let Some(r) = new_root {
            delta.add(r, if snapshot { 2 } else { 1 });
        }
        if let Some(r) = base_root {
            delta.add(r, -1);
        }
        let zeroed = refs::apply(&self.shared, &tx, delta)?;
        self.update_volume_rec_in(&tx, v.id, |r| {
            r.base_root = new_root;
            r.folded_lsn = cut;
        })?;
        let snap = if snapshot {
            let id = meta::bump(&tx, "next_snapshot_id")?;
            let rec = SnapshotRec {
                version: 1,
                id,
                volume_id: v.id,
                volume_name: v.name.read().clone(),
                size,
                block_size: v.block_size,
                root: new_root,
                created_unix: now_unix(),
                locked_until_unix: None,
                damaged: new_damaged.iter().map(|(b, l)| (*b, *l)).collect(),
                origin: None,
            };
            tx.open_table(SNAPSHOTS)?
                .insert(id, meta::to_json(&rec)?.as_slice())?;
            Some(SnapshotInfo::from(&rec))
        } else {
            None
        };
        tx.commit()?;
        self.shared.pending_free.lock().extend(dup);
        if !new_damaged.is_empty() {
            tracing::warn!(
                damaged_blocks = new_damaged.len(),
                "folded with damaged blocks: they stay recorded and read as medium errors"
            );
        }
        Ok((new_root, new_damaged, snap, zeroed))
    }
}

/// What a fold builds on: the base index and the base's damaged blocks.
#[derive(Clone, Copy)]
struct Base<'a> {
    root: Option<Digest>,
    damaged: &'a BTreeMap<u64, u64>,
}

/// The base's damaged blocks after a fold of `frozen`: what the frozen overlay wrote over
/// (blocks and zeroed chunks) is no longer damaged; what it marks damaged, and what the fold
/// found damaged, is.
fn damaged_after(
    before: &BTreeMap<u64, u64>,
    frozen: &Overlay,
    chunk_blocks: u64,
    found: Vec<(u64, u64)>,
) -> BTreeMap<u64, u64> {
    let mut out: BTreeMap<u64, u64> = before
        .iter()
        .filter(|(b, _)| !frozen.blocks.contains_key(b) && !frozen.chunk_zeroed(**b / chunk_blocks))
        .map(|(b, l)| (*b, *l))
        .collect();
    out.extend(frozen.damaged());
    out.extend(found);
    out
}
