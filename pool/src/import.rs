//! Bringing a snapshot's data back into the pool from elsewhere (an archive bucket): data
//! chunks arrive in their stored form (header, frame table, compressed frames), are checked
//! with the digest keys of the pool that wrote them, and are stored as they are — without
//! recompressing. Chunks written by another pool (a re-import after a disaster) are re-keyed:
//! their digest under this pool's key replaces the old one in the header, the frames stay.
//! The index is rebuilt here from the chunk digests, and the snapshot is committed in one
//! metadata transaction once every object is durable; a failure leaves nothing behind.

use std::collections::BTreeMap;
use std::sync::Arc;

use rayon::prelude::*;

use crate::error::{PoolError, Result};
use crate::fold::NewObjects;
use crate::index::{LEAF_FANOUT, Level, Node};
use crate::meta::{self, OBJECTS, SNAPSHOTS, SnapshotRec};
use crate::object::{self, Keys, ObjectKind};
use crate::pool::{Pool, SnapshotInfo, now_unix};
use crate::refs::{self, RefDelta};
use crate::types::Digest;

/// What the imported snapshot is.
#[derive(Clone, Debug)]
pub struct ImportSpec {
    pub volume_name: String,
    pub size: u64,
    pub block_size: u32,
    pub created_unix: i64,
    pub locked_until_unix: Option<i64>,
    /// Blocks lost before the original seal (they stay medium errors).
    pub damaged_blocks: Vec<u64>,
    /// The caller's name of the snapshot, kept with it ([`crate::SnapshotInfo::origin`]).
    pub origin: Option<String>,
}

/// One data chunk as stored by the pool that wrote it.
#[derive(Clone, Debug)]
pub struct StoredChunk {
    /// Where the chunk is in the image (one chunk may be at several places).
    pub chunk_nos: Vec<u64>,
    /// Its digest in the source pool.
    pub digest: Digest,
    pub bytes: Vec<u8>,
}

/// The digest keys of a pool, as raw bytes (to check objects it wrote, in a bucket).
#[derive(Clone)]
pub struct DigestKeys {
    pub chunk: [u8; 32],
    pub node: [u8; 32],
}

impl std::fmt::Debug for DigestKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestKeys(..)")
    }
}

impl Pool {
    /// This pool's digest keys (not its secret). Whoever holds them can check, and confirm
    /// the content of, objects this pool wrote; they are stored in an archive bucket beside
    /// the objects themselves (see maas-s3), never elsewhere.
    pub fn digest_keys(&self) -> DigestKeys {
        let (chunk, node) = self.inner.shared.keys.raw();
        DigestKeys { chunk, node }
    }

    /// Imports a snapshot from batches of stored chunks (`next_batch` returns None at the
    /// end), checked with `source` keys (None: this pool's). Chunks absent from every batch
    /// read as zeroes. Returns the new snapshot.
    pub fn import_snapshot(
        &self,
        spec: &ImportSpec,
        source: Option<&DigestKeys>,
        next_batch: &mut dyn FnMut() -> Result<Option<Vec<StoredChunk>>>,
    ) -> Result<SnapshotInfo> {
        let inner = &self.inner;
        inner.check_open()?;
        if spec.size == 0 || spec.size > self.max_volume_size() {
            return Err(PoolError::InvalidArgument(format!(
                "snapshot size {} is out of range",
                spec.size
            )));
        }
        let chunks = inner.geo.chunks_for(spec.size);
        let source_keys = source.map(|k| Keys::from_raw(k.chunk, k.node));
        let keys = source_keys.as_ref().unwrap_or(&inner.shared.keys);
        let new = NewObjects::default();
        let pin = inner.shared.pin.read();
        let res = (|| -> Result<SnapshotInfo> {
            let mut digests: BTreeMap<u64, Digest> = BTreeMap::new();
            while let Some(batch) = next_batch()? {
                let stored: Vec<(Vec<u64>, Digest)> = inner.cpu.install(|| {
                    batch
                        .into_par_iter()
                        .map(|c| {
                            if let Some(n) = c.chunk_nos.iter().find(|n| **n >= chunks) {
                                return Err(PoolError::InvalidArgument(format!(
                                    "chunk {n} is beyond the snapshot's {chunks} chunks"
                                )));
                            }
                            let d = self.import_chunk(keys, &c, &new)?;
                            Ok((c.chunk_nos, d))
                        })
                        .collect::<Result<Vec<_>>>()
                })?;
                for (nos, d) in stored {
                    for n in nos {
                        digests.insert(n, d);
                    }
                }
            }
            self.commit_import(spec, &digests, &new)
        })();
        drop(pin);
        if res.is_err() {
            let mut a = inner.shared.alloc.lock();
            for e in new.extents() {
                a.free(e);
            }
        }
        res
    }

    /// Checks one chunk and stores it under this pool's digest (unless already stored).
    fn import_chunk(&self, keys: &Keys, c: &StoredChunk, new: &NewObjects) -> Result<Digest> {
        let shared = &self.inner.shared;
        let what = format!("imported chunk {}", c.digest);
        let raw = object::decode(keys, &c.bytes, ObjectKind::Chunk, &c.digest, &what)?;
        if raw.len() as u64 != shared.chunk_size {
            return Err(PoolError::InvalidArgument(format!(
                "{what} is {} bytes; this pool's chunks are {}",
                raw.len(),
                shared.chunk_size
            )));
        }
        let d = shared.keys.digest(ObjectKind::Chunk, &raw);
        let mut bytes = c.bytes.clone();
        if d != c.digest {
            object::set_digest(&mut bytes, &d)?;
        }
        self.inner
            .store_encoded(ObjectKind::Chunk, &d, &bytes, new)?;
        Ok(d)
    }

    pub(crate) fn commit_import(
        &self,
        spec: &ImportSpec,
        digests: &BTreeMap<u64, Digest>,
        new: &NewObjects,
    ) -> Result<SnapshotInfo> {
        let inner = &self.inner;
        let nleaves = inner.geo.leaves_for(spec.size);
        let mut root = Node::empty(Level::Root, nleaves as usize);
        let mut leaves: BTreeMap<u64, Node> = BTreeMap::new();
        for (c, d) in digests {
            let leaf = leaves
                .entry(c / LEAF_FANOUT)
                .or_insert_with(|| Node::empty(Level::Leaf, LEAF_FANOUT as usize));
            leaf.entries[(c % LEAF_FANOUT) as usize] = Some(*d);
        }
        for (l, node) in leaves {
            let raw = node.encode();
            let d = inner.store(ObjectKind::Node, &raw, new)?;
            inner
                .shared
                .node_cache
                .put(d, Arc::new(node), raw.len() + 64);
            root.entries[l as usize] = Some(d);
        }
        let root_digest = if root.is_all_none() {
            None
        } else {
            let raw = root.encode();
            let d = inner.store(ObjectKind::Node, &raw, new)?;
            inner
                .shared
                .node_cache
                .put(d, Arc::new(root), raw.len() + 64);
            Some(d)
        };
        inner.shared.sync_all()?;
        let _a = inner.admin.lock();
        let tx = inner.shared.meta.begin_write()?;
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
        if let Some(r) = root_digest {
            delta.add(r, 1);
        }
        let zeroed = refs::apply(&inner.shared, &tx, delta)?;
        let id = meta::bump(&tx, "next_snapshot_id")?;
        let rec = SnapshotRec {
            version: 1,
            id,
            volume_id: 0,
            volume_name: spec.volume_name.clone(),
            size: spec.size,
            block_size: spec.block_size,
            root: root_digest,
            created_unix: if spec.created_unix > 0 {
                spec.created_unix
            } else {
                now_unix()
            },
            locked_until_unix: spec.locked_until_unix,
            // The LSN of the original damage is not known here; 0 marks it imported.
            damaged: spec.damaged_blocks.iter().map(|b| (*b, 0)).collect(),
            origin: spec.origin.clone(),
        };
        tx.open_table(SNAPSHOTS)?
            .insert(id, meta::to_json(&rec)?.as_slice())?;
        tx.commit()?;
        inner.shared.pending_free.lock().extend(dup);
        inner.shared.dead.lock().extend(zeroed);
        tracing::info!(
            snapshot = id,
            chunks = digests.len(),
            new_objects = new.map.lock().len(),
            "snapshot imported"
        );
        Ok(SnapshotInfo::from(&rec))
    }
}
