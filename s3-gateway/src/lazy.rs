//! Reading archived objects on demand for lazily mounted snapshots (the pool's
//! [`maas_pool::remote`]): one ranged GET fetches the object asked for and, in the same
//! request, up to [`READ_AHEAD`] of the objects packed after it (a snapshot is packed in chunk
//! order, so they are the chunks a sequential reader wants next). Which objects follow is in
//! the pack's own index, read once per pack (its tail) and kept, within a bound.
//!
//! The pool checks every object that comes back with its digest key; this side only cuts the
//! bytes. A failing endpoint is retried for [`RETRY_FOR`] only, and a request that does not
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

/// Fetches one archive target's objects.
#[derive(Debug)]
pub struct TargetFetch {
    handle: tokio::runtime::Handle,
    bucket: Bucket,
    read_ahead: u64,
    indexes: Mutex<HashMap<String, std::sync::Arc<Vec<PackEntry>>>>,
    /// Until when fetches fail at once (see [`BACKOFF`]), and why.
    down: Mutex<Option<(std::time::Instant, String)>>,
}

impl TargetFetch {
    pub fn new(archive: &crate::Archive, bucket: Bucket) -> TargetFetch {
        TargetFetch {
            handle: archive.handle().clone(),
            bucket: bucket.with_retry_for(RETRY_FOR),
            read_ahead: READ_AHEAD,
            indexes: Mutex::new(HashMap::new()),
            down: Mutex::new(None),
        }
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
            let mut down = match self.down.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
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
            let mut down = match self.down.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            *down = Some((std::time::Instant::now() + BACKOFF, why.clone()));
        }
        r
    }

    fn pack_index(&self, pack: &PackRec) -> Result<std::sync::Arc<Vec<PackEntry>>, RemoteError> {
        if let Some(e) = self.lock_indexes().get(&pack.key) {
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
        let mut c = self.lock_indexes();
        if c.len() >= INDEX_CACHE_PACKS {
            c.clear();
        }
        c.insert(pack.key.clone(), entries.clone());
        Ok(entries)
    }

    fn lock_indexes(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, std::sync::Arc<Vec<PackEntry>>>> {
        match self.indexes.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl RemoteFetch for TargetFetch {
    fn fetch(
        &self,
        d: &Digest,
        at: &ArchivedObject,
        pack: &PackRec,
    ) -> Result<Vec<(Digest, Vec<u8>)>, RemoteError> {
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
        Ok(out)
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
