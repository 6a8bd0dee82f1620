//! The tokio driver of the NVMe/TCP target: accepts connections (one per queue), moves bytes
//! between sockets and the sans-IO [`Queue`], runs I/O commands through the connection's
//! [`Flow`] (those that complete without waiting right on the connection's task, the others on
//! blocking threads), which also bounds what the connection holds, and enforces the ICReq,
//! Connect and keep-alive timeouts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use super::pdu::{Decoded, Pdu};
use super::queue::{Job as QueueJob, Queue, QueueConfig};
use crate::flow::{Budget, Flow, Job, sleep_until};
use crate::listener::{Limits, Listener};
use crate::nvme::controller::Portal;
use crate::nvme::spec::{Completion, DataPointer, Direction, Status};
use crate::nvme::subsystem::{IO_QUEUE_ENTRIES, Registry};

/// A connection that has not connected a queue by then (and passed DH-HMAC-CHAP, where its
/// export requires it) is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long queued output gets to drain when a connection closes.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A running NVMe/TCP target port.
#[derive(Debug)]
pub struct NvmeTcpServer {
    registry: Arc<Registry>,
    listener: Listener,
}

impl NvmeTcpServer {
    /// Binds `listen` with the default [`Limits`] and starts accepting connections on the
    /// current tokio runtime.
    pub async fn bind(
        listen: &str,
        registry: Arc<Registry>,
        cfg: QueueConfig,
    ) -> std::io::Result<NvmeTcpServer> {
        NvmeTcpServer::bind_with(listen, registry, cfg, Limits::default()).await
    }

    /// Binds `listen`, admitting connections and bounding each as `limits` say (the
    /// handshake is the ICReq).
    pub async fn bind_with(
        listen: &str,
        registry: Arc<Registry>,
        cfg: QueueConfig,
        limits: Limits,
    ) -> std::io::Result<NvmeTcpServer> {
        let reg = registry.clone();
        let listener = Listener::bind_with(listen, limits, move |stream, peer, shutdown| {
            let span = tracing::info_span!(
                "nvme_conn",
                %peer,
                cntlid = tracing::field::Empty,
                qid = tracing::field::Empty,
            );
            connection(stream, reg.clone(), cfg, limits, shutdown).instrument(span)
        })
        .await?;
        tracing::info!(local_addr = %listener.local_addr(), "NVMe/TCP target listening");
        Ok(NvmeTcpServer { registry, listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(self) {
        self.listener.shutdown().await;
    }
}

/// Waits for a watch to change; never, if there is none.
async fn changed<T>(rx: &mut Option<watch::Receiver<T>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// One command for the connection's [`Flow`]: an I/O command, charged the data it carries and,
/// for a read, the data it returns; or a DH-HMAC-CHAP step (a few hundred bytes).
struct Work {
    cid: u16,
    job: QueueJob,
}

impl Job for Work {
    type Tag = u16;
    type Done = Completion;

    fn tag(&self) -> u16 {
        self.cid
    }

    fn cost(&self) -> usize {
        let QueueJob::Io(io) = &self.job else {
            return 4096;
        };
        let sqe = &io.sqe;
        let data_in = match (sqe.direction(), sqe.data_pointer()) {
            (Direction::ControllerToHost | Direction::Both, DataPointer::Transport { len }) => {
                len as usize
            }
            _ => 0,
        };
        io.data.len() + data_in
    }

    fn start(&self) -> crate::flow::Start<Completion> {
        self.job.start()
    }

    fn run(self) -> Completion {
        self.job.run()
    }

    /// An internal error rather than a hung command.
    fn panicked(cid: u16) -> Completion {
        tracing::error!(cid, "NVMe command panicked");
        Completion::status(Status::INTERNAL_ERROR)
    }
}

/// What the connection received and has not yet handed to its queue.
struct Inbound {
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded.
    consumed: usize,
    /// `buf` holds no whole PDU: the next step is a read.
    starved: bool,
}

/// Moves the queue's I/O commands into the flow, runs those the budget lets start, and hands
/// the queue the PDUs received, one at a time, while the budget allows. On a fatal error:
/// why, and the termination request to send.
fn pump(
    rx: &mut Inbound,
    queue: &mut Queue,
    flow: &mut Flow<Work>,
    ic_done: &mut bool,
) -> Result<(), (String, Option<Pdu>)> {
    loop {
        for (cid, job) in queue.take_work() {
            flow.submit(Work { cid, job });
        }
        if let Some((cid, c)) = flow.next_inline() {
            queue.on_complete(cid, c, flow.out());
            continue;
        }
        if rx.starved || !flow.accepting() {
            return Ok(());
        }
        match queue.framer().decode(&rx.buf[rx.consumed..]) {
            Ok(Decoded::Pdu(p, n)) => {
                rx.consumed += n;
                queue
                    .on_pdu(p, flow.out())
                    .map_err(|f| (f.why, f.term.map(Pdu::C2HTermReq)))?;
                // The queue takes nothing before an ICReq: this was it.
                *ic_done = true;
            }
            Ok(Decoded::NeedMore(n)) => {
                // Move the partial PDU to the front once per read.
                rx.buf.drain(..rx.consumed);
                rx.consumed = 0;
                rx.buf.reserve(n.saturating_sub(rx.buf.len()));
                rx.starved = true;
                return Ok(());
            }
            Err(e) => {
                let why = format!("bad PDU: {e}");
                let term = Pdu::C2HTermReq(super::pdu::TermReq {
                    fes: e.fes,
                    fei: e.fei,
                    header: e.header,
                });
                return Err((why, Some(term)));
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    reg: Arc<Registry>,
    cfg: QueueConfig,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY: {e}");
    }
    let portal = match stream.local_addr() {
        Ok(a) => Portal {
            traddr: a.ip().to_string(),
            trsvcid: a.port().to_string(),
        },
        Err(_) => Portal::parse("0.0.0.0:4420"),
    };
    let mut queue = Queue::new(reg.clone(), portal, cfg);
    let mut rx = Inbound {
        buf: Vec::with_capacity(64 * 1024),
        consumed: 0,
        starved: true,
    };
    // Commands and output, under the connection's budget; the queue itself refuses more
    // commands than its negotiated depth (at most IO_QUEUE_ENTRIES).
    let mut flow: Flow<Work> = Flow::new(Budget {
        bytes: limits.in_flight_bytes,
        commands: IO_QUEUE_ENTRIES as usize,
    });
    let accepted = Instant::now();
    let ic_deadline = accepted + limits.handshake_timeout;
    let connect_deadline = accepted + CONNECT_TIMEOUT;
    let mut ic_done = false;
    let mut killed: Option<watch::Receiver<Option<String>>> = None;
    let mut removed: Option<watch::Receiver<bool>> = None;
    let mut closing: Option<String> = None;
    let mut term: Option<Pdu> = None;
    loop {
        // An unexport or a controller removal that raced with bytes arriving: nothing received
        // after it is executed (select! below may have picked the read first).
        if closing.is_none() {
            if removed.as_ref().is_some_and(|r| *r.borrow()) {
                closing = Some("subsystem unexported".into());
            } else if let Some(why) = killed.as_ref().and_then(|k| k.borrow().clone()) {
                closing = Some(format!("controller ended: {why}"));
            }
        }
        // Commands and PDUs received, and output, as far as they go without waiting.
        let step = |flow: &mut Flow<Work>| {
            if closing.is_none()
                && let Err((why, t)) = pump(&mut rx, &mut queue, flow, &mut ic_done)
            {
                term = t;
                closing = Some(why);
            }
        };
        if let Err(e) = flow.drive(step, |s| stream.try_write_vectored(s)) {
            closing.get_or_insert_with(|| format!("write: {e}"));
        }
        // A queue that just connected: follow its controller and subsystem.
        if killed.is_none()
            && let Some(c) = queue.controller()
        {
            let span = tracing::Span::current();
            span.record("cntlid", c.cntlid);
            span.record("qid", queue.qid());
            killed = Some(c.kill_watch());
            removed = c.subsystem().map(|s| s.removed());
            if c.killed().is_some() {
                closing.get_or_insert_with(|| "controller ended".into());
            }
        }
        // A shutdown the host asked for (CC.SHN) flushes every namespace off this task.
        if let Some(c) = queue.controller()
            && c.take_shutdown_request()
        {
            let c = c.clone();
            tokio::task::spawn_blocking(move || c.finish_shutdown());
        }
        if let Some(why) = closing {
            tracing::info!("NVMe/TCP connection ends: {why}");
            if let Some(t) = term {
                queue.framer().encode(&t, flow.out().tail());
            }
            queue.on_close(&why);
            break;
        }
        let ctrl = queue.controller().cloned();
        let ka_deadline = ctrl
            .as_ref()
            .filter(|_| queue.is_admin())
            .and_then(|c| c.keep_alive_deadline())
            .map(Instant::from_std);
        // ICReq in time, then connected and, where the export requires it, authenticated in
        // time, or dropped.
        let handshake_wait = if !ic_done {
            Some(ic_deadline)
        } else if queue.is_ready() {
            None
        } else {
            Some(connect_deadline)
        };
        let stall = flow.stall_deadline(limits.write_stall_timeout);
        tokio::select! {
            r = stream.readable(), if flow.accepting() && rx.starved => {
                if rx.buf.capacity() - rx.buf.len() < 16 * 1024 {
                    rx.buf.reserve(64 * 1024);
                }
                match r.and_then(|()| stream.try_read_buf(&mut rx.buf)) {
                    Ok(0) => { closing = Some("host closed the connection".into()); }
                    Ok(_) => rx.starved = false,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => { closing = Some(format!("read: {e}")); }
                }
            }
            (cid, c) = flow.completed() => {
                queue.on_complete(cid, c, flow.out());
                while let Some((cid, c)) = flow.take_completed() {
                    queue.on_complete(cid, c, flow.out());
                }
            }
            w = stream.writable(), if flow.has_output() => {
                if let Err(e) = w {
                    closing = Some(format!("write: {e}"));
                }
            }
            _ = async { match &ctrl { Some(c) => c.events.notified().await, None => std::future::pending().await } }, if queue.is_admin() => {
                queue.deliver_events(flow.out());
            }
            _ = changed(&mut killed) => {
                let why = killed.as_ref().and_then(|k| k.borrow().clone()).unwrap_or_default();
                closing = Some(format!("controller ended: {why}"));
            }
            _ = changed(&mut removed) => {
                closing = Some("subsystem unexported".into());
            }
            _ = sleep_until(stall) => {
                closing = Some(format!(
                    "the host read none of our output for {:?}",
                    limits.write_stall_timeout
                ));
            }
            _ = sleep_until(ka_deadline) => {
                if let Some(c) = &ctrl
                    && c.keep_alive_deadline().is_some_and(|d| d <= std::time::Instant::now())
                {
                    tracing::warn!(
                        cntlid = c.cntlid,
                        hostnqn = %c.hostnqn,
                        kato_ms = c.kato_ms(),
                        "NVMe keep-alive expired; removing the controller"
                    );
                    reg.remove_controller(c.cntlid, "keep-alive expired");
                    closing = Some("keep-alive expired".into());
                }
            }
            _ = sleep_until(handshake_wait) => {
                closing = Some(if !ic_done {
                    format!("no ICReq within {:?}", limits.handshake_timeout)
                } else if ctrl.is_none() {
                    "no Fabrics Connect in time".into()
                } else {
                    "not authenticated in time".into()
                });
            }
            _ = shutdown.changed() => {
                closing = Some("target shutting down".into());
            }
        }
    }
    let mut s = stream;
    flow.finish(&mut s, CLOSE_GRACE).await;
}
