//! State shared by the pool's parts: devices, metadata, allocator, keys and caches, and the
//! object-store operations built on them (read/write sealed objects through the RAM cache).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use redb::ReadableTable;

use crate::alloc::{Allocator, Placement};
use crate::cache::{ByDigest, ShardedLru};
use crate::device::Device;
use crate::error::{PoolError, Result};
use crate::index::Node;
use crate::io::{self, AlignedBuf, Op};
use crate::meta::{Meta, ObjRec};
use crate::object::{
    self, FRAME_SHIFT, Keys, OBJECT_FORMAT_V1, OBJECT_HEADER_LEN, ObjectKind, RAW_FRAME_SHIFT,
};
use crate::types::{BLOCK, Digest, Extent, align_up};

/// What the chunk cache holds: a whole data chunk, or one frame of one (what a partial read of
/// a version 2 chunk decoded). Both share one byte budget, so partial reads add no memory the
/// RAM tier does not govern. A frame is named by its length (shift) and number, so frames of
/// 64 KiB and of 4 KiB never alias; the bytes are the raw chunk's (the digest fixes them), so
/// a frame cached from one encoding of a chunk is right for any other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub digest: Digest,
    /// log2 of the frame length, or 0 for the whole chunk.
    pub shift: u8,
    /// The frame's number (raw bytes from frame << shift), or 0 for the whole chunk.
    pub frame: u32,
}

impl ByDigest for ChunkKey {
    fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl ChunkKey {
    pub fn whole(digest: Digest) -> Self {
        ChunkKey {
            digest,
            shift: 0,
            frame: 0,
        }
    }

    /// Frame `frame` of `1 << shift` raw bytes (shift 12..=24, checked by the header parser).
    pub fn frame(digest: Digest, shift: u8, frame: usize) -> Self {
        ChunkKey {
            digest,
            shift,
            frame: frame as u32,
        }
    }
}

/// A planned read of raw frames of a sealed chunk (see [`Shared::plan_raw_frames`]).
#[derive(Debug)]
pub struct FrameRead {
    /// Device, offset (4 KiB aligned) and length (a multiple of 4 KiB) to read.
    pub device: u16,
    pub offset: u64,
    pub len: usize,
    /// Where the read starts in the object.
    start: usize,
    shift: u8,
    digest: Digest,
    within: usize,
    frames: Vec<object::Frame>,
}

/// What one chunk cache entry costs beyond its bytes (LRU node and hash slot, key, the Arc and
/// Vec headers, two allocations), counted against the byte budget so that 4 KiB frames, whose
/// overhead is a few percent of them, cannot make the cache hold more than it says.
pub const CACHE_ENTRY_OVERHEAD: usize = 192;

/// The frame lengths (shifts) whose frames of chunk `d` may be in the chunk cache: the one its
/// cached table says, else the two the writer uses. (An array, not a Vec: this is on every
/// cached read.)
fn frame_shifts(table: Option<&Arc<(Extent, Vec<u8>)>>) -> [Option<u8>; 2] {
    match table.and_then(|t| t.1.get(11).copied()) {
        Some(s) if object::FRAME_SHIFTS.contains(&s) => [Some(s), None],
        _ => [Some(FRAME_SHIFT), Some(RAW_FRAME_SHIFT)],
    }
}

/// Objects at most this long on the device are read whole by a partial read: one request of a
/// few blocks costs about what two of one block do, and it needs no second round trip to learn
/// where compressed frames are.
const PARTIAL_READ_WHOLE_MAX: u64 = 128 << 10;

/// Budget of [`Shared::table_cache`]: 16 MiB holds the tables of about 4 GiB of incompressible
/// chunks (4 KiB frames: 4 KiB of header and table per MiB) and of far more compressible ones
/// (64 KiB frames: about 400 bytes per MiB).
pub const TABLE_CACHE_BYTES: usize = 16 << 20;

/// "chunk 0123456789abcdef" (a chunk as errors name it) without a heap allocation: every
/// partial read builds one for the errors it might report, and with many readers the heap's
/// locks were a third of what they waited for.
struct ChunkLabel([u8; 22]);

impl ChunkLabel {
    fn new(d: &Digest) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut b = *b"chunk 0000000000000000";
        for (i, x) in d.0[..8].iter().enumerate() {
            b[6 + 2 * i] = HEX[usize::from(x >> 4)];
            b[7 + 2 * i] = HEX[usize::from(x & 15)];
        }
        ChunkLabel(b)
    }
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("chunk")
    }
}

#[cfg(test)]
#[test]
fn chunk_labels_name_chunks_as_errors_always_did() {
    for seed in [0u8, 1, 0x5a, 0xff] {
        let d = Digest(std::array::from_fn(|i| {
            seed.wrapping_mul(31)
                .wrapping_add((i as u8).wrapping_mul(17))
        }));
        assert_eq!(ChunkLabel::new(&d).as_str(), format!("chunk {d}"));
    }
}

/// Device slots; a device is added by filling the next empty slot, so lookups need no lock.
pub const MAX_DEVICES: usize = 64;

#[derive(Debug)]
pub struct Shared {
    pub devices: Vec<std::sync::OnceLock<Device>>,
    pub meta: Meta,
    pub alloc: Mutex<Allocator>,
    pub keys: Keys,
    pub chunk_size: u64,
    pub zstd_level: i32,
    /// Whole data chunks and frames of them (see [`ChunkKey`]).
    pub chunk_cache: ShardedLru<Vec<u8>, ChunkKey>,
    /// Checked headers and frame tables of version 2 chunks (by digest, with the extent they
    /// were read from), so that a partial read of a chunk read before needs one device request
    /// for its frames, however they are compressed. About 400 bytes per 1 MiB
    /// chunk with 64 KiB frames, 4 KiB with 4 KiB frames (incompressible chunks): a small
    /// fixed budget ([`TABLE_CACHE_BYTES`], like the node cache's) covers GiBs of chunks,
    /// and a separate LRU keeps tables from being evicted by the frames they locate.
    pub table_cache: ShardedLru<(Extent, Vec<u8>)>,
    pub node_cache: ShardedLru<Node>,
    /// Readers and seals hold this shared while they may follow object or WAL locations; space
    /// is handed back to the allocator only under an exclusive (try-)lock, so nobody ever reads
    /// an extent that was freed and reused under them.
    pub pin: std::sync::Arc<RwLock<()>>,
    /// Extents whose records are gone, waiting for the pin to be free.
    pub pending_free: Mutex<Vec<Extent>>,
    /// Freed WAL segments' extents, waiting for the pin to be free; they go to warm space
    /// (see [`crate::alloc`]) while there is room for them, else as `pending_free`.
    pub pending_free_log: Mutex<Vec<Extent>>,
    /// Objects whose reference count reached zero, to be swept when the pin is free.
    pub dead: Mutex<std::collections::HashSet<Digest>>,
    pub chunk_cache_disabled: bool,
    /// Data-block CRCs of the WAL batches on their devices, by LSN: every read of a log block
    /// from a device is checked against them.
    pub log_sums: RwLock<std::collections::BTreeMap<u64, Arc<crate::wal::BatchSums>>>,
    /// LSN ranges of freed log segments whose CRCs go once the pin is free (a reader that
    /// resolved a block there before it was overwritten may still be reading it).
    pub retired_log_sums: Mutex<Vec<std::ops::RangeInclusive<u64>>>,
    /// Bytes of sealed objects read from the devices (whole objects and partial reads), for
    /// stats: what the read path really costs the devices.
    pub sealed_bytes_read: AtomicU64,
    /// How `read_async` served its reads, for stats.
    pub async_reads: AsyncReadCounters,
    /// Fetchers of objects that live only in archive targets (see [`crate::remote`]).
    pub remotes: crate::remote::Remotes,
}

/// Counters behind [`crate::stats::AsyncReadStats`].
#[derive(Debug, Default)]
pub struct AsyncReadCounters {
    pub in_memory: AtomicU64,
    pub device: AtomicU64,
    pub blocking: AtomicU64,
}

impl AsyncReadCounters {
    pub fn snapshot(&self) -> crate::stats::AsyncReadStats {
        crate::stats::AsyncReadStats {
            in_memory: self.in_memory.load(Ordering::Relaxed),
            device: self.device.load(Ordering::Relaxed),
            blocking: self.blocking.load(Ordering::Relaxed),
        }
    }
}

/// Object bytes [s, e) if one of the read `parts` (start, bytes) holds all of them.
fn find_range(parts: &[(u64, AlignedBuf)], s: u64, e: u64) -> Option<&[u8]> {
    parts.iter().find_map(|(a, b)| {
        let end = a + b.len() as u64;
        (*a <= s && e <= end).then(|| &b[(s - a) as usize..(e - a) as usize])
    })
}

impl Shared {
    pub fn all_devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter().filter_map(|d| d.get())
    }

    pub fn device(&self, index: u16) -> Result<&Device> {
        self.devices
            .get(index as usize)
            .and_then(|d| d.get())
            .ok_or_else(|| {
                PoolError::corrupt("extent", format!("refers to unknown device {index}"))
            })
    }

    /// Reads and verifies an object's bytes.
    pub fn read_object(&self, d: &Digest, rec: &ObjRec) -> Result<Vec<u8>> {
        let buf = self.read_object_bytes(d, rec)?;
        let what = match rec.kind {
            ObjectKind::Chunk => format!("chunk {d}"),
            ObjectKind::Node => format!("index node {d}"),
        };
        object::decode(&self.keys, &buf, rec.kind, d, &what)
    }

    /// An object's extent as stored on its device (padded to 4 KiB), unchecked: the caller
    /// decodes it.
    pub fn read_object_bytes(&self, d: &Digest, rec: &ObjRec) -> Result<AlignedBuf> {
        if rec.extent.is_remote() {
            return self.fetch_remote(d, rec);
        }
        let dev = self.device(rec.extent.device)?;
        let len = object::extent_len(rec.stored_len);
        if len != rec.extent.len {
            return Err(PoolError::corrupt(
                format!("object record {d}"),
                "extent length mismatch",
            ));
        }
        let mut buf = AlignedBuf::zeroed(len as usize);
        io::run_batch(&mut [Op::Read {
            file: dev.file(),
            offset: rec.extent.offset,
            buf: &mut buf,
        }])
        .map_err(|e| dev.io_err(e))?;
        self.sealed_bytes_read.fetch_add(len, Ordering::Relaxed);
        Ok(buf)
    }

    pub fn lookup(&self, d: &Digest) -> Result<ObjRec> {
        self.meta.get_object(d)?.ok_or_else(|| {
            PoolError::corrupt(
                format!("object {d}"),
                "referenced but not in the object table",
            )
        })
    }

    /// Data chunk `d`'s object record as its cached header and table give it (the extent
    /// they were read from, the lengths the header states), if the table cache holds them.
    /// The reference count is not known (0): for reads only.
    fn cached_chunk_rec(&self, d: &Digest) -> Option<ObjRec> {
        let t = self.table_cache.peek(d)?;
        let h = object::parse_header(&t.1, ObjectKind::Chunk, d, "cached chunk table").ok()?;
        if h.version == OBJECT_FORMAT_V1 {
            return None;
        }
        Some(ObjRec {
            kind: ObjectKind::Chunk,
            extent: t.0,
            raw_len: u32::try_from(h.raw_len).ok()?,
            stored_len: u32::try_from(h.stored_len).ok()?,
            refcount: 0,
        })
    }

    /// A data chunk's bytes if the RAM cache holds them whole.
    pub fn chunk_cached(&self, d: &Digest) -> Option<Arc<Vec<u8>>> {
        self.chunk_cache.get(&ChunkKey::whole(*d))
    }

    /// An index node if the RAM cache holds it.
    pub fn node_cached(&self, d: &Digest) -> Option<Arc<Node>> {
        self.node_cache.get(d)
    }

    /// A data chunk's bytes (chunk_size long), through the RAM cache. Reads the whole object
    /// and checks the digest over all of it.
    pub fn chunk(&self, d: &Digest) -> Result<Arc<Vec<u8>>> {
        if let Some(c) = self.chunk_cached(d) {
            return Ok(c);
        }
        let rec = self.lookup(d)?;
        let raw = Arc::new(self.read_object(d, &rec)?);
        if raw.len() as u64 != self.chunk_size {
            return Err(PoolError::corrupt(format!("chunk {d}"), "wrong length"));
        }
        if !self.chunk_cache_disabled {
            let shifts = frame_shifts(self.table_cache.peek(d).as_ref());
            let cache = &self.chunk_cache;
            // Frames of it that partial reads cached are now dead weight (its table is not:
            // it is small, and the whole chunk may be evicted before its frames are read again).
            for shift in shifts.into_iter().flatten() {
                for f in 0..raw.len().div_ceil(1 << shift) {
                    cache.remove(&ChunkKey::frame(*d, shift, f));
                }
            }
            cache.put(
                ChunkKey::whole(*d),
                raw.clone(),
                raw.len() + CACHE_ENTRY_OVERHEAD,
            );
        }
        Ok(raw)
    }

    /// Copies raw bytes [within, within+dst.len()) of data chunk `d` into `dst` if the RAM cache
    /// holds them (the whole chunk, or every frame they fall in); false, `dst` then holding
    /// anything, if it does not. Never touches a device.
    pub fn read_chunk_range_cached(&self, d: &Digest, within: usize, dst: &mut [u8]) -> bool {
        let Some(end) = within
            .checked_add(dst.len())
            .filter(|&e| e as u64 <= self.chunk_size)
        else {
            return false;
        };
        if dst.is_empty() {
            return true;
        }
        if self.chunk_cache_disabled {
            return false; // nothing is ever put in it
        }
        // The frame length is the object's: its cached table says it (not locked together
        // with the chunk cache, so the two locks are never nested).
        let shifts = frame_shifts(self.table_cache.peek(d).as_ref());
        let cache = self.chunk_cache.shard(d);
        if let Some(c) = cache.get(&ChunkKey::whole(*d)) {
            drop(cache);
            dst.copy_from_slice(&c[within..end]);
            return true;
        }
        for shift in shifts.into_iter().flatten() {
            let (first, last) = (within >> shift, (end - 1) >> shift);
            if !(first..=last).all(|f| cache.contains(&ChunkKey::frame(*d, shift, f))) {
                continue;
            }
            let frames: Vec<Arc<Vec<u8>>> = (first..=last)
                .filter_map(|f| cache.get(&ChunkKey::frame(*d, shift, f)))
                .collect();
            if frames.len() != last - first + 1 {
                continue;
            }
            drop(cache);
            for (f, data) in (first..).zip(&frames) {
                object::copy_overlap(data, f << shift, within, dst);
            }
            return true;
        }
        false
    }

    /// Raw bytes [within, within+dst.len()) of data chunk `d`, reading and decompressing only
    /// the frames they fall in. Served from the RAM cache when it holds the whole chunk or
    /// those frames. Otherwise, when the table cache holds the chunk's header and frame table,
    /// one request reads the blocks of the frames; else one submission reads the object's first
    /// blocks (header and frame table) and, when every frame of the chunk is stored raw
    /// (incompressible data: the object record's lengths say so), the blocks of the frames too,
    /// while a chunk with compressed frames learns where they are from the table and reads them
    /// next (objects of at most [`PARTIAL_READ_WHOLE_MAX`] are read whole at once). Header, table and
    /// every frame used are checked against their CRCs, so damage is reported, never returned;
    /// the whole-chunk digest is not checked (it needs the whole chunk: [`Shared::chunk`] and
    /// verify check it). The decoded frames go into the chunk cache (its byte budget), so that
    /// re-reads of them hit RAM. A read that needs every frame, and a chunk stored in version 1
    /// (one payload), is served by [`Shared::chunk`].
    pub fn read_chunk_range(&self, d: &Digest, within: usize, dst: &mut [u8]) -> Result<()> {
        let end = within
            .checked_add(dst.len())
            .filter(|&e| e as u64 <= self.chunk_size)
            .ok_or_else(|| {
                PoolError::InvalidArgument(format!(
                    "range {within}+{} beyond a chunk of {}",
                    dst.len(),
                    self.chunk_size
                ))
            })?;
        if self.read_chunk_range_cached(d, within, dst) {
            return Ok(());
        }
        // A read of the whole chunk is a whole-chunk read (which checks the digest too);
        // anything less reads frames, whatever their length.
        if dst.len() as u64 != self.chunk_size {
            // A chunk whose table is cached needs no object-table lookup: the table was checked
            // against the chunk's record when it was cached, an object never moves while it
            // exists, and the sweep drops the table before its extent is freed (under the pin
            // the caller holds). The lookup was a metadata read transaction per block read:
            // under many readers, its locks were half of what they waited for.
            let rec = match self.cached_chunk_rec(d) {
                Some(rec) => rec,
                None => self.lookup(d)?,
            };
            if self.read_frames_from_device(d, &rec, within, dst)? {
                return Ok(());
            }
        }
        let c = self.chunk(d)?;
        dst.copy_from_slice(&c[within..end]);
        Ok(())
    }

    /// The device part of [`Shared::read_chunk_range`]; false if the object is not framed
    /// (version 1), for the caller to read it whole. Frames are of the object's own length
    /// (its header says; 64 KiB, or 4 KiB for incompressible chunks).
    fn read_frames_from_device(
        &self,
        d: &Digest,
        rec: &ObjRec,
        within: usize,
        dst: &mut [u8],
    ) -> Result<bool> {
        if rec.extent.is_remote() {
            return Ok(false); // fetched whole, by the caller's whole-chunk read
        }
        let label = ChunkLabel::new(d);
        let what = label.as_str();
        if rec.kind != ObjectKind::Chunk {
            return Err(PoolError::corrupt(
                what,
                "object record is not a data chunk",
            ));
        }
        let dev = self.device(rec.extent.device)?;
        let obj_len = object::extent_len(rec.stored_len);
        if obj_len != rec.extent.len || u64::from(rec.raw_len) != self.chunk_size {
            return Err(PoolError::corrupt(
                format!("object record {d}"),
                "lengths disagree with the extent or the chunk size",
            ));
        }
        let raw_len = rec.raw_len as usize;
        let end = within + dst.len();
        let cache = !self.chunk_cache_disabled;
        // Header and frame table: from the table cache if it holds them for this very extent,
        // else read in the first submission. The table cache is metadata, like the index-node
        // cache: it stays on when the chunk cache is off, or every small read of a compressed
        // chunk would cost two device round trips.
        let cached = self.table_cache.get(d).filter(|t| t.0 == rec.extent);
        let mut parts: Vec<(u64, AlignedBuf)> = Vec::new();
        let mut read_whole = false;
        let head: Arc<(Extent, Vec<u8>)> = match &cached {
            Some(t) => t.clone(),
            None => {
                // Every frame raw (incompressible data) shows in the record's lengths, and
                // then where the frames are, so header, table and frames are read in one
                // submission. Otherwise the chunk has compressed frames, which the writer
                // makes 64 KiB: that gives the table's length to read first.
                let layout = object::all_raw_layout(raw_len, rec.stored_len as usize);
                let fl = layout.map_or(1 << FRAME_SHIFT, |(fl, _)| fl);
                let table_end = OBJECT_HEADER_LEN + raw_len.div_ceil(fl) * object::FRAME_ENTRY_LEN;
                let head = align_up(table_end as u64, BLOCK).min(obj_len);
                // Byte ranges of the object to read in the first submission.
                let mut ranges: Vec<(u64, u64)> = vec![(0, head)];
                if obj_len <= PARTIAL_READ_WHOLE_MAX {
                    ranges[0].1 = obj_len;
                    read_whole = true;
                } else if let Some((fl, at)) = layout {
                    // Frame f is stored at at + f * fl.
                    let raw_s = within / fl * fl;
                    let raw_e = (end.div_ceil(fl) * fl).min(raw_len);
                    let a = (at + raw_s) as u64 / BLOCK * BLOCK;
                    let b = align_up((at + raw_e) as u64, BLOCK).min(obj_len);
                    if a <= head {
                        ranges[0].1 = b.max(head);
                    } else {
                        ranges.push((a, b));
                    }
                }
                parts = self.read_object_ranges(dev, rec, &ranges)?;
                let first: &[u8] = parts.first().map_or(&[], |p| &p.1[..]);
                let h = object::parse_header(first, ObjectKind::Chunk, d, what)?;
                if h.version == OBJECT_FORMAT_V1 {
                    return Ok(false);
                }
                // The header bounds the table (raw length <= MAX_OBJECT_RAW, frames of at
                // least 4 KiB): if it is longer than guessed, read the rest of it.
                let te = h.table_end();
                let mut bytes = first[..te.min(first.len())].to_vec();
                if te > first.len() {
                    if te as u64 > obj_len {
                        return Err(PoolError::corrupt(what, "frame table beyond the object"));
                    }
                    // first.len() is a block multiple: it ends short of the extent's end.
                    let from = first.len() as u64;
                    let more = self.read_object_ranges(
                        dev,
                        rec,
                        &[(from, align_up(te as u64, BLOCK).min(obj_len))],
                    )?;
                    for (_, b) in &more {
                        bytes.extend_from_slice(&b[..(te - from as usize).min(b.len())]);
                    }
                    parts.extend(more);
                }
                Arc::new((rec.extent, bytes))
            }
        };
        let h = object::parse_header(&head.1, ObjectKind::Chunk, d, what)?;
        if h.version == OBJECT_FORMAT_V1 {
            return Ok(false);
        }
        if h.raw_len != raw_len || h.stored_len != rec.stored_len as usize {
            return Err(PoolError::corrupt(
                what,
                "header lengths disagree with the object record",
            ));
        }
        let table = head
            .1
            .get(OBJECT_HEADER_LEN..h.table_end())
            .ok_or_else(|| PoolError::corrupt(what, "frame table beyond the first read"))?;
        let needed: Vec<object::Frame> = if cached.is_some() {
            // Checked whole when it was cached: decode only the entries this read uses.
            object::checked_table_frames(&h, table, within, dst.len(), what)?
        } else {
            let frames = object::parse_table(&h, table, what)?;
            // Only a table that passed its checks is kept.
            let size = head.1.len() + 64;
            self.table_cache.put(*d, head.clone(), size);
            object::frames_for(&frames, h.frame_len(), within, dst.len()).to_vec()
        };
        if read_whole && raw_len as u64 <= PARTIAL_READ_WHOLE_MAX {
            // A small chunk (64 KiB chunks, say) read whole: decode and check all of it (digest
            // too) and keep it whole, as a whole-chunk read would, so its other blocks are in
            // RAM now; it costs little more than its frame. (A large chunk that compressed
            // small is not decompressed whole for a small read: that is what frames avoid.)
            // Damage elsewhere in it must not fail this read: then only its frames are used.
            let whole = parts.first().map_or(&[][..], |p| &p.1[..]);
            match object::decode(&self.keys, whole, ObjectKind::Chunk, d, what) {
                Ok(raw) if raw.len() == raw_len => {
                    dst.copy_from_slice(&raw[within..end]);
                    if cache {
                        let size = raw.len() + CACHE_ENTRY_OVERHEAD;
                        self.chunk_cache
                            .put(ChunkKey::whole(*d), Arc::new(raw), size);
                    }
                    return Ok(true);
                }
                Ok(_) => {}
                Err(e) if e.is_integrity() => {}
                Err(e) => return Err(e),
            }
        }
        let (Some(first), Some(last)) = (needed.first(), needed.last()) else {
            return Err(PoolError::corrupt(what, "range beyond its frames"));
        };
        let (s, e) = (first.offset as u64, last.end() as u64);
        if find_range(&parts, s, e).is_none() {
            let a = s / BLOCK * BLOCK;
            let b = align_up(e, BLOCK).min(obj_len);
            parts.extend(self.read_object_ranges(dev, rec, &[(a, b)])?);
        }
        let stored = find_range(&parts, s, e)
            .ok_or_else(|| PoolError::corrupt(what, "frames beyond the object"))?;
        let shift = h.frame_shift();
        let mut dctx = None;
        for f in &needed {
            let at = f.offset - first.offset;
            let mut raw = vec![0u8; f.raw_len];
            object::decode_frame(f, &stored[at..at + f.stored_len], &mut raw, &mut dctx, what)?;
            object::copy_overlap(&raw, f.raw_offset, within, dst);
            // 4 KiB frames are cached one by one too: a re-read block then costs no device
            // request, and the budget counts each entry's overhead (about 5% of 4 KiB).
            if cache {
                let size = raw.len() + CACHE_ENTRY_OVERHEAD;
                self.chunk_cache
                    .put(ChunkKey::frame(*d, shift, f.index), Arc::new(raw), size);
            }
        }
        Ok(true)
    }

    /// Plans a read of raw bytes [within, within+len) of data chunk `d` that needs nothing but
    /// one device read: only when the table cache holds the chunk's checked header and frame
    /// table (so no object-table lookup, no index walk) and every frame the range falls in is
    /// stored raw (so no decompression, which belongs on a CPU pool). The caller reads
    /// [`FrameRead::offset`]..+[`FrameRead::len`] of device [`FrameRead::device`] (asynchronously)
    /// and hands the bytes to [`Shared::finish_raw_frames`]; it holds the pool's pin from before
    /// this call until then, so the extent cannot be reclaimed meanwhile. None: read it with
    /// [`Shared::read_chunk_range`].
    pub fn plan_raw_frames(&self, d: &Digest, within: usize, len: usize) -> Option<FrameRead> {
        let t = self.table_cache.get(d)?;
        let (extent, head) = (&t.0, &t.1);
        let label = ChunkLabel::new(d);
        let what = label.as_str();
        let h = object::parse_header(head, ObjectKind::Chunk, d, what).ok()?;
        if h.version == OBJECT_FORMAT_V1 {
            return None;
        }
        let table = head.get(OBJECT_HEADER_LEN..h.table_end())?;
        let frames = object::checked_table_frames(&h, table, within, len, what).ok()?;
        if frames.iter().any(|f| f.codec != object::Codec::Raw) {
            return None;
        }
        let (first, last) = (frames.first()?, frames.last()?);
        let a = first.offset as u64 / BLOCK * BLOCK;
        let b = align_up(last.end() as u64, BLOCK).min(extent.len);
        if b <= a {
            return None;
        }
        Some(FrameRead {
            device: extent.device,
            offset: extent.offset + a,
            len: (b - a) as usize,
            start: a as usize,
            shift: h.frame_shift(),
            digest: *d,
            within,
            frames,
        })
    }

    /// Completes a [`Shared::plan_raw_frames`] read: checks every frame's CRC in `buf` (the
    /// bytes read), copies the range into `dst` and caches the frames (as the blocking path
    /// does). A frame that fails its CRC is reported, never returned.
    pub fn finish_raw_frames(&self, plan: &FrameRead, buf: &[u8], dst: &mut [u8]) -> Result<()> {
        let what = || format!("chunk {}", plan.digest);
        self.sealed_bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        for f in &plan.frames {
            let at = f.offset - plan.start;
            let stored = buf
                .get(at..at + f.stored_len)
                .ok_or_else(|| PoolError::corrupt(what(), "frames beyond the read"))?;
            if crc32c::crc32c(stored) != f.crc {
                return Err(PoolError::Checksum {
                    what: format!("{} (frame {})", what(), f.index),
                });
            }
            object::copy_overlap(stored, f.raw_offset, plan.within, dst);
            if !self.chunk_cache_disabled {
                self.chunk_cache.put(
                    ChunkKey::frame(plan.digest, plan.shift, f.index),
                    Arc::new(stored.to_vec()),
                    stored.len() + CACHE_ENTRY_OVERHEAD,
                );
            }
        }
        Ok(())
    }

    /// Reads byte ranges [a, b) (4 KiB aligned, or ending at the extent's end) of an object's
    /// extent in one submission.
    fn read_object_ranges(
        &self,
        dev: &Device,
        rec: &ObjRec,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<(u64, AlignedBuf)>> {
        let mut bufs: Vec<(u64, AlignedBuf)> = ranges
            .iter()
            .map(|&(a, b)| (a, AlignedBuf::zeroed(b.saturating_sub(a) as usize)))
            .collect();
        let mut ops: Vec<Op<'_>> = bufs
            .iter_mut()
            .map(|(a, buf)| Op::Read {
                file: dev.file(),
                offset: rec.extent.offset + *a,
                buf: &mut buf[..],
            })
            .collect();
        io::run_batch(&mut ops).map_err(|e| dev.io_err(e))?;
        drop(ops);
        let total: u64 = bufs.iter().map(|(_, b)| b.len() as u64).sum();
        self.sealed_bytes_read.fetch_add(total, Ordering::Relaxed);
        Ok(bufs)
    }

    pub fn node(&self, d: &Digest) -> Result<Arc<Node>> {
        if let Some(n) = self.node_cache.get(d) {
            return Ok(n);
        }
        let rec = self.lookup(d)?;
        let raw = self.read_object(d, &rec)?;
        let node = Arc::new(Node::decode(&raw)?);
        self.node_cache.put(*d, node.clone(), raw.len() + 64);
        Ok(node)
    }

    /// Gives warm log space (see [`crate::alloc`]) back to the host filesystem: a write found
    /// the filesystem under a thin device full. False if there was none.
    pub fn release_warm(&self) -> bool {
        let warm = self.alloc.lock().take_warm_all();
        if warm.is_empty() {
            return false;
        }
        let bytes: u64 = warm.iter().map(|e| e.len).sum();
        self.give_back(warm);
        tracing::warn!(
            bytes,
            "the filesystem under a device is full: warm log space was given back to it"
        );
        true
    }

    /// Encodes and writes a new object to freshly allocated space. The caller records it in a
    /// metadata transaction; until then the space is free again after a crash.
    pub fn write_object(&self, kind: ObjectKind, d: &Digest, raw: &[u8]) -> Result<ObjRec> {
        let enc = object::encode(kind, d, raw, self.zstd_level)?;
        let extent = self
            .alloc
            .lock()
            .alloc(enc.buf.len() as u64, Placement::Object)
            .ok_or_else(|| PoolError::NoSpace("no room for sealed data".into()))?;
        let dev = self.device(extent.device)?;
        let write = || {
            io::run_batch(&mut [Op::Write {
                file: dev.file(),
                offset: extent.offset,
                buf: &enc.buf,
            }])
        };
        let mut res = write();
        if matches!(&res, Err(e) if e.raw_os_error() == Some(libc::ENOSPC)) && self.release_warm() {
            // The host filesystem under a thin device filled: warm log space was holding
            // some of it, and holds none now.
            res = write();
        }
        if let Err(e) = res {
            self.alloc.lock().free(extent);
            return Err(dev.io_err(e));
        }
        Ok(ObjRec {
            kind,
            extent,
            raw_len: enc.raw_len,
            stored_len: enc.stored_len,
            refcount: 0,
        })
    }

    /// Writes an object already encoded (`stored`: header, table, frames; checked by the
    /// caller) to freshly allocated space, as [`Shared::write_object`] does for raw bytes.
    pub fn write_encoded(&self, kind: ObjectKind, d: &Digest, stored: &[u8]) -> Result<ObjRec> {
        let h = object::parse_header(stored, kind, d, "encoded object")?;
        if h.object_len() != stored.len() {
            return Err(PoolError::corrupt(
                format!("encoded object {d}"),
                "length disagrees with its header",
            ));
        }
        let len = object::extent_len(h.stored_len as u32) as usize;
        let mut buf = AlignedBuf::zeroed(len);
        buf[..stored.len()].copy_from_slice(stored);
        let extent = self
            .alloc
            .lock()
            .alloc(len as u64, Placement::Object)
            .ok_or_else(|| PoolError::NoSpace("no room for sealed data".into()))?;
        let dev = self.device(extent.device)?;
        let write = || {
            io::run_batch(&mut [Op::Write {
                file: dev.file(),
                offset: extent.offset,
                buf: &buf,
            }])
        };
        let mut res = write();
        if matches!(&res, Err(e) if e.raw_os_error() == Some(libc::ENOSPC)) && self.release_warm() {
            res = write();
        }
        if let Err(e) = res {
            self.alloc.lock().free(extent);
            return Err(dev.io_err(e));
        }
        Ok(ObjRec {
            kind,
            extent,
            raw_len: h.raw_len as u32,
            stored_len: h.stored_len as u32,
            refcount: 0,
        })
    }

    pub fn sync_all(&self) -> Result<()> {
        for d in self.all_devices() {
            d.sync()?;
        }
        Ok(())
    }

    /// Sweeps unreferenced objects and hands pending extents back to the allocator, if no
    /// reader or seal is in flight; false if it has to be retried later.
    pub fn reclaim(&self) -> Result<bool> {
        let Some(w) = self.pin.try_write() else {
            return Ok(false);
        };
        let dead: Vec<Digest> = self.dead.lock().drain().collect();
        if !dead.is_empty() {
            let mut freed = Vec::new();
            let mut swept = Vec::new();
            let tx = self.meta.begin_write()?;
            {
                let mut t = tx.open_table(crate::meta::OBJECTS)?;
                for d in &dead {
                    let rec = match t.get(&d.0)? {
                        Some(v) => ObjRec::decode(v.value(), d)?,
                        None => continue,
                    };
                    if rec.refcount == 0 {
                        t.remove(&d.0)?;
                        freed.push(rec.extent);
                        swept.push(*d);
                    }
                }
            }
            tx.commit()?;
            // A cached table names its object's extent, which is about to be free: were the
            // same content stored again elsewhere, the entry would point at foreign bytes.
            // (Readers that trust the cache without the object table, `plan_raw_frames`,
            // rely on this; the pin keeps them out meanwhile.)
            for d in &swept {
                self.table_cache.remove(d);
            }
            tracing::debug!(objects = freed.len(), "swept unreferenced objects");
            self.pending_free.lock().extend(freed);
        }
        let retired: Vec<_> = self.retired_log_sums.lock().drain(..).collect();
        if !retired.is_empty() {
            let mut sums = self.log_sums.write();
            for r in retired {
                let doomed: Vec<u64> = sums.range(r).map(|(l, _)| *l).collect();
                for l in doomed {
                    sums.remove(&l);
                }
            }
        }
        let mut released: Vec<Extent> = self.pending_free.lock().drain(..).collect();
        let segments: Vec<Extent> = self.pending_free_log.lock().drain(..).collect();
        // Readers may go on: nothing they can reach points into `released` (or the segments)
        // any more, and no allocation hands it out before it is in the free map below.
        drop(w);
        if !segments.is_empty() {
            let mut a = self.alloc.lock();
            released.extend(segments.into_iter().filter(|e| !a.free_warm(*e)));
        }
        self.give_back(released);
        Ok(true)
    }

    /// Gives free extents back to the host filesystem (holes in a file device), then to the
    /// allocator. Nothing may still point into them.
    fn give_back(&self, extents: Vec<Extent>) {
        for e in &extents {
            if let Ok(dev) = self.device(e.device) {
                dev.release(e.offset, e.len);
            }
        }
        let mut a = self.alloc.lock();
        for e in extents {
            a.free(e);
        }
    }
}
