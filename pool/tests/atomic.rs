#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Atomic writes: all-or-nothing for concurrent readers and across a torn WAL batch, the typed
//! limit, and the read-modify-write of partial 4 KiB blocks not losing concurrent writes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use maas_pool::wal::MAX_BATCH_DATA;
use maas_pool::{BlockDevice, Pool, PoolError, ProvisioningRun};

#[test]
fn limits_and_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create_pool(dir.path(), 128 * MIB, 64 << 10);
    let v512 = pool
        .open_volume(pool.create_volume("a", 16 * MIB, 512).unwrap().id)
        .unwrap();
    let v4k = pool
        .open_volume(pool.create_volume("b", 16 * MIB, 4096).unwrap().id)
        .unwrap();
    // Test pools use 4 MiB segments: the limit is one WAL batch.
    let max = MAX_BATCH_DATA as u64;
    assert_eq!(v4k.atomic_write_max(), max);
    assert_eq!(v512.atomic_write_max(), max - 3584);
    // The largest atomic write at the worst misalignment fits; one sector more does not, and
    // changes nothing.
    let n = v512.atomic_write_max() as usize;
    let data = pattern(1, n);
    v512.write_atomic(7 * 512, &data, false).unwrap();
    assert_eq!(read_all(&v512, 7 * 512, n), data);
    let err = v512
        .write_atomic(0, &vec![1u8; n + 512], false)
        .unwrap_err();
    assert!(
        matches!(err, PoolError::AtomicWriteTooLarge { len, max } if len == n as u64 + 512 && max == n as u64),
        "{err}"
    );
    assert_eq!(read_all(&v512, 7 * 512, n), data);
    assert!(matches!(
        v4k.write_atomic(512, &[0u8; 4096], false),
        Err(PoolError::Misaligned { .. })
    ));
    assert!(matches!(
        v4k.write_atomic(16 * MIB, &[0u8; 4096], false),
        Err(PoolError::OutOfRange { .. })
    ));
    v4k.write_atomic(0, &[], true).unwrap();
}

/// Readers racing atomic writes that cross WAL batch boundaries (a plain write fills the open
/// batch first) and start and end inside 4 KiB blocks of a 512-byte volume never see part of
/// one. A plain writer rewriting the rest of the head and tail blocks meanwhile loses nothing.
#[test]
fn concurrent_readers_see_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create_pool(dir.path(), 512 * MIB, 64 << 10);
    let vi = pool.create_volume("v", 32 * MIB, 512).unwrap();
    let v = Arc::new(pool.open_volume(vi.id).unwrap());
    // Atomic range: from sector 3 of block 256 to sector 5 of block 256+300.
    let off = MIB + 3 * 512;
    let len = 300 * 4096 + 2 * 512;
    let versions: Vec<Vec<u8>> = (0..4).map(|s| pattern(100 + s, len)).collect();
    v.write_atomic(off, &versions[0], false).unwrap();
    let stop = Arc::new(AtomicBool::new(false));

    let writer = {
        let (v, versions, stop) = (v.clone(), versions.clone(), stop.clone());
        std::thread::spawn(move || {
            let filler = pattern(9, 1536 << 10);
            let mut k = 0;
            for round in 0..60 {
                // Leaves the open batch without room for the atomic write that follows.
                v.write(8 * MIB + (round % 4) * 2 * MIB, &filler, false)
                    .unwrap();
                k = (k + 1) % versions.len();
                v.write_atomic(off, &versions[k], round % 7 == 0).unwrap();
            }
            stop.store(true, Ordering::SeqCst);
            k
        })
    };
    // Plain sub-4K writes to the sectors sharing the atomic write's head and tail blocks.
    let neighbour = {
        let (v, stop) = (v.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = 0u8;
            while !stop.load(Ordering::SeqCst) {
                last = last.wrapping_add(1);
                v.write(MIB, &[last; 3 * 512], false).unwrap();
                v.write(off + len as u64, &[last; 3 * 512], false).unwrap();
            }
            last
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (v, versions, stop) = (v.clone(), versions.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(Ordering::SeqCst) {
                    let got = read_all(&*v, off, len);
                    assert!(
                        versions.contains(&got),
                        "a read saw part of an atomic write"
                    );
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let k = writer.join().unwrap();
    let last = neighbour.join().unwrap();
    let reads: usize = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(reads > 0);
    assert_eq!(read_all(&*v, off, len), versions[k]);
    assert_eq!(read_all(&*v, MIB, 3 * 512), vec![last; 3 * 512]);
    assert_eq!(
        read_all(&*v, off + len as u64, 3 * 512),
        vec![last; 3 * 512]
    );
}

/// The read-modify-write of a sub-4K write happens under the same lock as the append: a
/// concurrent whole-block write to the same block is never undone by it.
#[test]
fn partial_block_writes_do_not_lose_concurrent_block_writes() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create_pool(dir.path(), 256 * MIB, 64 << 10);
    let vi = pool.create_volume("v", 8 * MIB, 512).unwrap();
    let v = Arc::new(pool.open_volume(vi.id).unwrap());
    for round in 0..20u8 {
        let whole = {
            let v = v.clone();
            std::thread::spawn(move || {
                let mut last = vec![0u8; 4096];
                for k in 0..200u32 {
                    last = vec![(k % 251) as u8 ^ round; 4096];
                    v.write(0, &last, false).unwrap();
                }
                last
            })
        };
        for k in 0..200u32 {
            v.write(0, &[(k % 7) as u8; 512], false).unwrap();
        }
        let last = whole.join().unwrap();
        // Sectors 1..8 were only ever written by whole-block writes: the last one must show.
        assert_eq!(
            read_all(&*v, 512, 7 * 512),
            last[512..],
            "round {round}: a read-modify-write undid a whole-block write"
        );
    }
}

/// A batch torn by a crash (written, never covered by a flush, its data not all on the
/// medium) is discarded whole at replay: the atomic write in it vanishes entirely, never half
/// of it. (A damaged batch that a flush covered is not torn: see `log_damage.rs`.)
#[test]
fn torn_batch_drops_the_whole_atomic_write() {
    let dir = tempfile::tempdir().unwrap();
    // No write buffer: batches go to the device as they close, and only a flush syncs them.
    let opts = || maas_pool::OpenOptions {
        write_buffer_bytes: 0,
        ..test_open_opts()
    };
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 64 * MIB, 64 << 10),
        opts(),
    )
    .unwrap();
    let vi = pool.create_volume("v", 16 * MIB, 512).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let (off, len) = (2 * MIB + 512, 1536 << 10);
    let old = pattern(1, len);
    let new = pattern(2, len);
    v.write(off, &old, true).unwrap();
    // Likely leaves a partly filled batch open, so that a plain write would be split.
    v.write(8 * MIB, &pattern(3, 1024 << 10), false).unwrap();
    v.write_atomic(off, &new, false).unwrap();
    // Written by the flusher, never synced; then the process dies.
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(v);
    pool.kill();

    // Tear the last 4 KiB block of the atomic write's data in the log (the block holding its
    // last 3.5 KiB plus the read-modify-written rest of that block).
    let mut last_block = vec![0u8; 4096];
    let tail = ((off + len as u64) % 4096) as usize;
    last_block[..tail].copy_from_slice(&new[len - tail..]);
    let dev = dir.path().join("dev0");
    let at = find_block(&dev, &last_block).expect("the atomic write's last block is in the log");
    flip(&dev, at + 100);

    let pool = Pool::open(dir.path(), opts()).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    assert_eq!(
        read_all(&v, off, len),
        old,
        "the torn batch is dropped whole: none of the atomic write remains"
    );
    assert!(
        pool.verify().unwrap().is_clean(),
        "a torn batch is not damage"
    );
}

#[test]
fn provisioning_status_follows_writes_and_discards() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 64u64 << 10;
    let pool = create_pool(dir.path(), 128 * MIB, chunk);
    let vi = pool.create_volume("v", 4 * MIB, 512).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let run = |len: u64, mapped: bool| ProvisioningRun { len, mapped };
    assert_eq!(
        v.provisioning_status(0, 4 * MIB).unwrap(),
        vec![run(4 * MIB, false)]
    );
    v.write(MIB, &pattern(1, 3 * chunk as usize), false)
        .unwrap();
    assert_eq!(
        v.provisioning_status(0, 4 * MIB).unwrap(),
        vec![
            run(MIB, false),
            run(3 * chunk, true),
            run(3 * MIB - 3 * chunk, false)
        ]
    );
    // Sealed chunks stay mapped; a discarded block inside them is deallocated.
    pool.checkpoint().unwrap();
    v.discard(MIB + 4096, 4096).unwrap();
    assert_eq!(
        v.provisioning_status(MIB, 3 * chunk).unwrap(),
        vec![
            run(4096, true),
            run(4096, false),
            run(3 * chunk - 8192, true)
        ]
    );
    // 512-byte granularity of the request: runs are clipped to it.
    assert_eq!(
        v.provisioning_status(MIB + 512, 1024).unwrap(),
        vec![run(1024, true)]
    );
    v.discard(0, 4 * MIB).unwrap();
    assert_eq!(
        v.provisioning_status(0, 4 * MIB).unwrap(),
        vec![run(4 * MIB, false)]
    );
    assert!(v.provisioning_status(0, 0).unwrap().is_empty());
    assert!(matches!(
        v.provisioning_status(4 * MIB, 512),
        Err(PoolError::OutOfRange { .. })
    ));
}
