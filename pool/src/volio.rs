//! Block I/O on live volumes: the one interface every front-end (iSCSI, NVMe/TCP, NBD) uses.
//!
//! Writes append to the WAL and update the volume's overlay under the volume's overlay lock, so
//! overlay order equals log order. Reads resolve every 4 KiB block through active overlay ->
//! frozen overlay -> base index under one hold of that lock, then fetch WAL blocks (from memory
//! while their batch is not yet written) and sealed chunks (through the RAM cache) with one
//! batched submission. WAL blocks are never rewritten in place, so a read sees every write
//! either wholly or not at all as far as the overlay lock is concerned; the read-modify-write of
//! partial 4 KiB blocks (512-byte volumes) happens inside the same lock hold as the append, so
//! it cannot lose a concurrent write to the rest of the block.
//!
//! Atomic writes ([`BlockDevice::write_atomic`]) additionally go into one WAL batch, which
//! replay applies entirely or not at all: all-or-nothing for readers and across a crash.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::{PoolError, Result};
use crate::io::{self, AlignedBuf, Op};
use crate::overlay::{Loc, Lookup};
use crate::pool::{PoolInner, VolOverlay, VolumeState};
use crate::types::{BLOCK, Digest, VolumeId};
use crate::wal::NOWAIT_LOCK_WAIT;

/// One run of [`BlockDevice::provisioning_status`]: `len` bytes that are all mapped (stored) or
/// all deallocated (stored as nothing, read back as zeroes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProvisioningRun {
    pub len: u64,
    pub mapped: bool,
}

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

    /// Reads like [`BlockDevice::read`] if that needs no device I/O and no waiting (the blocks
    /// are in memory); otherwise returns false at once, `buf` then holding anything. For
    /// front-ends that serve such reads on their network thread.
    fn read_nowait(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let _ = (offset, buf);
        Ok(false)
    }

    /// Starts a read into `buf` (its whole length, from `offset`) without blocking the caller:
    /// done at once if the blocks are in memory, else device reads submitted asynchronously
    /// and a future that completes them, or — where that cannot be done (a sealed chunk not
    /// in RAM, a lock held, no io_uring) — the buffer back, for [`BlockDevice::read`] on a
    /// blocking thread. For front-ends that run their commands on network threads: it answers
    /// everything [`BlockDevice::read_nowait`] does. By default, that is all it does.
    fn read_async(&self, offset: u64, mut buf: Vec<u8>) -> AsyncRead {
        match self.read_nowait(offset, &mut buf) {
            Ok(true) => AsyncRead::Done(Ok(buf)),
            Ok(false) => AsyncRead::Blocking(buf),
            Err(e) => AsyncRead::Done(Err(e)),
        }
    }

    /// Writes like [`BlockDevice::write`] without FUA if that needs no device I/O and no
    /// waiting; otherwise returns false at once, having written nothing.
    fn write_nowait(&self, offset: u64, data: &[u8]) -> Result<bool> {
        let _ = (offset, data);
        Ok(false)
    }

    /// Largest write, in bytes, that [`BlockDevice::write_atomic`] accepts at any (block-aligned)
    /// offset; 0 when the device cannot write atomically.
    fn atomic_write_max(&self) -> u64 {
        0
    }

    /// Writes `data` at `offset` all-or-nothing: a concurrent read returns either none or all of
    /// it, and after a crash either none or all of it is there (all of it if `fua` and this
    /// returned Ok). Writes larger than [`BlockDevice::atomic_write_max`] fail with
    /// [`PoolError::AtomicWriteTooLarge`] and change nothing. The default implementation refuses
    /// every atomic write: only a device that can keep the promise may accept one.
    fn write_atomic(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let _ = (offset, data, fua);
        Err(PoolError::Unsupported("atomic writes".into()))
    }

    /// Which parts of [offset, offset+len) are mapped, as consecutive runs starting at `offset`.
    /// The runs may cover only a prefix of the range (never less than one block) so that one
    /// call stays short; ask again from where they end. The default reports everything mapped,
    /// which is always safe to say.
    fn provisioning_status(&self, offset: u64, len: u64) -> Result<Vec<ProvisioningRun>> {
        let _ = offset;
        Ok(if len == 0 {
            Vec::new()
        } else {
            vec![ProvisioningRun { len, mapped: true }]
        })
    }
}

/// What [`BlockDevice::read_async`] started.
pub enum AsyncRead {
    /// Finished without waiting: the filled buffer, or the error.
    Done(Result<Vec<u8>>),
    /// Device reads are in flight; the future yields the filled buffer.
    Pending(Pin<Box<dyn Future<Output = Result<Vec<u8>>> + Send>>),
    /// Not possible without blocking: the buffer, untouched in meaning, for a blocking read.
    Blocking(Vec<u8>),
}

impl std::fmt::Debug for AsyncRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AsyncRead::Done(r) => write!(f, "Done({:?})", r.as_ref().map(|b| b.len())),
            AsyncRead::Pending(_) => f.write_str("Pending"),
            AsyncRead::Blocking(b) => write!(f, "Blocking({})", b.len()),
        }
    }
}

/// Work budget of one provisioning query: a chunk whose blocks need no individual look counts
/// one, any other counts its blocks. Bounds the time the overlay lock is held for reading.
const STATUS_BUDGET: u64 = 1 << 16;

/// A handle for I/O on one volume. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Volume {
    pub(crate) pool: Arc<PoolInner>,
    pub(crate) vol: Arc<VolumeState>,
}

/// Whether a read may wait for device I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    Yes,
    No,
    /// Log blocks on the device, and raw frames of sealed chunks whose frame table is in RAM,
    /// are left for the caller to read asynchronously (see [`Fetched::Deferred`]); anything
    /// else that needs the device is as with `No`.
    Defer,
}

/// Log runs on a device: (device, offset, first block in the output, blocks).
type LogRuns = Vec<(u16, u64, usize, usize)>;

/// Raw frames of a sealed chunk to read for blocks [at, at+blocks) of the output.
#[derive(Debug)]
struct FrameRun {
    plan: crate::shared::FrameRead,
    at: usize,
    blocks: usize,
}

// Fetched is compared in read_nowait only for Done; the plans inside are not comparable.
impl PartialEq for FrameRun {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for FrameRun {}

/// What [`Volume::fetch_as`] did.
#[derive(Debug, PartialEq, Eq)]
enum Fetched {
    /// The output is complete.
    Done,
    /// It would have had to wait (`Wait::No`/`Wait::Defer`); the output is partial.
    WouldBlock,
    /// `Wait::Defer`: everything is in the output but these log runs and chunk frames, still
    /// to be read from their devices (and checked against their CRCs).
    Deferred(LogRuns, Vec<FrameRun>),
}

/// Reads coalesced WAL runs (device, offset, first block in `out`, blocks) straight into an
/// aligned `out`.
fn read_device_runs(
    shared: &crate::shared::Shared,
    runs: &[(u16, u64, usize, usize)],
    out: &mut [u8],
) -> Result<()> {
    let mut ops = Vec::with_capacity(runs.len());
    let mut rest: &mut [u8] = out;
    let mut consumed = 0usize;
    for &(d, off, idx, cnt) in runs {
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
    io::run_batch(&mut ops).map_err(|e| PoolError::io("read of write-ahead log", e))
}

#[derive(Clone, Copy)]
enum Src {
    Zero,
    Wal(Loc),
    Chunk(u64),
    /// Known lost in the batch with this LSN: reads fail.
    Damaged(u64),
}

/// Provisioning of a run of blocks while the overlay lock is held: the base index is looked up
/// after the lock is released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prov {
    Mapped,
    Unmapped,
    /// As chunk `c` of the base index says.
    Base(u64),
}

impl Volume {
    /// Resolves and copies what is in memory right here (under the same brief, non-waiting
    /// lock holds as [`Volume::read_nowait`]); log blocks on the device, and raw frames of
    /// sealed chunks whose frame table is in RAM, are queued on the [`crate::aio`] ring, and the
    /// future copies them in and checks their CRCs. The pool's
    /// pin is held until then, so no extent it reads can be reclaimed and reused meanwhile.
    fn start_read(&self, offset: u64, mut buf: Vec<u8>) -> AsyncRead {
        let len = buf.len() as u64;
        if let Err(e) = self.pool.check_open() {
            return AsyncRead::Done(Err(e));
        }
        if len == 0 || offset % BLOCK != 0 || len % BLOCK != 0 {
            return AsyncRead::Blocking(buf);
        }
        // Without the ring, what is in memory is still answered here (as `read_nowait`).
        let wait = if crate::aio::available() {
            Wait::Defer
        } else {
            Wait::No
        };
        let Some(pin) = self.pool.shared.pin.try_read_arc_for(NOWAIT_LOCK_WAIT) else {
            return AsyncRead::Blocking(buf);
        };
        let (srcs, base_root) = {
            let Some(ov) = self.vol.ov.try_read_for(NOWAIT_LOCK_WAIT) else {
                return AsyncRead::Blocking(buf);
            };
            if let Err(e) = self.check_in(&ov, offset, len) {
                return AsyncRead::Done(Err(e));
            }
            (self.resolve(&ov, offset / BLOCK, len / BLOCK), ov.base_root)
        };
        let (runs, frames) = match self.fetch_as(&srcs, base_root, offset / BLOCK, &mut buf, wait) {
            Err(e) => return AsyncRead::Done(Err(e)),
            Ok(Fetched::Done) => return AsyncRead::Done(Ok(buf)),
            Ok(Fetched::WouldBlock) => return AsyncRead::Blocking(buf),
            Ok(Fetched::Deferred(runs, frames)) => (runs, frames),
        };
        // Log runs first, then chunk frames: the batch's buffers come back in this order.
        let mut reqs = Vec::with_capacity(runs.len() + frames.len());
        let wanted = runs
            .iter()
            .map(|&(d, off, _, cnt)| (d, off, cnt * 4096))
            .chain(
                frames
                    .iter()
                    .map(|f| (f.plan.device, f.plan.offset, f.plan.len)),
            );
        for (d, off, len) in wanted {
            match self.pool.shared.device(d) {
                Ok(dev) => reqs.push(crate::aio::ReadReq {
                    file: dev.file(),
                    offset: off,
                    len,
                }),
                Err(e) => return AsyncRead::Done(Err(e)),
            }
        }
        let Some(batch) = crate::aio::read_batch(&reqs) else {
            return AsyncRead::Blocking(buf);
        };
        // The future owns a handle on the pool: the device files stay open until it is done.
        let vol = self.clone();
        AsyncRead::Pending(Box::pin(async move {
            let _pin = pin;
            let bufs = batch.await.map_err(|e| PoolError::io("device read", e))?;
            let (log_bufs, frame_bufs) = bufs.split_at(runs.len().min(bufs.len()));
            for (&(_, _, idx, cnt), b) in runs.iter().zip(log_bufs) {
                buf[idx * 4096..(idx + cnt) * 4096].copy_from_slice(&b[..cnt * 4096]);
            }
            vol.check_log_runs(&srcs, &runs, &buf)?;
            for (f, b) in frames.iter().zip(frame_bufs) {
                let dst = &mut buf[f.at * 4096..(f.at + f.blocks) * 4096];
                vol.pool.shared.finish_raw_frames(&f.plan, b, dst)?;
            }
            Ok(buf)
        }))
    }

    pub fn id(&self) -> VolumeId {
        VolumeId(self.vol.id)
    }

    fn check(&self, offset: u64, len: u64) -> Result<u64> {
        self.pool.check_open()?;
        let ov = self.vol.ov.read();
        self.check_in(&ov, offset, len)
    }

    /// As [`Volume::check`] under an overlay lock the caller holds.
    fn check_in(&self, ov: &VolOverlay, offset: u64, len: u64) -> Result<u64> {
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
        let _pin = self.pool.shared.pin.read();
        let (srcs, base_root) = {
            let ov = self.vol.ov.read();
            if ov.deleted {
                return Err(PoolError::VolumeDeleted(self.id()));
            }
            (self.resolve(&ov, first, n), ov.base_root)
        };
        self.fetch(&srcs, base_root, first, out)
    }

    /// Where each of blocks [first, first+n) currently lives: the base index's chunk, unless
    /// the frozen overlay (being sealed) says otherwise, unless the active one does. Each
    /// overlay is walked once over the range, not looked up block by block.
    fn resolve(&self, ov: &VolOverlay, first: u64, n: u64) -> Vec<Src> {
        let cb = self.chunk_blocks();
        let mut srcs: Vec<Src> = (first..first + n).map(|b| Src::Chunk(b / cb)).collect();
        for (&b, &lsn) in ov.base_damaged.range(first..first + n) {
            srcs[(b - first) as usize] = Src::Damaged(lsn);
        }
        for layer in [ov.frozen.as_deref(), Some(&ov.active)]
            .into_iter()
            .flatten()
        {
            layer.for_each_in(first, n, cb, |b, l| {
                srcs[(b - first) as usize] = match l {
                    Lookup::Data(loc) => Src::Wal(loc),
                    Lookup::Damaged(lsn) => Src::Damaged(lsn),
                    Lookup::Zero | Lookup::Below => Src::Zero,
                }
            });
        }
        srcs
    }

    /// Fills `out` with the blocks `srcs` (resolved for blocks from `first` on) point at. The
    /// caller holds the pool's pin, so that nothing they point at is reclaimed meanwhile.
    fn fetch(
        &self,
        srcs: &[Src],
        base_root: Option<Digest>,
        first: u64,
        out: &mut [u8],
    ) -> Result<()> {
        self.fetch_as(srcs, base_root, first, out, Wait::Yes)
            .map(|_| ())
    }

    /// Checks log blocks read from their device against their batches' CRCs.
    fn check_log_runs(
        &self,
        srcs: &[Src],
        runs: &[(u16, u64, usize, usize)],
        out: &[u8],
    ) -> Result<()> {
        for &(_, _, idx, cnt) in runs {
            for k in idx..idx + cnt {
                if let Src::Wal(loc) = srcs[k] {
                    self.pool
                        .wal
                        .check_read(&loc, &out[k * 4096..(k + 1) * 4096])?;
                }
            }
        }
        Ok(())
    }

    /// As [`Volume::fetch`]; with `Wait::No` it stops as soon as a block would need device
    /// I/O (`out` is then partly filled), with `Wait::Defer` it leaves log reads to the caller.
    /// `out` need not be aligned: device reads go through aligned bounce buffers when it is not.
    fn fetch_as(
        &self,
        srcs: &[Src],
        base_root: Option<Digest>,
        first: u64,
        out: &mut [u8],
        wait: Wait,
    ) -> Result<Fetched> {
        let cb = self.chunk_blocks();
        let shared = &self.pool.shared;
        // WAL blocks: from memory if there, else batched device reads (coalesced).
        let mut dev_reads: Vec<(u16, u64, usize, usize)> = Vec::new(); // device, offset, out index, blocks
        let mut frame_reads: Vec<FrameRun> = Vec::new();
        let mut i = 0usize;
        while i < srcs.len() {
            let mut j = i + 1;
            match srcs[i] {
                Src::Zero => out[i * 4096..j * 4096].fill(0),
                Src::Chunk(_) => {}
                Src::Damaged(lsn) => {
                    return Err(PoolError::Checksum {
                        what: format!(
                            "{} block {} (its data was lost in damaged log batch {lsn}; \
                             rewrite it or restore it from a snapshot)",
                            self.id(),
                            first + i as u64
                        ),
                    });
                }
                Src::Wal(loc) => {
                    // Blocks stored one after another in one batch are copied (or read) at once.
                    while let Some(Src::Wal(next)) = srcs.get(j)
                        && next.follows(&loc, (j - i) as u64)
                    {
                        j += 1;
                    }
                    let in_memory = self
                        .pool
                        .wal
                        .read_from_memory(&loc, &mut out[i * 4096..j * 4096]);
                    if !in_memory {
                        if wait == Wait::No {
                            return Ok(Fetched::WouldBlock);
                        }
                        let cnt = j - i;
                        match dev_reads.last_mut() {
                            Some((d, off, idx, n))
                                if *d == loc.device
                                    && *off + (*n as u64) * 4096 == loc.offset
                                    && *idx + *n == i =>
                            {
                                *n += cnt
                            }
                            _ => dev_reads.push((loc.device, loc.offset, i, cnt)),
                        }
                    }
                }
            }
            i = j;
        }
        if !dev_reads.is_empty() && wait == Wait::Yes {
            self.read_log_runs(&dev_reads, out)?;
            // Every block read from the log's device is checked against its batch's CRC.
            self.check_log_runs(srcs, &dev_reads, out)?;
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
            let digest = match wait {
                Wait::Yes => self.pool.chunk_digest(base_root, c)?,
                Wait::No | Wait::Defer => match self.pool.chunk_digest_cached(base_root, c) {
                    Some(d) => d,
                    None => return Ok(Fetched::WouldBlock),
                },
            };
            match digest {
                None => dst.fill(0),
                Some(d) => {
                    // Only the frames the blocks fall in are read (and cached), unless the
                    // cache holds them or the whole chunk.
                    let within = ((first + i as u64) % cb * BLOCK) as usize;
                    match wait {
                        Wait::Yes => shared.read_chunk_range(&d, within, dst)?,
                        Wait::No => {
                            if !shared.read_chunk_range_cached(&d, within, dst) {
                                return Ok(Fetched::WouldBlock);
                            }
                        }
                        Wait::Defer => {
                            if !shared.read_chunk_range_cached(&d, within, dst) {
                                match shared.plan_raw_frames(&d, within, dst.len()) {
                                    Some(plan) => frame_reads.push(FrameRun {
                                        plan,
                                        at: i,
                                        blocks: j - i,
                                    }),
                                    None => return Ok(Fetched::WouldBlock),
                                }
                            }
                        }
                    }
                }
            }
            i = j;
        }
        Ok(
            if (dev_reads.is_empty() && frame_reads.is_empty()) || wait == Wait::Yes {
                Fetched::Done
            } else {
                Fetched::Deferred(dev_reads, frame_reads)
            },
        )
    }

    /// Reads coalesced log runs (device, offset, first block in `out`, blocks) into `out`,
    /// through aligned bounce buffers when `out` is not aligned (O_DIRECT needs it).
    fn read_log_runs(&self, dev_reads: &[(u16, u64, usize, usize)], out: &mut [u8]) -> Result<()> {
        let shared = &self.pool.shared;
        if (out.as_ptr() as usize) % io::ALIGN == 0 {
            read_device_runs(shared, dev_reads, out)?;
        } else {
            // O_DIRECT needs aligned memory: read into bounce buffers, then copy.
            let mut bounce: Vec<AlignedBuf> = dev_reads
                .iter()
                .map(|&(_, _, _, cnt)| AlignedBuf::zeroed(cnt * 4096))
                .collect();
            let mut ops = Vec::with_capacity(dev_reads.len());
            for (&(d, off, _, _), buf) in dev_reads.iter().zip(bounce.iter_mut()) {
                ops.push(Op::Read {
                    file: shared.device(d)?.file(),
                    offset: off,
                    buf: &mut buf[..],
                });
            }
            io::run_batch(&mut ops).map_err(|e| PoolError::io("read of write-ahead log", e))?;
            drop(ops);
            for (&(_, _, idx, cnt), buf) in dev_reads.iter().zip(&bounce) {
                out[idx * 4096..(idx + cnt) * 4096].copy_from_slice(buf);
            }
        }
        Ok(())
    }

    /// Zeroes whole 4 KiB blocks [first, first+n) (stored as nothing).
    fn zero_blocks(&self, first: u64, n: u64) -> Result<()> {
        let cb = self.chunk_blocks();
        let mut ov = self.vol.ov.write();
        if ov.deleted {
            return Err(PoolError::VolumeDeleted(self.id()));
        }
        let vid = self.vol.id;
        self.pool.wal.append(vid, first, n, None, |p, released| {
            ov.active.set_zero(p.block, p.nblocks, cb, released)
        })
    }

    /// Reads block `b` as the overlay `ov` (held by the caller, with the pin) resolves it.
    fn read_block_locked(&self, ov: &VolOverlay, b: u64) -> Result<AlignedBuf> {
        let mut buf = AlignedBuf::zeroed(BLOCK as usize);
        let srcs = self.resolve(ov, b, 1);
        self.fetch(&srcs, ov.base_root, b, &mut buf)?;
        Ok(buf)
    }

    /// Writes `data` (already checked: block-size aligned and in range, not empty) at byte
    /// `offset` in one hold of the overlay lock. Partial 4 KiB blocks at either end are read,
    /// merged and appended inside that hold, so the read-modify-write cannot interleave with
    /// another write to the same block. With `atomic` the whole write is one WAL batch entry
    /// (see [`crate::wal::Wal::append_atomic`]); otherwise it may be split across batches.
    fn write_locked(&self, offset: u64, data: &[u8], atomic: bool) -> Result<()> {
        let len = data.len() as u64;
        let end = offset + len;
        let first = offset / BLOCK;
        let last = end.div_ceil(BLOCK);
        let head_skip = (offset % BLOCK) as usize;
        let tail_fill = (end % BLOCK) as usize;
        let partial = head_skip != 0 || tail_fill != 0;
        // Reading partial blocks may touch sealed chunks: keep them from being reclaimed. The
        // pin is taken before the overlay lock, in the order readers and folds take them.
        let _pin = partial.then(|| self.pool.shared.pin.read());
        let mut ov = self.vol.ov.write();
        if ov.deleted {
            return Err(PoolError::VolumeDeleted(self.id()));
        }
        // The write as whole blocks: an optional merged head block, the aligned middle taken
        // from `data` as it is, an optional merged tail block.
        let mut head: Option<AlignedBuf> = None;
        let mut tail: Option<AlignedBuf> = None;
        let mut middle = data;
        if last - first == 1 && partial {
            let mut b = self.read_block_locked(&ov, first)?;
            b[head_skip..head_skip + data.len()].copy_from_slice(data);
            head = Some(b);
            middle = &[];
        } else {
            if head_skip != 0 {
                let take = BLOCK as usize - head_skip;
                let mut b = self.read_block_locked(&ov, first)?;
                b[head_skip..].copy_from_slice(&data[..take]);
                head = Some(b);
                middle = &middle[take..];
            }
            if tail_fill != 0 {
                let mut b = self.read_block_locked(&ov, last - 1)?;
                let (rest, tail_data) = middle.split_at(middle.len() - tail_fill);
                b[..tail_fill].copy_from_slice(tail_data);
                tail = Some(b);
                middle = rest;
            }
        }
        let parts: Vec<&[u8]> = [head.as_deref(), Some(middle), tail.as_deref()]
            .into_iter()
            .flatten()
            .filter(|p| !p.is_empty())
            .collect();
        let vid = self.vol.id;
        let wal = &self.pool.wal;
        if atomic {
            return wal.append_atomic(vid, first, &parts, |p, released| {
                if let Some(loc) = p.loc {
                    ov.active.set_data(p.block, p.nblocks, loc, released);
                }
            });
        }
        let mut block = first;
        for part in parts {
            let n = part.len() as u64 / BLOCK;
            let current = ov.active.data_runs(block, n);
            wal.write_data(vid, block, part, &current, |p, released| {
                if let Some(loc) = p.loc {
                    ov.active.set_data(p.block, p.nblocks, loc, released);
                }
            })?;
            block += n;
        }
        Ok(())
    }

    /// Provisioning of blocks [first, end) as the overlay says, in runs, within the work budget
    /// (always at least one block).
    fn scan_provisioning(&self, ov: &VolOverlay, first: u64, end: u64) -> Vec<(u64, u64, Prov)> {
        let cb = self.chunk_blocks();
        let mut runs: Vec<(u64, u64, Prov)> = Vec::new();
        let mut push = |start: u64, n: u64, p: Prov| match runs.last_mut() {
            Some(last) if last.2 == p && last.0 + last.1 == start => last.1 += n,
            _ => runs.push((start, n, p)),
        };
        let touches = |o: &crate::overlay::Overlay, c: u64, from: u64, to: u64| {
            o.chunk_zeroed(c) || o.blocks.range(from..to).next().is_some()
        };
        let mut budget = STATUS_BUDGET;
        let mut b = first;
        while b < end && budget > 0 {
            let c = b / cb;
            // Whole chunks zeroed in the active overlay with no block written since: one
            // deallocated run, however long (a discarded or sanitized volume).
            let zeroed_to = ov
                .active
                .zeroed
                .range(..=c)
                .next_back()
                .filter(|(_, e)| c < **e)
                .map(|(_, e)| e.saturating_mul(cb).min(end));
            if let Some(to) = zeroed_to
                && ov.active.blocks.range(b..to).next().is_none()
            {
                push(b, to - b, Prov::Unmapped);
                b = to;
                budget -= 1;
                continue;
            }
            let chunk_end = (c + 1).saturating_mul(cb).min(end);
            let frozen_touches = ov
                .frozen
                .as_ref()
                .is_some_and(|f| touches(f, c, b, chunk_end));
            if !touches(&ov.active, c, b, chunk_end) && !frozen_touches {
                push(b, chunk_end - b, Prov::Base(c));
                budget -= 1;
            } else {
                for x in b..chunk_end {
                    let mut l = ov.active.lookup(x, cb);
                    if l == Lookup::Below
                        && let Some(f) = &ov.frozen
                    {
                        l = f.lookup(x, cb);
                    }
                    let p = match l {
                        Lookup::Data(_) | Lookup::Damaged(_) => Prov::Mapped,
                        Lookup::Zero => Prov::Unmapped,
                        Lookup::Below => Prov::Base(c),
                    };
                    push(x, 1, p);
                }
                budget = budget.saturating_sub(chunk_end - b);
            }
            b = chunk_end;
        }
        runs
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
        if offset % BLOCK == 0 && len % BLOCK == 0 {
            return self.read_blocks(first, last - first, buf);
        }
        let mut tmp = AlignedBuf::zeroed(((last - first) * BLOCK) as usize);
        self.read_blocks(first, last - first, &mut tmp)?;
        let skip = (offset - first * BLOCK) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    fn read_nowait(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let len = buf.len() as u64;
        self.pool.check_open()?;
        if offset % BLOCK != 0 || len % BLOCK != 0 {
            return Ok(false);
        }
        // Whoever holds these exclusively (reclaim, a fold's switch, a write) is brief, but not
        // ours to wait for.
        let Some(_pin) = self.pool.shared.pin.try_read_for(NOWAIT_LOCK_WAIT) else {
            return Ok(false);
        };
        let (srcs, base_root) = {
            let Some(ov) = self.vol.ov.try_read_for(NOWAIT_LOCK_WAIT) else {
                return Ok(false);
            };
            self.check_in(&ov, offset, len)?;
            (self.resolve(&ov, offset / BLOCK, len / BLOCK), ov.base_root)
        };
        Ok(self.fetch_as(&srcs, base_root, offset / BLOCK, buf, Wait::No)? == Fetched::Done)
    }

    fn read_async(&self, offset: u64, buf: Vec<u8>) -> AsyncRead {
        let read = self.start_read(offset, buf);
        let c = &self.pool.shared.async_reads;
        match &read {
            AsyncRead::Done(_) => &c.in_memory,
            AsyncRead::Pending(_) => &c.device,
            AsyncRead::Blocking(_) => &c.blocking,
        }
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        read
    }

    fn write_nowait(&self, offset: u64, data: &[u8]) -> Result<bool> {
        let len = data.len() as u64;
        self.pool.check_open()?;
        // Partial 4 KiB blocks need a read-modify-write, which may read the device.
        if len == 0 || offset % BLOCK != 0 || len % BLOCK != 0 {
            return Ok(false);
        }
        if self.pool.log_space_low() {
            return Ok(false);
        }
        let Some(mut ov) = self.vol.ov.try_write_for(NOWAIT_LOCK_WAIT) else {
            return Ok(false);
        };
        self.check_in(&ov, offset, len)?;
        let current = ov.active.data_runs(offset / BLOCK, len / BLOCK);
        self.pool.wal.write_data_nowait(
            self.vol.id,
            offset / BLOCK,
            data,
            &current,
            |p, released| {
                if let Some(loc) = p.loc {
                    ov.active.set_data(p.block, p.nblocks, loc, released);
                }
            },
        )
    }

    #[tracing::instrument(level = "trace", skip(self, data), fields(volume = self.vol.id, len = data.len()))]
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        if len == 0 {
            return if fua { self.flush() } else { Ok(()) };
        }
        self.pool.wait_for_log_space();
        self.write_locked(offset, data, false)?;
        if fua { self.flush() } else { Ok(()) }
    }

    /// The WAL's atomic limit, less what a misaligned start on a 512-byte volume adds in
    /// read-modify-write (the write's covering 4 KiB blocks must fit in one batch).
    fn atomic_write_max(&self) -> u64 {
        let bs = u64::from(self.vol.block_size);
        let worst_head = BLOCK.saturating_sub(bs);
        self.pool.wal.max_atomic_bytes().saturating_sub(worst_head)
    }

    /// All-or-nothing for readers: the overlay changes for every block of the write in one hold
    /// of the overlay lock (partial head/tail blocks merged inside it), and reads resolve all
    /// their blocks in one hold. Across a crash: the write is one entry of one WAL batch, which
    /// replay applies whole or not at all. Durable on return with `fua`.
    #[tracing::instrument(level = "trace", skip(self, data), fields(volume = self.vol.id, len = data.len()))]
    fn write_atomic(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        let max = self.atomic_write_max();
        if len > max {
            return Err(PoolError::AtomicWriteTooLarge { len, max });
        }
        if len == 0 {
            return if fua { self.flush() } else { Ok(()) };
        }
        self.pool.wait_for_log_space();
        self.write_locked(offset, data, true)?;
        if fua { self.flush() } else { Ok(()) }
    }

    fn provisioning_status(&self, offset: u64, len: u64) -> Result<Vec<ProvisioningRun>> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len;
        let _pin = self.pool.shared.pin.read();
        let (runs, base_root) = {
            let ov = self.vol.ov.read();
            if ov.deleted {
                return Err(PoolError::VolumeDeleted(self.id()));
            }
            let runs = self.scan_provisioning(&ov, offset / BLOCK, end.div_ceil(BLOCK));
            (runs, ov.base_root)
        };
        // Base chunks are mapped when stored; an all-zero chunk is never stored.
        let mut out: Vec<ProvisioningRun> = Vec::with_capacity(runs.len());
        for (start, n, p) in runs {
            let mapped = match p {
                Prov::Mapped => true,
                Prov::Unmapped => false,
                Prov::Base(c) => self.pool.chunk_digest(base_root, c)?.is_some(),
            };
            // Byte range of the run, clipped to the request (512-byte volumes start and end
            // inside 4 KiB blocks).
            let from = (start * BLOCK).max(offset);
            let to = ((start + n) * BLOCK).min(end);
            let len = to.saturating_sub(from);
            match out.last_mut() {
                Some(last) if last.mapped == mapped => last.len += len,
                _ if len > 0 => out.push(ProvisioningRun { len, mapped }),
                _ => {}
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<()> {
        self.pool.check_open()?;
        self.pool.wal.flush_volume(self.vol.id)
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
            self.zero_blocks(first, end - first)?;
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
    /// As [`PoolInner::chunk_digest`] from the RAM cache only; None if an index node is not
    /// cached.
    pub(crate) fn chunk_digest_cached(
        &self,
        root: Option<Digest>,
        c: u64,
    ) -> Option<Option<Digest>> {
        let Some(root) = root else {
            return Some(None);
        };
        let fan = crate::index::LEAF_FANOUT;
        let r = self.shared.node_cached(&root)?;
        let Some(Some(leaf)) = r.entries.get((c / fan) as usize) else {
            return Some(None);
        };
        let l = self.shared.node_cached(leaf)?;
        Some(l.entries.get((c % fan) as usize).copied().flatten())
    }

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
