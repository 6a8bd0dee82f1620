//! Mounting archived snapshots straight from a real S3 server (s3s-fs): the index comes at
//! once, chunks as they are read (with read-ahead), each fetched once and kept; the bytes are
//! the archived ones; an unreachable bucket or a damaged pack is a read error, never wrong
//! data, and nothing damaged is kept.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use maas_pool::{BlockDevice, CreateOptions, OpenOptions, Pool, PoolError, SnapshotId};
use maas_s3::lazy::{TargetFetch, mount_snapshot};
use maas_s3::manifest::SnapshotMeta;
use maas_s3::push::{PushOptions, push_snapshot};
use maas_s3::{Archive, Bucket};
use maas_tests::TestDir;
use maas_tests::s3::{Kind, S3Server};

mod common;
use common::{MIB, data, target_config};

const TARGET: &str = "arch-lazy";
const SIZE: u64 = 64 << 20;
/// Where the data starts in the volume, and how long it is.
const AT: usize = 4 * MIB;
const LEN: usize = 30 * MIB;

fn opts() -> OpenOptions {
    OpenOptions {
        background: false,
        ..OpenOptions::default()
    }
}

fn bucket(s3: &S3Server) -> Bucket {
    Bucket::new(target_config(s3, "maas", "")).unwrap()
}

/// A pool whose snapshot "snap-1" (holding `data(7)` at [`AT`]) is only in the bucket.
fn archived_only(dir: &std::path::Path, s3: &S3Server, archive: &Archive) -> (Pool, Vec<u8>) {
    let pool = Pool::create(&dir.join("pool"), CreateOptions::default(), opts()).unwrap();
    let vi = pool.create_volume("v", SIZE, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let d = data(7, LEN);
    v.write(AT as u64, &d, false).unwrap();
    v.flush().unwrap();
    drop(v);
    let snap = pool.seal(vi.id).unwrap().id;
    let meta = SnapshotMeta {
        id: "snap-1".into(),
        volume: "vol-1".into(),
        volume_name: "v".into(),
        size: SIZE,
        block_size: 4096,
        created_at: "2026-12-07T00:00:00Z".into(),
        locked_until: None,
    };
    let opts = PushOptions {
        pack_bytes: 8 * MIB,
        parallel: 2,
    };
    push_snapshot(
        archive,
        &pool,
        &bucket(s3),
        TARGET,
        snap,
        meta,
        opts,
        &mut |_| {},
    )
    .unwrap();
    pool.delete_snapshot(snap).unwrap();
    pool.delete_volume(vi.id).unwrap();
    pool.reclaim().unwrap();
    assert_eq!(
        pool.stats().unwrap().chunks,
        0,
        "the local copy is still there"
    );
    (pool, d)
}

fn remote(pool: &Pool, snap: SnapshotId) -> usize {
    pool.remote_chunks_of(snap).unwrap().len()
}

#[test]
fn a_snapshot_mounted_from_the_archive_reads_at_once_and_fetches_each_chunk_once() {
    let dir = TestDir::new("maas-s3-lazy");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let archive = Archive::new(2).unwrap();
    let (pool, d) = archived_only(dir.path(), &s3, &archive);
    let b = bucket(&s3);
    pool.set_remote_fetch(TARGET, Arc::new(TargetFetch::new(&archive, b.clone())))
        .unwrap();

    let snap = mount_snapshot(&archive, &pool, &b, TARGET, "snap-1")
        .unwrap()
        .id;
    // 30 chunks of data, a third of them zero (never stored): 20 to fetch, none fetched yet.
    assert_eq!(remote(&pool, snap), 20);
    let clone = pool.clone_snapshot(snap, "mounted").unwrap();
    let v = pool.open_volume(clone.id).unwrap();

    // The first block: its chunk, and the chunks packed after it (read-ahead), come in.
    let mut first = vec![0u8; 4096];
    v.read(AT as u64, &mut first).unwrap();
    assert_eq!(first, d[..4096]);
    let left = remote(&pool, snap);
    assert!(
        left < 19 && left > 0,
        "read-ahead should bring some neighbours, not everything: {left} of 20 left"
    );

    // Everything reads back as archived, and then nothing is remote.
    let mut all = vec![0u8; SIZE as usize];
    v.read(0, &mut all).unwrap();
    assert!(
        all[AT..AT + LEN] == d[..],
        "bytes differ from the archived ones"
    );
    assert!(all[..AT].iter().chain(&all[AT + LEN..]).all(|b| *b == 0));
    assert_eq!(remote(&pool, snap), 0);
    let rep = pool.verify().unwrap();
    assert!(rep.damaged.is_empty(), "{rep:?}");
    assert_eq!(rep.objects_remote, 0);

    // The fetched chunks were kept durably: after a restart, with no archive connected and
    // the bucket gone, the clone still reads whole.
    drop(v);
    drop(pool);
    drop(s3);
    let pool = Pool::open(&dir.path().join("pool"), opts()).unwrap();
    let v = pool.open_volume(clone.id).unwrap();
    let mut again = vec![0u8; SIZE as usize];
    v.read(0, &mut again).unwrap();
    assert!(again == all, "a restart lost fetched chunks");
}

#[test]
fn a_sequential_reader_is_served_from_what_was_fetched_ahead_in_the_background() {
    let dir = TestDir::new("maas-s3-lazy-ahead");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let archive = Archive::new(2).unwrap();
    let (pool, d) = archived_only(dir.path(), &s3, &archive);
    let b = bucket(&s3);
    // No read-ahead in the request itself: every chunk not fetched ahead is a fetch.
    let fetch = Arc::new(TargetFetch::new(&archive, b.clone()).with_read_ahead(0));
    pool.set_remote_fetch(TARGET, fetch.clone()).unwrap();
    let snap = mount_snapshot(&archive, &pool, &b, TARGET, "snap-1")
        .unwrap()
        .id;
    let clone = pool.clone_snapshot(snap, "mounted").unwrap();
    let v = pool.open_volume(clone.id).unwrap();
    // A reader going through the data chunk by chunk, as `dd` or a restore would.
    let mut got = vec![0u8; LEN];
    for (i, c) in got.chunks_mut(MIB).enumerate() {
        v.read((AT + i * MIB) as u64, c).unwrap();
    }
    assert!(got == d, "bytes differ from the archived ones");
    assert_eq!(remote(&pool, snap), 0);
    // After two fetches in a row, what follows comes ahead, window after window (of 8 MiB:
    // the chunks compress, the 20 of them fill more than two windows).
    assert!(
        fetch.prefetch_hits() >= 2,
        "{} fetches served from what came ahead",
        fetch.prefetch_hits()
    );
    let rep = pool.verify().unwrap();
    assert!(rep.damaged.is_empty(), "{rep:?}");
}

#[test]
fn an_unreachable_or_damaged_archive_is_a_read_error_never_wrong_data() {
    let dir = TestDir::new("maas-s3-lazy-fail");
    let mut s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let archive = Archive::new(2).unwrap();
    let (pool, d) = archived_only(dir.path(), &s3, &archive);
    let b = bucket(&s3);

    // Not connected yet: the snapshot mounts, but its chunks cannot be read.
    let snap = mount_snapshot(&archive, &pool, &b, TARGET, "snap-1")
        .unwrap()
        .id;
    let clone = pool.clone_snapshot(snap, "mounted").unwrap();
    let v = pool.open_volume(clone.id).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = v.read(AT as u64, &mut buf).unwrap_err();
    assert!(matches!(e, PoolError::Remote { .. }), "{e:?}");

    // Connected (without read-ahead, to see each chunk alone), then the server dies: an
    // error saying the archive cannot be read, not damage; back up, the same read works.
    pool.set_remote_fetch(
        TARGET,
        Arc::new(TargetFetch::new(&archive, b.clone()).with_read_ahead(0)),
    )
    .unwrap();
    s3.kill();
    let e = v.read(AT as u64, &mut buf).unwrap_err();
    assert!(matches!(e, PoolError::Remote { .. }), "{e:?}");
    assert!(!e.is_integrity());
    // While it was just found down, reads fail at once instead of each waiting out retries.
    let t = std::time::Instant::now();
    let e = v.read(AT as u64, &mut buf).unwrap_err();
    assert!(matches!(e, PoolError::Remote { .. }), "{e:?}");
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    s3.restart();
    std::thread::sleep(maas_s3::lazy::BACKOFF);
    v.read(AT as u64, &mut buf).unwrap();
    assert_eq!(buf, d[..4096]);

    // A flipped byte in a pack: the chunk it hits fails as damaged, every other chunk reads
    // right, and the damaged bytes are not kept (repaired in the bucket, the chunk reads).
    let packs: Vec<_> = s3
        .list("maas")
        .into_iter()
        .filter(|(k, _)| k.starts_with("packs/"))
        .collect();
    let (victim, len) = packs.iter().max_by_key(|(_, n)| *n).unwrap().clone();
    let path = s3.object_path("maas", &victim);
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    bad[(len / 2) as usize] ^= 0x10;
    std::fs::write(&path, &bad).unwrap();
    let mut failed = Vec::new();
    let mut chunk = vec![0u8; MIB];
    for c in 0..LEN / MIB {
        match v.read((AT + c * MIB) as u64, &mut chunk) {
            Ok(()) => assert!(chunk == d[c * MIB..(c + 1) * MIB], "chunk {c} differs"),
            Err(e) => {
                assert!(e.is_integrity(), "chunk {c}: {e:?}");
                failed.push(c);
            }
        }
    }
    assert_eq!(
        failed.len(),
        1,
        "one chunk holds the flipped byte: {failed:?}"
    );
    assert_eq!(remote(&pool, snap), 1);
    std::fs::write(&path, &good).unwrap();
    let c = failed[0];
    v.read((AT + c * MIB) as u64, &mut chunk).unwrap();
    assert!(chunk == d[c * MIB..(c + 1) * MIB]);
    assert_eq!(remote(&pool, snap), 0);
}
