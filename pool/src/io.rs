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
    if crate::powerloss::active() {
        let mut tickets = Vec::new();
        for op in ops.iter() {
            let recorded = match op {
                Op::Write { file, offset, buf } => {
                    crate::powerloss::before_write(file, *offset, buf.len())
                        .map(|t| tickets.extend(t))
                }
                Op::Read { file, .. } => crate::powerloss::before_read(file),
            };
            if let Err(e) = recorded {
                // Nothing of the batch is issued; what was recorded equals what is there.
                crate::powerloss::landed(&tickets);
                return Err(e);
            }
        }
        let res = run_batch_inner(ops);
        crate::powerloss::landed(&tickets);
        return res;
    }
    run_batch_inner(ops)
}

fn run_batch_inner(ops: &mut [Op<'_>]) -> io::Result<()> {
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
        let generation = next_generation();
        let mut results = Vec::with_capacity(ops.len());
        for (base, window) in ops.chunks_mut(RING_DEPTH as usize).enumerate() {
            let base = base * RING_DEPTH as usize;
            let res = run_window(ring, generation, base, window, &mut results);
            if let Err(e) = res {
                // Everything this window submitted has completed (run_window waits for it),
                // but entries it could not submit may still sit in the submission queue: the
                // ring goes, so that nothing of this batch ever runs later.
                *slot = None;
                return Err(e);
            }
        }
        Ok(results)
    });
    let results = match res {
        Ok(r) if r.len() == ops.len() => r,
        Ok(r) => {
            return Err(io::Error::other(format!(
                "io_uring: {} of {} completions",
                r.len(),
                ops.len()
            )));
        }
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

/// Tags a completion with the batch it belongs to, so a completion of another batch is never
/// counted as one of this batch's.
fn tag(generation: u32, index: usize) -> u64 {
    (u64::from(generation) << 32) | index as u64
}

thread_local! {
    static GENERATION: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

fn next_generation() -> u32 {
    GENERATION.with(|g| {
        let n = g.get().wrapping_add(1);
        g.set(n);
        n
    })
}

/// How many times a wait for in-flight requests may fail in a row before the process aborts:
/// returning would hand the caller back buffers the kernel may still write into.
const MAX_WAIT_FAILURES: u32 = 10_000;

/// Pushes one window of operations (at most the ring's depth), submits them and reaps every
/// completion of them. It never returns while a request it submitted is still in flight: a
/// failed submit or wait is retried (the request's buffers are borrowed by the caller, and the
/// kernel may still be reading or writing them) and reported once all are done.
fn run_window(
    ring: &mut IoUring,
    generation: u32,
    base: usize,
    window: &mut [Op<'_>],
    results: &mut Vec<(usize, i32)>,
) -> io::Result<()> {
    let mut pushed = 0usize;
    let mut first_err: Option<io::Error> = None;
    for (i, op) in window.iter_mut().enumerate() {
        let entry = match op {
            Op::Read { file, offset, buf } => opcode::Read::new(
                types::Fd(file.as_raw_fd()),
                buf.as_mut_ptr(),
                buf.len() as u32,
            )
            .offset(*offset)
            .build(),
            Op::Write { file, offset, buf } => {
                opcode::Write::new(types::Fd(file.as_raw_fd()), buf.as_ptr(), buf.len() as u32)
                    .offset(*offset)
                    .build()
            }
        }
        .user_data(tag(generation, base + i));
        // SAFETY: every buffer stays borrowed (through `window`) until all completions of the
        // entries submitted from this window are reaped below; entries never submitted are
        // dropped with the ring by the caller on error.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            first_err = Some(io::Error::other("io_uring submission queue full"));
            break;
        }
        pushed += 1;
    }
    let mut reaped = 0usize;
    let mut failures = 0u32;
    loop {
        // What the kernel took and has not completed yet.
        let unsubmitted = ring.submission().len();
        let in_flight = pushed - unsubmitted - reaped;
        if in_flight == 0 && (unsubmitted == 0 || first_err.is_some()) {
            break;
        }
        match submit_and_wait(ring, 1) {
            Ok(_) => failures = 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                failures += 1;
                if failures >= MAX_WAIT_FAILURES {
                    tracing::error!(error = %e, in_flight, "io_uring cannot reap requests still in flight; aborting rather than freeing their buffers");
                    std::process::abort();
                }
                let taken = pushed - ring.submission().len() - reaped;
                if taken == 0 {
                    // Nothing is in flight: report the failure (the caller drops the ring,
                    // and with it what was never submitted).
                    first_err.get_or_insert(e);
                    break;
                }
                // Requests are in flight: wait for them all the same, then report.
                let busy = matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::ENOMEM)
                );
                if !busy {
                    first_err.get_or_insert(e);
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        for cqe in ring.completion() {
            let ud = cqe.user_data();
            if (ud >> 32) as u32 != generation {
                tracing::warn!(
                    user_data = ud,
                    "io_uring: completion of an earlier batch ignored"
                );
                continue;
            }
            results.push(((ud & 0xffff_ffff) as usize, cqe.result()));
            reaped += 1;
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `IoUring::submit_and_wait`, with test-injected failures (after a real submit, so requests
/// are in flight when the failure is reported).
fn submit_and_wait(ring: &mut IoUring, want: usize) -> io::Result<usize> {
    #[cfg(test)]
    if fault::take() {
        ring.submit()?;
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    ring.submit_and_wait(want)
}

#[cfg(test)]
mod fault {
    use std::cell::Cell;
    thread_local! {
        pub static WAIT_FAILURES: Cell<u32> = const { Cell::new(0) };
    }
    /// Whether this wait should fail (as many times as a test asked).
    pub fn take() -> bool {
        WAIT_FAILURES.with(|c| {
            let n = c.get();
            if n > 0 {
                c.set(n - 1);
            }
            n > 0
        })
    }
}

fn run_sync(op: &mut Op<'_>) -> io::Result<()> {
    match op {
        Op::Read { file, offset, buf } => read_exact_at(file, buf, *offset),
        Op::Write { file, offset, buf } => file.write_all_at(buf, *offset),
    }
}

/// Reads exactly `buf.len()` bytes; bytes past the end of a file read as zeros (sparse devices).
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
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
    if crate::powerloss::active() {
        return crate::powerloss::sync(file, || datasync_raw(file));
    }
    datasync_raw(file)
}

fn datasync_raw(file: &File) -> io::Result<()> {
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

    /// A wait that fails while requests are in flight: run_batch returns only once the kernel
    /// is done with every buffer (a read from a pipe stays in flight until a writer feeds it),
    /// reports the failure, and the next batch on the same thread gets its own completions,
    /// never the stale ones of the failed batch.
    #[test]
    fn a_failed_wait_never_returns_with_requests_in_flight() {
        if engine() != IoEngine::Uring {
            eprintln!("io_uring unavailable here; the sync engine has no requests in flight");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&[5u8; 8192], 0).unwrap();
        let (rx, mut tx) = std::io::pipe().unwrap();
        let rx: File = std::os::fd::OwnedFd::from(rx).into();
        let feeder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            std::io::Write::write_all(&mut tx, &[9u8; 4096]).unwrap();
        });
        let mut from_pipe = vec![0u8; 4096];
        let mut from_file = vec![0u8; 4096];
        fault::WAIT_FAILURES.with(|c| c.set(1));
        let started = std::time::Instant::now();
        let res = run_batch(&mut [
            Op::Read {
                file: &rx,
                offset: 0,
                buf: &mut from_pipe,
            },
            Op::Read {
                file: &f,
                offset: 0,
                buf: &mut from_file,
            },
        ]);
        if engine() == IoEngine::Uring {
            assert!(res.is_err(), "the injected failure is reported");
            assert!(
                started.elapsed() >= std::time::Duration::from_millis(250),
                "returned after {:?}, while the pipe read was still in flight",
                started.elapsed()
            );
            assert!(
                from_pipe.iter().all(|&b| b == 9),
                "the in-flight read completed first"
            );
        }
        fault::WAIT_FAILURES.with(|c| c.set(0));
        feeder.join().unwrap();
        // The next batch on this thread: its own results, in order.
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        f.write_all_at(&[6u8; 4096], 4096).unwrap();
        run_batch(&mut [
            Op::Read {
                file: &f,
                offset: 0,
                buf: &mut a,
            },
            Op::Read {
                file: &f,
                offset: 4096,
                buf: &mut b,
            },
        ])
        .unwrap();
        assert!(a.iter().all(|&x| x == 5) && b.iter().all(|&x| x == 6));
    }

    /// A per-request error (a write through a read-only descriptor) fails the batch after every
    /// request completed; the ring stays usable.
    #[test]
    fn a_failed_request_fails_the_batch_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [1u8; 8192]).unwrap();
        let ro = File::open(&path).unwrap();
        let data = vec![2u8; 4096];
        let mut back = vec![0u8; 4096];
        let err = run_batch(&mut [
            Op::Write {
                file: &ro,
                offset: 0,
                buf: &data,
            },
            Op::Read {
                file: &ro,
                offset: 4096,
                buf: &mut back,
            },
        ])
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        let mut again = vec![0u8; 8192];
        run_batch(&mut [Op::Read {
            file: &ro,
            offset: 0,
            buf: &mut again[..4096],
        }])
        .unwrap();
        assert!(again[..4096].iter().all(|&x| x == 1), "nothing was written");
    }
}
