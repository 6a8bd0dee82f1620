//! The pool's side of the archive tier: which of its objects an archive target (an S3 bucket
//! and prefix, named by an opaque id the caller chooses) already holds, and where.
//!
//! The S3 gateway packs objects into large pack objects and records each pack here, in one
//! metadata transaction, only once the bucket has acknowledged it. Push, restore and lazy
//! reads therefore know what the bucket holds without listing it, and a push resumed after a
//! crash sends only the packs that were never recorded. The records can be rebuilt from the
//! packs' own indexes (the bucket is self-describing).
//!
//! The pool also hands the gateway its objects as stored (header, frame table, compressed
//! frames: the self-describing format of [`crate::object`]), checked before they leave, and
//! checks the bytes that come back with its own digest key.

use redb::{ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{PoolError, Result};
use crate::meta::{self, COUNTERS};
use crate::object::{self, ObjectKind};
use crate::pool::{Pool, now_unix};
use crate::types::{Digest, SnapshotId};

/// (target, digest) -> where the object lies in the target ([`ArchivedObject::encode`]).
const ARCHIVE_OBJECTS: TableDefinition<'_, (&str, [u8; 32]), &[u8]> =
    TableDefinition::new("archive_objects");
/// (target, pack number) -> [`PackRec`] as JSON.
const ARCHIVE_PACKS: TableDefinition<'_, (&str, u64), &[u8]> =
    TableDefinition::new("archive_packs");

/// Where an archived object lies: its pack, and the byte range of its stored bytes in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchivedObject {
    pub pack: u64,
    pub offset: u64,
    pub len: u32,
    pub kind: ObjectKind,
}

const ARCHIVED_OBJECT_LEN: usize = 18;

impl ArchivedObject {
    fn encode(&self) -> [u8; ARCHIVED_OBJECT_LEN] {
        let mut b = [0u8; ARCHIVED_OBJECT_LEN];
        b[0] = 1; // record version
        b[1] = self.kind as u8;
        b[2..10].copy_from_slice(&self.pack.to_le_bytes());
        b[10..14].copy_from_slice(&(self.offset as u32).to_le_bytes());
        b[14..18].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != ARCHIVED_OBJECT_LEN || b[0] != 1 {
            return Err(PoolError::corrupt(
                "archived object record",
                "bad length or version",
            ));
        }
        let kind = ObjectKind::from_byte(b[1])
            .ok_or_else(|| PoolError::corrupt("archived object record", "bad kind"))?;
        let u32at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut pack = [0u8; 8];
        pack.copy_from_slice(&b[2..10]);
        Ok(ArchivedObject {
            pack: u64::from_le_bytes(pack),
            offset: u64::from(u32at(10)),
            len: u32at(14),
            kind,
        })
    }
}

/// A pack the target holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PackRec {
    pub version: u32,
    /// The pack's object name in the bucket, relative to the target's prefix.
    pub key: String,
    pub bytes: u64,
    pub objects: u32,
    pub stored_unix: i64,
}

/// One object of a pack the target acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub digest: Digest,
    pub kind: ObjectKind,
    pub offset: u64,
    pub len: u32,
}

/// What a snapshot's image is made of.
#[derive(Clone, Debug)]
pub struct SnapshotObjects {
    pub root: Option<Digest>,
    /// Blocks lost before the seal (they read as medium errors).
    pub damaged_blocks: Vec<u64>,
    /// Index nodes (root first), then data chunks in chunk order; each once.
    pub objects: Vec<(Digest, ObjectKind)>,
}

/// An object as the pool stores it: what goes into a pack.
#[derive(Clone, Debug)]
pub struct StoredObject {
    pub digest: Digest,
    pub kind: ObjectKind,
    pub bytes: Vec<u8>,
    /// Length of the object's raw (decoded) bytes.
    pub raw_len: u32,
}

/// Packs are at most 4 GiB, so offsets fit the record's 32 bits.
pub const MAX_PACK_BYTES: u64 = u32::MAX as u64;

impl Pool {
    /// Every object a snapshot's image needs: its index nodes (root first) and its data
    /// chunks in chunk order, each once.
    pub fn snapshot_objects(&self, id: SnapshotId) -> Result<SnapshotObjects> {
        self.inner.check_open()?;
        let rec = self.inner.snapshot_rec(id)?;
        let mut out = SnapshotObjects {
            root: rec.root,
            damaged_blocks: rec.damaged.iter().map(|(b, _)| *b).collect(),
            objects: Vec::new(),
        };
        let Some(root) = rec.root else {
            return Ok(out);
        };
        let shared = &self.inner.shared;
        let _pin = shared.pin.read();
        let mut seen = std::collections::HashSet::new();
        let mut nodes = vec![(root, ObjectKind::Node)];
        let mut chunks = Vec::new();
        seen.insert(root);
        for leaf in shared.node(&root)?.children() {
            if !seen.insert(*leaf) {
                continue; // a leaf repeated in the root: its chunks are listed already
            }
            nodes.push((*leaf, ObjectKind::Node));
            for c in shared.node(leaf)?.children() {
                if seen.insert(*c) {
                    chunks.push((*c, ObjectKind::Chunk));
                }
            }
        }
        nodes.extend(chunks);
        out.objects = nodes;
        Ok(out)
    }

    /// An object's stored bytes (header, table, frames; no device padding), checked whole
    /// (every CRC, and the digest over the decoded bytes) before they are handed out.
    pub fn read_stored_object(&self, d: &Digest) -> Result<StoredObject> {
        self.inner.check_open()?;
        let shared = &self.inner.shared;
        let _pin = shared.pin.read();
        let rec = shared.lookup(d)?;
        let buf = shared.read_object_bytes(d, &rec)?;
        let what = format!("object {d}");
        let raw = object::decode(&shared.keys, &buf, rec.kind, d, &what)?;
        let end = (object::OBJECT_HEADER_LEN + rec.stored_len as usize).min(buf.len());
        let bytes = buf[..end].to_vec();
        Ok(StoredObject {
            digest: *d,
            kind: rec.kind,
            raw_len: raw.len() as u32,
            bytes,
        })
    }

    /// Checks stored bytes that came back from an archive: the format, every CRC and the
    /// digest under the keys of the pool that wrote them (`source`; None: this pool).
    /// Returns the decoded (raw) bytes.
    pub fn check_stored_object(
        &self,
        source: Option<&crate::import::DigestKeys>,
        d: &Digest,
        kind: ObjectKind,
        bytes: &[u8],
        what: &str,
    ) -> Result<Vec<u8>> {
        match source {
            Some(k) => object::decode(
                &object::Keys::from_raw(k.chunk, k.node),
                bytes,
                kind,
                d,
                what,
            ),
            None => object::decode(&self.inner.shared.keys, bytes, kind, d, what),
        }
    }

    /// Which of `digests` the target does not hold yet (in the order given).
    pub fn archive_missing(&self, target: &str, digests: &[Digest]) -> Result<Vec<Digest>> {
        let db = &self.inner.shared.meta.db;
        let tx = db.begin_read()?;
        let t = match tx.open_table(ARCHIVE_OBJECTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(digests.to_vec()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for d in digests {
            if t.get((target, d.0))?.is_none() {
                out.push(*d);
            }
        }
        Ok(out)
    }

    /// Where the target holds object `d`, with its pack.
    pub fn archive_locate(
        &self,
        target: &str,
        d: &Digest,
    ) -> Result<Option<(ArchivedObject, PackRec)>> {
        locate(&self.inner.shared.meta, target, d)
    }

    /// Records a pack the target acknowledged and every object in it, in one durable
    /// transaction. Returns the pack's number.
    pub fn archive_record_pack(
        &self,
        target: &str,
        key: &str,
        bytes: u64,
        entries: &[PackEntry],
    ) -> Result<u64> {
        if bytes > MAX_PACK_BYTES {
            return Err(PoolError::InvalidArgument(format!(
                "pack of {bytes} bytes is larger than {MAX_PACK_BYTES}"
            )));
        }
        let tx = self.inner.shared.meta.begin_write()?;
        let pack = meta::bump(&tx, &format!("archive_pack:{target}"))?;
        {
            let rec = PackRec {
                version: 1,
                key: key.to_string(),
                bytes,
                objects: entries.len() as u32,
                stored_unix: now_unix(),
            };
            tx.open_table(ARCHIVE_PACKS)?
                .insert((target, pack), meta::to_json(&rec)?.as_slice())?;
            let mut t = tx.open_table(ARCHIVE_OBJECTS)?;
            for e in entries {
                let loc = ArchivedObject {
                    pack,
                    offset: e.offset,
                    len: e.len,
                    kind: e.kind,
                };
                t.insert((target, e.digest.0), loc.encode().as_slice())?;
            }
        }
        tx.commit()?;
        Ok(pack)
    }

    /// The packs the target holds, by number.
    pub fn archive_packs(&self, target: &str) -> Result<Vec<(u64, PackRec)>> {
        let db = &self.inner.shared.meta.db;
        let tx = db.begin_read()?;
        let t = match tx.open_table(ARCHIVE_PACKS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for r in t.range((target, 0)..=(target, u64::MAX))? {
            let (k, v) = r?;
            out.push((
                k.value().1,
                meta::from_json(v.value(), "archive pack record")?,
            ));
        }
        Ok(out)
    }

    /// Every object the target holds, with where.
    pub fn archive_objects(&self, target: &str) -> Result<Vec<(Digest, ArchivedObject)>> {
        let db = &self.inner.shared.meta.db;
        let tx = db.begin_read()?;
        let t = match tx.open_table(ARCHIVE_OBJECTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for r in t.range((target, [0u8; 32])..=(target, [0xffu8; 32]))? {
            let (k, v) = r?;
            out.push((Digest(k.value().1), ArchivedObject::decode(v.value())?));
        }
        Ok(out)
    }

    /// Forgets packs the target no longer holds (about to be deleted from the bucket), and
    /// every object recorded in them, in one transaction: a push started afterwards sends
    /// those objects again if it needs them.
    pub fn archive_forget_packs(&self, target: &str, packs: &[u64]) -> Result<()> {
        let dead: std::collections::HashSet<u64> = packs.iter().copied().collect();
        let tx = self.inner.shared.meta.begin_write()?;
        {
            let mut t = tx.open_table(ARCHIVE_OBJECTS)?;
            let mut bad = None;
            t.retain_in((target, [0u8; 32])..=(target, [0xffu8; 32]), |_, v| {
                match ArchivedObject::decode(v) {
                    Ok(loc) => !dead.contains(&loc.pack),
                    Err(e) => {
                        bad = Some(e);
                        true
                    }
                }
            })?;
            if let Some(e) = bad {
                return Err(e);
            }
            let mut p = tx.open_table(ARCHIVE_PACKS)?;
            for n in packs {
                p.remove((target, *n))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Forgets everything recorded about a target (it was deleted).
    pub fn archive_forget(&self, target: &str) -> Result<()> {
        let tx = self.inner.shared.meta.begin_write()?;
        {
            let mut t = tx.open_table(ARCHIVE_OBJECTS)?;
            t.retain_in((target, [0u8; 32])..=(target, [0xffu8; 32]), |_, _| false)?;
            let mut p = tx.open_table(ARCHIVE_PACKS)?;
            p.retain_in((target, 0)..=(target, u64::MAX), |_, _| false)?;
            tx.open_table(COUNTERS)?
                .remove(format!("archive_pack:{target}").as_str())?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// Where target `target` holds object `d`, with its pack.
pub(crate) fn locate(
    m: &meta::Meta,
    target: &str,
    d: &Digest,
) -> Result<Option<(ArchivedObject, PackRec)>> {
    let tx = m.db.begin_read()?;
    let (objs, packs) = match (tx.open_table(ARCHIVE_OBJECTS), tx.open_table(ARCHIVE_PACKS)) {
        (Ok(o), Ok(p)) => (o, p),
        (Err(redb::TableError::TableDoesNotExist(_)), _)
        | (_, Err(redb::TableError::TableDoesNotExist(_))) => return Ok(None),
        (Err(e), _) | (_, Err(e)) => return Err(e.into()),
    };
    let Some(v) = objs.get((target, d.0))? else {
        return Ok(None);
    };
    let loc = ArchivedObject::decode(v.value())?;
    let pack = match packs.get((target, loc.pack))? {
        Some(p) => meta::from_json::<PackRec>(p.value(), "archive pack record")?,
        None => {
            return Err(PoolError::corrupt(
                format!("archived object {d}"),
                format!("names pack {} that has no record", loc.pack),
            ));
        }
    };
    Ok(Some((loc, pack)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archived_object_record_round_trips_and_rejects_damage() {
        let a = ArchivedObject {
            pack: 7,
            offset: 123_456,
            len: 999,
            kind: ObjectKind::Chunk,
        };
        assert_eq!(ArchivedObject::decode(&a.encode()).unwrap(), a);
        let mut b = a.encode();
        b[0] = 9;
        assert!(ArchivedObject::decode(&b).is_err());
        let mut b = a.encode();
        b[1] = 77;
        assert!(ArchivedObject::decode(&b).is_err());
        assert!(ArchivedObject::decode(&a.encode()[..5]).is_err());
    }
}
