//! The pool: lifecycle (create, open, close), volumes and snapshots, and the background
//! maintenance thread. Block I/O lives in `volio`, sealing in `fold`, accounting in `stats`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use crate::alloc::Allocator;
use crate::cache::ShardedLru;
use crate::config::{
    CreateOptions, DeviceSpec, META_FILE, OpenOptions, POOL_FORMAT_VERSION, POOL_MAGIC, Superblock,
};
use crate::device::Device;
use crate::error::{PoolError, Result};
use crate::index::Geometry;
use crate::meta::{
    self, COUNTERS, LOG_DAMAGE, Meta, NAMES, SEGMENTS, SNAPSHOTS, SegRec, SnapshotRec, VOLUMES,
    VolumeRec,
};
use crate::object::Keys;
use crate::overlay::Overlay;
use crate::ramtier::{AutoRamTier, RamTierStats};
use crate::refs::{self, RefDelta};
use crate::shared::Shared;
use crate::types::{BLOCK, Digest, SnapshotId, Tier, VolumeId};
use crate::wal::{EntryKind, Wal, WalOptions};

/// Public description of a volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub created_unix: i64,
    /// The snapshot this volume was cloned from, if any.
    pub origin_snapshot: Option<SnapshotId>,
}

/// Public description of a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub volume_id: VolumeId,
    pub volume_name: String,
    pub size: u64,
    pub block_size: u32,
    pub created_unix: i64,
    pub locked_until_unix: Option<i64>,
    /// The caller's name of an imported snapshot ([`crate::import::ImportSpec::origin`]).
    #[serde(default)]
    pub origin: Option<String>,
}

impl From<&SnapshotRec> for SnapshotInfo {
    fn from(r: &SnapshotRec) -> Self {
        SnapshotInfo {
            id: SnapshotId(r.id),
            volume_id: VolumeId(r.volume_id),
            volume_name: r.volume_name.clone(),
            size: r.size,
            block_size: r.block_size,
            created_unix: r.created_unix,
            locked_until_unix: r.locked_until_unix,
            origin: r.origin.clone(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct VolOverlay {
    pub active: Overlay,
    pub frozen: Option<Arc<Overlay>>,
    pub base_root: Option<Digest>,
    /// Blocks of the base whose data is known lost (block -> LSN of the batch that lost it):
    /// a fold sealed a placeholder for them. Below the overlays, above the base index.
    pub base_damaged: BTreeMap<u64, u64>,
    pub size: u64,
    pub deleted: bool,
}

#[derive(Debug)]
pub(crate) struct VolumeState {
    pub id: u64,
    pub block_size: u32,
    pub created_unix: i64,
    pub origin_snapshot: Option<u64>,
    pub name: RwLock<String>,
    pub ov: RwLock<VolOverlay>,
    pub seal_lock: Mutex<()>,
    pub folded_lsn: AtomicU64,
}

impl VolumeState {
    fn from_rec(r: &VolumeRec) -> Self {
        VolumeState {
            id: r.id,
            block_size: r.block_size,
            created_unix: r.created_unix,
            origin_snapshot: r.origin_snapshot,
            name: RwLock::new(r.name.clone()),
            ov: RwLock::new(VolOverlay {
                active: Overlay::default(),
                frozen: None,
                base_root: r.base_root,
                base_damaged: BTreeMap::new(),
                size: r.size,
                deleted: false,
            }),
            seal_lock: Mutex::new(()),
            folded_lsn: AtomicU64::new(r.folded_lsn),
        }
    }

    pub fn info(&self) -> VolumeInfo {
        VolumeInfo {
            id: VolumeId(self.id),
            name: self.name.read().clone(),
            size: self.ov.read().size,
            block_size: self.block_size,
            created_unix: self.created_unix,
            origin_snapshot: self.origin_snapshot.map(SnapshotId),
        }
    }
}

#[derive(Debug)]
pub(crate) struct PoolInner {
    pub dir: PathBuf,
    pub sb: Superblock,
    pub opts: OpenOptions,
    pub shared: Arc<Shared>,
    pub wal: Arc<Wal>,
    pub geo: Geometry,
    pub volumes: RwLock<HashMap<u64, Arc<VolumeState>>>,
    /// Serialises catalog-shaped changes (create, rename, delete) so names stay unique.
    pub admin: Mutex<()>,
    pub cpu: rayon::ThreadPool,
    pub closed: AtomicBool,
    pub bg_wake: (Mutex<bool>, Condvar),
    pub threads: Mutex<Vec<JoinHandle<()>>>,
    pub ram: RamTierState,
}

/// A storage pool. Cheap to clone; all clones share one open pool.
#[derive(Clone, Debug)]
pub struct Pool {
    pub(crate) inner: Arc<PoolInner>,
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn fs_available(dir: &Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs fills a plain struct; c is a valid NUL-terminated path.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) == 0 {
            s.f_bavail as u64 * s.f_frsize as u64
        } else {
            0
        }
    }
}

impl Pool {
    /// Creates a new pool in `dir` (created if missing; must not already hold a pool).
    pub fn create(dir: &Path, create: CreateOptions, opts: OpenOptions) -> Result<Pool> {
        let cs = create.chunk_size;
        if !cs.is_power_of_two() || !(64 << 10..=4 << 20).contains(&cs) {
            return Err(PoolError::InvalidArgument(format!(
                "chunk size {cs} must be a power of two from 64 KiB to 4 MiB"
            )));
        }
        crate::fsmode::private_dir(dir).map_err(|e| PoolError::io(dir.display().to_string(), e))?;
        crate::powerloss::start_from_env(dir);
        if dir.join(crate::config::SUPERBLOCK_FILE).exists() {
            return Err(PoolError::PoolExists {
                path: dir.display().to_string(),
            });
        }
        let mut devices = create.devices.clone();
        if devices.is_empty() {
            let avail = fs_available(dir) / (1 << 20) * (1 << 20);
            devices.push(DeviceSpec {
                path: "data-0.dev".into(),
                tier: Tier::Ssd,
                size: avail.max(64 << 20),
            });
        }
        let pool_id = uuid::Uuid::new_v4();
        let mut secret = [0u8; 32];
        rand::Rng::fill(&mut rand::thread_rng(), &mut secret[..]);
        let sb = Superblock {
            magic: POOL_MAGIC.into(),
            format_version: POOL_FORMAT_VERSION,
            pool_id,
            secret: secret.iter().map(|b| format!("{b:02x}")).collect(),
            chunk_size: cs,
            zstd_level: create.zstd_level,
            devices,
            created_unix: now_unix(),
        };
        for (i, spec) in sb.devices.iter().enumerate() {
            Device::create(
                &sb.device_path(dir, i),
                i as u16,
                spec.tier,
                spec.size,
                *pool_id.as_bytes(),
            )?;
        }
        let meta_path = dir.join(META_FILE);
        if meta_path.exists() {
            std::fs::remove_file(&meta_path)
                .map_err(|e| PoolError::io(meta_path.display().to_string(), e))?;
        }
        drop(Meta::create(&meta_path)?);
        // The superblock goes last: a pool without one was never completely created.
        sb.store(dir)?;
        tracing::info!(dir = %dir.display(), pool_id = %pool_id, chunk_size = cs, "pool created");
        Pool::open(dir, opts)
    }

    /// Opens an existing pool, replays its WAL and starts its background threads.
    pub fn open(dir: &Path, opts: OpenOptions) -> Result<Pool> {
        crate::powerloss::start_from_env(dir);
        let (opts, ram) = RamTierState::resolve(opts);
        let sb = Superblock::load(dir)?;
        let secret = sb.secret_bytes()?;
        let mut devices = Vec::new();
        for i in 0..sb.devices.len() {
            devices.push(Device::open(
                &sb.device_path(dir, i),
                i as u16,
                *sb.pool_id.as_bytes(),
            )?);
        }
        let meta = Meta::open(&dir.join(META_FILE))?;
        let mut alloc = Allocator::new(
            &devices
                .iter()
                .map(|d| (d.index, d.tier, d.size))
                .collect::<Vec<_>>(),
        );
        let mut dead = std::collections::HashSet::new();
        for (d, rec) in meta.objects()? {
            if !alloc.mark_used(rec.extent) {
                return Err(PoolError::corrupt(
                    format!("object {d}"),
                    "extent overlaps other data or lies off-device",
                ));
            }
            if rec.refcount == 0 {
                dead.insert(d);
            }
        }
        let segs = meta.segments()?;
        for (seq, s) in &segs {
            if !alloc.mark_used(s.extent) {
                return Err(PoolError::corrupt(
                    format!("WAL segment {seq}"),
                    "extent overlaps other data",
                ));
            }
        }
        // The WAL cycles through about its fold threshold of space: that much of its freed
        // segments stays warm for the next ones.
        alloc.set_warm_limit(opts.wal_fold_threshold);
        let slots: Vec<std::sync::OnceLock<Device>> = (0..crate::shared::MAX_DEVICES)
            .map(|_| std::sync::OnceLock::new())
            .collect();
        for d in devices {
            let i = d.index as usize;
            if i >= slots.len() || slots[i].set(d).is_err() {
                return Err(PoolError::corrupt(
                    "pool superblock",
                    "device slots out of range or repeated",
                ));
            }
        }
        let shared = Arc::new(Shared {
            devices: slots,
            meta,
            alloc: Mutex::new(alloc),
            keys: Keys::derive(&secret),
            chunk_size: sb.chunk_size,
            zstd_level: sb.zstd_level,
            chunk_cache: ShardedLru::new(opts.cache_bytes),
            table_cache: ShardedLru::new(crate::shared::TABLE_CACHE_BYTES),
            node_cache: ShardedLru::new(64 << 20),
            pin: Arc::new(RwLock::new(())),
            pending_free: Mutex::new(Vec::new()),
            pending_free_log: Mutex::new(Vec::new()),
            dead: Mutex::new(dead),
            chunk_cache_disabled: opts.cache_bytes == 0,
            log_sums: RwLock::new(BTreeMap::new()),
            retired_log_sums: Mutex::new(Vec::new()),
            sealed_bytes_read: std::sync::atomic::AtomicU64::new(0),
            async_reads: Default::default(),
            remotes: Default::default(),
        });
        let geo = Geometry {
            chunk_size: sb.chunk_size,
        };
        let chunk_blocks = sb.chunk_size / BLOCK;
        let mut volumes: HashMap<u64, Arc<VolumeState>> = HashMap::new();
        for r in shared.meta.volumes()? {
            volumes.insert(r.id, Arc::new(VolumeState::from_rec(&r)));
        }
        for (vol, blocks) in shared.meta.damaged_blocks()? {
            if let Some(v) = volumes.get(&vol) {
                v.ov.write().base_damaged.extend(blocks);
            }
        }
        // What replay overwrites needs no accounting: the live counts are taken afterwards.
        let mut released = Vec::new();
        let recorded_durable = shared.meta.counter(DURABLE_LSN_COUNTER)?;
        let mut applied_damage: HashSet<(u64, u64)> = HashSet::new();
        let mut replayed =
            crate::replay::replay(&shared, &segs, recorded_durable, |e, lsn, loc, bad| {
                let Some(v) = volumes.get(&e.vol) else { return };
                if lsn <= v.folded_lsn.load(Ordering::Relaxed) {
                    return;
                }
                let mut ov = v.ov.write();
                match (e.kind, loc) {
                    (EntryKind::Data, Some(l)) => {
                        ov.active
                            .set_data(e.block, e.nblocks as u64, l, &mut released);
                        for &i in bad {
                            ov.active.set_damaged(e.block + i, 1, lsn, &mut released);
                            applied_damage.insert((e.vol, e.block + i));
                        }
                    }
                    _ => ov
                        .active
                        .set_zero(e.block, e.nblocks as u64, chunk_blocks, &mut released),
                }
                released.clear();
            })?;
        for v in volumes.values() {
            replayed.count_live(v.ov.read().active.data_locs());
        }
        // Everything replay read is made durable before the log claims it is (the next batch
        // headers say so).
        shared.sync_all()?;
        replayed.durable_lsn = replayed
            .durable_lsn
            .max(replayed.next_lsn.saturating_sub(1));
        record_replay(dir, &shared, &mut replayed, &applied_damage)?;
        let recorded_durable = replayed.durable_lsn;
        let dirty: usize = volumes
            .values()
            .map(|v| v.ov.read().active.blocks.len())
            .sum();
        tracing::info!(
            dir = %dir.display(),
            volumes = volumes.len(),
            wal_segments = segs.len(),
            wal_batches = replayed.batches,
            live_blocks = dirty,
            "pool opened; WAL replayed"
        );
        let max_folded = volumes
            .values()
            .map(|v| v.folded_lsn.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        // New batches take LSNs no earlier run handed out: above every folded LSN, every LSN
        // a segment record still names, and the recorded durable LSN — which covers the
        // batches of segments already freed (freeing records it). Replay's own end can be
        // lower (the newest batches torn, the segments that held later ones freed); reusing
        // an LSN at or below the durable one would make its batch, if torn by the next crash,
        // look like damage.
        let used_lsns = segs
            .iter()
            .map(|(_, r)| r.end_lsn.unwrap_or(0).max(r.first_lsn))
            .max()
            .unwrap_or(0)
            .max(replayed.durable_lsn + 1)
            .max(max_folded + 1);
        let wal = Arc::new(Wal::new(
            shared.clone(),
            WalOptions {
                segment_bytes: opts.wal_segment_bytes,
                cache_bytes: opts.log_cache_bytes,
                write_buffer_bytes: opts.write_buffer_bytes,
                write_back_delay: opts.write_back_delay,
            },
            replayed,
        ));
        wal.raise_next_lsn(used_lsns);
        let cpu = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("maas-pool-cpu-{i}"))
            .start_handler(|_| lower_thread_priority())
            .build()
            .map_err(|e| PoolError::InvalidArgument(format!("cpu pool: {e}")))?;
        let inner = Arc::new(PoolInner {
            dir: dir.to_path_buf(),
            sb,
            opts,
            shared,
            wal,
            geo,
            volumes: RwLock::new(volumes),
            admin: Mutex::new(()),
            cpu,
            closed: AtomicBool::new(false),
            bg_wake: (Mutex::new(false), Condvar::new()),
            threads: Mutex::new(Vec::new()),
            ram,
        });
        let w = inner.wal.clone();
        let flusher = std::thread::Builder::new()
            .name("maas-wal-flusher".into())
            .spawn(move || w.run_flusher())
            .map_err(|e| PoolError::io("spawn WAL flusher", e))?;
        inner.threads.lock().push(flusher);
        let (w, sh) = (inner.wal.clone(), inner.shared.clone());
        let recorder = std::thread::Builder::new()
            .name("maas-wal-durable".into())
            .spawn(move || record_durable_loop(&w, &sh, recorded_durable))
            .map_err(|e| PoolError::io("spawn WAL durable-LSN recorder", e))?;
        inner.threads.lock().push(recorder);
        inner.gc_log()?;
        if inner.opts.background {
            let weak = Arc::downgrade(&inner);
            let bg = std::thread::Builder::new()
                .name("maas-pool-maint".into())
                .spawn(move || maintenance_loop(weak))
                .map_err(|e| PoolError::io("spawn pool maintenance", e))?;
            inner.threads.lock().push(bg);
        }
        if inner.ram.auto.is_some() {
            let weak = Arc::downgrade(&inner);
            let w = std::thread::Builder::new()
                .name("maas-ram-watch".into())
                .spawn(move || ram_watch_loop(weak))
                .map_err(|e| PoolError::io("spawn RAM tier watcher", e))?;
            inner.threads.lock().push(w);
        }
        Ok(Pool { inner })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn pool_id(&self) -> uuid::Uuid {
        self.inner.sb.pool_id
    }

    pub fn chunk_size(&self) -> u64 {
        self.inner.sb.chunk_size
    }

    pub fn devices(&self) -> Vec<(u16, PathBuf, Tier, u64)> {
        self.inner
            .shared
            .all_devices()
            .map(|d| (d.index, d.path.clone(), d.tier, d.size))
            .collect()
    }

    /// Adds a device (file or block device) to the open pool; its space is usable at once.
    /// A relative path is placed in the pool directory.
    pub fn add_device(&self, spec: DeviceSpec) -> Result<(u16, PathBuf, Tier, u64)> {
        self.inner.check_open()?;
        let _a = self.inner.admin.lock();
        let shared = &self.inner.shared;
        let index = shared.all_devices().count();
        if index >= crate::shared::MAX_DEVICES {
            return Err(PoolError::InvalidArgument(format!(
                "a pool has at most {} devices",
                crate::shared::MAX_DEVICES
            )));
        }
        let mut sb = Superblock::load(&self.inner.dir)?;
        if sb
            .devices
            .iter()
            .enumerate()
            .any(|(i, _)| sb.device_path(&self.inner.dir, i) == self.inner.dir.join(&spec.path))
        {
            return Err(PoolError::InvalidArgument(format!(
                "{} is already a device of this pool",
                spec.path.display()
            )));
        }
        let path = if spec.path.is_absolute() {
            spec.path.clone()
        } else {
            self.inner.dir.join(&spec.path)
        };
        let is_block = std::fs::metadata(&path)
            .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            .unwrap_or(false);
        if path.exists() && !is_block {
            return Err(PoolError::InvalidArgument(format!(
                "{} exists and is not a block device",
                path.display()
            )));
        }
        if !path.exists() && !path.parent().is_some_and(|d| d.is_dir()) {
            return Err(PoolError::InvalidArgument(format!(
                "{}: no such block device, and no directory to create a file in",
                path.display()
            )));
        }
        let dev = Device::create(
            &path,
            index as u16,
            spec.tier,
            spec.size,
            *sb.pool_id.as_bytes(),
        )?;
        let info = (dev.index, dev.path.clone(), dev.tier, dev.size);
        sb.devices.push(DeviceSpec {
            size: dev.size,
            ..spec
        });
        // The superblock is the commit point: a crash before it leaves only an unused file.
        sb.store(&self.inner.dir)?;
        shared
            .alloc
            .lock()
            .add_device(dev.index, dev.tier, dev.size);
        let _ = shared.devices[index].set(dev);
        tracing::info!(device = index, path = %info.1.display(), tier = ?info.2, size = info.3, "device added to pool");
        Ok(info)
    }

    /// Largest volume this pool's index geometry supports.
    pub fn max_volume_size(&self) -> u64 {
        self.inner.geo.max_volume_size()
    }

    /// Flushes everything and stops the pool's threads. Also done on drop of the last clone.
    pub fn close(&self) -> Result<()> {
        self.inner.close()
    }

    /// Stops the pool as a SIGKILL would, for crash tests: writes still in the write buffer are
    /// lost, nothing is flushed, synced or recorded; what was already written stays where the
    /// kernel has it. The pool can then be opened again (its replay is what is tested).
    #[doc(hidden)]
    pub fn kill(self) {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        inner.wal.abandon();
        {
            let (m, c) = &inner.bg_wake;
            *m.lock() = true;
            c.notify_all();
        }
        let threads: Vec<JoinHandle<()>> = inner.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }

    // ---- volumes ----

    pub fn create_volume(&self, name: &str, size: u64, block_size: u32) -> Result<VolumeInfo> {
        self.inner.check_open()?;
        validate_name(name)?;
        if block_size != 512 && block_size != 4096 {
            return Err(PoolError::InvalidArgument(format!(
                "block size {block_size} must be 512 or 4096"
            )));
        }
        self.inner.validate_size(size)?;
        self.inner
            .new_volume(name, size, block_size, None, None, &[])
    }

    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let mut v: Vec<VolumeInfo> = self
            .inner
            .volumes
            .read()
            .values()
            .map(|v| v.info())
            .collect();
        v.sort_by_key(|v| v.id);
        v
    }

    pub fn volume(&self, id: VolumeId) -> Result<VolumeInfo> {
        Ok(self.inner.vol(id)?.info())
    }

    pub fn volume_by_name(&self, name: &str) -> Result<VolumeInfo> {
        self.inner
            .volumes
            .read()
            .values()
            .find(|v| *v.name.read() == name)
            .map(|v| v.info())
            .ok_or_else(|| PoolError::VolumeNameNotFound(name.to_string()))
    }

    /// Grows a volume; shrinking is refused (it would silently destroy data).
    pub fn resize_volume(&self, id: VolumeId, new_size: u64) -> Result<VolumeInfo> {
        self.inner.check_open()?;
        let v = self.inner.vol(id)?;
        self.inner.validate_size(new_size)?;
        let _a = self.inner.admin.lock();
        let mut ov = v.ov.write();
        if ov.deleted {
            return Err(PoolError::VolumeDeleted(id));
        }
        if new_size < ov.size {
            return Err(PoolError::ShrinkRefused {
                current: ov.size,
                asked: new_size,
            });
        }
        if new_size == ov.size {
            drop(ov);
            return Ok(v.info());
        }
        self.inner.update_volume_rec(id.0, |r| r.size = new_size)?;
        ov.size = new_size;
        drop(ov);
        tracing::info!(volume = %id, size = new_size, "volume grown");
        Ok(v.info())
    }

    pub fn rename_volume(&self, id: VolumeId, new_name: &str) -> Result<VolumeInfo> {
        self.inner.check_open()?;
        validate_name(new_name)?;
        let v = self.inner.vol(id)?;
        let _a = self.inner.admin.lock();
        let old = v.name.read().clone();
        if old == new_name {
            return Ok(v.info());
        }
        let tx = self.inner.shared.meta.begin_write()?;
        {
            let mut names = tx.open_table(NAMES)?;
            if names.get(new_name)?.is_some() {
                return Err(PoolError::VolumeExists(new_name.to_string()));
            }
            names.remove(old.as_str())?;
            names.insert(new_name, id.0)?;
        }
        self.inner
            .update_volume_rec_in(&tx, id.0, |r| r.name = new_name.to_string())?;
        tx.commit()?;
        *v.name.write() = new_name.to_string();
        Ok(v.info())
    }

    /// Deletes a live volume and reclaims its space. Its snapshots stay: they are backups with
    /// their own retention and locks, and outlive the disk they were taken from.
    pub fn delete_volume(&self, id: VolumeId) -> Result<()> {
        self.inner.check_open()?;
        let v = self.inner.vol(id)?;
        let _seal = v.seal_lock.lock();
        let _a = self.inner.admin.lock();
        let base = {
            let mut ov = v.ov.write();
            if ov.deleted {
                return Err(PoolError::VolumeDeleted(id));
            }
            ov.deleted = true;
            ov.active.clear();
            ov.frozen = None;
            ov.base_root
        };
        let res = (|| -> Result<Vec<Digest>> {
            let tx = self.inner.shared.meta.begin_write()?;
            tx.open_table(VOLUMES)?.remove(id.0)?;
            tx.open_table(NAMES)?.remove(v.name.read().as_str())?;
            {
                let mut t = tx.open_table(meta::DAMAGED)?;
                let blocks: Vec<u64> = v.ov.read().base_damaged.keys().copied().collect();
                for b in blocks {
                    t.remove((id.0, b))?;
                }
            }
            let mut delta = RefDelta::default();
            if let Some(r) = base {
                delta.add(r, -1);
            }
            let zeroed = refs::apply(&self.inner.shared, &tx, delta)?;
            tx.commit()?;
            Ok(zeroed)
        })();
        match res {
            Ok(zeroed) => {
                self.inner.volumes.write().remove(&id.0);
                self.inner.shared.dead.lock().extend(zeroed);
                tracing::info!(volume = %id, "volume deleted");
                self.inner.gc_log()?;
                self.inner.shared.reclaim()?;
                Ok(())
            }
            Err(e) => {
                v.ov.write().deleted = false;
                Err(e)
            }
        }
    }

    /// A handle for block I/O on a volume.
    pub fn open_volume(&self, id: VolumeId) -> Result<crate::Volume> {
        let v = self.inner.vol(id)?;
        if v.ov.read().deleted {
            return Err(PoolError::VolumeDeleted(id));
        }
        Ok(crate::Volume {
            pool: self.inner.clone(),
            vol: v,
        })
    }

    /// Makes every write acknowledged so far durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.check_open()?;
        self.inner.wal.flush()
    }

    // ---- snapshots and clones ----

    /// Seals a snapshot of a volume: a complete, read-only point-in-time image containing every
    /// write acknowledged before this call. I/O to the volume continues meanwhile.
    pub fn seal(&self, id: VolumeId) -> Result<SnapshotInfo> {
        self.seal_with_progress(id, &|_| {})
    }

    /// [`Pool::seal`], reporting progress (0..1) as dirty chunks are sealed.
    pub fn seal_with_progress(
        &self,
        id: VolumeId,
        progress: &(dyn Fn(f64) + Sync),
    ) -> Result<SnapshotInfo> {
        self.inner.check_open()?;
        let v = self.inner.vol(id)?;
        let snap = self.inner.fold(&v, true, Some(progress))?;
        snap.ok_or_else(|| PoolError::Meta("seal produced no snapshot".into()))
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut s: Vec<SnapshotInfo> = self
            .inner
            .shared
            .meta
            .snapshots()?
            .iter()
            .map(SnapshotInfo::from)
            .collect();
        s.sort_by_key(|s| s.id);
        Ok(s)
    }

    pub fn snapshot(&self, id: SnapshotId) -> Result<SnapshotInfo> {
        Ok(SnapshotInfo::from(&self.inner.snapshot_rec(id)?))
    }

    /// Locks a snapshot against deletion until `until_unix`; a lock can be extended, never
    /// shortened or removed.
    pub fn lock_snapshot(&self, id: SnapshotId, until_unix: i64) -> Result<SnapshotInfo> {
        self.inner.check_open()?;
        let _a = self.inner.admin.lock();
        let tx = self.inner.shared.meta.begin_write()?;
        let rec = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            let mut rec: SnapshotRec = match t.get(id.0)? {
                Some(v) => meta::from_json(v.value(), "snapshot record")?,
                None => return Err(PoolError::SnapshotNotFound(id)),
            };
            if let Some(cur) = rec.locked_until_unix
                && until_unix < cur
            {
                return Err(PoolError::LockShortened {
                    id,
                    current_unix: cur,
                    asked_unix: until_unix,
                });
            }
            rec.locked_until_unix = Some(until_unix);
            t.insert(id.0, meta::to_json(&rec)?.as_slice())?;
            rec
        };
        tx.commit()?;
        Ok(SnapshotInfo::from(&rec))
    }

    /// Deletes a snapshot and reclaims the space only it used. Refused while it is locked.
    pub fn delete_snapshot(&self, id: SnapshotId) -> Result<()> {
        self.inner.check_open()?;
        let _a = self.inner.admin.lock();
        let tx = self.inner.shared.meta.begin_write()?;
        let rec: SnapshotRec = {
            let t = tx.open_table(SNAPSHOTS)?;
            match t.get(id.0)? {
                Some(v) => meta::from_json(v.value(), "snapshot record")?,
                None => return Err(PoolError::SnapshotNotFound(id)),
            }
        };
        if let Some(until) = rec.locked_until_unix
            && until > now_unix()
        {
            return Err(PoolError::SnapshotLocked {
                id,
                until_unix: until,
            });
        }
        tx.open_table(SNAPSHOTS)?.remove(id.0)?;
        let mut delta = RefDelta::default();
        if let Some(r) = rec.root {
            delta.add(r, -1);
        }
        let zeroed = refs::apply(&self.inner.shared, &tx, delta)?;
        tx.commit()?;
        self.inner.shared.dead.lock().extend(zeroed);
        tracing::info!(snapshot = %id, "snapshot deleted");
        self.inner.shared.reclaim()?;
        Ok(())
    }

    /// Creates a writable volume whose contents are the snapshot's: O(1) whatever its size.
    /// Writes to the clone never change the snapshot.
    pub fn clone_snapshot(&self, id: SnapshotId, name: &str) -> Result<VolumeInfo> {
        self.inner.check_open()?;
        validate_name(name)?;
        let rec = self.inner.snapshot_rec(id)?;
        self.inner.new_volume(
            name,
            rec.size,
            rec.block_size,
            rec.root,
            Some(id.0),
            &rec.damaged,
        )
    }

    /// Reclaims space now (normally done in the background).
    pub fn reclaim(&self) -> Result<bool> {
        self.inner.gc_log()?;
        self.inner.shared.reclaim()
    }

    /// Folds every volume's live data into sealed chunks without creating snapshots (what the
    /// background thread does when the WAL grows); frees WAL space.
    pub fn checkpoint(&self) -> Result<()> {
        self.inner.check_open()?;
        let vols: Vec<Arc<VolumeState>> = self.inner.volumes.read().values().cloned().collect();
        for v in vols {
            match self.inner.fold(&v, false, None) {
                Ok(_) | Err(PoolError::VolumeDeleted(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.inner.gc_log()?;
        self.inner.shared.reclaim()?;
        Ok(())
    }
}

pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(PoolError::InvalidArgument(format!(
            "name {name:?}: 1-128 characters of letters, digits, '-', '_', '.', ':'"
        )))
    }
}

impl PoolInner {
    /// Space backpressure for writers: while the log is too large for what is free (see
    /// [`PoolInner::log_space_low`]) and holds space a fold gives back, wake the maintenance thread and wait for it
    /// (bounded by [`LOG_SPACE_WAIT`]; after that, or when folding cannot help, the write goes
    /// ahead and fails cleanly if the pool is really full). Sustained overwrites of a live
    /// volume thus slow down to the speed of folding instead of failing.
    /// Whether writers should wait for space (see [`PoolInner::wait_for_log_space`]).
    /// The log may hold at most as much as is free besides it, so that a fold of everything it
    /// holds always has room for the chunks it writes; and a few segments stay free.
    pub(crate) fn log_space_low(&self) -> bool {
        let free = self.shared.alloc.lock().free_bytes();
        free < 4 * self.opts.wal_segment_bytes || free < self.wal.segment_bytes()
    }

    pub(crate) fn wait_for_log_space(&self) {
        let deadline = std::time::Instant::now() + LOG_SPACE_WAIT;
        let mut waited = false;
        loop {
            if !self.log_space_low() {
                break;
            }
            let (_, segments) = self.wal.usage();
            if !self.opts.background
                || segments <= 2
                || std::time::Instant::now() >= deadline
                || self.check_open().is_err()
            {
                break;
            }
            if !waited {
                tracing::info!(
                    "pool nearly full: writes wait while live data is folded into chunks"
                );
                waited = true;
            }
            self.bg_wake.1.notify_all();
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            Err(PoolError::Closed)
        } else {
            Ok(())
        }
    }

    pub fn snapshot_rec(&self, id: SnapshotId) -> Result<SnapshotRec> {
        self.shared
            .meta
            .snapshot(id.0)?
            .ok_or(PoolError::SnapshotNotFound(id))
    }

    pub fn vol(&self, id: VolumeId) -> Result<Arc<VolumeState>> {
        self.volumes
            .read()
            .get(&id.0)
            .cloned()
            .ok_or(PoolError::VolumeNotFound(id))
    }

    fn validate_size(&self, size: u64) -> Result<()> {
        if size == 0 || size % BLOCK != 0 {
            return Err(PoolError::InvalidArgument(format!(
                "size {size} must be a positive multiple of 4096"
            )));
        }
        if size > self.geo.max_volume_size() {
            return Err(PoolError::InvalidArgument(format!(
                "size {size} exceeds the largest volume of this pool ({} bytes)",
                self.geo.max_volume_size()
            )));
        }
        Ok(())
    }

    fn new_volume(
        &self,
        name: &str,
        size: u64,
        block_size: u32,
        base_root: Option<Digest>,
        origin: Option<u64>,
        damaged: &[(u64, u64)],
    ) -> Result<VolumeInfo> {
        let _a = self.admin.lock();
        // Pin so the base root cannot be swept between reading the snapshot and referencing it.
        let _pin = self.shared.pin.read();
        let tx = self.shared.meta.begin_write()?;
        if tx.open_table(NAMES)?.get(name)?.is_some() {
            return Err(PoolError::VolumeExists(name.to_string()));
        }
        let id = meta::bump(&tx, "next_volume_id")?;
        let rec = VolumeRec {
            version: 1,
            id,
            name: name.to_string(),
            size,
            block_size,
            base_root,
            folded_lsn: self.wal.cut(),
            created_unix: now_unix(),
            origin_snapshot: origin,
        };
        tx.open_table(VOLUMES)?
            .insert(id, meta::to_json(&rec)?.as_slice())?;
        tx.open_table(NAMES)?.insert(name, id)?;
        let mut delta = RefDelta::default();
        if let Some(r) = base_root {
            delta.add(r, 1);
        }
        refs::apply(&self.shared, &tx, delta)?;
        {
            // A clone inherits the blocks its snapshot had already lost.
            let mut t = tx.open_table(meta::DAMAGED)?;
            for (b, lsn) in damaged {
                t.insert((id, *b), *lsn)?;
            }
        }
        tx.commit()?;
        let st = Arc::new(VolumeState::from_rec(&rec));
        st.ov.write().base_damaged.extend(damaged.iter().copied());
        let info = st.info();
        self.volumes.write().insert(id, st);
        tracing::info!(volume = %info.id, name, size, origin = ?origin, "volume created");
        Ok(info)
    }

    pub fn update_volume_rec_in(
        &self,
        tx: &redb::WriteTransaction,
        id: u64,
        f: impl FnOnce(&mut VolumeRec),
    ) -> Result<()> {
        let mut t = tx.open_table(VOLUMES)?;
        let mut rec: VolumeRec = match t.get(id)? {
            Some(v) => meta::from_json(v.value(), "volume record")?,
            None => return Err(PoolError::VolumeNotFound(VolumeId(id))),
        };
        f(&mut rec);
        t.insert(id, meta::to_json(&rec)?.as_slice())?;
        Ok(())
    }

    fn update_volume_rec(&self, id: u64, f: impl FnOnce(&mut VolumeRec)) -> Result<()> {
        let tx = self.shared.meta.begin_write()?;
        self.update_volume_rec_in(&tx, id, f)?;
        tx.commit()?;
        Ok(())
    }

    pub fn folded_map(&self) -> HashMap<u64, u64> {
        self.volumes
            .read()
            .values()
            .map(|v| (v.id, v.folded_lsn.load(Ordering::SeqCst)))
            .collect()
    }

    /// Frees WAL segments no volume needs any more.
    pub fn gc_log(&self) -> Result<()> {
        let dead = self.wal.take_dead_segments(&self.folded_map());
        if dead.is_empty() {
            return Ok(());
        }
        let tx = self.shared.meta.begin_write()?;
        {
            let mut t = tx.open_table(SEGMENTS)?;
            for (seq, _) in &dead {
                t.remove(*seq)?;
            }
        }
        // Durable-LSN claims of the freed segments' headers go with them: keep the proof.
        raise_durable_in(&tx, self.wal.synced_lsn())?;
        tx.commit()?;
        tracing::debug!(segments = dead.len(), "freed WAL segments");
        self.shared
            .pending_free_log
            .lock()
            .extend(dead.iter().map(|(_, r)| r.extent));
        Ok(())
    }

    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let res = self.wal.flush();
        if res.is_ok() {
            // A clean stop: everything appended is durable; say so for the next replay.
            if let Err(e) = record_durable(&self.shared, self.wal.synced_lsn()) {
                tracing::warn!(error = %e, "could not record the WAL's durable LSN at close");
            }
        }
        self.wal.shutdown();
        {
            let (m, c) = &self.bg_wake;
            *m.lock() = true;
            c.notify_all();
        }
        let threads: Vec<JoinHandle<()>> = self.threads.lock().drain(..).collect();
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        self.shared.sync_all()?;
        tracing::info!(dir = %self.dir.display(), "pool closed");
        res
    }

    /// One round of background work: fold volumes pinning old WAL segments when the WAL is
    /// large, free dead segments, sweep unreferenced objects.
    fn maintain(&self) -> Result<()> {
        if self.wal.sync_would_clean() {
            // An fdatasync frees log space that a fold would otherwise have to work for.
            self.wal.sync_written()?;
            self.gc_log()?;
        }
        let (bytes, _) = self.wal.usage();
        // Fold at the configured size, and early enough that the fold always has room for the
        // chunks it writes: the log never takes more than half of what is free. Segments the
        // cleaner is about to free (every block overwritten; the overwrites wait in the write
        // buffer or for a sync) do not count towards the size: folding for them would hash and
        // compress a volume's worth of data that is dead anyway. They still count against the
        // free space, and they go within `write_back_delay` and a sync, so the log stays
        // bounded by the threshold plus what the write buffer holds.
        let live_log = bytes.saturating_sub(self.wal.awaiting_cleaner_bytes());
        let free = self.shared.alloc.lock().free_bytes();
        if live_log > self.opts.wal_fold_threshold || bytes > free / 2 {
            for vid in self.wal.oldest_pinning_volumes(&self.folded_map()) {
                let Ok(v) = self.vol(VolumeId(vid)) else {
                    continue;
                };
                match self.fold(&v, false, None) {
                    Ok(_) | Err(PoolError::VolumeDeleted(_)) => {}
                    Err(e) => {
                        tracing::warn!(volume = vid, error = %e, "background fold failed; will retry")
                    }
                }
            }
        }
        self.gc_log()?;
        self.shared.reclaim()?;
        Ok(())
    }
}

/// The metadata store's record of the WAL's durable LSN (see [`crate::walfmt`]).
pub(crate) const DURABLE_LSN_COUNTER: &str = "wal_durable_lsn";

/// Records the durable LSN in the metadata store once the log is idle after a sync, so that
/// replay knows the last flushed batches were durable even when no later batch header says so.
fn record_durable_loop(wal: &Wal, shared: &Shared, mut recorded: u64) {
    while let Some(durable) = wal.wait_durable_to_record(recorded) {
        match record_durable(shared, durable) {
            Ok(()) => recorded = durable,
            Err(e) => {
                tracing::warn!(error = %e, "could not record the WAL's durable LSN; retrying");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// Raises the metadata store's record of the WAL's durable LSN to `durable` in `tx` (never
/// lowers it); whether it changed.
fn raise_durable_in(tx: &redb::WriteTransaction, durable: u64) -> Result<bool> {
    let mut c = tx.open_table(COUNTERS)?;
    let cur = c.get(DURABLE_LSN_COUNTER)?.map(|v| v.value()).unwrap_or(0);
    if durable <= cur {
        return Ok(false);
    }
    c.insert(DURABLE_LSN_COUNTER, durable)?;
    Ok(true)
}

/// Raises the metadata store's record of the WAL's durable LSN to `durable`.
fn record_durable(shared: &Shared, durable: u64) -> Result<()> {
    let tx = shared.meta.begin_write()?;
    if raise_durable_in(&tx, durable)? {
        tx.commit()?;
    }
    Ok(())
}

/// Persists what replay found: where each old segment's chain ends, the durable LSN, and the
/// damage (a record per damaged batch, with a copy of its bytes under `evidence/`), then logs
/// a summary an operator can act on. Damaged blocks of batches already folded are not lost
/// (the fold read them before they rotted) and are dropped from the report.
fn record_replay(
    dir: &Path,
    shared: &Shared,
    replayed: &mut crate::wal::Replayed,
    applied: &HashSet<(u64, u64)>,
) -> Result<()> {
    let now = now_unix();
    let mut recs = Vec::new();
    for d in &replayed.damage {
        let mut rec = d.rec.clone();
        rec.blocks.retain(|b| applied.contains(b));
        if !rec.unattributed && rec.blocks.is_empty() {
            tracing::warn!(
                segment = rec.segment,
                lsn = rec.lsn,
                "WAL replay: a damaged batch was already folded into chunks; nothing is lost"
            );
            continue;
        }
        let name = format!(
            "evidence/wal-seg{}-lsn{}-{}.bin",
            rec.segment, rec.lsn, rec.end_lsn
        );
        rec.evidence = match write_evidence(&dir.join(&name), &d.evidence) {
            Ok(()) => Some(name),
            Err(e) => {
                tracing::warn!(error = %e, "could not keep a copy of damaged log bytes");
                None
            }
        };
        rec.detected_unix = now;
        recs.push(rec);
    }
    let tx = shared.meta.begin_write()?;
    {
        let mut t = tx.open_table(SEGMENTS)?;
        for (seq, end) in &replayed.ends {
            if let Some(seg) = replayed.segments.iter().find(|s| s.seq == *seq) {
                let rec = SegRec {
                    end_lsn: Some(*end),
                    ..seg.rec
                };
                t.insert(*seq, rec.encode().as_slice())?;
            }
        }
        let mut t = tx.open_table(LOG_DAMAGE)?;
        for r in &recs {
            t.insert((r.segment, r.lsn), meta::to_json(r)?.as_slice())?;
        }
    }
    raise_durable_in(&tx, replayed.durable_lsn)?;
    tx.commit()?;
    for r in &recs {
        tracing::error!(
            segment = r.segment,
            lsn = r.lsn,
            blocks = r.blocks.len(),
            unattributed = r.unattributed,
            evidence = ?r.evidence,
            detail = %r.detail,
            "pool damage: acknowledged writes in the write-ahead log are lost; their blocks read \
             as medium errors until rewritten, and `verify` lists them"
        );
    }
    Ok(())
}

/// Writes a copy of damaged bytes, readable by the pool's owner only.
fn write_evidence(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    // The damage record names this file: its directory entry must be as durable as the record.
    match path.parent() {
        Some(parent) => std::fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

/// Hashing and compressing (folds, seals) is background work: its threads run at the lowest
/// scheduling priority, so front-end I/O never waits behind them for a CPU. They still get
/// every idle cycle, and all of them when writers wait for the space a fold frees.
fn lower_thread_priority() {
    // SAFETY: plain syscalls on the calling thread; setpriority with PRIO_PROCESS and a thread
    // id affects only that thread on Linux.
    let r = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19)
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the CPU pool's priority");
    }
}

/// Longest a write waits for folding to free space before it is tried anyway.
const LOG_SPACE_WAIT: Duration = Duration::from_secs(60);

fn maintenance_loop(weak: std::sync::Weak<PoolInner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = inner.maintain() {
            tracing::warn!(error = %e, "pool maintenance failed; will retry");
        }
        let (m, c) = &inner.bg_wake;
        let mut stop = m.lock();
        if *stop {
            return;
        }
        c.wait_for(&mut stop, Duration::from_millis(200));
        if *stop {
            return;
        }
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "closing pool failed");
        }
    }
}

/// The self-sizing RAM tier's state (see [`crate::ramtier`]).
#[derive(Debug, Default)]
pub(crate) struct RamTierState {
    /// None: every size is fixed (or the memory could not be read at open).
    pub auto: Option<AutoRamTier>,
    /// Total target of the auto parts, and its maximum on this machine.
    pub target: AtomicU64,
    pub max: AtomicU64,
    pub shrinks: AtomicU64,
    pub mem_total: AtomicU64,
    pub mem_available: AtomicU64,
    /// Whether the last change was a shrink (logs once per episode at info).
    pub shrinking: AtomicBool,
}

impl RamTierState {
    /// Sizes the auto parts of the RAM tier from the machine's memory now, rewriting their
    /// sizes in `opts`. Without a readable meminfo, the fixed sizes stand (logged).
    fn resolve(mut opts: OpenOptions) -> (OpenOptions, RamTierState) {
        let Some(auto) = opts.ram_tier.clone() else {
            return (opts, RamTierState::default());
        };
        if auto.meminfo_path.as_path() != std::path::Path::new(crate::ramtier::PROC_MEMINFO) {
            tracing::warn!(meminfo = %auto.meminfo_path.display(), pressure = %auto.pressure_path.display(),
                "RAM tier: reading memory figures from a test file, not the kernel's");
        }
        let m = match crate::ramtier::read_sample(&auto) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, cache_bytes = opts.cache_bytes, log_cache_bytes = opts.log_cache_bytes,
                    write_buffer_bytes = opts.write_buffer_bytes,
                    "RAM tier: cannot read the machine's memory figures; using the fixed sizes");
                return (opts, RamTierState::default());
            }
        };
        let p = &auto.policy;
        let total = p.initial(&m);
        let max = p.max_total(m.total);
        let t = p.split(total, &auto.parts);
        if auto.parts.chunk_cache {
            opts.cache_bytes = t.chunk_cache as usize;
        }
        if auto.parts.log_cache {
            opts.log_cache_bytes = t.log_cache as usize;
        }
        if auto.parts.write_buffer {
            opts.write_buffer_bytes = t.write_buffer as usize;
        }
        tracing::info!(
            target_bytes = total,
            max_bytes = max,
            mem_total = m.total,
            mem_available = m.available,
            psi_some_avg10 = m.psi_some_avg10.unwrap_or(0.0),
            cache_bytes = opts.cache_bytes,
            log_cache_bytes = opts.log_cache_bytes,
            write_buffer_bytes = opts.write_buffer_bytes,
            auto_chunk_cache = auto.parts.chunk_cache,
            auto_log_cache = auto.parts.log_cache,
            auto_write_buffer = auto.parts.write_buffer,
            "RAM tier sized automatically: up to {}% of memory ({} MiB), no more than is available \
             above {}% of it; gives memory back below {}% available",
            p.max_share_pct,
            max >> 20,
            p.high_water_pct,
            p.low_water_pct
        );
        let st = RamTierState {
            auto: Some(auto),
            target: AtomicU64::new(total),
            max: AtomicU64::new(max),
            shrinks: AtomicU64::new(0),
            mem_total: AtomicU64::new(m.total),
            mem_available: AtomicU64::new(m.available),
            shrinking: AtomicBool::new(false),
        };
        (opts, st)
    }
}

impl PoolInner {
    /// What the auto parts of the RAM tier hold now.
    fn ram_usage(&self, parts: &crate::ramtier::AutoParts) -> u64 {
        let (log, buf) = self.wal.ram_usage();
        let chunks = self.shared.chunk_cache.bytes();
        let on = |b: bool, v: usize| if b { v as u64 } else { 0 };
        on(parts.chunk_cache, chunks) + on(parts.log_cache, log) + on(parts.write_buffer, buf)
    }

    /// One look of the RAM tier's watcher: re-decides the target and applies it.
    fn ram_watch_once(&self, auto: &AutoRamTier) {
        let m = match crate::ramtier::read_sample(auto) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "RAM tier: cannot read memory figures; keeping the targets");
                return;
            }
        };
        self.ram.mem_total.store(m.total, Ordering::Relaxed);
        self.ram.mem_available.store(m.available, Ordering::Relaxed);
        let p = &auto.policy;
        self.ram.max.store(p.max_total(m.total), Ordering::Relaxed);
        let cur = self.ram.target.load(Ordering::Relaxed);
        let usage = self.ram_usage(&auto.parts);
        let next = p.decide(&m, cur, usage);
        if next == cur {
            return;
        }
        if next < cur {
            self.ram.shrinks.fetch_add(1, Ordering::Relaxed);
            let first = !self.ram.shrinking.swap(true, Ordering::Relaxed);
            let msg = "RAM tier: memory is short; giving memory back";
            let psi = m.psi_some_avg10.unwrap_or(0.0);
            // Under lasting pressure it shrinks every second: info once, then debug.
            if first {
                tracing::info!(
                    from = cur,
                    to = next,
                    held = usage,
                    mem_available = m.available,
                    mem_total = m.total,
                    psi_some_avg10 = psi,
                    "{msg}"
                );
            } else {
                tracing::debug!(
                    from = cur,
                    to = next,
                    held = usage,
                    mem_available = m.available,
                    mem_total = m.total,
                    psi_some_avg10 = psi,
                    "{msg}"
                );
            }
        } else {
            if self.ram.shrinking.swap(false, Ordering::Relaxed) {
                tracing::info!(
                    from = cur,
                    mem_available = m.available,
                    mem_total = m.total,
                    "RAM tier: memory is plentiful again; growing back gradually"
                );
            }
            tracing::debug!(from = cur, to = next, "RAM tier: growing back");
        }
        self.ram.target.store(next, Ordering::Relaxed);
        let t = p.split(next, &auto.parts);
        if auto.parts.chunk_cache {
            let evicted = self.shared.chunk_cache.set_limit(t.chunk_cache as usize);
            drop(evicted);
        }
        if auto.parts.log_cache {
            self.wal.set_cache_limit(t.log_cache as usize);
        }
        if auto.parts.write_buffer {
            self.wal.set_buffer_limit(t.write_buffer as usize);
        }
    }

    pub(crate) fn ram_tier_stats(&self) -> RamTierStats {
        let (log_bytes, buf_bytes) = self.wal.ram_usage();
        let (chunk_limit, chunk_bytes) = {
            let c = &self.shared.chunk_cache;
            (c.limit(), c.bytes())
        };
        let chunk_limit = if self.shared.chunk_cache_disabled {
            0
        } else {
            chunk_limit
        };
        RamTierStats {
            auto: self.ram.auto.is_some(),
            target_bytes: self.ram.target.load(Ordering::Relaxed),
            max_bytes: self.ram.max.load(Ordering::Relaxed),
            chunk_cache_limit: chunk_limit as u64,
            chunk_cache_bytes: chunk_bytes as u64,
            log_cache_limit: self.wal.cache_limit() as u64,
            log_cache_bytes: log_bytes as u64,
            write_buffer_limit: self.wal.buffer_limit() as u64,
            write_buffer_bytes: buf_bytes as u64,
            shrinks: self.ram.shrinks.load(Ordering::Relaxed),
            mem_total_bytes: self.ram.mem_total.load(Ordering::Relaxed),
            mem_available_bytes: self.ram.mem_available.load(Ordering::Relaxed),
        }
    }
}

impl Pool {
    /// The RAM tier's targets and usage now (cheap: a few locks, no I/O).
    pub fn ram_tier_stats(&self) -> RamTierStats {
        self.inner.ram_tier_stats()
    }
}

/// The RAM tier's watcher: every interval, re-decides the auto parts' target from the
/// machine's memory figures.
fn ram_watch_loop(weak: std::sync::Weak<PoolInner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let Some(auto) = inner.ram.auto.as_ref() else {
            return;
        };
        inner.ram_watch_once(auto);
        let interval = auto.interval;
        let (m, c) = &inner.bg_wake;
        let mut stop = m.lock();
        if *stop {
            return;
        }
        c.wait_for(&mut stop, interval);
        if *stop {
            return;
        }
    }
}
