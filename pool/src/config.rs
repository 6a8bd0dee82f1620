//! The pool's superblock (`pool.json`, self-describing: magic and format version) and the
//! options a pool is created and opened with.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{PoolError, Result};
use crate::fsmode;
use crate::types::Tier;

pub const POOL_MAGIC: &str = "MAAS-POOL";
pub const POOL_FORMAT_VERSION: u32 = 1;
pub const SUPERBLOCK_FILE: &str = "pool.json";
pub const META_FILE: &str = "meta.redb";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Absolute, or relative to the pool directory (so a copied pool directory opens elsewhere).
    pub path: PathBuf,
    pub tier: Tier,
    /// Size for a file device (ignored for block devices).
    pub size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Superblock {
    pub magic: String,
    pub format_version: u32,
    pub pool_id: uuid::Uuid,
    /// Hex of the 32-byte secret from which digest keys are derived (the file is mode 0600).
    pub secret: String,
    pub chunk_size: u64,
    pub zstd_level: i32,
    pub devices: Vec<DeviceSpec>,
    pub created_unix: i64,
}

impl Superblock {
    /// Reads the superblock of the pool in `dir`. The directory and the superblock (which
    /// holds the pool's key) are tightened to 0700 and 0600 if they are more open than that.
    pub fn load(dir: &Path) -> Result<Superblock> {
        let path = dir.join(SUPERBLOCK_FILE);
        if path.exists() {
            for (p, mode) in [(dir, fsmode::PRIVATE_DIR), (&path, fsmode::PRIVATE_FILE)] {
                fsmode::restrict_path(p, mode)
                    .map_err(|e| PoolError::io(p.display().to_string(), e))?;
            }
        }
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                PoolError::PoolNotFound {
                    path: dir.display().to_string(),
                }
            } else {
                PoolError::io(path.display().to_string(), e)
            }
        })?;
        let sb: Superblock = serde_json::from_slice(&bytes)
            .map_err(|e| PoolError::corrupt(path.display().to_string(), e.to_string()))?;
        if sb.magic != POOL_MAGIC {
            return Err(PoolError::corrupt(
                path.display().to_string(),
                "bad magic: not a MaaS pool",
            ));
        }
        if sb.format_version != POOL_FORMAT_VERSION {
            return Err(PoolError::UnsupportedFormat {
                what: path.display().to_string(),
                detail: format!("format version {}", sb.format_version),
            });
        }
        Ok(sb)
    }

    pub fn store(&self, dir: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(SUPERBLOCK_FILE);
        let tmp = dir.join(".pool.json.tmp");
        let body = serde_json::to_vec_pretty(self).map_err(|e| PoolError::Meta(e.to_string()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(fsmode::PRIVATE_FILE)
            .open(&tmp)
            .map_err(|e| PoolError::io(tmp.display().to_string(), e))?;
        // A leftover temporary file keeps its mode when reopened: make sure.
        fsmode::restrict_file(&f, &tmp, fsmode::PRIVATE_FILE)
            .map_err(|e| PoolError::io(tmp.display().to_string(), e))?;
        f.write_all(&body)
            .and_then(|_| f.sync_all())
            .map_err(|e| PoolError::io(tmp.display().to_string(), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| PoolError::io(path.display().to_string(), e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| PoolError::io(dir.display().to_string(), e))?;
        Ok(())
    }

    pub fn secret_bytes(&self) -> Result<[u8; 32]> {
        let mut out = [0u8; 32];
        if self.secret.len() != 64 {
            return Err(PoolError::corrupt("pool secret", "must be 64 hex digits"));
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&self.secret[2 * i..2 * i + 2], 16)
                .map_err(|_| PoolError::corrupt("pool secret", "not hex"))?;
        }
        Ok(out)
    }

    pub fn device_path(&self, dir: &Path, i: usize) -> PathBuf {
        let p = &self.devices[i].path;
        if p.is_absolute() {
            p.clone()
        } else {
            dir.join(p)
        }
    }
}

/// How a new pool is laid out.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Devices; empty means one sparse file `data-0.dev` in the pool directory, sized to the
    /// filesystem's free space (thin: it only takes what is written).
    pub devices: Vec<DeviceSpec>,
    /// Chunk size in bytes: a power of two from 64 KiB to 4 MiB.
    pub chunk_size: u64,
    pub zstd_level: i32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            devices: Vec::new(),
            chunk_size: 1 << 20,
            zstd_level: 1,
        }
    }
}

/// Runtime knobs (not stored in the pool).
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// RAM tier: decompressed chunk cache.
    pub cache_bytes: usize,
    /// RAM tier: recently written blocks, kept after they reach the write-ahead log so reading
    /// them back needs no device I/O (0 disables it).
    pub log_cache_bytes: usize,
    /// RAM tier: written blocks held in memory before the write-ahead log writes them to its
    /// device (a flush writes them at once). Rewrites of a block still held replace it in
    /// place. 0 writes every batch as soon as it closes.
    pub write_buffer_bytes: usize,
    /// Longest a written block waits in the write buffer.
    pub write_back_delay: std::time::Duration,
    /// Size of one WAL segment.
    pub wal_segment_bytes: u64,
    /// Fold live data into sealed chunks once the WAL holds this much.
    pub wal_fold_threshold: u64,
    /// Run the background maintenance thread (fold when the WAL grows, reclaim space).
    pub background: bool,
    /// Self-sizing RAM tier (see [`crate::ramtier`]): the parts it names ignore their fixed
    /// size above, start at a share of the machine's memory and give it back under memory
    /// pressure. None: every size above is fixed.
    pub ram_tier: Option<crate::ramtier::AutoRamTier>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            cache_bytes: 256 << 20,
            log_cache_bytes: 256 << 20,
            write_buffer_bytes: 256 << 20,
            write_back_delay: std::time::Duration::from_secs(5),
            wal_segment_bytes: 64 << 20,
            wal_fold_threshold: 2 << 30,
            background: true,
            ram_tier: None,
        }
    }
}
