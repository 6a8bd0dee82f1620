//! The block targets' runtimes: one single-threaded tokio runtime per core, each on a thread
//! of its own with its own io_uring for device reads ([`crate::read_completions`]). Accepted
//! connections are dealt to them in turn, so a connection's task, its reads' submission and
//! their completions all run on one thread.
//!
//! Why: on a multi-threaded runtime every command that misses RAM passed wake-ups between the
//! workers (the connection's task on one, the ring's reaper on the other), and those hand-offs,
//! not CPU, bounded a queue's cold reads: the same code served 25% more of them with one worker
//! than with two. Thread-per-core keeps that path on one thread and still uses every core as
//! connections (an NVMe/TCP host opens one per queue, one queue per CPU) spread over them.
//!
//! What runs here must not block its thread: commands that may wait (writes to a full log,
//! flushes, reads on the blocking path) already go to tokio's blocking threads.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;

/// How many runtimes to start; 0 = one per core.
static WANTED: AtomicUsize = AtomicUsize::new(0);

struct IoRuntimes {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

static RUNTIMES: OnceLock<IoRuntimes> = OnceLock::new();

/// Sets how many runtimes serve the block targets (0: one per core, the default). Takes effect
/// only before the first listener starts; returns whether it did.
pub fn set_threads(n: usize) -> bool {
    WANTED.store(n, Ordering::SeqCst);
    RUNTIMES.get().is_none()
}

/// How many runtimes serve the block targets (starting them if none runs yet); 0 if none could
/// be started (connections then run on the listener's runtime).
pub fn threads() -> usize {
    runtimes().handles.len()
}

/// The runtime the next connection goes to, round robin; None if none could be started.
pub(crate) fn next() -> Option<&'static Handle> {
    let r = runtimes();
    if r.handles.is_empty() {
        return None;
    }
    let i = r.next.fetch_add(1, Ordering::Relaxed) % r.handles.len();
    r.handles.get(i)
}

fn runtimes() -> &'static IoRuntimes {
    RUNTIMES.get_or_init(|| {
        let n = match WANTED.load(Ordering::SeqCst) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let handles: Vec<Handle> = (0..n).filter_map(start).collect();
        if handles.len() < n {
            tracing::warn!(
                wanted = n,
                started = handles.len(),
                "could not start every block-target runtime; connections share the ones that run"
            );
        } else {
            tracing::info!(
                threads = n,
                "block targets: one single-threaded runtime per core"
            );
        }
        IoRuntimes {
            handles,
            next: AtomicUsize::new(0),
        }
    })
}

/// Starts runtime `i` on its own thread, which then lives as long as the process.
fn start(i: usize) -> Option<Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("maas-io-{i}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(rt.handle().clone()));
            rt.block_on(async {
                // This thread's own ring, reaped here between the connections' turns.
                crate::read_completions::drive_on_this_runtime();
                std::future::pending::<()>().await
            });
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a block-target runtime thread");
        return None;
    }
    match rx.recv() {
        Ok(Ok(h)) => Some(h),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot build a block-target runtime");
            None
        }
        Err(_) => None,
    }
}
