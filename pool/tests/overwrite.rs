#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A live volume overwritten again and again, never sealed, on a pool much smaller than what is
//! written: the log must not fill the pool. Folding starts when the log takes too much of the
//! free space, and writers wait for it when it falls behind, instead of failing with "no space".

mod common;

use common::*;
use maas_pool::{BlockDevice, OpenOptions, Pool};

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
        for i in 0..16u64 {
            v.write(i * MIB, &pattern(pass * 100 + i, MIB as usize), false)
                .unwrap_or_else(|e| panic!("pass {pass}, MiB {i}: {e}"));
        }
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
