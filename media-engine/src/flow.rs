//! What one connection has in flight, under one budget, for every TCP front-end: the commands
//! it runs (right on the connection's task when they need no waiting; as futures that task
//! polls when they only wait for device reads; else on blocking threads) and the output
//! waiting for its socket ([`OutQueue`]).
//!
//! The budget is what bounds a connection's memory whatever its peer does. A command is
//! charged what it holds while it runs and queues when it completes (a read's data, a write's
//! data) from the moment it is submitted until its output leaves for the socket; commands
//! start in order only while the bytes in flight (queued output + running commands) are under
//! the budget and fewer than [`Budget::commands`] run; and the driver takes no further PDU
//! from its peer while the bytes in flight, waiting commands included, are at or over the
//! budget ([`Flow::accepting`]). A peer that stops reading its socket therefore stops its own
//! commands: the connection holds at most the budget plus the one command that crossed it.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::outq::OutQueue;

/// A command a driver runs for its protocol's state machine.
pub trait Job: Send + 'static {
    /// What identifies the command to the state machine (an iSCSI ITT, an NVMe CID).
    type Tag: Copy + Send + 'static;
    /// The command's result.
    type Done: Send + 'static;

    fn tag(&self) -> Self::Tag;
    /// Most bytes the command holds while it runs and queues when it completes.
    fn cost(&self) -> usize;
    /// Starts the command on the connection's task: its result if it completes without
    /// waiting, a future if all it waits for is the device (see
    /// [`maas_pool::BlockDevice::read_async`]), or [`Start::Blocking`], having changed nothing,
    /// to send it to [`Job::run`] on a blocking thread. One call decides, so a read that misses
    /// RAM resolves its blocks once.
    fn start(&self) -> Start<Self::Done>;
    /// Runs the command (blocking).
    fn run(self) -> Self::Done;
    /// The result of a command whose execution panicked (a bug: the peer gets an error
    /// rather than a hung command).
    fn panicked(tag: Self::Tag) -> Self::Done;
}

/// A command running as a future.
pub type JobFuture<D> = Pin<Box<dyn Future<Output = D> + Send>>;

/// How a command started ([`Job::start`]).
pub enum Start<D> {
    /// It completed without waiting.
    Done(D),
    /// It waits for the device only: a future the connection's task polls.
    Future(JobFuture<D>),
    /// It may wait for anything else: [`Job::run`] on a blocking thread.
    Blocking,
}

impl<D> std::fmt::Debug for Start<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Start::Done(_) => "Start::Done",
            Start::Future(_) => "Start::Future",
            Start::Blocking => "Start::Blocking",
        })
    }
}

/// A running command's future as the flow keeps it: tag, cost and result.
type TaskFuture<J> =
    Pin<Box<dyn Future<Output = (<J as Job>::Tag, usize, <J as Job>::Done)> + Send>>;

/// A future whose panics are caught (as `std::panic::catch_unwind` does for a closure), so a
/// bug in one command answers that command with an error instead of killing a runtime worker's
/// task with the command never answered.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(p) => Poll::Ready(Err(p)),
        }
    }
}

/// How much one connection may have in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Output waiting for the socket plus what submitted commands hold.
    pub bytes: usize,
    /// Commands running at once.
    pub commands: usize,
}

impl Budget {
    /// 4 MiB: more than the bandwidth-delay product of a 25 GbE link at 1 ms, on top of which
    /// the kernel's own socket buffer (up to 4 MiB by default) keeps the link busy while the
    /// connection's task refills it.
    pub const DEFAULT_BYTES: usize = 4 << 20;
    /// How long output may wait for a peer that reads none of it before the connection is
    /// closed. The budget bounds what such a peer holds; this bounds for how long. Twice the
    /// Linux hosts' default I/O timeout (30 s): a live initiator has long given up by then.
    pub const DEFAULT_WRITE_STALL: Duration = Duration::from_secs(60);
}

/// A connection's commands and output.
pub struct Flow<J: Job> {
    out: OutQueue,
    budget: Budget,
    /// Submitted commands not started yet, with their cost.
    waiting: VecDeque<(J, usize)>,
    waiting_bytes: usize,
    running: usize,
    running_bytes: usize,
    /// Commands running as futures, polled by the connection's own task (through
    /// [`Flow::completed`]): a batch of device reads completing together wakes that task once
    /// and leaves with one socket write, where a task per command woke it once per command.
    tasks: FuturesUnordered<TaskFuture<J>>,
    /// Completions taken by [`Flow::completed`] beyond the one it returned.
    ready: VecDeque<(J::Tag, usize, J::Done)>,
    /// Completions from blocking threads: (tag, cost, result).
    tx: mpsc::UnboundedSender<(J::Tag, usize, J::Done)>,
    rx: mpsc::UnboundedReceiver<(J::Tag, usize, J::Done)>,
    peak: usize,
    /// Since when output has been waiting with the socket taking none of it.
    stalled_since: Option<tokio::time::Instant>,
}

impl<J: Job> std::fmt::Debug for Flow<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flow")
            .field("queued", &self.out.len())
            .field("waiting", &self.waiting.len())
            .field("running", &self.running)
            .field("in_flight", &self.in_flight())
            .field("budget", &self.budget)
            .finish()
    }
}

impl<J: Job> Flow<J> {
    pub fn new(budget: Budget) -> Flow<J> {
        let (tx, rx) = mpsc::unbounded_channel();
        Flow {
            out: OutQueue::new(),
            budget: Budget {
                bytes: budget.bytes.max(1),
                commands: budget.commands.max(1),
            },
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            running: 0,
            running_bytes: 0,
            tasks: FuturesUnordered::new(),
            ready: VecDeque::new(),
            tx,
            rx,
            peak: 0,
            stalled_since: None,
        }
    }

    /// When the peer will have read none of the waiting output for `limit` (`None`: no
    /// output waits, or the socket took some at the last try). A driver closes the
    /// connection then: the peer stopped reading.
    pub fn stall_deadline(&self, limit: Duration) -> Option<tokio::time::Instant> {
        self.stalled_since.map(|t| t + limit)
    }

    /// The output queue, for the state machine's encoders.
    pub fn out(&mut self) -> &mut OutQueue {
        &mut self.out
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Bytes in flight: queued output and what submitted commands hold.
    pub fn in_flight(&self) -> usize {
        self.out.len() + self.running_bytes + self.waiting_bytes
    }

    /// The most bytes this connection ever had in flight.
    pub fn peak(&self) -> usize {
        self.peak.max(self.in_flight())
    }

    /// Commands submitted and not completed.
    pub fn commands(&self) -> usize {
        self.running + self.waiting.len()
    }

    /// Whether the driver may take another PDU from its peer: the bytes in flight are under
    /// the budget. Otherwise it leaves the socket (and what it already read) alone until the
    /// peer has read enough of its output, or running commands have completed.
    pub fn accepting(&self) -> bool {
        self.in_flight() < self.budget.bytes
    }

    /// Queues a command; it starts when the budget allows ([`Flow::next_inline`]).
    pub fn submit(&mut self, job: J) {
        let cost = job.cost();
        self.waiting_bytes += cost;
        self.waiting.push_back((job, cost));
        self.note_peak();
    }

    fn note_peak(&mut self) {
        self.peak = self.peak.max(self.in_flight());
    }

    fn may_start(&self) -> bool {
        self.running < self.budget.commands
            && self.out.len() + self.running_bytes < self.budget.bytes
    }

    /// Starts waiting commands, in order, while the budget allows: those that need no waiting
    /// run right here, and the first of them to complete is returned, for the state machine
    /// (whose answer may change what the budget allows: call again until `None`); those that
    /// wait only for device reads become futures the connection's task polls (through
    /// [`Flow::completed`]); the others go to blocking threads. The
    /// completions of both come from [`Flow::completed`].
    pub fn next_inline(&mut self) -> Option<(J::Tag, J::Done)> {
        while self.may_start() {
            let (job, cost) = self.waiting.pop_front()?;
            self.waiting_bytes -= cost;
            let tag = job.tag();
            let started = std::panic::catch_unwind(AssertUnwindSafe(|| job.start()))
                .unwrap_or_else(|_| Start::Done(J::panicked(tag)));
            match started {
                Start::Done(done) => return Some((tag, done)),
                Start::Future(future) => {
                    self.running += 1;
                    self.running_bytes += cost;
                    // The job's own resources (a write's buffer) go now; the future owns what
                    // the read needs.
                    drop(job);
                    self.tasks.push(Box::pin(async move {
                        let done = CatchUnwind(future)
                            .await
                            .unwrap_or_else(|_| J::panicked(tag));
                        (tag, cost, done)
                    }));
                    continue;
                }
                Start::Blocking => {}
            }
            self.running += 1;
            self.running_bytes += cost;
            let tx = self.tx.clone();
            tokio::task::spawn_blocking(move || {
                let done = std::panic::catch_unwind(AssertUnwindSafe(|| job.run()))
                    .unwrap_or_else(|_| J::panicked(tag));
                let _ = tx.send((tag, cost, done));
            });
        }
        None
    }

    /// The next command completed as a future or on a blocking thread (cancel-safe; pending
    /// while none runs). Every other completion ready now is kept for
    /// [`Flow::take_completed`], so that a driver answers them all before it writes.
    pub async fn completed(&mut self) -> (J::Tag, J::Done) {
        let (tag, cost, done) = std::future::poll_fn(|cx| {
            if self.ready.is_empty() {
                while let Poll::Ready(Some(c)) = self.tasks.poll_next_unpin(cx) {
                    self.ready.push_back(c);
                }
                // The sender lives in `self`, so the channel never closes.
                while let Poll::Ready(Some(c)) = self.rx.poll_recv(cx) {
                    self.ready.push_back(c);
                }
            }
            match self.ready.pop_front() {
                Some(c) => Poll::Ready(c),
                None => Poll::Pending,
            }
        })
        .await;
        self.running -= 1;
        self.running_bytes -= cost;
        (tag, done)
    }

    /// A completion [`Flow::completed`] took beyond the one it returned.
    pub fn take_completed(&mut self) -> Option<(J::Tag, J::Done)> {
        let (tag, cost, done) = self.ready.pop_front()?;
        self.running -= 1;
        self.running_bytes -= cost;
        Some((tag, done))
    }

    /// Writes as much queued output as `write` takes without waiting (`try_write_vectored` of
    /// the socket).
    pub fn write_now(
        &mut self,
        mut write: impl FnMut(&[IoSlice<'_>]) -> std::io::Result<usize>,
    ) -> std::io::Result<()> {
        self.note_peak();
        let mut progress = false;
        while !self.out.is_empty() {
            match write(&self.out.slices()) {
                Ok(0) => break,
                Ok(n) => {
                    self.out.advance(n);
                    progress = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.out.is_empty() || progress {
            self.stalled_since = None;
        } else if self.stalled_since.is_none() {
            self.stalled_since = Some(tokio::time::Instant::now());
        }
        Ok(())
    }

    /// After any event: runs `pump` (the protocol's step: its output into the queue, commands
    /// submitted, completions handed back, received PDUs taken while [`Flow::accepting`]),
    /// writes what the socket takes without waiting, and again while writing made room (which
    /// may let waiting commands start and received PDUs in), so nothing waits for an event
    /// that already happened.
    pub fn drive(
        &mut self,
        mut pump: impl FnMut(&mut Self),
        mut write: impl FnMut(&[IoSlice<'_>]) -> std::io::Result<usize>,
    ) -> std::io::Result<()> {
        loop {
            pump(self);
            let queued = self.out.len();
            self.write_now(&mut write)?;
            if self.out.len() == queued {
                return Ok(());
            }
        }
    }

    /// When the connection ends: what is still queued (a last status, a logout response, a
    /// termination request) gets `grace` to leave, then the write side shuts down.
    pub async fn finish<W: AsyncWrite + Unpin>(&mut self, w: &mut W, grace: Duration) {
        let _ = tokio::time::timeout(grace, async {
            while !self.out.is_empty() {
                match w.write_vectored(&self.out.slices()).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => self.out.advance(n),
                }
            }
            let _ = w.shutdown().await;
        })
        .await;
    }
}

/// Sleeps until `at`, or forever if `None` (a deadline branch of a driver's `select!`).
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A read of `len` bytes, in memory (inline) or not.
    struct Read {
        tag: u32,
        len: usize,
        inline: bool,
        /// Runs as a future (see [`Job::start`]).
        asynch: bool,
        ran: Arc<AtomicUsize>,
    }

    impl Job for Read {
        type Tag = u32;
        type Done = Vec<u8>;
        fn tag(&self) -> u32 {
            self.tag
        }
        fn cost(&self) -> usize {
            self.len
        }
        fn start(&self) -> Start<Vec<u8>> {
            if self.inline {
                return Start::Done(self.read());
            }
            if !self.asynch {
                return Start::Blocking;
            }
            let me = Read {
                asynch: false,
                ran: self.ran.clone(),
                ..*self
            };
            Start::Future(Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                me.read()
            }))
        }
        fn run(self) -> Vec<u8> {
            assert!(
                !self.asynch,
                "an asynchronous job went to a blocking thread"
            );
            self.read()
        }
        fn panicked(_: u32) -> Vec<u8> {
            b"panicked".to_vec()
        }
    }

    impl Read {
        fn read(&self) -> Vec<u8> {
            if self.tag == 666 {
                panic!("boom");
            }
            self.ran.fetch_add(1, Ordering::SeqCst);
            vec![self.tag as u8; self.len]
        }
    }

    fn flow() -> (Flow<Read>, Arc<AtomicUsize>) {
        (
            Flow::new(Budget {
                bytes: 1 << 20,
                commands: 4,
            }),
            Arc::new(AtomicUsize::new(0)),
        )
    }

    /// What a driver does with an inline completion: queue the data.
    fn run_inline(f: &mut Flow<Read>) -> usize {
        let mut n = 0;
        while let Some((_, data)) = f.next_inline() {
            f.out().push_copy(&data);
            n += 1;
        }
        n
    }

    fn read(tag: u32, len: usize, ran: &Arc<AtomicUsize>) -> Read {
        Read {
            tag,
            len,
            inline: true,
            asynch: false,
            ran: ran.clone(),
        }
    }

    /// The peer reads `n` bytes.
    fn peer_reads(f: &mut Flow<Read>, mut n: usize) {
        f.write_now(|s| {
            let k = s.iter().map(|s| s.len()).sum::<usize>().min(n);
            n -= k;
            Ok(k)
        })
        .unwrap();
    }

    #[test]
    fn the_driver_takes_no_more_commands_once_the_budget_is_spent() {
        let (mut f, ran) = flow();
        let mut taken = 0;
        while f.accepting() {
            f.submit(read(taken, 256 << 10, &ran));
            taken += 1;
        }
        assert_eq!(taken, 4, "1 MiB of reads submitted");
        assert_eq!(run_inline(&mut f), 4);
        assert!(!f.accepting(), "their output is queued");
        peer_reads(&mut f, 512 << 10);
        assert!(f.accepting());
    }

    #[test]
    fn a_peer_that_does_not_read_stops_its_own_commands() {
        let (mut f, ran) = flow();
        // 1000 reads of 256 KiB submitted: four run (1 MiB queued), the rest wait.
        for tag in 0..1000 {
            f.submit(read(tag, 256 << 10, &ran));
        }
        assert_eq!(run_inline(&mut f), 4);
        assert_eq!(ran.load(Ordering::SeqCst), 4);
        assert_eq!(f.out().len(), 1 << 20);
        // Nothing more runs until the output leaves.
        assert_eq!(run_inline(&mut f), 0);
        // The peer reads half: two more run.
        peer_reads(&mut f, 512 << 10);
        assert_eq!(run_inline(&mut f), 2);
        assert_eq!(ran.load(Ordering::SeqCst), 6);
        assert_eq!(f.commands(), 994);
        // Queued output never went past the budget.
        assert_eq!(f.out().len(), 1 << 20);
    }

    #[test]
    fn output_the_peer_does_not_take_starts_the_stall_clock_and_progress_stops_it() {
        let (mut f, ran) = flow();
        let limit = Duration::from_secs(60);
        assert_eq!(f.stall_deadline(limit), None);
        f.submit(read(1, 64 << 10, &ran));
        run_inline(&mut f);
        let blocked = |_: &[IoSlice<'_>]| Err(std::io::ErrorKind::WouldBlock.into());
        f.write_now(blocked).unwrap();
        let first = f
            .stall_deadline(limit)
            .expect("output waits and nothing left");
        // Still nothing taken: the clock keeps its start.
        f.write_now(blocked).unwrap();
        assert_eq!(f.stall_deadline(limit), Some(first));
        // Some taken: no stall, even though output still waits.
        let mut once = Some(1024);
        f.write_now(|_| {
            once.take()
                .ok_or_else(|| std::io::ErrorKind::WouldBlock.into())
        })
        .unwrap();
        assert!(f.has_output());
        assert_eq!(f.stall_deadline(limit), None);
        // All of it taken: nothing waits.
        f.write_now(blocked).unwrap();
        assert!(f.stall_deadline(limit).is_some());
        peer_reads(&mut f, 64 << 10);
        f.write_now(blocked).unwrap();
        assert_eq!(f.stall_deadline(limit), None);
    }

    #[test]
    fn one_command_larger_than_the_budget_still_runs() {
        let (mut f, ran) = flow();
        f.submit(Read {
            tag: 1,
            len: 3 << 20,
            inline: true,
            asynch: false,
            ran: ran.clone(),
        });
        assert!(!f.accepting());
        assert_eq!(run_inline(&mut f), 1);
        f.submit(Read {
            tag: 2,
            len: 10,
            inline: true,
            asynch: false,
            ran,
        });
        // The next waits for the big one's output to leave.
        assert_eq!(run_inline(&mut f), 0);
        peer_reads(&mut f, 3 << 20);
        assert_eq!(run_inline(&mut f), 1);
    }

    /// Eleven commands that do not complete inline (one of them panics) under a budget of four
    /// running at once: at most four run, each completes through `completed` with its data,
    /// the panic is answered, and nothing is left counted. `asynch`: as futures (`Start::Future`),
    /// else on blocking threads.
    async fn commands_off_the_connection_task(asynch: bool) {
        let (mut f, ran) = flow();
        for tag in (0..10).chain([666]) {
            f.submit(Read {
                tag,
                len: 1000,
                inline: false,
                asynch,
                ran: ran.clone(),
            });
        }
        assert!(f.next_inline().is_none());
        assert_eq!(f.running, 4, "at most `commands` run at once");
        let mut done = Vec::new();
        while done.len() < 11 {
            let (tag, data) = tokio::time::timeout(Duration::from_secs(10), f.completed())
                .await
                .unwrap();
            assert!(f.running < 4);
            done.push((tag, data));
            assert!(f.next_inline().is_none());
        }
        assert_eq!((f.commands(), f.in_flight()), (0, 0));
        assert_eq!(ran.load(Ordering::SeqCst), 10);
        for (tag, data) in &done {
            if *tag == 666 {
                assert_eq!(data, b"panicked");
            } else {
                assert_eq!(data, &vec![*tag as u8; 1000]);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_commands_are_counted_until_they_complete_and_panics_are_answered() {
        commands_off_the_connection_task(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn asynchronous_commands_run_as_futures_within_the_budget_and_panics_are_answered() {
        commands_off_the_connection_task(true).await;
    }

    /// Asynchronous commands whose device reads complete together are answered from one wake
    /// of the connection's task: `completed` returns one, `take_completed` the others, so the
    /// driver writes all the answers with one socket write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn completions_ready_together_are_taken_together() {
        let mut tags = Vec::new();
        let (mut f, ran) = flow();
        for tag in 0..4 {
            f.submit(Read {
                tag,
                len: 1000,
                inline: false,
                asynch: true,
                ran: ran.clone(),
            });
        }
        assert!(f.next_inline().is_none());
        // One poll starts the four 5 ms timers (none can be done yet); then they all expire
        // while nobody polls.
        assert!(
            futures_util::FutureExt::now_or_never(f.completed()).is_none(),
            "a 5 ms read completed at its first poll"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (t, data) = f.completed().await;
        tags.push(t);
        assert_eq!(data, vec![t as u8; 1000]);
        while let Some((t, data)) = f.take_completed() {
            assert_eq!(data, vec![t as u8; 1000]);
            tags.push(t);
        }
        tags.sort_unstable();
        assert_eq!(tags, vec![0, 1, 2, 3], "all four from one wake");
        assert_eq!((f.commands(), f.in_flight()), (0, 0));
    }
}
