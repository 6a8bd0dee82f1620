#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Corruption and disk-full behaviour: damaged data is reported, never returned; a full pool
//! fails new writes cleanly and keeps everything acknowledged readable.

mod common;

use common::*;
use maas_pool::{BlockDevice, OpenOptions, Pool, PoolError};

#[test]
fn damaged_chunks_and_index_nodes_are_detected_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 64u64 << 10;
    let pool = create_pool(dir.path(), 256 * MIB, chunk);
    let vi = pool.create_volume("d", 8 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let data = pattern(5, 8 * MIB as usize);
    v.write(0, &data, true).unwrap();
    let snap = pool.seal(vi.id).unwrap();
    let clean = pool.verify().unwrap();
    assert!(clean.damaged.is_empty());

    // Damage the payload of the chunk at 1 MiB and the header of the chunk at 3 MiB. The data
    // is incompressible, so stored as 4 KiB frames from the object's second block, each with
    // its own CRC: damage its first and last blocks, the two the reads below use.
    let c1 = pool.chunk_of(vi.id, MIB).unwrap().unwrap();
    let c3 = pool.chunk_of(vi.id, 3 * MIB).unwrap().unwrap();
    let (p1, o1, l1) = pool.object_location(&c1).unwrap().unwrap();
    let (p3, o3, _) = pool.object_location(&c3).unwrap().unwrap();
    flip(&p1, o1 + 4096 + 1000);
    flip(&p1, o1 + l1 - 4096 + 100);
    flip(&p3, o3 + 5);
    pool.drop_caches();

    let mut buf = vec![0u8; 4096];
    for off in [MIB, MIB + chunk - 4096, 3 * MIB] {
        let err = v.read(off, &mut buf).unwrap_err();
        assert!(
            matches!(err, PoolError::Checksum { .. } | PoolError::Corrupt { .. }),
            "{off}: {err}"
        );
    }
    // Undamaged neighbours still read correctly.
    v.read(2 * MIB, &mut buf).unwrap();
    assert_eq!(buf, data[2 * MIB as usize..2 * MIB as usize + 4096]);

    let rep = pool.verify().unwrap();
    let mut names: Vec<String> = rep.damaged.iter().map(|d| d.digest.clone()).collect();
    names.sort();
    let mut want = vec![c1.clone(), c3.clone()];
    want.sort();
    assert_eq!(names, want, "verify names exactly the damaged chunks");

    // Damage an index node (metadata of the snapshot): reads through it fail, verify names it.
    let clone = pool.clone_snapshot(snap.id, "c").unwrap();
    let nodes = pool.index_nodes().unwrap();
    assert!(!nodes.is_empty());
    let leaf = &nodes[0];
    let (pl, ol, _) = pool.object_location(leaf).unwrap().unwrap();
    flip(&pl, ol + 64 + 3);
    pool.drop_caches();
    let cv = pool.open_volume(clone.id).unwrap();
    let err = cv.read(2 * MIB, &mut buf).unwrap_err();
    assert!(err.is_integrity(), "{err}");
    let rep = pool.verify().unwrap();
    assert!(
        rep.damaged
            .iter()
            .any(|d| d.digest == *leaf && d.kind == "index-node"),
        "{rep:?}"
    );
    assert_eq!(rep.damaged.len(), 3);
    pool.close().unwrap();
}

#[test]
fn damaged_pool_metadata_fails_open_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create_pool(dir.path(), 64 * MIB, 64 << 10);
    pool.create_volume("x", MIB, 4096).unwrap();
    pool.close().unwrap();
    drop(pool);
    // Device header.
    flip(&dir.path().join("dev0"), 20);
    let err = Pool::open(dir.path(), test_open_opts()).unwrap_err();
    assert!(err.is_integrity(), "{err}");
    flip(&dir.path().join("dev0"), 20);
    Pool::open(dir.path(), test_open_opts())
        .unwrap()
        .close()
        .unwrap();
    // Superblock.
    let sb = dir.path().join("pool.json");
    let text = std::fs::read_to_string(&sb).unwrap();
    std::fs::write(&sb, text.replace("MAAS-POOL", "MAAS-P0OL")).unwrap();
    let err = Pool::open(dir.path(), test_open_opts()).unwrap_err();
    assert!(err.is_integrity(), "{err}");
    // Not a pool at all.
    let err = Pool::open(&dir.path().join("nope"), test_open_opts()).unwrap_err();
    assert!(matches!(err, PoolError::PoolNotFound { .. }), "{err}");
}

#[test]
fn full_pool_fails_writes_cleanly_and_keeps_acknowledged_data() {
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions {
        cache_bytes: 0,
        // Reads must reach the (damaged) device.
        log_cache_bytes: 0,
        wal_segment_bytes: MIB,
        wal_fold_threshold: u64::MAX,
        background: false,
        ..Default::default()
    };
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 24 * MIB, 64 << 10),
        opts.clone(),
    )
    .unwrap();
    let keep = pool.create_volume("keep", 4 * MIB, 4096).unwrap();
    let kv = pool.open_volume(keep.id).unwrap();
    let kept = pattern(9, 2 * MIB as usize);
    kv.write(0, &kept, true).unwrap();
    let ks = pool.seal(keep.id).unwrap();

    let fill = pool.create_volume("fill", 256 * MIB, 4096).unwrap(); // thin: larger than the pool
    let fv = pool.open_volume(fill.id).unwrap();
    let mut off = 0;
    let err = loop {
        match fv
            .write(off, &pattern(off, MIB as usize), false)
            .and_then(|_| fv.flush())
        {
            Ok(()) => off += MIB,
            Err(e) => break e,
        }
        assert!(off < 256 * MIB, "never ran out of space");
    };
    assert!(matches!(err, PoolError::NoSpace(_)), "{err}");
    // Sealing cannot find room either, and says so.
    assert!(matches!(pool.seal(fill.id), Err(PoolError::NoSpace(_))));
    // Everything acknowledged is still readable.
    assert_eq!(read_all(&kv, 0, kept.len()), kept);
    assert_eq!(read_all(&fv, 0, MIB as usize), pattern(0, MIB as usize));
    // Freeing space makes the pool writable again.
    pool.delete_volume(fill.id).unwrap();
    pool.reclaim().unwrap();
    kv.write(2 * MIB, &pattern(10, MIB as usize), true).unwrap();
    pool.close().unwrap();
    drop((kv, fv, pool));
    let pool = Pool::open(dir.path(), opts).unwrap();
    let kv = pool.open_volume(keep.id).unwrap();
    assert_eq!(read_all(&kv, 0, kept.len()), kept);
    assert_eq!(
        read_all(&kv, 2 * MIB, MIB as usize),
        pattern(10, MIB as usize)
    );
    let c = pool.clone_snapshot(ks.id, "ks").unwrap();
    assert_eq!(
        read_all(&pool.open_volume(c.id).unwrap(), 0, kept.len()),
        kept
    );
}

/// Mounts a tmpfs of `mib` MiB at `dir/small`; unmounted when the guard drops.
fn small_tmpfs(dir: &std::path::Path, mib: u64) -> (std::path::PathBuf, impl Drop) {
    let mnt = dir.join("small");
    std::fs::create_dir(&mnt).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "maas-test"])
        .arg(&mnt)
        .status()
        .expect("mount(8) runs: the suite runs as root");
    assert!(
        st.success(),
        "mounting a tmpfs needs root (the suite and CI run as root)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    (mnt.clone(), Unmount(mnt))
}

/// A pool on a 1 GiB thin device file in `mnt` (a small filesystem).
fn thin_pool(mnt: &std::path::Path, opts: &OpenOptions) -> (std::path::PathBuf, Pool) {
    let pool_dir = mnt.join("pool");
    let pool = Pool::create(
        &pool_dir,
        small_pool_opts(&pool_dir, 1 << 30, 64 << 10),
        opts.clone(),
    )
    .unwrap();
    (pool_dir, pool)
}

/// Freed log segments stay written on the host for the next ones (warm space): when the host
/// filesystem under a thin device fills, the pool gives that space back and the fold that
/// needed it goes on, instead of failing where it would not have without warm space.
#[test]
fn warm_log_space_is_given_back_when_the_host_filesystem_fills() {
    let dir = tempfile::tempdir().unwrap();
    let (mnt, _unmount) = small_tmpfs(dir.path(), 64);
    let opts = OpenOptions {
        cache_bytes: 0,
        log_cache_bytes: 0,
        wal_segment_bytes: 4 * MIB,
        // Up to 32 MiB of freed segments may stay warm.
        wal_fold_threshold: 32 * MIB,
        background: false,
        ..Default::default()
    };
    let (pool_dir, pool) = thin_pool(&mnt, &opts);
    let vi = pool.create_volume("v", 256 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    // Each round writes incompressible data through the log and folds it into sealed chunks;
    // the log's segments are freed and stay warm. The first round leaves about 28 MiB of
    // warm segments, the later small ones reuse few of them: sealed data grows until sealed
    // plus warm no longer fit in 64 MiB (by the third round), while sealed plus the log in
    // use (what the filesystem held before warm space) always do.
    let rounds = [28 * MIB, 4 * MIB, 4 * MIB, 4 * MIB];
    let mut at = 0;
    let mut written = Vec::new();
    for (r, &len) in rounds.iter().enumerate() {
        let data = pattern(100 + r as u64, len as usize);
        v.write(at, &data, false).unwrap();
        v.flush().unwrap();
        pool.checkpoint()
            .unwrap_or_else(|e| panic!("fold of round {r}: {e}"));
        written.push((at, data));
        at += len;
    }
    for (at, data) in &written {
        assert_eq!(read_all(&v, *at, data.len()), *data, "at {at}");
    }
    assert!(pool.verify().unwrap().damaged_blocks.is_empty());
    pool.close().unwrap();
    drop((v, pool));
    let pool = Pool::open(&pool_dir, opts).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    for (at, data) in &written {
        assert_eq!(read_all(&v, *at, data.len()), *data, "at {at} after reopen");
    }
}

/// A thin device file larger than its filesystem: when the host filesystem fills, writes fail
/// with NoSpace before they are acknowledged (WAL segments are reserved when allocated), the
/// pool keeps serving what it acknowledged, and it reopens intact. Uses a 48 MiB tmpfs (which
/// also exercises the buffered fallback: tmpfs refuses O_DIRECT).
#[test]
fn host_filesystem_full_under_a_thin_device() {
    let dir = tempfile::tempdir().unwrap();
    let (mnt, _unmount) = small_tmpfs(dir.path(), 48);
    let opts = OpenOptions {
        cache_bytes: 0,
        // Reads must reach the (damaged) device.
        log_cache_bytes: 0,
        wal_segment_bytes: 4 * MIB,
        wal_fold_threshold: u64::MAX,
        background: false,
        ..Default::default()
    };
    let (pool_dir, pool) = thin_pool(&mnt, &opts);
    let vi = pool.create_volume("v", 512 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let mut off = 0;
    let err = loop {
        match v.write(off, &pattern(off, MIB as usize), false) {
            Ok(()) => off += MIB,
            Err(e) => break e,
        }
        assert!(off < 512 * MIB, "the 48 MiB filesystem never filled");
    };
    assert!(matches!(err, PoolError::NoSpace(_)), "{err}");
    // Everything acknowledged before the failure is still there and can be made durable.
    v.flush().unwrap();
    for o in (0..off).step_by(MIB as usize) {
        assert_eq!(
            read_all(&v, o, MIB as usize),
            pattern(o, MIB as usize),
            "offset {o}"
        );
    }
    pool.close().unwrap();
    drop((v, pool));
    let pool = Pool::open(&pool_dir, opts).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    for o in (0..off).step_by(MIB as usize) {
        assert_eq!(
            read_all(&v, o, MIB as usize),
            pattern(o, MIB as usize),
            "offset {o} after reopen"
        );
    }
}
