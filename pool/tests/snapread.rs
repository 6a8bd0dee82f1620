#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Reading sealed snapshots in place (`Pool::snapshot_reader`): any offset and length, the
//! snapshot's bytes and not the live volume's, zeroes where nothing was written, errors past
//! the end and after the snapshot is gone.

mod common;

use common::*;
use maas_pool::{BlockDevice, PoolError};

#[test]
fn snapshot_reader_returns_each_point_in_time_at_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create_pool(dir.path(), 256 * MIB, 256 << 10);
    let size = 8 * MIB;
    let vi = pool.create_volume("v", size, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    // Model of the volume: day 1 writes two regions (one crossing chunk borders), leaves
    // the rest unwritten (zeroes).
    let mut model1 = vec![0u8; size as usize];
    let a = pattern(1, 3 * MIB as usize / 2);
    v.write(MIB / 2, &a, false).unwrap();
    model1[MIB as usize / 2..MIB as usize / 2 + a.len()].copy_from_slice(&a);
    let b = pattern(2, 64 << 10);
    v.write(6 * MIB, &b, false).unwrap();
    model1[6 * MIB as usize..6 * MIB as usize + b.len()].copy_from_slice(&b);
    v.flush().unwrap();
    let s1 = pool.seal(vi.id).unwrap();

    // Day 2 overwrites part of day 1 and zeroes another part.
    let mut model2 = model1.clone();
    let c = pattern(3, 300 << 10);
    v.write(MIB, &c, false).unwrap();
    model2[MIB as usize..MIB as usize + c.len()].copy_from_slice(&c);
    v.write_zeroes(6 * MIB, 64 << 10, false).unwrap();
    model2[6 * MIB as usize..6 * MIB as usize + (64 << 10)].fill(0);
    v.flush().unwrap();
    let s2 = pool.seal(vi.id).unwrap();
    // The live volume moves on; neither snapshot may see it.
    v.write(0, &pattern(4, 2 * MIB as usize), false).unwrap();

    let r1 = pool.snapshot_reader(s1.id).unwrap();
    let r2 = pool.snapshot_reader(s2.id).unwrap();
    assert_eq!(r1.size(), size);
    // Whole images, then odd offsets and lengths across chunk and block borders.
    for (r, model) in [(&r1, &model1), (&r2, &model2)] {
        let mut all = vec![0u8; size as usize];
        r.read_at(0, &mut all).unwrap();
        assert!(all == *model, "whole image of {:?}", r.id());
        let mut x = 7u64;
        for _ in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % size;
            let len = ((x >> 8) % (700 << 10)).min(size - off) as usize;
            let mut buf = vec![0xAAu8; len];
            r.read_at(off, &mut buf).unwrap();
            assert!(
                buf[..] == model[off as usize..off as usize + len],
                "{:?} at {off}+{len}",
                r.id()
            );
        }
    }

    // Past the end: an error, not a short read.
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        r1.read_at(size - 100, &mut buf),
        Err(PoolError::OutOfRange { .. })
    ));
    assert!(matches!(
        r1.read_at(u64::MAX - 10, &mut buf),
        Err(PoolError::OutOfRange { .. })
    ));

    // A snapshot that no longer exists cannot be opened; a reader opened before the delete
    // fails once its chunks are reclaimed, and never returns other bytes.
    pool.delete_snapshot(s1.id).unwrap();
    assert!(matches!(
        pool.snapshot_reader(s1.id),
        Err(PoolError::SnapshotNotFound(_))
    ));
    pool.reclaim().unwrap();
    let mut old = vec![0u8; 64 << 10];
    if r1.read_at(6 * MIB, &mut old).is_ok() {
        // Chunks still referenced elsewhere (by snapshot 2 or the live volume) may remain
        // readable; then they must still be day 1's bytes.
        assert!(old[..] == model1[6 * MIB as usize..6 * MIB as usize + (64 << 10)]);
    }
    // Snapshot 2 is untouched by the deletion of snapshot 1.
    let mut all = vec![0u8; size as usize];
    r2.read_at(0, &mut all).unwrap();
    assert!(all == model2);
}

#[test]
fn a_volume_is_unchanged_since_its_snapshot_until_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create_pool(dir.path(), 128 * MIB, 256 << 10);
    let vi = pool.create_volume("v", 4 * MIB, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    v.write(0, &pattern(1, 64 << 10), false).unwrap();
    let s1 = pool.seal(vi.id).unwrap();
    assert!(pool.volume_unchanged_since(vi.id, s1.id).unwrap());
    // The same bytes again are a write all the same.
    v.write(0, &pattern(1, 4096), false).unwrap();
    assert!(!pool.volume_unchanged_since(vi.id, s1.id).unwrap());
    let s2 = pool.seal(vi.id).unwrap();
    assert!(pool.volume_unchanged_since(vi.id, s2.id).unwrap());
    // What is compared is content: the same bytes sealed again make the same index, so the
    // volume holds exactly the first snapshot's content too.
    assert!(pool.volume_unchanged_since(vi.id, s1.id).unwrap());
    v.write(8192, &pattern(7, 4096), false).unwrap();
    let s2 = pool.seal(vi.id).unwrap();
    assert!(pool.volume_unchanged_since(vi.id, s2.id).unwrap());
    assert!(!pool.volume_unchanged_since(vi.id, s1.id).unwrap());
    v.write_zeroes(MIB, 4096, false).unwrap();
    assert!(!pool.volume_unchanged_since(vi.id, s2.id).unwrap());
    let s3 = pool.seal(vi.id).unwrap();
    pool.resize_volume(vi.id, 8 * MIB).unwrap();
    assert!(!pool.volume_unchanged_since(vi.id, s3.id).unwrap());
    // Another volume's snapshot never vouches for this one.
    let other = pool.create_volume("w", 4 * MIB, 4096).unwrap();
    let so = pool.seal(other.id).unwrap();
    assert!(!pool.volume_unchanged_since(vi.id, so.id).unwrap());
}
