//! Packs: many pool objects in one bucket object, so that request counts stay low (what S3
//! users pay for), with an index at the end so that one object can be read back with a
//! single ranged GET and a pack can be understood without MaaS's records.
//!
//! ```text
//! offset size  (integers little-endian)
//!  0      8   magic "MAASPACK"
//!  8      2   format version (1)
//! 10      2   flags (0)
//! 12      4   reserved (0)
//! 16      …   the objects, back to back, each exactly as the pool stores it (the format of
//!             maas-pool's object.rs: 64-byte header with magic "MAASOBJ\0", digest and CRCs,
//!             frame table, zstd or raw frames), without device padding
//!  I   48*n   index, one entry per object, in pack order:
//!               0 32  digest (the pool's keyed BLAKE3 of the object's raw bytes)
//!              32  1  kind (1 data chunk, 2 index node)
//!              33  3  reserved (0)
//!              36  4  stored length
//!              40  8  offset of the object in the pack
//!  T     32   trailer:
//!               0  8  magic "MAASPIDX"
//!               8  2  format version (1)
//!              10  2  reserved (0)
//!              12  4  object count n
//!              16  8  index offset I
//!              24  4  CRC32C of the index
//!              28  4  CRC32C of trailer bytes 0..28
//! ```
//!
//! The objects tile bytes 16..I exactly (each starts where the previous ends), so a reader
//! that checks the index knows every byte's owner. A pack is named after the BLAKE3 hash of
//! its bytes (`packs/<first 2 hex digits>/<64 hex digits>`): a name never changes meaning,
//! and a retried upload of the same pack lands on the same name.

use maas_pool::archive::PackEntry;
use maas_pool::object::ObjectKind;
use maas_pool::types::Digest;

pub const PACK_MAGIC: &[u8; 8] = b"MAASPACK";
pub const PACK_INDEX_MAGIC: &[u8; 8] = b"MAASPIDX";
pub const PACK_FORMAT_VERSION: u16 = 1;
pub const PACK_HEADER_LEN: usize = 16;
pub const INDEX_ENTRY_LEN: usize = 48;
pub const TRAILER_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackError {
    #[error("not a MaaS pack: {0}")]
    Format(String),
    #[error("pack format version {0} is not supported (this build reads 1)")]
    Version(u16),
    #[error("pack index damaged: {0}")]
    Damaged(String),
}

/// Builds one pack in memory.
#[derive(Debug)]
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Default for PackWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl PackWriter {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(PACK_HEADER_LEN);
        buf.extend_from_slice(PACK_MAGIC);
        buf.extend_from_slice(&PACK_FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&[0u8; 6]);
        PackWriter {
            buf,
            entries: Vec::new(),
        }
    }

    /// Bytes so far (objects and header; the index and trailer come at the end).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn objects(&self) -> usize {
        self.entries.len()
    }

    pub fn add(&mut self, digest: Digest, kind: ObjectKind, stored: &[u8]) {
        self.entries.push(PackEntry {
            digest,
            kind,
            offset: self.buf.len() as u64,
            len: stored.len() as u32,
        });
        self.buf.extend_from_slice(stored);
    }

    /// The finished pack: its bytes, its objects, and its name.
    pub fn finish(mut self) -> FinishedPack {
        let index_offset = self.buf.len() as u64;
        let mut index = Vec::with_capacity(self.entries.len() * INDEX_ENTRY_LEN);
        for e in &self.entries {
            index.extend_from_slice(&e.digest.0);
            index.push(e.kind as u8);
            index.extend_from_slice(&[0u8; 3]);
            index.extend_from_slice(&e.len.to_le_bytes());
            index.extend_from_slice(&e.offset.to_le_bytes());
        }
        let mut trailer = [0u8; TRAILER_LEN];
        trailer[..8].copy_from_slice(PACK_INDEX_MAGIC);
        trailer[8..10].copy_from_slice(&PACK_FORMAT_VERSION.to_le_bytes());
        trailer[12..16].copy_from_slice(&(self.entries.len() as u32).to_le_bytes());
        trailer[16..24].copy_from_slice(&index_offset.to_le_bytes());
        trailer[24..28].copy_from_slice(&crc32c::crc32c(&index).to_le_bytes());
        let crc = crc32c::crc32c(&trailer[..28]);
        trailer[28..32].copy_from_slice(&crc.to_le_bytes());
        self.buf.extend_from_slice(&index);
        self.buf.extend_from_slice(&trailer);
        let hash = blake3::hash(&self.buf);
        let hex = hash.to_hex();
        FinishedPack {
            key: format!("packs/{}/{}", &hex[..2], hex),
            bytes: bytes::Bytes::from(self.buf),
            entries: self.entries,
        }
    }
}

/// A pack ready to upload.
#[derive(Debug, Clone)]
pub struct FinishedPack {
    /// Object name relative to the target's prefix.
    pub key: String,
    pub bytes: bytes::Bytes,
    pub entries: Vec<PackEntry>,
}

/// A pack's trailer: where its index is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub count: u32,
    pub index_offset: u64,
    pub index_crc: u32,
}

impl Trailer {
    pub fn index_len(&self) -> u64 {
        u64::from(self.count) * INDEX_ENTRY_LEN as u64
    }
}

/// Parses the last [`TRAILER_LEN`] bytes of a pack of `pack_len` bytes.
pub fn parse_trailer(b: &[u8], pack_len: u64) -> Result<Trailer, PackError> {
    if b.len() != TRAILER_LEN || &b[..8] != PACK_INDEX_MAGIC {
        return Err(PackError::Format("no pack trailer".into()));
    }
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if word(28) != crc32c::crc32c(&b[..28]) {
        return Err(PackError::Damaged("trailer checksum".into()));
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != PACK_FORMAT_VERSION {
        return Err(PackError::Version(version));
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&b[16..24]);
    let t = Trailer {
        count: word(12),
        index_offset: u64::from_le_bytes(off),
        index_crc: word(24),
    };
    let end = t
        .index_offset
        .checked_add(t.index_len())
        .and_then(|e| e.checked_add(TRAILER_LEN as u64));
    if t.index_offset < PACK_HEADER_LEN as u64 || end != Some(pack_len) {
        return Err(PackError::Damaged(
            "index bounds do not match the pack's length".into(),
        ));
    }
    Ok(t)
}

/// Parses and checks a pack's index: every object within the object area, back to back
/// from the header to the index.
pub fn parse_index(index: &[u8], t: &Trailer) -> Result<Vec<PackEntry>, PackError> {
    if index.len() as u64 != t.index_len() {
        return Err(PackError::Damaged("index length".into()));
    }
    if crc32c::crc32c(index) != t.index_crc {
        return Err(PackError::Damaged("index checksum".into()));
    }
    let mut out = Vec::with_capacity(t.count as usize);
    let mut next = PACK_HEADER_LEN as u64;
    for e in index.chunks_exact(INDEX_ENTRY_LEN) {
        let mut d = [0u8; 32];
        d.copy_from_slice(&e[..32]);
        let kind = ObjectKind::from_byte(e[32])
            .ok_or_else(|| PackError::Damaged(format!("object kind {}", e[32])))?;
        let len = u32::from_le_bytes([e[36], e[37], e[38], e[39]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&e[40..48]);
        let offset = u64::from_le_bytes(off);
        if offset != next || len == 0 {
            return Err(PackError::Damaged(format!(
                "object at {offset} (+{len}) does not follow the previous one at {next}"
            )));
        }
        next = offset + u64::from(len);
        out.push(PackEntry {
            digest: Digest(d),
            kind,
            offset,
            len,
        });
    }
    if next != t.index_offset {
        return Err(PackError::Damaged(
            "objects do not end where the index starts".into(),
        ));
    }
    Ok(out)
}

/// Checks a whole pack's header, trailer and index; returns its objects.
pub fn parse_pack(b: &[u8]) -> Result<Vec<PackEntry>, PackError> {
    if b.len() < PACK_HEADER_LEN + TRAILER_LEN || &b[..8] != PACK_MAGIC {
        return Err(PackError::Format("no pack header".into()));
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != PACK_FORMAT_VERSION {
        return Err(PackError::Version(version));
    }
    let t = parse_trailer(&b[b.len() - TRAILER_LEN..], b.len() as u64)?;
    let start = t.index_offset as usize;
    parse_index(&b[start..b.len() - TRAILER_LEN], &t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> FinishedPack {
        let mut w = PackWriter::new();
        w.add(Digest([1; 32]), ObjectKind::Node, b"node bytes");
        w.add(Digest([2; 32]), ObjectKind::Chunk, &[7u8; 1000]);
        w.add(Digest([3; 32]), ObjectKind::Chunk, b"x");
        w.finish()
    }

    #[test]
    fn a_pack_lists_its_objects_and_each_reads_back_by_range() {
        let p = sample();
        let entries = parse_pack(&p.bytes).unwrap();
        assert_eq!(entries, p.entries);
        let e = entries[1];
        assert_eq!(
            &p.bytes[e.offset as usize..(e.offset + u64::from(e.len)) as usize],
            &[7u8; 1000][..]
        );
        assert!(p.key.starts_with("packs/"));
        assert_eq!(p.key.len(), "packs/".len() + 3 + 64);
        // The name is the hash: the same pack gets the same name.
        assert_eq!(sample().key, p.key);
    }

    #[test]
    fn a_trailer_read_alone_locates_the_index() {
        let p = sample();
        let n = p.bytes.len();
        let t = parse_trailer(&p.bytes[n - TRAILER_LEN..], n as u64).unwrap();
        let idx = &p.bytes[t.index_offset as usize..n - TRAILER_LEN];
        assert_eq!(parse_index(idx, &t).unwrap(), p.entries);
        // A trailer taken for a pack of another length is refused, not followed.
        assert!(parse_trailer(&p.bytes[n - TRAILER_LEN..], n as u64 + 1).is_err());
    }

    #[test]
    fn every_flipped_byte_of_header_index_or_trailer_is_refused() {
        let p = sample();
        let objects_end = p
            .entries
            .last()
            .map(|e| e.offset + u64::from(e.len))
            .unwrap() as usize;
        let mut positions: Vec<usize> = (0..10).collect();
        positions.extend(objects_end..p.bytes.len());
        for i in positions {
            let mut b = p.bytes.to_vec();
            b[i] ^= 0x40;
            assert!(parse_pack(&b).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn a_newer_version_is_named_as_such() {
        let p = sample();
        let mut b = p.bytes.to_vec();
        b[8] = 2;
        assert_eq!(parse_pack(&b), Err(PackError::Version(2)));
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_pack(&b);
            if b.len() >= TRAILER_LEN {
                let _ = parse_trailer(&b[b.len() - TRAILER_LEN..], b.len() as u64);
            }
        }

        #[test]
        fn hostile_trailers_with_valid_crcs_never_panic(count in any::<u32>(), off in any::<u64>(), len in 0u64..1 << 40) {
            let mut t = [0u8; TRAILER_LEN];
            t[..8].copy_from_slice(PACK_INDEX_MAGIC);
            t[8..10].copy_from_slice(&1u16.to_le_bytes());
            t[12..16].copy_from_slice(&count.to_le_bytes());
            t[16..24].copy_from_slice(&off.to_le_bytes());
            let crc = crc32c::crc32c(&t[..28]);
            t[28..32].copy_from_slice(&crc.to_le_bytes());
            if let Ok(tr) = parse_trailer(&t, len) {
                prop_assert!(tr.index_offset + tr.index_len() + TRAILER_LEN as u64 == len);
            }
        }
    }
}
