#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Space on the host: a file device gives the space the pool frees back to its filesystem
//! (holes), so it holds about what the pool uses, not every block it ever wrote. maasd's
//! default device is a sparse file sized to the filesystem's free space: without this it grew
//! with every write until the filesystem was full. Freed log segments stay written for the
//! next ones, up to the WAL's fold threshold (64 MiB here): that much more it may hold.

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;
use maas_pool::{BlockDevice, OpenOptions, Pool};

#[test]
fn a_file_device_holds_what_the_pool_uses_not_all_it_ever_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        dir.path(),
        small_pool_opts(dir.path(), 2 << 30, 64 << 10),
        OpenOptions {
            wal_segment_bytes: 4 * MIB,
            background: false,
            ..test_open_opts()
        },
    )
    .unwrap();
    let vi = pool.create_volume("v", 32 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    for round in 0..32u64 {
        v.write(0, &pattern(round, 32 * MIB as usize), true)
            .unwrap();
        pool.checkpoint().unwrap();
    }
    // 1 GiB went through the log and as much was sealed; 32 MiB is live.
    let allocated = std::fs::metadata(dir.path().join("dev0")).unwrap().blocks() * 512;
    assert!(
        allocated < 256 * MIB,
        "the device file holds {} MiB for 32 MiB of live data",
        allocated / MIB
    );
    assert_eq!(
        read_all(&v, 0, 32 * MIB as usize),
        pattern(31, 32 * MIB as usize)
    );
    pool.verify().unwrap();
}
