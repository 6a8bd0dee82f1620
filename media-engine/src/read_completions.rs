//! Reaps the pool's asynchronous device reads on the single-threaded runtime that serves the
//! connections ([`crate::io_runtimes`]): the thread's own ring's completion eventfd is polled
//! beside the sockets, so a read that completes wakes the thread that is awake (or about to
//! be) anyway, instead of a thread of its own that would then have to wake it
//! (`maas_pool::aio`).

use std::task::Poll;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Gives this thread its own ring and reaps it on the current runtime, which must be a
/// single-threaded one running on this thread: reads submitted from this thread go to that
/// ring. Does nothing if asynchronous reads are unavailable or the thread already has a ring.
/// The task lives as long as the runtime: when that shuts down, the pool's own thread finishes
/// the reads still in flight.
pub fn drive_on_this_runtime() {
    let Some(source) = maas_pool::aio::completion_source() else {
        return;
    };
    // SAFETY: the descriptor is the ring's eventfd, which the source owns (through the ring)
    // and the AsyncFd owns the source, so it stays open and the same for the whole life of
    // this AsyncFd.
    let fd = match unsafe { AsyncFd::register_with_interest(source, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            // The source is dropped with the error: the pool's thread keeps reaping.
            tracing::warn!(error = %e, "cannot poll read completions on this runtime");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            // Woken by a completion (the eventfd) or by reads queued for it to enter: entering
            // them here, after the connection tasks that queued them yielded, puts every read
            // queued meanwhile into one io_uring_enter.
            let ready = std::future::poll_fn(|cx| {
                let queued = fd.get_ref().watch_submissions(cx.waker());
                match fd.poll_read_ready(cx) {
                    Poll::Ready(r) => Poll::Ready(Some(r)),
                    Poll::Pending if queued => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            fd.get_ref().reap();
            match ready {
                // Cleared only if no completion was signalled since it was seen ready (tokio
                // compares ticks): `reap` emptied the eventfd before taking the completions, so
                // one that came after is signalled again.
                Some(Ok(mut guard)) => guard.clear_ready(),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "polling read completions failed; the pool's thread reaps them");
                    return;
                }
                None => {}
            }
        }
    });
}
