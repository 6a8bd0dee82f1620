//! Asynchronous device reads for callers that must not block: io_urings that any thread
//! submits to directly, completions announced on an eventfd that the caller's runtime polls
//! beside its sockets, and each caller's future woken when all of its reads are done.
//!
//! Why this shape: a network front-end that sent each read to a blocking thread paid two thread
//! hand-offs per command and issued one lone request per thread. A reactor thread of its own
//! (the previous design) removed the lone requests but still cost a wake-up of that thread per
//! submission and another hand-off per completion: a quarter of the target's CPU per read that
//! misses RAM, on 2 cores. Here the submitting thread enters the ring itself (one
//! `io_uring_enter`, the same cost as the `pread` it replaces, with no wait), and completions
//! come back through the eventfd the ring signals: a runtime registers it with its own poller
//! ([`CompletionSource`], the media engine does so with tokio) and reaps on the thread that is
//! awake anyway.
//!
//! Rings: a thread that takes a [`CompletionSource`] (a single-threaded runtime's thread: the
//! media engine runs one per core) gets a ring of its own, and every read submitted from that
//! thread goes to it. A connection, its reads' submission and their completions then stay on
//! one thread: no wake-up crosses cores per command. Every other thread (the pool's tests,
//! synchronous callers, multi-threaded runtimes) shares the process's ring, which a fallback
//! thread reaps by waiting on its eventfd. The same fallback thread checks every [`WATCHDOG`]
//! that reads in flight on the threads' rings are being reaped, so a runtime that stops polling
//! (blocked, or shut down without dropping its source) delays reads, never hangs them, and it
//! finishes the reads of a ring whose source was dropped before letting the ring go.
//! The futures are runtime-agnostic (a [`std::task::Waker`]).
//!
//! Buffers belong to the ring while the kernel may write into them: a future dropped early (a
//! connection closed mid-read) leaves its reads to finish into buffers nobody reads, which the
//! reaper then frees. Nothing is ever freed under the kernel.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};
use parking_lot::Mutex;

use crate::io::AlignedBuf;

const RING_DEPTH: u32 = 256;

/// How often the fallback thread makes sure reads in flight are reaped while a runtime's
/// [`CompletionSource`] is registered (and how late a read can be if that runtime stops).
const WATCHDOG: Duration = Duration::from_millis(50);
/// How often the fallback thread looks when no read is in flight and no thread has a ring.
const IDLE_CHECK: Duration = Duration::from_secs(1);

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

/// A read that ended (done, failed or gave up), to hand to its batch outside the ring's lock.
type Finished = (Arc<Batch>, usize, io::Result<AlignedBuf>);

/// The ring and the requests the kernel owns.
struct RingState {
    ring: IoUring,
    /// Requests in the kernel, by the slot number their entry carries as user data.
    slots: Vec<Option<Req>>,
    free: Vec<usize>,
    /// Requests waiting for room in the ring (or resubmitted after a short read).
    backlog: VecDeque<Req>,
    in_flight: usize,
    /// A thread is in `io_uring_enter` for this ring (outside the lock): others only queue.
    entering: bool,
}

struct Shared {
    state: Mutex<RingState>,
    /// The ring's descriptor, to enter it without holding `state` (the kernel serialises
    /// submissions itself; producers are serialised by `state`).
    ring_fd: RawFd,
    /// Signalled by the kernel for every completion (`IORING_REGISTER_EVENTFD`); nonblocking.
    event: OwnedFd,
    /// A [`CompletionSource`] reaps this ring (a thread's own ring while its source lives;
    /// never the process's ring): the fallback thread only watches it.
    driven: AtomicBool,
    /// When completions were last reaped (ms since `epoch`), for the watchdog.
    last_reap_ms: AtomicU64,
    epoch: Instant,
    /// Reads wait in the submission queue for the registered runtime to enter them.
    kicked: AtomicBool,
    /// The registered runtime's task that enters and reaps.
    driver: Mutex<Option<Waker>>,
}

/// The process's ring, reaped by the fallback thread.
static RING: OnceLock<Option<Arc<Shared>>> = OnceLock::new();

/// The threads' own rings (see [`CompletionSource`]), for the fallback thread's watch; a ring
/// leaves this list once its source is gone and its last read finished.
static THREAD_RINGS: Mutex<Vec<Arc<Shared>>> = Mutex::new(Vec::new());

thread_local! {
    /// This thread's own ring, while its [`CompletionSource`] lives.
    static OWN_RING: RefCell<Option<Arc<Shared>>> = const { RefCell::new(None) };
}

/// Test hook: while set, new reads stay queued (submitted, not yet issued).
static PAUSED: AtomicBool = AtomicBool::new(false);

/// For tests only: holds reads submitted from now on in the queue (`true`) until released
/// (`false`), so that a test can change the pool while a read is in flight.
#[doc(hidden)]
pub fn pause_for_test(paused: bool) {
    PAUSED.store(paused, Ordering::SeqCst);
    if !paused && let Some(r) = ring() {
        r.pump();
        let rings: Vec<Arc<Shared>> = THREAD_RINGS.lock().clone();
        for r in rings {
            r.pump();
        }
    }
}

/// The process's ring, set up on first use with its fallback thread; None where io_uring is
/// unavailable (or the process uses the pread fallback, or the power-loss simulation watches
/// every read, or `MAAS_ASYNC_READS=off` asks so, to compare): callers then read on a blocking
/// thread.
fn ring() -> Option<&'static Arc<Shared>> {
    if crate::io::engine() != crate::io::IoEngine::Uring || crate::powerloss::active() {
        return None;
    }
    static OFF: OnceLock<bool> = OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("MAAS_ASYNC_READS").as_deref() == Ok("off")) {
        return None;
    }
    RING.get_or_init(|| match start() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "asynchronous reads unavailable; reads that miss RAM go through blocking threads");
            None
        }
    })
    .as_ref()
}

/// This thread's own ring, while its source lives.
fn own_ring() -> Option<Arc<Shared>> {
    OWN_RING
        .try_with(|o| {
            o.borrow()
                .as_ref()
                .filter(|r| r.driven.load(Ordering::SeqCst))
                .cloned()
        })
        .ok()
        .flatten()
}

/// The ring a read submitted from this thread goes to: the thread's own while its source
/// lives, else the process's.
fn ring_for_this_thread() -> Option<Arc<Shared>> {
    own_ring().or_else(|| ring().cloned())
}

/// Whether [`read_batch`] is available in this process.
pub fn available() -> bool {
    ring().is_some()
}

fn start() -> io::Result<Arc<Shared>> {
    let shared = new_ring(false)?;
    let me = shared.clone();
    std::thread::Builder::new()
        .name("maas-aio".into())
        .spawn(move || me.fallback_loop())?;
    tracing::info!("asynchronous device reads: io_uring, submitted by the reading thread");
    Ok(shared)
}

/// A ring with its completion eventfd; `driven`: a thread's own, reaped by its source.
fn new_ring(driven: bool) -> io::Result<Arc<Shared>> {
    let ring = IoUring::new(RING_DEPTH)?;
    // SAFETY: eventfd returns a new descriptor that nothing else owns, or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, owned descriptor.
    let event = unsafe { OwnedFd::from_raw_fd(fd) };
    ring.submitter().register_eventfd(event.as_raw_fd())?;
    let ring_fd = ring.as_raw_fd();
    let shared = Arc::new(Shared {
        state: Mutex::new(RingState {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            in_flight: 0,
            entering: false,
        }),
        ring_fd,
        event,
        driven: AtomicBool::new(driven),
        last_reap_ms: AtomicU64::new(0),
        epoch: Instant::now(),
        kicked: AtomicBool::new(false),
        driver: Mutex::new(None),
    });
    Ok(shared)
}

impl RingState {
    /// Moves queued requests into the submission queue while there is room.
    fn issue(&mut self) {
        if PAUSED.load(Ordering::SeqCst) {
            return;
        }
        while self.in_flight < RING_DEPTH as usize {
            let Some(mut req) = self.backlog.pop_front() else {
                break;
            };
            let slot = self.free.pop().unwrap_or_else(|| {
                self.slots.push(None);
                self.slots.len() - 1
            });
            let rest = &mut req.buf[req.done..];
            let e = opcode::Read::new(types::Fd(req.fd), rest.as_mut_ptr(), rest.len() as u32)
                .offset(req.offset + req.done as u64)
                .build()
                .user_data(slot as u64);
            // SAFETY: the buffer moves into `slots` with the request and stays there, at a
            // stable heap address, until the completion for this entry is reaped.
            if unsafe { self.ring.submission().push(&e) }.is_err() {
                self.free.push(slot);
                self.backlog.push_front(req);
                break;
            }
            self.slots[slot] = Some(req);
            self.in_flight += 1;
        }
    }

    /// Takes every completion the kernel posted; short or interrupted reads go back to the
    /// backlog (the next `issue` sends them again), the rest into `out`.
    fn reap(&mut self, out: &mut Vec<Finished>) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in done {
            let slot = ud as usize;
            let Some(mut req) = self.slots.get_mut(slot).and_then(Option::take) else {
                tracing::error!(user_data = ud, "io_uring completion for no request");
                continue;
            };
            self.free.push(slot);
            self.in_flight -= 1;
            if res == -libc::EINTR || res == -libc::EAGAIN {
                self.backlog.push_back(req);
                continue;
            }
            if res < 0 {
                out.push((
                    req.batch,
                    req.index,
                    Err(io::Error::from_raw_os_error(-res)),
                ));
                continue;
            }
            req.done += res as usize;
            if res == 0 && req.done < req.buf.len() {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("read past the end of the device at {}", req.offset),
                );
                out.push((req.batch, req.index, Err(e)));
            } else if req.done < req.buf.len() {
                // Short read: the rest goes in again.
                self.backlog.push_back(req);
            } else {
                let Req {
                    buf, batch, index, ..
                } = req;
                out.push((batch, index, Ok(buf)));
            }
        }
    }
}

impl Shared {
    /// Queues `reqs` in the submission queue. With a runtime registered, its task enters them
    /// when it next runs (after the submitting task yields, so one `io_uring_enter` carries
    /// every read the connections queued meanwhile); otherwise this thread enters them now.
    fn submit(&self, reqs: Vec<Req>) {
        {
            let mut st = self.state.lock();
            st.backlog.extend(reqs);
            st.issue();
        }
        if self.driven.load(Ordering::SeqCst) {
            if !self.kicked.swap(true, Ordering::SeqCst)
                && let Some(w) = self.driver.lock().as_ref()
            {
                w.wake_by_ref();
            }
            return;
        }
        self.pump();
    }

    /// Enters what is queued and finishes what completed. While one thread is in the kernel
    /// (which, on a virtual disk, includes the device notification: a VM exit) the others only
    /// queue, and it enters their reads too on its next turn: each `io_uring_enter` carries
    /// as many reads as came meanwhile.
    fn pump(&self) {
        let mut finished = Vec::new();
        let mut st = self.state.lock();
        if st.entering {
            return;
        }
        st.entering = true;
        // Bounded: a turn ends when nothing is queued, or the kernel took nothing (the entries
        // stay queued for the next pump: a later read, the runtime's task, or the watchdog).
        for _ in 0..64 {
            st.reap(&mut finished);
            st.issue();
            let pending = st.ring.submission().len();
            if pending == 0 {
                break;
            }
            drop(st);
            for (batch, index, res) in finished.drain(..) {
                batch.finish(index, res);
            }
            let entered = self.enter(pending);
            st = self.state.lock();
            if entered == 0 {
                break;
            }
        }
        st.reap(&mut finished);
        st.entering = false;
        drop(st);
        self.last_reap_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        for (batch, index, res) in finished {
            batch.finish(index, res);
        }
    }

    /// `io_uring_enter` for up to `n` queued entries, not waiting for any completion; how many
    /// the kernel took.
    fn enter(&self, n: usize) -> usize {
        loop {
            // SAFETY: io_uring_enter on our ring's descriptor with no argument pointers.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.ring_fd,
                    n as libc::c_uint,
                    0 as libc::c_uint,
                    0 as libc::c_uint,
                    std::ptr::null::<libc::c_void>(),
                    0usize,
                )
            };
            if r >= 0 {
                return r as usize;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::debug!(error = %e, "io_uring enter");
            return 0;
        }
    }

    /// Makes the eventfd readable, as a completion does: wakes whoever polls it.
    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to our own descriptor.
        unsafe { libc::write(self.event.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    /// Empties the eventfd's counter (nonblocking: nothing to read is fine).
    fn drain_event(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer from our own descriptor.
        unsafe { libc::read(self.event.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    }

    fn in_flight(&self) -> usize {
        let st = self.state.lock();
        st.in_flight + st.backlog.len()
    }

    /// The process's ring: reaps it (nothing else does). The threads' rings: watches that
    /// their runtimes reap them, and finishes those whose source is gone.
    fn fallback_loop(&self) {
        loop {
            let watching = !THREAD_RINGS.lock().is_empty();
            let mut pfd = libc::pollfd {
                fd: self.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Idle (nothing in flight, no ring to watch), it looks rarely: a completion signals
            // the eventfd, and only an enter that failed can leave work that none will announce.
            let timeout = if watching || self.in_flight() > 0 {
                WATCHDOG
            } else {
                IDLE_CHECK
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
            // The counter is emptied before the completions are taken: one posted after this
            // read signals the eventfd again, so none waits for a next turn that never comes.
            if n > 0 {
                self.drain_event();
            }
            if n > 0 || self.in_flight() > 0 {
                self.pump();
            }
            if watching {
                watch_thread_rings();
            }
        }
    }

    /// Nobody reaped it for a whole watchdog period while reads are in flight.
    fn stalled(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_reap_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= WATCHDOG.as_millis() as u64 && self.in_flight() > 0
    }
}

/// Reaps the threads' rings that their runtimes do not (stalled, or source dropped), and lets
/// go of those with no source and no read left.
fn watch_thread_rings() {
    let rings: Vec<Arc<Shared>> = THREAD_RINGS.lock().clone();
    for r in &rings {
        if !r.driven.load(Ordering::SeqCst) {
            r.drain_event();
            r.pump();
        } else if r.stalled() {
            tracing::debug!(
                "read completions not reaped by their runtime for {WATCHDOG:?}; reaping them here"
            );
            r.pump();
        }
    }
    THREAD_RINGS
        .lock()
        .retain(|r| r.driven.load(Ordering::SeqCst) || r.in_flight() > 0);
}

/// The completion signal of a ring of the thread that took it, for a runtime that polls it
/// beside its own I/O (the media engine registers it with tokio on each of its single-threaded
/// runtimes): when its descriptor ([`AsRawFd`], a nonblocking eventfd; edge-triggered polling
/// is fine, `reap` empties it first) is readable, call [`reap`](Self::reap). Reads submitted
/// from that thread go to this ring while the source lives; dropping it sends that thread's
/// reads back to the process's ring, and the fallback thread finishes those still in flight.
pub struct CompletionSource {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CompletionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompletionSource")
    }
}

/// Gives this thread a ring of its own and returns its completion signal; None if
/// asynchronous reads are unavailable, the ring cannot be set up (this thread's reads then go
/// to the process's ring), or this thread already has a source.
pub fn completion_source() -> Option<CompletionSource> {
    let process = ring()?;
    if own_ring().is_some() {
        return None;
    }
    let shared = match new_ring(true) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot set up this thread's io_uring; its reads share the process's ring");
            return None;
        }
    };
    OWN_RING
        .try_with(|o| *o.borrow_mut() = Some(shared.clone()))
        .ok()?;
    THREAD_RINGS.lock().push(shared.clone());
    // The fallback thread's watch starts now, not after an idle second.
    process.signal();
    Some(CompletionSource { shared })
}

impl CompletionSource {
    /// Registers the task that calls [`reap`](Self::reap), woken when reads are queued; then
    /// whether some already are (call `reap` now).
    pub fn watch_submissions(&self, task: &Waker) -> bool {
        {
            let mut w = self.shared.driver.lock();
            if !w.as_ref().is_some_and(|w| w.will_wake(task)) {
                *w = Some(task.clone());
            }
        }
        self.shared.kicked.load(Ordering::SeqCst)
    }

    /// Enters every queued read, empties the completion signal, then finishes every read that
    /// completed (waking its caller).
    pub fn reap(&self) {
        self.shared.kicked.store(false, Ordering::SeqCst);
        self.shared.drain_event();
        self.shared.pump();
    }
}

impl AsRawFd for CompletionSource {
    fn as_raw_fd(&self) -> RawFd {
        self.shared.event.as_raw_fd()
    }
}

impl Drop for CompletionSource {
    fn drop(&mut self) {
        self.shared.driver.lock().take();
        // From now on this thread's reads go to the process's ring; the fallback thread
        // finishes this ring's reads in flight (it stays in THREAD_RINGS until they are done).
        self.shared.driven.store(false, Ordering::SeqCst);
        let _ = OWN_RING.try_with(|o| {
            if let Ok(mut o) = o.try_borrow_mut()
                && o.as_ref().is_some_and(|r| Arc::ptr_eq(r, &self.shared))
            {
                *o = None;
            }
        });
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

/// Submits the reads to the ring; None if asynchronous reads are unavailable (see
/// [`available`]), and then nothing was submitted.
pub fn read_batch(reqs: &[ReadReq<'_>]) -> Option<ReadBatch> {
    let shared = ring_for_this_thread()?;
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
        shared.submit(out);
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
            eprintln!("io_uring unavailable here: asynchronous reads are not used");
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
                        let bufs = block_on(read_batch(&reqs).expect("ring")).expect("reads");
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

    fn file_of(len: usize) -> (File, Vec<u8>) {
        let mut f = tempfile::tempfile().expect("temp file");
        let data: Vec<u8> = (0..len as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        f.write_all(&data).expect("write");
        (f, data)
    }

    /// A runtime's completion source: reads queued while it is registered wait for it (it is
    /// told they are there), and one `reap` after its eventfd turns readable finishes them.
    /// Dropped, it hands reaping back to the pool's thread.
    #[test]
    fn a_registered_source_enters_and_reaps_the_reads() {
        if !available() {
            return;
        }
        let Some(source) = completion_source() else {
            panic!("no completion source: another holder in this process?");
        };
        assert!(
            completion_source().is_none(),
            "a second source while one is registered"
        );
        let (f, data) = file_of(1 << 20);
        let waker = Waker::from(Arc::new(Flag(AtomicBool::new(false))));
        assert!(!source.watch_submissions(&waker), "nothing queued yet");
        let reqs: Vec<ReadReq<'_>> = (0..16u64)
            .map(|k| ReadReq {
                file: &f,
                offset: k * 61_440 % (1 << 20) / 4096 * 4096,
                len: 4096,
            })
            .collect();
        let mut batch = std::pin::pin!(read_batch(&reqs).expect("ring"));
        assert!(
            source.watch_submissions(&waker),
            "queued reads were not announced to the source"
        );
        // The source enters them and reaps what completed, as often as its fd turns readable.
        let deadline = Instant::now() + Duration::from_secs(10);
        let noop = Waker::noop();
        let bufs = loop {
            if let Poll::Ready(r) = batch.as_mut().poll(&mut Context::from_waker(noop)) {
                break r.expect("reads");
            }
            assert!(Instant::now() < deadline, "the reads never completed");
            let mut pfd = libc::pollfd {
                fd: source.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 10) };
            source.reap();
        };
        for (r, b) in reqs.iter().zip(&bufs) {
            let o = r.offset as usize;
            assert_eq!(&b[..], &data[o..o + 4096]);
        }
        drop(source);
        // Back to the pool's own thread: a read completes with nobody reaping.
        let r = [ReadReq {
            file: &f,
            offset: 8192,
            len: 8192,
        }];
        let b = block_on(read_batch(&r).expect("ring")).expect("read");
        assert_eq!(&b[0][..], &data[8192..16384]);
    }

    /// A runtime that registered a source and then stops polling it (blocked, or gone without
    /// dropping it) delays reads by the watchdog's period; it never hangs them.
    #[test]
    fn reads_complete_when_the_registered_source_is_never_polled() {
        if !available() {
            return;
        }
        let source = completion_source().expect("no completion source");
        let (f, data) = file_of(1 << 20);
        let started = Instant::now();
        for k in 0..5u64 {
            let r = [ReadReq {
                file: &f,
                offset: k * 4096,
                len: 4096,
            }];
            let b = block_on(read_batch(&r).expect("ring")).expect("read");
            assert_eq!(&b[0][..], &data[k as usize * 4096..(k as usize + 1) * 4096]);
        }
        let took = started.elapsed();
        // 50 ms each at the watchdog's period; the bound leaves room for a loaded machine.
        assert!(
            took < Duration::from_secs(3),
            "5 reads took {took:?} with the source never polled"
        );
        drop(source);
    }

    /// Each thread that takes a source gets its own ring: its reads are announced to its own
    /// source only, and a second thread's source does not see them.
    #[test]
    fn each_thread_with_a_source_has_its_own_ring() {
        if !available() {
            return;
        }
        let (f, data) = file_of(1 << 20);
        let f = Arc::new(f);
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            let source = completion_source().expect("the other thread's source");
            assert!(!source.watch_submissions(Waker::noop()));
            tx.send(()).expect("tell the test thread");
            // The test thread queues its reads meanwhile: none of them are announced here.
            go_rx.recv().expect("wait for the test thread");
            assert!(
                !source.watch_submissions(Waker::noop()),
                "another thread's reads were announced to this thread's source"
            );
        });
        rx.recv().expect("the other thread took its source");
        let source = completion_source().expect("this thread's source, beside the other's");
        assert!(!source.watch_submissions(Waker::noop()));
        let r = [ReadReq {
            file: &f,
            offset: 12288,
            len: 4096,
        }];
        let mut batch = std::pin::pin!(read_batch(&r).expect("ring"));
        assert!(
            source.watch_submissions(Waker::noop()),
            "not announced to its own source"
        );
        go_tx.send(()).expect("tell the other thread");
        other.join().expect("the other thread");
        let deadline = Instant::now() + Duration::from_secs(10);
        let b = loop {
            source.reap();
            if let Poll::Ready(r) = batch.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                break r.expect("read");
            }
            assert!(Instant::now() < deadline, "the read never completed");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(&b[0][..], &data[12288..16384]);
    }

    /// A source dropped while its ring still has reads queued and in flight: the fallback
    /// thread finishes them, and this thread's next reads go to the process's ring.
    #[test]
    fn reads_left_on_a_dropped_source_still_complete() {
        if !available() {
            return;
        }
        let (f, data) = file_of(1 << 20);
        let source = completion_source().expect("source");
        let reqs: Vec<ReadReq<'_>> = (0..8u64)
            .map(|k| ReadReq {
                file: &f,
                offset: k * 8192,
                len: 4096,
            })
            .collect();
        let batch = read_batch(&reqs).expect("ring");
        drop(source);
        let bufs = block_on(batch).expect("reads finished by the fallback thread");
        for (r, b) in reqs.iter().zip(&bufs) {
            let o = r.offset as usize;
            assert_eq!(&b[..], &data[o..o + 4096]);
        }
        let b = block_on(read_batch(&reqs[..1]).expect("ring")).expect("read");
        assert_eq!(&b[0][..], &data[..4096]);
    }

    struct Flag(AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
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
            .expect("ring"),
        )
        .expect_err("a read beyond the end must fail");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        let none = block_on(read_batch(&[]).expect("ring")).expect("empty batch");
        assert!(none.is_empty());
    }
}
