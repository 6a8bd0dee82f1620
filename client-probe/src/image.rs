//! Block sources: a block device or an image file copied onto the volume, block for block.
//! A later backup sends only the blocks whose content changed, found by comparing each
//! block's hash with the one kept from the last backup ([`BlockMap`]); holes of a sparse file
//! are skipped without reading them, and all-zero blocks become Write Zeroes (nothing stored).
//!
//! The map is trusted only when it describes exactly what the volume holds: it names the
//! snapshot it was made for, which must be the volume's newest, and it is deleted before the
//! first write of a backup and written again only after the seal. A probe killed mid-backup
//! therefore leaves no map, and the next backup compares with the volume itself (reads it)
//! instead of trusting a map the half-written volume no longer matches.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::nvme_disk::{DiskError, NvmeDisk};

/// Bytes per compared block: small enough that a small change sends little, large enough that
/// the map of a 1 TiB disk stays at 256 MiB.
pub const BLOCK: usize = 64 << 10;
/// Bytes of a block's BLAKE3 kept in the map (128 bits: accidental collisions are out of
/// reach; the map is this host's own record, not a defence against an adversary).
const DIGEST: usize = 16;
/// Bytes read from the source at a time.
const READ: usize = 1 << 20;
/// Writes in flight to the volume at once.
const IN_FLIGHT: usize = 32;

const MAP_MAGIC: &[u8; 8] = b"MAASBMAP";
const MAP_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("source {0}: {1}")]
    Source(String, std::io::Error),
    #[error("{0}")]
    Disk(#[from] DiskError),
    #[error("block map {0}: {1}")]
    Map(String, String),
}

/// What an image backup did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImageChanges {
    /// Bytes of the source.
    pub source_bytes: u64,
    /// `map` (compared with the last backup's block hashes), `volume` (compared with what the
    /// volume holds, read back) or `full` (a new volume: every block written).
    pub compared_with: String,
    pub blocks: u64,
    pub blocks_changed: u64,
    /// Changed blocks that are all zero (sent as Write Zeroes: nothing stored).
    pub blocks_zeroed: u64,
    /// Bytes of the source skipped as holes without reading them.
    pub hole_bytes: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// The source's size or modification time moved while it was read: the snapshot is only
    /// as consistent as a copy of a disk in use (snapshot the source first, e.g. LVM).
    pub changed_during_backup: bool,
    /// BLAKE3 of the whole image as read.
    pub blake3: String,
}

/// The hashes of every block of the image as of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMap {
    pub snapshot: String,
    pub source_len: u64,
    pub digests: Vec<[u8; DIGEST]>,
}

impl BlockMap {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.digests.len() * DIGEST);
        out.extend_from_slice(MAP_MAGIC);
        out.extend_from_slice(&MAP_VERSION.to_le_bytes());
        out.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        out.extend_from_slice(&self.source_len.to_le_bytes());
        out.extend_from_slice(&(self.snapshot.len() as u32).to_le_bytes());
        out.extend_from_slice(self.snapshot.as_bytes());
        out.extend_from_slice(&(self.digests.len() as u64).to_le_bytes());
        for d in &self.digests {
            out.extend_from_slice(d);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses a map; anything damaged, truncated or of another format is an error (the caller
    /// then compares with the volume instead).
    fn decode(b: &[u8]) -> Result<BlockMap, String> {
        if b.len() < 32 + 32 {
            return Err("too short".into());
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err("checksum mismatch".into());
        }
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let s = body.get(at..at + n).ok_or("truncated")?;
            at += n;
            Ok(s)
        };
        if take(8)? != MAP_MAGIC {
            return Err("not a block map".into());
        }
        let u32_of = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap_or([0; 4]));
        let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
        let version = u32_of(take(4)?);
        if version != MAP_VERSION {
            return Err(format!("version {version}, expected {MAP_VERSION}"));
        }
        if u32_of(take(4)?) as usize != BLOCK {
            return Err("another block size".into());
        }
        let source_len = u64_of(take(8)?);
        let slen = u32_of(take(4)?) as usize;
        if slen > 256 {
            return Err("snapshot name too long".into());
        }
        let snapshot = String::from_utf8(take(slen)?.to_vec()).map_err(|_| "bad name")?;
        let n = u64_of(take(8)?);
        if n != source_len.div_ceil(BLOCK as u64) {
            return Err("block count does not match the length".into());
        }
        let rest = &body[at..];
        if rest.len() as u64 != n * DIGEST as u64 {
            return Err("truncated digests".into());
        }
        let digests = rest
            .chunks_exact(DIGEST)
            .map(|c| {
                let mut d = [0u8; DIGEST];
                d.copy_from_slice(c);
                d
            })
            .collect();
        Ok(BlockMap {
            snapshot,
            source_len,
            digests,
        })
    }

    /// Loads the map at `path`; None if there is none or it cannot be trusted.
    pub fn load(path: &Path) -> Option<BlockMap> {
        let b = std::fs::read(path).ok()?;
        match BlockMap::decode(&b) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(map = %path.display(), error = %e, "ignoring the block map: the volume will be compared instead");
                None
            }
        }
    }

    /// Writes the map atomically (temporary file, fsync, rename, fsync of the folder).
    pub fn save(&self, path: &Path) -> Result<(), ImageError> {
        let err = |e: std::io::Error| ImageError::Map(path.display().to_string(), e.to_string());
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(&self.encode()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)
    }

    /// Removes the map durably (before a backup writes its first block).
    pub fn forget(path: &Path) -> Result<(), ImageError> {
        let err = |e: std::io::Error| ImageError::Map(path.display().to_string(), e.to_string());
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(err(e)),
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)
    }
}

/// A block device or image file opened for reading.
#[derive(Debug)]
pub struct ImageSource {
    path: PathBuf,
    file: File,
    pub len: u64,
    is_device: bool,
    /// (size, mtime ns) at open, to notice a file that changes while it is read.
    stamp: (u64, i128),
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
}

fn stamp_of(m: &std::fs::Metadata) -> (u64, i128) {
    (
        m.len(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    )
}

pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Whether `path` is something [`ImageSource::open`] backs up (a block device or a regular
/// file, symlinks followed).
pub fn is_image(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() || m.file_type().is_block_device())
        .unwrap_or(false)
}

impl ImageSource {
    pub fn open(path: &Path) -> Result<ImageSource, ImageError> {
        let err = |e| ImageError::Source(path.display().to_string(), e);
        let mut file = File::open(path).map_err(err)?;
        let m = file.metadata().map_err(err)?;
        let is_device = m.file_type().is_block_device();
        let len = if is_device {
            file.seek(SeekFrom::End(0)).map_err(err)?
        } else {
            m.len()
        };
        Ok(ImageSource {
            path: path.to_path_buf(),
            file,
            len,
            is_device,
            stamp: stamp_of(&m),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime_ns: m
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec()),
        })
    }

    fn io_err(&self, e: std::io::Error) -> ImageError {
        ImageError::Source(self.path.display().to_string(), e)
    }

    /// Start of the next data at or after `pos` (SEEK_DATA), for files that may have holes;
    /// `pos` itself when the source cannot say (devices, filesystems without it).
    fn next_data(&self, pos: u64) -> u64 {
        if self.is_device {
            return pos;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on a file descriptor we own; it only moves the file offset, which
        // every read below sets explicitly (read_exact_at).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if r >= 0 {
            r as u64
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            self.len // only a hole from here to the end
        } else {
            pos
        }
    }

    fn changed_since_open(&self) -> bool {
        if self.is_device {
            return false;
        }
        std::fs::metadata(&self.path)
            .map(|m| stamp_of(&m) != self.stamp)
            .unwrap_or(true)
    }
}

/// Where the volume's current content is known from.
#[derive(Debug)]
pub enum Baseline<'a> {
    /// A fresh volume (all zero): every non-zero block is written.
    Blank,
    /// The map of the volume's newest snapshot.
    Map(&'a BlockMap),
    /// Unknown: each block is read back from the volume and compared.
    Volume,
}

fn digest(b: &[u8]) -> [u8; DIGEST] {
    let h = blake3::hash(b);
    let mut d = [0u8; DIGEST];
    d.copy_from_slice(&h.as_bytes()[..DIGEST]);
    d
}

/// Waits for the oldest writes until at most `keep` are in flight.
fn drain(
    rt: &Handle,
    q: &mut VecDeque<JoinHandle<Result<(), DiskError>>>,
    keep: usize,
) -> Result<(), ImageError> {
    while q.len() > keep {
        if let Some(h) = q.pop_front() {
            rt.block_on(h)
                .map_err(|e| DiskError::Gone(format!("write task: {e}")))??;
        }
    }
    Ok(())
}

/// Brings the volume up to date with the source: compares every block with `base` and writes
/// those that differ; zeroes the volume's bytes past the end of a source that shrank
/// (`old_len`); flushes. Returns the new map (to be saved after the seal) and what changed.
pub fn sync_image(
    rt: &Handle,
    disk: &Arc<NvmeDisk>,
    src: &mut ImageSource,
    base: Baseline<'_>,
    old_len: u64,
    progress: &dyn Fn(u64, u64),
) -> Result<(Vec<[u8; DIGEST]>, ImageChanges), ImageError> {
    let len = src.len;
    let vol = disk.size();
    if vol < len.div_ceil(4096) * 4096 {
        return Err(DiskError::Invalid(format!(
            "the volume ({vol} bytes) is smaller than the source ({len} bytes)"
        ))
        .into());
    }
    if disk.max_transfer() < BLOCK || disk.block_size() != 4096 {
        return Err(DiskError::Invalid(format!(
            "the target takes {} bytes per command in blocks of {}; image backups need {BLOCK} \
             in blocks of 4096",
            disk.max_transfer(),
            disk.block_size()
        ))
        .into());
    }
    let nblocks = len.div_ceil(BLOCK as u64);
    let mut digests = Vec::with_capacity(nblocks as usize);
    let mut ch = ImageChanges {
        source_bytes: len,
        compared_with: match base {
            Baseline::Blank => "full",
            Baseline::Map(_) => "map",
            Baseline::Volume => "volume",
        }
        .into(),
        blocks: nblocks,
        ..Default::default()
    };
    let mut whole = blake3::Hasher::new();
    let zero = vec![0u8; READ];
    let zero_digest = digest(&zero[..BLOCK]);
    let mut inflight: VecDeque<JoinHandle<Result<(), DiskError>>> = VecDeque::new();
    let mut buf = vec![0u8; READ];
    let mut pos = 0u64;
    let mut data_at = src.next_data(0);
    while pos < len {
        let n = (READ as u64).min(len - pos) as usize;
        if data_at < pos {
            data_at = src.next_data(pos);
        }
        let hole = data_at >= pos + n as u64;
        let piece: &[u8] = if hole {
            // A hole: zeroes without reading.
            ch.hole_bytes += n as u64;
            &zero[..n]
        } else {
            use std::os::unix::fs::FileExt;
            src.file
                .read_exact_at(&mut buf[..n], pos)
                .map_err(|e| src.io_err(e))?;
            ch.bytes_read += n as u64;
            &buf[..n]
        };
        whole.update(piece);
        for (k, blk) in piece.chunks(BLOCK).enumerate() {
            let off = pos + (k * BLOCK) as u64;
            let i = (off / BLOCK as u64) as usize;
            let is_zero = hole || blk.iter().all(|&b| b == 0);
            let d = if is_zero && blk.len() == BLOCK {
                zero_digest
            } else {
                digest(blk)
            };
            digests.push(d);
            // Volume I/O is in whole 4 KiB blocks: a last partial block is padded with zeroes
            // (and so it reads back).
            let io_len = blk.len().div_ceil(4096) * 4096;
            let changed = match base {
                Baseline::Blank => !is_zero,
                Baseline::Map(m) => m.digests.get(i) != Some(&d),
                Baseline::Volume => {
                    let have = rt.block_on(disk.read(off, io_len))?;
                    have[..blk.len()] != *blk || have[blk.len()..].iter().any(|&b| b != 0)
                }
            };
            if !changed {
                continue;
            }
            ch.blocks_changed += 1;
            let d2 = disk.clone();
            if is_zero {
                ch.blocks_zeroed += 1;
                inflight
                    .push_back(rt.spawn(async move { d2.write_zeroes(off, io_len as u64).await }));
            } else {
                let mut data = blk.to_vec();
                data.resize(io_len, 0);
                inflight.push_back(rt.spawn(async move { d2.write(off, data).await }));
            }
            drain(rt, &mut inflight, IN_FLIGHT)?;
        }
        pos += n as u64;
        progress(pos, len);
    }
    drain(rt, &mut inflight, 0)?;
    // A source that shrank: the volume's bytes past its new end are zeroed, so the snapshot
    // holds the image and nothing of older days after it.
    let tail_from = len.div_ceil(4096) * 4096;
    let tail_to = old_len.div_ceil(4096).saturating_mul(4096).min(vol);
    if tail_to > tail_from {
        rt.block_on(disk.write_zeroes(tail_from, tail_to - tail_from))?;
    }
    rt.block_on(disk.flush())?;
    ch.changed_during_backup = src.changed_since_open();
    ch.blake3 = whole.finalize().to_hex().to_string();
    Ok((digests, ch))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn maps_round_trip_and_damage_is_refused() {
        let m = BlockMap {
            snapshot: "snap-abc".into(),
            source_len: 3 * BLOCK as u64 + 5,
            digests: vec![[1; DIGEST], [2; DIGEST], [3; DIGEST], [4; DIGEST]],
        };
        let b = m.encode();
        assert_eq!(BlockMap::decode(&b), Ok(m.clone()));
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0x40;
            assert!(BlockMap::decode(&x).is_err(), "flip at {i} accepted");
        }
        assert!(BlockMap::decode(&b[..b.len() - 1]).is_err());
        assert!(BlockMap::decode(b"").is_err());
    }
}
