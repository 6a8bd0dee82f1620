#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The pread/pwrite fallback (used where io_uring is unavailable) keeps every guarantee.
//! Its own test binary: the engine choice is made once per process.

mod common;

use common::*;
use maas_pool::{BlockDevice, Pool};

#[test]
fn sync_engine_roundtrip_seal_reopen() {
    // SAFETY: set before any thread or I/O starts in this test binary.
    unsafe { std::env::set_var("MAAS_IO_ENGINE", "sync") };
    assert_eq!(maas_pool::io::engine(), maas_pool::io::IoEngine::Sync);
    let dir = tempfile::tempdir().unwrap();
    let pool = create_pool(dir.path(), 128 * MIB, 64 << 10);
    let vi = pool.create_volume("s", 8 * MIB, 512).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let data = pattern(77, 3 * MIB as usize + 512);
    v.write(512, &data, true).unwrap();
    let s = pool.seal(vi.id).unwrap();
    pool.close().unwrap();
    drop((v, pool));
    let pool = Pool::open(dir.path(), test_open_opts()).unwrap();
    let c = pool.clone_snapshot(s.id, "c").unwrap();
    assert_eq!(
        read_all(&pool.open_volume(c.id).unwrap(), 512, data.len()),
        data
    );
    assert!(pool.verify().unwrap().damaged.is_empty());
}
