//! State shared by the pool's parts: devices, metadata, allocator, keys and caches, and the
//! object-store operations built on them (read/write sealed objects through the RAM cache).

use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use redb::ReadableTable;

use crate::alloc::{Allocator, Placement};
use crate::device::Device;
use crate::error::{PoolError, Result};
use crate::index::Node;
use crate::io::{self, AlignedBuf, Op};
use crate::meta::{Meta, ObjRec};
use crate::object::{self, Keys, ObjectKind};
use crate::types::{Digest, Extent};

/// A byte-bounded LRU of decoded objects (the RAM tier's read cache).
#[derive(Debug)]
pub struct ByteLru<V> {
    lru: LruCache<Digest, (Arc<V>, usize)>,
    bytes: usize,
    limit: usize,
}

impl<V> ByteLru<V> {
    pub fn new(limit: usize) -> Self {
        ByteLru {
            lru: LruCache::unbounded(),
            bytes: 0,
            limit,
        }
    }
    pub fn get(&mut self, d: &Digest) -> Option<Arc<V>> {
        self.lru.get(d).map(|(v, _)| v.clone())
    }
    pub fn put(&mut self, d: Digest, v: Arc<V>, size: usize) {
        if size > self.limit {
            return;
        }
        if let Some((_, old)) = self.lru.put(d, (v, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
        while self.bytes > self.limit {
            match self.lru.pop_lru() {
                Some((_, (_, s))) => self.bytes -= s,
                None => break,
            }
        }
    }
    pub fn clear(&mut self) {
        self.lru.clear();
        self.bytes = 0;
    }
    /// Changes the byte budget; a smaller one evicts, least recently used first, at once.
    /// Returns the evicted values so the caller can drop them outside its lock.
    pub fn set_limit(&mut self, limit: usize) -> Vec<Arc<V>> {
        self.limit = limit;
        let mut evicted = Vec::new();
        while self.bytes > self.limit {
            match self.lru.pop_lru() {
                Some((_, (v, s))) => {
                    self.bytes -= s;
                    evicted.push(v);
                }
                None => break,
            }
        }
        evicted
    }
    pub fn limit(&self) -> usize {
        self.limit
    }
    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Device slots; a device is added by filling the next empty slot, so lookups need no lock.
pub const MAX_DEVICES: usize = 64;

#[cfg(test)]
mod lru_tests {
    use super::*;

    #[test]
    fn set_limit_evicts_down_at_once_and_raising_it_keeps_everything() {
        let mut c: ByteLru<u32> = ByteLru::new(100);
        for i in 0..10u8 {
            c.put(Digest([i; 32]), Arc::new(u32::from(i)), 10);
        }
        assert_eq!(c.bytes(), 100);
        c.get(&Digest([0; 32]));
        let gone = c.set_limit(35);
        assert_eq!(gone.len(), 7);
        assert_eq!(c.bytes(), 30);
        // The most recently used survive (0 was touched).
        assert!(c.get(&Digest([0; 32])).is_some());
        assert!(c.get(&Digest([9; 32])).is_some());
        assert!(c.get(&Digest([1; 32])).is_none());
        assert!(c.set_limit(1000).is_empty());
        for i in 10..40u8 {
            c.put(Digest([i; 32]), Arc::new(u32::from(i)), 10);
        }
        assert_eq!(c.bytes(), 330);
    }
}

#[derive(Debug)]
pub struct Shared {
    pub devices: Vec<std::sync::OnceLock<Device>>,
    pub meta: Meta,
    pub alloc: Mutex<Allocator>,
    pub keys: Keys,
    pub chunk_size: u64,
    pub zstd_level: i32,
    pub chunk_cache: Mutex<ByteLru<Vec<u8>>>,
    pub node_cache: Mutex<ByteLru<Node>>,
    /// Readers and seals hold this shared while they may follow object or WAL locations; space
    /// is handed back to the allocator only under an exclusive (try-)lock, so nobody ever reads
    /// an extent that was freed and reused under them.
    pub pin: std::sync::Arc<RwLock<()>>,
    /// Extents whose records are gone, waiting for the pin to be free.
    pub pending_free: Mutex<Vec<Extent>>,
    /// Objects whose reference count reached zero, to be swept when the pin is free.
    pub dead: Mutex<std::collections::HashSet<Digest>>,
    pub chunk_cache_disabled: bool,
    /// Data-block CRCs of the WAL batches on their devices, by LSN: every read of a log block
    /// from a device is checked against them.
    pub log_sums: RwLock<std::collections::BTreeMap<u64, Arc<crate::wal::BatchSums>>>,
    /// LSN ranges of freed log segments whose CRCs go once the pin is free (a reader that
    /// resolved a block there before it was overwritten may still be reading it).
    pub retired_log_sums: Mutex<Vec<std::ops::RangeInclusive<u64>>>,
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
        let what = match rec.kind {
            ObjectKind::Chunk => format!("chunk {d}"),
            ObjectKind::Node => format!("index node {d}"),
        };
        object::decode(&self.keys, &buf, rec.kind, d, &what)
    }

    pub fn lookup(&self, d: &Digest) -> Result<ObjRec> {
        self.meta.get_object(d)?.ok_or_else(|| {
            PoolError::corrupt(
                format!("object {d}"),
                "referenced but not in the object table",
            )
        })
    }

    /// A data chunk's bytes if the RAM cache holds them.
    pub fn chunk_cached(&self, d: &Digest) -> Option<Arc<Vec<u8>>> {
        self.chunk_cache.lock().get(d)
    }

    /// An index node if the RAM cache holds it.
    pub fn node_cached(&self, d: &Digest) -> Option<Arc<Node>> {
        self.node_cache.lock().get(d)
    }

    /// A data chunk's bytes (chunk_size long), through the RAM cache.
    pub fn chunk(&self, d: &Digest) -> Result<Arc<Vec<u8>>> {
        if let Some(c) = self.chunk_cache.lock().get(d) {
            return Ok(c);
        }
        let rec = self.lookup(d)?;
        let raw = Arc::new(self.read_object(d, &rec)?);
        if raw.len() as u64 != self.chunk_size {
            return Err(PoolError::corrupt(format!("chunk {d}"), "wrong length"));
        }
        if !self.chunk_cache_disabled {
            self.chunk_cache.lock().put(*d, raw.clone(), raw.len());
        }
        Ok(raw)
    }

    pub fn node(&self, d: &Digest) -> Result<Arc<Node>> {
        if let Some(n) = self.node_cache.lock().get(d) {
            return Ok(n);
        }
        let rec = self.lookup(d)?;
        let raw = self.read_object(d, &rec)?;
        let node = Arc::new(Node::decode(&raw)?);
        self.node_cache.lock().put(*d, node.clone(), raw.len() + 64);
        Ok(node)
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
        if let Err(e) = io::run_batch(&mut [Op::Write {
            file: dev.file(),
            offset: extent.offset,
            buf: &enc.buf,
        }]) {
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

    pub fn sync_all(&self) -> Result<()> {
        for d in self.all_devices() {
            d.sync()?;
        }
        Ok(())
    }

    /// Sweeps unreferenced objects and hands pending extents back to the allocator, if no
    /// reader or seal is in flight; false if it has to be retried later.
    pub fn reclaim(&self) -> Result<bool> {
        let Some(_w) = self.pin.try_write() else {
            return Ok(false);
        };
        let dead: Vec<Digest> = self.dead.lock().drain().collect();
        if !dead.is_empty() {
            let mut freed = Vec::new();
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
                    }
                }
            }
            tx.commit()?;
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
        let mut pend = self.pending_free.lock();
        let mut a = self.alloc.lock();
        for e in pend.drain(..) {
            a.free(e);
        }
        Ok(true)
    }
}
