//! The tokio driver: accepts connections, moves bytes between sockets and the sans-IO login and
//! session state machines, and runs SCSI commands: those that complete without waiting (reads
//! from memory, writes the log takes in memory) right on the connection's task, the others on
//! blocking threads.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use super::login::{Login, Step};
use super::params::{OUR_MAX_RECV_DATA, SessionType};
use super::pdu::{DataOutHead, Decoded, DecodedRef, Framer, Pdu, PduError, op};
use super::session::{self, Output, Session};
use super::target::{Registry, SessionKey};
use crate::listener::Listener;
use crate::outq::OutQueue;
use crate::scsi;

/// A login that takes longer than this is abandoned.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections are pinged with NOP-In this often; two silent periods close them.
const PING_INTERVAL: Duration = Duration::from_secs(15);
/// Output bytes waiting for the socket above which a connection stops reading commands.
const MAX_PENDING_OUT: usize = 8 << 20;
/// How long an initiator asked to log out (unexport, shutdown) gets before we hang up.
const LOGOUT_GRACE: Duration = Duration::from_secs(3);

/// A running iSCSI target portal.
#[derive(Debug)]
pub struct IscsiServer {
    registry: Arc<Registry>,
    listener: Listener,
}

impl IscsiServer {
    /// Binds `listen` and starts accepting connections on the current tokio runtime.
    pub async fn bind(listen: &str, registry: Arc<Registry>) -> std::io::Result<IscsiServer> {
        let reg = registry.clone();
        let listener = Listener::bind(listen, move |stream, peer, shutdown| {
            let reg = reg.clone();
            async move {
                if let Err(e) = connection(stream, reg, shutdown).await {
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
    #[error("login timed out")]
    LoginTimeout,
}

/// The answer to a command whose execution panicked (a bug: logged, and the initiator gets
/// HARDWARE ERROR rather than a hung command or a dropped connection).
fn panicked(itt: u32) -> scsi::Response {
    tracing::error!(itt, "SCSI command panicked");
    scsi::Response::check(scsi::Sense::new(
        scsi::SenseKey::HardwareError,
        scsi::sense::Asc::INTERNAL_TARGET_FAILURE,
    ))
}

/// Most bytes one read takes beyond the PDU being completed.
const READ_AHEAD: usize = 32 << 10;

/// A PDU's data segment as the session gets it. A write command's immediate data goes into a
/// buffer with room for all its data (EDTL), which the command then keeps: the rest arrives
/// without reallocating, and the immediate part is not copied again.
fn pdu_data(p: &Pdu, data: &[u8]) -> Vec<u8> {
    let write = p.opcode() == op::SCSI_CMD && p.flags() & 0x20 != 0;
    let edtl = p.u32_at(20) as usize;
    if !write || edtl <= data.len() || edtl > session::MAX_WRITE as usize {
        return data.to_vec();
    }
    let mut buf = crate::bufpool::take_empty(edtl);
    buf.extend_from_slice(data);
    buf
}

/// Data-Out segments at least this long are read straight into their command's buffer.
const DIRECT_DATA_OUT: usize = 32 << 10;

/// A Data-Out being read straight into its command's buffer.
struct DirectDataOut {
    head: DataOutHead,
    /// The command's buffer (taken from the session), with the data read so far at its end.
    buf: Vec<u8>,
    /// Data bytes still to read.
    remaining: usize,
}

/// When `inbuf` holds the header and the first part of a large Data-Out's data (and nothing
/// else: the caller has decoded everything before it), moves that part into its command's
/// buffer and returns the direct read of the rest: the kernel then copies the data once,
/// into the buffer the pool writes from, instead of into `inbuf` and once more from there.
fn start_direct(
    framer: &Framer,
    inbuf: &mut Vec<u8>,
    session: &mut Session,
) -> Result<Option<DirectDataOut>, PduError> {
    let Some(head) = framer.data_out_head(inbuf)? else {
        return Ok(None);
    };
    if head.data_len < DIRECT_DATA_OUT {
        return Ok(None);
    }
    let Some(mut buf) = session.take_data_out_buffer(&head.pdu, head.data_len) else {
        return Ok(None);
    };
    let have = &inbuf[head.data_start..];
    buf.extend_from_slice(have);
    let remaining = head.data_len - have.len();
    inbuf.clear();
    Ok(Some(DirectDataOut {
        head,
        buf,
        remaining,
    }))
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

async fn connection(
    stream: TcpStream,
    reg: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    let (mut rd, mut wr) = stream.into_split();
    let mut inbuf: Vec<u8> = Vec::with_capacity(64 * 1024);

    // ---- login
    let framer = Framer::login();
    let mut login = Login::new();
    let deadline = Instant::now() + LOGIN_TIMEOUT;
    let logged_in = loop {
        let pdu =
            match tokio::time::timeout_at(deadline, read_pdu(&mut rd, &mut inbuf, &framer)).await {
                Err(_) => return Err(ConnError::LoginTimeout),
                Ok(r) => match r? {
                    Some(p) => p,
                    None => return Ok(()),
                },
            };
        let (resp, outcome) = match login.on_request(&pdu, &reg) {
            Step::Continue(resp) => (resp, None),
            Step::Complete(resp, li) => (resp, Some(Ok(li))),
            Step::Fail(resp, why) => (resp, Some(Err(why))),
        };
        if let Some(Err(why)) = &outcome {
            tracing::warn!("login refused: {why}");
        }
        let mut out = Vec::new();
        framer.encode(&resp, &mut out);
        wr.write_all(&out).await?;
        match outcome {
            None => {}
            Some(Ok(li)) => break li,
            Some(Err(_)) => {
                let _ = wr.shutdown().await;
                return Ok(());
            }
        }
    };

    // ---- full feature phase
    let params = logged_in.params;
    let target = logged_in.target;
    let span = tracing::info_span!(
        "iscsi_session",
        initiator = %params.initiator_name,
        target = params.target_name.as_deref().unwrap_or("(discovery)"),
        tsih = params.tsih,
    );
    async move {
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
        // Discovery sessions have neither; a receiver whose sender lives on never fires
        // (one whose sender is dropped would fire at once).
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

        // Output waiting for the socket. This task writes it itself, as far as the socket takes
        // it without waiting (no hand-off to another task per answer), and finishes it when
        // the socket becomes writable; it stops reading commands while more than
        // MAX_PENDING_OUT waits, so a peer that does not read cannot make us buffer without
        // bound.
        let mut pending = OutQueue::new();
        let (ctx, mut crx) = mpsc::unbounded_channel::<(u32, scsi::Response)>();
        let mut tick = tokio::time::interval(PING_INTERVAL);
        tick.reset();
        let mut hangup: Option<Instant> = None;
        let mut closing: Option<String> = None;
        let mut done_inline: Vec<(u32, scsi::Response)> = Vec::new();
        // Bytes of `inbuf` already decoded.
        let mut consumed = 0usize;
        // A large Data-Out whose data is being read straight into its command's buffer.
        let mut direct: Option<DirectDataOut> = None;
        // Padding after a directly read data segment, still to be dropped from the stream.
        let mut skip = 0usize;
        // Bytes still missing of the PDU at the front of `inbuf`.
        let mut need = 0usize;
        loop {
            tokio::select! {
                r = async {
                    match direct.as_mut() {
                        Some(d) => {
                            let mut room = (&mut d.buf).limit(d.remaining);
                            rd.read_buf(&mut room).await.map(|n| (n, true))
                        }
                        None => {
                            // A bounded read: a large Data-Out's header comes in with only the
                            // first part of its data, and the rest goes straight to its command.
                            let mut room = (&mut inbuf).limit(need.max(READ_AHEAD));
                            rd.read_buf(&mut room).await.map(|n| (n, false))
                        }
                    }
                }, if pending.len() < MAX_PENDING_OUT => {
                    match r {
                        Ok((0, _)) => { closing = Some("initiator closed the connection".into()); }
                        Ok((n, true)) => {
                            if let Some(mut d) = direct.take() {
                                d.remaining -= n;
                                if d.remaining == 0 {
                                    skip = d.head.pad;
                                    session.on_data_out_direct(&d.head.pdu, d.buf, d.head.data_len);
                                } else {
                                    direct = Some(d);
                                }
                            }
                        }
                        Ok((_, false)) => loop {
                            if skip > 0 {
                                let k = skip.min(inbuf.len() - consumed);
                                consumed += k;
                                skip -= k;
                            }
                            match framer.decode_ref(&inbuf[consumed..]) {
                                Ok(DecodedRef::Pdu(mut p, data, n)) => {
                                    let data = consumed + data.start..consumed + data.end;
                                    consumed += n;
                                    if p.opcode() == op::DATA_OUT {
                                        // Write data goes once, from here to its command.
                                        session.on_data_out_ref(&p, &inbuf[data]);
                                    } else {
                                        p.data = pdu_data(&p, &inbuf[data]);
                                        session.on_pdu(p);
                                    }
                                }
                                Ok(DecodedRef::NeedMore(n)) => {
                                    // Move the partial PDU to the front once per read, not
                                    // the rest of the buffer once per PDU.
                                    inbuf.drain(..consumed);
                                    consumed = 0;
                                    need = n.saturating_sub(inbuf.len());
                                    match start_direct(&framer, &mut inbuf, &mut session) {
                                        Ok(Some(d)) => direct = Some(d),
                                        Ok(None) => inbuf.reserve(need),
                                        Err(e) => {
                                            tracing::warn!("dropping the connection: {e}");
                                            closing = Some(e.to_string());
                                        }
                                    }
                                    break;
                                }
                                Err(e) => {
                                    tracing::warn!("dropping the connection: {e}");
                                    closing = Some(e.to_string());
                                    break;
                                }
                            }
                        },
                        Err(e) => { closing = Some(format!("read: {e}")); }
                    }
                }
                Some((itt, resp)) = crx.recv() => session.on_complete(itt, resp),
                w = wr.writable(), if !pending.is_empty() => {
                    if let Err(e) = w {
                        closing = Some(format!("write: {e}"));
                    }
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
                _ = async { match hangup { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    closing = Some("initiator did not log out in time".into());
                }
            }
            // Commands that complete without blocking (reads from memory, writes the log takes
            // in memory) run right here; their answers may let more output out, hence the loop.
            loop {
                let outs = session.drain();
                if outs.is_empty() {
                    break;
                }
                for o in outs {
                    match o {
                        Output::Send(p) => framer.encode(&p, pending.tail()),
                        Output::DataIn(d) => d.encode_into(&framer, &mut pending),
                        Output::Execute(exec) => {
                            let inline = std::panic::catch_unwind(AssertUnwindSafe(|| exec.run_nowait()))
                                .unwrap_or_else(|_| Some(panicked(exec.itt)));
                            match inline {
                                Some(resp) => done_inline.push((exec.itt, resp)),
                                None => {
                                    let ctx = ctx.clone();
                                    tokio::task::spawn_blocking(move || {
                                        let resp = std::panic::catch_unwind(AssertUnwindSafe(|| exec.run()))
                                            .unwrap_or_else(|_| panicked(exec.itt));
                                        let _ = ctx.send((exec.itt, resp));
                                    });
                                }
                            }
                        }
                        Output::Close(why) => {
                            closing.get_or_insert(why);
                        }
                    }
                }
                for (itt, resp) in done_inline.drain(..) {
                    session.on_complete(itt, resp);
                }
            }
            while !pending.is_empty() {
                match wr.try_write_vectored(&pending.slices()) {
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
                tracing::info!("session ends: {why}");
                break;
            }
        }
        // What is still waiting (a logout response, a last status) gets the grace period.
        let _ = tokio::time::timeout(LOGOUT_GRACE, async {
            while !pending.is_empty() {
                let n = wr.write_vectored(&pending.slices()).await?;
                if n == 0 {
                    break;
                }
                pending.advance(n);
            }
            wr.shutdown().await
        })
        .await;
        session.end();
        if let Some(k) = key {
            reg.unregister_session(&k, serial);
        }
    }
    .instrument(span)
    .await;
    Ok(())
}
