//! Accounting (`stats`) and integrity checking (`verify`).

use std::collections::HashMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{PoolError, Result};
use crate::index::Node;
use crate::io::{self, AlignedBuf, Op};
use crate::meta::ObjRec;
use crate::object::ObjectKind;
use crate::overlay::{Loc, Slot};
use crate::pool::Pool;
use crate::types::{Digest, SnapshotId, VolumeId};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PoolStats {
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    /// Device space in use (sealed objects, WAL segments).
    pub used_bytes: u64,
    pub wal_bytes: u64,
    pub volumes: u64,
    pub snapshots: u64,
    /// Sum of volume sizes (thin: nothing near this needs to be stored).
    pub logical_bytes: u64,
    pub chunks: u64,
    pub index_nodes: u64,
    /// Uncompressed bytes of the distinct chunks stored.
    pub unique_bytes: u64,
    /// Bytes on disk for those chunks (after compression).
    pub stored_bytes: u64,
    /// Chunk bytes referenced by all volumes and snapshots (counting every reference).
    pub referenced_bytes: u64,
    /// referenced / unique.
    pub dedup_ratio: f64,
    /// unique / stored.
    pub compression_ratio: f64,
    /// Bytes of sealed objects (chunks and index nodes) read from the devices since the pool
    /// was opened: whole objects, and the blocks partial reads of chunks need.
    #[serde(default)]
    pub sealed_bytes_read: u64,
    /// The RAM tier: targets and what it holds now.
    #[serde(default)]
    pub ram_tier: crate::ramtier::RamTierStats,
    /// How the network targets' reads were served since the pool was opened.
    #[serde(default)]
    pub async_reads: AsyncReadStats,
}

/// How [`crate::BlockDevice::read_async`] served its reads: what tells whether reads that miss
/// RAM avoid blocking threads.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AsyncReadStats {
    /// Read whole from memory, on the caller's thread.
    pub in_memory: u64,
    /// Waited for the device on the shared io_uring (log blocks, raw frames of sealed chunks).
    pub device: u64,
    /// Sent to a blocking thread: a compressed frame, a chunk whose frame table was not in RAM,
    /// a lock held by a writer, or asynchronous reads unavailable.
    pub blocking: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageStats {
    pub logical_bytes: u64,
    /// Non-zero chunks times the chunk size (live blocks not yet sealed included for volumes).
    pub allocated_bytes: u64,
    /// Stored (compressed) bytes of the distinct chunks it references.
    pub stored_bytes: u64,
    /// Stored bytes that only this image references: what deleting it would free.
    pub exclusive_bytes: u64,
    /// Uncompressed bytes of the distinct chunks it references.
    pub unique_bytes: u64,
    pub dedup_ratio: f64,
    pub compression_ratio: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DamagedObject {
    pub digest: String,
    pub kind: String,
    pub device: u16,
    pub offset: u64,
    pub error: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub objects_checked: u64,
    pub bytes_checked: u64,
    pub damaged: Vec<DamagedObject>,
    /// Data chunks of lazily mounted snapshots still only in an archive target (not read).
    #[serde(default)]
    pub objects_remote: u64,
    /// Blocks of live volumes read from the write-ahead log's devices and checked.
    #[serde(default)]
    pub log_blocks_checked: u64,
    /// Blocks of live volumes whose data is lost or fails its check: damaged in the log,
    /// recorded as lost by replay or a fold, or inherited from a snapshot.
    #[serde(default)]
    pub damaged_blocks: Vec<DamagedBlock>,
    /// Damage replay found in the write-ahead log (with the evidence kept).
    #[serde(default)]
    pub log_damage: Vec<crate::meta::LogDamageRec>,
}

impl VerifyReport {
    /// Whether verify found nothing wrong.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.damaged_blocks.is_empty() && self.log_damage.is_empty()
    }
}

/// A damaged block of a live volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DamagedBlock {
    pub volume: u64,
    /// 4 KiB block number.
    pub block: u64,
    /// LSN of the log batch that held (or lost) it.
    pub lsn: u64,
    pub error: String,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 1.0 } else { a as f64 / b as f64 }
}

impl Pool {
    fn objects_map(&self) -> Result<HashMap<Digest, ObjRec>> {
        Ok(self.inner.shared.meta.objects()?.into_iter().collect())
    }

    /// Occurrences of every chunk under `root`, with the leaves' and root's reference counts,
    /// to tell which chunks are exclusive.
    fn image_stats(
        &self,
        root: Option<Digest>,
        logical: u64,
        objs: &HashMap<Digest, ObjRec>,
    ) -> Result<ImageStats> {
        let mut st = ImageStats {
            logical_bytes: logical,
            ..Default::default()
        };
        let Some(root) = root else { return Ok(st) };
        let shared = &self.inner.shared;
        let rrec = objs
            .get(&root)
            .ok_or_else(|| PoolError::corrupt("index", "root missing"))?;
        let root_excl = rrec.refcount == 1;
        let rnode = shared.node(&root)?;
        let mut leaf_occ: HashMap<Digest, u64> = HashMap::new();
        for l in rnode.children() {
            *leaf_occ.entry(*l).or_insert(0) += 1;
        }
        let mut chunk_occ: HashMap<Digest, (u64, u64)> = HashMap::new(); // (occurrences, exclusive occurrences)
        for (l, occ) in &leaf_occ {
            let lrec = objs
                .get(l)
                .ok_or_else(|| PoolError::corrupt("index", "leaf missing"))?;
            let leaf_excl = root_excl && lrec.refcount == *occ;
            let node: std::sync::Arc<Node> = shared.node(l)?;
            for c in node.children() {
                let e = chunk_occ.entry(*c).or_insert((0, 0));
                e.0 += occ;
                if leaf_excl {
                    e.1 += 1;
                }
            }
        }
        let cs = self.inner.geo.chunk_size;
        for (c, (occ, excl)) in &chunk_occ {
            st.allocated_bytes += occ * cs;
            if let Some(r) = objs.get(c) {
                st.unique_bytes += r.raw_len as u64;
                st.stored_bytes += r.stored_len as u64;
                if *excl == r.refcount {
                    st.exclusive_bytes += r.stored_len as u64;
                }
            }
        }
        st.dedup_ratio = ratio(st.allocated_bytes, st.unique_bytes);
        st.compression_ratio = ratio(st.unique_bytes, st.stored_bytes);
        Ok(st)
    }

    pub fn snapshot_stats(&self, id: SnapshotId) -> Result<ImageStats> {
        let rec = self.inner.snapshot_rec(id)?;
        let objs = self.objects_map()?;
        self.image_stats(rec.root, rec.size, &objs)
    }

    /// Stats of a volume's sealed base plus its live (not yet sealed) blocks.
    pub fn volume_stats(&self, id: VolumeId) -> Result<ImageStats> {
        let v = self.inner.vol(id)?;
        let (root, size, live) = {
            let ov = v.ov.read();
            let live =
                ov.active.blocks.len() + ov.frozen.as_ref().map(|f| f.blocks.len()).unwrap_or(0);
            (ov.base_root, ov.size, live as u64)
        };
        let objs = self.objects_map()?;
        let mut st = self.image_stats(root, size, &objs)?;
        st.allocated_bytes = (st.allocated_bytes + live * 4096).min(size);
        Ok(st)
    }

    pub fn stats(&self) -> Result<PoolStats> {
        let inner = &self.inner;
        let shared = &inner.shared;
        let objs = self.objects_map()?;
        let (wal_bytes, _) = inner.wal.usage();
        let (capacity, free) = {
            let a = shared.alloc.lock();
            (a.capacity_bytes(), a.free_bytes())
        };
        let mut st = PoolStats {
            capacity_bytes: capacity,
            free_bytes: free,
            used_bytes: capacity - free,
            wal_bytes,
            sealed_bytes_read: shared
                .sealed_bytes_read
                .load(std::sync::atomic::Ordering::Relaxed),
            ram_tier: inner.ram_tier_stats(),
            async_reads: shared.async_reads.snapshot(),
            ..Default::default()
        };
        // Multiplicity of every node and chunk: roots count their volumes and snapshots.
        let mut mult: HashMap<Digest, u64> = HashMap::new();
        let vols = inner.volumes.read();
        st.volumes = vols.len() as u64;
        for v in vols.values() {
            let ov = v.ov.read();
            st.logical_bytes += ov.size;
            if let Some(r) = ov.base_root {
                *mult.entry(r).or_insert(0) += 1;
            }
        }
        drop(vols);
        let snaps = shared.meta.snapshots()?;
        st.snapshots = snaps.len() as u64;
        for s in &snaps {
            if let Some(r) = s.root {
                *mult.entry(r).or_insert(0) += 1;
            }
        }
        let roots: Vec<(Digest, u64)> = mult.iter().map(|(d, m)| (*d, *m)).collect();
        let mut leaf_mult: HashMap<Digest, u64> = HashMap::new();
        for (r, m) in roots {
            for l in shared.node(&r)?.children() {
                *leaf_mult.entry(*l).or_insert(0) += m;
            }
        }
        let mut referenced = 0u64;
        for (l, m) in &leaf_mult {
            for c in shared.node(l)?.children() {
                if let Some(r) = objs.get(c) {
                    referenced += r.raw_len as u64 * m;
                }
            }
        }
        for r in objs.values() {
            match r.kind {
                ObjectKind::Chunk => {
                    st.chunks += 1;
                    st.unique_bytes += r.raw_len as u64;
                    st.stored_bytes += r.stored_len as u64;
                }
                ObjectKind::Node => st.index_nodes += 1,
            }
        }
        st.referenced_bytes = referenced;
        st.dedup_ratio = ratio(referenced, st.unique_bytes);
        st.compression_ratio = ratio(st.unique_bytes, st.stored_bytes);
        Ok(st)
    }

    /// Re-reads and checks every stored object (header and payload CRCs, decompression, digest).
    pub fn verify(&self) -> Result<VerifyReport> {
        let shared = &self.inner.shared;
        let _pin = shared.pin.read();
        // Objects only in an archive target are checked there (verify of the copy), not
        // fetched here.
        let (remote, objs): (Vec<_>, Vec<_>) = shared
            .meta
            .objects()?
            .into_iter()
            .partition(|(_, r)| r.extent.is_remote());
        let results: Vec<(u64, Option<DamagedObject>)> = self.inner.cpu.install(|| {
            objs.par_iter()
                .map(|(d, rec)| match shared.read_object(d, rec) {
                    Ok(raw) => (raw.len() as u64, None),
                    Err(e) => (
                        0,
                        Some(DamagedObject {
                            digest: d.to_hex(),
                            kind: match rec.kind {
                                ObjectKind::Chunk => "chunk".into(),
                                ObjectKind::Node => "index-node".into(),
                            },
                            device: rec.extent.device,
                            offset: rec.extent.offset,
                            error: e.to_string(),
                        }),
                    ),
                })
                .collect()
        });
        let mut rep = VerifyReport {
            objects_checked: objs.len() as u64,
            objects_remote: remote.len() as u64,
            ..Default::default()
        };
        for (bytes, dmg) in results {
            rep.bytes_checked += bytes;
            if let Some(d) = dmg {
                tracing::error!(digest = %d.digest, kind = %d.kind, error = %d.error, "verify: damaged object");
                rep.damaged.push(d);
            }
        }
        rep.damaged.sort_by(|a, b| a.digest.cmp(&b.digest));
        self.verify_log(&mut rep)?;
        rep.log_damage = shared.meta.log_damage()?;
        Ok(rep)
    }

    /// Checks every live volume's blocks that are in the write-ahead log (reading those not in
    /// memory from the devices) and lists the blocks known lost.
    fn verify_log(&self, rep: &mut VerifyReport) -> Result<()> {
        let inner = &self.inner;
        let vols: Vec<_> = inner.volumes.read().values().cloned().collect();
        for v in vols {
            let (locs, lost) = {
                let ov = v.ov.read();
                let mut locs: Vec<(u64, Loc)> = Vec::new();
                let mut lost: Vec<(u64, u64)> =
                    ov.base_damaged.iter().map(|(b, l)| (*b, *l)).collect();
                for layer in [ov.frozen.as_deref(), Some(&ov.active)]
                    .into_iter()
                    .flatten()
                {
                    for (b, slot) in &layer.blocks {
                        match slot {
                            Slot::Data(l) => locs.push((*b, *l)),
                            Slot::Damaged(lsn) => lost.push((*b, *lsn)),
                            Slot::Zero => {}
                        }
                    }
                }
                (locs, lost)
            };
            for (block, lsn) in lost {
                rep.damaged_blocks.push(DamagedBlock {
                    volume: v.id,
                    block,
                    lsn,
                    error: format!("data lost in damaged log batch {lsn}"),
                });
            }
            let mut buf = AlignedBuf::zeroed(4096);
            for (block, loc) in locs {
                if inner.wal.read_from_memory(&loc, &mut buf) {
                    continue;
                }
                // verify holds the pin: the extent cannot be freed under this read.
                let dev = inner.shared.device(loc.device)?;
                io::run_batch(&mut [Op::Read {
                    file: dev.file(),
                    offset: loc.offset,
                    buf: &mut buf,
                }])
                .map_err(|e| dev.io_err(e))?;
                rep.log_blocks_checked += 1;
                if let Err(e) = inner.wal.check_read(&loc, &buf) {
                    tracing::error!(volume = v.id, block, error = %e, "verify: damaged log block");
                    rep.damaged_blocks.push(DamagedBlock {
                        volume: v.id,
                        block,
                        lsn: loc.lsn,
                        error: e.to_string(),
                    });
                }
            }
        }
        rep.damaged_blocks.sort_by_key(|d| (d.volume, d.block));
        rep.damaged_blocks.dedup_by_key(|d| (d.volume, d.block));
        Ok(())
    }

    /// Where a volume's bytes at `offset` come from: the digest of its sealed chunk, if any
    /// (diagnostics and tests).
    pub fn chunk_of(&self, id: VolumeId, offset: u64) -> Result<Option<String>> {
        let v = self.inner.vol(id)?;
        let root = v.ov.read().base_root;
        Ok(self
            .inner
            .chunk_digest(root, offset / self.inner.geo.chunk_size)?
            .map(|d| d.to_hex()))
    }

    /// Location of a stored object (diagnostics and damage tests).
    pub fn object_location(
        &self,
        digest_hex: &str,
    ) -> Result<Option<(std::path::PathBuf, u64, u64)>> {
        let objs = self.inner.shared.meta.objects()?;
        for (d, rec) in objs {
            if d.to_hex() == digest_hex {
                if rec.extent.is_remote() {
                    return Ok(None);
                }
                let dev = self.inner.shared.device(rec.extent.device)?;
                return Ok(Some((dev.path.clone(), rec.extent.offset, rec.extent.len)));
            }
        }
        Ok(None)
    }

    /// Digests of all index nodes (for damage tests and recovery tools).
    pub fn index_nodes(&self) -> Result<Vec<String>> {
        Ok(self
            .inner
            .shared
            .meta
            .objects()?
            .into_iter()
            .filter(|(_, r)| r.kind == ObjectKind::Node)
            .map(|(d, _)| d.to_hex())
            .collect())
    }

    /// Drops the RAM caches (so a test or benchmark reads from the devices).
    pub fn drop_caches(&self) {
        self.inner.shared.chunk_cache.clear();
        self.inner.shared.table_cache.clear();
        self.inner.shared.node_cache.clear();
    }

    /// The LSN up to which the WAL is durable (diagnostics).
    pub fn wal_synced_lsn(&self) -> u64 {
        self.inner.wal.synced_lsn()
    }
}
