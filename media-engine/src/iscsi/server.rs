//! The tokio driver: accepts connections, moves bytes between sockets and the sans-IO login and
//! session state machines ([`Inbound`] for what comes in), and runs SCSI commands through the
//! connection's [`Flow`] (those that complete without waiting, reads from memory and writes the
//! log takes in memory, right on the connection's task, the others on blocking threads), which
//! also bounds what the connection holds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use super::inbound::Inbound;
use super::login::{LoggedIn, Login, Step};
use super::params::{CMD_WINDOW, OUR_MAX_RECV_DATA, SessionType};
use super::pdu::{Decoded, Framer, Pdu, PduError};
use super::session::{Exec, Output, Session};
use super::target::{Registry, SessionKey};
use crate::flow::{Budget, Flow, sleep_until};
use crate::listener::{Limits, Listener};

/// Idle connections are pinged with NOP-In this often; two silent periods close them.
const PING_INTERVAL: Duration = Duration::from_secs(15);
/// How long an initiator asked to log out (unexport, shutdown) gets before we hang up.
const LOGOUT_GRACE: Duration = Duration::from_secs(3);

/// A running iSCSI target portal.
#[derive(Debug)]
pub struct IscsiServer {
    registry: Arc<Registry>,
    listener: Listener,
}

impl IscsiServer {
    /// Binds `listen` with the default [`Limits`] and starts accepting connections on the
    /// current tokio runtime.
    pub async fn bind(listen: &str, registry: Arc<Registry>) -> std::io::Result<IscsiServer> {
        IscsiServer::bind_with(listen, registry, Limits::default()).await
    }

    /// Binds `listen`, admitting connections and bounding each as `limits` say (the
    /// handshake is the login).
    pub async fn bind_with(
        listen: &str,
        registry: Arc<Registry>,
        limits: Limits,
    ) -> std::io::Result<IscsiServer> {
        let reg = registry.clone();
        let listener = Listener::bind_with(listen, limits, move |stream, peer, shutdown| {
            let reg = reg.clone();
            async move {
                if let Err(e) = connection(stream, reg, limits, shutdown).await {
                    tracing::info!("connection ended: {e}");
                }
            }
            .instrument(tracing::info_span!("iscsi_conn", %peer))
        })
        .await?;
        tracing::info!(local_addr = %listener.local_addr(), "iSCSI target listening");
        Ok(IscsiServer { registry, listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Stops accepting, asks every session to log out, and returns once the listener is gone.
    pub async fn shutdown(self) {
        self.listener.shutdown().await;
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad PDU: {0}")]
    Pdu(#[from] PduError),
    #[error("no login within {0:?}")]
    LoginTimeout(Duration),
}

/// Reads until one PDU can be decoded; `None` at a clean end of stream.
async fn read_pdu(
    rd: &mut OwnedReadHalf,
    inbuf: &mut Vec<u8>,
    framer: &Framer,
) -> Result<Option<Pdu>, ConnError> {
    loop {
        match framer.decode(inbuf)? {
            Decoded::Pdu(p, n) => {
                inbuf.drain(..n);
                return Ok(Some(p));
            }
            Decoded::NeedMore(n) => {
                inbuf.reserve(n.saturating_sub(inbuf.len()));
                if rd.read_buf(inbuf).await? == 0 {
                    return Ok(None);
                }
            }
        }
    }
}

/// The login phase, which must end by `deadline`: the session's parameters, and the bytes
/// received after the last login PDU; `None` if the initiator went away or was refused.
async fn login(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    reg: &Registry,
    timeout: Duration,
) -> Result<Option<(LoggedIn, Vec<u8>)>, ConnError> {
    let mut inbuf: Vec<u8> = Vec::with_capacity(8 << 10);
    let framer = Framer::login();
    let mut login = Login::new();
    let deadline = Instant::now() + timeout;
    loop {
        let pdu = match tokio::time::timeout_at(deadline, read_pdu(rd, &mut inbuf, &framer)).await {
            Err(_) => return Err(ConnError::LoginTimeout(timeout)),
            Ok(r) => match r? {
                Some(p) => p,
                None => return Ok(None),
            },
        };
        let (resp, outcome) = match login.on_request(&pdu, reg) {
            Step::Continue(resp) => (resp, None),
            Step::Complete(resp, li) => (resp, Some(Ok(li))),
            Step::Fail(resp, why) => (resp, Some(Err(why))),
        };
        if let Some(Err(why)) = &outcome {
            tracing::warn!("login refused: {why}");
        }
        let mut out = Vec::new();
        framer.encode(&resp, &mut out);
        match tokio::time::timeout_at(deadline, wr.write_all(&out)).await {
            Err(_) => return Err(ConnError::LoginTimeout(timeout)),
            Ok(r) => r?,
        }
        match outcome {
            None => {}
            Some(Ok(li)) => return Ok(Some((*li, inbuf))),
            Some(Err(_)) => {
                let _ = wr.shutdown().await;
                return Ok(None);
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    reg: Arc<Registry>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    let (mut rd, mut wr) = stream.into_split();
    let Some((logged_in, received)) =
        login(&mut rd, &mut wr, &reg, limits.handshake_timeout).await?
    else {
        return Ok(());
    };
    let params = &logged_in.params;
    let span = tracing::info_span!(
        "iscsi_session",
        initiator = %params.initiator_name,
        target = params.target_name.as_deref().unwrap_or("(discovery)"),
        tsih = params.tsih,
    );
    let budget = Budget {
        bytes: limits.in_flight_bytes,
        commands: CMD_WINDOW as usize,
    };
    full_feature(
        rd,
        wr,
        logged_in,
        received,
        reg,
        local,
        (budget, limits.write_stall_timeout),
        shutdown,
    )
    .instrument(span)
    .await;
    Ok(())
}

/// Why the full feature phase ends.
type Closing = Option<String>;

/// Moves what the session has to say into the flow, runs the commands the budget lets start,
/// and hands the session the PDUs received, one at a time, while the budget allows.
fn pump(
    rx: &mut Inbound,
    session: &mut Session,
    flow: &mut Flow<Exec>,
    outs: &mut Vec<Output>,
    closing: &mut Closing,
) {
    loop {
        session.drain_into(outs);
        for o in outs.drain(..) {
            match o {
                Output::Send(p) => rx.framer().encode(&p, flow.out().tail()),
                Output::DataIn(d) => d.encode_into(rx.framer(), flow.out()),
                Output::Execute(exec) => flow.submit(exec),
                Output::Close(why) => {
                    closing.get_or_insert(why);
                }
            }
        }
        if let Some((itt, resp)) = flow.next_inline() {
            session.on_complete(itt, resp);
            continue;
        }
        if closing.is_some() || !flow.accepting() {
            return;
        }
        match rx.next(session) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!("dropping the connection: {e}");
                closing.get_or_insert(e.to_string());
                return;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn full_feature(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    logged_in: LoggedIn,
    received: Vec<u8>,
    reg: Arc<Registry>,
    local: SocketAddr,
    (budget, write_stall): (Budget, Duration),
    mut shutdown: watch::Receiver<bool>,
) {
    let LoggedIn { params, target } = logged_in;
    tracing::info!(
        header_digest = params.header_digest,
        data_digest = params.data_digest,
        max_burst = params.max_burst,
        first_burst = params.first_burst,
        immediate = params.immediate_data,
        initial_r2t = params.initial_r2t,
        "logged in"
    );
    let framer = Framer {
        header_digest: params.header_digest,
        data_digest: params.data_digest,
        max_recv_data: OUR_MAX_RECV_DATA as usize,
    };
    let key = (params.session_type == SessionType::Normal).then(|| SessionKey {
        initiator: params.initiator_name.clone(),
        isid: params.isid,
        target: params.target_name.clone().unwrap_or_default(),
    });
    // Discovery sessions have neither; a receiver whose sender lives on never fires (one whose
    // sender is dropped would fire at once).
    let (_never, never) = watch::channel(false);
    let (serial, mut reinstated) = match &key {
        Some(k) => reg.register_session(k.clone()),
        None => (0, never.clone()),
    };
    let mut removed = match &target {
        Some(t) => t.removed(),
        None => never,
    };
    let mut session = Session::new(params, target, reg.clone(), local.to_string());
    let mut rx = Inbound::new(framer, received);
    // Commands and output, under the connection's budget. This task writes the output itself,
    // as far as the socket takes it without waiting (no hand-off to another task per answer),
    // and finishes it when the socket becomes writable.
    let mut flow: Flow<Exec> = Flow::new(budget);
    let mut outs = Vec::new();
    let mut tick = tokio::time::interval(PING_INTERVAL);
    tick.reset();
    let mut hangup: Option<Instant> = None;
    let mut closing: Closing = None;
    loop {
        // What was received, what the session has to say, commands, and output, as far as
        // they go without waiting; then wait for something to happen.
        let step =
            |flow: &mut Flow<Exec>| pump(&mut rx, &mut session, flow, &mut outs, &mut closing);
        if let Err(e) = flow.drive(step, |s| wr.try_write_vectored(s)) {
            closing.get_or_insert_with(|| format!("write: {e}"));
        }
        if let Some(why) = closing {
            tracing::info!("session ends: {why}");
            break;
        }
        let stall = flow.stall_deadline(write_stall);
        tokio::select! {
            r = async { let mut room = rx.room(); rd.read_buf(&mut room).await }, if flow.accepting() && rx.wants_bytes() => match r {
                Ok(0) => { closing = Some("initiator closed the connection".into()); }
                Ok(n) => rx.received(n, &mut session),
                Err(e) => { closing = Some(format!("read: {e}")); }
            },
            (itt, resp) = flow.completed() => {
                session.on_complete(itt, resp);
                while let Some((itt, resp)) = flow.take_completed() {
                    session.on_complete(itt, resp);
                }
            }
            w = wr.writable(), if flow.has_output() => {
                if let Err(e) = w {
                    closing = Some(format!("write: {e}"));
                }
            }
            _ = sleep_until(stall) => {
                closing = Some(format!(
                    "the initiator read none of our output for {write_stall:?}"
                ));
            }
            _ = tick.tick() => session.on_tick(),
            Ok(()) = reinstated.changed() => {
                closing = Some("session reinstated by a new login".into());
            }
            Ok(()) = removed.changed(), if hangup.is_none() => {
                tracing::info!("target unexported; asking the initiator to log out");
                session.request_logout(LOGOUT_GRACE.as_secs() as u16);
                hangup = Some(Instant::now() + LOGOUT_GRACE);
            }
            Ok(()) = shutdown.changed(), if hangup.is_none() => {
                session.request_logout(LOGOUT_GRACE.as_secs() as u16);
                hangup = Some(Instant::now() + LOGOUT_GRACE);
            }
            _ = sleep_until(hangup) => {
                closing = Some("initiator did not log out in time".into());
            }
        }
    }
    // What is still waiting (a logout response, a last status) gets the grace period.
    flow.finish(&mut wr, LOGOUT_GRACE).await;
    session.end();
    if let Some(k) = key {
        reg.unregister_session(&k, serial);
    }
}
