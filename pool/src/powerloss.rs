//! Power-loss simulation for crash tests, in the pool's own I/O layer.
//!
//! A SIGKILL keeps the page cache, so a crash test built on it passes even if nothing is ever
//! synced. This layer models a power cut instead: while a [`Sim`] is active for a directory,
//! every write to a file under it (device files through [`crate::io`], the metadata store through
//! [`SimBackend`]) first records the previous contents of the 512-byte sectors it covers, and a
//! completed sync of the file forgets what was recorded before the sync began (those writes are
//! durable). [`Sim::power_cut`] then rolls every sector written since its file's last completed
//! sync back to any one of its versions since that sync, chosen at random and independently per
//! sector: unsynced writes survive as an arbitrary subset, reordered and torn at sector
//! granularity, exactly what a volatile device cache may do. What a completed sync covered is
//! never touched. [`Sim::fail_after`] makes every I/O fail after a number of further operations,
//! so a cut lands in the middle of a write, a replay or a fold.
//!
//! Inactive (no `Sim` alive) the cost is one relaxed atomic load per batch.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

const SECTOR: u64 = 512;
const IN_FLIGHT: u64 = u64::MAX;

/// A write recorded before it was issued; [`landed`] marks it complete.
#[derive(Debug)]
pub(crate) struct Ticket {
    sim: Arc<Sim>,
    key: (u64, u64),
    first: u64,
    end: u64,
}

static ACTIVE: AtomicBool = AtomicBool::new(false);
static SIMS: RwLock<Vec<Arc<Sim>>> = RwLock::new(Vec::new());

/// Unsynced history of one file.
#[derive(Default)]
struct FileHist {
    /// A second, buffered handle: pre-images are read and rollbacks written through it.
    handle: Option<File>,
    /// Sector -> its earlier versions since the last completed sync, oldest first, each with
    /// the sequence number at which the write that replaced it completed (`IN_FLIGHT` until
    /// then: a sync never makes a write durable that had not completed when it began).
    sectors: BTreeMap<u64, Vec<(u64, [u8; SECTOR as usize])>>,
}

/// A power-loss simulation over the files under one directory.
pub struct Sim {
    root: PathBuf,
    files: Mutex<HashMap<(u64, u64), FileHist>>,
    seq: AtomicU64,
    /// Operations left before every I/O fails (negative: no limit).
    budget: AtomicI64,
    writes: AtomicU64,
    syncs: AtomicU64,
    /// Where every change of `files` is also appended (see [`Sim::start_journaled`]).
    journal: Option<Mutex<File>>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("root", &self.root).finish()
    }
}

/// What a power cut did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Sectors written since their file's last sync.
    pub unsynced_sectors: u64,
    /// Of those, sectors rolled back to an earlier version.
    pub rolled_back: u64,
}

impl Sim {
    /// Starts simulating power loss for every file under `root`.
    pub fn start(root: &Path) -> io::Result<Arc<Sim>> {
        Self::start_with(root, None)
    }

    /// As [`Sim::start`], also appending every recorded change to the file at `journal`, so
    /// that after the process is killed, [`power_cut_journal`] cuts the power as
    /// [`Sim::power_cut`] would have (for crash tests of a whole server process).
    pub fn start_journaled(root: &Path, journal: &Path) -> io::Result<Arc<Sim>> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(journal)?;
        Self::start_with(root, Some(f))
    }

    fn start_with(root: &Path, journal: Option<File>) -> io::Result<Arc<Sim>> {
        let sim = Arc::new(Sim {
            root: root.canonicalize()?,
            files: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            budget: AtomicI64::new(-1),
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            journal: journal.map(Mutex::new),
        });
        SIMS.write().push(sim.clone());
        ACTIVE.store(true, Ordering::SeqCst);
        Ok(sim)
    }

    /// Stops the simulation (nothing is rolled back).
    pub fn stop(self: &Arc<Sim>) {
        let mut sims = SIMS.write();
        sims.retain(|s| !Arc::ptr_eq(s, self));
        ACTIVE.store(!sims.is_empty(), Ordering::SeqCst);
    }

    /// After `ops` more writes, syncs or reads, every I/O under the root fails with EIO (the
    /// power is gone); `None` lifts the limit.
    pub fn fail_after(&self, ops: Option<u64>) {
        self.budget.store(
            ops.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)),
            Ordering::SeqCst,
        );
    }

    /// Writes and syncs seen so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.writes.load(Ordering::Relaxed),
            self.syncs.load(Ordering::Relaxed),
        )
    }

    /// Cuts the power: every sector written since its file's last completed sync takes one of
    /// its versions since then (the newest included), chosen by `seed`. Call it once nothing
    /// uses the files any more (after `Pool::kill`); the I/O limit is lifted.
    pub fn power_cut(&self, seed: u64) -> io::Result<CutReport> {
        let mut files = self.files.lock();
        let rep = roll_back(files.values_mut(), seed)?;
        self.budget.store(-1, Ordering::SeqCst);
        Ok(rep)
    }

    /// Appends one event to the journal (called with `files` locked, so events are in order).
    fn log(&self, event: &[u8]) -> io::Result<()> {
        if let Some(j) = &self.journal {
            use std::io::Write;
            j.lock().write_all(event)?;
        }
        Ok(())
    }

    /// Takes one operation from the budget; fails once it is spent (never goes below zero, so
    /// racing threads cannot turn a spent budget into an unlimited one).
    fn charge(&self) -> io::Result<()> {
        let res = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| match left {
                0 => None,
                n if n > 0 => Some(n - 1),
                unlimited => Some(unlimited),
            });
        match res {
            Ok(_) => Ok(()),
            Err(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    fn key_of(file: &File) -> io::Result<(u64, u64)> {
        let m = file.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    /// The history of `file` if it lies under the root (opening the second handle at first use).
    fn with_hist<T>(
        &self,
        file: &File,
        path: Option<&Path>,
        f: impl FnOnce(&Self, (u64, u64), &mut FileHist, u64) -> io::Result<T>,
    ) -> io::Result<Option<T>> {
        let key = Self::key_of(file)?;
        let mut files = self.files.lock();
        if let std::collections::hash_map::Entry::Vacant(slot) = files.entry(key) {
            let path = match path {
                Some(p) => p.to_path_buf(),
                None => std::fs::read_link(format!(
                    "/proc/self/fd/{}",
                    std::os::unix::io::AsRawFd::as_raw_fd(file)
                ))?,
            };
            let tracked = path
                .canonicalize()
                .map(|p| p.starts_with(&self.root))
                .unwrap_or(false);
            let handle = if tracked {
                Some(
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)?,
                )
            } else {
                None
            };
            if handle.is_some() {
                let p = path.canonicalize()?;
                let p = p.as_os_str().as_encoded_bytes();
                self.log(&event(EV_FILE, &[key.0, key.1, p.len() as u64], p))?;
            }
            slot.insert(FileHist {
                handle,
                sectors: BTreeMap::new(),
            });
        }
        let Some(hist) = files.get_mut(&key) else {
            return Ok(None);
        };
        if hist.handle.is_none() {
            return Ok(None);
        }
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        f(self, key, hist, seq).map(Some)
    }

    fn before_write(
        self: &Arc<Self>,
        file: &File,
        path: Option<&Path>,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<Ticket>> {
        let first = offset / SECTOR;
        let end = (offset + len as u64).div_ceil(SECTOR);
        let res = self.with_hist(file, path, |sim, key, hist, _| {
            let Some(handle) = hist.handle.as_ref() else {
                return Ok(());
            };
            // A write refused by the cut records nothing: it never happens.
            sim.charge()?;
            let mut buf = vec![0u8; ((end - first) * SECTOR) as usize];
            crate::io::read_exact_at(handle, &mut buf, first * SECTOR)?;
            sim.log(&event(EV_PRE, &[key.0, key.1, first, end], &buf))?;
            for (i, s) in (first..end).enumerate() {
                let mut old = [0u8; SECTOR as usize];
                old.copy_from_slice(&buf[i * SECTOR as usize..(i + 1) * SECTOR as usize]);
                hist.sectors.entry(s).or_default().push((IN_FLIGHT, old));
            }
            Ok(())
        })?;
        if res.is_none() {
            return Ok(None);
        }
        let ticket = Ticket {
            sim: self.clone(),
            key: Self::key_of(file)?,
            first,
            end,
        };
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(Some(ticket))
    }

    fn landed(&self, t: &Ticket) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mut files = self.files.lock();
        if let Some(hist) = files.get_mut(&t.key) {
            mark_landed(hist, t.first, t.end, seq);
            if let Err(e) = self.log(&event(
                EV_LANDED,
                &[t.key.0, t.key.1, t.first, t.end, seq],
                &[],
            )) {
                tracing::error!(error = %e, "power-loss journal write failed");
            }
        }
    }

    /// Runs `sync`; once it completed, what was written before it started is durable.
    fn sync(
        &self,
        file: &File,
        path: Option<&Path>,
        sync: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let started = self.with_hist(file, path, |_, _, _, seq| Ok(seq))?;
        let Some(started) = started else {
            return sync();
        };
        self.charge()?;
        sync()?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let key = Self::key_of(file)?;
        let mut files = self.files.lock();
        if let Some(hist) = files.get_mut(&key) {
            forget_synced(hist, started);
            self.log(&event(EV_SYNC, &[key.0, key.1, started], &[]))?;
        }
        Ok(())
    }

    fn before_read(&self, file: &File, path: Option<&Path>) -> io::Result<()> {
        if self.with_hist(file, path, |_, _, _, _| Ok(()))?.is_some() {
            self.charge()?;
        }
        Ok(())
    }
}

/// Rolls every recorded sector back to one of its versions (or keeps the newest), by `seed`.
fn roll_back<'a>(
    files: impl Iterator<Item = &'a mut FileHist>,
    seed: u64,
) -> io::Result<CutReport> {
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut rep = CutReport::default();
    for hist in files {
        let Some(handle) = hist.handle.as_ref() else {
            continue;
        };
        for (&sector, versions) in &hist.sectors {
            rep.unsynced_sectors += 1;
            // 0..versions.len() picks an earlier version; versions.len() keeps the newest.
            let pick = (next() % (versions.len() as u64 + 1)) as usize;
            if let Some((_, old)) = versions.get(pick) {
                handle.write_all_at(old, sector * SECTOR)?;
                rep.rolled_back += 1;
            }
        }
        hist.sectors.clear();
        handle.sync_all()?;
    }
    Ok(rep)
}

// Journal events: tag byte, then little-endian u64 fields.
const EV_FILE: u8 = 1; // dev, ino, path length, path bytes
const EV_PRE: u8 = 2; // dev, ino, first, end, pre-images
const EV_LANDED: u8 = 3; // dev, ino, first, end, seq
const EV_SYNC: u8 = 4; // dev, ino, started

fn event(tag: u8, fields: &[u64], tail: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(1 + 8 * fields.len() + tail.len());
    e.push(tag);
    for f in fields {
        e.extend_from_slice(&f.to_le_bytes());
    }
    e.extend_from_slice(tail);
    e
}

/// Cuts the power over a journal written by [`Sim::start_journaled`] in a process that has
/// since been killed: the files are rolled back exactly as [`Sim::power_cut`] would have done.
/// A torn last event (the process died while appending it) is ignored: its write never began.
pub fn power_cut_journal(journal: &Path, seed: u64) -> io::Result<CutReport> {
    let bytes = std::fs::read(journal)?;
    let mut files: HashMap<(u64, u64), FileHist> = HashMap::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
        let s = bytes.get(*at..*at + n)?;
        *at += n;
        Some(s)
    };
    let u64_at = |at: &mut usize| -> Option<u64> {
        take(at, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    while let Some(tag) = take(&mut at, 1).map(|t| t[0]) {
        let (Some(dev), Some(ino)) = (u64_at(&mut at), u64_at(&mut at)) else {
            break;
        };
        let key = (dev, ino);
        match tag {
            EV_FILE => {
                let Some(n) = u64_at(&mut at) else { break };
                let Some(p) = take(&mut at, n as usize) else {
                    break;
                };
                let path = PathBuf::from(String::from_utf8_lossy(p).into_owned());
                let handle = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)?;
                files.insert(
                    key,
                    FileHist {
                        handle: Some(handle),
                        sectors: BTreeMap::new(),
                    },
                );
            }
            EV_PRE => {
                let (Some(first), Some(end)) = (u64_at(&mut at), u64_at(&mut at)) else {
                    break;
                };
                let Some(pre) = take(&mut at, ((end - first) * SECTOR) as usize) else {
                    break;
                };
                if let Some(h) = files.get_mut(&key) {
                    for (i, s) in (first..end).enumerate() {
                        let mut old = [0u8; SECTOR as usize];
                        old.copy_from_slice(&pre[i * SECTOR as usize..(i + 1) * SECTOR as usize]);
                        h.sectors.entry(s).or_default().push((IN_FLIGHT, old));
                    }
                }
            }
            EV_LANDED => {
                let (Some(first), Some(end), Some(seq)) =
                    (u64_at(&mut at), u64_at(&mut at), u64_at(&mut at))
                else {
                    break;
                };
                if let Some(h) = files.get_mut(&key) {
                    mark_landed(h, first, end, seq);
                }
            }
            EV_SYNC => {
                let Some(started) = u64_at(&mut at) else {
                    break;
                };
                if let Some(h) = files.get_mut(&key) {
                    forget_synced(h, started);
                }
            }
            _ => {
                return Err(io::Error::other(format!(
                    "power-loss journal {}: unknown event {tag} at byte {}",
                    journal.display(),
                    at - 17
                )));
            }
        }
    }
    roll_back(files.values_mut(), seed)
}

fn mark_landed(hist: &mut FileHist, first: u64, end: u64, seq: u64) {
    for s in first..end {
        // The oldest version still in flight for this sector is this write's.
        if let Some(v) = hist
            .sectors
            .get_mut(&s)
            .and_then(|vs| vs.iter_mut().find(|(q, _)| *q == IN_FLIGHT))
        {
            v.0 = seq;
        }
    }
}

fn forget_synced(hist: &mut FileHist, started: u64) {
    hist.sectors.retain(|_, versions| {
        versions.retain(|(seq, _)| *seq > started);
        !versions.is_empty()
    });
}

fn sims() -> Vec<Arc<Sim>> {
    if !ACTIVE.load(Ordering::Relaxed) {
        return Vec::new();
    }
    SIMS.read().clone()
}

/// Called by the I/O layer before a write of `len` bytes at `offset` of `file`; the tickets go
/// to [`landed`] once the write completed.
pub(crate) fn before_write(file: &File, offset: u64, len: usize) -> io::Result<Vec<Ticket>> {
    let mut out = Vec::new();
    for s in sims() {
        out.extend(s.before_write(file, None, offset, len)?);
    }
    Ok(out)
}

/// Marks recorded writes complete.
pub(crate) fn landed(tickets: &[Ticket]) {
    for t in tickets {
        t.sim.landed(t);
    }
}

/// For crash tests of a whole server process: with `MAAS_TEST_POWERLOSS_JOURNAL` set, the
/// first pool opened or created in the process runs under a journaled simulation (see
/// [`Sim::start_journaled`]); after the process is killed, [`power_cut_journal`] cuts the power.
/// Never set it in production: every write then also copies what it overwrites.
pub(crate) fn start_from_env(pool_dir: &Path) {
    static STARTED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let Some(journal) = std::env::var_os("MAAS_TEST_POWERLOSS_JOURNAL") else {
        return;
    };
    STARTED.get_or_init(|| match Sim::start_journaled(pool_dir, Path::new(&journal)) {
        Ok(sim) => {
            tracing::warn!(
                pool = %pool_dir.display(),
                journal = ?journal,
                "TEST MODE: the pool runs under the power-loss simulation (MAAS_TEST_POWERLOSS_JOURNAL)"
            );
            // Lives as long as the process: the simulation stays registered.
            std::mem::forget(sim);
        }
        Err(e) => tracing::error!(error = %e, "could not start the power-loss simulation"),
    });
}

/// Whether any simulation is running (the I/O layer's fast check).
pub(crate) fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Called by the I/O layer before a read of `file`.
pub(crate) fn before_read(file: &File) -> io::Result<()> {
    for s in sims() {
        s.before_read(file, None)?;
    }
    Ok(())
}

/// Runs the sync of `file` through the simulation.
pub(crate) fn sync(file: &File, run: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    let sims = sims();
    match sims.as_slice() {
        [] => run(),
        [s, ..] => s.sync(file, None, run),
    }
}

/// Whether a simulation covers `path` (the metadata store then opens through [`SimBackend`]).
pub(crate) fn covers(path: &Path) -> bool {
    let Ok(p) = path
        .parent()
        .map(|d| d.canonicalize())
        .unwrap_or_else(|| Ok(PathBuf::new()))
    else {
        return false;
    };
    sims().iter().any(|s| p.starts_with(&s.root))
}

/// A redb storage backend over a file under a simulation: writes record their pre-images and
/// syncs make them durable, as for the devices.
#[derive(Debug)]
pub(crate) struct SimBackend {
    inner: redb::backends::FileBackend,
    file: File,
    path: PathBuf,
}

impl SimBackend {
    pub(crate) fn open(path: &Path, create: bool) -> io::Result<SimBackend> {
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(path)
        };
        let inner = redb::backends::FileBackend::new(open()?).map_err(io::Error::other)?;
        Ok(SimBackend {
            inner,
            file: open()?,
            path: path.to_path_buf(),
        })
    }
}

impl redb::StorageBackend for SimBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        for s in sims() {
            s.before_read(&self.file, Some(&self.path))?;
        }
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        // Length changes are taken as durable: the model rolls back contents, not sizes.
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        let sims = sims();
        match sims.as_slice() {
            [] => self.inner.sync_data(),
            [s, ..] => s.sync(&self.file, Some(&self.path), || self.inner.sync_data()),
        }
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut tickets = Vec::new();
        for s in sims() {
            tickets.extend(s.before_write(&self.file, Some(&self.path), offset, data.len())?);
        }
        let res = self.inner.write(offset, data);
        landed(&tickets);
        res
    }
    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }
    fn try_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(start, end)
    }
    fn query_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
