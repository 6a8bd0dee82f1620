#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Damage in the write-ahead log is never a torn write: a durable batch (covered by a completed
//! flush) that fails its checks is reported, its blocks read as medium errors (`Checksum`),
//! `verify` names them, the bytes are kept as evidence, and folds, snapshots and clones keep
//! the blocks marked lost instead of sealing the damaged data. Reads of log blocks from the
//! device are checked too, not only at replay.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use maas_pool::{BlockDevice, OpenOptions, Pool, PoolError};
use redb::ReadableTable;

fn opts() -> OpenOptions {
    OpenOptions {
        // Reads of log blocks go to the device.
        log_cache_bytes: 0,
        write_buffer_bytes: 0,
        ..test_open_opts()
    }
}

fn new_pool(dir: &Path) -> Pool {
    Pool::create(dir, small_pool_opts(dir, 64 * MIB, 64 << 10), opts()).unwrap()
}

/// Device offset of the log copy of `data`'s 4 KiB block number `i`.
fn log_block(dir: &Path, data: &[u8], i: usize) -> u64 {
    find_block(&dir.join("dev0"), &data[i * 4096..(i + 1) * 4096]).expect("the block is in the log")
}

fn is_checksum(e: &PoolError) -> bool {
    matches!(e, PoolError::Checksum { .. })
}

/// A byte flipped in a batch that a later flush's batch proves durable: the pool opens, the
/// damaged block reads as a medium error (not the old data, not zeroes), its neighbours and the
/// later batch read back, verify names the block and the evidence is kept. Rewriting the block
/// heals it, for good (across a fold and a reopen).
#[test]
fn flushed_batch_damage_is_reported_never_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let pool = new_pool(dir.path());
    let vi = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let a = pattern(1, 64 << 10);
    let b = pattern(2, 64 << 10);
    v.write(0, &a, false).unwrap();
    v.flush().unwrap();
    v.write(MIB, &b, false).unwrap();
    v.flush().unwrap();
    drop(v);
    pool.kill();

    flip(&dir.path().join("dev0"), log_block(dir.path(), &a, 2) + 7);

    let pool = Pool::open(dir.path(), opts()).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = v.read(2 * 4096, &mut buf).unwrap_err();
    assert!(is_checksum(&err), "{err}");
    let mut whole = vec![0u8; a.len()];
    assert!(is_checksum(&v.read(0, &mut whole).unwrap_err()));
    assert_eq!(
        read_all(&v, 0, 8192),
        a[..8192],
        "blocks before it are intact"
    );
    assert_eq!(read_all(&v, 3 * 4096, a.len() - 3 * 4096), a[3 * 4096..]);
    assert_eq!(read_all(&v, MIB, b.len()), b, "the later batch is applied");

    let rep = pool.verify().unwrap();
    assert_eq!(rep.damaged_blocks.len(), 1, "{rep:?}");
    assert_eq!(
        (rep.damaged_blocks[0].volume, rep.damaged_blocks[0].block),
        (vi.id.0, 2)
    );
    assert_eq!(rep.log_damage.len(), 1);
    let evidence = rep.log_damage[0].evidence.clone().expect("evidence kept");
    let kept = std::fs::read(dir.path().join(&evidence)).unwrap();
    assert_eq!(kept.len() as u64, rep.log_damage[0].len);
    assert!(
        kept.windows(4096).any(|w| w == &a[..4096]),
        "the batch's bytes"
    );

    // Still damaged after another reopen (recorded, not re-guessed).
    drop(v);
    pool.close().unwrap();
    drop(pool);
    let pool = Pool::open(dir.path(), opts()).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    assert!(is_checksum(&v.read(2 * 4096, &mut buf).unwrap_err()));

    // The host rewrites the block: it reads back, across a fold and a reopen.
    let fresh = pattern(3, 4096);
    v.write(2 * 4096, &fresh, true).unwrap();
    assert_eq!(read_all(&v, 2 * 4096, 4096), fresh);
    pool.checkpoint().unwrap();
    drop(v);
    pool.close().unwrap();
    drop(pool);
    let pool = Pool::open(dir.path(), opts()).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    assert_eq!(read_all(&v, 0, 8192), a[..8192]);
    assert_eq!(read_all(&v, 2 * 4096, 4096), fresh);
    assert!(pool.verify().unwrap().damaged_blocks.is_empty());
}

/// The last flushed batch, with no later batch to prove it durable: the durable LSN the pool
/// records once the log is idle after a sync (or at a clean close) makes damage there damage.
#[test]
fn last_flushed_batch_is_known_durable() {
    for clean_close in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let pool = new_pool(dir.path());
        let vi = pool.create_volume("v", 16 * MIB, 4096).unwrap();
        let v = pool.open_volume(vi.id).unwrap();
        let a = pattern(11, 32 << 10);
        v.write(4 * MIB, &a, true).unwrap();
        drop(v);
        if clean_close {
            pool.close().unwrap();
            drop(pool);
        } else {
            // Idle after the sync: the recorder notes the durable LSN; then a crash.
            std::thread::sleep(Duration::from_millis(300));
            pool.kill();
        }
        flip(
            &dir.path().join("dev0"),
            log_block(dir.path(), &a, 0) + 4000,
        );
        let pool = Pool::open(dir.path(), opts()).unwrap();
        let v = pool.open_volume(vi.id).unwrap();
        let mut buf = vec![0u8; 4096];
        let err = v.read(4 * MIB, &mut buf).unwrap_err();
        assert!(is_checksum(&err), "clean_close={clean_close}: {err}");
        assert_eq!(read_all(&v, 4 * MIB + 4096, a.len() - 4096), a[4096..]);
    }
}

/// Damage outlives the log: a fold keeps the block lost (it seals a placeholder, never the
/// damaged bytes), a snapshot records it and its clones inherit it.
#[test]
fn damage_survives_fold_snapshot_and_clone() {
    let dir = tempfile::tempdir().unwrap();
    let pool = new_pool(dir.path());
    let vi = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let a = pattern(21, 128 << 10);
    v.write(0, &a, true).unwrap();
    v.write(MIB, &pattern(22, 4096), true).unwrap();
    drop(v);
    pool.kill();
    flip(&dir.path().join("dev0"), log_block(dir.path(), &a, 5) + 1);

    let pool = Pool::open(dir.path(), opts()).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let mut buf = vec![0u8; 4096];
    pool.checkpoint().unwrap();
    assert!(
        is_checksum(&v.read(5 * 4096, &mut buf).unwrap_err()),
        "after a fold"
    );
    assert_eq!(read_all(&v, 4 * 4096, 4096), a[4 * 4096..5 * 4096]);
    let snap = pool.seal(vi.id).unwrap();
    let ci = pool.clone_snapshot(snap.id, "restore").unwrap();
    let c = pool.open_volume(ci.id).unwrap();
    assert!(
        is_checksum(&c.read(5 * 4096, &mut buf).unwrap_err()),
        "in a clone"
    );
    assert_eq!(read_all(&c, 6 * 4096, 4096), a[6 * 4096..7 * 4096]);
    drop((v, c));
    pool.close().unwrap();
    drop(pool);

    let pool = Pool::open(dir.path(), opts()).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let c = pool.open_volume(ci.id).unwrap();
    assert!(is_checksum(&v.read(5 * 4096, &mut buf).unwrap_err()));
    assert!(is_checksum(&c.read(5 * 4096, &mut buf).unwrap_err()));
    let rep = pool.verify().unwrap();
    let lost: Vec<(u64, u64)> = rep
        .damaged_blocks
        .iter()
        .map(|d| (d.volume, d.block))
        .collect();
    assert_eq!(lost, vec![(vi.id.0, 5), (ci.id.0, 5)]);
    // Writing the clone's block heals the clone only.
    c.write(5 * 4096, &pattern(23, 4096), true).unwrap();
    assert_eq!(read_all(&c, 5 * 4096, 4096), pattern(23, 4096));
    assert!(is_checksum(&v.read(5 * 4096, &mut buf).unwrap_err()));
}

/// Bit rot in a log block after it was written: the read from the device fails its check
/// (no reopen involved), verify names it, and a fold records the block as lost instead of
/// sealing the rotten bytes under a fresh checksum.
#[test]
fn log_reads_are_checked_and_folds_never_seal_damage() {
    let dir = tempfile::tempdir().unwrap();
    let pool = new_pool(dir.path());
    let vi = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let a = pattern(31, 64 << 10);
    v.write(0, &a, true).unwrap();
    assert_eq!(read_all(&v, 0, a.len()), a);
    flip(
        &dir.path().join("dev0"),
        log_block(dir.path(), &a, 3) + 2048,
    );
    let mut buf = vec![0u8; 4096];
    assert!(is_checksum(&v.read(3 * 4096, &mut buf).unwrap_err()));
    assert_eq!(read_all(&v, 2 * 4096, 4096), a[2 * 4096..3 * 4096]);
    let rep = pool.verify().unwrap();
    assert_eq!(rep.damaged_blocks.len(), 1, "{rep:?}");
    assert_eq!(rep.damaged_blocks[0].block, 3);
    assert!(rep.log_blocks_checked >= 16);

    pool.checkpoint().unwrap();
    assert!(
        is_checksum(&v.read(3 * 4096, &mut buf).unwrap_err()),
        "the fold did not seal the damaged block as good data"
    );
    assert_eq!(read_all(&v, 4 * 4096, 4096), a[4 * 4096..5 * 4096]);
    drop(v);
    pool.close().unwrap();
    drop(pool);
    let pool = Pool::open(dir.path(), opts()).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    assert!(is_checksum(&v.read(3 * 4096, &mut buf).unwrap_err()));
}

/// A damaged header is recovered from the batch's footer: nothing is lost.
#[test]
fn damaged_header_is_recovered_from_the_footer() {
    let dir = tempfile::tempdir().unwrap();
    let pool = new_pool(dir.path());
    let vi = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let a = pattern(41, 64 << 10);
    v.write(0, &a, true).unwrap();
    v.write(MIB, &pattern(42, 4096), true).unwrap();
    drop(v);
    pool.kill();
    // `a` is the first batch of the log's first segment: its header is the block before it.
    let header = log_block(dir.path(), &a, 0) - 4096;
    flip(&dir.path().join("dev0"), header + 70);
    let pool = Pool::open(dir.path(), opts()).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    assert_eq!(read_all(&v, 0, a.len()), a);
    assert_eq!(read_all(&v, MIB, 4096), pattern(42, 4096));
    assert!(pool.verify().unwrap().is_clean());
}

/// A durable batch whose header and footer are both unreadable cannot be tied to blocks: the
/// pool opens, applies the batches after it, and reports the damage as unattributed.
#[test]
fn unreadable_durable_batch_is_reported_unattributed() {
    let dir = tempfile::tempdir().unwrap();
    let pool = new_pool(dir.path());
    let vi = pool.create_volume("v", 16 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let a = pattern(51, 64 << 10);
    let b = pattern(52, 4096);
    v.write(0, &a, true).unwrap();
    v.write(MIB, &b, true).unwrap();
    drop(v);
    pool.kill();
    let first = log_block(dir.path(), &a, 0);
    let dev = dir.path().join("dev0");
    flip(&dev, first - 4096 + 70); // header
    flip(&dev, first + a.len() as u64 + 70); // footer
    let pool = Pool::open(dir.path(), opts()).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    assert_eq!(read_all(&v, MIB, 4096), b, "the batch after it is applied");
    let rep = pool.verify().unwrap();
    assert_eq!(rep.log_damage.len(), 1, "{rep:?}");
    assert!(rep.log_damage[0].unattributed);
    assert!(!rep.is_clean());
}

/// After an open, new batches never take an LSN at or below the recorded durable LSN, even
/// when replay's chain ends lower: the segments that held the later durable batches were
/// freed (freeing records the durable LSN, and the segments' own headers go with them). A
/// reused LSN would make the fresh segment's first batch, lost in the next crash (never
/// written), look like damage to the replay after it. Found by the power-loss soak.
#[test]
fn new_batches_take_lsns_above_the_recorded_durable_one() {
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions {
        // The next write stays in the write buffer until the kill: never written.
        write_back_delay: Duration::from_secs(600),
        write_buffer_bytes: 1 << 20,
        ..opts()
    };
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 64 * MIB, 64 << 10),
        opts.clone(),
    )
    .unwrap();
    let vid = pool.create_volume("v", 4 * MIB, 4096).unwrap().id;
    let v = pool.open_volume(vid).unwrap();
    v.write(0, &vec![7u8; 4096], false).unwrap();
    v.flush().unwrap();
    drop(v);
    pool.close().unwrap();
    drop(pool);
    // An open records where the segment's chain ends; nothing is appended after it.
    Pool::open(dir.path(), opts.clone()).unwrap().kill();
    // The state the soak reached: the log recorded durable well past the batches that remain
    // (the segments holding the later ones are gone).
    {
        let db = redb::Database::open(dir.path().join("meta.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<'_, &str, u64> = redb::TableDefinition::new("counters");
            let mut t = tx.open_table(def).unwrap();
            let cur = t
                .get("wal_durable_lsn")
                .unwrap()
                .map(|v| v.value())
                .unwrap();
            t.insert("wal_durable_lsn", cur + 5).unwrap();
        }
        tx.commit().unwrap();
    }
    let pool = Pool::open(dir.path(), opts.clone()).unwrap();
    let v = pool.open_volume(vid).unwrap();
    // Rolls the fresh segment (recorded at once) for a batch that is never written.
    v.write(4096, &vec![9u8; 4096], false).unwrap();
    drop(v);
    pool.kill();

    let pool = Pool::open(dir.path(), opts).unwrap();
    let rep = pool.verify().unwrap();
    assert!(
        rep.is_clean(),
        "an unwritten, never flushed batch was reported as damage: {rep:?}"
    );
    let v = pool.open_volume(vid).unwrap();
    let mut got = vec![0u8; 8192];
    v.read(0, &mut got).unwrap();
    assert!(
        got[..4096].iter().all(|b| *b == 7),
        "the flushed write is lost"
    );
    assert!(
        got[4096..].iter().all(|b| *b == 0),
        "the unflushed write came back"
    );
}
