//! Lazily mounted archived snapshots ("cloud light-up"): a snapshot whose chunks are still
//! only in an archive target is imported as its index alone. Every chunk the pool does not
//! hold gets an object record whose extent is remote ([`Extent::remote`]): reference counts,
//! clones and deletion work on it as on any object, while its bytes are fetched on first read
//! through a [`RemoteFetch`] the caller registers (the S3 gateway: the pool knows nothing of
//! S3), checked with this pool's digest key, written to a device and made durable, and the
//! record switched to the local extent in one metadata transaction. The pool is thereby the
//! cache: a chunk is fetched once, later reads are local, and a restart keeps what came.
//!
//! Only data chunks are ever remote: index nodes are stored at import, so reference counting
//! (which reads nodes inside a metadata transaction) never waits on the network.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::archive::{ArchivedObject, PackRec};
use crate::error::{PoolError, Result};
use crate::fold::NewObjects;
use crate::import::ImportSpec;
use crate::io::AlignedBuf;
use crate::meta::{OBJECTS, ObjRec};
use crate::object::{self, ObjectKind};
use crate::pool::{Pool, SnapshotInfo};
use crate::shared::Shared;
use crate::types::{Digest, Extent, SnapshotId};

/// Remote source name (the caller's archive target id) -> its number in remote extents.
const REMOTE_SOURCES: TableDefinition<'_, &str, u64> = TableDefinition::new("remote_sources");

/// Why a remote object could not be had.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The source did not answer (network, credentials, timeout): the data may be fine.
    #[error("{0}")]
    Unavailable(String),
    /// The source answered with bytes that are not the object, or lost it.
    #[error("{0}")]
    Damaged(String),
}

/// Fetches objects of one remote source, in the form this pool stored them. The pool says
/// where the object is (its archive records, see [`crate::archive`]): a fetcher needs no
/// handle on the pool.
pub trait RemoteFetch: Send + Sync {
    /// The stored bytes of object `d`, at `at` in pack `pack`, first; then, where it costs
    /// nothing more (the same request), objects stored next to it, which the pool keeps if it
    /// is waiting for them (read-ahead: archived snapshots are packed in chunk order).
    fn fetch(
        &self,
        d: &Digest,
        at: &ArchivedObject,
        pack: &PackRec,
    ) -> std::result::Result<Vec<(Digest, Vec<u8>)>, RemoteError>;
}

/// A connected source: its name and fetcher.
type Source = (String, Arc<dyn RemoteFetch>);

/// The registered fetchers, by source number.
#[derive(Default)]
pub struct Remotes {
    fetchers: parking_lot::RwLock<HashMap<u64, Source>>,
}

impl Shared {
    /// An object record's bytes when its extent is remote: fetched, checked, stored locally
    /// (with what came with it), returned as `read_object_bytes` would.
    pub(crate) fn fetch_remote(&self, d: &Digest, rec: &ObjRec) -> Result<AlignedBuf> {
        let what = format!("chunk {d}");
        if rec.kind != ObjectKind::Chunk {
            return Err(PoolError::corrupt(
                format!("object record {d}"),
                "an index node is remote",
            ));
        }
        let source = rec.extent.offset;
        let fetcher = self.remotes.fetchers.read().get(&source).cloned();
        let Some((name, fetcher)) = fetcher else {
            return Err(PoolError::Remote {
                what,
                detail: format!(
                    "its data is only in archive target #{source}, which is not connected to the pool"
                ),
            });
        };
        let Some((at, pack)) = crate::archive::locate(&self.meta, &name, d)? else {
            return Err(PoolError::corrupt(
                what,
                format!("archive target {name} has no record of it (the copy was deleted?)"),
            ));
        };
        let objs = fetcher.fetch(d, &at, &pack).map_err(|e| match e {
            RemoteError::Unavailable(m) => PoolError::Remote {
                what: what.clone(),
                detail: format!("archive target {name}: {m}"),
            },
            RemoteError::Damaged(m) => PoolError::corrupt(
                what.clone(),
                format!("its copy in archive target {name} is damaged: {m}"),
            ),
        })?;
        let mut wanted: Vec<(Digest, ObjRec, Vec<u8>)> = Vec::new();
        let mut found = None;
        for (od, bytes) in objs {
            let orec = if od == *d {
                *rec
            } else {
                match self.meta.get_object(&od) {
                    Ok(Some(r)) if r.extent.is_remote() && r.kind == ObjectKind::Chunk => r,
                    _ => continue,
                }
            };
            let ok =
                object::decode(&self.keys, &bytes, ObjectKind::Chunk, &od, &what).and_then(|raw| {
                    if raw.len() as u64 == self.chunk_size {
                        Ok(())
                    } else {
                        Err(PoolError::corrupt(format!("chunk {od}"), "wrong length"))
                    }
                });
            match ok {
                Ok(()) => {}
                Err(e) if od == *d => {
                    return Err(PoolError::corrupt(
                        what,
                        format!("its copy in archive target {name} fails its check: {e}"),
                    ));
                }
                Err(e) => {
                    tracing::warn!(digest = %od, error = %e, archive_target = %name, "read-ahead object from the archive fails its check; ignored");
                    continue;
                }
            }
            if od == *d {
                let mut buf = AlignedBuf::zeroed(object::extent_len(bytes.len() as u32) as usize);
                buf[..bytes.len()].copy_from_slice(&bytes);
                found = Some(buf);
            }
            wanted.push((od, orec, bytes));
        }
        let Some(buf) = found else {
            return Err(PoolError::corrupt(
                what,
                format!("archive target {name} did not return it"),
            ));
        };
        // Keeping a local copy is a cache: should it fail (a full pool), the read still
        // succeeds from what came.
        if let Err(e) = self.adopt_fetched(&wanted) {
            tracing::warn!(chunk = %d, error = %e, "could not keep chunks fetched from the archive locally; they will be fetched again");
        }
        Ok(buf)
    }

    /// Writes fetched objects to the devices, makes them durable, and switches the records of
    /// those still remote to their local extents, in one transaction.
    fn adopt_fetched(&self, objs: &[(Digest, ObjRec, Vec<u8>)]) -> Result<()> {
        let mut written: Vec<(Digest, ObjRec)> = Vec::new();
        let res = (|| -> Result<()> {
            for (d, rec, bytes) in objs {
                written.push((*d, self.write_encoded(rec.kind, d, bytes)?));
            }
            let mut devs: Vec<u16> = written.iter().map(|(_, r)| r.extent.device).collect();
            devs.sort_unstable();
            devs.dedup();
            for dev in devs {
                self.device(dev)?.sync()?;
            }
            Ok(())
        })();
        let free_all = |w: &[(Digest, ObjRec)]| {
            let mut a = self.alloc.lock();
            for (_, r) in w {
                a.free(r.extent);
            }
        };
        if let Err(e) = res {
            free_all(&written);
            return Err(e);
        }
        let mut stale: Vec<Extent> = Vec::new();
        let res = (|| -> Result<()> {
            let tx = self.meta.begin_write()?;
            {
                let mut t = tx.open_table(OBJECTS)?;
                for (d, new) in &written {
                    let cur = match t.get(&d.0)? {
                        Some(v) => Some(ObjRec::decode(v.value(), d)?),
                        None => None,
                    };
                    match cur {
                        Some(cur) if cur.extent.is_remote() => {
                            let rec = ObjRec {
                                refcount: cur.refcount,
                                ..*new
                            };
                            t.insert(&d.0, rec.encode().as_slice())?;
                        }
                        // Fetched meanwhile by another reader, or gone: ours is not needed.
                        _ => stale.push(new.extent),
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = res {
            free_all(&written);
            return Err(e);
        }
        // Never named by a record, so nobody can be reading them: free at once.
        let mut a = self.alloc.lock();
        for e in stale {
            a.free(e);
        }
        Ok(())
    }
}

impl Pool {
    /// Connects the remote source `name` (an archive target id): reads of objects that live
    /// only there go through `fetch`. Replaces an earlier fetcher of that source.
    pub fn set_remote_fetch(&self, name: &str, fetch: Arc<dyn RemoteFetch>) -> Result<()> {
        let n = self.remote_source_number(name)?;
        self.inner
            .shared
            .remotes
            .fetchers
            .write()
            .insert(n, (name.to_string(), fetch));
        Ok(())
    }

    /// The number of remote source `name`, assigned on first use.
    fn remote_source_number(&self, name: &str) -> Result<u64> {
        let meta = &self.inner.shared.meta;
        {
            let tx = meta.db.begin_read()?;
            match tx.open_table(REMOTE_SOURCES) {
                Ok(t) => {
                    if let Some(v) = t.get(name)? {
                        return Ok(v.value());
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let tx = meta.begin_write()?;
        let n = {
            let mut t = tx.open_table(REMOTE_SOURCES)?;
            let existing = t.get(name)?.map(|v| v.value());
            match existing {
                Some(n) => n,
                None => {
                    let next = t
                        .iter()?
                        .filter_map(|r| r.ok())
                        .map(|(_, v)| v.value())
                        .max();
                    let n = next.map_or(1, |m| m + 1);
                    t.insert(name, n)?;
                    n
                }
            }
        };
        tx.commit()?;
        Ok(n)
    }

    /// Imports snapshot `spec` lazily: `chunks` (chunk number -> digest, this pool's digests:
    /// the snapshot was archived by this pool) are referenced, those the pool does not hold
    /// as remote objects of source `name`. The snapshot reads at once; its data arrives as
    /// it is read (or [`Pool::fetch_remote_chunks`]).
    pub fn import_snapshot_lazy(
        &self,
        spec: &ImportSpec,
        name: &str,
        chunks: &BTreeMap<u64, Digest>,
    ) -> Result<SnapshotInfo> {
        let inner = &self.inner;
        inner.check_open()?;
        let n = self.remote_source_number(name)?;
        let nchunks = inner.geo.chunks_for(spec.size);
        if let Some((c, _)) = chunks.range(nchunks..).next() {
            return Err(PoolError::InvalidArgument(format!(
                "chunk {c} is beyond the snapshot's {nchunks} chunks"
            )));
        }
        let new = NewObjects::default();
        {
            let mut m = new.map.lock();
            for d in chunks.values() {
                if m.contains_key(d) || inner.shared.meta.get_object(d)?.is_some() {
                    continue;
                }
                m.insert(
                    *d,
                    Some(ObjRec {
                        kind: ObjectKind::Chunk,
                        extent: Extent::remote(n),
                        raw_len: inner.geo.chunk_size as u32,
                        stored_len: 0,
                        refcount: 0,
                    }),
                );
            }
        }
        let remote = new.map.lock().len();
        let pin = inner.shared.pin.read();
        let res = self.commit_import(spec, chunks, &new);
        drop(pin);
        if res.is_err() {
            let mut a = inner.shared.alloc.lock();
            for e in new.extents() {
                a.free(e);
            }
        }
        let info = res?;
        tracing::info!(
            snapshot = info.id.0,
            chunks = chunks.len(),
            remote_chunks = remote,
            archive_target = name,
            "archived snapshot mounted lazily"
        );
        Ok(info)
    }

    /// Chunks of snapshot `id` that are still only in a remote source.
    pub fn remote_chunks_of(&self, id: SnapshotId) -> Result<Vec<Digest>> {
        let shared = &self.inner.shared;
        let mut out = Vec::new();
        for (d, kind) in self.snapshot_objects(id)?.objects {
            if kind == ObjectKind::Chunk && shared.lookup(&d)?.extent.is_remote() {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Fetches every chunk of snapshot `id` still remote (a lazily mounted snapshot made whole
    /// local); `progress(done, total)`. Returns how many were fetched.
    pub fn fetch_remote_chunks(
        &self,
        id: SnapshotId,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        let shared = &self.inner.shared;
        let todo = self.remote_chunks_of(id)?;
        let total = todo.len() as u64;
        let mut done = 0;
        for d in &todo {
            let _pin = shared.pin.read();
            let rec = shared.lookup(d)?;
            if rec.extent.is_remote() {
                shared.fetch_remote(d, &rec)?;
            }
            done += 1;
            progress(done, total);
        }
        Ok(total)
    }

    /// Objects of remote source `name` the pool still refers to (space reclamation in the
    /// source must keep them).
    pub fn remote_objects(&self, name: &str) -> Result<Vec<Digest>> {
        let n = self.remote_source_number(name)?;
        Ok(self
            .inner
            .shared
            .meta
            .objects()?
            .into_iter()
            .filter(|(_, r)| r.extent.is_remote() && r.extent.offset == n)
            .map(|(d, _)| d)
            .collect())
    }
}

impl std::fmt::Debug for Remotes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .fetchers
            .read()
            .values()
            .map(|(n, _)| n.clone())
            .collect();
        f.debug_struct("Remotes").field("sources", &names).finish()
    }
}
