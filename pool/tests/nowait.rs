#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The non-blocking I/O a front-end runs on its network thread: `read_nowait` serves blocks
//! that are in memory (the log cache, the chunk cache, zeroes) and declines what needs the
//! device; `write_nowait` lands like a write when the log takes it in memory and declines,
//! writing nothing, otherwise. And the log cache itself: bounded, and never wrong.

mod common;

use common::*;
use maas_pool::{BlockDevice, OpenOptions, Pool, PoolError};

/// A non-blocking call may always decline when another thread holds a lock it needs for a
/// moment (the log's flusher); what must hold is that it succeeds once nobody does.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

fn pool_with_log_cache(dir: &std::path::Path, log_cache_bytes: usize) -> Pool {
    Pool::create(
        dir,
        small_pool_opts(dir, 256 * MIB, 64 << 10),
        OpenOptions {
            log_cache_bytes,
            ..test_open_opts()
        },
    )
    .unwrap()
}

#[test]
fn nowait_reads_serve_memory_and_decline_device_reads() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool_with_log_cache(dir.path(), 0);
    let info = pool.create_volume("v", 64 * MIB, 4096).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    let mut buf = vec![1u8; 64 << 10];
    // Never written: zeroes, from nowhere.
    assert!(eventually(|| v.read_nowait(0, &mut buf).unwrap()));
    assert!(buf.iter().all(|&b| b == 0));
    // Written and flushed with no log cache: only on the device, so declined...
    let data = pattern(1, 64 << 10);
    v.write(0, &data, false).unwrap();
    v.flush().unwrap();
    assert!(!v.read_nowait(0, &mut buf).unwrap());
    // ... while the blocking read gets it.
    assert_eq!(read_all(&v, 0, data.len()), data);
    // Folded into sealed chunks, which the blocking read above did not cache (it read the
    // log): declined until a blocking read brings the chunk into the RAM cache.
    pool.checkpoint().unwrap();
    assert!(!v.read_nowait(0, &mut buf).unwrap());
    assert_eq!(read_all(&v, 0, data.len()), data);
    assert!(eventually(|| v.read_nowait(0, &mut buf).unwrap()));
    assert_eq!(buf, data);
    // Bad input is an error, not a decline.
    assert!(matches!(
        v.read_nowait(64 * MIB, &mut buf),
        Err(PoolError::OutOfRange { .. })
    ));
    pool.close().unwrap();
}

#[test]
fn nowait_writes_land_like_writes_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool_with_log_cache(dir.path(), 16 * MIB as usize);
    let info = pool.create_volume("v", 64 * MIB, 512).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    let data = pattern(2, 128 << 10);
    // The pool's first write opens a log segment, a metadata commit: declined, nothing written.
    assert!(!v.write_nowait(8192, &data).unwrap());
    assert_eq!(read_all(&v, 8192, data.len()), vec![0u8; data.len()]);
    v.write(0, &[0u8; 4096], false).unwrap();
    assert!(eventually(|| v.write_nowait(8192, &data).unwrap()));
    let mut buf = vec![0u8; data.len()];
    assert!(eventually(|| v.read_nowait(8192, &mut buf).unwrap()));
    assert_eq!(buf, data);
    // A 512-byte write inside a 4 KiB block needs a read-modify-write: declined, nothing
    // written.
    assert!(!v.write_nowait(512, &pattern(3, 512)).unwrap());
    assert_eq!(read_all(&v, 0, 4096), vec![0u8; 4096]);
    assert!(matches!(
        v.write_nowait(64 * MIB, &data),
        Err(PoolError::OutOfRange { .. })
    ));
    v.flush().unwrap();
    pool.close().unwrap();
    drop((v, pool));
    let pool = Pool::open(dir.path(), test_open_opts()).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    assert_eq!(read_all(&v, 8192, data.len()), data);
    pool.close().unwrap();
}

#[test]
fn log_cache_is_bounded_and_reads_stay_right_after_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool_with_log_cache(dir.path(), 2 * MIB as usize);
    let info = pool.create_volume("v", 64 * MIB, 4096).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    // 16 MiB of distinct data in 1 MiB writes, each flushed (so each reaches the device and
    // the cache in turn).
    for i in 0..16u64 {
        v.write(i * MIB, &pattern(100 + i, MIB as usize), false)
            .unwrap();
        v.flush().unwrap();
    }
    // The oldest is no longer in memory; the newest is.
    let mut buf = vec![0u8; 4096];
    assert!(!v.read_nowait(0, &mut buf).unwrap(), "evicted");
    assert!(
        eventually(|| v.read_nowait(15 * MIB, &mut buf).unwrap()),
        "recent"
    );
    assert_eq!(buf, pattern(115, MIB as usize)[..4096]);
    // Every block reads back right, from memory or device.
    for i in 0..16u64 {
        assert_eq!(
            read_all(&v, i * MIB, MIB as usize),
            pattern(100 + i, MIB as usize),
            "MiB {i}"
        );
    }
    // Overwrites: the newest data wins whichever batch is cached.
    v.write(15 * MIB, &pattern(7, 4096), false).unwrap();
    v.flush().unwrap();
    assert!(eventually(|| v.read_nowait(15 * MIB, &mut buf).unwrap()));
    assert_eq!(buf, pattern(7, 4096));
    pool.close().unwrap();
}
