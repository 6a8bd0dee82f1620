#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The RAM tier's write buffer: written blocks wait in memory before the log writes them to its
//! device, rewrites of a block still waiting replace it in place, and a flush or the write-back
//! delay sends them to the device.

mod common;

use std::time::{Duration, Instant};

use common::*;
use maas_pool::{BlockDevice, OpenOptions, Pool};

fn buffered_opts(delay: Duration) -> OpenOptions {
    OpenOptions {
        wal_segment_bytes: MIB,
        wal_fold_threshold: u64::MAX,
        write_buffer_bytes: 64 * MIB as usize,
        write_back_delay: delay,
        background: true,
        ..test_open_opts()
    }
}

/// Whether the pool's device file holds `needle` (at a 4 KiB boundary, as log data does).
fn device_holds(dir: &std::path::Path, needle: &[u8]) -> bool {
    let dev = std::fs::read(dir.join("dev0")).unwrap();
    dev.chunks(4096).any(|b| b.starts_with(&needle[..4096]))
}

/// Twenty passes over a 16 MiB volume without a flush: every pass after the first replaces the
/// buffered blocks in place, so the log never takes more room than one pass, and reads, a
/// flush and a reopen all see the last pass.
#[test]
fn rewrites_of_buffered_blocks_replace_them_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let opts = buffered_opts(Duration::from_secs(600));
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 512 * MIB, 64 << 10),
        opts.clone(),
    )
    .unwrap();
    let info = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    for pass in 0..20u64 {
        for i in 0..16u64 {
            v.write(i * MIB, &pattern(pass * 100 + i, MIB as usize), false)
                .unwrap();
        }
        // Misaligned and partial rewrites go through the same path.
        v.write(3 * MIB + 4096, &pattern(pass * 100 + 50, 8192), false)
            .unwrap();
    }
    let wal = pool.stats().unwrap().wal_bytes;
    assert!(
        wal <= 18 * MIB,
        "the log grew to {} MiB for a 16 MiB volume",
        wal / MIB
    );
    let mut want = pattern(1903, MIB as usize);
    want[4096..4096 + 8192].copy_from_slice(&pattern(1950, 8192));
    assert_eq!(read_all(&v, 3 * MIB, MIB as usize), want);
    assert_eq!(
        read_all(&v, 7 * MIB, MIB as usize),
        pattern(1907, MIB as usize)
    );
    v.flush().unwrap();
    pool.close().unwrap();
    drop((v, pool));
    let pool = Pool::open(dir.path(), opts).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    assert_eq!(read_all(&v, 3 * MIB, MIB as usize), want);
    for i in (0..16u64).filter(|i| *i != 3) {
        assert_eq!(
            read_all(&v, i * MIB, MIB as usize),
            pattern(1900 + i, MIB as usize),
            "MiB {i} after reopen"
        );
    }
}

/// A write waits in memory until a flush, or until the write-back delay sends it to the device
/// on its own.
#[test]
fn buffered_writes_reach_the_device_on_flush_or_after_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 64 * MIB, 64 << 10),
        buffered_opts(Duration::from_secs(600)),
    )
    .unwrap();
    let info = pool.create_volume("v", 4 * MIB, 4096).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    let a = pattern(7, 64 << 10);
    v.write(0, &a, false).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!device_holds(dir.path(), &a), "written before any flush");
    assert_eq!(read_all(&v, 0, a.len()), a);
    v.flush().unwrap();
    assert!(device_holds(dir.path(), &a), "a flush writes the buffer");
    pool.close().unwrap();
    drop((v, pool));

    let pool = Pool::open(dir.path(), buffered_opts(Duration::from_millis(200))).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    let b = pattern(8, 64 << 10);
    v.write(MIB, &b, false).unwrap();
    let t = Instant::now();
    while !device_holds(dir.path(), &b) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "not on the device 5 s after a write with a 200 ms write-back delay"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    pool.close().unwrap();
}

/// One tenant's flush does not drain another's write buffer: a flush of a volume makes its own
/// writes durable (and, the log being one chain, what came before them), never the other
/// volumes' writes that came after.
#[test]
fn a_volume_flush_leaves_other_volumes_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 128 * MIB, 64 << 10),
        buffered_opts(Duration::from_secs(600)),
    )
    .unwrap();
    let a = pool
        .open_volume(pool.create_volume("a", 16 * MIB, 4096).unwrap().id)
        .unwrap();
    let b = pool
        .open_volume(pool.create_volume("b", 16 * MIB, 4096).unwrap().id)
        .unwrap();
    let mine = pattern(61, 64 << 10);
    let theirs = pattern(62, 4 * MIB as usize);
    b.write(0, &mine, false).unwrap();
    // Volume a writes more than a batch holds after b's write, without flushing.
    a.write(0, &theirs, false).unwrap();
    b.flush().unwrap();
    assert!(
        device_holds(dir.path(), &mine),
        "b's flush made b's write durable"
    );
    assert!(
        !device_holds(dir.path(), &theirs[3 * MIB as usize..]),
        "b's flush wrote a's later writes too"
    );
    a.flush().unwrap();
    assert!(device_holds(dir.path(), &theirs[3 * MIB as usize..]));
    // A volume with nothing appended flushes without any I/O.
    let c = pool
        .open_volume(pool.create_volume("c", MIB, 4096).unwrap().id)
        .unwrap();
    c.flush().unwrap();
    pool.close().unwrap();
}
