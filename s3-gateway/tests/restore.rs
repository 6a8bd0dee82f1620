//! Rehydrating archived snapshots from a real S3 server (s3s-fs) into the pool: the bytes come
//! back the same, damage in the bucket fails the restore naming the pack and leaves nothing
//! behind, and chunks written by another pool are re-keyed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use maas_pool::import::{ImportSpec, StoredChunk};
use maas_pool::{BlockDevice, CreateOptions, OpenOptions, Pool, SnapshotId};
use maas_s3::manifest::SnapshotMeta;
use maas_s3::push::{PushOptions, push_snapshot};
use maas_s3::restore::{RestoreOptions, restore_snapshot};
use maas_s3::{Archive, ArchiveError, Bucket};
use maas_tests::TestDir;
use maas_tests::s3::{Kind, S3Server};

mod common;
use common::{MIB, data, target_config};

const TARGET: &str = "arch-test";
const SIZE: u64 = 64 << 20;

fn pool(dir: &std::path::Path) -> Pool {
    Pool::create(
        dir,
        CreateOptions::default(),
        OpenOptions {
            background: false,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// A volume holding `image` at offset 4 MiB, sealed; returns the snapshot and the whole image.
fn sealed(pool: &Pool, name: &str, seed: u64) -> (SnapshotId, Vec<u8>) {
    let vi = pool.create_volume(name, SIZE, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let d = data(seed, 30 * MIB);
    v.write(4 * MIB as u64, &d, false).unwrap();
    v.flush().unwrap();
    let mut image = vec![0u8; SIZE as usize];
    image[4 * MIB..4 * MIB + d.len()].copy_from_slice(&d);
    (pool.seal(vi.id).unwrap().id, image)
}

fn read_all(pool: &Pool, snap: SnapshotId, name: &str) -> Vec<u8> {
    let vi = pool.clone_snapshot(snap, name).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    v.read(0, &mut buf).unwrap();
    buf
}

fn meta(id: &str) -> SnapshotMeta {
    SnapshotMeta {
        id: id.into(),
        volume: "vol-1".into(),
        volume_name: "v".into(),
        size: SIZE,
        block_size: 4096,
        created_at: "2026-12-07T00:00:00Z".into(),
        locked_until: None,
    }
}

#[test]
fn a_rehydrated_snapshot_reads_back_the_same_bytes_and_damage_leaves_nothing() {
    let dir = TestDir::new("maas-s3-restore");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let archive = Archive::new(2).unwrap();
    let pool = pool(&dir.path().join("pool"));
    let bucket = Bucket::new(target_config(&s3, "maas", "")).unwrap();
    let (snap, image) = sealed(&pool, "v", 7);
    let opts = PushOptions {
        pack_bytes: 4 * MIB,
        parallel: 2,
    };
    push_snapshot(
        &archive,
        &pool,
        &bucket,
        TARGET,
        snap,
        meta("snap-1"),
        opts,
        &mut |_| {},
    )
    .unwrap();
    // The local copy goes: snapshot and volume deleted, space reclaimed.
    pool.delete_snapshot(snap).unwrap();
    pool.delete_volume(pool.volume_by_name("v").unwrap().id)
        .unwrap();
    pool.reclaim().unwrap();
    assert_eq!(
        pool.stats().unwrap().chunks,
        0,
        "the local copy is still there"
    );

    let mut last = Default::default();
    let back = restore_snapshot(
        &archive,
        &pool,
        &bucket,
        TARGET,
        "snap-1",
        None,
        RestoreOptions::default(),
        &mut |p| last = *p,
    )
    .unwrap();
    assert_eq!(back.size, SIZE);
    assert_eq!(last.chunks_done, last.chunks_total);
    assert!(
        last.requests >= 1 && last.requests < last.chunks_total,
        "{last:?}"
    );
    assert!(
        read_all(&pool, back.id, "r1") == image,
        "rehydrated bytes differ"
    );

    // A flipped byte in a pack: the restore fails naming the pack; no snapshot appears and
    // the space it took is free again.
    pool.delete_volume(pool.volume_by_name("r1").unwrap().id)
        .unwrap();
    pool.delete_snapshot(back.id).unwrap();
    pool.reclaim().unwrap();
    let before = pool.stats().unwrap();
    let packs: Vec<_> = s3
        .list("maas")
        .into_iter()
        .filter(|(k, _)| k.starts_with("packs/"))
        .collect();
    let (victim, len) = packs.iter().max_by_key(|(_, n)| *n).unwrap().clone();
    let path = s3.object_path("maas", &victim);
    let mut b = std::fs::read(&path).unwrap();
    b[(len / 2) as usize] ^= 0x10;
    std::fs::write(&path, &b).unwrap();
    let e = restore_snapshot(
        &archive,
        &pool,
        &bucket,
        TARGET,
        "snap-1",
        None,
        RestoreOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(&e, ArchiveError::Damaged { key, .. } if *key == victim),
        "{e:?} does not name {victim}"
    );
    let after = pool.stats().unwrap();
    assert_eq!(pool.snapshots().unwrap().len(), 0);
    pool.reclaim().unwrap();
    assert_eq!(
        (after.chunks, after.used_bytes),
        (before.chunks, before.used_bytes),
        "the failed restore left objects"
    );

    // The pack deleted: the restore says which object is missing.
    std::fs::remove_file(&path).unwrap();
    let e = restore_snapshot(
        &archive,
        &pool,
        &bucket,
        TARGET,
        "snap-1",
        None,
        RestoreOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(&e, ArchiveError::Missing { key } if *key == victim),
        "{e:?} does not name {victim}"
    );
}

#[test]
fn chunks_of_another_pool_are_checked_with_its_keys_and_re_keyed() {
    let dir = TestDir::new("maas-s3-rekey");
    let a = pool(&dir.path().join("a"));
    let b = pool(&dir.path().join("b"));
    let (snap, image) = sealed(&a, "v", 9);
    let objects = a.snapshot_objects(snap).unwrap();
    let root = objects.root.unwrap();
    // Chunk numbers from a's index, stored bytes from a's devices.
    let mut chunks = Vec::new();
    let root_node = maas_pool::index::Node::decode(
        &a.check_stored_object(
            None,
            &root,
            maas_pool::object::ObjectKind::Node,
            &a.read_stored_object(&root).unwrap().bytes,
            "root",
        )
        .unwrap(),
    )
    .unwrap();
    for (l, leaf) in root_node.entries.iter().enumerate() {
        let Some(leaf) = leaf else { continue };
        let so = a.read_stored_object(leaf).unwrap();
        let raw = a
            .check_stored_object(
                None,
                leaf,
                maas_pool::object::ObjectKind::Node,
                &so.bytes,
                "leaf",
            )
            .unwrap();
        let node = maas_pool::index::Node::decode(&raw).unwrap();
        for (i, c) in node.entries.iter().enumerate() {
            if let Some(c) = c {
                chunks.push(StoredChunk {
                    chunk_nos: vec![l as u64 * 4096 + i as u64],
                    digest: *c,
                    bytes: a.read_stored_object(c).unwrap().bytes,
                });
            }
        }
    }
    let spec = ImportSpec {
        volume_name: "v".into(),
        size: SIZE,
        block_size: 4096,
        created_unix: 0,
        locked_until_unix: None,
        damaged_blocks: Vec::new(),
        origin: None,
    };
    // With b's own keys the chunks do not check: they are a's.
    let mut once = Some(chunks.clone());
    let e = b
        .import_snapshot(&spec, None, &mut || Ok(once.take()))
        .unwrap_err();
    assert!(matches!(e, maas_pool::PoolError::Checksum { .. }), "{e:?}");
    assert_eq!(b.snapshots().unwrap().len(), 0);
    // With a's keys they do, and come back under b's digests.
    let keys = a.digest_keys();
    let mut once = Some(chunks);
    let s = b
        .import_snapshot(&spec, Some(&keys), &mut || Ok(once.take()))
        .unwrap();
    let b_objects = b.snapshot_objects(s.id).unwrap();
    assert_ne!(b_objects.root, objects.root, "not re-keyed");
    assert!(read_all(&b, s.id, "r") == image, "re-keyed bytes differ");
    // b verifies its own copy end to end.
    let v = b.verify().unwrap();
    assert!(v.damaged.is_empty(), "{v:?}");
}

#[test]
fn a_fresh_pool_too_small_for_the_snapshot_fails_cleanly_then_imports_it_when_it_has_room() {
    let dir = TestDir::new("maas-s3-full");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let archive = Archive::new(2).unwrap();
    let cfg = target_config(&s3, "maas", "");
    let bucket = Bucket::new(cfg).unwrap();
    let a = pool(&dir.path().join("a"));
    let (snap, image) = sealed(&a, "v", 11);
    push_snapshot(
        &archive,
        &a,
        &bucket,
        TARGET,
        snap,
        meta("snap-1"),
        PushOptions::default(),
        &mut |_| {},
    )
    .unwrap();

    // Another pool on an 8 MiB device: the snapshot's ~20 MiB of stored chunks cannot fit.
    let small = Pool::create(
        &dir.path().join("small"),
        CreateOptions {
            devices: vec![maas_pool::DeviceSpec {
                path: "data-0.dev".into(),
                tier: maas_pool::Tier::Hdd,
                size: 8 << 20,
            }],
            ..CreateOptions::default()
        },
        OpenOptions {
            background: false,
            wal_segment_bytes: 1 << 20,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let scan =
        maas_s3::import::scan_bucket(&archive, &small, &bucket, TARGET, &mut |_| {}).unwrap();
    assert_eq!(scan.snapshots.len(), 1);
    assert!(scan.packs_indexed >= 1);
    let keys = archive
        .block_on(maas_s3::keys::read_keys(&bucket, &a.pool_id().to_string()))
        .unwrap();
    let before = small.stats().unwrap();
    let e = restore_snapshot(
        &archive,
        &small,
        &bucket,
        TARGET,
        "snap-1",
        Some(&keys),
        RestoreOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(e, ArchiveError::Pool(maas_pool::PoolError::NoSpace(_))),
        "{e:?}"
    );
    let after = small.stats().unwrap();
    assert_eq!(small.snapshots().unwrap().len(), 0);
    assert_eq!(
        after.free_bytes, before.free_bytes,
        "the failed restore kept space"
    );

    // With room (a device added), the same restore works and reads back the image.
    small
        .add_device(maas_pool::DeviceSpec {
            path: "data-1.dev".into(),
            tier: maas_pool::Tier::Hdd,
            size: 256 << 20,
        })
        .unwrap();
    let s = restore_snapshot(
        &archive,
        &small,
        &bucket,
        TARGET,
        "snap-1",
        Some(&keys),
        RestoreOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert!(read_all(&small, s.id, "r") == image);
}

#[test]
fn a_rehydrate_waits_for_a_restarting_server_and_finishes() {
    let dir = TestDir::new("maas-s3-restore-restart");
    let mut s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let archive = Archive::new(2).unwrap();
    let pool = pool(&dir.path().join("pool"));
    let bucket = Bucket::new(target_config(&s3, "maas", ""))
        .unwrap()
        .with_retry_for(std::time::Duration::from_secs(30));
    let (snap, image) = sealed(&pool, "v", 13);
    let opts = PushOptions {
        pack_bytes: MIB,
        parallel: 2,
    };
    push_snapshot(
        &archive,
        &pool,
        &bucket,
        TARGET,
        snap,
        meta("snap-1"),
        opts,
        &mut |_| {},
    )
    .unwrap();
    pool.delete_snapshot(snap).unwrap();
    pool.delete_volume(pool.volume_by_name("v").unwrap().id)
        .unwrap();
    pool.reclaim().unwrap();

    // The server dies at the first batch and comes back 2 s later.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let restarter = std::thread::spawn(move || {
        rx.recv().unwrap();
        s3.kill();
        std::thread::sleep(std::time::Duration::from_secs(2));
        s3.restart();
        (s3, std::time::Instant::now())
    });
    let mut signalled = false;
    let back = restore_snapshot(
        &archive,
        &pool,
        &bucket,
        TARGET,
        "snap-1",
        None,
        RestoreOptions { parallel: 1 },
        &mut |p| {
            if p.chunks_done > 0 && !signalled {
                signalled = true;
                let _ = tx.send(());
            }
        },
    );
    let done = std::time::Instant::now();
    let (_s3, restarted) = restarter.join().unwrap();
    let back = back.unwrap();
    assert!(signalled);
    assert!(done > restarted, "the rehydrate did not meet the outage");
    assert!(read_all(&pool, back.id, "r") == image);
}
