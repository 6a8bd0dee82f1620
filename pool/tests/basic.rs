#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Lifecycle of volumes, snapshots and clones on a real file-backed pool.

mod common;

use common::*;
use maas_pool::{BlockDevice, PoolError};

#[test]
fn write_read_seal_clone_delete_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create_pool(dir.path(), 512 * MIB, 64 << 10);
    let vi = pool.create_volume("vol-a", 64 * MIB, 512).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let a = pattern(1, 3 * MIB as usize);
    v.write(MIB, &a, false).unwrap();
    // Unaligned 512-byte write (read-modify-write path).
    v.write(512, &[7u8; 1024], false).unwrap();
    assert_eq!(read_all(&v, MIB, a.len()), a);
    assert_eq!(read_all(&v, 512, 1024), vec![7u8; 1024]);
    assert_eq!(read_all(&v, 0, 512), vec![0u8; 512]);
    v.flush().unwrap();

    let s1 = pool.seal(vi.id).unwrap();
    assert_eq!(read_all(&v, MIB, a.len()), a, "live data intact after seal");
    let b = pattern(2, MIB as usize);
    v.write(2 * MIB, &b, true).unwrap();
    v.discard(0, MIB).unwrap();
    let s2 = pool.seal(vi.id).unwrap();

    let c1 = pool.clone_snapshot(s1.id, "clone-1").unwrap();
    let c1v = pool.open_volume(c1.id).unwrap();
    assert_eq!(read_all(&c1v, MIB, a.len()), a);
    assert_eq!(read_all(&c1v, 512, 1024), vec![7u8; 1024]);
    // Writes to the clone never change the snapshot.
    c1v.write(MIB, &vec![9u8; 4096], false).unwrap();
    let c1b = pool.clone_snapshot(s1.id, "clone-1b").unwrap();
    let c1bv = pool.open_volume(c1b.id).unwrap();
    assert_eq!(read_all(&c1bv, MIB, a.len()), a);

    let c2 = pool.clone_snapshot(s2.id, "clone-2").unwrap();
    let c2v = pool.open_volume(c2.id).unwrap();
    assert_eq!(read_all(&c2v, 2 * MIB, b.len()), b);
    assert_eq!(read_all(&c2v, 0, MIB as usize), vec![0u8; MIB as usize]);

    // Errors are typed.
    assert!(matches!(
        v.read(64 * MIB, &mut [0u8; 512]),
        Err(PoolError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write(100, &[0u8; 512], false),
        Err(PoolError::Misaligned { .. })
    ));
    assert!(matches!(
        pool.create_volume("vol-a", MIB, 512),
        Err(PoolError::VolumeExists(_))
    ));
    assert!(matches!(
        pool.resize_volume(vi.id, MIB),
        Err(PoolError::ShrinkRefused { .. })
    ));

    // Lock: delete refused until then.
    let far = 4_102_444_800; // 2100-01-01
    pool.lock_snapshot(s1.id, far).unwrap();
    assert!(matches!(
        pool.delete_snapshot(s1.id),
        Err(PoolError::SnapshotLocked { .. })
    ));
    assert!(matches!(
        pool.lock_snapshot(s1.id, far - 1),
        Err(PoolError::LockShortened { .. })
    ));

    pool.delete_volume(c1b.id).unwrap();
    assert!(matches!(
        c1bv.read(0, &mut [0u8; 512]),
        Err(PoolError::VolumeDeleted(_))
    ));
    pool.delete_snapshot(s2.id).unwrap();
    let st = pool.stats().unwrap();
    assert!(st.chunks > 0);
    pool.close().unwrap();
    drop((v, c1v, c2v, c1bv, pool));

    let pool = maas_pool::Pool::open(dir.path(), test_open_opts()).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    assert_eq!(read_all(&v, 2 * MIB, b.len()), b);
    let c1v = pool.open_volume(c1.id).unwrap();
    assert_eq!(read_all(&c1v, MIB, 4096), vec![9u8; 4096]);
    assert_eq!(read_all(&c1v, MIB + 4096, a.len() - 4096), a[4096..]);
    assert_eq!(pool.snapshots().unwrap().len(), 1);
    let rep = pool.verify().unwrap();
    assert!(rep.damaged.is_empty(), "{rep:?}");
    assert!(rep.objects_checked > 0);
}

#[test]
fn seal_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create_pool(dir.path(), 256 * MIB, 64 << 10);
    let vi = pool.create_volume("p", 32 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    v.write(0, &pattern(3, 32 * MIB as usize), false).unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    pool.seal_with_progress(vi.id, &|f| seen.lock().unwrap().push(f))
        .unwrap();
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.len() >= 10,
        "512 dirty chunks in groups of 32: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "monotonic: {seen:?}");
    assert!(
        seen[0] < 0.1 && *seen.last().unwrap() > 0.8 && *seen.last().unwrap() <= 1.0,
        "{seen:?}"
    );
}
