//! Device I/O: 4 KiB-aligned buffers, O_DIRECT files, and batched reads and writes through a
//! per-thread io_uring, with a logged fallback to pread/pwrite where io_uring is unavailable.
//!
//! Each calling thread owns a small ring (created on first use), so a caller that needs many
//! extents (a read spanning scattered WAL blocks, a batch of log writes) submits them all at once
//! and waits once: the device sees the whole queue depth even from a single thread.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{IoUring, opcode, types};

pub const ALIGN: usize = 4096;

/// A heap buffer aligned to 4 KiB, as O_DIRECT requires.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the owned allocation.
unsafe impl Sync for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes (capacity rounded up to 4 KiB).
    pub fn zeroed(len: usize) -> Self {
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        let layout = Self::layout(cap);
        // SAFETY: layout has non-zero size and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, cap }
    }

    /// A copy of `src` (capacity rounded up to 4 KiB, the rest zeroed), without zeroing what
    /// is copied over.
    pub fn copy_of(src: &[u8]) -> Self {
        let len = src.len();
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        let layout = Self::layout(cap);
        // SAFETY: layout has non-zero size and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        // SAFETY: the allocation holds cap >= len bytes and cannot overlap `src`; every byte of
        // it is written (copied or zeroed) before the buffer exists, as Deref assumes.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), ptr.as_ptr(), len);
            std::ptr::write_bytes(ptr.as_ptr().add(len), 0, cap - len);
        }
        AlignedBuf { ptr, len, cap }
    }

    fn layout(cap: usize) -> Layout {
        // ALIGN is a power of two and cap is a multiple of it and far below isize::MAX.
        match Layout::from_size_align(cap, ALIGN) {
            Ok(l) => l,
            Err(_) => alloc::handle_alloc_error(Layout::new::<[u8; ALIGN]>()),
        }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length within capacity; new bytes are whatever the buffer held (zero or old data).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "AlignedBuf::set_len beyond capacity");
        self.len = len;
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout in `zeroed`.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        AlignedBuf::copy_of(self)
    }
}

/// Which I/O engine this process uses; decided once, logged once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEngine {
    Uring,
    Sync,
}

static URING_BROKEN: AtomicBool = AtomicBool::new(false);
static ENGINE: OnceLock<IoEngine> = OnceLock::new();

/// The engine in use. `MAAS_IO_ENGINE=sync` forces the fallback (for tests and odd kernels).
pub fn engine() -> IoEngine {
    if URING_BROKEN.load(Ordering::Relaxed) {
        return IoEngine::Sync;
    }
    *ENGINE.get_or_init(|| {
        if std::env::var("MAAS_IO_ENGINE").as_deref() == Ok("sync") {
            tracing::info!("io engine: pread/pwrite (forced by MAAS_IO_ENGINE=sync)");
            return IoEngine::Sync;
        }
        match IoUring::new(8) {
            Ok(_) => {
                tracing::info!("io engine: io_uring");
                IoEngine::Uring
            }
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable, falling back to pread/pwrite");
                IoEngine::Sync
            }
        }
    })
}

const RING_DEPTH: u32 = 128;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// One read or write of a batch. Buffers are raw so a batch can mix many caller buffers;
/// `run_batch` keeps them borrowed for the duration of the call.
pub enum Op<'a> {
    Read {
        file: &'a File,
        offset: u64,
        buf: &'a mut [u8],
    },
    Write {
        file: &'a File,
        offset: u64,
        buf: &'a [u8],
    },
}

impl std::fmt::Debug for Op<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Read { offset, buf, .. } => write!(f, "Read({offset}, {})", buf.len()),
            Op::Write { offset, buf, .. } => write!(f, "Write({offset}, {})", buf.len()),
        }
    }
}

/// Runs all operations, through io_uring when available; each op transfers its whole buffer
/// (short transfers are completed with pread/pwrite). Fails with the first error.
pub fn run_batch(ops: &mut [Op<'_>]) -> io::Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    if ops.len() == 1 || engine() == IoEngine::Sync {
        for op in ops.iter_mut() {
            run_sync(op)?;
        }
        return Ok(());
    }
    let res = RING.with(|cell| -> io::Result<Vec<(usize, i32)>> {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(IoUring::new(RING_DEPTH)?);
        }
        let Some(ring) = slot.as_mut() else {
            return Err(io::Error::other("no ring"));
        };
        let mut results = Vec::with_capacity(ops.len());
        for (base, window) in ops.chunks_mut(RING_DEPTH as usize).enumerate() {
            let base = base * RING_DEPTH as usize;
            for (i, op) in window.iter_mut().enumerate() {
                let entry = match op {
                    Op::Read { file, offset, buf } => opcode::Read::new(
                        types::Fd(file.as_raw_fd()),
                        buf.as_mut_ptr(),
                        buf.len() as u32,
                    )
                    .offset(*offset)
                    .build(),
                    Op::Write { file, offset, buf } => opcode::Write::new(
                        types::Fd(file.as_raw_fd()),
                        buf.as_ptr(),
                        buf.len() as u32,
                    )
                    .offset(*offset)
                    .build(),
                }
                .user_data((base + i) as u64);
                // SAFETY: every buffer stays borrowed (through `ops`) until all completions of
                // this window are reaped below, before the next window is pushed.
                unsafe {
                    ring.submission()
                        .push(&entry)
                        .map_err(|_| io::Error::other("sq full"))?;
                }
            }
            let mut pending = window.len();
            while pending > 0 {
                match ring.submit_and_wait(pending.min(1)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                for cqe in ring.completion() {
                    results.push((cqe.user_data() as usize, cqe.result()));
                    pending -= 1;
                }
            }
        }
        Ok(results)
    });
    let results = match res {
        Ok(r) => r,
        Err(e)
            if e.raw_os_error() == Some(libc::ENOSYS) || e.raw_os_error() == Some(libc::EPERM) =>
        {
            URING_BROKEN.store(true, Ordering::Relaxed);
            tracing::warn!(error = %e, "io_uring failed at submission, falling back to pread/pwrite");
            for op in ops.iter_mut() {
                run_sync(op)?;
            }
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for (idx, res) in results {
        let op = &mut ops[idx];
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        let done = res as usize;
        let want = match op {
            Op::Read { buf, .. } => buf.len(),
            Op::Write { buf, .. } => buf.len(),
        };
        if done < want {
            // Short transfer: finish the remainder synchronously.
            match op {
                Op::Read { file, offset, buf } => {
                    let rest = &mut buf[done..];
                    read_exact_at(file, rest, *offset + done as u64)?;
                }
                Op::Write { file, offset, buf } => {
                    file.write_all_at(&buf[done..], *offset + done as u64)?;
                }
            }
        }
    }
    Ok(())
}

fn run_sync(op: &mut Op<'_>) -> io::Result<()> {
    match op {
        Op::Read { file, offset, buf } => read_exact_at(file, buf, *offset),
        Op::Write { file, offset, buf } => file.write_all_at(buf, *offset),
    }
}

/// Reads exactly `buf.len()` bytes; bytes past the end of a file read as zeros (sparse devices).
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// fdatasync, retried on EINTR.
pub fn datasync(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on a valid fd.
        let r = unsafe { libc::fdatasync(file.as_raw_fd()) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_roundtrip_through_engine() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let mut a = AlignedBuf::zeroed(8192);
        a.fill(7);
        let mut b = AlignedBuf::zeroed(4096);
        b.fill(9);
        run_batch(&mut [
            Op::Write {
                file: &f,
                offset: 0,
                buf: &a,
            },
            Op::Write {
                file: &f,
                offset: 8192,
                buf: &b,
            },
        ])
        .unwrap();
        let mut r1 = AlignedBuf::zeroed(4096);
        let mut r2 = AlignedBuf::zeroed(8192);
        run_batch(&mut [
            Op::Read {
                file: &f,
                offset: 4096,
                buf: &mut r1,
            },
            Op::Read {
                file: &f,
                offset: 8192,
                buf: &mut r2,
            },
        ])
        .unwrap();
        assert!(r1.iter().all(|&x| x == 7));
        assert!(r2[..4096].iter().all(|&x| x == 9));
        // Past EOF reads as zeros.
        assert!(r2[4096..].iter().all(|&x| x == 0));
    }
}
