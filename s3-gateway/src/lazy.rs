//! Reading archived objects on demand for lazily mounted snapshots (the pool's
//! [`maas_pool::remote`]): one ranged GET fetches the object asked for and, in the same
//! request, up to [`READ_AHEAD`] of the objects packed after it (a snapshot is packed in chunk
//! order, so they are the chunks a sequential reader wants next). Which objects follow is in
//! the pack's own index, read once per pack (its tail) and kept, within a bound.
//!
//! A reader that goes on sequentially (a fetch starting where the previous one ended) gets
//! the next [`PREFETCH`] of the pack fetched in the background while it consumes what came:
//! its next fetch is then served from memory (or waits for the request already under way)
//! instead of a round trip of its own. What is fetched ahead is bounded ([`PREFETCH_KEEP`])
//! and handed to the pool, which keeps what it is still waiting for.
//!
//! The pool checks every object that comes back with its digest key; this side only cuts the
//! bytes (and opens them, for an encrypted target). A failing endpoint is retried for [`RETRY_FOR`] only, and a request that does not
//! answer within [`FETCH_TIMEOUT`] is an error the reader sees (the block targets report it;
//! the data is not damaged), never a hang.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use maas_pool::archive::{ArchivedObject, PackEntry, PackRec};
use maas_pool::remote::{RemoteError, RemoteFetch};
use maas_pool::types::Digest;

use crate::bucket::Bucket;
use crate::error::ArchiveError;
use crate::pack::{TRAILER_LEN, parse_index, parse_trailer};

/// How much of a pack one fetch reads past the object asked for.
pub const READ_AHEAD: u64 = 4 << 20;
/// How long a fetch may take, retries included: under the 30 s a Linux initiator gives a
/// SCSI command, so that it sees an error status rather than aborting a command still running.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a request is retried when the endpoint fails (a reader is waiting: far less than
/// a push's two minutes).
pub const RETRY_FOR: Duration = Duration::from_secs(5);
/// After a fetch found the bucket unavailable, fetches fail at once for this long rather than
/// each waiting out its own retries: a host probing a mounted disk (partition scan, blkid,
/// readahead) then gets its errors quickly, and the next fetch after it tries again.
pub const BACKOFF: Duration = Duration::from_secs(5);
/// Pack indexes kept in memory (about 48 bytes per object: a few MiB at most).
const INDEX_CACHE_PACKS: usize = 256;
/// How much of a pack a background fetch brings ahead of a sequential reader.
pub const PREFETCH: u64 = 8 << 20;
/// How long a background fetch may take, and a reader wait for it: a reader that then fetches
/// itself stays within [`FETCH_TIMEOUT`] more, under an initiator's 30 s in all (a background
/// fetch that fails sets the [`BACKOFF`], so the reader's own fails at once).
const PREFETCH_TIMEOUT: Duration = Duration::from_secs(8);
/// Bytes fetched ahead and not asked for yet that are kept at most.
const PREFETCH_KEEP: u64 = 64 << 20;

/// The background fetch ahead of a sequential reader.
#[derive(Debug, Default)]
struct Ahead {
    /// Objects fetched ahead (stored form), not asked for yet.
    ready: HashMap<Digest, Vec<u8>>,
    ready_bytes: u64,
    /// The range of a pack being fetched now.
    pending: Option<(String, u64, u64)>,
    /// Where the last fetch, or fetch ahead, ended in its pack: a fetch starting there is
    /// sequential.
    stream_end: Option<(String, u64)>,
    /// How many fetches were served from what was fetched ahead (for tests and logs).
    hits: u64,
}

/// Fetches one archive target's objects.
#[derive(Debug)]
pub struct TargetFetch {
    handle: tokio::runtime::Handle,
    bucket: Bucket,
    read_ahead: u64,
    indexes: Mutex<HashMap<String, std::sync::Arc<Vec<PackEntry>>>>,
    /// Until when fetches fail at once (see [`BACKOFF`]), and why.
    down: std::sync::Arc<Mutex<Option<(std::time::Instant, String)>>>,
    ahead: std::sync::Arc<(Mutex<Ahead>, std::sync::Condvar)>,
}

impl TargetFetch {
    pub fn new(archive: &crate::Archive, bucket: Bucket) -> TargetFetch {
        TargetFetch {
            handle: archive.handle().clone(),
            bucket: bucket.with_retry_for(RETRY_FOR),
            read_ahead: READ_AHEAD,
            indexes: Mutex::new(HashMap::new()),
            down: Default::default(),
            ahead: Default::default(),
        }
    }

    /// Fetches served from what a background fetch brought ahead.
    pub fn prefetch_hits(&self) -> u64 {
        lock(&self.ahead.0).hits
    }

    /// Serves `d` from what was fetched ahead, waiting for a fetch under way that covers it.
    /// None: not there (the caller fetches it itself).
    fn take_fetched_ahead(
        &self,
        d: &Digest,
        at: &ArchivedObject,
        pack: &PackRec,
    ) -> Option<Vec<(Digest, Vec<u8>)>> {
        let (m, cv) = &*self.ahead;
        let deadline = std::time::Instant::now() + PREFETCH_TIMEOUT;
        let mut a = lock(m);
        loop {
            if let Some(bytes) = a.ready.remove(d) {
                // Everything else fetched ahead goes with it: the pool keeps what it is still
                // waiting for (reads of a sequential reader come in order).
                let mut out = vec![(*d, bytes)];
                out.extend(a.ready.drain());
                a.ready_bytes = 0;
                a.hits += 1;
                return Some(out);
            }
            let covered = a
                .pending
                .as_ref()
                .is_some_and(|(k, s, e)| *k == pack.key && (*s..*e).contains(&at.offset));
            let now = std::time::Instant::now();
            if !covered || now >= deadline {
                return None;
            }
            a = match cv.wait_timeout(a, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// After a fetch of `pack` that ended at `end`: if it continued the previous one, fetch
    /// the next [`PREFETCH`] of the pack in the background.
    fn maybe_prefetch(&self, pack: &PackRec, start: u64, end: u64, served_ahead: bool) {
        let sequential;
        {
            let mut a = lock(&self.ahead.0);
            sequential = served_ahead
                || a.stream_end
                    .as_ref()
                    .is_some_and(|(k, e)| *k == pack.key && *e == start);
            a.stream_end = Some((pack.key.clone(), end));
            if !sequential || a.pending.is_some() || end >= pack.bytes {
                return;
            }
        }
        let Ok(entries) = self.pack_index(pack) else {
            return;
        };
        // Whole objects from `end`, up to PREFETCH.
        let first = entries.partition_point(|e| e.offset < end);
        let wanted: Vec<PackEntry> = entries[first..]
            .iter()
            .take_while(|e| e.offset + u64::from(e.len) - end <= PREFETCH)
            .copied()
            .collect();
        let (Some(f), Some(l)) = (wanted.first(), wanted.last()) else {
            return;
        };
        let (from, to) = (f.offset, l.offset + u64::from(l.len));
        {
            let mut a = lock(&self.ahead.0);
            if a.pending.is_some() {
                return;
            }
            a.pending = Some((pack.key.clone(), from, to));
        }
        let (ahead, bucket, key) = (self.ahead.clone(), self.bucket.clone(), pack.key.clone());
        let down = self.down.clone();
        self.handle.spawn(async move {
            let got =
                tokio::time::timeout(PREFETCH_TIMEOUT, bucket.get_range(&key, from, to - from))
                    .await;
            let unavailable = match &got {
                Ok(Err(e))
                    if !matches!(
                        e,
                        ArchiveError::Missing { .. } | ArchiveError::Damaged { .. }
                    ) =>
                {
                    Some(e.to_string())
                }
                Err(_) => Some(format!(
                    "no answer from the bucket within {} s",
                    PREFETCH_TIMEOUT.as_secs()
                )),
                _ => None,
            };
            if let Some(why) = unavailable {
                *lock(&down) = Some((std::time::Instant::now() + BACKOFF, why));
            }
            let (m, cv) = &*ahead;
            let mut a = lock(m);
            a.pending = None;
            match got {
                Ok(Ok(bytes)) => {
                    if a.ready_bytes + (to - from) > PREFETCH_KEEP {
                        // Not asked for: the reader went elsewhere.
                        a.ready.clear();
                        a.ready_bytes = 0;
                    }
                    for e in &wanted {
                        let at = (e.offset - from) as usize;
                        let Some(b) = bytes.get(at..at + e.len as usize) else {
                            break;
                        };
                        if let Ok(stored) = crate::pack::open_object(bucket.cipher(), &e.digest, b)
                        {
                            a.ready_bytes += stored.len() as u64;
                            a.ready.insert(e.digest, stored);
                        }
                    }
                    if a.stream_end
                        .as_ref()
                        .is_some_and(|(k, e)| *k == key && *e <= from)
                    {
                        a.stream_end = Some((key, to));
                    }
                }
                // The reader fetches it itself, and sees the error if there is one.
                Ok(Err(e)) => tracing::debug!(pack = %key, error = %e, "fetch ahead failed"),
                Err(_) => tracing::debug!(pack = %key, "fetch ahead timed out"),
            }
            cv.notify_all();
        });
    }

    /// Read-ahead in bytes (0: only the object asked for).
    pub fn with_read_ahead(mut self, bytes: u64) -> TargetFetch {
        self.read_ahead = bytes;
        self
    }

    /// Runs `f` on the archive runtime and waits for it from any thread (a block target's
    /// blocking reader, a rayon worker), with [`FETCH_TIMEOUT`].
    fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = crate::Result<T>> + Send + 'static,
    ) -> Result<T, RemoteError> {
        {
            let mut down = lock(&self.down);
            match &*down {
                Some((until, why)) if std::time::Instant::now() < *until => {
                    return Err(RemoteError::Unavailable(format!(
                        "{why} (not retried for {} s)",
                        BACKOFF.as_secs()
                    )));
                }
                Some(_) => *down = None,
                None => {}
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let task = self.handle.spawn(async move {
            let _ = tx.send(f.await);
        });
        let r = match rx.recv_timeout(FETCH_TIMEOUT) {
            Ok(r) => r.map_err(classify),
            Err(_) => {
                task.abort();
                Err(RemoteError::Unavailable(format!(
                    "no answer from the bucket within {} s",
                    FETCH_TIMEOUT.as_secs()
                )))
            }
        };
        if let Err(RemoteError::Unavailable(why)) = &r {
            *lock(&self.down) = Some((std::time::Instant::now() + BACKOFF, why.clone()));
        }
        r
    }

    fn pack_index(&self, pack: &PackRec) -> Result<std::sync::Arc<Vec<PackEntry>>, RemoteError> {
        if let Some(e) = lock(&self.indexes).get(&pack.key) {
            return Ok(e.clone());
        }
        let (bucket, key, len) = (self.bucket.clone(), pack.key.clone(), pack.bytes);
        let entries = self.run(async move {
            let damaged = |detail: String| ArchiveError::Damaged {
                key: bucket.key(&key),
                detail,
            };
            if len < TRAILER_LEN as u64 {
                return Err(damaged("shorter than a pack trailer".into()));
            }
            let tail = bucket
                .get_range(&key, len - TRAILER_LEN as u64, TRAILER_LEN as u64)
                .await?;
            let t = parse_trailer(&tail, len).map_err(|e| e.at(bucket.key(&key)))?;
            let index = bucket
                .get_range(&key, t.index_offset, t.index_len())
                .await?;
            parse_index(&index, &t, bucket.cipher()).map_err(|e| e.at(bucket.key(&key)))
        })?;
        let entries = std::sync::Arc::new(entries);
        let mut c = lock(&self.indexes);
        if c.len() >= INDEX_CACHE_PACKS {
            c.clear();
        }
        c.insert(pack.key.clone(), entries.clone());
        Ok(entries)
    }
}

impl RemoteFetch for TargetFetch {
    fn fetch(
        &self,
        d: &Digest,
        at: &ArchivedObject,
        pack: &PackRec,
    ) -> Result<Vec<(Digest, Vec<u8>)>, RemoteError> {
        if let Some(out) = self.take_fetched_ahead(d, at, pack) {
            let end = lock(&self.ahead.0)
                .stream_end
                .as_ref()
                .filter(|(k, _)| *k == pack.key)
                .map(|(_, e)| *e);
            if let Some(end) = end {
                self.maybe_prefetch(pack, end, end, true);
            }
            return Ok(out);
        }
        // The objects after this one in the pack, as far as the read-ahead goes. Without the
        // index (it failed), just the object.
        let mut parts: Vec<(Digest, u64, u32)> = vec![(*d, at.offset, at.len)];
        if self.read_ahead > 0 {
            match self.pack_index(pack) {
                Ok(entries) => {
                    let end = at.offset.saturating_add(u64::from(at.len));
                    let start = entries.partition_point(|e| e.offset < end);
                    for e in &entries[start..] {
                        let e_end = e.offset + u64::from(e.len);
                        if e_end - at.offset > self.read_ahead + u64::from(at.len) {
                            break;
                        }
                        parts.push((e.digest, e.offset, e.len));
                    }
                }
                Err(e) => {
                    tracing::debug!(pack = %pack.key, error = %e, "no read-ahead: the pack's index could not be read");
                }
            }
        }
        let last = parts
            .last()
            .map_or(at.offset + u64::from(at.len), |p| p.1 + u64::from(p.2));
        let (bucket, key, start, len) = (
            self.bucket.clone(),
            pack.key.clone(),
            at.offset,
            last - at.offset,
        );
        let bytes = self.run(async move { bucket.get_range(&key, start, len).await })?;
        let mut out = Vec::with_capacity(parts.len());
        for (i, (digest, off, l)) in parts.into_iter().enumerate() {
            let a = (off - start) as usize;
            let Some(b) = bytes.get(a..a + l as usize) else {
                return Err(RemoteError::Damaged(format!(
                    "pack {} is shorter than its index says",
                    pack.key
                )));
            };
            match crate::pack::open_object(self.bucket.cipher(), &digest, b) {
                Ok(stored) => out.push((digest, stored)),
                Err(e) if i == 0 => return Err(classify(e.at(self.bucket.key(&pack.key)))),
                // Read ahead only: a damaged neighbour fails when (if) it is read itself.
                Err(e) => {
                    tracing::debug!(pack = %pack.key, error = %e, "read-ahead skipped an object")
                }
            }
        }
        self.maybe_prefetch(pack, at.offset, last, false);
        Ok(out)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn classify(e: ArchiveError) -> RemoteError {
    match e {
        ArchiveError::Missing { .. } | ArchiveError::Damaged { .. } => {
            RemoteError::Damaged(e.to_string())
        }
        other => RemoteError::Unavailable(other.to_string()),
    }
}

/// Mounts archived snapshot `id` of `target` lazily: its index is read from the bucket (a few
/// requests), and the pool references its chunks, fetching on first read those it does not
/// hold. Only snapshots this pool archived (its digests): another pool's chunks must be
/// re-keyed, which needs their bytes (rehydrate them).
pub fn mount_snapshot(
    archive: &crate::Archive,
    pool: &maas_pool::Pool,
    bucket: &Bucket,
    target: &str,
    id: &str,
) -> crate::Result<maas_pool::SnapshotInfo> {
    let (spec, by_digest) = crate::restore::snapshot_plan(archive, pool, bucket, target, id, None)?;
    // Every chunk must be where the pool will look for it, now rather than at some read.
    let digests: Vec<Digest> = by_digest.keys().copied().collect();
    if let Some(d) = pool.archive_missing(target, &digests)?.first() {
        return Err(ArchiveError::Missing {
            key: format!("chunk {d} of snapshot {id} (no pack of this target holds it)"),
        });
    }
    let mut chunks = std::collections::BTreeMap::new();
    for (d, nos) in by_digest {
        for n in nos {
            chunks.insert(n, d);
        }
    }
    Ok(pool.import_snapshot_lazy(&spec, target, &chunks)?)
}
