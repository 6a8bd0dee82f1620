//! A pool device: a regular file or a block device, tagged with a tier, starting with a
//! self-describing header (magic, format version, pool id, device index). Data I/O bypasses the
//! page cache with O_DIRECT where the filesystem supports it.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{PoolError, Result};
use crate::io::{self, AlignedBuf, Op};
use crate::types::Tier;

pub const DEVICE_MAGIC: &[u8; 8] = b"MAASDEV\0";
pub const DEVICE_FORMAT_VERSION: u16 = 1;
/// Bytes reserved at the start of every device for its header.
pub const DEVICE_RESERVED: u64 = 1 << 20;

#[derive(Debug)]
pub struct Device {
    pub index: u16,
    pub tier: Tier,
    pub path: PathBuf,
    pub size: u64,
    pub direct: bool,
    file: File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    tier: Tier,
    index: u16,
    pool_id: [u8; 16],
    size: u64,
}

impl Header {
    fn encode(&self) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(4096);
        b[0..8].copy_from_slice(DEVICE_MAGIC);
        b[8..10].copy_from_slice(&DEVICE_FORMAT_VERSION.to_le_bytes());
        b[10] = self.tier.speed_rank();
        b[12..14].copy_from_slice(&self.index.to_le_bytes());
        b[16..32].copy_from_slice(&self.pool_id);
        b[32..40].copy_from_slice(&self.size.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8], path: &Path) -> Result<Header> {
        let what = format!("device header of {}", path.display());
        if &b[0..8] != DEVICE_MAGIC {
            return Err(PoolError::corrupt(
                what,
                "bad magic: not a MaaS pool device",
            ));
        }
        let crc = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
        if crc != crc32c::crc32c(&b[..60]) {
            return Err(PoolError::Checksum { what });
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != DEVICE_FORMAT_VERSION {
            return Err(PoolError::UnsupportedFormat {
                what,
                detail: format!("version {version}"),
            });
        }
        let tier = match b[10] {
            1 => Tier::Ssd,
            2 => Tier::Hdd,
            t => return Err(PoolError::corrupt(what, format!("bad tier {t}"))),
        };
        let mut pool_id = [0u8; 16];
        pool_id.copy_from_slice(&b[16..32]);
        Ok(Header {
            tier,
            index: u16::from_le_bytes([b[12], b[13]]),
            pool_id,
            size: u64::from_le_bytes(b[32..40].try_into().unwrap_or([0; 8])),
        })
    }
}

/// Opens (or creates) a device. A file device is private (0600): created so, tightened if it
/// is more open; block devices keep the mode the system gave their node.
fn open_file(path: &Path, create: bool) -> Result<(File, bool)> {
    let mut opts = OpenOptions::new();
    opts.read(true)
        .write(true)
        .create(create)
        .mode(crate::fsmode::PRIVATE_FILE);
    let mut direct = opts.clone();
    direct.custom_flags(libc::O_DIRECT);
    let (f, direct) = match direct.open(path) {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %path.display(), "filesystem refuses O_DIRECT; using buffered I/O for this device");
            let f = opts
                .open(path)
                .map_err(|e| PoolError::io(path.display().to_string(), e))?;
            (f, false)
        }
        Err(e) => return Err(PoolError::io(path.display().to_string(), e)),
    };
    crate::fsmode::restrict_file(&f, path, crate::fsmode::PRIVATE_FILE)
        .map_err(|e| PoolError::io(path.display().to_string(), e))?;
    Ok((f, direct))
}

impl Device {
    /// Formats a device. A regular file is created (sparse) at `size` bytes; a block device
    /// uses its whole capacity and `size` is ignored.
    pub fn create(
        path: &Path,
        index: u16,
        tier: Tier,
        size: u64,
        pool_id: [u8; 16],
    ) -> Result<Self> {
        if !tier.is_durable() {
            return Err(PoolError::InvalidArgument(
                "the ram tier is a cache sized in the pool config, not a device".into(),
            ));
        }
        let is_block = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let (mut file, direct) = open_file(path, !is_block)?;
        let size = if is_block {
            file.seek(SeekFrom::End(0))
                .map_err(|e| PoolError::io(path.display().to_string(), e))?
        } else {
            file.set_len(size)
                .map_err(|e| PoolError::io(path.display().to_string(), e))?;
            size
        };
        if size < DEVICE_RESERVED * 4 {
            return Err(PoolError::InvalidArgument(format!(
                "device {} is {size} bytes; at least {} are needed",
                path.display(),
                DEVICE_RESERVED * 4
            )));
        }
        let size = size / 4096 * 4096;
        let header = Header {
            tier,
            index,
            pool_id,
            size,
        };
        let buf = header.encode();
        io::run_batch(&mut [Op::Write {
            file: &file,
            offset: 0,
            buf: &buf,
        }])
        .map_err(|e| PoolError::io(path.display().to_string(), e))?;
        io::datasync(&file).map_err(|e| PoolError::io(path.display().to_string(), e))?;
        Ok(Device {
            index,
            tier,
            path: path.to_path_buf(),
            size,
            direct,
            file,
        })
    }

    /// Opens a formatted device and checks that it belongs to this pool at this index.
    pub fn open(path: &Path, index: u16, pool_id: [u8; 16]) -> Result<Self> {
        let (file, direct) = open_file(path, false)?;
        let mut buf = AlignedBuf::zeroed(4096);
        io::run_batch(&mut [Op::Read {
            file: &file,
            offset: 0,
            buf: &mut buf,
        }])
        .map_err(|e| PoolError::io(path.display().to_string(), e))?;
        let h = Header::decode(&buf, path)?;
        if h.pool_id != pool_id || h.index != index {
            return Err(PoolError::corrupt(
                format!("device {}", path.display()),
                "belongs to another pool or another slot of this pool",
            ));
        }
        Ok(Device {
            index,
            tier: h.tier,
            path: path.to_path_buf(),
            size: h.size,
            direct,
            file,
        })
    }

    /// Reserves the blocks of `[offset, offset+len)` of a file device, so that writes there
    /// cannot fail for lack of space on the host filesystem later (after they were
    /// acknowledged). Block devices and filesystems without fallocate need nothing.
    pub fn reserve(&self, offset: u64, len: u64) -> Result<()> {
        if std::fs::metadata(&self.path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(true)
        {
            return Ok(());
        }
        // SAFETY: plain syscall on our open fd.
        let r = unsafe {
            libc::fallocate(
                std::os::unix::io::AsRawFd::as_raw_fd(&self.file),
                0,
                offset as i64,
                len as i64,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
            _ => Err(PoolError::io(self.path.display().to_string(), e)),
        }
    }

    /// Gives the blocks of a freed extent back to the host filesystem (punches a hole), so a
    /// file device holds about what the pool uses rather than every block it ever touched: a
    /// sparse device sized to the filesystem's free space (maasd's default) would otherwise
    /// grow, write by write, until the filesystem is full, as a thin LUN does without TRIM.
    /// Best effort: where it fails the space only stays with the file. Block devices keep
    /// their blocks.
    pub fn release(&self, offset: u64, len: u64) {
        if len == 0
            || self
                .file
                .metadata()
                .map(|m| !m.file_type().is_file())
                .unwrap_or(true)
        {
            return;
        }
        // The power-loss simulation sees a punched hole as the write of zeroes it is.
        let tickets = if crate::powerloss::active() {
            match crate::powerloss::before_write(&self.file, offset, len as usize) {
                Ok(t) => t,
                Err(_) => return,
            }
        } else {
            Vec::new()
        };
        // SAFETY: plain syscall on our open fd; the range lies in the file.
        let r = unsafe {
            libc::fallocate(
                std::os::unix::io::AsRawFd::as_raw_fd(&self.file),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
        };
        crate::powerloss::landed(&tickets);
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if !matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
            ) {
                tracing::debug!(device = %self.path.display(), error = %e, "could not give freed space back to the filesystem");
            }
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn sync(&self) -> Result<()> {
        io::datasync(&self.file).map_err(|e| PoolError::io(self.path.display().to_string(), e))
    }

    pub fn io_err(&self, e: std::io::Error) -> PoolError {
        PoolError::io(self.path.display().to_string(), e)
    }
}
