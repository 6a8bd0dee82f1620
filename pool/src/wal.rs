//! The write-ahead log: every write to a live volume is appended here before it is
//! acknowledged, and it is durable once the log is flushed (group commit: one fdatasync serves
//! every flush waiting at that moment).
//!
//! The log is a chain of segments (extents allocated on the fastest durable tier, listed in the
//! metadata store). A segment holds batches: a header block, data blocks and a footer block
//! (format in [`crate::walfmt`]: every data block has its own CRC, and every header the durable
//! LSN when it was written). Replay ([`crate::replay`]) applies a batch whole or not at all; an
//! append is normally split across batches when the open one fills up, but
//! [`Wal::append_atomic`] never splits, which makes an atomic write all-or-nothing across a
//! crash. A batch that fails its checks is discarded as torn only if it can have been in flight
//! at the crash (above the durable LSN); a durable one is damage: its blocks read as medium
//! errors and the damage is recorded, never silently rolled back.
//! After an open, appends always go to a fresh segment, so the bytes replay reads in older
//! segments never change again and replay is deterministic.
//!
//! **Write buffer.** Closed batches wait in the RAM tier (up to `write_buffer_bytes`, at most
//! `write_back_delay`) before the flusher hands them to their device, unless a flush asks for
//! them first. While a batch waits, a new write of a block it holds replaces the block in place
//! ([`Wal::write_data`]): a volume rewritten while its data is still buffered costs no device
//! bandwidth, as with a page cache or a controller's write cache. Only unflushed writes can be
//! lost in a crash, as with any volatile write cache; a batch's header and CRCs are computed when
//! it is handed to its device, so replay sees exactly what was written last.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::alloc::Placement;
use crate::error::{PoolError, Result};
use crate::io::{self, AlignedBuf, Op};
use crate::meta::{self, SEGMENTS, SegRec};
use crate::overlay::Loc;
use crate::shared::Shared;
use crate::types::{BLOCK, Extent};

use crate::walfmt::{self, BatchHeader};
pub use crate::walfmt::{
    Entry, EntryKind, MAX_BATCH_DATA, WAL_FORMAT_VERSION, WAL_MAGIC, batch_len, fits,
};

/// How long a non-blocking call waits for a lock another thread holds for a moment (the
/// flusher taking batches, another append) before it declines.
pub const NOWAIT_LOCK_WAIT: Duration = Duration::from_micros(50);
/// Size of a batch buffer: the header block, the most data a batch holds, the footer block.
const BATCH_BUF_LEN: usize = 4096 + MAX_BATCH_DATA + 4096;
/// Spare batch buffers kept for reuse: as many as can be in flight at once. The flusher hands
/// batches to the device, and the log cache evicts them, in groups of up to that many; a
/// smaller reserve freed part of every group only to allocate (page-fault and zero) as many
/// fresh 2 MiB buffers for the next, which cost a fifth of the CPU of a sequential write.
const MAX_SPARE_BUFFERS: usize = MAX_INFLIGHT_BYTES / MAX_BATCH_DATA;
/// Appenders wait when this much more than the write buffer is in memory but not yet written.
pub const MAX_INFLIGHT_BYTES: usize = 64 << 20;
/// How long the log stays idle after a sync before the pool records the new durable LSN in
/// the metadata store (so the last flushed batches are known durable at replay).
const ANCHOR_IDLE: Duration = Duration::from_millis(20);

/// The CRCs of a written batch's data blocks, to check every read of them from the device.
#[derive(Debug)]
pub struct BatchSums {
    pub device: u16,
    /// Device offset of the first data block.
    pub data_offset: u64,
    pub crcs: Box<[u32]>,
}

impl BatchSums {
    /// The stored CRC of the data block at device offset `offset`, if this batch holds it.
    fn crc_at(&self, device: u16, offset: u64) -> Option<u32> {
        if device != self.device {
            return None;
        }
        let at = offset.checked_sub(self.data_offset)?;
        if at % 4096 != 0 {
            return None;
        }
        self.crcs.get(usize::try_from(at / 4096).ok()?).copied()
    }
}

/// A batch in the write buffer: the open one, or a closed one not yet handed to its device.
/// Its blocks may still be overwritten in place.
#[derive(Debug)]
struct OpenBatch {
    lsn: u64,
    seg_seq: u64,
    device: u16,
    /// Device offset of the header block.
    offset: u64,
    entries: Vec<Entry>,
    buf: AlignedBuf,
    data_len: usize,
    /// CRC32C of each data block, computed as the block is copied in (while it is in the CPU's
    /// cache: a second pass over a 2 MiB batch at encode time read it back from memory) and
    /// again whenever a block is replaced in place.
    crcs: Vec<u32>,
    /// When it was opened: the write buffer hands it to its device `write_back_delay` later.
    born: Instant,
}

impl OpenBatch {
    /// Appends whole blocks after the data, with their CRCs, block by block.
    fn push_blocks(&mut self, src: &[u8]) {
        for block in src.chunks(BLOCK as usize) {
            let at = 4096 + self.data_len;
            let dst = &mut self.buf[at..at + block.len()];
            dst.copy_from_slice(block);
            self.crcs.push(crc32c::crc32c(dst));
            self.data_len += block.len();
        }
    }

    /// Recomputes the CRCs of the data blocks in the buffer's byte range `range` (after the
    /// bytes there changed or were appended).
    fn update_crcs(&mut self, range: std::ops::Range<usize>) {
        let first = (range.start - 4096) / BLOCK as usize;
        let last = (range.end - 4096).div_ceil(BLOCK as usize);
        self.crcs.resize(self.crcs.len().max(last), 0);
        for i in first..last {
            let at = 4096 + i * BLOCK as usize;
            self.crcs[i] = crc32c::crc32c(&self.buf[at..at + BLOCK as usize]);
        }
    }

    /// The data blocks at `loc` (`len` bytes), if this batch holds them.
    fn data_range(&self, loc: &Loc, len: usize) -> Option<std::ops::Range<usize>> {
        if loc.lsn != self.lsn {
            return None;
        }
        let at = usize::try_from(loc.offset.checked_sub(self.offset)?).ok()?;
        (at >= 4096 && at + len <= 4096 + self.data_len).then_some(at..at + len)
    }
}

/// A batch handed to its device (being written, then kept in the log cache). Immutable.
#[derive(Debug)]
struct Batch {
    lsn: u64,
    device: u16,
    offset: u64,
    /// The batch as it lands on its device, written in one request: the header block, the
    /// data blocks, the footer block.
    buf: AlignedBuf,
    /// Its data blocks' CRCs, to check reads of them from the device once it is written.
    sums: Arc<BatchSums>,
}

impl Batch {
    /// Seals a buffered batch for its device: header and footer encoded around its data,
    /// claiming `durable_lsn` (the highest LSN a completed sync covers now: still true when
    /// the batch lands later).
    fn from_buffered(ob: OpenBatch, durable_lsn: u64) -> Batch {
        debug_assert_eq!(
            ob.crcs,
            ob.buf[4096..4096 + ob.data_len]
                .chunks_exact(4096)
                .map(crc32c::crc32c)
                .collect::<Vec<u32>>(),
            "a batch's CRCs follow every change of its data"
        );
        let h = BatchHeader {
            seg_seq: ob.seg_seq,
            lsn: ob.lsn,
            durable_lsn,
            entries: ob.entries,
            crcs: ob.crcs,
        };
        let mut buf = ob.buf;
        // Every batch buffer has room for the footer (BATCH_BUF_LEN, or a tight copy's).
        buf.set_len(4096 + ob.data_len + 4096);
        walfmt::encode(&mut buf[..4096], &h, false);
        walfmt::encode(&mut buf[4096 + ob.data_len..], &h, true);
        Batch {
            lsn: ob.lsn,
            device: ob.device,
            offset: ob.offset,
            buf,
            sums: Arc::new(BatchSums {
                device: ob.device,
                data_offset: ob.offset + 4096,
                crcs: h.crcs.into_boxed_slice(),
            }),
        }
    }

    /// Raises the durable LSN its header and footer claim (see [`walfmt::restamp_durable`]).
    fn restamp_durable(&mut self, durable_lsn: u64) {
        let footer = self.buf.len() - 4096;
        walfmt::restamp_durable(&mut self.buf[..4096], durable_lsn);
        walfmt::restamp_durable(&mut self.buf[footer..], durable_lsn);
    }
}

#[derive(Debug)]
pub struct Segment {
    pub seq: u64,
    pub rec: SegRec,
    /// Highest batch LSN per volume with entries in this segment.
    pub vols: HashMap<u64, u64>,
    /// The log cleaner's count: data blocks of this segment an overlay still points at, plus
    /// one per zeroing entry (those stay until a fold: replay needs them). At 0 every block
    /// was overwritten by a later append, and the segment can go without a fold once those
    /// appends are durable.
    pub live: u64,
    /// LSN of the latest append that overwrote a block of this segment.
    pub clean_after: u64,
    /// The count went wrong (released more than it held), or the segment holds damage: never
    /// cleaned, only folded away (a fold records the damage in the volume's base first).
    pub suspect: bool,
    /// Highest LSN of a batch placed in it (0: none yet).
    pub last_lsn: u64,
}

impl Segment {
    /// Nothing of it is in memory or being written any more: not the segment appends go to
    /// (`cur`), and every batch of it is on its device (`written`).
    fn settled(&self, cur: Option<u64>, written: u64) -> bool {
        Some(self.seq) != cur && self.vols.values().all(|&max| max <= written)
    }

    /// The cleaner's count says every block of it was overwritten: it may go once the
    /// appends that overwrote it (up to `clean_after`) are durable.
    fn overwritten(&self) -> bool {
        self.live == 0 && !self.suspect
    }

    pub fn new(seq: u64, rec: SegRec) -> Segment {
        Segment {
            seq,
            rec,
            vols: HashMap::new(),
            live: 0,
            clean_after: 0,
            suspect: false,
            last_lsn: 0,
        }
    }
}

#[derive(Debug)]
struct CurSeg {
    seq: u64,
    extent: Extent,
    pos: u64,
}

#[derive(Debug, Default)]
struct LogState {
    segments: BTreeMap<u64, Segment>,
    /// First LSN -> segment seq, to find the segment of a log location.
    by_lsn: BTreeMap<u64, u64>,
    /// Scratch for the locations an append's overlay update released.
    released: Vec<Loc>,
    cur: Option<CurSeg>,
    open: Option<OpenBatch>,
    /// Closed batches in the write buffer, by LSN (all below the open batch's).
    buffered: BTreeMap<u64, OpenBatch>,
    /// Buffer capacity held by `buffered` and the open batch.
    buffered_bytes: usize,
    /// Batches handed to the flusher and not yet written, by LSN.
    inflight: BTreeMap<u64, Arc<Batch>>,
    inflight_bytes: usize,
    next_lsn: u64,
    sync_target: u64,
    dirty_devices: HashSet<u16>,
    failed: Option<String>,
    shutdown: bool,
    /// Stopped as by a crash: the flusher writes nothing more (see [`Wal::abandon`]).
    abandoned: bool,
    /// Highest LSN of a batch with entries of each volume: what a flush of that volume must
    /// make durable (the log is one chain, so batches before it go too, but none after it).
    vol_last: HashMap<u64, u64>,
    /// Highest LSN of a written batch with entries (anchors have none).
    last_data: u64,
    /// When the last sync completed.
    last_sync: Option<Instant>,
}

/// Written batches kept in memory: the RAM tier's log cache. Reads of recently written blocks
/// then need no device I/O (and can be served without blocking). LSNs are never reused, so an
/// entry can never describe other data than its LSN's; entries whose blocks were overwritten,
/// folded or reclaimed simply age out, oldest first, once the cache is over its byte budget.
#[derive(Debug, Default)]
struct LogCache {
    batches: BTreeMap<u64, Arc<Batch>>,
    bytes: usize,
}

impl LogCache {
    /// Takes out the oldest batches until the cache holds at most `limit` bytes; the caller
    /// recycles them outside the lock.
    fn evict_to(&mut self, limit: usize) -> Vec<Arc<Batch>> {
        let mut evicted = Vec::new();
        while self.bytes > limit {
            let Some((_, old)) = self.batches.pop_first() else {
                break;
            };
            self.bytes -= old.buf.capacity();
            evicted.push(old);
        }
        evicted
    }
}

#[derive(Debug)]
pub struct Wal {
    shared: Arc<Shared>,
    st: Mutex<LogState>,
    cache: RwLock<LogCache>,
    /// Byte budget of `cache` (0: no log cache). Adjustable at runtime (the RAM tier's
    /// watcher): see [`Wal::set_cache_limit`].
    cache_limit: AtomicUsize,
    /// The write buffer's byte budget (0: batches go to their device as soon as they close,
    /// and the open one closes whenever the flusher is idle). Adjustable at runtime between
    /// non-zero values: see [`Wal::set_buffer_limit`].
    buffer_limit: AtomicUsize,
    /// Longest a batch waits in the write buffer.
    buffer_delay: Duration,
    /// Device bytes held by log segments (what [`Wal::usage`] sums, without its lock).
    segment_bytes: AtomicU64,
    /// Batch buffers to reuse: a fresh one costs page faults and zeroing for each of its pages.
    spare: Mutex<Vec<AlignedBuf>>,
    work: Condvar,
    done: Condvar,
    /// Every batch with LSN <= written is on its device (maybe not yet durable).
    written: AtomicU64,
    /// Every batch with LSN <= synced is durable.
    synced: AtomicU64,
    segment_size: u64,
}

/// The log's runtime knobs (see [`crate::OpenOptions`]).
#[derive(Clone, Copy, Debug)]
pub struct WalOptions {
    pub segment_bytes: u64,
    /// The log cache's byte budget.
    pub cache_bytes: usize,
    pub write_buffer_bytes: usize,
    pub write_back_delay: Duration,
}

/// One contiguous piece of an append, reported to the caller to update its overlay.
#[derive(Clone, Copy, Debug)]
pub struct Piece {
    pub block: u64,
    pub nblocks: u64,
    pub loc: Option<Loc>,
}

/// What replay found.
#[derive(Debug)]
pub struct Replayed {
    pub next_lsn: u64,
    pub segments: Vec<Segment>,
    pub batches: u64,
    /// Data-block CRCs of every replayed batch, by LSN.
    pub sums: BTreeMap<u64, Arc<BatchSums>>,
    /// Highest LSN known durable.
    pub durable_lsn: u64,
    /// Damage found (durable batches that failed their checks).
    pub damage: Vec<crate::replay::FoundDamage>,
    /// Segments of earlier runs whose end was not recorded or where replay's chain ended
    /// early: (seq, end LSN) to record, so later replays read exactly the same batches.
    pub ends: Vec<(u64, u64)>,
}

impl Replayed {
    /// Counts, for the log cleaner, the log locations the replayed overlays point at.
    pub fn count_live(&mut self, locs: impl Iterator<Item = Loc>) {
        let by_lsn: BTreeMap<u64, usize> = self
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| (s.rec.first_lsn, i))
            .collect();
        for l in locs {
            if let Some((_, &i)) = by_lsn.range(..=l.lsn).next_back() {
                self.segments[i].live += 1;
            }
        }
    }
}

/// Whether a piece of `kind` for blocks from `block` of volume `vol` continues entry `last`.
fn extends(last: &Entry, vol: u64, kind: EntryKind, block: u64) -> bool {
    last.vol == vol && last.kind == kind && last.block + last.nblocks as u64 == block
}

impl LogState {
    /// The batch `lsn` if it is still in the write buffer (open, or closed and not yet handed
    /// to its device).
    fn buffered_batch(&self, lsn: u64) -> Option<&OpenBatch> {
        match self.open.as_ref().filter(|o| o.lsn == lsn) {
            Some(ob) => Some(ob),
            None => self.buffered.get(&lsn),
        }
    }

    fn buffered_batch_mut(&mut self, lsn: u64) -> Option<&mut OpenBatch> {
        match self.open.as_mut().filter(|o| o.lsn == lsn) {
            Some(ob) => Some(ob),
            None => self.buffered.get_mut(&lsn),
        }
    }

    /// The segment holding log location `loc`.
    fn segment_of(&mut self, loc: &Loc) -> Option<&mut Segment> {
        let (_, &seq) = self.by_lsn.range(..=loc.lsn).next_back()?;
        self.segments.get_mut(&seq)
    }

    /// The log cleaner's accounting for one appended piece: its blocks (or a zeroing entry's
    /// pin) count in the current segment; the locations its overlay update released no longer
    /// count in theirs, which may be cleaned once `lsn` is durable.
    fn account(&mut self, piece: &Piece, lsn: u64) {
        let add = if piece.loc.is_some() {
            piece.nblocks
        } else {
            1
        };
        if let Some(seq) = self.cur.as_ref().map(|c| c.seq)
            && let Some(seg) = self.segments.get_mut(&seq)
        {
            seg.live += add;
        }
        let released = std::mem::take(&mut self.released);
        self.release(&released, lsn);
        self.released = released;
        self.released.clear();
    }

    fn release(&mut self, locs: &[Loc], lsn: u64) {
        for l in locs {
            if let Some(seg) = self.segment_of(l) {
                match seg.live.checked_sub(1) {
                    Some(n) => seg.live = n,
                    None => {
                        if !seg.suspect {
                            tracing::warn!(
                                segment = seg.seq,
                                "WAL cleaner: count below zero; this segment waits for a fold"
                            );
                        }
                        seg.suspect = true;
                    }
                }
                seg.clean_after = seg.clean_after.max(lsn);
            }
        }
    }

    fn insert_segment(&mut self, seg: Segment) {
        self.by_lsn.insert(seg.rec.first_lsn, seg.seq);
        self.segments.insert(seg.seq, seg);
    }

    fn remove_segment(&mut self, seq: u64) -> Option<Segment> {
        let seg = self.segments.remove(&seq)?;
        if self.by_lsn.get(&seg.rec.first_lsn) == Some(&seq) {
            self.by_lsn.remove(&seg.rec.first_lsn);
        }
        Some(seg)
    }
}

impl Wal {
    pub fn new(shared: Arc<Shared>, opts: WalOptions, mut replayed: Replayed) -> Wal {
        shared
            .log_sums
            .write()
            .extend(std::mem::take(&mut replayed.sums));
        let last = replayed.next_lsn.saturating_sub(1);
        let segment_bytes = replayed.segments.iter().map(|s| s.rec.extent.len).sum();
        // Pool::open syncs every device after replay: what replay read is durable.
        let mut st = LogState {
            next_lsn: replayed.next_lsn,
            sync_target: last,
            last_data: last,
            ..Default::default()
        };
        for s in replayed.segments {
            st.insert_segment(s);
        }
        Wal {
            shared,
            st: Mutex::new(st),
            cache: RwLock::new(LogCache::default()),
            cache_limit: AtomicUsize::new(opts.cache_bytes),
            buffer_limit: AtomicUsize::new(opts.write_buffer_bytes),
            buffer_delay: opts.write_back_delay,
            spare: Mutex::new(Vec::new()),
            segment_bytes: AtomicU64::new(segment_bytes),
            work: Condvar::new(),
            done: Condvar::new(),
            written: AtomicU64::new(last),
            synced: AtomicU64::new(last),
            segment_size: opts.segment_bytes,
        }
    }

    /// Checks blocks read from the device at `loc` (a run of consecutive blocks of one batch)
    /// against their CRCs; names the first block that fails. A block whose CRC is unknown
    /// fails too: nothing from the log is returned unchecked.
    pub fn check_read(&self, loc: &Loc, data: &[u8]) -> Result<()> {
        let sums = self.shared.log_sums.read();
        let batch = sums.get(&loc.lsn);
        for (i, block) in data.chunks(4096).enumerate() {
            let offset = loc.offset + i as u64 * 4096;
            let want = batch.and_then(|b| b.crc_at(loc.device, offset));
            if want != Some(crc32c::crc32c(block)) {
                return Err(PoolError::Checksum {
                    what: format!(
                        "write-ahead log block (batch LSN {}, device {}, offset {offset}){}",
                        loc.lsn,
                        loc.device,
                        if want.is_none() {
                            ": no checksum known"
                        } else {
                            ""
                        }
                    ),
                });
            }
        }
        Ok(())
    }

    fn check_failed(st: &LogState) -> Result<()> {
        if let Some(f) = &st.failed {
            return Err(PoolError::Io {
                what: "write-ahead log".into(),
                source: std::io::Error::other(f.clone()),
            });
        }
        if st.shutdown {
            return Err(PoolError::Closed);
        }
        Ok(())
    }

    /// Raises the next LSN (used at open so that new batches take LSNs no earlier run handed
    /// out: see `Pool::open`).
    pub fn raise_next_lsn(&self, at_least: u64) {
        let mut st = self.st.lock();
        if st.next_lsn < at_least {
            st.next_lsn = at_least;
            let last = at_least - 1;
            st.sync_target = st.sync_target.max(last);
            self.written.fetch_max(last, Ordering::SeqCst);
            self.synced.fetch_max(last, Ordering::SeqCst);
        }
    }

    /// Closes the open batch into the write buffer.
    fn close_open(&self, st: &mut LogState) {
        let Some(ob) = st.open.take() else { return };
        if ob.entries.is_empty() {
            // Nothing was added: give the LSN, the space and the buffer back.
            st.next_lsn = ob.lsn;
            st.buffered_bytes -= ob.buf.capacity();
            self.give_back(ob.buf);
            return;
        }
        if let Some(cur) = st.cur.as_mut() {
            cur.pos = ob.offset - cur.extent.offset + walfmt::batch_len(ob.data_len / 4096) as u64;
        }
        if let Some(seg) = st.segments.get_mut(&ob.seg_seq) {
            seg.last_lsn = seg.last_lsn.max(ob.lsn);
        }
        let mut ob = ob;
        let used = 4096 + ob.data_len;
        if used * 2 <= ob.buf.capacity() {
            // Mostly empty (small random writes fill a batch's entries long before its data):
            // a tight copy holds it from now on, in the write buffer and then the log cache,
            // so their budgets count data rather than empty space, and the large buffer serves
            // the next batch at once.
            // Room for the footer the batch gets when it goes to its device.
            let mut tight = AlignedBuf::zeroed(used + 4096);
            tight[..used].copy_from_slice(&ob.buf[..used]);
            tight.set_len(used);
            st.buffered_bytes = st.buffered_bytes - ob.buf.capacity() + tight.capacity();
            self.give_back(std::mem::replace(&mut ob.buf, tight));
        }
        st.buffered.insert(ob.lsn, ob);
        self.wake_flusher_if_due(st);
    }

    /// Hands buffered batches to the flusher, oldest first, while one is due: a flush waits for
    /// it, the buffer is over its budget, it has waited its delay, or the log is shutting down.
    fn submit_due(&self, st: &mut LogState) {
        let now = Instant::now();
        // Over budget, it goes down by an eighth at once: the device gets batches in groups,
        // and appenders wake the flusher once per group rather than once per write.
        let limit = self.buffer_limit();
        let low_water = if st.buffered_bytes > limit {
            limit - limit / 8
        } else {
            usize::MAX
        };
        while let Some(first) = st.buffered.first_entry() {
            let b = first.get();
            let due = st.shutdown
                || st.sync_target >= b.lsn
                || st.buffered_bytes > low_water
                || now.duration_since(b.born) >= self.buffer_delay;
            if !due {
                break;
            }
            let ob = first.remove();
            st.buffered_bytes -= ob.buf.capacity();
            let batch = Batch::from_buffered(ob, self.synced.load(Ordering::SeqCst));
            st.inflight_bytes += batch.buf.len();
            st.inflight.insert(batch.lsn, Arc::new(batch));
        }
    }

    /// Overwrites, in place, blocks of a batch still in the write buffer: `data` replaces the
    /// blocks at `loc` (consecutive in one batch). False, having changed nothing, when that
    /// batch was already handed to its device.
    fn overwrite_buffered(st: &mut LogState, loc: &Loc, data: &[u8]) -> bool {
        let Some(ob) = st.buffered_batch_mut(loc.lsn) else {
            return false;
        };
        let Some(range) = ob.data_range(loc, data.len()) else {
            return false;
        };
        ob.buf[range.clone()].copy_from_slice(data);
        ob.update_crcs(range);
        true
    }

    fn roll_segment(&self, st: &mut LogState) -> Result<()> {
        self.close_open(st);
        let extent = self
            .shared
            .alloc
            .lock()
            .alloc(self.segment_size, Placement::Log)
            .ok_or_else(|| {
                PoolError::NoSpace("no room for a new write-ahead log segment".into())
            })?;
        if let Err(e) = self
            .shared
            .device(extent.device)
            .and_then(|d| d.reserve(extent.offset, extent.len))
        {
            self.shared.alloc.lock().free(extent);
            return Err(e);
        }
        let rec = SegRec {
            extent,
            first_lsn: st.next_lsn,
            end_lsn: None,
        };
        // The segment being left ends here: replay then expects every LSN below this in it.
        let closing = st
            .cur
            .as_ref()
            .and_then(|c| st.segments.get(&c.seq))
            .map(|seg| {
                (
                    seg.seq,
                    SegRec {
                        end_lsn: Some(st.next_lsn),
                        ..seg.rec
                    },
                )
            });
        let res = (|| -> Result<u64> {
            let tx = self.shared.meta.begin_write()?;
            let seq = meta::bump(&tx, "next_segment_seq")?;
            {
                let mut t = tx.open_table(SEGMENTS)?;
                t.insert(seq, rec.encode().as_slice())?;
                if let Some((old, old_rec)) = &closing {
                    t.insert(*old, old_rec.encode().as_slice())?;
                }
            }
            tx.commit()?;
            Ok(seq)
        })();
        let seq = match res {
            Ok(s) => s,
            Err(e) => {
                self.shared.alloc.lock().free(extent);
                return Err(e);
            }
        };
        tracing::debug!(
            seq,
            device = extent.device,
            offset = extent.offset,
            "WAL: new segment"
        );
        self.segment_bytes.fetch_add(extent.len, Ordering::SeqCst);
        if let Some((old, old_rec)) = closing
            && let Some(seg) = st.segments.get_mut(&old)
        {
            seg.rec = old_rec;
        }
        st.insert_segment(Segment::new(seq, rec));
        st.cur = Some(CurSeg {
            seq,
            extent,
            pos: 0,
        });
        Ok(())
    }

    /// Ensures an open batch with room for at least one data block (or one entry) exists.
    fn ensure_open(&self, st: &mut LogState, need_data: bool) -> Result<()> {
        loop {
            if let Some(ob) = &st.open {
                let full = if need_data {
                    self.data_room(st, true) == 0
                } else {
                    !walfmt::room_for_entry(ob.entries.len(), ob.data_len / 4096)
                };
                if !full {
                    return Ok(());
                }
                self.close_open(st);
                continue;
            }
            let fits = st
                .cur
                .as_ref()
                .is_some_and(|c| c.pos + 3 * BLOCK <= c.extent.len);
            if !fits {
                self.roll_segment(st)?;
            }
            if st.cur.is_some() {
                self.open_batch(st);
            }
        }
    }

    /// A buffer for a new batch, reused if one is spare. Its bytes are whatever they were: the
    /// header block is encoded whole and only the data appended is ever read or written.
    fn batch_buffer(&self) -> AlignedBuf {
        let spare = self.spare.lock().pop();
        match spare {
            Some(mut b) => {
                b.set_len(BATCH_BUF_LEN);
                b
            }
            None => AlignedBuf::zeroed(BATCH_BUF_LEN),
        }
    }

    /// Keeps the buffer of a batch nobody else holds for reuse (up to [`MAX_SPARE_BUFFERS`]).
    fn recycle(&self, b: Arc<Batch>) {
        if let Ok(batch) = Arc::try_unwrap(b) {
            self.give_back(batch.buf);
        }
    }

    fn give_back(&self, buf: AlignedBuf) {
        if buf.capacity() == BATCH_BUF_LEN {
            let mut spare = self.spare.lock();
            if spare.len() < MAX_SPARE_BUFFERS {
                spare.push(buf);
            }
        }
    }

    /// Opens a new, empty batch at the current position of the current segment (none open).
    fn open_batch(&self, st: &mut LogState) {
        let Some(cur) = st.cur.as_ref() else { return };
        let (seg_seq, device, offset) = (cur.seq, cur.extent.device, cur.extent.offset + cur.pos);
        let lsn = st.next_lsn;
        st.next_lsn += 1;
        let buf = self.batch_buffer();
        st.buffered_bytes += buf.capacity();
        st.open = Some(OpenBatch {
            lsn,
            seg_seq,
            device,
            offset,
            entries: Vec::new(),
            buf,
            data_len: 0,
            crcs: Vec::new(),
            born: Instant::now(),
        });
    }

    /// Ensures the open batch can take one more entry of `n` data blocks. If the open batch
    /// cannot, it is closed as it is and a new one is opened (in a new segment if the current
    /// one cannot hold a batch of `n` blocks): what is appended next lands in one batch.
    fn ensure_room(&self, st: &mut LogState, n: u64) -> Result<()> {
        if st.open.is_some() && self.data_room(st, true) >= n {
            return Ok(());
        }
        self.close_open(st);
        let fits = st
            .cur
            .as_ref()
            .is_some_and(|c| c.pos + (n + 2) * BLOCK <= c.extent.len);
        if !fits {
            self.roll_segment(st)?;
        }
        self.open_batch(st);
        if st.open.is_some() && self.data_room(st, true) >= n {
            Ok(())
        } else {
            // Only reachable if the caller skipped the `max_atomic_bytes` check.
            Err(PoolError::AtomicWriteTooLarge {
                len: n * BLOCK,
                max: self.max_atomic_bytes(),
            })
        }
    }

    /// The largest append [`Wal::append_atomic`] takes: one batch's data, and no more than an
    /// empty segment holds beside the batch's header and footer.
    pub fn max_atomic_bytes(&self) -> u64 {
        let segment_data = self.segment_size.saturating_sub(2 * BLOCK) / BLOCK * BLOCK;
        (MAX_BATCH_DATA as u64).min(segment_data)
    }

    /// Data blocks that still fit in the open batch, in its last entry or (`new_entry`) in a
    /// new one: the batch's data limit, its header's room for entries and block CRCs, and the
    /// segment's end (less the footer).
    fn data_room(&self, st: &LogState, new_entry: bool) -> u64 {
        let (Some(ob), Some(cur)) = (&st.open, &st.cur) else {
            return 0;
        };
        let new_entry = new_entry || ob.entries.is_empty();
        let batch_room = walfmt::room(ob.entries.len(), ob.data_len / 4096, new_entry) as u64;
        let used = ob.offset - cur.extent.offset + 4096 + ob.data_len as u64 + BLOCK;
        let seg_room = cur.extent.len.saturating_sub(used) / BLOCK;
        batch_room.min(seg_room)
    }

    /// Appends blocks [block, block+nblocks) of volume `vol`: data (nblocks*4096 bytes) or
    /// zeroes (`data == None`). `on_piece` sees where each piece landed, under the log lock, so
    /// overlay order equals log order.
    pub fn append(
        &self,
        vol: u64,
        block: u64,
        nblocks: u64,
        data: Option<&[u8]>,
        on_piece: impl FnMut(Piece, &mut Vec<Loc>),
    ) -> Result<()> {
        let mut st = self.lock_for_append()?;
        self.append_locked(&mut st, vol, block, nblocks, data, on_piece)
    }

    /// Writes data blocks [block, block + data.len() / 4096) of volume `vol`. `current` holds
    /// the blocks' current log locations as the caller's overlay has them (runs of blocks
    /// consecutive in one batch, sorted, within the write): blocks whose batch is still in the
    /// write buffer are replaced there, in place; the rest is appended as by [`Wal::append`],
    /// and only those pieces go to `on_piece` (the others keep their location).
    pub fn write_data(
        &self,
        vol: u64,
        block: u64,
        data: &[u8],
        current: &[(u64, u64, Loc)],
        on_piece: impl FnMut(Piece, &mut Vec<Loc>),
    ) -> Result<()> {
        let mut st = self.lock_for_append()?;
        self.write_data_locked(&mut st, vol, block, data, current, on_piece)
    }

    fn write_data_locked(
        &self,
        st: &mut LogState,
        vol: u64,
        block: u64,
        data: &[u8],
        current: &[(u64, u64, Loc)],
        mut on_piece: impl FnMut(Piece, &mut Vec<Loc>),
    ) -> Result<()> {
        let end = block + data.len() as u64 / BLOCK;
        let bytes = |from: u64, to: u64| {
            &data[((from - block) * BLOCK) as usize..((to - block) * BLOCK) as usize]
        };
        // Blocks before `next` are done; a run that cannot be replaced in place joins the gap
        // appended before the next run that can.
        let mut next = block;
        for &(b, n, loc) in current {
            let (from, to) = (b.max(next), (b + n).min(end));
            if from >= to {
                continue;
            }
            let at = Loc {
                offset: loc.offset + (from - b) * BLOCK,
                ..loc
            };
            if !Self::overwrite_buffered(st, &at, bytes(from, to)) {
                continue;
            }
            if from > next {
                self.append_locked(
                    st,
                    vol,
                    next,
                    from - next,
                    Some(bytes(next, from)),
                    &mut on_piece,
                )?;
            }
            next = to;
        }
        if next < end {
            self.append_locked(
                st,
                vol,
                next,
                end - next,
                Some(bytes(next, end)),
                &mut on_piece,
            )?;
        }
        Ok(())
    }

    /// As [`Wal::write_data`], but only if that needs no waiting: no backpressure, and room
    /// for the whole write in the current segment (a new segment means a metadata commit).
    /// Returns false, having written nothing, otherwise.
    pub fn write_data_nowait(
        &self,
        vol: u64,
        block: u64,
        data: &[u8],
        current: &[(u64, u64, Loc)],
        on_piece: impl FnMut(Piece, &mut Vec<Loc>),
    ) -> Result<bool> {
        let Some(mut st) = self.st.try_lock_for(NOWAIT_LOCK_WAIT) else {
            return Ok(false);
        };
        Self::check_failed(&st)?;
        if self.over_budget(&st) {
            return Ok(false);
        }
        let Some(cur) = st.cur.as_ref() else {
            return Ok(false);
        };
        // End of what is used in the segment, counting the open batch as it is (with its footer).
        let used = match &st.open {
            Some(ob) => {
                ob.offset - cur.extent.offset + walfmt::batch_len(ob.data_len / 4096) as u64
            }
            None => cur.pos,
        };
        let len = data.len() as u64;
        // Every batch the write may open needs a header and a footer block: a batch holds
        // `MAX_BATCH_DATA`, or fewer pieces when their entries fill its header first (each run
        // replaced in place can split the write); two more for slack.
        let batches = len / MAX_BATCH_DATA as u64 + current.len() as u64 / 64 + 2;
        let headers = batches * 2 * BLOCK;
        if used + len + headers > cur.extent.len {
            return Ok(false);
        }
        self.write_data_locked(&mut st, vol, block, data, current, on_piece)?;
        Ok(true)
    }

    fn append_locked(
        &self,
        st: &mut LogState,
        vol: u64,
        block: u64,
        nblocks: u64,
        data: Option<&[u8]>,
        mut on_piece: impl FnMut(Piece, &mut Vec<Loc>),
    ) -> Result<()> {
        let mut done = 0u64;
        while done < nblocks {
            self.ensure_open(st, data.is_some())?;
            let kind = if data.is_some() {
                EntryKind::Data
            } else {
                EntryKind::Zero
            };
            let b = block + done;
            let room = if data.is_some() {
                let extends = st
                    .open
                    .as_ref()
                    .and_then(|ob| ob.entries.last())
                    .is_some_and(|last| extends(last, vol, kind, b));
                self.data_room(st, !extends)
            } else {
                u32::MAX as u64
            };
            let n = (nblocks - done).min(room).min(u32::MAX as u64);
            let Some(ob) = st.open.as_mut() else { continue };
            let lsn = ob.lsn;
            let loc = data.map(|_| Loc {
                lsn,
                device: ob.device,
                offset: ob.offset + 4096 + ob.data_len as u64,
            });
            if let Some(d) = data {
                ob.push_blocks(&d[(done * BLOCK) as usize..((done + n) * BLOCK) as usize]);
            }
            match ob.entries.last_mut() {
                Some(last)
                    if extends(last, vol, kind, b)
                        && last.nblocks as u64 + n <= u32::MAX as u64 =>
                {
                    last.nblocks += n as u32
                }
                _ => ob.entries.push(Entry {
                    vol,
                    block: b,
                    nblocks: n as u32,
                    kind,
                }),
            }
            if let Some(cur) = st.cur.as_ref() {
                let seq = cur.seq;
                if let Some(seg) = st.segments.get_mut(&seq) {
                    let m = seg.vols.entry(vol).or_insert(0);
                    *m = (*m).max(lsn);
                }
            }
            let piece = Piece {
                block: b,
                nblocks: n,
                loc,
            };
            on_piece(piece, &mut st.released);
            st.account(&piece, lsn);
            st.vol_last.insert(vol, lsn);
            done += n;
        }
        self.wake_flusher_if_due(st);
        Ok(())
    }

    /// Wakes the flusher when a closed batch is due now: without a write buffer every batch
    /// is; with one, only when the buffer is over its budget (it wakes by itself for the delay,
    /// and flushes wake it). Waking it on every append would cost a futex wake per write.
    fn wake_flusher_if_due(&self, st: &LogState) {
        let limit = self.buffer_limit();
        if limit == 0 || st.buffered_bytes > limit {
            self.work.notify_one();
        }
    }

    /// Whether appenders must wait: more is in memory, buffered or being written, than the
    /// write buffer and the writes in flight may hold.
    fn over_budget(&self, st: &LogState) -> bool {
        st.buffered_bytes + st.inflight_bytes > self.buffer_limit() + MAX_INFLIGHT_BYTES
    }

    /// Takes the log lock for an append: fails if the log has failed or is shut down, and waits
    /// while too much appended data is not yet written (backpressure).
    fn lock_for_append(&self) -> Result<parking_lot::MutexGuard<'_, LogState>> {
        let mut st = self.st.lock();
        Self::check_failed(&st)?;
        while self.over_budget(&st) {
            self.work.notify_one();
            self.done.wait_for(&mut st, Duration::from_millis(100));
            Self::check_failed(&st)?;
        }
        Ok(st)
    }

    /// Appends data blocks [block, block+n) of volume `vol` as ONE entry of ONE batch, so the
    /// write is all-or-nothing across a crash: replay applies a batch only when its header and
    /// every data CRC check out, and a batch is never split. The data is the concatenation of
    /// `parts` (a whole number of 4 KiB blocks in total, at most [`Wal::max_atomic_bytes`]); if
    /// the open batch lacks room it is closed first. `on_piece` is called exactly once, under
    /// the log lock, with the location of the whole write.
    pub fn append_atomic(
        &self,
        vol: u64,
        block: u64,
        parts: &[&[u8]],
        on_piece: impl FnOnce(Piece, &mut Vec<Loc>),
    ) -> Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total == 0 || total as u64 % BLOCK != 0 {
            return Err(PoolError::InvalidArgument(format!(
                "atomic append of {total} bytes: must be a positive multiple of 4096"
            )));
        }
        let max = self.max_atomic_bytes();
        if total as u64 > max {
            return Err(PoolError::AtomicWriteTooLarge {
                len: total as u64,
                max,
            });
        }
        let n = total as u64 / BLOCK;
        let mut st = self.lock_for_append()?;
        self.ensure_room(&mut st, n)?;
        let seq = st.cur.as_ref().map(|c| c.seq);
        let Some(ob) = st.open.as_mut() else {
            return Err(PoolError::Meta("write-ahead log: no open batch".into()));
        };
        let lsn = ob.lsn;
        let loc = Loc {
            lsn,
            device: ob.device,
            offset: ob.offset + 4096 + ob.data_len as u64,
        };
        let start = 4096 + ob.data_len;
        let mut at = start;
        for p in parts {
            ob.buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        ob.data_len += total;
        ob.update_crcs(start..at);
        match ob.entries.last_mut() {
            // Extending the previous entry keeps the write inside this batch all the same.
            Some(last)
                if extends(last, vol, EntryKind::Data, block)
                    && last.nblocks as u64 + n <= u32::MAX as u64 =>
            {
                last.nblocks += n as u32
            }
            _ => ob.entries.push(Entry {
                vol,
                block,
                nblocks: n as u32,
                kind: EntryKind::Data,
            }),
        }
        if let Some(seg) = seq.and_then(|seq| st.segments.get_mut(&seq)) {
            let m = seg.vols.entry(vol).or_insert(0);
            *m = (*m).max(lsn);
        }
        let piece = Piece {
            block,
            nblocks: n,
            loc: Some(loc),
        };
        on_piece(piece, &mut st.released);
        st.account(&piece, lsn);
        st.vol_last.insert(vol, lsn);
        self.wake_flusher_if_due(&st);
        Ok(())
    }

    /// Closes the open batch and returns the highest LSN handed out so far: everything appended
    /// before this call is in a batch with LSN <= the result.
    pub fn cut(&self) -> u64 {
        let mut st = self.st.lock();
        self.close_open(&mut st);
        st.next_lsn - 1
    }

    /// Makes everything appended so far durable (group commit).
    pub fn flush(&self) -> Result<()> {
        let mut st = self.st.lock();
        Self::check_failed(&st)?;
        self.close_open(&mut st);
        let target = st.next_lsn - 1;
        self.sync_to(st, target)
    }

    /// Makes everything appended so far for volume `vol` durable: the batches up to its latest
    /// one. Other volumes' later writes stay in the write buffer (one tenant's flushes do not
    /// drain every volume's buffer).
    pub fn flush_volume(&self, vol: u64) -> Result<()> {
        let mut st = self.st.lock();
        Self::check_failed(&st)?;
        let Some(&target) = st.vol_last.get(&vol) else {
            return Ok(()); // nothing appended since the log was opened
        };
        if st.open.as_ref().is_some_and(|o| o.lsn <= target) {
            self.close_open(&mut st);
        }
        self.sync_to(st, target)
    }

    /// Makes what is already written durable, without handing buffered batches to their
    /// devices (for the log cleaner: it frees segments whose blocks written batches replaced).
    pub fn sync_written(&self) -> Result<()> {
        let st = self.st.lock();
        Self::check_failed(&st)?;
        let target = self.written.load(Ordering::SeqCst);
        self.sync_to(st, target)
    }

    /// Waits until every batch with LSN <= `target` is durable.
    fn sync_to(&self, mut st: parking_lot::MutexGuard<'_, LogState>, target: u64) -> Result<()> {
        if self.synced.load(Ordering::SeqCst) >= target {
            return Ok(());
        }
        st.sync_target = st.sync_target.max(target);
        self.work.notify_one();
        while self.synced.load(Ordering::SeqCst) < target {
            Self::check_failed(&st)?;
            self.done.wait_for(&mut st, Duration::from_millis(50));
        }
        Ok(())
    }

    /// Copies blocks from a batch still in memory (not yet written, or kept in the log cache);
    /// false if the device must be read.
    pub fn read_from_memory(&self, loc: &Loc, dst: &mut [u8]) -> bool {
        if let Some(b) = self.cache.read().batches.get(&loc.lsn)
            && let Some(at) = loc.offset.checked_sub(b.offset)
            && let Some(src) = b.buf.get(at as usize..at as usize + dst.len())
        {
            dst.copy_from_slice(src);
            return true;
        }
        // A batch leaves `inflight` only after it is written and offered to the cache, so a
        // batch found in neither place is on its device.
        if loc.lsn <= self.written.load(Ordering::SeqCst) {
            return false;
        }
        let st = self.st.lock();
        let (base, buf): (u64, &[u8]) = if let Some(ob) = st.buffered_batch(loc.lsn) {
            (ob.offset, &ob.buf)
        } else if let Some(b) = st.inflight.get(&loc.lsn) {
            (b.offset, &b.buf)
        } else {
            return false;
        };
        let Some(src) = loc
            .offset
            .checked_sub(base)
            .and_then(|at| buf.get(at as usize..at as usize + dst.len()))
        else {
            return false;
        };
        dst.copy_from_slice(src);
        true
    }

    /// The flusher thread's loop: hands due batches of the write buffer to their devices in LSN
    /// order, and syncs on demand.
    pub fn run_flusher(&self) {
        loop {
            let (batches, want_sync) = {
                let mut st = self.st.lock();
                loop {
                    if st.abandoned {
                        return;
                    }
                    if st.shutdown
                        && st.inflight.is_empty()
                        && st.buffered.is_empty()
                        && st.open.is_none()
                    {
                        return;
                    }
                    let written = self.written.load(Ordering::SeqCst);
                    let want_sync = st.sync_target > self.synced.load(Ordering::SeqCst);
                    let open_due = st.open.as_ref().is_some_and(|o| {
                        !o.entries.is_empty()
                            && (self.buffer_limit() == 0 && st.inflight.is_empty()
                                || o.born.elapsed() >= self.buffer_delay)
                    });
                    if open_due {
                        // Without a write buffer an idle flusher writes what has accumulated
                        // (group commit under load happens naturally while the previous batch
                        // is being written); with one, the open batch waits its delay.
                        self.close_open(&mut st);
                    }
                    self.submit_due(&mut st);
                    let pending = st.inflight.range(written + 1..).next().is_some();
                    if st.failed.is_some() {
                        self.done.notify_all();
                        if st.shutdown {
                            return;
                        }
                        self.work.wait_for(&mut st, Duration::from_millis(100));
                        continue;
                    }
                    if pending || want_sync {
                        // Each batch claims the durable LSN of now, not of when it was sealed
                        // (a sync may have completed since): the fresher the claims, the
                        // smaller replay's window of judging damage as a torn write. Only
                        // `inflight` holds a batch that is not yet being written.
                        let durable = self.synced.load(Ordering::SeqCst);
                        let batches: Vec<Arc<Batch>> = st
                            .inflight
                            .range_mut(written + 1..)
                            .map(|(_, b)| {
                                if let Some(b) = Arc::get_mut(b) {
                                    b.restamp_durable(durable);
                                }
                                b.clone()
                            })
                            .collect();
                        for b in &batches {
                            st.dirty_devices.insert(b.device);
                        }
                        break (batches, want_sync);
                    }
                    if st.shutdown {
                        // submit_due handed every closed batch over; close the open one too.
                        if st.open.is_some() {
                            self.close_open(&mut st);
                            continue;
                        }
                        return;
                    }
                    let nap = self.flusher_nap(&st);
                    self.work.wait_for(&mut st, nap);
                }
            };
            let res = self.write_batches(&batches);
            if let Ok(sums) = &res {
                // Checks for reads of these blocks from the device, before any such read.
                self.shared.log_sums.write().extend(sums.iter().cloned());
                self.keep_in_cache(&batches);
            }
            let mut st = self.st.lock();
            if let Err(e) = res {
                tracing::error!(error = %e, "write-ahead log write failed; the pool refuses further writes");
                st.failed = Some(e.to_string());
                self.done.notify_all();
                continue;
            }
            if let Some(last) = batches.last() {
                self.written.store(last.lsn, Ordering::SeqCst);
                st.last_data = st.last_data.max(last.lsn);
                for b in &batches {
                    st.inflight.remove(&b.lsn);
                    st.inflight_bytes -= b.buf.len();
                }
            }
            for b in batches {
                self.recycle(b);
            }
            let written = self.written.load(Ordering::SeqCst);
            let wants_more_sync = st.sync_target > self.synced.load(Ordering::SeqCst);
            if want_sync || wants_more_sync {
                let devs: Vec<u16> = st.dirty_devices.drain().collect();
                drop(st);
                let mut err = None;
                for d in devs {
                    if let Err(e) = self.shared.device(d).and_then(|dev| dev.sync()) {
                        err = Some(e);
                    }
                }
                let mut st = self.st.lock();
                if let Some(e) = err {
                    tracing::error!(error = %e, "write-ahead log sync failed; the pool refuses further writes");
                    st.failed = Some(e.to_string());
                } else {
                    self.synced.fetch_max(written, Ordering::SeqCst);
                    st.last_sync = Some(Instant::now());
                }
            }
            self.done.notify_all();
        }
    }

    /// How long the idle flusher sleeps: until the oldest buffered batch is due, at most 50 ms.
    fn flusher_nap(&self, st: &LogState) -> Duration {
        let nap = Duration::from_millis(50);
        let oldest = st.buffered.values().next().or(st.open.as_ref());
        match oldest {
            Some(b) if self.buffer_limit() > 0 => self
                .buffer_delay
                .saturating_sub(b.born.elapsed())
                .clamp(Duration::from_millis(1), nap),
            _ => nap,
        }
    }

    /// The log cache's byte budget now (0: off).
    pub fn cache_limit(&self) -> usize {
        self.cache_limit.load(Ordering::Relaxed)
    }

    /// The write buffer's byte budget now (0: none).
    pub fn buffer_limit(&self) -> usize {
        self.buffer_limit.load(Ordering::Relaxed)
    }

    /// Bytes the log cache and the write buffer hold now: (log cache, write buffer).
    pub fn ram_usage(&self) -> (usize, usize) {
        let cached = self.cache.read().bytes;
        let buffered = self.st.lock().buffered_bytes;
        (cached, buffered)
    }

    /// Changes the log cache's budget; a smaller one evicts the oldest batches at once. A log
    /// cache that is off (0) stays off, and this never turns one off: `limit` is at least 1.
    pub fn set_cache_limit(&self, limit: usize) {
        if self.cache_limit() == 0 {
            return;
        }
        let limit = limit.max(1);
        self.cache_limit.store(limit, Ordering::Relaxed);
        let evicted = self.cache.write().evict_to(limit);
        for b in evicted {
            self.recycle(b);
        }
    }

    /// Changes the write buffer's budget. A smaller one hands the oldest buffered batches to
    /// the flusher at once, which writes them to their device: shrinking never drops data.
    /// A write buffer that is off (0) stays off, and this never turns one off.
    pub fn set_buffer_limit(&self, limit: usize) {
        if self.buffer_limit() == 0 {
            return;
        }
        let limit = limit.max(1);
        let old = self.buffer_limit.swap(limit, Ordering::Relaxed);
        if limit < old {
            let mut st = self.st.lock();
            if st.buffered_bytes > limit {
                self.submit_due(&mut st);
                if st.buffered_bytes > limit {
                    // The open batch alone is over the new budget: it goes too.
                    self.close_open(&mut st);
                    self.submit_due(&mut st);
                }
                self.work.notify_one();
            }
        }
    }

    /// Offers written batches to the log cache, evicting the oldest beyond its budget (a batch
    /// that filled little of its buffer was given a tight one when it closed).
    fn keep_in_cache(&self, batches: &[Arc<Batch>]) {
        let limit = self.cache_limit();
        if limit == 0 {
            return;
        }
        let evicted = {
            let mut c = self.cache.write();
            for b in batches.iter().cloned() {
                c.bytes += b.buf.capacity();
                if let Some(old) = c.batches.insert(b.lsn, b) {
                    c.bytes -= old.buf.capacity();
                }
            }
            c.evict_to(limit)
        };
        // Buffers are recycled or freed outside the lock.
        for b in evicted {
            self.recycle(b);
        }
    }

    /// Writes each batch (header, data and footer: one request each). Returns the batches'
    /// block CRCs.
    fn write_batches(&self, batches: &[Arc<Batch>]) -> Result<Vec<(u64, Arc<BatchSums>)>> {
        let mut devs = Vec::with_capacity(batches.len());
        for b in batches {
            devs.push(self.shared.device(b.device)?);
        }
        let mut ops: Vec<Op<'_>> = batches
            .iter()
            .zip(&devs)
            .map(|(b, d)| Op::Write {
                file: d.file(),
                offset: b.offset,
                buf: &b.buf,
            })
            .collect();
        io::run_batch(&mut ops).map_err(|e| PoolError::io("write-ahead log", e))?;
        drop(ops);
        Ok(batches.iter().map(|b| (b.lsn, b.sums.clone())).collect())
    }

    /// Waits until a sync has made LSNs durable that the metadata store does not yet record as
    /// durable, and the log has been idle [`ANCHOR_IDLE`] since; returns the durable LSN to
    /// record, or None once the log shuts down. Later batch headers carry the durable LSN too;
    /// this record covers the last flushed batches, which no later header may follow.
    pub fn wait_durable_to_record(&self, recorded: u64) -> Option<u64> {
        let mut st = self.st.lock();
        loop {
            if st.shutdown {
                return None;
            }
            let synced = self.synced.load(Ordering::SeqCst);
            let due = synced > recorded
                && st.last_data > recorded
                && st.last_sync.is_some_and(|t| t.elapsed() >= ANCHOR_IDLE);
            if due {
                return Some(synced);
            }
            self.done.wait_for(&mut st, ANCHOR_IDLE);
        }
    }

    /// Stops the log as a crash would: nothing buffered is written, nothing more is synced.
    pub fn abandon(&self) {
        let mut st = self.st.lock();
        st.abandoned = true;
        st.shutdown = true;
        self.work.notify_all();
        self.done.notify_all();
    }

    pub fn shutdown(&self) {
        let mut st = self.st.lock();
        st.shutdown = true;
        self.work.notify_all();
    }

    /// Segments that no volume needs any more: every volume with entries in it has folded them
    /// (given each live volume's folded LSN), or the log cleaner found every block of it
    /// overwritten by durable later appends. The current segment is never returned. Removed
    /// from the in-memory list; the caller deletes the records.
    pub fn take_dead_segments(&self, folded: &HashMap<u64, u64>) -> Vec<(u64, SegRec)> {
        let mut st = self.st.lock();
        let cur = st.cur.as_ref().map(|c| c.seq);
        let written = self.written.load(Ordering::SeqCst);
        let synced = self.synced.load(Ordering::SeqCst);
        let (mut by_fold, mut by_cleaner) = (0usize, 0usize);
        let dead: Vec<u64> = st
            .segments
            .values()
            // Never while a batch of it may still be in memory or being written.
            .filter(|s| s.settled(cur, written))
            .filter(|s| {
                if s.vols
                    .iter()
                    .all(|(v, max)| folded.get(v).is_none_or(|f| f >= max))
                {
                    by_fold += 1;
                    true
                } else if s.overwritten() && s.clean_after <= synced {
                    by_cleaner += 1;
                    true
                } else {
                    false
                }
            })
            .map(|s| s.seq)
            .collect();
        if by_cleaner > 0 {
            tracing::debug!(by_fold, by_cleaner, "WAL segments no longer needed");
        }
        let removed: Vec<Segment> = dead
            .into_iter()
            .filter_map(|seq| st.remove_segment(seq))
            .collect();
        self.shared.retired_log_sums.lock().extend(
            removed
                .iter()
                .map(|seg| seg.rec.first_lsn..=seg.last_lsn.max(seg.rec.first_lsn)),
        );
        let taken: Vec<(u64, SegRec)> = removed.into_iter().map(|s| (s.seq, s.rec)).collect();
        let freed: u64 = taken.iter().map(|(_, r)| r.extent.len).sum();
        self.segment_bytes.fetch_sub(freed, Ordering::SeqCst);
        taken
    }

    /// Whether a log sync would let the cleaner free a segment: every block of it was
    /// overwritten, by appends that are written but not yet durable. Nothing else syncs while an
    /// initiator never flushes, and without a sync those segments would wait for a fold (hashing
    /// and compressing data that is dead anyway).
    pub fn sync_would_clean(&self) -> bool {
        let st = self.st.lock();
        let cur = st.cur.as_ref().map(|c| c.seq);
        let written = self.written.load(Ordering::SeqCst);
        let synced = self.synced.load(Ordering::SeqCst);
        st.segments.values().any(|s| {
            s.settled(cur, written)
                && s.overwritten()
                && (synced + 1..=written).contains(&s.clean_after)
        })
    }

    /// Bytes of device space held by log segments (no lock taken).
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes.load(Ordering::SeqCst)
    }

    /// Bytes of the log segments the cleaner will free without a fold: every block of them was
    /// overwritten, and they wait only for the overwrites to be durable (the write buffer
    /// writes them back within `write_back_delay`; `maintain` syncs when that would clean).
    pub fn awaiting_cleaner_bytes(&self) -> u64 {
        let st = self.st.lock();
        st.segments
            .values()
            .filter(|s| s.overwritten())
            .map(|s| s.rec.extent.len)
            .sum()
    }

    /// Bytes of device space held by log segments, and their count.
    pub fn usage(&self) -> (u64, usize) {
        let st = self.st.lock();
        (
            st.segments.values().map(|s| s.rec.extent.len).sum(),
            st.segments.len(),
        )
    }

    /// Volumes with entries in the oldest segments, oldest first (what a fold should target to
    /// free log space).
    pub fn oldest_pinning_volumes(&self, folded: &HashMap<u64, u64>) -> Vec<u64> {
        let st = self.st.lock();
        let mut out = Vec::new();
        for s in st.segments.values() {
            for (v, max) in &s.vols {
                if folded.get(v).is_some_and(|f| f < max) && !out.contains(v) {
                    out.push(*v);
                }
            }
            if !out.is_empty() {
                break;
            }
        }
        out
    }

    /// Log locations a fold moved into chunks: no longer needed for replay once the fold is
    /// committed (for the log cleaner).
    pub fn release_folded(&self, locs: impl Iterator<Item = Loc>) {
        let locs: Vec<Loc> = locs.collect();
        self.st.lock().release(&locs, 0);
    }

    pub fn synced_lsn(&self) -> u64 {
        self.synced.load(Ordering::SeqCst)
    }
}
