//! Snapshot indexes: a two-level tree of content-addressed nodes.
//!
//! A *leaf* maps `LEAF_FANOUT` consecutive chunk numbers to chunk digests (or none for all-zero
//! chunks). A *root* maps consecutive leaf numbers to leaf digests (or none for an all-zero
//! leaf). Nodes are stored as objects in the chunk store, so identical leaves are shared between
//! snapshots: sealing touches only the leaves whose chunks changed, an unchanged volume seals by
//! reusing its root, and a clone is one more reference to a root.
//!
//! Node bytes (before object framing and compression):
//! ```text
//! magic "MAASIDX\0" | version u16 | level u8 (0 leaf, 1 root) | 0 u8 | count u32
//! | presence bitmap (count bits) | digests of present entries, 32 bytes each
//! ```

use crate::error::{PoolError, Result};
use crate::types::Digest;

pub const INDEX_MAGIC: &[u8; 8] = b"MAASIDX\0";
pub const INDEX_FORMAT_VERSION: u16 = 1;
/// Chunks per leaf. With 1 MiB chunks a leaf covers 4 GiB.
pub const LEAF_FANOUT: u64 = 4096;
/// Leaves per root; bounds the largest volume at chunk_size * LEAF_FANOUT * MAX_ROOT_ENTRIES.
pub const MAX_ROOT_ENTRIES: u64 = 1 << 18;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Leaf = 0,
    Root = 1,
}

/// A decoded node: its entries, each a child digest or none (zero).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub level: Level,
    pub entries: Vec<Option<Digest>>,
}

impl Node {
    pub fn empty(level: Level, count: usize) -> Self {
        Node {
            level,
            entries: vec![None; count],
        }
    }

    pub fn is_all_none(&self) -> bool {
        self.entries.iter().all(Option::is_none)
    }

    pub fn children(&self) -> impl Iterator<Item = &Digest> {
        self.entries.iter().flatten()
    }

    pub fn encode(&self) -> Vec<u8> {
        let count = self.entries.len();
        let present = self.entries.iter().filter(|e| e.is_some()).count();
        let mut out = Vec::with_capacity(16 + count.div_ceil(8) + present * 32);
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&INDEX_FORMAT_VERSION.to_le_bytes());
        out.push(self.level as u8);
        out.push(0);
        out.extend_from_slice(&(count as u32).to_le_bytes());
        let mut bitmap = vec![0u8; count.div_ceil(8)];
        for (i, e) in self.entries.iter().enumerate() {
            if e.is_some() {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        out.extend_from_slice(&bitmap);
        for d in self.entries.iter().flatten() {
            out.extend_from_slice(&d.0);
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Node> {
        let bad = |d: &str| PoolError::corrupt("index node", d.to_string());
        if b.len() < 16 || &b[..8] != INDEX_MAGIC {
            return Err(bad("bad magic"));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != INDEX_FORMAT_VERSION {
            return Err(PoolError::UnsupportedFormat {
                what: "index node".into(),
                detail: format!("version {version}"),
            });
        }
        let level = match b[10] {
            0 => Level::Leaf,
            1 => Level::Root,
            _ => return Err(bad("bad level")),
        };
        let count = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) as usize;
        let max = match level {
            Level::Leaf => LEAF_FANOUT,
            Level::Root => MAX_ROOT_ENTRIES,
        } as usize;
        if count > max {
            return Err(bad("too many entries"));
        }
        let bm_len = count.div_ceil(8);
        let bitmap = b
            .get(16..16 + bm_len)
            .ok_or_else(|| bad("truncated bitmap"))?;
        let mut entries = Vec::with_capacity(count);
        let mut pos = 16 + bm_len;
        for i in 0..count {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                let d = b
                    .get(pos..pos + 32)
                    .ok_or_else(|| bad("truncated digests"))?;
                let mut a = [0u8; 32];
                a.copy_from_slice(d);
                entries.push(Some(Digest(a)));
                pos += 32;
            } else {
                entries.push(None);
            }
        }
        if pos != b.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Node { level, entries })
    }
}

/// Geometry of a volume's index for a given chunk size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub chunk_size: u64,
}

impl Geometry {
    pub fn chunks_for(&self, size: u64) -> u64 {
        size.div_ceil(self.chunk_size)
    }
    pub fn leaves_for(&self, size: u64) -> u64 {
        self.chunks_for(size).div_ceil(LEAF_FANOUT)
    }
    pub fn max_volume_size(&self) -> u64 {
        self.chunk_size * LEAF_FANOUT * MAX_ROOT_ENTRIES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_roundtrip() {
        let mut n = Node::empty(Level::Leaf, 4096);
        n.entries[0] = Some(Digest([1; 32]));
        n.entries[4095] = Some(Digest([2; 32]));
        let b = n.encode();
        assert_eq!(Node::decode(&b).unwrap(), n);
        assert!(Node::decode(&b[..b.len() - 1]).is_err());
        let mut c = b.clone();
        c[12] = 0xff;
        c[13] = 0xff;
        assert!(Node::decode(&c).is_err());
    }
}
