#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A live volume overwritten again and again, never sealed, on a pool much smaller than what is
//! written: the log must not fill the pool. Folding starts when the log takes too much of the
//! free space, and writers wait for it when it falls behind, instead of failing with "no space".

mod common;

use common::*;
use maas_pool::{BlockDevice, OpenOptions, Pool};

/// Writes pass `pass` over the first 16 MiB of `v`, 1 MiB at a time.
fn write_pass(v: &maas_pool::Volume, pass: u64) {
    for i in 0..16u64 {
        v.write(i * MIB, &pattern(pass * 100 + i, MIB as usize), false)
            .unwrap_or_else(|e| panic!("pass {pass}, MiB {i}: {e}"));
    }
}

/// Reopens the pool and checks that volume `id` holds pass `pass` (replay with whatever
/// segments the cleaner freed gone from the middle of the log).
fn reopened_holds_pass(
    dir: &std::path::Path,
    opts: OpenOptions,
    id: maas_pool::VolumeId,
    pass: u64,
) {
    let pool = Pool::open(dir, opts).unwrap();
    let v = pool.open_volume(id).unwrap();
    for i in 0..16u64 {
        assert_eq!(
            read_all(&v, i * MIB, MIB as usize),
            pattern(pass * 100 + i, MIB as usize),
            "MiB {i} after reopen"
        );
    }
}

#[test]
fn sustained_overwrites_never_fill_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 96 * MIB, 64 << 10),
        OpenOptions {
            wal_segment_bytes: MIB,
            // Only free space may trigger folding here.
            wal_fold_threshold: u64::MAX,
            background: true,
            ..test_open_opts()
        },
    )
    .unwrap();
    let info = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    // 20 passes over the volume: 320 MiB through a 96 MiB pool.
    for pass in 0..20u64 {
        write_pass(&v, pass);
        v.flush().unwrap();
    }
    for i in 0..16u64 {
        assert_eq!(
            read_all(&v, i * MIB, MIB as usize),
            pattern(1900 + i, MIB as usize),
            "MiB {i}"
        );
    }
    pool.close().unwrap();
}

/// The log cleaner: once every block of a log segment was overwritten by later, durable
/// appends, the segment is freed without folding anything into chunks. A volume overwritten
/// pass after pass then keeps a log of about one pass, and a reopen (replay with the freed
/// segments gone from the middle of the log) reads back the last pass.
#[test]
fn overwritten_segments_are_freed_without_a_fold() {
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions {
        wal_segment_bytes: MIB,
        wal_fold_threshold: u64::MAX,
        background: true,
        ..test_open_opts()
    };
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 512 * MIB, 64 << 10),
        opts.clone(),
    )
    .unwrap();
    let info = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    // 30 passes: 480 MiB of writes; a fold would start once the log took half the free space.
    for pass in 0..30u64 {
        write_pass(&v, pass);
        v.flush().unwrap();
    }
    assert_eq!(pool.stats().unwrap().chunks, 0, "nothing was folded");
    // The background sweep (every 200 ms) leaves about the last pass.
    let t = std::time::Instant::now();
    let mut wal = u64::MAX;
    while t.elapsed() < std::time::Duration::from_secs(5) {
        wal = pool.stats().unwrap().wal_bytes;
        if wal <= 20 * MIB {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(wal <= 20 * MIB, "the log still holds {} MiB", wal / MIB);
    pool.close().unwrap();
    drop((v, pool));
    reopened_holds_pass(dir.path(), opts, info.id, 29);
}

/// Rewrites held in the write buffer: the segments they overwrote wait until the buffer writes
/// them back (within `write_back_delay`) and a sync makes them durable; then the cleaner frees
/// them. Those waiting segments are not a reason to fold: a fold would hash and compress a
/// whole volume of data that is dead anyway (what made maasd's defaults write sequentially at
/// half tgt's speed). Here the log of one pass plus the buffer's waiting pass is over the fold
/// threshold, the live log is under it: nothing may be folded, and every pass reads back.
#[test]
fn segments_waiting_for_buffered_overwrites_do_not_start_a_fold() {
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions {
        wal_segment_bytes: MIB,
        // One pass (16 MiB) and some room, but less than a pass plus the buffer's.
        wal_fold_threshold: 24 * MIB,
        write_buffer_bytes: 16 * MIB as usize,
        write_back_delay: std::time::Duration::from_millis(300),
        background: true,
        ..test_open_opts()
    };
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 512 * MIB, 64 << 10),
        opts.clone(),
    )
    .unwrap();
    let info = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    for pass in 0..30u64 {
        write_pass(&v, pass);
        // The background sweep (every 200 ms) sees the log between passes.
        std::thread::sleep(std::time::Duration::from_millis(60));
    }
    v.flush().unwrap();
    assert_eq!(
        pool.stats().unwrap().chunks,
        0,
        "a fold started for segments the cleaner was about to free"
    );
    pool.close().unwrap();
    drop((v, pool));
    reopened_holds_pass(dir.path(), opts, info.id, 29);
}
