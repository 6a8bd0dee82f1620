#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Seekable sealed chunks: small reads of a sealed chunk that is not in the RAM cache read and
//! decompress only the frames they need, checked by the frames' own CRCs.

mod common;

use std::path::PathBuf;

use common::*;
use maas_pool::object::{self, FRAME_LEN, Frame, ObjectKind};
use maas_pool::types::Digest;
use maas_pool::{BlockDevice, Pool, PoolError, Volume};

const KIB: usize = 1 << 10;

/// Chunk `c` of the test volumes: incompressible (stored as 4 KiB raw frames), compressible, or
/// alternating 64 KiB frames of each (64 KiB frames, as compressible).
fn chunk_data(c: u64, chunk: usize) -> Vec<u8> {
    let mut d = pattern(c + 1, chunk);
    match c % 3 {
        0 => {}
        1 => d
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i / 9 % 7) as u8 + c as u8),
        _ => {
            for f in d.chunks_mut(FRAME_LEN).skip(1).step_by(2) {
                f.fill(c as u8 | 1);
            }
        }
    }
    d
}

/// A pool with one sealed volume of `chunks` chunks made by [`chunk_data`], caches dropped.
fn sealed_volume(dir: &std::path::Path, chunk: u64, chunks: u64) -> (Pool, Volume, Vec<u8>) {
    let pool = create_pool(dir, chunk * chunks * 2 + 64 * MIB, chunk);
    let vi = pool.create_volume("s", chunk * chunks, 4096).unwrap();
    let v = pool.open_volume(vi.id).unwrap();
    let mut all = Vec::new();
    for c in 0..chunks {
        all.extend(chunk_data(c, chunk as usize));
    }
    v.write(0, &all, true).unwrap();
    pool.seal(vi.id).unwrap();
    pool.drop_caches();
    (pool, v, all)
}

fn digest_of(hex: &str) -> Digest {
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    Digest(d)
}

/// The stored object of the chunk at `offset` of `v`: device file, extent offset, and its
/// frames as the table on the device says.
fn object_frames(pool: &Pool, v: &Volume, offset: u64) -> (String, PathBuf, u64, Vec<Frame>) {
    let hex = pool.chunk_of(v.id(), offset).unwrap().unwrap();
    let (path, at, len) = pool.object_location(&hex).unwrap().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let obj = &bytes[at as usize..(at + len) as usize];
    let d = digest_of(&hex);
    let h = object::parse_header(obj, ObjectKind::Chunk, &d, "t").unwrap();
    assert_eq!(h.version, object::OBJECT_FORMAT_V2);
    let frames =
        object::parse_table(&h, &obj[object::OBJECT_HEADER_LEN..h.table_end()], "t").unwrap();
    (hex, path, at, frames)
}

fn sealed_read(pool: &Pool) -> u64 {
    pool.stats().unwrap().sealed_bytes_read
}

/// Partial reads of sealed chunks return the right bytes after the caches are dropped, for
/// every chunk size the pool uses, for incompressible, compressible and mixed chunks, single
/// blocks and reads spanning frames; and again once their frames are cached.
#[test]
fn partial_reads_return_the_right_bytes_after_drop_caches() {
    for chunk in [64 << 10, 256 << 10, MIB, 4 * MIB] {
        let dir = tempfile::tempdir().unwrap();
        let (pool, v, all) = sealed_volume(dir.path(), chunk, 6);
        let cs = chunk as usize;
        let mut reads: Vec<(usize, usize)> = Vec::new();
        for c in 0..6 {
            let base = c * cs;
            reads.push((base, 4 * KIB));
            reads.push((base + cs - 4 * KIB, 4 * KIB));
            if cs > FRAME_LEN {
                reads.push((base + FRAME_LEN - 4 * KIB, 8 * KIB));
                reads.push((base + 3 * FRAME_LEN / 2, 4 * KIB));
                reads.push((base + 4 * KIB, 3 * FRAME_LEN));
            }
        }
        // Reads across two chunks.
        reads.push((cs - 8 * KIB, 16 * KIB));
        // Round 0 reads from the device, round 1 from the frames round 0 cached.
        for round in 0..2 {
            for &(at, n) in &reads {
                assert!(
                    read_all(&v, at as u64, n) == all[at..at + n],
                    "chunk {chunk} read {at}+{n} round {round}"
                );
            }
        }
        pool.drop_caches();
        for &(at, n) in reads.iter().rev() {
            assert!(read_all(&v, at as u64, n) == all[at..at + n]);
        }
        // Whole volume, through whole-chunk reads.
        pool.drop_caches();
        assert!(read_all(&v, 0, all.len()) == all);
        assert!(pool.verify().unwrap().is_clean());
        pool.close().unwrap();
    }
}

/// A block read from a device into the frame cache is then served without waiting
/// (read_nowait), like one of a whole cached chunk.
#[test]
fn cached_frames_serve_reads_that_must_not_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, v, all) = sealed_volume(dir.path(), MIB, 3);
    let at = (MIB + 5 * FRAME_LEN as u64 + 8192) as usize;
    let mut buf = vec![0u8; 4096];
    // Index nodes first (the nowait path does not read them either).
    read_all(&v, 0, 4096);
    assert!(!v.read_nowait(at as u64, &mut buf).unwrap());
    assert!(read_all(&v, at as u64, 4096) == all[at..at + 4096]);
    buf.fill(0);
    assert!(v.read_nowait(at as u64, &mut buf).unwrap());
    assert!(buf == all[at..at + 4096]);
    // Another block of the same frame, too; one of another frame needs the device.
    assert!(v.read_nowait(at as u64 + 4096, &mut buf).unwrap());
    assert!(buf == all[at + 4096..at + 8192]);
    assert!(
        !v.read_nowait(at as u64 + FRAME_LEN as u64, &mut buf)
            .unwrap()
    );
    pool.close().unwrap();
}

/// A 4 KiB read of an uncached 1 MiB chunk reads the header block and one frame from the
/// device, not the chunk: about 72 KiB for an incompressible chunk, less for a compressed one;
/// once the chunk's frame table is cached, only the frame's blocks.
#[test]
fn a_partial_read_reads_far_fewer_bytes_than_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, v, all) = sealed_volume(dir.path(), MIB, 6);
    // Index nodes come in with the first read.
    read_all(&v, 0, 4096);
    for c in 1..6usize {
        let at = c * MIB as usize + 7 * FRAME_LEN + 12 * KIB;
        let before = sealed_read(&pool);
        assert!(read_all(&v, at as u64, 4096) == all[at..at + 4096]);
        let read = sealed_read(&pool) - before;
        assert!(read > 0, "chunk {c} was read from a device");
        assert!(
            read <= (FRAME_LEN + 8 * KIB) as u64,
            "chunk {c}: a 4 KiB read read {read} bytes"
        );
        // Again: the frame is cached now (the next block is in the same 64 KiB frame; an
        // incompressible chunk's frames are 4 KiB, so the same block again).
        let again = if c % 3 == 0 { at } else { at + 4096 };
        let before = sealed_read(&pool);
        assert!(read_all(&v, again as u64, 4096) == all[again..again + 4096]);
        assert_eq!(
            sealed_read(&pool),
            before,
            "chunk {c}: served from the frame cache"
        );
        // Another frame: the header and frame table are cached, only the frame's blocks are
        // read, in one request, however the chunk is compressed.
        let at = c * MIB as usize + 11 * FRAME_LEN + 20 * KIB;
        let before = sealed_read(&pool);
        assert!(read_all(&v, at as u64, 4096) == all[at..at + 4096]);
        let read = sealed_read(&pool) - before;
        assert!(
            read > 0 && read <= (FRAME_LEN + 4 * KIB) as u64,
            "chunk {c}: a 4 KiB read with a cached frame table read {read} bytes"
        );
    }
    // A whole-chunk read reads the whole object and verifies its digest.
    pool.drop_caches();
    read_all(&v, 0, 4096);
    let before = sealed_read(&pool);
    assert!(read_all(&v, 3 * MIB, MIB as usize) == all[3 * MIB as usize..4 * MIB as usize]);
    assert!(sealed_read(&pool) - before >= MIB);
    pool.close().unwrap();
}

/// A flipped byte in one frame on the device fails partial reads of that frame with a checksum
/// error, while reads of the chunk's other frames still succeed; a whole-chunk read and verify
/// name the chunk. A flipped byte in the frame table fails every partial read of the chunk.
#[test]
fn a_damaged_frame_fails_its_reads_only_and_verify_names_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, v, all) = sealed_volume(dir.path(), MIB, 6);
    // Incompressible chunk 3 (4 KiB frames: block 49 of it), compressible chunk 1, mixed
    // chunk 2 (64 KiB frames: frame 3, compressed).
    let mut damaged = Vec::new();
    let mut victims = Vec::new();
    let in_chunk = 3 * FRAME_LEN + 4096;
    for c in [3u64, 1, 2] {
        let (hex, path, at, frames) = object_frames(&pool, &v, c * MIB);
        let f = frames
            .iter()
            .find(|f| f.raw_offset <= in_chunk && in_chunk < f.raw_offset + f.raw_len)
            .unwrap();
        assert_eq!(f.index, if c == 3 { in_chunk / 4096 } else { 3 });
        flip(&path, at + (f.offset + f.stored_len / 2) as u64);
        damaged.push(hex);
        victims.push(f.index);
    }
    pool.drop_caches();
    let mut buf = vec![0u8; 4096];
    for (c, victim) in [3u64, 1, 2].into_iter().zip(victims) {
        let bad = c * MIB + in_chunk as u64;
        let err = v.read(bad, &mut buf).unwrap_err();
        assert!(
            matches!(&err, PoolError::Checksum { what } if what.contains(&format!("(frame {victim})"))),
            "chunk {c}: {err}"
        );
        let mut goods = vec![
            c * MIB,
            c * MIB + 2 * FRAME_LEN as u64,
            c * MIB + MIB - 4096,
        ];
        if c == 3 {
            // 4 KiB frames: the damaged block's neighbours read.
            goods.extend([bad - 4096, bad + 4096]);
        }
        for good in goods {
            v.read(good, &mut buf).unwrap();
            assert!(
                buf == all[good as usize..good as usize + 4096],
                "chunk {c} at {good}"
            );
        }
        // Still failing (nothing damaged was cached), and a whole-chunk read fails too.
        assert!(v.read(bad, &mut buf).unwrap_err().is_integrity());
        let mut whole = vec![0u8; MIB as usize];
        assert!(v.read(c * MIB, &mut whole).unwrap_err().is_integrity());
    }
    // The frame table of chunk 4: every partial read of it fails.
    let (hex, path, at, _) = object_frames(&pool, &v, 4 * MIB);
    flip(&path, at + object::OBJECT_HEADER_LEN as u64 + 5);
    damaged.push(hex);
    pool.drop_caches();
    for off in [4 * MIB, 4 * MIB + 9 * FRAME_LEN as u64] {
        let err = v.read(off, &mut buf).unwrap_err();
        assert!(
            matches!(&err, PoolError::Checksum { what } if what.contains("frame table")),
            "{err}"
        );
    }
    // Undamaged chunks read.
    v.read(5 * MIB + 4096, &mut buf).unwrap();
    assert!(buf == all[(5 * MIB + 4096) as usize..(5 * MIB + 8192) as usize]);
    let rep = pool.verify().unwrap();
    let mut names: Vec<String> = rep.damaged.iter().map(|d| d.digest.clone()).collect();
    names.sort();
    damaged.sort();
    assert_eq!(names, damaged, "verify names exactly the damaged chunks");
    pool.close().unwrap();
}

/// A 4 KiB read of a sealed incompressible chunk (4 KiB raw frames) after drop_caches reads
/// the header and frame table blocks and the one block it wants, in one submission: 8 KiB when
/// the table fits the header block (chunks up to 1008 KiB), 12 KiB for a 1 MiB chunk (header and
/// table are 4160 bytes); once the table is cached, exactly the one 4 KiB block; once the block
/// is cached, nothing. Compressible and mixed chunks keep 64 KiB frames.
#[test]
fn a_4k_read_of_an_incompressible_chunk_reads_one_block() {
    for (chunk, first_read) in [(512 * KIB as u64, 8 * KIB as u64), (MIB, 12 * KIB as u64)] {
        let dir = tempfile::tempdir().unwrap();
        let (pool, v, all) = sealed_volume(dir.path(), chunk, 6);
        let cs = chunk as usize;
        for c in 0..3u64 {
            let (_, _, _, frames) = object_frames(&pool, &v, c * chunk);
            let want = if c == 0 { 4096 } else { FRAME_LEN };
            assert!(frames.iter().all(|f| f.raw_len == want), "chunk {c}");
        }
        pool.drop_caches();
        // Index nodes come in with a read of a compressible chunk.
        read_all(&v, chunk, 4096);
        // The chunk cache counts a cached 4 KiB frame at its bytes plus its entry's overhead.
        let cached = || pool.stats().unwrap().ram_tier.chunk_cache_bytes;
        let before = cached();
        read_all(&v, 3 * chunk + 4096, 4096);
        let grew = cached() - before;
        assert!(grew > 4096 && grew <= 4096 + 256, "{grew}");
        pool.drop_caches();
        read_all(&v, chunk, 4096);
        for c in [0usize, 3] {
            let at = c * cs + 37 * 4096;
            let before = sealed_read(&pool);
            assert!(read_all(&v, at as u64, 4096) == all[at..at + 4096]);
            assert_eq!(sealed_read(&pool) - before, first_read, "chunk {chunk}/{c}");
            for at in [c * cs + 38 * 4096, c * cs + cs - 4096, c * cs] {
                let before = sealed_read(&pool);
                assert!(read_all(&v, at as u64, 4096) == all[at..at + 4096]);
                assert_eq!(
                    sealed_read(&pool) - before,
                    4096,
                    "chunk {chunk}/{c} at {at}"
                );
                let before = sealed_read(&pool);
                assert!(read_all(&v, at as u64, 4096) == all[at..at + 4096]);
                assert_eq!(sealed_read(&pool), before, "a cached block");
            }
            // A read of two blocks: two blocks, one request.
            let at = c * cs + 50 * 4096;
            let before = sealed_read(&pool);
            assert!(read_all(&v, at as u64, 8192) == all[at..at + 8192]);
            assert_eq!(sealed_read(&pool) - before, 8192);
        }
        assert!(pool.verify().unwrap().is_clean());
        pool.close().unwrap();
    }
}

/// Chunks stored in format version 1 (pools written before version 2) are still read, whole
/// and in part: the object of a sealed chunk is overwritten on the device with its version 1
/// encoding (same digest, same extent length for incompressible data).
#[test]
fn version_1_chunks_are_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, v, all) = sealed_volume(dir.path(), MIB, 3);
    let (hex, path, at, _) = object_frames(&pool, &v, 0);
    let raw = &all[..MIB as usize];
    let enc = object::encode_v1(ObjectKind::Chunk, &digest_of(&hex), raw, 1).unwrap();
    let (_, _, len) = pool.object_location(&hex).unwrap().unwrap();
    // (An incompressible chunk's version 2 object is one block longer: its 4 KiB frame table.)
    assert!(enc.buf.len() as u64 <= len, "fits the extent");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&enc.buf, at).unwrap();
        f.sync_all().unwrap();
    }
    pool.drop_caches();
    let off = 5 * FRAME_LEN + 4096;
    assert!(read_all(&v, off as u64, 4096) == all[off..off + 4096]);
    pool.drop_caches();
    assert!(read_all(&v, 0, MIB as usize) == raw);
    assert!(pool.verify().unwrap().is_clean());
    pool.close().unwrap();
}

/// A network front-end's read (`read_async`) of a sealed chunk not in RAM: the first goes to a
/// blocking thread (the frame table is not in RAM yet); after that a read of raw frames is one
/// asynchronous device read, checked against the frames' CRCs (a flipped byte is a medium
/// error, not data) and cached; a compressed frame needs decompression, on a blocking thread.
#[test]
fn raw_frames_are_read_asynchronously_once_their_table_is_in_ram() {
    if !maas_pool::aio::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Chunk 0 incompressible (4 KiB raw frames), chunk 1 compressible (64 KiB zstd frames).
    let (pool, v, all) = sealed_volume(dir.path(), MIB, 2);
    let at = |off: u64, len: usize| all[off as usize..off as usize + len].to_vec();
    let (got, how) = read_async(&v, 4096, 4096);
    assert_eq!((got.unwrap(), how), (at(4096, 4096), How::Blocking));
    let before = sealed_read(&pool);
    let (got, how) = read_async(&v, 64 << 10, 8192);
    assert_eq!((got.unwrap(), how), (at(64 << 10, 8192), How::Pending));
    assert_eq!(
        sealed_read(&pool) - before,
        8192,
        "exactly the two blocks were read"
    );
    let (got, how) = read_async(&v, 64 << 10, 8192);
    assert_eq!(
        (got.unwrap(), how),
        (at(64 << 10, 8192), How::Done),
        "cached now"
    );

    let (got, how) = read_async(&v, MIB + 4096, 4096);
    assert_eq!((got.unwrap(), how), (at(MIB + 4096, 4096), How::Blocking));
    let (got, how) = read_async(&v, MIB + (256 << 10), 4096);
    assert_eq!(
        (got.unwrap(), how),
        (at(MIB + (256 << 10), 4096), How::Blocking),
        "a compressed frame is decompressed on a blocking thread"
    );

    // Damage in a raw frame whose table is in RAM: the asynchronous read checks it.
    let (_, path, obj_at, frames) = object_frames(&pool, &v, 0);
    let victim = frames.iter().find(|f| f.raw_offset == 512 << 10).unwrap();
    flip(&path, obj_at + victim.offset as u64 + 100);
    let (got, how) = read_async(&v, 512 << 10, 4096);
    assert_eq!(how, How::Pending);
    assert!(matches!(got, Err(PoolError::Checksum { .. })), "{got:?}");
    let (got, _) = read_async(&v, (512 << 10) + 4096, 4096);
    assert_eq!(got.unwrap(), at((512 << 10) + 4096, 4096));
}
