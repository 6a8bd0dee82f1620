//! The metadata store: an embedded, transactional, crash-safe redb database holding the object
//! table (digest -> location and reference count), volume and snapshot records and the WAL's
//! segment list. Every record carries its own format version; object records carry a CRC so a
//! damaged record is reported rather than followed.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{PoolError, Result};
use crate::object::ObjectKind;
use crate::types::{Digest, Extent};

pub const OBJECTS: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("objects");
pub const VOLUMES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("volumes");
pub const SNAPSHOTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("snapshots");
pub const NAMES: TableDefinition<'_, &str, u64> = TableDefinition::new("volume_names");
pub const SEGMENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("wal_segments");
pub const COUNTERS: TableDefinition<'_, &str, u64> = TableDefinition::new("counters");

pub const META_FORMAT_VERSION: u64 = 1;

/// Location and reference count of a stored object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjRec {
    pub kind: ObjectKind,
    pub extent: Extent,
    pub raw_len: u32,
    pub stored_len: u32,
    pub refcount: u64,
}

const OBJREC_LEN: usize = 40;

impl ObjRec {
    pub fn encode(&self) -> [u8; OBJREC_LEN] {
        let mut b = [0u8; OBJREC_LEN];
        b[0] = 1; // record version
        b[1] = self.kind as u8;
        b[2..4].copy_from_slice(&self.extent.device.to_le_bytes());
        b[4..8].copy_from_slice(&self.raw_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.stored_len.to_le_bytes());
        b[12..20].copy_from_slice(&self.extent.offset.to_le_bytes());
        b[20..28].copy_from_slice(&self.extent.len.to_le_bytes());
        b[28..36].copy_from_slice(&self.refcount.to_le_bytes());
        let crc = crc32c::crc32c(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8], digest: &Digest) -> Result<ObjRec> {
        let what = || format!("object record {digest}");
        if b.len() != OBJREC_LEN {
            return Err(PoolError::corrupt(what(), "bad length"));
        }
        let crc = u32::from_le_bytes([b[36], b[37], b[38], b[39]]);
        if crc != crc32c::crc32c(&b[..36]) {
            return Err(PoolError::Checksum { what: what() });
        }
        if b[0] != 1 {
            return Err(PoolError::UnsupportedFormat {
                what: what(),
                detail: format!("version {}", b[0]),
            });
        }
        let kind = match b[1] {
            1 => ObjectKind::Chunk,
            2 => ObjectKind::Node,
            k => return Err(PoolError::corrupt(what(), format!("kind {k}"))),
        };
        let u64at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        Ok(ObjRec {
            kind,
            extent: Extent {
                device: u16::from_le_bytes([b[2], b[3]]),
                offset: u64at(12),
                len: u64at(20),
            },
            raw_len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            stored_len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            refcount: u64at(28),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRec {
    pub version: u32,
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub base_root: Option<Digest>,
    /// WAL entries of this volume with batch LSN <= folded_lsn are already in `base_root`.
    pub folded_lsn: u64,
    pub created_unix: i64,
    pub origin_snapshot: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRec {
    pub version: u32,
    pub id: u64,
    pub volume_id: u64,
    pub volume_name: String,
    pub size: u64,
    pub block_size: u32,
    pub root: Option<Digest>,
    pub created_unix: i64,
    pub locked_until_unix: Option<i64>,
    /// Blocks whose data was already lost when the snapshot was sealed (block, LSN of the
    /// damaged log batch): they read as medium errors in every clone of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damaged: Vec<(u64, u64)>,
    /// What the caller named the snapshot this one was imported as (the catalog's id of an
    /// archived snapshot brought back), so that a crash between the pool's commit and the
    /// caller's own record can be finished rather than leave a stranger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegRec {
    pub extent: Extent,
    pub first_lsn: u64,
    /// One past the last LSN of the segment, once it is closed: recorded when the log rolls to
    /// the next segment, or at open for the segments of the previous run (then it is where
    /// replay's chain ended). Replay reads no batch at or past it, and expects every LSN below
    /// it: one missing at or below the durable LSN is damage, not a torn write.
    pub end_lsn: Option<u64>,
}

impl SegRec {
    pub fn encode(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[0] = 2;
        b[2..4].copy_from_slice(&self.extent.device.to_le_bytes());
        b[8..16].copy_from_slice(&self.extent.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.extent.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_lsn.to_le_bytes());
        b[32..40].copy_from_slice(&self.end_lsn.unwrap_or(0).to_le_bytes());
        b
    }
    /// Decodes a record of version 2, or of version 1 (no end recorded).
    pub fn decode(b: &[u8]) -> Result<SegRec> {
        let ok = matches!((b.len(), b.first()), (32, Some(1)) | (40, Some(2)));
        if !ok {
            return Err(PoolError::corrupt(
                "wal segment record",
                "bad length or version",
            ));
        }
        let u64at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let end = if b.len() == 40 { u64at(32) } else { 0 };
        Ok(SegRec {
            extent: Extent {
                device: u16::from_le_bytes([b[2], b[3]]),
                offset: u64at(8),
                len: u64at(16),
            },
            first_lsn: u64at(24),
            end_lsn: (end != 0).then_some(end),
        })
    }
}

/// Blocks whose data is known lost, per volume: (volume, block) -> LSN of the damaged batch.
/// Kept for the volume's base (what folds sealed); damage still in the log is re-found by
/// replay until a fold moves it here.
pub const DAMAGED: TableDefinition<'_, (u64, u64), u64> = TableDefinition::new("damaged_blocks");
/// Damage found in the write-ahead log, one JSON record per damaged batch (or run of batches
/// whose headers were unreadable), by (segment, LSN): the pool's damage report.
pub const LOG_DAMAGE: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("log_damage");

/// A damaged WAL batch, as recorded in [`LOG_DAMAGE`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogDamageRec {
    pub segment: u64,
    /// First LSN of the damaged range, and one past its last.
    pub lsn: u64,
    pub end_lsn: u64,
    pub device: u16,
    pub offset: u64,
    pub len: u64,
    /// Blocks lost, as (volume, block); empty when the batch's header and footer were both
    /// unreadable (`unattributed`).
    pub blocks: Vec<(u64, u64)>,
    pub unattributed: bool,
    pub detected_unix: i64,
    /// File under the pool directory holding a copy of the damaged bytes.
    pub evidence: Option<String>,
    pub detail: String,
}

pub fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| PoolError::Meta(e.to_string()))
}

pub fn from_json<T: for<'de> Deserialize<'de>>(b: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| PoolError::corrupt(what, e.to_string()))
}

/// Creates the store's file private (0600), or tightens it to that if it exists.
fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(crate::fsmode::PRIVATE_FILE)
        .open(path)
        .map_err(|e| PoolError::io(path.display().to_string(), e))?;
    crate::fsmode::restrict_file(&f, path, crate::fsmode::PRIVATE_FILE)
        .map_err(|e| PoolError::io(path.display().to_string(), e))?;
    Ok(())
}

#[derive(Debug)]
pub struct Meta {
    pub db: Database,
}

impl Meta {
    /// Creates the store, private (0600) whatever the umask.
    pub fn create(path: &Path) -> Result<Meta> {
        private_file(path)?;
        let db = if crate::powerloss::covers(path) {
            let backend = crate::powerloss::SimBackend::open(path, true)
                .map_err(|e| PoolError::io(path.display().to_string(), e))?;
            Database::builder().create_with_backend(backend)?
        } else {
            Database::create(path)?
        };
        let mut tx = db.begin_write()?;
        tx.set_two_phase_commit(true);
        {
            tx.open_table(OBJECTS)?;
            tx.open_table(VOLUMES)?;
            tx.open_table(SNAPSHOTS)?;
            tx.open_table(NAMES)?;
            tx.open_table(SEGMENTS)?;
            tx.open_table(DAMAGED)?;
            tx.open_table(LOG_DAMAGE)?;
            let mut c = tx.open_table(COUNTERS)?;
            c.insert("format_version", META_FORMAT_VERSION)?;
            c.insert("next_volume_id", 1)?;
            c.insert("next_snapshot_id", 1)?;
            c.insert("next_segment_seq", 1)?;
        }
        tx.commit()?;
        Ok(Meta { db })
    }

    /// Opens the store; tightens it to 0600 if it is more open.
    pub fn open(path: &Path) -> Result<Meta> {
        crate::fsmode::restrict_path(path, crate::fsmode::PRIVATE_FILE)
            .map_err(|e| PoolError::io(path.display().to_string(), e))?;
        let db = if crate::powerloss::covers(path) && path.exists() {
            let backend = crate::powerloss::SimBackend::open(path, false)
                .map_err(|e| PoolError::io(path.display().to_string(), e))?;
            Database::builder().create_with_backend(backend)?
        } else {
            Database::open(path)?
        };
        let m = Meta { db };
        let v = m.counter("format_version")?;
        if v != META_FORMAT_VERSION {
            return Err(PoolError::UnsupportedFormat {
                what: "metadata store".into(),
                detail: format!("format version {v}, this build reads {META_FORMAT_VERSION}"),
            });
        }
        Ok(m)
    }

    /// A write transaction that commits in two phases: the commit slot is made durable before
    /// the header points at it, so a power cut that tears the header (sectors of one write
    /// landing without the others) can never leave the store pointing at a commit whose pages
    /// are not there. Metadata commits are off the I/O path (rolls, folds, reclaim), so the
    /// second flush costs nothing a host waits for.
    pub fn begin_write(&self) -> Result<redb::WriteTransaction> {
        let mut tx = self.db.begin_write()?;
        tx.set_two_phase_commit(true);
        Ok(tx)
    }

    pub fn counter(&self, name: &str) -> Result<u64> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(COUNTERS)?;
        Ok(t.get(name)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Whether object `d` is stored on a device (not absent, not only in an archive target).
    pub fn has_local_object(&self, d: &Digest) -> Result<bool> {
        Ok(self.get_object(d)?.is_some_and(|r| !r.extent.is_remote()))
    }

    pub fn get_object(&self, d: &Digest) -> Result<Option<ObjRec>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OBJECTS)?;
        match t.get(&d.0)? {
            Some(v) => Ok(Some(ObjRec::decode(v.value(), d)?)),
            None => Ok(None),
        }
    }

    pub fn volumes(&self) -> Result<Vec<VolumeRec>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VOLUMES)?;
        let mut out = Vec::new();
        for r in t.iter()? {
            let (_, v) = r?;
            out.push(from_json(v.value(), "volume record")?);
        }
        Ok(out)
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRec>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for r in t.iter()? {
            let (_, v) = r?;
            out.push(from_json(v.value(), "snapshot record")?);
        }
        Ok(out)
    }

    pub fn snapshot(&self, id: u64) -> Result<Option<SnapshotRec>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        match t.get(id)? {
            Some(v) => Ok(Some(from_json(v.value(), "snapshot record")?)),
            None => Ok(None),
        }
    }

    pub fn segments(&self) -> Result<Vec<(u64, SegRec)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SEGMENTS)?;
        let mut out = Vec::new();
        for r in t.iter()? {
            let (k, v) = r?;
            out.push((k.value(), SegRec::decode(v.value())?));
        }
        Ok(out)
    }

    /// Damaged blocks of every volume's base, by volume.
    pub fn damaged_blocks(&self) -> Result<std::collections::HashMap<u64, Vec<(u64, u64)>>> {
        let tx = self.db.begin_read()?;
        let mut out: std::collections::HashMap<u64, Vec<(u64, u64)>> = Default::default();
        let t = match tx.open_table(DAMAGED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        for r in t.iter()? {
            let (k, v) = r?;
            let (vol, block) = k.value();
            out.entry(vol).or_default().push((block, v.value()));
        }
        Ok(out)
    }

    /// The log damage recorded so far.
    pub fn log_damage(&self) -> Result<Vec<LogDamageRec>> {
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(LOG_DAMAGE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for r in t.iter()? {
            let (_, v) = r?;
            out.push(from_json(v.value(), "log damage record")?);
        }
        Ok(out)
    }

    /// All objects, for rebuilding the allocator and for verify/stats.
    pub fn objects(&self) -> Result<Vec<(Digest, ObjRec)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OBJECTS)?;
        let mut out = Vec::new();
        for r in t.iter()? {
            let (k, v) = r?;
            let d = Digest(k.value());
            out.push((d, ObjRec::decode(v.value(), &d)?));
        }
        Ok(out)
    }
}

/// Increments a counter inside a write transaction and returns the value before.
pub fn bump(tx: &redb::WriteTransaction, name: &str) -> Result<u64> {
    let mut t = tx.open_table(COUNTERS)?;
    let cur = t.get(name)?.map(|v| v.value()).unwrap_or(1);
    t.insert(name, cur + 1)?;
    Ok(cur)
}

/// Records a newly written object in a write transaction. Returns its extent when the object
/// was stored meanwhile (the caller frees that copy once the transaction committed); an object
/// that was only remote takes the local extent and keeps its reference count.
pub fn insert_new_object(
    t: &mut redb::Table<'_, [u8; 32], &[u8]>,
    d: &Digest,
    rec: &ObjRec,
) -> Result<Option<Extent>> {
    let cur = match t.get(&d.0)? {
        Some(v) => Some(ObjRec::decode(v.value(), d)?),
        None => None,
    };
    match cur {
        None => {
            t.insert(&d.0, rec.encode().as_slice())?;
            Ok(None)
        }
        Some(cur) if cur.extent.is_remote() && !rec.extent.is_remote() => {
            let up = ObjRec {
                refcount: cur.refcount,
                ..*rec
            };
            t.insert(&d.0, up.encode().as_slice())?;
            Ok(None)
        }
        Some(_) => Ok(Some(rec.extent)),
    }
}
