//! Bringing an archived snapshot back into the pool (rehydrate): its index is read from the
//! bucket, its chunks are fetched with parallel ranged GETs (neighbouring objects of a pack in
//! one request), checked, and handed to the pool in batches, which stores them as they are
//! and commits a new local snapshot once all are durable. Memory is bounded by the requests
//! in flight.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use maas_pool::import::{DigestKeys, ImportSpec, StoredChunk};
use maas_pool::index::Node;
use maas_pool::{Pool, SnapshotInfo, types::Digest};

use crate::Archive;
use crate::bucket::Bucket;
use crate::error::{ArchiveError, Result};
use crate::manifest::SnapshotManifest;
use crate::verify::{fetch_object_from, parse_digest};

/// Objects of one pack closer than this are fetched in one ranged GET.
const MERGE_GAP: u64 = 1 << 20;
/// A ranged GET covers at most this much.
const MAX_SPAN: u64 = 16 << 20;

#[derive(Debug, Clone, Copy)]
pub struct RestoreOptions {
    /// Ranged GETs in flight.
    pub parallel: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions { parallel: 6 }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreProgress {
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub bytes_total: u64,
    pub bytes_fetched: u64,
    pub requests: u64,
}

/// A chunk to fetch: digest, offset in its pack, length, chunk numbers in the image.
type Wanted = (Digest, u64, u32, Vec<u64>);

/// One ranged GET: a span of a pack, and the chunks in it.
#[derive(Debug, Clone)]
struct Span {
    pack: String,
    start: u64,
    len: u64,
    chunks: Vec<Wanted>,
}

/// Reads an archived snapshot's manifest.
pub fn read_manifest(archive: &Archive, bucket: &Bucket, id: &str) -> Result<SnapshotManifest> {
    archive.block_on(SnapshotManifest::fetch(bucket, id))
}

/// What an archived snapshot is (its import spec) and its image: digest -> chunk numbers
/// (one chunk may be at several places), read from its manifest and index nodes in the
/// bucket, every node checked.
pub fn snapshot_plan(
    archive: &Archive,
    pool: &Pool,
    bucket: &Bucket,
    target: &str,
    id: &str,
    source: Option<&DigestKeys>,
) -> Result<(ImportSpec, HashMap<Digest, Vec<u64>>)> {
    let manifest = read_manifest(archive, bucket, id)?;
    if manifest.chunk_size != pool.chunk_size() {
        return Err(ArchiveError::Unsupported {
            what: bucket.key(&SnapshotManifest::key(id)),
            detail: format!(
                "chunks of {} bytes; this pool's are {}",
                manifest.chunk_size,
                pool.chunk_size()
            ),
        });
    }
    let spec = ImportSpec {
        // The pool names volumes by the catalog's volume id.
        volume_name: manifest.meta.volume.clone(),
        size: manifest.meta.size,
        block_size: manifest.meta.block_size,
        created_unix: chrono::DateTime::parse_from_rfc3339(&manifest.meta.created_at)
            .map(|t| t.timestamp())
            .unwrap_or(0),
        locked_until_unix: manifest
            .meta
            .locked_until
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp()),
        damaged_blocks: manifest.damaged_blocks.clone(),
        origin: Some(manifest.meta.id.clone()),
    };
    // The image: chunk number -> digest, from the index nodes in the bucket.
    let mut by_digest: HashMap<Digest, Vec<u64>> = HashMap::new();
    if let Some(root) = &manifest.root {
        let key = SnapshotManifest::key(id);
        let root = parse_digest(root, &key)?;
        let node = |d: &Digest| -> Result<Node> {
            let (_, raw) = archive.block_on(fetch_object_from(bucket, pool, target, d, source))?;
            Node::decode(&raw).map_err(|e| ArchiveError::Damaged {
                key: format!("index node {d}"),
                detail: e.to_string(),
            })
        };
        let root_node = node(&root)?;
        let mut leaves: HashMap<Digest, Node> = HashMap::new();
        for (l, leaf) in root_node.entries.iter().enumerate() {
            let Some(leaf) = leaf else { continue };
            if !leaves.contains_key(leaf) {
                let n = node(leaf)?;
                leaves.insert(*leaf, n);
            }
            let Some(n) = leaves.get(leaf) else { continue };
            for (i, c) in n.entries.iter().enumerate() {
                if let Some(c) = c {
                    let no = l as u64 * maas_pool::index::LEAF_FANOUT + i as u64;
                    by_digest.entry(*c).or_default().push(no);
                }
            }
        }
    }
    Ok((spec, by_digest))
}

/// Rehydrates archived snapshot `id` into the pool as a new local snapshot. `source`: the
/// digest keys of the pool that wrote it (None: this pool).
#[allow(clippy::too_many_arguments)]
pub fn restore_snapshot(
    archive: &Archive,
    pool: &Pool,
    bucket: &Bucket,
    target: &str,
    id: &str,
    source: Option<&DigestKeys>,
    opts: RestoreOptions,
    progress: &mut dyn FnMut(&RestoreProgress),
) -> Result<SnapshotInfo> {
    let started = Instant::now();
    let (spec, by_digest) = snapshot_plan(archive, pool, bucket, target, id, source)?;
    // Where each chunk is, grouped into ranged GETs.
    let mut per_pack: BTreeMap<String, Vec<Wanted>> = BTreeMap::new();
    let mut p = RestoreProgress {
        chunks_total: by_digest.len() as u64,
        ..Default::default()
    };
    for (d, nos) in by_digest {
        let (loc, pack) =
            pool.archive_locate(target, &d)?
                .ok_or_else(|| ArchiveError::Missing {
                    key: format!("chunk {d} (no pack of this target holds it)"),
                })?;
        p.bytes_total += u64::from(loc.len);
        per_pack
            .entry(pack.key)
            .or_default()
            .push((d, loc.offset, loc.len, nos));
    }
    // Which pack holds each chunk, to name it when a chunk fails its checks.
    let pack_of: HashMap<String, String> = per_pack
        .iter()
        .flat_map(|(pack, objs)| objs.iter().map(move |o| (o.0.to_string(), pack.clone())))
        .collect();
    let spans = plan_spans(per_pack);
    tracing::info!(
        snapshot = %id,
        chunks = p.chunks_total,
        bytes = p.bytes_total,
        requests = spans.len(),
        "rehydrate started"
    );
    let fetched = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<StoredChunk>>>(2);
    let fetcher = archive.handle().spawn(fetch_spans(
        spans,
        bucket.clone(),
        tx,
        fetched.clone(),
        requests.clone(),
        opts.parallel.max(1),
    ));
    let mut last = Instant::now();
    let mut next_batch = || -> maas_pool::Result<Option<Vec<StoredChunk>>> {
        match rx.blocking_recv() {
            None => Ok(None),
            Some(Ok(batch)) => {
                let first = p.chunks_done == 0;
                p.chunks_done += batch.len() as u64;
                p.bytes_fetched = fetched.load(Ordering::Relaxed);
                p.requests = requests.load(Ordering::Relaxed);
                if first || last.elapsed() >= Duration::from_millis(200) {
                    progress(&p);
                    last = Instant::now();
                }
                Ok(Some(batch))
            }
            // The pool's error type carries the archive's message; the original is
            // recovered from `fetch_error` below.
            Some(Err(e)) => Err(maas_pool::PoolError::Meta(format!("archive: {e}"))),
        }
    };
    let imported = pool.import_snapshot(&spec, source, &mut next_batch);
    drop(rx);
    let fetch_result = archive
        .block_on(fetcher)
        .map_err(|e| ArchiveError::Internal(format!("fetch task: {e}")))?;
    // A fetch error explains an import failure better than the pool's wrapper of it.
    if let Err(e) = fetch_result
        && imported.is_err()
    {
        return Err(e);
    }
    let info = imported.map_err(|e| damaged_or_pool(e, bucket, &pack_of))?;
    p.bytes_fetched = fetched.load(Ordering::Relaxed);
    p.requests = requests.load(Ordering::Relaxed);
    progress(&p);
    tracing::info!(
        snapshot = %id,
        pool_snapshot = %info.id,
        bytes = p.bytes_fetched,
        requests = p.requests,
        seconds = started.elapsed().as_secs_f64(),
        "rehydrate finished"
    );
    Ok(info)
}

/// A chunk that fails its checks in the pool's import is damage in the bucket.
fn damaged_or_pool(
    e: maas_pool::PoolError,
    bucket: &Bucket,
    pack_of: &HashMap<String, String>,
) -> ArchiveError {
    use maas_pool::PoolError as P;
    // The pool names the chunk by its digest (short form): find its pack.
    let pack = |what: &str| {
        what.split(|c: char| !c.is_ascii_hexdigit())
            .find_map(|w| pack_of.get(w))
            .map(|p| bucket.key(p))
            .unwrap_or_else(|| bucket.key("packs/"))
    };
    match e {
        P::Checksum { what } => ArchiveError::Damaged {
            key: pack(&what),
            detail: format!("{what} failed its checksum"),
        },
        P::Corrupt { what, detail } => ArchiveError::Damaged {
            key: pack(&what),
            detail: format!("{what}: {detail}"),
        },
        other => ArchiveError::Pool(other),
    }
}

fn plan_spans(per_pack: BTreeMap<String, Vec<Wanted>>) -> Vec<Span> {
    let mut spans = Vec::new();
    for (pack, mut objs) in per_pack {
        objs.sort_by_key(|o| o.1);
        let mut cur: Option<Span> = None;
        for o in objs {
            let end = o.1 + u64::from(o.2);
            match &mut cur {
                Some(s) if o.1 <= s.start + s.len + MERGE_GAP && end - s.start <= MAX_SPAN => {
                    s.len = end - s.start;
                    s.chunks.push(o);
                }
                _ => {
                    if let Some(s) = cur.take() {
                        spans.push(s);
                    }
                    cur = Some(Span {
                        pack: pack.clone(),
                        start: o.1,
                        len: u64::from(o.2),
                        chunks: vec![o],
                    });
                }
            }
        }
        if let Some(s) = cur {
            spans.push(s);
        }
    }
    spans
}

async fn fetch_spans(
    spans: Vec<Span>,
    bucket: Bucket,
    tx: tokio::sync::mpsc::Sender<Result<Vec<StoredChunk>>>,
    fetched: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    parallel: usize,
) -> Result<()> {
    let gets = futures_util::stream::iter(spans.into_iter().map(|s| {
        let bucket = bucket.clone();
        let fetched = fetched.clone();
        let requests = requests.clone();
        async move {
            let bytes = bucket
                .get_range(&s.pack, s.start, s.len)
                .await
                .map_err(|e| match e {
                    ArchiveError::Missing { .. } => ArchiveError::Missing {
                        key: bucket.key(&s.pack),
                    },
                    other => other,
                })?;
            requests.fetch_add(1, Ordering::Relaxed);
            fetched.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let chunks =
                s.chunks
                    .into_iter()
                    .map(|(digest, off, len, nos)| {
                        let at = (off - s.start) as usize;
                        let in_pack = bytes.get(at..at + len as usize).ok_or_else(|| {
                            ArchiveError::Damaged {
                                key: bucket.key(&s.pack),
                                detail: "shorter than its index says".into(),
                            }
                        })?;
                        let stored = crate::pack::open_object(bucket.cipher(), &digest, in_pack)
                            .map_err(|e| e.at(bucket.key(&s.pack)))?;
                        Ok(StoredChunk {
                            chunk_nos: nos,
                            digest,
                            bytes: stored,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
            Ok::<_, ArchiveError>(chunks)
        }
    }))
    .buffer_unordered(parallel);
    let mut gets = std::pin::pin!(gets);
    while let Some(r) = gets.next().await {
        match r {
            Ok(batch) => {
                if tx.send(Ok(batch)).await.is_err() {
                    return Ok(()); // the import stopped; its error is reported
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let _ = tx.send(Err(ArchiveError::Internal(msg.clone()))).await;
                return Err(e);
            }
        }
    }
    Ok(())
}
