//! Reading a sealed snapshot in place: its bytes at any offset, straight from the chunk store
//! (or the archive, for chunks that live only there), without a clone, an overlay or an
//! export. For readers on the server side that look into a snapshot (file browsing, drills).
//!
//! A snapshot's index never changes, so a reader needs nothing but its root and size. Each
//! read holds the pool's pin, so nothing it resolves is reclaimed under it; a read after the
//! snapshot was deleted and reclaimed fails (its chunks are gone), it never returns other data,
//! because chunks are found by digest. Blocks whose data was already lost when the snapshot was
//! sealed read as a checksum error, as they do in every clone.

use std::sync::Arc;

use crate::error::{PoolError, Result};
use crate::pool::{Pool, PoolInner};
use crate::types::{BLOCK, Digest, SnapshotId};

/// A snapshot opened for reading. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct SnapshotReader {
    pool: Arc<PoolInner>,
    id: SnapshotId,
    root: Option<Digest>,
    size: u64,
    /// Blocks lost before the seal (block number, LSN of the damaged batch), sorted.
    damaged: Arc<[(u64, u64)]>,
}

impl std::fmt::Debug for SnapshotReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader")
            .field("id", &self.id)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Opens snapshot `id` for reading in place.
    pub fn snapshot_reader(&self, id: SnapshotId) -> Result<SnapshotReader> {
        self.inner.check_open()?;
        let rec = self.inner.snapshot_rec(id)?;
        let mut damaged = rec.damaged.clone();
        damaged.sort_unstable();
        Ok(SnapshotReader {
            pool: self.inner.clone(),
            id,
            root: rec.root,
            size: rec.size,
            damaged: damaged.into(),
        })
    }
}

impl Pool {
    /// Whether volume `vol` holds exactly snapshot `snap`'s content: the snapshot is the
    /// volume's, nothing was written (or zeroed, or resized) since the volume's last seal, and
    /// that seal's index is the snapshot's (the same content sealed twice has the same index).
    /// Any write since the last seal, even of the same bytes, says no: a caller may rely on a
    /// yes to skip reading.
    pub fn volume_unchanged_since(&self, vol: crate::VolumeId, snap: SnapshotId) -> Result<bool> {
        self.inner.check_open()?;
        let rec = self.inner.snapshot_rec(snap)?;
        if rec.volume_id != vol.0 {
            return Ok(false);
        }
        let v = self.inner.vol(vol)?;
        let ov = v.ov.read();
        Ok(!ov.deleted
            && ov.active.is_empty()
            && ov.frozen.is_none()
            && ov.base_root == rec.root
            && ov.base_damaged.is_empty()
            && rec.damaged.is_empty()
            && ov.size == rec.size)
    }
}

impl SnapshotReader {
    pub fn id(&self) -> SnapshotId {
        self.id
    }

    /// The snapshot's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fills `buf` with the snapshot's bytes from `offset` on. Any offset and length within the
    /// snapshot; reading past its end is an error, as on a volume.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(PoolError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.pool.check_open()?;
        self.check_damaged(offset, len)?;
        let chunk = self.pool.geo.chunk_size;
        let _pin = self.pool.shared.pin.read();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let c = at / chunk;
            let within = (at % chunk) as usize;
            let n = ((chunk as usize) - within).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match self.pool.chunk_digest(self.root, c)? {
                None => dst.fill(0),
                Some(d) => self.pool.shared.read_chunk_range(&d, within, dst)?,
            }
            done += n;
        }
        Ok(())
    }

    fn check_damaged(&self, offset: u64, len: u64) -> Result<()> {
        let first = offset / BLOCK;
        let last = (offset + len - 1) / BLOCK;
        let from = self.damaged.partition_point(|&(b, _)| b < first);
        if let Some(&(b, lsn)) = self.damaged.get(from)
            && b <= last
        {
            return Err(PoolError::Checksum {
                what: format!(
                    "snapshot {} block {b} (its data was lost in damaged log batch {lsn} \
                     before the snapshot was sealed)",
                    self.id
                ),
            });
        }
        Ok(())
    }
}
