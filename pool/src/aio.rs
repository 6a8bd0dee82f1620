//! Asynchronous device reads for callers that must not block: one reactor thread owns an
//! io_uring, takes reads from any thread, keeps as many in flight as callers submit, and wakes
//! each caller's future when all of its reads are done.
//!
//! Why a reactor rather than the per-thread rings of [`crate::io`]: a network front-end that
//! sent each read to a blocking thread paid two thread hand-offs per command and issued one
//! lone request per thread, so a queue depth of 32 cost 32 sleeping threads. Here the
//! connection's task submits and goes on; the reactor batches whatever all connections
//! submitted since its last turn into one `io_uring_enter`, and completions come back as
//! ordinary future wake-ups. The futures are runtime-agnostic (a [`std::task::Waker`]).
//!
//! Buffers belong to the reactor while the kernel may write into them: a future dropped early
//! (a connection closed mid-read) leaves its reads to finish into buffers nobody reads, which
//! the reactor then frees. Nothing is ever freed under the kernel.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use io_uring::{IoUring, opcode, types};
use parking_lot::Mutex;

use crate::io::AlignedBuf;

const RING_DEPTH: u32 = 256;
/// The eventfd read that wakes the reactor for new submissions.
const WAKE_TAG: u64 = u64::MAX;

/// One read of a batch: `len` bytes at `offset` of `fd` into `buf` (capacity >= len).
struct Req {
    fd: RawFd,
    offset: u64,
    buf: AlignedBuf,
    /// Bytes already read (a short read continues from here).
    done: usize,
    batch: Arc<Batch>,
    index: usize,
}

/// What a batch of reads shares with its future.
struct Batch {
    state: Mutex<BatchState>,
}

struct BatchState {
    bufs: Vec<Option<AlignedBuf>>,
    remaining: usize,
    error: Option<io::Error>,
    waker: Option<Waker>,
}

struct Reactor {
    queue: Mutex<Vec<Req>>,
    /// The reactor is about to wait (or waits) in the kernel: a submitter must wake it.
    sleeping: AtomicBool,
    wake: OwnedFd,
}

static REACTOR: OnceLock<Option<Arc<Reactor>>> = OnceLock::new();

/// Test hook: while set, the reactor leaves new reads queued (submitted, not yet issued).
static PAUSED: AtomicBool = AtomicBool::new(false);

/// For tests only: holds reads submitted from now on in the reactor's queue (`true`) until
/// released (`false`), so that a test can change the pool while a read is in flight.
#[doc(hidden)]
pub fn pause_for_test(paused: bool) {
    PAUSED.store(paused, Ordering::SeqCst);
}

/// The reactor, started on first use; None where io_uring is unavailable (or the process uses
/// the pread fallback, or the power-loss simulation watches every read, or
/// `MAAS_ASYNC_READS=off` asks so, to compare): callers then read on a blocking thread.
fn reactor() -> Option<&'static Arc<Reactor>> {
    if crate::io::engine() != crate::io::IoEngine::Uring || crate::powerloss::active() {
        return None;
    }
    static OFF: OnceLock<bool> = OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("MAAS_ASYNC_READS").as_deref() == Ok("off")) {
        return None;
    }
    REACTOR
        .get_or_init(|| match start() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "asynchronous reads unavailable; reads that miss RAM go through blocking threads");
                None
            }
        })
        .as_ref()
}

/// Whether [`read_batch`] is available in this process.
pub fn available() -> bool {
    reactor().is_some()
}

fn start() -> io::Result<Arc<Reactor>> {
    let ring = IoUring::new(RING_DEPTH)?;
    // SAFETY: eventfd returns a new descriptor that nothing else owns, or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, owned descriptor.
    let wake = unsafe { OwnedFd::from_raw_fd(fd) };
    let r = Arc::new(Reactor {
        queue: Mutex::new(Vec::new()),
        sleeping: AtomicBool::new(false),
        wake,
    });
    let me = r.clone();
    std::thread::Builder::new()
        .name("maas-aio".into())
        .spawn(move || me.run(ring))?;
    tracing::info!("asynchronous device reads: io_uring reactor started");
    Ok(r)
}

impl Reactor {
    fn submit(&self, reqs: Vec<Req>) {
        self.queue.lock().extend(reqs);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A failure (counter
            // overflow, impossible at these rates) only means the reactor is woken anyway by
            // its next completion.
            unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    fn run(&self, mut ring: IoUring) {
        let mut slots: Vec<Option<Req>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut backlog: VecDeque<Req> = VecDeque::new();
        // Swapped with the shared queue each turn, so neither side reallocates per turn.
        let mut incoming: Vec<Req> = Vec::new();
        let mut wake_buf = [0u8; 8];
        let mut wake_armed = false;
        let mut in_flight = 0usize;
        loop {
            if !wake_armed {
                let e =
                    opcode::Read::new(types::Fd(self.wake.as_raw_fd()), wake_buf.as_mut_ptr(), 8)
                        .build()
                        .user_data(WAKE_TAG);
                // SAFETY: wake_buf lives as long as the ring (this function's frame, which
                // never returns).
                if unsafe { ring.submission().push(&e) }.is_ok() {
                    wake_armed = true;
                }
            }
            let paused = PAUSED.load(Ordering::SeqCst);
            if !paused {
                std::mem::swap(&mut *self.queue.lock(), &mut incoming);
                backlog.extend(incoming.drain(..));
            } else if in_flight == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            while in_flight < RING_DEPTH as usize - 1 {
                let Some(mut req) = backlog.pop_front() else {
                    break;
                };
                let slot = free.pop().unwrap_or_else(|| {
                    slots.push(None);
                    slots.len() - 1
                });
                let rest = &mut req.buf[req.done..];
                let e = opcode::Read::new(types::Fd(req.fd), rest.as_mut_ptr(), rest.len() as u32)
                    .offset(req.offset + req.done as u64)
                    .build()
                    .user_data(slot as u64);
                // SAFETY: the buffer moves into `slots` with the request and stays there, at
                // a stable heap address, until the completion for this entry is reaped.
                if unsafe { ring.submission().push(&e) }.is_err() {
                    free.push(slot);
                    backlog.push_front(req);
                    break;
                }
                slots[slot] = Some(req);
                in_flight += 1;
            }
            // About to wait: from here a submitter must wake us (see `submit`).
            self.sleeping.store(true, Ordering::SeqCst);
            let more = !paused && !self.queue.lock().is_empty();
            let want = if more || (!backlog.is_empty() && in_flight < RING_DEPTH as usize - 1) {
                self.sleeping.store(false, Ordering::SeqCst);
                0
            } else {
                1
            };
            match ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // EBUSY/EAGAIN: the completion queue is full; reap below and go on.
                    tracing::debug!(error = %e, "io_uring enter");
                }
            }
            self.sleeping.store(false, Ordering::SeqCst);
            let done: Vec<(u64, i32)> = ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (ud, res) in done {
                if ud == WAKE_TAG {
                    wake_armed = false;
                    continue;
                }
                let slot = ud as usize;
                let Some(mut req) = slots.get_mut(slot).and_then(Option::take) else {
                    tracing::error!(user_data = ud, "io_uring completion for no request");
                    continue;
                };
                free.push(slot);
                in_flight -= 1;
                if res == -libc::EINTR || res == -libc::EAGAIN {
                    backlog.push_back(req);
                    continue;
                }
                if res < 0 {
                    req.batch
                        .finish(req.index, Err(io::Error::from_raw_os_error(-res)));
                    continue;
                }
                req.done += res as usize;
                if res == 0 && req.done < req.buf.len() {
                    req.batch.finish(
                        req.index,
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("read past the end of the device at {}", req.offset),
                        )),
                    );
                } else if req.done < req.buf.len() {
                    // Short read: the rest goes in again.
                    backlog.push_back(req);
                } else {
                    let Req {
                        buf, batch, index, ..
                    } = req;
                    batch.finish(index, Ok(buf));
                }
            }
        }
    }
}

impl Batch {
    fn finish(&self, index: usize, res: io::Result<AlignedBuf>) {
        let waker = {
            let mut st = self.state.lock();
            match res {
                Ok(buf) => {
                    if let Some(slot) = st.bufs.get_mut(index) {
                        *slot = Some(buf);
                    }
                }
                Err(e) => {
                    st.error.get_or_insert(e);
                }
            }
            st.remaining -= 1;
            if st.remaining == 0 {
                st.waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// One read for [`read_batch`]: `len` bytes (a multiple of 4 KiB) at `offset` (4 KiB
/// aligned) of `file`.
#[derive(Debug)]
pub struct ReadReq<'a> {
    pub file: &'a File,
    pub offset: u64,
    pub len: usize,
}

/// Reads that complete together: resolves to one buffer per request, in order, or the first
/// error. The caller keeps the files open until it resolves (or is dropped: a dropped batch's
/// reads still finish, into buffers that are then freed).
pub struct ReadBatch {
    batch: Arc<Batch>,
}

impl std::fmt::Debug for ReadBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadBatch")
    }
}

/// Submits the reads to the reactor; None if asynchronous reads are unavailable (see
/// [`available`]), and then nothing was submitted.
pub fn read_batch(reqs: &[ReadReq<'_>]) -> Option<ReadBatch> {
    let reactor = reactor()?;
    let batch = Arc::new(Batch {
        state: Mutex::new(BatchState {
            bufs: (0..reqs.len()).map(|_| None).collect(),
            remaining: reqs.len(),
            error: None,
            waker: None,
        }),
    });
    let out = reqs
        .iter()
        .enumerate()
        .map(|(index, r)| Req {
            fd: r.file.as_raw_fd(),
            offset: r.offset,
            buf: AlignedBuf::zeroed(r.len),
            done: 0,
            batch: batch.clone(),
            index,
        })
        .collect();
    if !reqs.is_empty() {
        reactor.submit(out);
    }
    Some(ReadBatch { batch })
}

impl Future for ReadBatch {
    type Output = io::Result<Vec<AlignedBuf>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.batch.state.lock();
        if st.remaining > 0 {
            st.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if let Some(e) = st.error.take() {
            return Poll::Ready(Err(e));
        }
        let bufs: Option<Vec<AlignedBuf>> = st.bufs.iter_mut().map(Option::take).collect();
        Poll::Ready(bufs.ok_or_else(|| io::Error::other("read batch polled after it completed")))
    }
}

/// Waits on this thread for a future of this module's kind (they need no runtime): for
/// synchronous callers and tests.
pub fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark()
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        // A wake before this park makes it return at once; a spurious return polls again.
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn many_batches_from_many_threads_read_what_is_there() {
        if !available() {
            eprintln!("io_uring unavailable here: the reactor is not used");
            return;
        }
        let mut f = tempfile::tempfile().expect("temp file");
        let data: Vec<u8> = (0..4u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        f.write_all(&data).expect("write");
        let f = Arc::new(f);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (f, data) = (f.clone(), data.clone());
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        let offs: Vec<u64> = (0..8)
                            .map(|k| ((t * 7919 + i * 31 + k * 131) % 1000) * 4096)
                            .collect();
                        let reqs: Vec<ReadReq<'_>> = offs
                            .iter()
                            .map(|&o| ReadReq {
                                file: &f,
                                offset: o,
                                len: 8192,
                            })
                            .collect();
                        let bufs = block_on(read_batch(&reqs).expect("reactor")).expect("reads");
                        for (o, b) in offs.iter().zip(&bufs) {
                            assert_eq!(&b[..], &data[*o as usize..*o as usize + 8192]);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("reader thread");
        }
    }

    #[test]
    fn a_read_past_the_end_fails_and_an_empty_batch_is_ready() {
        if !available() {
            return;
        }
        let mut f = tempfile::tempfile().expect("temp file");
        f.write_all(&[7u8; 8192]).expect("write");
        let err = block_on(
            read_batch(&[ReadReq {
                file: &f,
                offset: 4096,
                len: 8192,
            }])
            .expect("reactor"),
        )
        .expect_err("a read beyond the end must fail");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        let none = block_on(read_batch(&[]).expect("reactor")).expect("empty batch");
        assert!(none.is_empty());
    }
}
