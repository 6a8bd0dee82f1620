//! Pushing snapshots to a real S3 server (s3s-fs on 127.0.0.1, SigV4 checked), reading them
//! back checked, and what faults in the bucket or the server do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use maas_pool::{BlockDevice, CreateOptions, OpenOptions, Pool, SnapshotId};
use maas_s3::manifest::SnapshotMeta;
use maas_s3::push::{PushOptions, PushProgress, push_snapshot};
use maas_s3::verify::verify_snapshot;
use maas_s3::{Archive, ArchiveError, Bucket, TargetConfig};
use maas_tests::TestDir;
use maas_tests::s3::{Kind, S3Server};

mod common;
use common::target_config;

const MIB: usize = 1 << 20;
const TARGET: &str = "arch-test";

fn pool(dir: &std::path::Path) -> Pool {
    Pool::create(
        &dir.join("pool"),
        CreateOptions::default(),
        OpenOptions {
            background: false,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

fn cfg(s: &S3Server, bucket: &str) -> TargetConfig {
    target_config(s, bucket, "site-a/")
}

/// Deterministic data: half compressible text, half random, per MiB.
fn data(seed: u64, len: usize) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    for (i, m) in v.chunks_mut(MIB).enumerate() {
        if i % 2 == 0 {
            let line = format!("{seed} log line {i} the quick brown fox\n");
            for (j, b) in m.iter_mut().enumerate() {
                *b = line.as_bytes()[j % line.len()];
            }
        } else {
            r.fill(m);
        }
    }
    v
}

fn seal_with(pool: &Pool, name: &str, writes: &[(u64, Vec<u8>)]) -> SnapshotId {
    let vi = match pool.volume_by_name(name) {
        Ok(v) => v,
        Err(_) => pool.create_volume(name, 256 * MIB as u64, 4096).unwrap(),
    };
    let v = pool.open_volume(vi.id).unwrap();
    for (off, b) in writes {
        v.write(*off, b, false).unwrap();
    }
    v.flush().unwrap();
    pool.seal(vi.id).unwrap().id
}

fn meta(id: &str) -> SnapshotMeta {
    SnapshotMeta {
        id: id.into(),
        volume: "vol-1".into(),
        volume_name: "v".into(),
        size: 256 * MIB as u64,
        block_size: 4096,
        created_at: "2026-12-07T00:00:00Z".into(),
        locked_until: None,
    }
}

fn push(
    a: &Archive,
    p: &Pool,
    b: &Bucket,
    snap: SnapshotId,
    id: &str,
) -> Result<PushProgress, ArchiveError> {
    let opts = PushOptions {
        pack_bytes: 4 * MIB,
        parallel: 3,
    };
    push_snapshot(a, p, b, TARGET, snap, meta(id), opts, &mut |_| {}).map(|r| r.progress)
}

#[test]
fn snapshots_go_to_the_bucket_once_and_come_back_checked() {
    let dir = TestDir::new("maas-s3-push");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let archive = Archive::new(2).unwrap();
    let pool = pool(dir.path());
    let bucket = Bucket::new(cfg(&s3, "maas")).unwrap();
    let check = archive
        .block_on(maas_s3::target::check(&bucket, "pool", false))
        .unwrap();
    assert!(!check.existing_archive);

    let day1 = data(1, 40 * MIB);
    let s1 = seal_with(&pool, "v", &[(0, day1.clone())]);
    let p1 = push(&archive, &pool, &bucket, s1, "snap-1").unwrap();
    assert_eq!(p1.objects_sent, p1.objects_total);
    assert!(p1.objects_total >= 40, "{p1:?}");
    assert!(p1.packs_sent >= 3, "{p1:?}");

    // What a third party sees: the manifest, packs of at least the pack size (but the last),
    // the snapshot's manifest; nothing else.
    let objects = s3.list("maas");
    let packs: Vec<_> = objects
        .iter()
        .filter(|(k, _)| k.starts_with("site-a/packs/"))
        .collect();
    assert_eq!(packs.len() as u64, p1.packs_sent, "{objects:?}");
    let small = packs.iter().filter(|(_, n)| *n < 4 * MIB as u64).count();
    assert!(small <= 1, "more than one pack under 4 MiB: {packs:?}");
    assert!(objects.iter().any(|(k, _)| k == "site-a/maas-archive.json"));
    assert!(
        objects
            .iter()
            .any(|(k, _)| k == "site-a/snapshots/snap-1.json")
    );
    let keys = format!("site-a/keys/{}.json", pool.pool_id());
    assert!(objects.iter().any(|(k, _)| *k == keys), "{objects:?}");
    assert_eq!(objects.len(), packs.len() + 3, "{objects:?}");

    let v = verify_snapshot(&archive, &pool, &bucket, TARGET, "snap-1", &mut |_| {}).unwrap();
    assert_eq!(v.objects, p1.objects_total);

    // The same snapshot again: nothing to send.
    let again = push(&archive, &pool, &bucket, s1, "snap-1").unwrap();
    assert_eq!((again.objects_to_send, again.packs_sent), (0, 0));

    // The next day: 2 MiB changed at one place; only that goes (two chunks, a leaf, a root).
    let s2 = seal_with(&pool, "v", &[(8 * MIB as u64, data(2, 2 * MIB))]);
    let p2 = push(&archive, &pool, &bucket, s2, "snap-2").unwrap();
    assert!(
        p2.objects_sent <= 4 && p2.objects_sent >= 2,
        "incremental push sent {p2:?}"
    );
    assert_eq!(p2.packs_sent, 1);
    verify_snapshot(&archive, &pool, &bucket, TARGET, "snap-2", &mut |_| {}).unwrap();

    // Another volume holding the same data: its chunks are already there.
    let s3v = seal_with(&pool, "w", &[(0, day1)]);
    let p3 = push(&archive, &pool, &bucket, s3v, "snap-3").unwrap();
    assert!(
        p3.objects_sent <= 2,
        "shared chunks were sent again: {p3:?}"
    );

    // Each object comes back with one ranged GET, checked.
    let image = pool.snapshot_objects(s2).unwrap();
    for (d, kind) in image.objects.iter().take(5) {
        let (k, _raw) = archive
            .block_on(maas_s3::verify::fetch_object(&bucket, &pool, TARGET, d))
            .unwrap();
        assert_eq!(k, *kind);
    }
}

#[test]
fn damaged_or_missing_packs_are_named_never_returned() {
    let dir = TestDir::new("maas-s3-damage");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let archive = Archive::new(2).unwrap();
    let pool = pool(dir.path());
    let bucket = Bucket::new(cfg(&s3, "maas")).unwrap();
    archive
        .block_on(maas_s3::target::check(&bucket, "pool", false))
        .unwrap();
    let s1 = seal_with(&pool, "v", &[(0, data(3, 12 * MIB))]);
    push(&archive, &pool, &bucket, s1, "snap-1").unwrap();
    let image = pool.snapshot_objects(s1).unwrap();
    let chunk = image.objects.last().unwrap().0;
    let (loc, pack) = pool.archive_locate(TARGET, &chunk).unwrap().unwrap();

    // One flipped byte inside a chunk's frames, under the server.
    let path = s3.object_path("maas", &format!("site-a/{}", pack.key));
    let mut b = std::fs::read(&path).unwrap();
    let at = (loc.offset + u64::from(loc.len) - 10) as usize;
    b[at] ^= 1;
    std::fs::write(&path, &b).unwrap();
    let e = archive
        .block_on(maas_s3::verify::fetch_object(
            &bucket, &pool, TARGET, &chunk,
        ))
        .unwrap_err();
    assert!(
        matches!(&e, ArchiveError::Damaged { key, .. } if key.ends_with(&pack.key)),
        "{e:?}"
    );
    let e = verify_snapshot(&archive, &pool, &bucket, TARGET, "snap-1", &mut |_| {}).unwrap_err();
    assert!(
        matches!(&e, ArchiveError::Damaged { key, .. } if key.ends_with(&pack.key)),
        "{e:?}"
    );
    assert_eq!(e.code(), "ARCHIVE_OBJECT_DAMAGED");

    // The pack deleted: reads name it as missing.
    std::fs::remove_file(&path).unwrap();
    let e = archive
        .block_on(maas_s3::verify::fetch_object(
            &bucket, &pool, TARGET, &chunk,
        ))
        .unwrap_err();
    assert!(
        matches!(&e, ArchiveError::Missing { key } if key.ends_with(&pack.key)),
        "{e:?}"
    );
    let e = verify_snapshot(&archive, &pool, &bucket, TARGET, "snap-1", &mut |_| {}).unwrap_err();
    assert_eq!(e.code(), "ARCHIVE_OBJECT_MISSING", "{e:?}");
}

#[test]
fn a_push_survives_the_server_restarting_and_resumes_after_giving_up() {
    let dir = TestDir::new("maas-s3-restart");
    let mut s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let archive = Archive::new(2).unwrap();
    let pool = pool(dir.path());
    let bucket = Bucket::new(cfg(&s3, "maas"))
        .unwrap()
        .with_retry_for(Duration::from_secs(30));
    archive
        .block_on(maas_s3::target::check(&bucket, "pool", false))
        .unwrap();
    let s1 = seal_with(&pool, "v", &[(0, data(4, 120 * MIB))]);

    // The server is killed once a few packs are in, and comes back 2 s later: the push waits
    // and finishes.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let restarter = std::thread::spawn(move || {
        rx.recv().unwrap();
        s3.kill();
        std::thread::sleep(Duration::from_secs(2));
        s3.restart();
        (s3, std::time::Instant::now())
    });
    let mut signalled = false;
    let opts = PushOptions {
        pack_bytes: 4 * MIB,
        parallel: 2,
    };
    let r = push_snapshot(
        &archive,
        &pool,
        &bucket,
        TARGET,
        s1,
        meta("snap-1"),
        opts,
        &mut |p| {
            if p.packs_sent >= 2 && !signalled {
                signalled = true;
                let _ = tx.send(());
            }
        },
    )
    .unwrap();
    let done = std::time::Instant::now();
    assert!(
        signalled,
        "the push ended before the server could be killed"
    );
    let (mut s3, restarted) = restarter.join().unwrap();
    assert!(
        done > restarted,
        "the push finished before the server came back: it did not meet the outage"
    );
    assert_eq!(r.progress.objects_sent, r.progress.objects_total);
    verify_snapshot(&archive, &pool, &bucket, TARGET, "snap-1", &mut |_| {}).unwrap();

    // Killed for longer than the retry window: the push fails, saying what; run again once
    // the server is back, it sends only what was not sent.
    let s2 = seal_with(&pool, "w", &[(0, data(5, 120 * MIB))]);
    let short = Bucket::new(cfg(&s3, "maas"))
        .unwrap()
        .with_retry_for(Duration::from_secs(1));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        rx.recv().unwrap();
        s3.kill();
        s3
    });
    let mut signalled = false;
    let e = push_snapshot(
        &archive,
        &pool,
        &short,
        TARGET,
        s2,
        meta("snap-2"),
        opts,
        &mut |p| {
            if p.packs_sent >= 3 && !signalled {
                signalled = true;
                let _ = tx.send(());
            }
        },
    )
    .unwrap_err();
    assert_eq!(e.code(), "ARCHIVE_UNREACHABLE", "{e:?}");
    let mut s3 = killer.join().unwrap();
    // Not published: a snapshot is in the bucket only once whole.
    s3.restart();
    assert!(
        !s3.list("maas")
            .iter()
            .any(|(k, _)| k == "site-a/snapshots/snap-2.json")
    );
    let resumed = push(&archive, &pool, &short, s2, "snap-2").unwrap();
    assert!(
        resumed.objects_to_send < resumed.objects_total,
        "nothing of the first attempt was kept: {resumed:?}"
    );
    assert!(resumed.objects_to_send > 0, "{resumed:?}");
    verify_snapshot(&archive, &pool, &short, TARGET, "snap-2", &mut |_| {}).unwrap();
}

#[test]
fn targets_that_cannot_work_are_refused_with_what_to_fix() {
    let dir = TestDir::new("maas-s3-targets");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let archive = Archive::new(1).unwrap();
    let check = |c: TargetConfig| {
        let b = Bucket::new(c)?.with_retry_for(Duration::from_millis(100));
        archive.block_on(maas_s3::target::check(&b, "pool", false))
    };
    let mut c = cfg(&s3, "maas");
    c.secret_access_key = "wrong".into();
    assert_eq!(check(c).unwrap_err().code(), "ARCHIVE_CREDENTIALS_REJECTED");
    let c = cfg(&s3, "no-such-bucket");
    assert_eq!(check(c).unwrap_err().code(), "ARCHIVE_BUCKET_NOT_FOUND");
    let mut c = cfg(&s3, "maas");
    c.endpoint = "http://no-such-host.invalid:9000".into();
    assert_eq!(check(c).unwrap_err().code(), "ARCHIVE_UNREACHABLE");
    let mut c = cfg(&s3, "maas");
    c.endpoint = "http://127.0.0.1:1".into();
    assert_eq!(check(c).unwrap_err().code(), "ARCHIVE_UNREACHABLE");
    // A prefix holding something that is not a MaaS archive.
    s3.aws(&[
        "s3api",
        "put-object",
        "--bucket",
        "maas",
        "--key",
        "other/maas-archive.json",
    ]);
    let mut c = cfg(&s3, "maas");
    c.prefix = "other/".into();
    assert_eq!(check(c).unwrap_err().code(), "ARCHIVE_FORMAT_UNSUPPORTED");
    assert!(check(cfg(&s3, "maas")).is_ok());
}
