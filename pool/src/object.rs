//! The on-device format of sealed objects (data chunks and index nodes).
//!
//! Every object starts with a 64-byte header; bytes 0..11, 12..52 and 60..64 mean the same in
//! every version. Version 1 (index nodes, and data chunks written before version 2) is one
//! payload:
//!
//! ```text
//! offset size
//!  0      8   magic "MAASOBJ\0"
//!  8      2   format version (1)
//! 10      1   kind (1 = data chunk, 2 = index node)
//! 11      1   codec (0 = raw, 1 = zstd)
//! 12      4   raw length
//! 16      4   stored (payload) length
//! 20     32   digest (keyed BLAKE3 of the raw bytes)
//! 52      4   CRC32C of the payload
//! 56      4   reserved (0)
//! 60      4   CRC32C of bytes 0..60
//! 64      …   payload, then zero padding to 4 KiB
//! ```
//!
//! Version 2 (data chunks) cuts the raw chunk into frames (the last may be shorter), each
//! compressed on its own, so that a small read decompresses one frame, not the chunk. The frame
//! length depends on the data:
//!
//! - chunks worth compressing (the sample check of [`worth_compressing`]) use 64 KiB frames:
//!   zstd keeps close to its whole-chunk ratio, and a 1 MiB chunk's table is 256 bytes;
//! - chunks not worth compressing (already-compressed or encrypted backups) use 4 KiB frames,
//!   all raw, with the first frame at a 4 KiB boundary of the object: a 4 KiB read then reads
//!   and checks one 4 KiB block (its own CRC), not a 64 KiB frame (16x read amplification that
//!   caps random 4 KiB reads of such data at a fraction of the device's IOPS). The price is the
//!   table: 16 bytes per 4 KiB (0.4%: 4 KiB of device space and of table cache per 1 MiB
//!   chunk, against 256 bytes with 64 KiB frames), and a first uncached read of a 1 MiB chunk
//!   reads two header blocks instead of one. Compressed chunks would not gain from it (zstd on
//!   4 KiB frames compresses badly, and a compressed frame is no longer one block) and keep
//!   64 KiB frames.
//!
//! ```text
//! offset size
//!  0      8   magic "MAASOBJ\0"
//!  8      2   format version (2)
//! 10      1   kind (1 = data chunk)
//! 11      1   log2 of the raw frame length (16 = 64 KiB; 12..=24 accepted)
//! 12      4   raw length (of the whole chunk)
//! 16      4   stored length: frame table + frames (everything after the header)
//! 20     32   digest (keyed BLAKE3 of the whole raw chunk, as in version 1)
//! 52      4   frame count n = ceil(raw length / frame length)
//! 56      4   CRC32C of the frame table
//! 60      4   CRC32C of bytes 0..60
//! 64   16*n   frame table, one 16-byte entry per frame:
//!               0  4  stored offset (from the start of the object)
//!               4  4  stored length (<= the frame's raw length)
//!               8  1  codec (0 = raw, 1 = zstd)
//!               9  3  reserved (0)
//!              12  4  CRC32C of the stored frame bytes
//! 64+16n  …   zero padding to the next 4 KiB boundary of the object, or none (see below)
//!   s     …   the stored frames, back to back in frame order, then zero padding to 4 KiB
//! ```
//!
//! The table sits right after the header so that a reader gets both from the object's first
//! blocks (a 1 MiB chunk of 64 KiB frames: 320 bytes; of 4 KiB frames: 4160 bytes, two blocks).
//! The frames start at `s`, the first entry's offset, which is either the end of the table or
//! the next 4 KiB boundary (`align_up(64 + 16n, 4096)`; the writer pads so for 4 KiB frames, so
//! that every raw 4 KiB frame is exactly one device block and a 4 KiB read is one 4 KiB
//! request; the padding is zero and checked by whole-object decodes). From there frames are
//! contiguous and in order, so the table is checked to describe exactly the stored bytes: no
//! gaps, no overlaps, no frame beyond the stored length. A raw frame is stored exactly as long
//! as it is raw, so a chunk of which every frame is raw has `stored length == s - 64 + raw
//! length` and every frame's position follows from its number without reading the table
//! ([`all_raw_layout`]: what partial reads of incompressible chunks use to read header, table
//! and frame in one submission). (Readers of version 2 from before 4 KiB frames took the first
//! frame only at the end of the table: they report an aligned object as damaged. Version 2
//! had not left development then; once it has, a layout change takes a new version number.)
//!
//! A reader of the whole object checks both CRCs, every frame's CRC, decompresses, and re-hashes
//! the raw bytes against the digest. A reader of some frames ([`read_frames`]) checks the header
//! CRC, the table CRC and the CRC of every frame it uses: a damaged object is reported, never
//! returned as data. The digest key is per pool, so digests reveal nothing across pools.

use crate::error::{PoolError, Result};
use crate::io::AlignedBuf;
use crate::types::{BLOCK, Digest, align_up};

pub const OBJECT_MAGIC: &[u8; 8] = b"MAASOBJ\0";
/// Version of index nodes (one payload).
pub const OBJECT_FORMAT_V1: u16 = 1;
/// Version of data chunks (independent frames and a frame table).
pub const OBJECT_FORMAT_V2: u16 = 2;
pub const OBJECT_HEADER_LEN: usize = 64;
/// Largest raw object we accept when decoding (bounded allocation on hostile input).
pub const MAX_OBJECT_RAW: usize = 64 << 20;
/// log2 of the raw frame length version 2 objects worth compressing are written with.
pub const FRAME_SHIFT: u8 = 16;
/// Raw bytes per frame: a small read decompresses (and reads) at most this much per frame it
/// touches. 64 KiB keeps zstd's ratio close to whole-chunk compression while a 4 KiB read
/// costs a sixteenth of a 1 MiB chunk.
pub const FRAME_LEN: usize = 1 << FRAME_SHIFT;
/// log2 of the raw frame length of version 2 objects not worth compressing (all frames raw):
/// one device block per frame, so a 4 KiB read reads and checks 4 KiB.
pub const RAW_FRAME_SHIFT: u8 = 12;
/// Raw bytes per frame of an incompressible chunk.
pub const RAW_FRAME_LEN: usize = 1 << RAW_FRAME_SHIFT;
/// Bytes per frame table entry.
pub const FRAME_ENTRY_LEN: usize = 16;
/// Frame lengths a version 2 decoder accepts (4 KiB..16 MiB), so a hostile header cannot ask
/// for a huge table or huge frames.
pub const FRAME_SHIFTS: std::ops::RangeInclusive<u8> = 12..=24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    Chunk = 1,
    Node = 2,
}

impl ObjectKind {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(ObjectKind::Chunk),
            2 => Some(ObjectKind::Node),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

/// Per-pool hashing keys, derived from the pool secret.
#[derive(Clone)]
pub struct Keys {
    chunk: [u8; 32],
    node: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    pub fn derive(pool_secret: &[u8; 32]) -> Self {
        Keys {
            chunk: blake3::derive_key("maas pool 2026 data chunk digest v1", pool_secret),
            node: blake3::derive_key("maas pool 2026 index node digest v1", pool_secret),
        }
    }

    /// Keys given as raw bytes (another pool's, from an archive bucket).
    pub fn from_raw(chunk: [u8; 32], node: [u8; 32]) -> Self {
        Keys { chunk, node }
    }

    pub(crate) fn raw(&self) -> ([u8; 32], [u8; 32]) {
        (self.chunk, self.node)
    }

    pub fn digest(&self, kind: ObjectKind, raw: &[u8]) -> Digest {
        let key = match kind {
            ObjectKind::Chunk => &self.chunk,
            ObjectKind::Node => &self.node,
        };
        Digest(*blake3::keyed_hash(key, raw).as_bytes())
    }
}

/// An encoded object ready to be written: 4 KiB aligned and padded.
#[derive(Debug)]
pub struct Encoded {
    pub buf: AlignedBuf,
    pub raw_len: u32,
    /// Bytes after the header (version 2: frame table and frames).
    pub stored_len: u32,
    /// Zstd if the payload (version 1) or any frame (version 2) is compressed.
    pub codec: Codec,
}

/// Compresses (when it pays) and frames `raw`: data chunks as version 2 (frames, so that small
/// reads need not decompress the whole chunk), index nodes as version 1 (they are small and
/// always read whole).
pub fn encode(kind: ObjectKind, digest: &Digest, raw: &[u8], zstd_level: i32) -> Result<Encoded> {
    if raw.len() > MAX_OBJECT_RAW {
        return Err(PoolError::InvalidArgument(format!(
            "object of {} bytes is larger than {MAX_OBJECT_RAW}",
            raw.len()
        )));
    }
    match kind {
        ObjectKind::Chunk => encode_v2(digest, raw, zstd_level),
        ObjectKind::Node => encode_v1(kind, digest, raw, zstd_level),
    }
}

fn zstd_err(e: std::io::Error) -> PoolError {
    PoolError::io("zstd compression", e)
}

/// Version 1: one payload. What index nodes are written as, and what data chunks were written
/// as before version 2 (tests and tools make such chunks with it).
pub fn encode_v1(
    kind: ObjectKind,
    digest: &Digest,
    raw: &[u8],
    zstd_level: i32,
) -> Result<Encoded> {
    let compressed = if worth_compressing(raw, zstd_level)? {
        zstd::bulk::compress(raw, zstd_level).map_err(zstd_err)?
    } else {
        Vec::new()
    };
    let (codec, payload): (Codec, &[u8]) =
        if !compressed.is_empty() && compressed.len() + 64 < raw.len() {
            (Codec::Zstd, &compressed)
        } else {
            (Codec::Raw, raw)
        };
    let total = align_up((OBJECT_HEADER_LEN + payload.len()) as u64, BLOCK) as usize;
    let mut buf = AlignedBuf::zeroed(total);
    buf[0..8].copy_from_slice(OBJECT_MAGIC);
    buf[8..10].copy_from_slice(&OBJECT_FORMAT_V1.to_le_bytes());
    buf[10] = kind as u8;
    buf[11] = codec as u8;
    buf[12..16].copy_from_slice(&(raw.len() as u32).to_le_bytes());
    buf[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    buf[20..52].copy_from_slice(&digest.0);
    buf[52..56].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let hcrc = crc32c::crc32c(&buf[..60]);
    buf[60..64].copy_from_slice(&hcrc.to_le_bytes());
    buf[OBJECT_HEADER_LEN..OBJECT_HEADER_LEN + payload.len()].copy_from_slice(payload);
    Ok(Encoded {
        buf,
        raw_len: raw.len() as u32,
        stored_len: payload.len() as u32,
        codec,
    })
}

/// Version 2: every frame compressed on its own. Whether to try compression at all is judged
/// once per chunk by [`worth_compressing`] (three samples), as in version 1, so that
/// incompressible chunks cost a few KiB of compression, not 1 MiB. When it is tried, frames are
/// 64 KiB and each frame that does not shrink by more than 64 bytes is stored raw, so a chunk
/// that is part text, part already-compressed data keeps only the frames that pay compressed.
/// When it is not, frames are 4 KiB, all raw, starting at a 4 KiB boundary (module doc).
fn encode_v2(digest: &Digest, raw: &[u8], zstd_level: i32) -> Result<Encoded> {
    let mut compressor = if worth_compressing(raw, zstd_level)? {
        Some(zstd::bulk::Compressor::new(zstd_level).map_err(zstd_err)?)
    } else {
        None
    };
    let shift = if compressor.is_some() {
        FRAME_SHIFT
    } else {
        RAW_FRAME_SHIFT
    };
    let fl = 1usize << shift;
    let n = raw.len().div_ceil(fl);
    let table_len = n * FRAME_ENTRY_LEN;
    let table_end = OBJECT_HEADER_LEN + table_len;
    // Raw 4 KiB frames start at a block boundary: each is then one device block.
    let frames_at = if compressor.is_some() {
        table_end
    } else {
        align_up(table_end as u64, BLOCK) as usize
    };
    let mut packed: Vec<Option<Vec<u8>>> = Vec::with_capacity(n);
    for frame in raw.chunks(fl) {
        let p = match compressor.as_mut() {
            Some(c) => {
                let z = c.compress(frame).map_err(zstd_err)?;
                (z.len() + 64 < frame.len()).then_some(z)
            }
            None => None,
        };
        packed.push(p);
    }
    let frames_len: usize = raw
        .chunks(fl)
        .zip(&packed)
        .map(|(f, p)| p.as_ref().map_or(f.len(), Vec::len))
        .sum();
    let stored_len = frames_at - OBJECT_HEADER_LEN + frames_len;
    let total = align_up((OBJECT_HEADER_LEN + stored_len) as u64, BLOCK) as usize;
    let mut buf = AlignedBuf::zeroed(total);
    let mut at = frames_at;
    let mut any_zstd = false;
    for (i, (frame, p)) in raw.chunks(fl).zip(&packed).enumerate() {
        let (codec, bytes) = match p {
            Some(z) => (Codec::Zstd, &z[..]),
            None => (Codec::Raw, frame),
        };
        any_zstd |= codec == Codec::Zstd;
        let e = OBJECT_HEADER_LEN + i * FRAME_ENTRY_LEN;
        buf[e..e + 4].copy_from_slice(&(at as u32).to_le_bytes());
        buf[e + 4..e + 8].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        buf[e + 8] = codec as u8;
        buf[e + 12..e + 16].copy_from_slice(&crc32c::crc32c(bytes).to_le_bytes());
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    }
    buf[0..8].copy_from_slice(OBJECT_MAGIC);
    buf[8..10].copy_from_slice(&OBJECT_FORMAT_V2.to_le_bytes());
    buf[10] = ObjectKind::Chunk as u8;
    buf[11] = shift;
    buf[12..16].copy_from_slice(&(raw.len() as u32).to_le_bytes());
    buf[16..20].copy_from_slice(&(stored_len as u32).to_le_bytes());
    buf[20..52].copy_from_slice(&digest.0);
    buf[52..56].copy_from_slice(&(n as u32).to_le_bytes());
    let tcrc = crc32c::crc32c(&buf[OBJECT_HEADER_LEN..table_end]);
    buf[56..60].copy_from_slice(&tcrc.to_le_bytes());
    let hcrc = crc32c::crc32c(&buf[..60]);
    buf[60..64].copy_from_slice(&hcrc.to_le_bytes());
    Ok(Encoded {
        buf,
        raw_len: raw.len() as u32,
        stored_len: stored_len as u32,
        codec: if any_zstd { Codec::Zstd } else { Codec::Raw },
    })
}

/// Objects at least this long are sampled before they are compressed.
const SAMPLE_FROM: usize = 64 << 10;
const SAMPLE_LEN: usize = 4096;

/// Whether compressing `raw` is worth trying. Large objects are judged by three samples (start,
/// middle, end): when those do not shrink by 1/16, the object is stored as it is without
/// compressing all of it. Already-compressed or encrypted backups (and random test data) then
/// cost a few KiB of compression per chunk instead of the whole chunk; an object that only
/// compresses where no sample looked is stored raw, which costs space, never correctness.
fn worth_compressing(raw: &[u8], zstd_level: i32) -> Result<bool> {
    if raw.len() < SAMPLE_FROM {
        return Ok(true);
    }
    let mid = (raw.len() / 2) & !(SAMPLE_LEN - 1);
    let mut sample = Vec::with_capacity(3 * SAMPLE_LEN);
    for at in [0, mid, raw.len() - SAMPLE_LEN] {
        sample.extend_from_slice(&raw[at..at + SAMPLE_LEN]);
    }
    let packed = zstd::bulk::compress(&sample, zstd_level).map_err(zstd_err)?;
    Ok(packed.len() < sample.len() - sample.len() / 16)
}

/// Total on-device length of an object whose payload is `stored_len` bytes.
pub fn extent_len(stored_len: u32) -> u64 {
    align_up(OBJECT_HEADER_LEN as u64 + stored_len as u64, BLOCK)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A checked object header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub raw_len: usize,
    /// Bytes after the header.
    pub stored_len: usize,
    /// Byte 11: the codec (version 1) or log2 of the frame length (version 2).
    byte11: u8,
    /// Bytes 52..56: payload CRC (version 1) or frame count (version 2).
    word52: u32,
    /// Bytes 56..60: reserved (version 1) or frame table CRC (version 2).
    word56: u32,
}

impl Header {
    /// Raw bytes per frame (version 2).
    pub fn frame_len(&self) -> usize {
        // Checked by parse_header for version 2; for version 1 the byte is a codec, and the
        // shift must not overflow whatever it holds.
        1usize.checked_shl(u32::from(self.byte11)).unwrap_or(0)
    }
    /// log2 of the frame length (version 2; checked to be in 12..=24).
    pub fn frame_shift(&self) -> u8 {
        self.byte11
    }
    /// Frames (version 2).
    pub fn frame_count(&self) -> usize {
        self.word52 as usize
    }
    /// End of the frame table: where the first frame is stored (version 2).
    pub fn table_end(&self) -> usize {
        OBJECT_HEADER_LEN + self.frame_count() * FRAME_ENTRY_LEN
    }
    /// Header and stored bytes, without padding.
    pub fn object_len(&self) -> usize {
        OBJECT_HEADER_LEN + self.stored_len
    }
}

/// Checks the header at the start of `buf` (which may hold only a prefix of the object): its
/// CRC, magic, version, kind and digest, and that its lengths are bounded and agree with each
/// other.
pub fn parse_header(buf: &[u8], kind: ObjectKind, expect: &Digest, what: &str) -> Result<Header> {
    if buf.len() < OBJECT_HEADER_LEN {
        return Err(PoolError::corrupt(what, "object shorter than its header"));
    }
    if le32(buf, 60) != crc32c::crc32c(&buf[..60]) {
        return Err(PoolError::Checksum {
            what: format!("{what} (header)"),
        });
    }
    if &buf[0..8] != OBJECT_MAGIC {
        return Err(PoolError::corrupt(what, "bad magic"));
    }
    let version = u16::from_le_bytes([buf[8], buf[9]]);
    if version != OBJECT_FORMAT_V1 && version != OBJECT_FORMAT_V2 {
        return Err(PoolError::UnsupportedFormat {
            what: what.into(),
            detail: format!("version {version}"),
        });
    }
    if buf[10] != kind as u8 {
        return Err(PoolError::corrupt(
            what,
            format!("kind {} where {} was expected", buf[10], kind as u8),
        ));
    }
    if buf[20..52] != expect.0 {
        return Err(PoolError::corrupt(what, "object carries another digest"));
    }
    let h = Header {
        version,
        raw_len: le32(buf, 12) as usize,
        stored_len: le32(buf, 16) as usize,
        byte11: buf[11],
        word52: le32(buf, 52),
        word56: le32(buf, 56),
    };
    if h.raw_len > MAX_OBJECT_RAW {
        return Err(PoolError::corrupt(what, "lengths out of bounds"));
    }
    if version == OBJECT_FORMAT_V2 {
        if !FRAME_SHIFTS.contains(&h.byte11) {
            return Err(PoolError::corrupt(
                what,
                format!("frame length 2^{}", h.byte11),
            ));
        }
        // With the raw length bounded, so are the frame count and the table.
        if h.frame_count() != h.raw_len.div_ceil(h.frame_len()) {
            return Err(PoolError::corrupt(
                what,
                "frame count disagrees with length",
            ));
        }
        if h.stored_len < h.frame_count() * FRAME_ENTRY_LEN {
            return Err(PoolError::corrupt(
                what,
                "stored length shorter than frame table",
            ));
        }
    }
    Ok(h)
}

/// Replaces the digest in an object's header (and the header's CRC): the object re-keyed for
/// another pool. The payload and its CRCs are unchanged.
pub fn set_digest(buf: &mut [u8], d: &Digest) -> Result<()> {
    if buf.len() < OBJECT_HEADER_LEN {
        return Err(PoolError::corrupt("object", "shorter than its header"));
    }
    buf[20..52].copy_from_slice(&d.0);
    let crc = crc32c::crc32c(&buf[..60]);
    buf[60..64].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// One frame of a version 2 object, as its (checked) table entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub index: usize,
    /// Where its stored bytes start, from the start of the object.
    pub offset: usize,
    pub stored_len: usize,
    pub codec: Codec,
    pub crc: u32,
    /// Where its raw bytes start in the raw object.
    pub raw_offset: usize,
    pub raw_len: usize,
}

impl Frame {
    /// End of its stored bytes, from the start of the object.
    pub fn end(&self) -> usize {
        self.offset + self.stored_len
    }
}

/// Checks a version 2 frame table (`table`: the bytes from the end of the header to
/// [`Header::table_end`]) against its CRC, and that its frames lie back to back, in order, exactly
/// over the stored bytes, each no longer stored than raw and a raw frame exactly as long.
pub fn parse_table(h: &Header, table: &[u8], what: &str) -> Result<Vec<Frame>> {
    let n = h.frame_count();
    if h.version != OBJECT_FORMAT_V2 || table.len() != n * FRAME_ENTRY_LEN {
        return Err(PoolError::corrupt(what, "frame table length"));
    }
    if crc32c::crc32c(table) != h.word56 {
        return Err(PoolError::Checksum {
            what: format!("{what} (frame table)"),
        });
    }
    let end = h.object_len();
    // The frames start right after the table or at the next block boundary (module doc).
    let mut at = h.table_end();
    if let Some(first) = table.get(..4).map(|e| le32(e, 0) as usize)
        && first == align_up(at as u64, BLOCK) as usize
    {
        at = first;
    }
    let mut frames = Vec::with_capacity(n);
    for (index, e) in table.chunks_exact(FRAME_ENTRY_LEN).enumerate() {
        let f = parse_entry(h, e, index, what)?;
        if f.offset != at {
            return Err(PoolError::corrupt(
                what,
                format!("frame {index}: table entry out of bounds"),
            ));
        }
        at += f.stored_len;
        frames.push(f);
    }
    if at != end {
        return Err(PoolError::corrupt(
            what,
            "frames do not fill the stored length",
        ));
    }
    Ok(frames)
}

/// One table entry (`e`, 16 bytes) of frame `index`, checked on its own: known codec, reserved
/// bytes zero, stored length within the frame's raw length (equal for a raw frame), stored
/// bytes within the object. Whether it follows its predecessor is [`parse_table`]'s check.
fn parse_entry(h: &Header, e: &[u8], index: usize, what: &str) -> Result<Frame> {
    let fl = h.frame_len();
    let raw_offset = index.saturating_mul(fl);
    let bad = || PoolError::corrupt(what, format!("frame {index}: table entry out of bounds"));
    if e.len() != FRAME_ENTRY_LEN || fl == 0 || raw_offset >= h.raw_len {
        return Err(bad());
    }
    let raw_len = fl.min(h.raw_len - raw_offset);
    let offset = le32(e, 0) as usize;
    let stored_len = le32(e, 4) as usize;
    let codec = match e[8] {
        0 => Codec::Raw,
        1 => Codec::Zstd,
        c => {
            return Err(PoolError::corrupt(
                what,
                format!("frame {index}: unknown codec {c}"),
            ));
        }
    };
    let out = offset < h.table_end()
        || stored_len == 0
        || stored_len > raw_len
        || (codec == Codec::Raw && stored_len != raw_len)
        || e[9..12] != [0, 0, 0]
        || offset + stored_len > h.object_len();
    if out {
        return Err(bad());
    }
    Ok(Frame {
        index,
        offset,
        stored_len,
        codec,
        crc: le32(e, 12),
        raw_offset,
        raw_len,
    })
}

/// The frames raw bytes [within, within+len) fall in (len > 0), from a table that already
/// passed [`parse_table`] (a cached one): only their entries are decoded, each still checked
/// on its own, so a read of a 4 KiB-framed chunk does not re-check and decode 256 entries to
/// use one. `table` as for [`parse_table`].
pub fn checked_table_frames(
    h: &Header,
    table: &[u8],
    within: usize,
    len: usize,
    what: &str,
) -> Result<Vec<Frame>> {
    let fl = h.frame_len();
    let end = within
        .checked_add(len)
        .filter(|&e| e <= h.raw_len && len > 0);
    let (Some(end), true) = (end, fl > 0) else {
        return Err(PoolError::corrupt(what, "range beyond its frames"));
    };
    (within / fl..=(end - 1) / fl)
        .map(|i| {
            let e = table
                .get(i * FRAME_ENTRY_LEN..(i + 1) * FRAME_ENTRY_LEN)
                .ok_or_else(|| PoolError::corrupt(what, "range beyond its frames"))?;
            parse_entry(h, e, i, what)
        })
        .collect()
}

/// Where the frames of a version 2 chunk of `raw_len` bytes stored in `stored_len` bytes are,
/// if its lengths say every frame is raw: (frame length, offset of the first frame). Raw frames
/// are stored exactly as long as they are raw, so `stored_len` is the table, any padding to a
/// block boundary, and `raw_len`; the frame length is the one whose table fits. The writer's
/// layouts (4 KiB frames aligned, 64 KiB frames packed) are tried first; a wrong guess (a
/// damaged record, or a chunk of one frame) only costs the reader a second request, since the
/// table it reads decides.
pub fn all_raw_layout(raw_len: usize, stored_len: usize) -> Option<(usize, usize)> {
    let shifts = [RAW_FRAME_SHIFT, FRAME_SHIFT]
        .into_iter()
        .chain(FRAME_SHIFTS.filter(|s| *s != RAW_FRAME_SHIFT && *s != FRAME_SHIFT));
    for shift in shifts {
        let fl = 1usize << shift;
        let table_end = OBJECT_HEADER_LEN + raw_len.div_ceil(fl) * FRAME_ENTRY_LEN;
        for at in [table_end, align_up(table_end as u64, BLOCK) as usize] {
            if OBJECT_HEADER_LEN + stored_len == at + raw_len {
                return Some((fl, at));
            }
        }
    }
    None
}

/// Checks one frame's stored bytes against its CRC and decodes them into `out` (exactly its raw
/// length). `dctx` is a decompressor reused across the frames of one read.
pub fn decode_frame(
    f: &Frame,
    stored: &[u8],
    out: &mut [u8],
    dctx: &mut Option<zstd::bulk::Decompressor<'static>>,
    what: &str,
) -> Result<()> {
    if stored.len() != f.stored_len || out.len() != f.raw_len {
        return Err(PoolError::corrupt(
            what,
            format!("frame {}: buffer lengths", f.index),
        ));
    }
    if crc32c::crc32c(stored) != f.crc {
        return Err(PoolError::Checksum {
            what: format!("{what} (frame {})", f.index),
        });
    }
    match f.codec {
        Codec::Raw => out.copy_from_slice(stored),
        Codec::Zstd => {
            let d = match dctx {
                Some(d) => d,
                None => dctx.insert(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| PoolError::io("zstd decompression", e))?,
                ),
            };
            let n = d
                .decompress_to_buffer(stored, out)
                .map_err(|e| PoolError::corrupt(what, format!("frame {}: zstd: {e}", f.index)))?;
            if n != out.len() {
                return Err(PoolError::corrupt(
                    what,
                    format!("frame {}: decompressed length mismatch", f.index),
                ));
            }
        }
    }
    Ok(())
}

/// Checks and decodes a whole object read from a device; `what` names it in errors. Every
/// version ends with the digest check over all raw bytes.
pub fn decode(
    keys: &Keys,
    buf: &[u8],
    kind: ObjectKind,
    expect: &Digest,
    what: &str,
) -> Result<Vec<u8>> {
    let h = parse_header(buf, kind, expect, what)?;
    if h.object_len() > buf.len() {
        return Err(PoolError::corrupt(what, "lengths out of bounds"));
    }
    let raw = match h.version {
        OBJECT_FORMAT_V1 => decode_v1_payload(&h, buf, what)?,
        _ => {
            let frames = parse_table(&h, &buf[OBJECT_HEADER_LEN..h.table_end()], what)?;
            // The padding between table and frames is covered by no CRC: it must be zero.
            let first = frames.first().map_or(h.table_end(), |f| f.offset);
            if buf[h.table_end()..first].iter().any(|&b| b != 0) {
                return Err(PoolError::corrupt(what, "padding after the frame table"));
            }
            let mut raw = vec![0u8; h.raw_len];
            let mut dctx = None;
            for f in &frames {
                decode_frame(
                    f,
                    &buf[f.offset..f.end()],
                    &mut raw[f.raw_offset..f.raw_offset + f.raw_len],
                    &mut dctx,
                    what,
                )?;
            }
            raw
        }
    };
    if keys.digest(kind, &raw) != *expect {
        return Err(PoolError::Checksum {
            what: format!("{what} (digest)"),
        });
    }
    Ok(raw)
}

fn decode_v1_payload(h: &Header, buf: &[u8], what: &str) -> Result<Vec<u8>> {
    let payload = &buf[OBJECT_HEADER_LEN..h.object_len()];
    if crc32c::crc32c(payload) != h.word52 {
        return Err(PoolError::Checksum {
            what: format!("{what} (payload)"),
        });
    }
    match h.byte11 {
        0 if h.stored_len == h.raw_len => Ok(payload.to_vec()),
        1 => {
            let out = zstd::bulk::decompress(payload, h.raw_len)
                .map_err(|e| PoolError::corrupt(what, format!("zstd: {e}")))?;
            if out.len() != h.raw_len {
                return Err(PoolError::corrupt(what, "decompressed length mismatch"));
            }
            Ok(out)
        }
        c => Err(PoolError::corrupt(what, format!("unknown codec {c}"))),
    }
}

/// The frames of a version 2 object that raw bytes [within, within+len) fall in (len > 0,
/// in range).
pub fn frames_for(frames: &[Frame], frame_len: usize, within: usize, len: usize) -> &[Frame] {
    let first = within / frame_len;
    let last = (within + len - 1) / frame_len;
    let last = last.min(frames.len().saturating_sub(1));
    frames.get(first..=last).unwrap_or(&[])
}

/// Decodes raw bytes [within, within+dst.len()) of an object held in memory (`buf`: the whole
/// object, or at least its header, table and the frames needed), using only the frames the
/// range falls in: header, table and those frames' CRCs are checked, the whole-object digest is
/// not (it needs every byte). Version 1 objects are decoded whole. This is what a partial read
/// from a device does, without the device: tests and recovery tools use it.
pub fn read_range(
    keys: &Keys,
    buf: &[u8],
    kind: ObjectKind,
    expect: &Digest,
    what: &str,
    within: usize,
    dst: &mut [u8],
) -> Result<()> {
    let h = parse_header(buf, kind, expect, what)?;
    let end = within
        .checked_add(dst.len())
        .filter(|&e| e <= h.raw_len)
        .ok_or_else(|| PoolError::InvalidArgument(format!("range beyond {what}")))?;
    if h.version == OBJECT_FORMAT_V1 {
        let raw = decode(keys, buf, kind, expect, what)?;
        dst.copy_from_slice(&raw[within..end]);
        return Ok(());
    }
    if dst.is_empty() {
        return Ok(());
    }
    let table = buf
        .get(OBJECT_HEADER_LEN..h.table_end())
        .ok_or_else(|| PoolError::corrupt(what, "object shorter than its frame table"))?;
    let frames = parse_table(&h, table, what)?;
    let mut dctx = None;
    for f in frames_for(&frames, h.frame_len(), within, dst.len()) {
        let stored = buf
            .get(f.offset..f.end())
            .ok_or_else(|| PoolError::corrupt(what, "object shorter than its frames"))?;
        let mut raw = vec![0u8; f.raw_len];
        decode_frame(f, stored, &mut raw, &mut dctx, what)?;
        copy_overlap(&raw, f.raw_offset, within, dst);
    }
    Ok(())
}

/// Copies the part of `src` (raw bytes starting at `src_at`) that overlaps `dst` (raw bytes
/// starting at `dst_at`).
pub fn copy_overlap(src: &[u8], src_at: usize, dst_at: usize, dst: &mut [u8]) {
    let from = src_at.max(dst_at);
    let to = (src_at + src.len()).min(dst_at + dst.len());
    if from < to {
        dst[from - dst_at..to - dst_at].copy_from_slice(&src[from - src_at..to - src_at]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Incompressible bytes (xorshift32 from `seed`).
    fn random_bytes(mut x: u32, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn roundtrip_and_detects_flips() {
        let keys = Keys::derive(&[1; 32]);
        let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let d = keys.digest(ObjectKind::Chunk, &raw);
        let enc = encode(ObjectKind::Chunk, &d, &raw, 1).unwrap();
        assert_eq!(enc.codec, Codec::Zstd);
        assert_eq!(
            decode(&keys, &enc.buf, ObjectKind::Chunk, &d, "t").unwrap(),
            raw
        );
        for pos in [0usize, 11, 30, 61, 64, 100, enc.stored_len as usize + 63] {
            let mut b = enc.buf.to_vec();
            b[pos] ^= 0x40;
            let err = decode(&keys, &b, ObjectKind::Chunk, &d, "t").unwrap_err();
            assert!(
                err.is_integrity() || matches!(err, PoolError::UnsupportedFormat { .. }),
                "{pos}: {err}"
            );
        }
        // Other pool key: digest does not verify.
        let other = Keys::derive(&[2; 32]);
        assert!(decode(&other, &enc.buf, ObjectKind::Chunk, &d, "t").is_err());
    }

    /// Large objects are sampled before compression: random data is stored raw, and data that
    /// compresses anywhere the samples look is still compressed.
    #[test]
    fn large_objects_are_judged_by_samples() {
        let keys = Keys::derive(&[1; 32]);
        let random = random_bytes(0x9e37_79b9, 1 << 20);
        assert!(!worth_compressing(&random, 1).unwrap());
        // (Every frame raw: the table is all the chunk costs over its raw length.)
        let d = keys.digest(ObjectKind::Chunk, &random);
        let enc = encode(ObjectKind::Chunk, &d, &random, 1).unwrap();
        assert_eq!(enc.codec, Codec::Raw);
        assert_eq!(
            decode(&keys, &enc.buf, ObjectKind::Chunk, &d, "t").unwrap(),
            random
        );
        // Three quarters random, the last quarter zeroes: the end sample sees it.
        let mut mixed = random.clone();
        mixed[(3 << 20) / 4..].fill(0);
        let d = keys.digest(ObjectKind::Chunk, &mixed);
        let enc = encode(ObjectKind::Chunk, &d, &mixed, 1).unwrap();
        assert_eq!(enc.codec, Codec::Zstd);
        assert!(enc.stored_len < (800 << 10), "{}", enc.stored_len);
        assert_eq!(
            decode(&keys, &enc.buf, ObjectKind::Chunk, &d, "t").unwrap(),
            mixed
        );
        // Small objects are always tried.
        assert!(worth_compressing(&random[..4096], 1).unwrap());
    }

    #[test]
    fn incompressible_is_stored_raw() {
        let keys = Keys::derive(&[1; 32]);
        let raw = random_bytes(0x1234_5678, 65536);
        let d = keys.digest(ObjectKind::Chunk, &raw);
        let enc = encode(ObjectKind::Chunk, &d, &raw, 1).unwrap();
        assert_eq!(enc.codec, Codec::Raw);
        assert_eq!(
            decode(&keys, &enc.buf, ObjectKind::Chunk, &d, "t").unwrap(),
            raw
        );
    }

    /// Random frames and zero frames alternating, so some frames are stored raw and some
    /// compressed within one chunk.
    fn mixed_bytes(seed: u32, len: usize) -> Vec<u8> {
        let mut raw = random_bytes(seed, len);
        for (i, f) in raw.chunks_mut(FRAME_LEN).enumerate() {
            if i % 2 == 1 {
                f.fill(i as u8);
            }
        }
        raw
    }

    fn compressible_bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i / 7) % 251) as u8).collect()
    }

    fn check_roundtrip(keys: &Keys, raw: &[u8]) -> Encoded {
        let d = keys.digest(ObjectKind::Chunk, raw);
        let enc = encode(ObjectKind::Chunk, &d, raw, 1).unwrap();
        assert_eq!(
            u16::from_le_bytes([enc.buf[8], enc.buf[9]]),
            OBJECT_FORMAT_V2
        );
        assert_eq!(enc.buf.len() as u64, extent_len(enc.stored_len));
        assert_eq!(
            decode(keys, &enc.buf, ObjectKind::Chunk, &d, "t").unwrap(),
            raw,
            "len {}",
            raw.len()
        );
        // Partial decodes: single blocks, frame boundaries, spans of several frames.
        let len = raw.len();
        let mut ranges = vec![(0, len.min(4096)), (len - len.min(4096), len.min(4096))];
        if len > 3 * RAW_FRAME_LEN {
            // 4 KiB frame boundaries (incompressible chunks).
            ranges.push((RAW_FRAME_LEN, RAW_FRAME_LEN));
            ranges.push((RAW_FRAME_LEN - 100, 200));
            ranges.push((RAW_FRAME_LEN + 1, 2 * RAW_FRAME_LEN));
        }
        if len > FRAME_LEN + 4096 {
            ranges.push((FRAME_LEN - 4096, 8192));
            ranges.push((FRAME_LEN, 4096));
            ranges.push((100, len - 200));
        }
        for (at, n) in ranges {
            let mut dst = vec![0u8; n];
            read_range(keys, &enc.buf, ObjectKind::Chunk, &d, "t", at, &mut dst).unwrap();
            assert_eq!(dst, raw[at..at + n], "len {len} range {at}+{n}");
        }
        enc
    }

    /// Version 2 round trips for every chunk size the pool uses (64 KiB..4 MiB) and odd sizes
    /// (one byte, just over a frame), for compressible, incompressible and mixed data.
    #[test]
    fn v2_roundtrip_all_sizes_and_kinds_of_data() {
        let keys = Keys::derive(&[7; 32]);
        let sizes = [
            1usize,
            4095,
            4096,
            FRAME_LEN - 1,
            FRAME_LEN,
            FRAME_LEN + 1,
            100_000,
            128 << 10,
            256 << 10,
            512 << 10,
            1 << 20,
            2 << 20,
            4 << 20,
        ];
        for &len in &sizes {
            let enc = check_roundtrip(&keys, &compressible_bytes(len));
            if len >= 4096 {
                assert_eq!(enc.codec, Codec::Zstd, "len {len}");
                assert!((enc.stored_len as usize) < len / 2, "len {len}");
            }
            let enc = check_roundtrip(&keys, &random_bytes(len as u32 | 1, len));
            if len >= 4096 {
                assert_eq!(enc.codec, Codec::Raw, "len {len}");
                // Below the sample threshold compression is tried (and fails) frame by frame:
                // 64 KiB frames, packed; from it on, 4 KiB frames from a block boundary.
                let (fl, at) = if len < SAMPLE_FROM {
                    (
                        FRAME_LEN,
                        OBJECT_HEADER_LEN + len.div_ceil(FRAME_LEN) * FRAME_ENTRY_LEN,
                    )
                } else {
                    let te = OBJECT_HEADER_LEN + len.div_ceil(RAW_FRAME_LEN) * FRAME_ENTRY_LEN;
                    (RAW_FRAME_LEN, align_up(te as u64, BLOCK) as usize)
                };
                assert_eq!(enc.stored_len as usize, at - OBJECT_HEADER_LEN + len);
                assert_eq!(enc.buf[11] as usize, fl.trailing_zeros() as usize);
            }
            check_roundtrip(&keys, &mixed_bytes(len as u32 | 1, len));
        }
        // A mixed 1 MiB chunk: its zero frames are compressed, its random frames stored raw.
        let raw = mixed_bytes(3, 1 << 20);
        let d = keys.digest(ObjectKind::Chunk, &raw);
        let enc = encode(ObjectKind::Chunk, &d, &raw, 1).unwrap();
        let h = parse_header(&enc.buf, ObjectKind::Chunk, &d, "t").unwrap();
        let frames = parse_table(&h, &enc.buf[OBJECT_HEADER_LEN..h.table_end()], "t").unwrap();
        assert_eq!(frames.len(), 16);
        for f in &frames {
            let want = if f.index % 2 == 1 {
                Codec::Zstd
            } else {
                Codec::Raw
            };
            assert_eq!(f.codec, want, "frame {}", f.index);
        }
    }

    /// Chunks not worth compressing, of every chunk size the pool uses, are stored as 4 KiB raw
    /// frames starting at a block boundary: every frame is one device block, the record's
    /// lengths give the layout ([`all_raw_layout`]), every block decodes on its own, and the
    /// trusted-table lookup agrees with the full table. Compressible chunks keep 64 KiB frames.
    #[test]
    fn incompressible_chunks_use_aligned_4k_frames() {
        let keys = Keys::derive(&[5; 32]);
        for len in [
            64 << 10,
            128 << 10,
            256 << 10,
            512 << 10,
            1 << 20,
            2 << 20,
            4 << 20,
        ] {
            let raw = random_bytes(len as u32 ^ 0x5bd1_e995, len);
            let d = keys.digest(ObjectKind::Chunk, &raw);
            let enc = encode(ObjectKind::Chunk, &d, &raw, 1).unwrap();
            let h = parse_header(&enc.buf, ObjectKind::Chunk, &d, "t").unwrap();
            assert_eq!(h.frame_shift(), RAW_FRAME_SHIFT);
            assert_eq!(h.frame_count(), len / RAW_FRAME_LEN);
            let table = &enc.buf[OBJECT_HEADER_LEN..h.table_end()];
            let frames = parse_table(&h, table, "t").unwrap();
            let start = align_up(h.table_end() as u64, BLOCK) as usize;
            for f in &frames {
                assert_eq!(f.codec, Codec::Raw);
                assert_eq!(f.offset, start + f.index * RAW_FRAME_LEN, "len {len}");
                assert_eq!(f.offset % BLOCK as usize, 0);
                assert_eq!(f.stored_len, RAW_FRAME_LEN);
            }
            assert_eq!(enc.buf.len(), start + len, "no padding after the frames");
            assert_eq!(
                all_raw_layout(len, enc.stored_len as usize),
                Some((RAW_FRAME_LEN, start))
            );
            assert_eq!(
                decode(&keys, &enc.buf, ObjectKind::Chunk, &d, "t").unwrap(),
                raw
            );
            let step = if len <= 1 << 20 { 1 } else { 37 };
            for b in (0..len / RAW_FRAME_LEN).step_by(step) {
                let at = b * RAW_FRAME_LEN;
                let mut dst = vec![0u8; RAW_FRAME_LEN];
                read_range(&keys, &enc.buf, ObjectKind::Chunk, &d, "t", at, &mut dst).unwrap();
                assert!(dst == raw[at..at + RAW_FRAME_LEN], "len {len} block {b}");
            }
            for (at, n) in [(0, 1), (4095, 2), (8192, 4096), (100, len - 200), (0, len)] {
                let want = frames_for(&frames, RAW_FRAME_LEN, at, n);
                let got = checked_table_frames(&h, table, at, n, "t").unwrap();
                assert_eq!(got, want, "len {len} range {at}+{n}");
            }
            assert!(checked_table_frames(&h, table, len - 1, 2, "t").is_err());
            // A compressible chunk of the same size keeps 64 KiB frames, packed.
            let c = compressible_bytes(len);
            let d = keys.digest(ObjectKind::Chunk, &c);
            let enc = encode(ObjectKind::Chunk, &d, &c, 1).unwrap();
            assert_eq!(enc.buf[11], FRAME_SHIFT, "len {len}");
            assert_eq!(all_raw_layout(len, enc.stored_len as usize), None);
        }
        // 64 KiB frames all raw (a chunk below the sample threshold) are found packed.
        let te = OBJECT_HEADER_LEN + FRAME_ENTRY_LEN;
        assert_eq!(
            all_raw_layout(FRAME_LEN - 1, te - OBJECT_HEADER_LEN + FRAME_LEN - 1),
            Some((RAW_FRAME_LEN << 4, te))
        );
    }

    /// A flipped byte in one 4 KiB block of an incompressible chunk fails reads of that block
    /// only (its frame's CRC); its neighbours read. A flipped byte in the padding between
    /// table and frames (no CRC covers it) fails the whole-object decode.
    #[test]
    fn a_damaged_4k_frame_fails_only_its_block() {
        let keys = Keys::derive(&[1; 32]);
        let raw = random_bytes(77, 1 << 20);
        let d = keys.digest(ObjectKind::Chunk, &raw);
        let enc = encode(ObjectKind::Chunk, &d, &raw, 1).unwrap();
        let h = parse_header(&enc.buf, ObjectKind::Chunk, &d, "t").unwrap();
        let frames = parse_table(&h, &enc.buf[OBJECT_HEADER_LEN..h.table_end()], "t").unwrap();
        let mut b = enc.buf.to_vec();
        b[frames[37].offset + 1000] ^= 4;
        let mut dst = vec![0u8; RAW_FRAME_LEN];
        let err =
            read_range(&keys, &b, ObjectKind::Chunk, &d, "t", 37 * 4096, &mut dst).unwrap_err();
        assert!(
            matches!(&err, PoolError::Checksum { what } if what.contains("frame 37")),
            "{err}"
        );
        for n in [36usize, 38] {
            read_range(&keys, &b, ObjectKind::Chunk, &d, "t", n * 4096, &mut dst).unwrap();
            assert!(dst == raw[n * 4096..(n + 1) * 4096]);
        }
        assert!(
            decode(&keys, &b, ObjectKind::Chunk, &d, "t")
                .unwrap_err()
                .is_integrity()
        );
        let mut b = enc.buf.to_vec();
        b[h.table_end() + 5] = 1;
        assert!(
            decode(&keys, &b, ObjectKind::Chunk, &d, "t")
                .unwrap_err()
                .is_integrity()
        );
        read_range(&keys, &b, ObjectKind::Chunk, &d, "t", 0, &mut dst).unwrap();
        assert!(dst == raw[..4096]);
    }

    /// Objects written before version 2 (data chunks as one payload) still decode, whole and
    /// in part; index nodes are still written as version 1.
    #[test]
    fn v1_objects_still_decode() {
        let keys = Keys::derive(&[1; 32]);
        for raw in [compressible_bytes(1 << 20), random_bytes(5, 1 << 20)] {
            let d = keys.digest(ObjectKind::Chunk, &raw);
            let enc = encode_v1(ObjectKind::Chunk, &d, &raw, 1).unwrap();
            assert_eq!(
                u16::from_le_bytes([enc.buf[8], enc.buf[9]]),
                OBJECT_FORMAT_V1
            );
            assert_eq!(
                decode(&keys, &enc.buf, ObjectKind::Chunk, &d, "t").unwrap(),
                raw
            );
            let mut dst = vec![0u8; 4096];
            read_range(
                &keys,
                &enc.buf,
                ObjectKind::Chunk,
                &d,
                "t",
                70_000,
                &mut dst,
            )
            .unwrap();
            assert_eq!(dst, raw[70_000..74_096]);
        }
        let node = compressible_bytes(10_000);
        let d = keys.digest(ObjectKind::Node, &node);
        let enc = encode(ObjectKind::Node, &d, &node, 1).unwrap();
        assert_eq!(
            u16::from_le_bytes([enc.buf[8], enc.buf[9]]),
            OBJECT_FORMAT_V1
        );
        assert_eq!(
            decode(&keys, &enc.buf, ObjectKind::Node, &d, "t").unwrap(),
            node
        );
    }

    /// A flipped byte in one frame fails a partial read of that frame (its CRC) and the whole
    /// decode, while a partial read of another frame of the same object still succeeds.
    #[test]
    fn a_damaged_frame_fails_only_reads_of_that_frame() {
        let keys = Keys::derive(&[1; 32]);
        let raw = mixed_bytes(9, 1 << 20);
        let d = keys.digest(ObjectKind::Chunk, &raw);
        let enc = encode(ObjectKind::Chunk, &d, &raw, 1).unwrap();
        let h = parse_header(&enc.buf, ObjectKind::Chunk, &d, "t").unwrap();
        let frames = parse_table(&h, &enc.buf[OBJECT_HEADER_LEN..h.table_end()], "t").unwrap();
        for victim in [2usize, 3] {
            let mut b = enc.buf.to_vec();
            b[frames[victim].offset + frames[victim].stored_len / 2] ^= 1;
            let mut dst = vec![0u8; 4096];
            let at = victim * FRAME_LEN + 8192;
            let err = read_range(&keys, &b, ObjectKind::Chunk, &d, "t", at, &mut dst).unwrap_err();
            assert!(
                matches!(&err, PoolError::Checksum { what } if what.contains(&format!("frame {victim}"))),
                "{err}"
            );
            assert!(
                decode(&keys, &b, ObjectKind::Chunk, &d, "t")
                    .unwrap_err()
                    .is_integrity()
            );
            read_range(
                &keys,
                &b,
                ObjectKind::Chunk,
                &d,
                "t",
                5 * FRAME_LEN,
                &mut dst,
            )
            .unwrap();
            assert_eq!(dst, raw[5 * FRAME_LEN..5 * FRAME_LEN + 4096]);
        }
    }

    /// Rewrites the header CRC and (when the header still parses) the frame table CRC, as if
    /// the damage had been done by someone who knows the format: what is left to catch it are
    /// the table's own checks, the frames' CRCs, zstd and the digest.
    fn reseal(b: &mut [u8]) {
        if b.len() < OBJECT_HEADER_LEN {
            return;
        }
        let n = le32(b, 52) as usize;
        if let Some(end) = n
            .checked_mul(FRAME_ENTRY_LEN)
            .and_then(|t| t.checked_add(OBJECT_HEADER_LEN))
            .filter(|&e| e <= b.len())
        {
            let c = crc32c::crc32c(&b[OBJECT_HEADER_LEN..end]);
            b[56..60].copy_from_slice(&c.to_le_bytes());
        }
        let c = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&c.to_le_bytes());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Hostile bytes: flipped bytes (anywhere, with CRCs recomputed or not) and truncation
        /// make decode and partial reads return an error or the right bytes, never panic and
        /// never return other bytes.
        #[test]
        fn hostile_bytes_never_panic_nor_lie(
            flips in proptest::collection::vec((0usize..(1 << 20), 1u8..=255), 0..6),
            header_flips in proptest::collection::vec((0usize..(OBJECT_HEADER_LEN + 16 * 64), 1u8..=255), 0..3),
            truncate in proptest::option::of(0usize..(1 << 20)),
            resealed in proptest::bool::ANY,
            at in 0usize..(256 << 10),
            len in 1usize..(100 << 10),
            v1 in proptest::bool::ANY,
            incompressible in proptest::bool::ANY,
        ) {
            let keys = Keys::derive(&[1; 32]);
            // Incompressible: 4 KiB raw frames after a padded table.
            let raw = if incompressible {
                random_bytes(11, 256 << 10)
            } else {
                mixed_bytes(11, 256 << 10)
            };
            let d = keys.digest(ObjectKind::Chunk, &raw);
            let enc = if v1 {
                encode_v1(ObjectKind::Chunk, &d, &raw, 1).unwrap()
            } else {
                encode(ObjectKind::Chunk, &d, &raw, 1).unwrap()
            };
            let mut b = enc.buf.to_vec();
            for (pos, x) in flips.iter().chain(&header_flips) {
                let pos = pos % b.len();
                b[pos] ^= x;
            }
            if let Some(t) = truncate {
                b.truncate(t % (b.len() + 1));
            }
            if resealed {
                reseal(&mut b);
            }
            if let Ok(out) = decode(&keys, &b, ObjectKind::Chunk, &d, "t") {
                proptest::prop_assert!(out == raw);
            }
            let len = len.min(raw.len() - at);
            let mut dst = vec![0u8; len];
            if read_range(&keys, &b, ObjectKind::Chunk, &d, "t", at, &mut dst).is_ok() {
                proptest::prop_assert!(dst[..] == raw[at..at + len]);
            }
        }

        /// Arbitrary bytes behind a valid-looking header never panic either.
        #[test]
        fn arbitrary_objects_never_panic(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..20_000),
            raw_len in 0u32..(1 << 27),
            stored_len in proptest::num::u32::ANY,
            shift in proptest::num::u8::ANY,
            count in proptest::num::u32::ANY,
            at in 0usize..(1 << 20),
        ) {
            let keys = Keys::derive(&[1; 32]);
            let d = Digest([3; 32]);
            let mut b = vec![0u8; OBJECT_HEADER_LEN];
            b[0..8].copy_from_slice(OBJECT_MAGIC);
            b[8..10].copy_from_slice(&OBJECT_FORMAT_V2.to_le_bytes());
            b[10] = ObjectKind::Chunk as u8;
            b[11] = if shift % 2 == 0 { FRAME_SHIFT } else { shift };
            b[12..16].copy_from_slice(&raw_len.to_le_bytes());
            let stored = if stored_len % 2 == 0 { body.len() as u32 } else { stored_len };
            b[16..20].copy_from_slice(&stored.to_le_bytes());
            b[20..52].copy_from_slice(&d.0);
            let fl = 1usize.checked_shl(u32::from(b[11])).unwrap_or(FRAME_LEN).max(1);
            let n = if count % 2 == 0 { (raw_len as usize).div_ceil(fl) as u32 } else { count };
            b[52..56].copy_from_slice(&n.to_le_bytes());
            // Often a first entry pointing at the block boundary (the 4 KiB layout).
            let mut body = body;
            if count % 3 == 0 && body.len() >= 4 {
                let te = OBJECT_HEADER_LEN + (n as usize).saturating_mul(FRAME_ENTRY_LEN);
                let s = align_up(te as u64, BLOCK) as u32;
                body[..4].copy_from_slice(&s.to_le_bytes());
            }
            b.extend_from_slice(&body);
            reseal(&mut b);
            let _ = decode(&keys, &b, ObjectKind::Chunk, &d, "t");
            let mut dst = vec![0u8; 4096];
            let _ = read_range(&keys, &b, ObjectKind::Chunk, &d, "t", at, &mut dst);
            // What a partial read with a cached table does, on an unchecked table.
            if let Ok(h) = parse_header(&b, ObjectKind::Chunk, &d, "t")
                && let Some(table) = b.get(OBJECT_HEADER_LEN..h.table_end())
            {
                let _ = checked_table_frames(&h, table, at, 4096, "t");
            }
            let _ = all_raw_layout(raw_len as usize, stored as usize);
        }
    }
}
