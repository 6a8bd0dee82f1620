//! Pushing a sealed snapshot to a target: only the objects the target does not hold yet (the
//! pool's records say which, no LIST), packed into large objects, uploaded in parallel with
//! bounded memory, each pack recorded in the pool once the bucket acknowledged it, and the
//! snapshot's manifest written last.
//!
//! Resuming is the same call: a push killed half-way finds the packs it completed in the
//! pool's records and sends the rest. A pack uploaded but not yet recorded when the process
//! died is sent again (its objects were never counted as archived); if its contents come out
//! the same, it lands on the same name.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use maas_pool::types::SnapshotId;
use maas_pool::{Pool, types::Digest};

use crate::Archive;
use crate::bucket::Bucket;
use crate::error::{ArchiveError, Result};
use crate::manifest::{FORMAT_VERSION, SNAPSHOT_FORMAT, SnapshotManifest, SnapshotMeta};
use crate::pack::{FinishedPack, PackWriter};

#[derive(Debug, Clone, Copy)]
pub struct PushOptions {
    /// A pack is sent once it holds at least this many bytes.
    pub pack_bytes: usize,
    /// Packs uploaded at once. Memory is bounded by (parallel + 2) packs.
    pub parallel: usize,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            pack_bytes: 32 << 20,
            parallel: 4,
        }
    }
}

/// Where a push is, for progress reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushProgress {
    pub objects_total: u64,
    /// Objects the target did not hold when the push started.
    pub objects_to_send: u64,
    pub objects_sent: u64,
    /// Stored bytes of the objects to send.
    pub bytes_to_send: u64,
    pub bytes_sent: u64,
    pub packs_sent: u64,
}

#[derive(Debug, Clone)]
pub struct PushReport {
    pub progress: PushProgress,
    pub manifest: SnapshotManifest,
    pub seconds: f64,
}

#[derive(Debug, Default)]
struct Counters {
    objects: AtomicU64,
    bytes: AtomicU64,
    packs: AtomicU64,
}

/// Pushes snapshot `snap` of `pool` to the target recorded as `target` in the pool, reporting
/// progress about every 200 ms. Runs on the caller's (blocking) thread; uploads run on the
/// archive's runtime.
#[allow(clippy::too_many_arguments)]
pub fn push_snapshot(
    archive: &Archive,
    pool: &Pool,
    bucket: &Bucket,
    target: &str,
    snap: SnapshotId,
    meta: SnapshotMeta,
    opts: PushOptions,
    progress: &mut dyn FnMut(&PushProgress),
) -> Result<PushReport> {
    let started = Instant::now();
    // The pool's records say what the bucket holds; one request checks the prefix is still
    // the one they describe (not deleted, recreated or emptied behind MaaS's back).
    archive.block_on(crate::target::ensure_prefix(bucket, pool, target))?;
    let image = pool.snapshot_objects(snap)?;
    let kinds: HashMap<Digest, maas_pool::object::ObjectKind> =
        image.objects.iter().copied().collect();
    let digests: Vec<Digest> = image.objects.iter().map(|(d, _)| *d).collect();
    let missing = pool.archive_missing(target, &digests)?;
    let mut p = PushProgress {
        objects_total: digests.len() as u64,
        objects_to_send: missing.len() as u64,
        ..Default::default()
    };
    tracing::info!(
        snapshot = %meta.id,
        objects = p.objects_total,
        to_send = p.objects_to_send,
        "archive push started"
    );
    let counters = Arc::new(Counters::default());
    let (tx, rx) = tokio::sync::mpsc::channel::<FinishedPack>(1);
    let uploader = archive.handle().spawn(upload_all(
        rx,
        bucket.clone(),
        pool.clone(),
        target.to_string(),
        counters.clone(),
        opts.parallel.max(1),
    ));
    let report = |p: &mut PushProgress, progress: &mut dyn FnMut(&PushProgress)| {
        p.objects_sent = counters.objects.load(Ordering::Relaxed);
        p.bytes_sent = counters.bytes.load(Ordering::Relaxed);
        p.packs_sent = counters.packs.load(Ordering::Relaxed);
        progress(p);
    };
    let mut last_report = Instant::now();
    let mut pack = PackWriter::new(bucket.config().cipher.clone());
    let mut produce_err = None;
    for d in &missing {
        let obj = match pool.read_stored_object(d) {
            Ok(o) => o,
            Err(e) => {
                produce_err = Some(ArchiveError::from(e));
                break;
            }
        };
        debug_assert_eq!(kinds.get(d), Some(&obj.kind));
        p.bytes_to_send += obj.bytes.len() as u64;
        pack.add(obj.digest, obj.kind, &obj.bytes);
        if pack.len() >= opts.pack_bytes {
            let next = pack.fresh();
            let full = std::mem::replace(&mut pack, next).finish();
            if tx.blocking_send(full).is_err() {
                break; // the uploader stopped: its error is collected below
            }
        }
        if last_report.elapsed() >= Duration::from_millis(200) {
            report(&mut p, progress);
            last_report = Instant::now();
        }
    }
    if produce_err.is_none() && !pack.is_empty() {
        let _ = tx.blocking_send(pack.finish());
    }
    drop(tx);
    while !uploader.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        if last_report.elapsed() >= Duration::from_millis(200) {
            report(&mut p, progress);
            last_report = Instant::now();
        }
    }
    let uploaded = archive
        .block_on(uploader)
        .map_err(|e| ArchiveError::Internal(format!("upload task: {e}")))?;
    if let Some(e) = produce_err {
        return Err(e);
    }
    uploaded?;
    report(&mut p, progress);

    // Whoever re-imports the bucket checks these objects with this pool's keys.
    archive.block_on(crate::keys::ensure_keys(
        bucket,
        &pool.pool_id().to_string(),
        &pool.digest_keys(),
    ))?;

    // Everything is in the bucket: publish the snapshot.
    let mut packs = BTreeSet::new();
    let mut stored_bytes = 0u64;
    for d in &digests {
        let (loc, pack) = pool.archive_locate(target, d)?.ok_or_else(|| {
            ArchiveError::Internal(format!("object {d} was pushed but has no record"))
        })?;
        stored_bytes += u64::from(loc.len);
        packs.insert(pack.key);
    }
    let manifest = SnapshotManifest {
        format: SNAPSHOT_FORMAT.into(),
        version: FORMAT_VERSION,
        meta,
        chunk_size: pool.chunk_size(),
        pool: pool.pool_id().to_string(),
        root: image.root.map(|r| r.to_hex()),
        damaged_blocks: image.damaged_blocks,
        objects: digests.len() as u64,
        stored_bytes,
        packs: packs.into_iter().collect(),
        archived_at: crate::now_rfc3339(),
    };
    archive.block_on(manifest.store(bucket))?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        snapshot = %manifest.meta.id,
        objects_sent = p.objects_sent,
        bytes_sent = p.bytes_sent,
        packs_sent = p.packs_sent,
        seconds,
        "archive push finished"
    );
    Ok(PushReport {
        progress: p,
        manifest,
        seconds,
    })
}

async fn upload_all(
    rx: tokio::sync::mpsc::Receiver<FinishedPack>,
    bucket: Bucket,
    pool: Pool,
    target: String,
    counters: Arc<Counters>,
    parallel: usize,
) -> Result<()> {
    let packs =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) });
    let uploads = packs
        .map(|pack| {
            let bucket = bucket.clone();
            let pool = pool.clone();
            let target = target.clone();
            let counters = counters.clone();
            async move {
                let len = pack.bytes.len() as u64;
                bucket.put(&pack.key, pack.bytes.clone()).await?;
                let objects = pack.entries.len() as u64;
                tokio::task::spawn_blocking(move || {
                    pool.archive_record_pack(&target, &pack.key, len, &pack.entries)
                })
                .await
                .map_err(|e| ArchiveError::Internal(format!("recording a pack: {e}")))??;
                counters.objects.fetch_add(objects, Ordering::Relaxed);
                counters.bytes.fetch_add(len, Ordering::Relaxed);
                counters.packs.fetch_add(1, Ordering::Relaxed);
                Ok::<(), ArchiveError>(())
            }
        })
        .buffer_unordered(parallel);
    let mut uploads = std::pin::pin!(uploads);
    while let Some(r) = uploads.next().await {
        r?;
    }
    Ok(())
}
