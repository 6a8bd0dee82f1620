#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The self-sizing RAM tier: a fake `/proc/meminfo` says memory is short, and the pool's
//! watcher shrinks the chunk cache (usage drops at once) and flushes the write buffer to the
//! device (never drops it); when memory is plentiful again the targets grow back.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use maas_pool::{AutoRamTier, BlockDevice, OpenOptions, Pool, RamPolicy, RamTierStats};

const GIB: u64 = 1 << 30;

/// Writes a fake meminfo (atomically: the watcher never sees half a file).
fn fake_meminfo(path: &Path, total: u64, available: u64) {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!(
            "MemTotal:       {} kB\nMemFree:        {} kB\nMemAvailable:   {} kB\n",
            total / 1024,
            available / 1024,
            available / 1024
        ),
    )
    .unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn auto_opts(dir: &Path) -> OpenOptions {
    OpenOptions {
        wal_segment_bytes: 4 * MIB,
        wal_fold_threshold: u64::MAX,
        write_back_delay: Duration::from_secs(600),
        background: false,
        ram_tier: Some(AutoRamTier {
            policy: RamPolicy {
                floor: 8 * MIB,
                ..RamPolicy::default()
            },
            interval: Duration::from_millis(20),
            meminfo_path: dir.join("meminfo"),
            pressure_path: dir.join("no-psi-here"),
            // The fake meminfo is the whole machine: no limit from the real cgroup.
            cgroup: maas_pool::ramtier::CgroupPaths {
                self_cgroup: dir.join("no-cgroup-here"),
                root: dir.join("no-cgroup-fs"),
            },
            ..AutoRamTier::default()
        }),
        ..test_open_opts()
    }
}

fn wait_for(what: &str, pool: &Pool, ok: impl Fn(&RamTierStats) -> bool) -> RamTierStats {
    let t0 = Instant::now();
    loop {
        let s = pool.ram_tier_stats();
        if ok(&s) {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn short_memory_shrinks_the_chunk_cache_and_plenty_grows_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let mem = dir.path().join("meminfo");
    fake_meminfo(&mem, 8 * GIB, 7 * GIB);
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 512 * MIB, MIB),
        auto_opts(dir.path()),
    )
    .unwrap();
    // Sized from the (fake) machine: half of 8 GiB, split 5:2:1.
    let s = pool.ram_tier_stats();
    assert!(s.auto);
    assert_eq!(s.max_bytes, 4 * GIB);
    assert_eq!(s.target_bytes, 4 * GIB);
    assert_eq!(s.chunk_cache_limit, 4 * GIB * 5 / 8);
    assert_eq!(s.log_cache_limit, 4 * GIB * 2 / 8);
    assert_eq!(s.write_buffer_limit, 4 * GIB / 8);
    assert_eq!(
        pool.stats().unwrap().ram_tier.chunk_cache_limit,
        s.chunk_cache_limit
    );

    // 32 MiB of sealed chunks, read through a clone: the chunk cache holds them all.
    let info = pool.create_volume("v", 32 * MIB, 4096).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    for i in 0..32u64 {
        v.write(i * MIB, &pattern(i, MIB as usize), false).unwrap();
    }
    let snap = pool.seal(info.id).unwrap();
    let clone = pool.clone_snapshot(snap.id, "c").unwrap();
    let c = pool.open_volume(clone.id).unwrap();
    for i in 0..32u64 {
        assert_eq!(
            read_all(&c, i * MIB, MIB as usize),
            pattern(i, MIB as usize)
        );
    }
    let before = pool.ram_tier_stats();
    assert!(
        before.chunk_cache_bytes >= 32 * MIB,
        "chunk cache should hold the clone's chunks: {before:?}"
    );

    // Memory is short (2% available): the targets drop below what is held, at once.
    fake_meminfo(&mem, 8 * GIB, 8 * GIB / 50);
    let shrunk = wait_for("the chunk cache to shrink", &pool, |s| {
        s.chunk_cache_bytes < 8 * MIB && s.shrinks > 0
    });
    assert!(shrunk.chunk_cache_limit <= 5 * MIB, "{shrunk:?}");
    assert!(shrunk.chunk_cache_bytes <= shrunk.chunk_cache_limit);
    assert!(shrunk.target_bytes < before.chunk_cache_bytes);
    assert!(shrunk.log_cache_bytes <= shrunk.log_cache_limit);
    // Reads still work (from the device) and the cache stays within its target.
    for i in 0..32u64 {
        assert_eq!(
            read_all(&c, i * MIB, MIB as usize),
            pattern(i, MIB as usize)
        );
    }
    let s = pool.ram_tier_stats();
    assert!(s.chunk_cache_bytes <= s.chunk_cache_limit, "{s:?}");

    // Plenty again: the targets grow back (gradually) and the cache fills again.
    fake_meminfo(&mem, 8 * GIB, 7 * GIB);
    wait_for("the targets to grow back", &pool, |s| {
        s.target_bytes == 4 * GIB && s.chunk_cache_limit == 4 * GIB * 5 / 8
    });
    for i in 0..32u64 {
        assert_eq!(
            read_all(&c, i * MIB, MIB as usize),
            pattern(i, MIB as usize)
        );
    }
    let after = pool.ram_tier_stats();
    assert!(after.chunk_cache_bytes >= 32 * MIB, "{after:?}");
    pool.close().unwrap();
}

/// Shrinking the write buffer writes its batches to the device: after a crash (no flush, no
/// sync, no close) right after the shrink, every write is still there on reopen.
#[test]
fn shrinking_the_write_buffer_writes_it_out_never_drops_it() {
    let dir = tempfile::tempdir().unwrap();
    let mem = dir.path().join("meminfo");
    fake_meminfo(&mem, 8 * GIB, 7 * GIB);
    let opts = auto_opts(dir.path());
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 512 * MIB, MIB),
        opts.clone(),
    )
    .unwrap();
    let info = pool.create_volume("v", 32 * MIB, 4096).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    for i in 0..32u64 {
        v.write(i * MIB, &pattern(100 + i, MIB as usize), false)
            .unwrap();
    }
    let before = pool.ram_tier_stats();
    assert!(
        before.write_buffer_bytes >= 16 * MIB,
        "the writes should wait in the write buffer: {before:?}"
    );
    fake_meminfo(&mem, 8 * GIB, 8 * GIB / 50);
    let s = wait_for("the write buffer to go to the device", &pool, |s| {
        s.write_buffer_bytes <= s.write_buffer_limit && s.shrinks > 0
    });
    assert!(s.write_buffer_limit < 2 * MIB, "{s:?}");
    // Wait until the flusher has written what it was handed (not synced: no flush here).
    std::thread::sleep(Duration::from_secs(1));
    drop(v);
    pool.kill();
    fake_meminfo(&mem, 8 * GIB, 7 * GIB);
    let pool = Pool::open(dir.path(), opts).unwrap();
    let v = pool.open_volume(info.id).unwrap();
    let mut lost = 0;
    for i in 0..32u64 {
        if read_all(&v, i * MIB, MIB as usize) != pattern(100 + i, MIB as usize) {
            lost += 1;
        }
    }
    // At most what is still allowed in the shrunk buffer (under 2 MiB) can be lost.
    assert!(
        lost <= 2,
        "{lost} MiB of written data lost after the shrink"
    );
    pool.close().unwrap();
}
