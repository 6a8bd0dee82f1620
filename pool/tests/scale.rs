#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Concurrency, huge thin volumes, tiers, and moving a pool directory.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use common::*;
use maas_pool::{BlockDevice, CreateOptions, DeviceSpec, Pool, Tier};

#[test]
fn many_threads_with_concurrent_seals() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create_pool(dir.path(), 512 * MIB, 64 << 10);
    let vi = pool.create_volume("busy", 64 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // A sealer runs while 6 writers each own an 8 MiB region and write/read-verify it.
    let sealer = {
        let (pool, stop) = (pool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                pool.seal(vi.id).unwrap();
                n += 1;
            }
            n
        })
    };
    let writers: Vec<_> = (0..6u64)
        .map(|t| {
            let v = v.clone();
            std::thread::spawn(move || {
                let base = t * 8 * MIB;
                let mut model = vec![0u8; 8 * MIB as usize];
                for i in 0..300u64 {
                    let off = (i * 7919 * 4096) % (8 * MIB - 64 * 1024);
                    let len = 4096 * (1 + (i % 16));
                    let data = pattern(t << 32 | i, len as usize);
                    v.write(base + off, &data, i % 50 == 0).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    if i % 10 == 0 {
                        assert_eq!(read_all(&v, base + off, len as usize), data);
                    }
                }
                (t, model)
            })
        })
        .collect();
    let models: Vec<(u64, Vec<u8>)> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    let seals = sealer.join().unwrap();
    assert!(seals >= 2, "sealer ran {seals} times");
    for (t, m) in &models {
        assert!(read_all(&v, t * 8 * MIB, m.len()) == *m, "region {t}");
    }
    // A final seal holds exactly the final state.
    let s = pool.seal(vi.id).unwrap();
    let c = pool.clone_snapshot(s.id, "final").unwrap();
    let cv = pool.open_volume(c.id).unwrap();
    for (t, m) in &models {
        assert!(
            read_all(&cv, t * 8 * MIB, m.len()) == *m,
            "snapshot region {t}"
        );
    }
    assert!(pool.verify().unwrap().damaged.is_empty());
}

#[test]
fn huge_thin_volumes_seal_and_clone_in_constant_time() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        dir.path(),
        CreateOptions {
            devices: vec![DeviceSpec {
                path: "dev0".into(),
                tier: Tier::Ssd,
                size: 256 * MIB,
            }],
            ..CreateOptions::default()
        },
        test_open_opts(),
    )
    .unwrap();
    let tib = 1u64 << 40;
    let vi = pool.create_volume("big", 64 * tib, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let ends = [0, 17 * tib + 12345 * 4096, 64 * tib - 4096];
    for (i, off) in ends.iter().enumerate() {
        v.write(*off, &pattern(i as u64, 4096), false).unwrap();
    }
    let t = Instant::now();
    let s1 = pool.seal(vi.id).unwrap();
    let first = t.elapsed();
    let t = Instant::now();
    let s2 = pool.seal(vi.id).unwrap(); // unchanged 64 TiB volume
    let unchanged = t.elapsed();
    let t = Instant::now();
    let c = pool.clone_snapshot(s2.id, "big-clone").unwrap();
    let clone_t = t.elapsed();
    assert!(
        first.as_secs_f64() < 5.0 && unchanged.as_secs_f64() < 1.0 && clone_t.as_secs_f64() < 1.0,
        "seal {first:?}, unchanged seal {unchanged:?}, clone {clone_t:?}"
    );
    let cv = pool.open_volume(c.id).unwrap();
    for (i, off) in ends.iter().enumerate() {
        assert_eq!(read_all(&cv, *off, 4096), pattern(i as u64, 4096));
    }
    assert_eq!(read_all(&cv, 40 * tib, 4096), vec![0u8; 4096]);
    // Discard of the whole 64 TiB is cheap too and leaves zeros.
    v.discard(0, 64 * tib).unwrap();
    let s3 = pool.seal(vi.id).unwrap();
    let c3 = pool.clone_snapshot(s3.id, "empty").unwrap();
    assert_eq!(
        read_all(&pool.open_volume(c3.id).unwrap(), 64 * tib - 4096, 4096),
        vec![0u8; 4096]
    );
    assert_eq!(
        read_all(&pool.open_volume(c.id).unwrap(), 64 * tib - 4096, 4096),
        pattern(2, 4096)
    );
    let snap_stats = pool.snapshot_stats(s1.id).unwrap();
    assert_eq!(snap_stats.logical_bytes, 64 * tib);
    assert_eq!(snap_stats.allocated_bytes, 3 * (1 << 20));
}

#[test]
fn tiers_place_wal_fast_and_chunks_slow_and_pool_dir_moves() {
    let dir = tempfile::tempdir().unwrap();
    let p1 = dir.path().join("pool-a");
    let pool = Pool::create(
        &p1,
        CreateOptions {
            devices: vec![
                DeviceSpec {
                    path: "hdd0".into(),
                    tier: Tier::Hdd,
                    size: 128 * MIB,
                },
                DeviceSpec {
                    path: "ssd0".into(),
                    tier: Tier::Ssd,
                    size: 64 * MIB,
                },
            ],
            chunk_size: 64 << 10,
            zstd_level: 3,
        },
        test_open_opts(),
    )
    .unwrap();
    let vi = pool.create_volume("t", 8 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let data = pattern(3, 4 * MIB as usize);
    v.write(0, &data, true).unwrap();
    let s = pool.seal(vi.id).unwrap();
    let chunk = pool.chunk_of(vi.id, 0).unwrap().unwrap();
    let (path, _, _) = pool.object_location(&chunk).unwrap().unwrap();
    assert!(
        path.ends_with("hdd0"),
        "chunks go to the capacity tier: {path:?}"
    );
    pool.close().unwrap();
    drop((v, pool));
    // Copy the whole directory elsewhere (as to a fresh machine) and open it there.
    let p2 = dir.path().join("pool-b");
    std::fs::create_dir(&p2).unwrap();
    for e in std::fs::read_dir(&p1).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), p2.join(e.file_name())).unwrap();
    }
    std::fs::remove_dir_all(&p1).unwrap();
    let pool = Pool::open(&p2, test_open_opts()).unwrap();
    let c = pool.clone_snapshot(s.id, "moved").unwrap();
    assert_eq!(
        read_all(&pool.open_volume(c.id).unwrap(), 0, data.len()),
        data
    );
    assert_eq!(
        read_all(&pool.open_volume(vi.id).unwrap(), 0, data.len()),
        data
    );
}

#[test]
fn adding_a_device_to_a_full_pool_makes_room_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create_pool(dir.path(), 24 * MIB, 64 << 10);
    let vi = pool.create_volume("grow", 256 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let mut off = 0;
    while v
        .write(off, &pattern(off, MIB as usize), false)
        .and_then(|_| v.flush())
        .is_ok()
    {
        off += MIB;
        assert!(off < 256 * MIB);
    }
    let full_at = off;
    let added = pool
        .add_device(DeviceSpec {
            path: "dev1".into(),
            tier: Tier::Hdd,
            size: 64 * MIB,
        })
        .unwrap();
    assert_eq!(added.0, 1);
    assert!(
        pool.add_device(DeviceSpec {
            path: "dev1".into(),
            tier: Tier::Hdd,
            size: 64 * MIB
        })
        .is_err(),
        "same path twice"
    );
    // Rewrite the failed megabyte and go on: the new device takes it.
    for i in 0..16u64 {
        let o = full_at + i * MIB;
        v.write(o, &pattern(o, MIB as usize), false).unwrap();
    }
    v.flush().unwrap();
    let s = pool.seal(vi.id).unwrap();
    pool.close().unwrap();
    drop((v, pool));
    let pool = Pool::open(dir.path(), test_open_opts()).unwrap();
    assert_eq!(pool.devices().len(), 2);
    let c = pool.clone_snapshot(s.id, "c").unwrap();
    let cv = pool.open_volume(c.id).unwrap();
    for o in [0, full_at - MIB, full_at, full_at + 15 * MIB] {
        assert_eq!(
            read_all(&cv, o, MIB as usize),
            pattern(o, MIB as usize),
            "offset {o}"
        );
    }
}
