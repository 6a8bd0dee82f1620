//! Packs: many pool objects in one bucket object, so that request counts stay low (what S3
//! users pay for), with an index at the end so that one object can be read back with a
//! single ranged GET and a pack can be understood without MaaS's records.
//!
//! ```text
//! offset size  (integers little-endian)
//!  0      8   magic "MAASPACK"
//!  8      2   format version (1)
//! 10      2   flags: bit 0 set when the pack is encrypted (see crate::crypt); others 0
//! 12      4   reserved (0)
//! 16      …   the objects, back to back, each exactly as the pool stores it (the format of
//!             maas-pool's object.rs: 64-byte header with magic "MAASOBJ\0", digest and CRCs,
//!             frame table, zstd or raw frames), without device padding; encrypted, each
//!             object is sealed alone (nonce, ciphertext, tag; bound to its digest) so that
//!             it still reads back with one ranged GET
//!  I   48*n   index, one entry per object, in pack order (encrypted: sealed as one, 40
//!             bytes longer), each entry:
//!               0 32  digest (the pool's keyed BLAKE3 of the object's raw bytes)
//!              32  1  kind (1 data chunk, 2 index node)
//!              33  3  reserved (0)
//!              36  4  stored length (sealed length when encrypted)
//!              40  8  offset of the object in the pack
//!  T     32   trailer:
//!               0  8  magic "MAASPIDX"
//!               8  2  format version (1)
//!              10  2  flags: bit 0 set when the index is sealed (as the header's)
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

use std::sync::Arc;

use maas_pool::archive::PackEntry;
use maas_pool::object::ObjectKind;
use maas_pool::types::Digest;

use crate::crypt::{Cipher, OVERHEAD, Sealed};
use crate::error::ArchiveError;

pub const PACK_MAGIC: &[u8; 8] = b"MAASPACK";
pub const PACK_INDEX_MAGIC: &[u8; 8] = b"MAASPIDX";
pub const PACK_FORMAT_VERSION: u16 = 1;
pub const PACK_HEADER_LEN: usize = 16;
pub const INDEX_ENTRY_LEN: usize = 48;
pub const TRAILER_LEN: usize = 32;
/// Header and trailer flag: the pack is encrypted.
pub const FLAG_SEALED: u16 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackError {
    #[error("not a MaaS pack: {0}")]
    Format(String),
    #[error("pack format version {0} is not supported (this build reads 1)")]
    Version(u16),
    #[error("pack index damaged: {0}")]
    Damaged(String),
    #[error("the pack is encrypted: the target needs the archive's recovery key")]
    KeyRequired,
}

impl PackError {
    /// The error of bucket object `key`.
    pub fn at(self, key: String) -> ArchiveError {
        match self {
            PackError::Version(_) => ArchiveError::Unsupported {
                what: key,
                detail: self.to_string(),
            },
            PackError::KeyRequired => ArchiveError::KeyRequired {
                detail: format!("{key} is encrypted"),
            },
            other => ArchiveError::Damaged {
                key,
                detail: other.to_string(),
            },
        }
    }
}

/// Builds one pack in memory.
#[derive(Debug)]
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
    cipher: Option<Arc<Cipher>>,
}

impl PackWriter {
    /// A pack sealed with `cipher` (None: objects as the pool stores them).
    pub fn new(cipher: Option<Arc<Cipher>>) -> Self {
        let mut buf = Vec::with_capacity(PACK_HEADER_LEN);
        buf.extend_from_slice(PACK_MAGIC);
        buf.extend_from_slice(&PACK_FORMAT_VERSION.to_le_bytes());
        let flags = if cipher.is_some() { FLAG_SEALED } else { 0 };
        buf.extend_from_slice(&flags.to_le_bytes());
        buf.extend_from_slice(&[0u8; 4]);
        PackWriter {
            buf,
            entries: Vec::new(),
            cipher,
        }
    }

    /// An empty pack like this one (same cipher).
    pub fn fresh(&self) -> Self {
        PackWriter::new(self.cipher.clone())
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
        let sealed;
        let bytes = match &self.cipher {
            Some(c) => {
                sealed = c.seal(Sealed::Object(&digest.0), stored);
                &sealed[..]
            }
            None => stored,
        };
        self.entries.push(PackEntry {
            digest,
            kind,
            offset: self.buf.len() as u64,
            len: bytes.len() as u32,
        });
        self.buf.extend_from_slice(bytes);
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
        let mut flags = 0u16;
        if let Some(c) = &self.cipher {
            index = c.seal(Sealed::PackIndex, &index);
            flags |= FLAG_SEALED;
        }
        let mut trailer = [0u8; TRAILER_LEN];
        trailer[..8].copy_from_slice(PACK_INDEX_MAGIC);
        trailer[8..10].copy_from_slice(&PACK_FORMAT_VERSION.to_le_bytes());
        trailer[10..12].copy_from_slice(&flags.to_le_bytes());
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
    /// The index (and every object) is sealed.
    pub sealed: bool,
}

impl Trailer {
    pub fn index_len(&self) -> u64 {
        let plain = u64::from(self.count) * INDEX_ENTRY_LEN as u64;
        if self.sealed {
            plain + OVERHEAD as u64
        } else {
            plain
        }
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
    let flags = u16::from_le_bytes([b[10], b[11]]);
    if flags & !FLAG_SEALED != 0 {
        return Err(PackError::Damaged(format!(
            "unknown trailer flags {flags:#x}"
        )));
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&b[16..24]);
    let t = Trailer {
        count: word(12),
        index_offset: u64::from_le_bytes(off),
        index_crc: word(24),
        sealed: flags & FLAG_SEALED != 0,
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

/// Parses and checks a pack's index (opening it with `cipher` when sealed): every object
/// within the object area, back to back from the header to the index. A target with a
/// cipher reads only sealed packs: a plain one in its bucket was not written by it.
pub fn parse_index(
    index: &[u8],
    t: &Trailer,
    cipher: Option<&Cipher>,
) -> Result<Vec<PackEntry>, PackError> {
    if index.len() as u64 != t.index_len() {
        return Err(PackError::Damaged("index length".into()));
    }
    if crc32c::crc32c(index) != t.index_crc {
        return Err(PackError::Damaged("index checksum".into()));
    }
    let opened;
    let index = match (t.sealed, cipher) {
        (false, None) => index,
        (true, None) => return Err(PackError::KeyRequired),
        (false, Some(_)) => {
            return Err(PackError::Damaged(
                "not encrypted, but the target is: it was not written by this archive".into(),
            ));
        }
        (true, Some(c)) => {
            opened = c.open(Sealed::PackIndex, index).ok_or_else(|| {
                PackError::Damaged(
                    "index failed its authentication tag (damaged, or another key)".into(),
                )
            })?;
            &opened[..]
        }
    };
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
pub fn parse_pack(b: &[u8], cipher: Option<&Cipher>) -> Result<Vec<PackEntry>, PackError> {
    if b.len() < PACK_HEADER_LEN + TRAILER_LEN || &b[..8] != PACK_MAGIC {
        return Err(PackError::Format("no pack header".into()));
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != PACK_FORMAT_VERSION {
        return Err(PackError::Version(version));
    }
    let flags = u16::from_le_bytes([b[10], b[11]]);
    let t = parse_trailer(&b[b.len() - TRAILER_LEN..], b.len() as u64)?;
    if flags != if t.sealed { FLAG_SEALED } else { 0 } || b[12..16] != [0u8; 4] {
        return Err(PackError::Damaged(format!(
            "header flags {flags:#x} do not match the trailer's"
        )));
    }
    let start = t.index_offset as usize;
    parse_index(&b[start..b.len() - TRAILER_LEN], &t, cipher)
}

/// An object's bytes as the pool stores them, from its bytes in a pack (opened when the
/// target encrypts; a tag that fails is damage, never data).
pub fn open_object(
    cipher: Option<&Cipher>,
    digest: &Digest,
    in_pack: &[u8],
) -> Result<Vec<u8>, PackError> {
    match cipher {
        None => Ok(in_pack.to_vec()),
        Some(c) => c.open(Sealed::Object(&digest.0), in_pack).ok_or_else(|| {
            PackError::Damaged(format!(
                "object {digest} failed its authentication tag (damaged, moved, or another key)"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> FinishedPack {
        let mut w = PackWriter::new(None);
        w.add(Digest([1; 32]), ObjectKind::Node, b"node bytes");
        w.add(Digest([2; 32]), ObjectKind::Chunk, &[7u8; 1000]);
        w.add(Digest([3; 32]), ObjectKind::Chunk, b"x");
        w.finish()
    }

    #[test]
    fn a_pack_lists_its_objects_and_each_reads_back_by_range() {
        let p = sample();
        let entries = parse_pack(&p.bytes, None).unwrap();
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
        assert_eq!(parse_index(idx, &t, None).unwrap(), p.entries);
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
            assert!(parse_pack(&b, None).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn a_newer_version_is_named_as_such() {
        let p = sample();
        let mut b = p.bytes.to_vec();
        b[8] = 2;
        assert_eq!(parse_pack(&b, None), Err(PackError::Version(2)));
    }

    #[test]
    fn a_sealed_pack_hides_objects_and_digests_and_opens_only_with_its_key() {
        use crate::crypt::ArchiveKey;
        let c = Arc::new(Cipher::new(&ArchiveKey::generate()));
        let mut w = PackWriter::new(Some(c.clone()));
        w.add(Digest([2; 32]), ObjectKind::Chunk, &[7u8; 1000]);
        w.add(Digest([3; 32]), ObjectKind::Chunk, b"secret text");
        let p = w.finish();
        let has = |needle: &[u8]| p.bytes.windows(needle.len()).any(|x| x == needle);
        assert!(
            !has(&[2u8; 32]) && !has(&[3u8; 32]),
            "a digest in the clear"
        );
        assert!(
            !has(b"secret text") && !has(&[7u8; 16]),
            "data in the clear"
        );
        let entries = parse_pack(&p.bytes, Some(&c)).unwrap();
        assert_eq!(entries, p.entries);
        let at = |e: &PackEntry| &p.bytes[e.offset as usize..][..e.len as usize];
        assert_eq!(
            open_object(Some(&c), &entries[1].digest, at(&entries[1])).unwrap(),
            b"secret text"
        );
        // An object read as another (a swapped index entry): refused.
        assert!(open_object(Some(&c), &entries[0].digest, at(&entries[1])).is_err());
        assert_eq!(parse_pack(&p.bytes, None), Err(PackError::KeyRequired));
        let other = Cipher::new(&ArchiveKey::generate());
        assert!(matches!(
            parse_pack(&p.bytes, Some(&other)),
            Err(PackError::Damaged(_))
        ));
        // A plain pack in a keyed target's bucket is not trusted.
        assert!(matches!(
            parse_pack(&sample().bytes, Some(&c)),
            Err(PackError::Damaged(_))
        ));
        // The trailer alone locates the sealed index (as lazy reads use it).
        let n = p.bytes.len();
        let t = parse_trailer(&p.bytes[n - TRAILER_LEN..], n as u64).unwrap();
        assert!(t.sealed);
        let idx = &p.bytes[t.index_offset as usize..n - TRAILER_LEN];
        assert_eq!(parse_index(idx, &t, Some(&c)).unwrap(), p.entries);
        // Any flipped byte is found: by the pack's checks or by an object's tag.
        for i in 0..n {
            let mut b = p.bytes.to_vec();
            b[i] ^= 0x10;
            let found = match parse_pack(&b, Some(&c)) {
                Err(_) => true,
                Ok(es) => es.iter().any(|e| {
                    open_object(
                        Some(&c),
                        &e.digest,
                        &b[e.offset as usize..][..e.len as usize],
                    )
                    .is_err()
                }),
            };
            assert!(found, "flip at {i} went unnoticed");
        }
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_pack(&b, None);
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
