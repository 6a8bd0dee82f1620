#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! Helpers shared by the pool's integration tests.

use std::path::Path;

use maas_pool::{BlockDevice, CreateOptions, DeviceSpec, OpenOptions, Pool, Tier};

pub const MIB: u64 = 1 << 20;

pub fn small_pool_opts(dir: &Path, device_bytes: u64, chunk: u64) -> CreateOptions {
    CreateOptions {
        devices: vec![DeviceSpec {
            path: dir.join("dev0"),
            tier: Tier::Ssd,
            size: device_bytes,
        }],
        chunk_size: chunk,
        zstd_level: 1,
    }
}

pub fn test_open_opts() -> OpenOptions {
    OpenOptions {
        cache_bytes: 16 * MIB as usize,
        log_cache_bytes: 16 * MIB as usize,
        wal_segment_bytes: 4 * MIB,
        wal_fold_threshold: 64 * MIB,
        background: false,
        ..Default::default()
    }
}

pub fn create_pool(dir: &Path, device_bytes: u64, chunk: u64) -> Pool {
    Pool::create(
        dir,
        small_pool_opts(dir, device_bytes, chunk),
        test_open_opts(),
    )
    .unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    out
}

pub fn read_all(v: &impl BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    v.read(offset, &mut b).unwrap();
    b
}

/// Flips one byte of a file on disk (damage that checksums must catch).
pub fn flip(path: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x5a;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

/// Byte offset of the first 4 KiB-aligned block of `path` equal to `block`.
pub fn find_block(path: &Path, block: &[u8]) -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let mut base = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return None;
        }
        // Reads of a regular file return whole 4 KiB multiples until the end.
        for (i, b) in buf[..n].chunks_exact(4096).enumerate() {
            if b == block {
                return Some(base + (i * 4096) as u64);
            }
        }
        base += n as u64;
    }
}

pub use maas_pool::aio::block_on;

/// How [`read_async`] read.
#[derive(Debug, PartialEq)]
pub enum How {
    Done,
    Pending,
    Blocking,
}

/// Reads through `read_async`, falling back to a blocking read where it says so (as the
/// front-ends do); returns the data and how it was read.
pub fn read_async(
    v: &maas_pool::Volume,
    offset: u64,
    len: usize,
) -> (maas_pool::Result<Vec<u8>>, How) {
    use maas_pool::AsyncRead;
    match v.read_async(offset, vec![0xAA; len]) {
        AsyncRead::Done(r) => (r, How::Done),
        AsyncRead::Pending(f) => (block_on(f), How::Pending),
        AsyncRead::Blocking(mut buf) => (v.read(offset, &mut buf).map(|()| buf), How::Blocking),
    }
}
