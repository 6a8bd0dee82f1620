//! Block I/O on live volumes: the one interface every front-end (iSCSI, NVMe/TCP, NBD) uses.
//!
//! Writes append to the WAL and update the volume's overlay under the volume's overlay lock, so
//! overlay order equals log order. Reads resolve every 4 KiB block through active overlay ->
//! frozen overlay -> base index, then fetch WAL blocks (from memory while their batch is not
//! yet written) and sealed chunks (through the RAM cache) with one batched submission.

use std::sync::Arc;

use crate::error::{PoolError, Result};
use crate::io::{self, AlignedBuf, Op};
use crate::overlay::{Loc, Lookup};
use crate::pool::{PoolInner, VolumeState};
use crate::types::{BLOCK, Digest, VolumeId};

/// What every block front-end needs from a volume.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn capacity(&self) -> u64;
    /// Logical block size (512 or 4096).
    fn block_size(&self) -> u32;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// `fua`: durable before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()>;
    fn flush(&self) -> Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()>;
    /// Deallocates; the range reads back as zeroes afterwards.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
}

/// A handle for I/O on one volume. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Volume {
    pub(crate) pool: Arc<PoolInner>,
    pub(crate) vol: Arc<VolumeState>,
}

#[derive(Clone, Copy)]
enum Src {
    Zero,
    Wal(Loc),
    Chunk(u64),
}

impl Volume {
    pub fn id(&self) -> VolumeId {
        VolumeId(self.vol.id)
    }

    fn check(&self, offset: u64, len: u64) -> Result<u64> {
        self.pool.check_open()?;
        let ov = self.vol.ov.read();
        if ov.deleted {
            return Err(PoolError::VolumeDeleted(self.id()));
        }
        let bs = self.vol.block_size as u64;
        if offset % bs != 0 || len % bs != 0 {
            return Err(PoolError::Misaligned {
                offset,
                len,
                block_size: self.vol.block_size,
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > ov.size) {
            return Err(PoolError::OutOfRange {
                offset,
                len,
                size: ov.size,
            });
        }
        Ok(ov.size)
    }

    fn chunk_blocks(&self) -> u64 {
        self.pool.geo.chunk_size / BLOCK
    }

    /// Reads whole 4 KiB blocks [first, first+n) into `out` (n*4096 bytes, aligned).
    fn read_blocks(&self, first: u64, n: u64, out: &mut [u8]) -> Result<()> {
        let cb = self.chunk_blocks();
        let shared = &self.pool.shared;
        let _pin = shared.pin.read();
        let (srcs, base_root) = {
            let ov = self.vol.ov.read();
            if ov.deleted {
                return Err(PoolError::VolumeDeleted(self.id()));
            }
            let mut srcs = Vec::with_capacity(n as usize);
            for b in first..first + n {
                let mut l = ov.active.lookup(b, cb);
                if l == Lookup::Below
                    && let Some(f) = &ov.frozen
                {
                    l = f.lookup(b, cb);
                }
                srcs.push(match l {
                    Lookup::Data(loc) => Src::Wal(loc),
                    Lookup::Zero => Src::Zero,
                    Lookup::Below => Src::Chunk(b / cb),
                });
            }
            (srcs, ov.base_root)
        };
        // WAL blocks: from memory if unwritten, else batched device reads (coalesced).
        let mut dev_reads: Vec<(u16, u64, usize, usize)> = Vec::new(); // device, offset, out index, blocks
        for (i, s) in srcs.iter().enumerate() {
            let dst = &mut out[i * 4096..(i + 1) * 4096];
            match s {
                Src::Zero => dst.fill(0),
                Src::Wal(loc) => {
                    if self.pool.wal.read_unwritten(loc, dst) {
                        continue;
                    }
                    match dev_reads.last_mut() {
                        Some((d, off, idx, cnt))
                            if *d == loc.device
                                && *off + (*cnt as u64) * 4096 == loc.offset
                                && *idx + *cnt == i =>
                        {
                            *cnt += 1
                        }
                        _ => dev_reads.push((loc.device, loc.offset, i, 1)),
                    }
                }
                Src::Chunk(_) => {}
            }
        }
        if !dev_reads.is_empty() {
            let mut ops = Vec::with_capacity(dev_reads.len());
            let mut rest: &mut [u8] = &mut *out;
            let mut consumed = 0usize;
            for &(d, off, idx, cnt) in &dev_reads {
                let dev = shared.device(d)?;
                let tail = std::mem::take(&mut rest);
                let (_, tail) = tail.split_at_mut(idx * 4096 - consumed);
                let (mine, tail) = tail.split_at_mut(cnt * 4096);
                consumed = (idx + cnt) * 4096;
                rest = tail;
                ops.push(Op::Read {
                    file: dev.file(),
                    offset: off,
                    buf: mine,
                });
            }
            io::run_batch(&mut ops).map_err(|e| PoolError::io("read of write-ahead log", e))?;
        }
        // Sealed chunks.
        let mut i = 0usize;
        while i < srcs.len() {
            let Src::Chunk(c) = srcs[i] else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < srcs.len() && matches!(srcs[j], Src::Chunk(x) if x == c) {
                j += 1;
            }
            let dst = &mut out[i * 4096..j * 4096];
            match self.pool.chunk_digest(base_root, c)? {
                None => dst.fill(0),
                Some(d) => {
                    let data = shared.chunk(&d)?;
                    let within = ((first + i as u64) % cb * BLOCK) as usize;
                    dst.copy_from_slice(&data[within..within + dst.len()]);
                }
            }
            i = j;
        }
        Ok(())
    }

    fn write_blocks(&self, first: u64, data: Option<&[u8]>, n: u64) -> Result<()> {
        let cb = self.chunk_blocks();
        let mut ov = self.vol.ov.write();
        if ov.deleted {
            return Err(PoolError::VolumeDeleted(self.id()));
        }
        let vid = self.vol.id;
        self.pool.wal.append(vid, first, n, data, |p| match p.loc {
            Some(loc) => ov.active.set_data(p.block, p.nblocks, loc),
            None => ov.active.set_zero(p.block, p.nblocks, cb),
        })
    }
}

impl BlockDevice for Volume {
    fn capacity(&self) -> u64 {
        self.vol.ov.read().size
    }

    fn block_size(&self) -> u32 {
        self.vol.block_size
    }

    #[tracing::instrument(level = "trace", skip(self, buf), fields(volume = self.vol.id, len = buf.len()))]
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / BLOCK;
        let last = (offset + len).div_ceil(BLOCK);
        let aligned =
            offset % BLOCK == 0 && len % BLOCK == 0 && (buf.as_ptr() as usize) % 4096 == 0;
        if aligned {
            return self.read_blocks(first, last - first, buf);
        }
        let mut tmp = AlignedBuf::zeroed(((last - first) * BLOCK) as usize);
        self.read_blocks(first, last - first, &mut tmp)?;
        let skip = (offset - first * BLOCK) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    #[tracing::instrument(level = "trace", skip(self, data), fields(volume = self.vol.id, len = data.len()))]
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        if len == 0 {
            return if fua { self.flush() } else { Ok(()) };
        }
        if offset % BLOCK == 0 && len % BLOCK == 0 {
            self.write_blocks(offset / BLOCK, Some(data), len / BLOCK)?;
        } else {
            // Sub-4 KiB write on a 512-byte volume: read-modify-write of the covering blocks.
            let _rmw = self.vol.rmw_lock.lock();
            let first = offset / BLOCK;
            let last = (offset + len).div_ceil(BLOCK);
            let mut tmp = AlignedBuf::zeroed(((last - first) * BLOCK) as usize);
            self.read_blocks(first, last - first, &mut tmp)?;
            let skip = (offset - first * BLOCK) as usize;
            tmp[skip..skip + data.len()].copy_from_slice(data);
            self.write_blocks(first, Some(&tmp), last - first)?;
        }
        if fua { self.flush() } else { Ok(()) }
    }

    fn flush(&self) -> Result<()> {
        self.pool.check_open()?;
        self.pool.wal.flush()
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset.div_ceil(BLOCK);
        let end = (offset + len) / BLOCK;
        // Partial 4 KiB blocks at either end (512-byte volumes) are written as zero data.
        let head_end = (first * BLOCK).min(offset + len);
        if head_end > offset {
            self.write(offset, &vec![0u8; (head_end - offset) as usize], false)?;
        }
        if end > first {
            self.write_blocks(first, None, end - first)?;
        }
        let tail_start = (end * BLOCK).max(head_end);
        if offset + len > tail_start {
            self.write(
                tail_start,
                &vec![0u8; (offset + len - tail_start) as usize],
                false,
            )?;
        }
        if fua { self.flush() } else { Ok(()) }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Thin pool: deallocated blocks read back as zeroes (LBPRZ), so discard = write zeroes,
        // which stores nothing but the range.
        self.write_zeroes(offset, len, false)
    }
}

impl PoolInner {
    /// Digest of chunk `c` in the index rooted at `root` (None: all-zero).
    pub(crate) fn chunk_digest(&self, root: Option<Digest>, c: u64) -> Result<Option<Digest>> {
        let Some(root) = root else { return Ok(None) };
        let fan = crate::index::LEAF_FANOUT;
        let r = self.shared.node(&root)?;
        let Some(Some(leaf)) = r.entries.get((c / fan) as usize) else {
            return Ok(None);
        };
        let l = self.shared.node(leaf)?;
        Ok(l.entries.get((c % fan) as usize).copied().flatten())
    }
}
