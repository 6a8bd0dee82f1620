//! The tokio driver of the NVMe/TCP target: accepts connections (one per queue), moves bytes
//! between sockets and the sans-IO [`Queue`], runs I/O commands (those that complete without
//! waiting right on the connection's task, the others on blocking threads), and enforces the
//! controller's keep-alive timeout.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use super::pdu::{Decoded, Pdu};
use super::queue::{Queue, QueueConfig};
use crate::listener::Listener;
use crate::nvme::controller::Portal;
use crate::nvme::spec::{Completion, Status};
use crate::nvme::subsystem::Registry;
use crate::outq::OutQueue;

/// A connection that has not connected a queue by then (and passed DH-HMAC-CHAP, where its
/// export requires it) is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Output bytes waiting for the socket above which a connection stops reading commands.
const MAX_PENDING_OUT: usize = 8 << 20;
/// How long queued output gets to drain when a connection closes.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A running NVMe/TCP target port.
#[derive(Debug)]
pub struct NvmeTcpServer {
    registry: Arc<Registry>,
    listener: Listener,
}

impl NvmeTcpServer {
    /// Binds `listen` and starts accepting connections on the current tokio runtime.
    pub async fn bind(
        listen: &str,
        registry: Arc<Registry>,
        cfg: QueueConfig,
    ) -> std::io::Result<NvmeTcpServer> {
        let reg = registry.clone();
        let listener = Listener::bind(listen, move |stream, peer, shutdown| {
            let span = tracing::info_span!(
                "nvme_conn",
                %peer,
                cntlid = tracing::field::Empty,
                qid = tracing::field::Empty,
            );
            connection(stream, reg.clone(), cfg, shutdown).instrument(span)
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

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The answer to a command whose execution panicked (a bug: logged; the host gets an internal
/// error rather than a hung command).
fn panicked(cid: u16) -> Completion {
    tracing::error!(cid, "NVMe command panicked");
    Completion::status(Status::INTERNAL_ERROR)
}

async fn connection(
    stream: TcpStream,
    reg: Arc<Registry>,
    cfg: QueueConfig,
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
    let mut inbuf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut consumed = 0usize;
    let mut pending = OutQueue::new();
    let (ctx, mut crx) = mpsc::unbounded_channel::<(u16, Completion)>();
    let connect_deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut killed: Option<watch::Receiver<Option<String>>> = None;
    let mut removed: Option<watch::Receiver<bool>> = None;
    let mut closing: Option<String> = None;
    let mut term: Option<Pdu> = None;
    let mut inline_done: Vec<(u16, Completion)> = Vec::new();
    loop {
        let ctrl = queue.controller().cloned();
        let ka_deadline = ctrl
            .as_ref()
            .filter(|_| queue.is_admin())
            .and_then(|c| c.keep_alive_deadline())
            .map(Instant::from_std);
        // Connected and, where the export requires it, authenticated in time, or dropped.
        let connect_wait = if queue.is_ready() {
            None
        } else {
            Some(connect_deadline)
        };
        tokio::select! {
            r = stream.readable(), if pending.len() < MAX_PENDING_OUT => {
                if inbuf.capacity() - inbuf.len() < 16 * 1024 {
                    inbuf.reserve(64 * 1024);
                }
                match r.and_then(|()| stream.try_read_buf(&mut inbuf)) {
                    Ok(0) => { closing = Some("host closed the connection".into()); }
                    Ok(_) => loop {
                        match queue.framer().decode(&inbuf[consumed..]) {
                            Ok(Decoded::Pdu(p, n)) => {
                                consumed += n;
                                if let Err(f) = queue.on_pdu(p, &mut pending) {
                                    term = f.term.map(Pdu::C2HTermReq);
                                    closing = Some(f.why);
                                    break;
                                }
                            }
                            Ok(Decoded::NeedMore(n)) => {
                                // Move the partial PDU to the front once per read.
                                inbuf.drain(..consumed);
                                consumed = 0;
                                inbuf.reserve(n.saturating_sub(inbuf.len()));
                                break;
                            }
                            Err(e) => {
                                closing = Some(format!("bad PDU: {e}"));
                                term = Some(Pdu::C2HTermReq(super::pdu::TermReq {
                                    fes: e.fes,
                                    fei: e.fei,
                                    header: e.header,
                                }));
                                break;
                            }
                        }
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => { closing = Some(format!("read: {e}")); }
                }
            }
            Some((cid, c)) = crx.recv() => queue.on_complete(cid, c, &mut pending),
            w = stream.writable(), if !pending.is_empty() => {
                if let Err(e) = w {
                    closing = Some(format!("write: {e}"));
                }
            }
            _ = async { match &ctrl { Some(c) => c.events.notified().await, None => std::future::pending().await } }, if queue.is_admin() => {
                queue.deliver_events(&mut pending);
            }
            _ = changed(&mut killed) => {
                let why = killed.as_ref().and_then(|k| k.borrow().clone()).unwrap_or_default();
                closing = Some(format!("controller ended: {why}"));
            }
            _ = changed(&mut removed) => {
                closing = Some("subsystem unexported".into());
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
            _ = sleep_until(connect_wait) => {
                closing = Some(if ctrl.is_none() {
                    "no Fabrics Connect in time".into()
                } else {
                    "not authenticated in time".into()
                });
            }
            _ = shutdown.changed() => {
                closing = Some("target shutting down".into());
            }
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
        // I/O commands: those that need no waiting run here; their answers may let more
        // output out.
        while queue.has_work() {
            for (cid, job) in queue.take_work() {
                let inline = std::panic::catch_unwind(AssertUnwindSafe(|| job.run_nowait()))
                    .unwrap_or_else(|_| Some(panicked(cid)));
                match inline {
                    Some(c) => inline_done.push((cid, c)),
                    None => {
                        let ctx = ctx.clone();
                        tokio::task::spawn_blocking(move || {
                            let c = std::panic::catch_unwind(AssertUnwindSafe(|| job.run()))
                                .unwrap_or_else(|_| panicked(cid));
                            let _ = ctx.send((cid, c));
                        });
                    }
                }
            }
            for (cid, c) in inline_done.drain(..) {
                queue.on_complete(cid, c, &mut pending);
            }
        }
        while !pending.is_empty() {
            match stream.try_write_vectored(&pending.slices()) {
                Ok(0) => break,
                Ok(n) => pending.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    closing.get_or_insert_with(|| format!("write: {e}"));
                    break;
                }
            }
        }
        if let Some(why) = closing {
            tracing::info!("NVMe/TCP connection ends: {why}");
            if let Some(t) = term {
                queue.framer().encode(&t, pending.tail());
            }
            queue.on_close(&why);
            break;
        }
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        use tokio::io::AsyncWriteExt;
        let mut s = stream;
        while !pending.is_empty() {
            match s.write_vectored(&pending.slices()).await {
                Ok(0) | Err(_) => break,
                Ok(n) => pending.advance(n),
            }
        }
        let _ = s.shutdown().await;
    })
    .await;
}
