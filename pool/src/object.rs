//! The on-device format of sealed objects (data chunks and index nodes).
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
//! A reader checks both CRCs, decompresses, and re-hashes the raw bytes against the digest, so a
//! damaged object is reported, never returned as data. The digest key is per pool, so digests
//! reveal nothing across pools.

use crate::error::{PoolError, Result};
use crate::io::AlignedBuf;
use crate::types::{BLOCK, Digest, align_up};

pub const OBJECT_MAGIC: &[u8; 8] = b"MAASOBJ\0";
pub const OBJECT_FORMAT_VERSION: u16 = 1;
pub const OBJECT_HEADER_LEN: usize = 64;
/// Largest raw object we accept when decoding (bounded allocation on hostile input).
pub const MAX_OBJECT_RAW: usize = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    Chunk = 1,
    Node = 2,
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
    pub stored_len: u32,
    pub codec: Codec,
}

/// Compresses (when it pays) and frames `raw`.
pub fn encode(kind: ObjectKind, digest: &Digest, raw: &[u8], zstd_level: i32) -> Result<Encoded> {
    let compressed = if worth_compressing(raw, zstd_level)? {
        zstd::bulk::compress(raw, zstd_level).map_err(|e| PoolError::io("zstd compression", e))?
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
    buf[8..10].copy_from_slice(&OBJECT_FORMAT_VERSION.to_le_bytes());
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
    let packed = zstd::bulk::compress(&sample, zstd_level)
        .map_err(|e| PoolError::io("zstd compression", e))?;
    Ok(packed.len() < sample.len() - sample.len() / 16)
}

/// Total on-device length of an object whose payload is `stored_len` bytes.
pub fn extent_len(stored_len: u32) -> u64 {
    align_up(OBJECT_HEADER_LEN as u64 + stored_len as u64, BLOCK)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Checks and decodes an object read from a device; `what` names it in errors.
pub fn decode(
    keys: &Keys,
    buf: &[u8],
    kind: ObjectKind,
    expect: &Digest,
    what: &str,
) -> Result<Vec<u8>> {
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
    if version != OBJECT_FORMAT_VERSION {
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
    let raw_len = le32(buf, 12) as usize;
    let stored_len = le32(buf, 16) as usize;
    if raw_len > MAX_OBJECT_RAW || OBJECT_HEADER_LEN + stored_len > buf.len() {
        return Err(PoolError::corrupt(what, "lengths out of bounds"));
    }
    let payload = &buf[OBJECT_HEADER_LEN..OBJECT_HEADER_LEN + stored_len];
    if le32(buf, 52) != crc32c::crc32c(payload) {
        return Err(PoolError::Checksum {
            what: format!("{what} (payload)"),
        });
    }
    let raw = match buf[11] {
        0 if stored_len == raw_len => payload.to_vec(),
        1 => {
            let out = zstd::bulk::decompress(payload, raw_len)
                .map_err(|e| PoolError::corrupt(what, format!("zstd: {e}")))?;
            if out.len() != raw_len {
                return Err(PoolError::corrupt(what, "decompressed length mismatch"));
            }
            out
        }
        c => return Err(PoolError::corrupt(what, format!("unknown codec {c}"))),
    };
    if keys.digest(kind, &raw) != *expect {
        return Err(PoolError::Checksum {
            what: format!("{what} (digest)"),
        });
    }
    Ok(raw)
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
}
