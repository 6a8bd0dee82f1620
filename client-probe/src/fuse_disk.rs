//! The attached volume as one file, `disk`, in a FUSE filesystem, so a loop device can turn it
//! into a block device the host's kernel mounts — the userspace attach of a host that has no
//! iSCSI or NVMe/TCP initiator.
//!
//! The file is opened with direct I/O (no page cache of its own: the filesystem on top has one),
//! so every read and write reaches the volume, and `fsync` — what the loop device does for a
//! flush or FUA from the filesystem above — returns only once the volume's NVMe Flush has
//! completed. Requests are served on the tokio runtime, many at a time; the FUSE thread only
//! dispatches them.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, ReplyXattr, Request, WriteFlags,
};
use tokio::runtime::Handle;

use crate::nvme_disk::{DiskError, NvmeDisk};

/// The name of the one file.
pub const DISK_FILE: &str = "disk";
const DISK_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(3600);
/// Largest FUSE read or write; one NVMe command each (the target's MDTS is 1 MiB).
pub const MAX_IO: u32 = 1 << 20;

#[derive(Debug)]
pub struct DiskFs {
    disk: Arc<NvmeDisk>,
    rt: Handle,
    read_only: bool,
    created: SystemTime,
    /// Failed requests so far: logged at 1, 2, 4, 8... so a dead target cannot flood the log
    /// (and a full stderr pipe cannot stall the threads that log).
    failures: Arc<std::sync::atomic::AtomicU64>,
}

/// Logs a failed request if it is the first, or the 2nd, 4th, 8th... of this filesystem.
fn note_failure(
    failures: &std::sync::atomic::AtomicU64,
    what: &str,
    offset: u64,
    len: u64,
    e: &DiskError,
) {
    let n = failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(offset, len, error = %e, failures = n, "{what} the volume failed");
    }
}

impl DiskFs {
    pub fn new(disk: Arc<NvmeDisk>, rt: Handle, read_only: bool) -> DiskFs {
        DiskFs {
            disk,
            rt,
            read_only,
            created: SystemTime::now(),
            failures: Arc::default(),
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o700, 0, 2),
            DISK_INO => (
                FileType::RegularFile,
                if self.read_only { 0o400 } else { 0o600 },
                self.disk.size(),
                1,
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size / 512,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: self.disk.block_size(),
            flags: 0,
        })
    }
}

fn errno(e: &DiskError) -> Errno {
    match e {
        DiskError::Invalid(_) => Errno::EINVAL,
        DiskError::Command(s) if s.contains("WRITE_PROTECTED") => Errno::EROFS,
        _ => Errno::EIO,
    }
}

/// Reads `len` bytes at any `offset`: whole blocks from the disk, in commands of at most its
/// largest transfer, cut to the range asked for. Stops at the end of the disk.
async fn read_range(disk: &NvmeDisk, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
    let size = disk.size();
    if offset >= size {
        return Ok(Vec::new());
    }
    let end = (offset + len as u64).min(size);
    let bs = u64::from(disk.block_size());
    let start = offset / bs * bs;
    let stop = end.div_ceil(bs) * bs;
    let mut out = Vec::with_capacity((end - offset) as usize);
    let mut at = start;
    while at < stop {
        let n = ((stop - at) as usize).min(disk.max_transfer());
        let buf = disk.read(at, n).await?;
        let from = offset.saturating_sub(at) as usize;
        let to = ((end - at) as usize).min(n);
        out.extend_from_slice(&buf[from..to]);
        at += n as u64;
    }
    Ok(out)
}

/// Writes `data` at any `offset`; a partial first or last block is read, patched and written
/// back (the loop device never sends one; a program writing the file directly may).
async fn write_range(disk: &NvmeDisk, offset: u64, data: &[u8]) -> Result<(), DiskError> {
    let end = offset + data.len() as u64;
    if end > disk.size() {
        return Err(DiskError::Invalid(
            "write beyond the end of the disk".into(),
        ));
    }
    let bs = u64::from(disk.block_size());
    let start = offset / bs * bs;
    let stop = end.div_ceil(bs) * bs;
    let aligned = start == offset && stop == end;
    let buf: Vec<u8> = if aligned {
        data.to_vec()
    } else {
        let mut b = read_range(disk, start, (stop - start) as usize).await?;
        let at = (offset - start) as usize;
        b[at..at + data.len()].copy_from_slice(data);
        b
    };
    let mut at = 0usize;
    while at < buf.len() {
        let n = (buf.len() - at).min(disk.max_transfer());
        disk.write(start + at as u64, buf[at..at + n].to_vec())
            .await?;
        at += n;
    }
    Ok(())
}

impl fuser::Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_background(64);
        // The loop device submits direct I/O asynchronously: many requests in flight at once.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, name.to_str()) {
            (INodeNo::ROOT, Some(DISK_FILE)) => match self.attr(DISK_INO) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        let writing = (flags.0 & libc::O_ACCMODE) != libc::O_RDONLY;
        if writing && self.read_only {
            return reply.error(Errno::EROFS);
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        let disk = self.disk.clone();
        let failures = self.failures.clone();
        self.rt.spawn(async move {
            match read_range(&disk, offset, size as usize).await {
                Ok(b) => reply.data(&b),
                Err(e) => {
                    note_failure(&failures, "reading from", offset, u64::from(size), &e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let disk = self.disk.clone();
        let data = data.to_vec();
        let failures = self.failures.clone();
        self.rt.spawn(async move {
            match write_range(&disk, offset, &data).await {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => {
                    note_failure(&failures, "writing to", offset, data.len() as u64, &e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(): nothing is cached here; durability is fsync's job.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let disk = self.disk.clone();
        self.rt.spawn(async move {
            match disk.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::error!(error = %e, "flush of the volume failed: writes may not be durable");
                    reply.error(Errno::EIO)
                }
            }
        });
    }

    /// Punching a hole or zeroing a range (what the loop device does for a discard or a write
    /// of zeros from the filesystem above) becomes NVMe Write Zeroes with Deallocate, so a
    /// deleted file's blocks stop holding space in the pool.
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let zeroing = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        if !zeroing
            || mode
                & !(libc::FALLOC_FL_PUNCH_HOLE
                    | libc::FALLOC_FL_ZERO_RANGE
                    | libc::FALLOC_FL_KEEP_SIZE)
                != 0
        {
            // Allocating or growing a fixed-size disk means nothing here.
            return reply.error(Errno::EOPNOTSUPP);
        }
        let disk = self.disk.clone();
        let failures = self.failures.clone();
        self.rt.spawn(async move {
            let bs = u64::from(disk.block_size());
            let end = offset.saturating_add(length).min(disk.size());
            // Whole blocks are zeroed by the target; partial edges are written as zeros.
            let first = offset.div_ceil(bs) * bs;
            let last = end / bs * bs;
            let r = async {
                if first < last {
                    if offset < first {
                        write_range(&disk, offset, &vec![0u8; (first - offset) as usize]).await?;
                    }
                    disk.write_zeroes(first, last - first).await?;
                    if last < end {
                        write_range(&disk, last, &vec![0u8; (end - last) as usize]).await?;
                    }
                } else if offset < end {
                    write_range(&disk, offset, &vec![0u8; (end - offset) as usize]).await?;
                }
                Ok::<(), DiskError>(())
            }
            .await;
            match r {
                Ok(()) => reply.ok(),
                Err(e) => {
                    note_failure(&failures, "zeroing a range of", offset, length, &e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
