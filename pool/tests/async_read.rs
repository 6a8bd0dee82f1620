#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `read_async`, the read a network front-end starts on its own thread: blocks in memory are
//! served at once, log blocks on the device are read on the shared io_uring and checked
//! against their batch CRCs when the future completes, and what it cannot do without blocking
//! (a sealed chunk not in RAM) comes back to be read on a blocking thread. Meanwhile nothing
//! it reads may be reclaimed and reused under it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use maas_pool::{AsyncRead, BlockDevice, OpenOptions, Pool, PoolError};

/// No RAM tier for log blocks: every read of a written block goes to the device.
fn opts() -> OpenOptions {
    OpenOptions {
        log_cache_bytes: 0,
        write_buffer_bytes: 0,
        cache_bytes: 0,
        ..test_open_opts()
    }
}

#[test]
fn log_blocks_on_the_device_are_read_asynchronously_and_match() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 256 * MIB, 64 << 10),
        opts(),
    )
    .unwrap();
    let vi = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let a = pattern(1, 256 << 10);
    let b = pattern(2, 64 << 10);
    v.write(0, &a, false).unwrap();
    // An overwrite in the middle: a read spans blocks of two batches, in two places.
    v.write(64 << 10, &b, false).unwrap();
    v.flush().unwrap();
    let mut want = a.clone();
    want[64 << 10..128 << 10].copy_from_slice(&b);
    want.extend(vec![0u8; 64 << 10]); // never written: zeroes
    let before = pool.stats().unwrap().async_reads;
    let (mut pending, mut done, mut blocking) = (0, 0, 0);
    for (off, len) in [
        (0u64, 4096usize),
        (60 << 10, 16 << 10),
        (0, 320 << 10),
        (252 << 10, 12 << 10),
    ] {
        let (got, how) = read_async(&v, off, len);
        assert_eq!(
            got.unwrap(),
            want[off as usize..off as usize + len],
            "at {off}+{len}"
        );
        match how {
            How::Pending => pending += 1,
            How::Done => done += 1,
            How::Blocking => blocking += 1,
        }
    }
    if maas_pool::aio::available() {
        assert!(
            pending >= 3,
            "log blocks on the device were not read asynchronously"
        );
    }
    // The pool's stats count what the reads did.
    let after = pool.stats().unwrap().async_reads;
    assert_eq!(
        (
            after.device - before.device,
            after.in_memory - before.in_memory,
            after.blocking - before.blocking
        ),
        (pending, done, blocking),
        "{after:?}"
    );
    // Only zeroes: no device read at all.
    let (got, how) = read_async(&v, 8 * MIB, 8192);
    assert_eq!(got.unwrap(), vec![0u8; 8192]);
    assert_eq!(how, How::Done);
    // Misaligned and out-of-range reads are answered, not lost.
    assert!(matches!(
        v.read_async(16 * MIB - 4096, vec![0; 8192]),
        AsyncRead::Done(Err(PoolError::OutOfRange { .. }))
    ));
}

/// A flipped byte in a log block on the device: the asynchronous read fails its CRC check
/// (a medium error), never returns the rotten bytes; its neighbours read back.
#[test]
fn damaged_log_blocks_fail_the_asynchronous_read() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 64 * MIB, 64 << 10),
        opts(),
    )
    .unwrap();
    let vi = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let a = pattern(7, 64 << 10);
    v.write(0, &a, true).unwrap();
    let at = find_block(&dir.path().join("dev0"), &a[3 * 4096..4 * 4096]).expect("in the log");
    flip(&dir.path().join("dev0"), at + 100);
    let (got, _) = read_async(&v, 0, 64 << 10);
    assert!(matches!(got, Err(PoolError::Checksum { .. })), "{got:?}");
    let (got, _) = read_async(&v, 4 * 4096, 4096);
    assert_eq!(got.unwrap(), a[4 * 4096..5 * 4096]);
}

/// Sealed chunks not in RAM need an index walk and a decompression: that goes to a blocking
/// read; once the chunk is in RAM the same read is done at once.
#[test]
fn sealed_chunks_not_in_ram_go_to_a_blocking_read() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 64 * MIB, 64 << 10),
        OpenOptions {
            cache_bytes: 16 * MIB as usize,
            ..opts()
        },
    )
    .unwrap();
    let vi = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let a = pattern(9, 128 << 10);
    v.write(0, &a, true).unwrap();
    pool.checkpoint().unwrap();
    pool.drop_caches();
    let (got, how) = read_async(&v, 4096, 4096);
    assert_eq!(got.unwrap(), a[4096..8192]);
    assert_eq!(how, How::Blocking);
    let (got, how) = read_async(&v, 8192, 4096);
    assert_eq!(got.unwrap(), a[8192..12288]);
    assert_eq!(how, How::Done, "the chunk is in RAM now");
}

/// Reads in flight while a writer rewrites the blocks they read (with the same bytes, so every
/// read has one right answer) and others, and the pool folds and reclaims log space: every read
/// returns exactly that data. Were an extent reclaimed and reused under an in-flight read, the
/// read would see foreign bytes (and fail its CRC check).
#[test]
fn reads_in_flight_see_no_reclaimed_space() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Arc::new(
        Pool::create(
            dir.path(),
            small_pool_opts(dir.path(), 128 * MIB, 64 << 10),
            OpenOptions {
                wal_segment_bytes: 4 * MIB,
                wal_fold_threshold: 8 * MIB,
                ..opts()
            },
        )
        .unwrap(),
    );
    let vi = pool.create_volume("v", 32 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let stable = pattern(3, 4 * MIB as usize);
    v.write(0, &stable, true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Rounds the writer has done: readers go on until it has folded a few times, however
    // fast their reads are (sealed incompressible blocks are single 4 KiB reads now).
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (v, stop, pool, done) = (v.clone(), stop.clone(), pool.clone(), done.clone());
        let stable_w = stable.clone();
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let data = pattern(100 + round, MIB as usize);
                v.write(8 * MIB + (round % 16) * MIB, &data, false).unwrap();
                let at = (round % 4) * MIB;
                v.write(at, &stable_w[at as usize..(at + MIB) as usize], false)
                    .unwrap();
                if round % 8 == 7 {
                    pool.checkpoint().unwrap();
                }
                round += 1;
                done.store(round, Ordering::Relaxed);
            }
            round
        })
    };
    let readers: Vec<_> = (0..3u64)
        .map(|t| {
            let (v, stable, done) = (v.clone(), stable.clone(), done.clone());
            std::thread::spawn(move || {
                let t0 = std::time::Instant::now();
                let mut i = 0u64;
                while i < 400
                    || (done.load(Ordering::Relaxed) < 16
                        && t0.elapsed() < std::time::Duration::from_secs(60))
                {
                    i += 1;
                    let off = ((t * 7919 + i * 104_729) % 1000) * 4096;
                    let len = 4096 * (1 + (i % 8) as usize);
                    let len = len.min(stable.len() - off as usize);
                    let (got, _) = read_async(&v, off, len);
                    assert_eq!(
                        got.unwrap(),
                        stable[off as usize..off as usize + len],
                        "at {off}"
                    );
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    assert!(
        rounds > 8,
        "the writer folded at least once ({rounds} rounds)"
    );
}

/// A read resolved, submitted and held in the reactor's queue while the blocks it reads are
/// overwritten, folded away and their log space reclaimed and written again: it still returns
/// the data it resolved, because it pins the pool until it completes (reclaim waits).
#[test]
fn a_read_held_in_flight_keeps_its_log_space_from_reuse() {
    if !maas_pool::aio::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 256 * MIB, 64 << 10),
        OpenOptions {
            wal_segment_bytes: MIB,
            background: false,
            ..opts()
        },
    )
    .unwrap();
    let vi = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let old = pattern(5, 256 << 10);
    v.write(0, &old, true).unwrap();
    maas_pool::aio::pause_for_test(true);
    let read = v.read_async(0, vec![0; 256 << 10]);
    let AsyncRead::Pending(read) = read else {
        maas_pool::aio::pause_for_test(false);
        panic!("a read of log blocks on the device is submitted: {read:?}");
    };
    // Rewrite the blocks many times over, folding each time: the old log segments are free to
    // be reclaimed and written again, but for the pin.
    for round in 0..24u64 {
        v.write(0, &pattern(50 + round, 256 << 10), false).unwrap();
        v.write(4 * MIB, &pattern(90 + round, MIB as usize), true)
            .unwrap();
        pool.checkpoint().unwrap();
    }
    maas_pool::aio::pause_for_test(false);
    assert_eq!(block_on(read).unwrap(), old);
    // With the pin gone, reclaim goes on.
    pool.checkpoint().unwrap();
    assert_eq!(read_all(&v, 0, 256 << 10), pattern(50 + 23, 256 << 10));
}
