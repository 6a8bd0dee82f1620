//! One NVMe/TCP queue on the target side (one TCP connection): the ICReq/ICResp exchange,
//! Fabrics Connect, command capsules with in-capsule data or R2T/H2CData transfers, and
//! C2HData/CapsuleResp answers, and the DH-HMAC-CHAP gate: on an export that requires in-band
//! authentication, the Connect response asks for it (AUTHREQ.ATR) and every command but
//! Authentication Send/Receive and Disconnect fails with Authentication Required until this
//! queue's transaction succeeds. Sans-IO: PDUs in, bytes into an [`OutQueue`] out, jobs (I/O,
//! and the authentication steps that compute Diffie-Hellman values) handed to the driver,
//! which hands their completions back.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use super::pdu::{DataPdu, Framer, IcResp, Pdu, R2t, TermReq, fes};
use crate::nvme::auth::{self, AuthState, QueueAuth};
use crate::nvme::controller::{AdminOutcome, Controller, KatoPolicy, Portal};
use crate::nvme::io::{IoJob, Target};
use crate::nvme::spec::{Completion, Cqe, DataPointer, Direction, Sqe, Status, admin, fctype, io};
use crate::nvme::subsystem::{ConnectRequest, Registry};
use crate::nvme::{IN_CAPSULE_DATA, MAX_TRANSFER};
use crate::outq::OutQueue;

/// Transport limits of a queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    /// Largest H2CData payload we take (ICResp MAXH2CDATA).
    pub max_h2c_data: u32,
    /// Largest C2HData payload we send.
    pub max_c2h_data: usize,
    /// Bytes of host data we ask for with R2Ts at once; further writes wait their turn, so a
    /// host cannot make us buffer more than this per connection.
    pub r2t_budget: usize,
    pub kato: KatoPolicy,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            // A whole MDTS-sized transfer in one PDU: its buffer is handed on, not copied.
            max_h2c_data: 1 << 20,
            max_c2h_data: 1 << 20,
            r2t_budget: 8 << 20,
            kato: KatoPolicy::default(),
        }
    }
}

impl QueueConfig {
    /// The largest data segment a PDU from the host may carry.
    pub fn max_pdu_data(&self) -> usize {
        (self.max_h2c_data as usize).max(IN_CAPSULE_DATA).max(8192)
    }
}

/// The connection must end: why, and the termination request to send first (if any).
#[derive(Debug)]
pub struct Fatal {
    pub why: String,
    pub term: Option<TermReq>,
}

impl Fatal {
    fn sequence(why: impl Into<String>, header: &[u8]) -> Fatal {
        Fatal {
            why: why.into(),
            term: Some(TermReq {
                fes: fes::PDU_SEQUENCE_ERROR,
                fei: 0,
                header: header.to_vec(),
            }),
        }
    }
}

#[derive(Debug)]
enum CmdState {
    /// Waiting for R2T budget.
    AwaitR2t { len: usize },
    /// Receiving H2CData.
    Receiving {
        buf: Vec<u8>,
        len: usize,
        digest_ok: bool,
    },
    /// Handed to the driver or held (an AER).
    Running,
}

#[derive(Debug)]
struct Cmd {
    sqe: Sqe,
    state: CmdState,
}

/// Work the driver runs, on the connection's task when it needs no waiting, else on a blocking
/// thread; its completion comes back through [`Queue::on_complete`].
#[derive(Debug)]
pub enum Job {
    Io(IoJob),
    Auth(AuthJob),
}

impl Job {
    /// Starts the work on the connection's task (see [`crate::flow::Job::start`]): an
    /// authentication step completes here unless it is costly (modular exponentiation).
    pub fn start(&self) -> crate::flow::Start<Completion> {
        match self {
            Job::Io(j) => j.start(),
            Job::Auth(j) if !j.costly() => crate::flow::Start::Done(j.run()),
            Job::Auth(_) => crate::flow::Start::Blocking,
        }
    }
    /// Runs the work here, whatever it waits for (tests and tools).
    #[cfg(test)]
    pub fn run_here(self) -> Completion {
        match self.start() {
            crate::flow::Start::Done(c) => c,
            crate::flow::Start::Future(f) => maas_pool::aio::block_on(f),
            crate::flow::Start::Blocking => self.run(),
        }
    }
    pub fn run(self) -> Completion {
        match self {
            Job::Io(j) => j.run(),
            Job::Auth(j) => j.run(),
        }
    }
}

/// One Authentication Send or Receive on a queue's DH-HMAC-CHAP state.
#[derive(Debug)]
pub struct AuthJob {
    state: Arc<Mutex<QueueAuth>>,
    /// Send: the message. Receive: None.
    send: Option<Vec<u8>>,
    /// Receive: the allocation length.
    al: usize,
}

impl AuthJob {
    /// Whether it computes a Diffie-Hellman value (milliseconds of CPU: not on the network
    /// task).
    fn costly(&self) -> bool {
        let st = self.state.lock();
        match &self.send {
            Some(m) => st.send_is_costly(m),
            None => st.receive_is_costly(),
        }
    }

    fn run(&self) -> Completion {
        let mut st = self.state.lock();
        match &self.send {
            Some(m) => {
                st.send(m);
                Completion::ok()
            }
            None => {
                let mut m = st.receive();
                if m.len() > self.al {
                    // The host's buffer cannot hold the message: the transaction cannot go on.
                    st.abort(auth::reason::INCORRECT_PAYLOAD);
                    return Completion::status(Status::INVALID_FIELD);
                }
                m.resize(self.al, 0);
                Completion::data(m)
            }
        }
    }
}

/// Where this queue stands with in-band authentication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    /// The export requires none.
    Open,
    Pending,
    Authenticated,
    Failed,
}

#[derive(Debug, PartialEq, Eq)]
enum Stage {
    AwaitIcReq,
    Ready,
}

/// The state of one queue.
pub struct Queue {
    registry: Arc<Registry>,
    portal: Portal,
    cfg: QueueConfig,
    framer: Framer,
    stage: Stage,
    ctrl: Option<Arc<Controller>>,
    qid: u16,
    /// Submission queue size, 0-based.
    sqsize: u16,
    sqhd: u16,
    sq_flow_control: bool,
    inflight: HashMap<u16, Cmd>,
    r2t_waiting: VecDeque<u16>,
    r2t_bytes: usize,
    work: Vec<(u16, Job)>,
    auth: Option<Arc<Mutex<QueueAuth>>>,
    gate: Gate,
    /// The Authentication Send/Receive being run (one at a time).
    auth_cid: Option<u16>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("qid", &self.qid)
            .field("ctrl", &self.ctrl)
            .field("inflight", &self.inflight.len())
            .finish()
    }
}

impl Queue {
    pub fn new(registry: Arc<Registry>, portal: Portal, cfg: QueueConfig) -> Queue {
        Queue {
            registry,
            portal,
            cfg,
            framer: Framer::initial(cfg.max_pdu_data()),
            stage: Stage::AwaitIcReq,
            ctrl: None,
            qid: 0,
            sqsize: 0,
            sqhd: 0,
            sq_flow_control: true,
            inflight: HashMap::new(),
            r2t_waiting: VecDeque::new(),
            r2t_bytes: 0,
            work: Vec::new(),
            auth: None,
            gate: Gate::Open,
            auth_cid: None,
        }
    }

    /// Connected, and authenticated where the export requires it: the queue is in use.
    pub fn is_ready(&self) -> bool {
        self.ctrl.is_some() && matches!(self.gate, Gate::Open | Gate::Authenticated)
    }

    /// How to frame what comes next (digests change after the IC exchange).
    pub fn framer(&self) -> &Framer {
        &self.framer
    }

    /// The controller this queue belongs to, once connected.
    pub fn controller(&self) -> Option<&Arc<Controller>> {
        self.ctrl.as_ref()
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    pub fn is_admin(&self) -> bool {
        self.ctrl.is_some() && self.qid == 0
    }

    /// Jobs to run; each one's completion goes back through [`Queue::on_complete`].
    pub fn take_work(&mut self) -> Vec<(u16, Job)> {
        std::mem::take(&mut self.work)
    }

    pub fn has_work(&self) -> bool {
        !self.work.is_empty()
    }

    /// Handles one PDU from the host.
    pub fn on_pdu(&mut self, pdu: Pdu, out: &mut OutQueue) -> Result<(), Fatal> {
        match (&self.stage, pdu) {
            (Stage::AwaitIcReq, Pdu::IcReq(req)) => {
                if req.pfv != 0 {
                    return Err(Fatal {
                        why: format!("unsupported PDU format version {}", req.pfv),
                        term: Some(TermReq {
                            fes: fes::UNSUPPORTED_PARAMETER,
                            fei: 8,
                            header: Vec::new(),
                        }),
                    });
                }
                if req.hpda > 31 {
                    return Err(Fatal {
                        why: format!("host PDU data alignment {}", req.hpda),
                        term: Some(TermReq {
                            fes: fes::INVALID_HEADER_FIELD,
                            fei: 10,
                            header: Vec::new(),
                        }),
                    });
                }
                let resp = IcResp {
                    pfv: 0,
                    cpda: 0,
                    header_digest: req.header_digest,
                    data_digest: req.data_digest,
                    maxh2cdata: self.cfg.max_h2c_data,
                };
                self.framer.encode(&Pdu::IcResp(resp), out.tail());
                self.framer.header_digest = req.header_digest;
                self.framer.data_digest = req.data_digest;
                self.framer.data_align = (usize::from(req.hpda) + 1) * 4;
                self.stage = Stage::Ready;
                Ok(())
            }
            (Stage::AwaitIcReq, _) => Err(Fatal::sequence("a PDU before ICReq", &[])),
            (
                Stage::Ready,
                Pdu::CapsuleCmd {
                    sqe,
                    data,
                    digest_ok,
                },
            ) => self.on_capsule(sqe, data, digest_ok, out),
            (Stage::Ready, Pdu::H2CData(d)) => self.on_h2c_data(d, out),
            (Stage::Ready, Pdu::H2CTermReq(t)) => Err(Fatal {
                why: format!("host terminated the connection (fes {:#x})", t.fes),
                term: None,
            }),
            (Stage::Ready, other) => Err(Fatal::sequence(
                format!("unexpected PDU from the host: {}", pdu_name(&other)),
                &[],
            )),
        }
    }

    fn on_capsule(
        &mut self,
        sqe: Sqe,
        data: Vec<u8>,
        digest_ok: bool,
        out: &mut OutQueue,
    ) -> Result<(), Fatal> {
        let cid = sqe.cid();
        let depth = if self.ctrl.is_some() {
            usize::from(self.sqsize) + 1
        } else {
            1
        };
        if self.inflight.len() >= depth {
            return Err(Fatal::sequence(
                format!("more than {depth} commands outstanding"),
                &sqe.0,
            ));
        }
        if self.inflight.contains_key(&cid) {
            return Err(Fatal::sequence(
                format!("command id {cid} already in use"),
                &sqe.0,
            ));
        }
        if self.ctrl.is_some() {
            self.sqhd = (self.sqhd + 1) % (self.sqsize + 1);
        }
        self.inflight.insert(
            cid,
            Cmd {
                sqe,
                state: CmdState::Running,
            },
        );
        if !digest_ok {
            self.complete(cid, Completion::status(Status::DATA_TRANSFER_ERROR), out);
            return Ok(());
        }
        let dp = sqe.data_pointer();
        let dir = sqe.direction();
        let refuse = |q: &mut Queue, s: Status, out: &mut OutQueue| {
            q.complete(cid, Completion::status(s), out);
            Ok(())
        };
        match (dir, dp) {
            (_, DataPointer::Unsupported) => refuse(self, Status::SGL_TYPE_INVALID, out),
            (
                Direction::HostToController | Direction::Both,
                DataPointer::InCapsule { offset, len },
            ) => {
                let (offset, len) = (offset as usize, len as usize);
                if len > IN_CAPSULE_DATA.max(8192) || offset.saturating_add(len) > data.len() {
                    return refuse(self, Status::SGL_LENGTH_INVALID, out);
                }
                let data = if offset == 0 && len == data.len() {
                    data
                } else {
                    data[offset..offset + len].to_vec()
                };
                self.dispatch(cid, sqe, data, out);
                Ok(())
            }
            (Direction::HostToController | Direction::Both, DataPointer::Transport { len }) => {
                let len = len as usize;
                if !data.is_empty() || len > MAX_TRANSFER {
                    return refuse(self, Status::SGL_LENGTH_INVALID, out);
                }
                if let Some(c) = self.inflight.get_mut(&cid) {
                    c.state = CmdState::AwaitR2t { len };
                }
                self.r2t_waiting.push_back(cid);
                self.pump_r2t(out);
                Ok(())
            }
            (Direction::ControllerToHost, DataPointer::InCapsule { .. }) => {
                refuse(self, Status::SGL_TYPE_INVALID, out)
            }
            _ => {
                self.dispatch(cid, sqe, data, out);
                Ok(())
            }
        }
    }

    /// Sends R2Ts to waiting commands as far as the budget allows (always at least one, so a
    /// transfer larger than the budget still goes).
    fn pump_r2t(&mut self, out: &mut OutQueue) {
        while let Some(&cid) = self.r2t_waiting.front() {
            let len = match self.inflight.get(&cid) {
                Some(Cmd {
                    state: CmdState::AwaitR2t { len },
                    ..
                }) => *len,
                _ => {
                    self.r2t_waiting.pop_front();
                    continue;
                }
            };
            if self.r2t_bytes > 0 && self.r2t_bytes + len > self.cfg.r2t_budget {
                return;
            }
            self.r2t_waiting.pop_front();
            self.r2t_bytes += len;
            if let Some(c) = self.inflight.get_mut(&cid) {
                c.state = CmdState::Receiving {
                    buf: Vec::with_capacity(len),
                    len,
                    digest_ok: true,
                };
            }
            let r2t = R2t {
                cccid: cid,
                ttag: cid,
                offset: 0,
                len: len as u32,
            };
            self.framer.encode(&Pdu::R2t(r2t), out.tail());
        }
    }

    fn on_h2c_data(&mut self, d: DataPdu, out: &mut OutQueue) -> Result<(), Fatal> {
        let cid = d.ttag;
        let max = self.cfg.max_h2c_data as usize;
        let cmd = match self.inflight.get_mut(&cid) {
            Some(c) if d.cccid == cid => c,
            _ => {
                return Err(Fatal::sequence(
                    format!("H2CData for unknown transfer tag {}", d.ttag),
                    &[],
                ));
            }
        };
        let CmdState::Receiving {
            buf,
            len,
            digest_ok,
        } = &mut cmd.state
        else {
            return Err(Fatal::sequence(
                format!("H2CData for command {cid}, which asked for none"),
                &[],
            ));
        };
        if d.offset as usize != buf.len() || buf.len() + d.data.len() > *len || d.data.len() > max {
            return Err(Fatal {
                why: format!(
                    "H2CData at {} (+{}) for a transfer of {len} at {}",
                    d.offset,
                    d.data.len(),
                    buf.len()
                ),
                term: Some(TermReq {
                    fes: fes::DATA_OUT_OF_RANGE,
                    fei: 12,
                    header: Vec::new(),
                }),
            });
        }
        if buf.is_empty() && d.data.len() == *len {
            *buf = d.data;
        } else {
            buf.extend_from_slice(&d.data);
        }
        *digest_ok &= d.digest_ok;
        if buf.len() < *len {
            return Ok(());
        }
        let (data, ok, len) = (std::mem::take(buf), *digest_ok, *len);
        let sqe = cmd.sqe;
        cmd.state = CmdState::Running;
        self.r2t_bytes -= len.min(self.r2t_bytes);
        self.pump_r2t(out);
        if ok {
            self.dispatch(cid, sqe, data, out);
        } else {
            self.complete(cid, Completion::status(Status::DATA_TRANSFER_ERROR), out);
        }
        Ok(())
    }

    /// Runs or hands off a command whose data (if any) has arrived.
    fn dispatch(&mut self, cid: u16, sqe: Sqe, data: Vec<u8>, out: &mut OutQueue) {
        if sqe.fuse() != 0 {
            return self.complete(cid, Completion::status(Status::INVALID_FIELD), out);
        }
        let ctrl = match (&self.ctrl, sqe.opcode(), sqe.fctype()) {
            (None, admin::FABRICS, fctype::CONNECT) => {
                let c = self.connect(&sqe, &data);
                return self.complete(cid, c, out);
            }
            (None, _, _) => {
                return self.complete(cid, Completion::status(Status::COMMAND_SEQUENCE_ERROR), out);
            }
            (Some(c), _, _) => c.clone(),
        };
        if sqe.opcode() == admin::FABRICS
            && matches!(sqe.fctype(), fctype::AUTH_SEND | fctype::AUTH_RECEIVE)
        {
            ctrl.keep_alive();
            return self.auth_command(cid, &sqe, data, out);
        }
        if matches!(self.gate, Gate::Pending | Gate::Failed)
            && !(sqe.opcode() == admin::FABRICS && sqe.fctype() == fctype::DISCONNECT)
        {
            return self.complete(cid, Completion::status(Status::AUTH_REQUIRED), out);
        }
        if self.qid == 0 {
            match ctrl.admin(&sqe, &data, &self.portal) {
                AdminOutcome::Done(c) => self.complete(cid, c, out),
                AdminOutcome::Held => {}
            }
            self.deliver_events(out);
            return;
        }
        if sqe.opcode() == admin::FABRICS {
            let c = match sqe.fctype() {
                fctype::DISCONNECT => Completion::ok(),
                fctype::CONNECT => Completion::status(Status::COMMAND_SEQUENCE_ERROR),
                _ => Completion::status(Status::INVALID_OPCODE),
            };
            return self.complete(cid, c, out);
        }
        ctrl.keep_alive();
        let nsid = sqe.nsid();
        let target = if sqe.opcode() == io::FLUSH && nsid == 0xffff_ffff {
            match ctrl.subsystem() {
                Some(s) => Target::All(s.config.namespaces.values().cloned().collect()),
                None => Target::All(Vec::new()),
            }
        } else {
            match ctrl.namespace(nsid) {
                Some(ns) => Target::One(ns.clone()),
                None => {
                    return self.complete(cid, Completion::status(Status::INVALID_NAMESPACE), out);
                }
            }
        };
        // The transfer the SGL describes must be what the command moves.
        if let Target::One(ns) = &target
            && matches!(sqe.opcode(), io::READ | io::WRITE)
        {
            let want = sqe.blocks() * u64::from(ns.dev.block_size());
            let have = match sqe.data_pointer() {
                DataPointer::InCapsule { len, .. } | DataPointer::Transport { len } => {
                    u64::from(len)
                }
                _ => 0,
            };
            if want != have {
                return self.complete(cid, Completion::status(Status::SGL_LENGTH_INVALID), out);
            }
        }
        self.work.push((
            cid,
            Job::Io(IoJob {
                target,
                sqe,
                data,
                write_cache: ctrl.write_cache(),
            }),
        ));
    }

    /// Authentication Send/Receive (NVMe over Fabrics; SECP E9h: DH-HMAC-CHAP).
    fn auth_command(&mut self, cid: u16, sqe: &Sqe, data: Vec<u8>, out: &mut OutQueue) {
        let Some(state) = self.auth.clone() else {
            // Nothing to authenticate on this export.
            return self.complete(cid, Completion::status(Status::INVALID_OPCODE), out);
        };
        let cdw10 = sqe.cdw(10);
        let (spsp0, spsp1, secp) = ((cdw10 >> 8) as u8, (cdw10 >> 16) as u8, (cdw10 >> 24) as u8);
        let len = sqe.cdw(11) as usize;
        if secp != auth::SECP_DHCHAP || spsp0 != 1 || spsp1 != 1 || len == 0 {
            return self.complete(cid, Completion::status(Status::INVALID_FIELD), out);
        }
        if self.auth_cid.is_some() {
            return self.complete(cid, Completion::status(Status::COMMAND_SEQUENCE_ERROR), out);
        }
        let job = if sqe.fctype() == fctype::AUTH_SEND {
            if len > auth::MAX_SEND {
                return self.complete(cid, Completion::status(Status::INVALID_FIELD), out);
            }
            if data.len() != len {
                return self.complete(cid, Completion::status(Status::SGL_LENGTH_INVALID), out);
            }
            AuthJob {
                state,
                send: Some(data),
                al: 0,
            }
        } else {
            if len > auth::MAX_RECEIVE {
                return self.complete(cid, Completion::status(Status::INVALID_FIELD), out);
            }
            if sqe.data_pointer() != (DataPointer::Transport { len: len as u32 }) {
                return self.complete(cid, Completion::status(Status::SGL_LENGTH_INVALID), out);
            }
            AuthJob {
                state,
                send: None,
                al: len,
            }
        };
        self.auth_cid = Some(cid);
        self.work.push((cid, Job::Auth(job)));
    }

    /// After an authentication step: where the queue stands now, and what follows from it.
    fn auth_step_done(&mut self) {
        self.auth_cid = None;
        let Some(state) = &self.auth else {
            return;
        };
        let (now, finished, (hash, group), bidi) = {
            let st = state.lock();
            (st.state(), st.finished(), st.negotiated(), st.bidirectional)
        };
        let Some(ctrl) = self.ctrl.clone() else {
            return;
        };
        match now {
            AuthState::Authenticated if self.gate != Gate::Authenticated => {
                self.gate = Gate::Authenticated;
                if self.qid == 0 {
                    tracing::info!(
                        cntlid = ctrl.cntlid,
                        hostnqn = %ctrl.hostnqn,
                        hash = hash.name(),
                        dhgroup = group.name(),
                        bidirectional = bidi,
                        "NVMe host authenticated (DH-HMAC-CHAP)"
                    );
                } else {
                    tracing::debug!(
                        cntlid = ctrl.cntlid,
                        qid = self.qid,
                        "NVMe queue authenticated"
                    );
                }
            }
            AuthState::Failed(why) if finished && self.gate != Gate::Failed => {
                self.gate = Gate::Failed;
                tracing::warn!(
                    cntlid = ctrl.cntlid,
                    qid = self.qid,
                    hostnqn = %ctrl.hostnqn,
                    subnqn = %ctrl.subsystem_nqn(),
                    "NVMe authentication failed: {}",
                    auth::reason::describe(why)
                );
                // Fail closed: a failed admin queue ends its controller (as nvmet does).
                if self.qid == 0 {
                    self.registry
                        .remove_controller(ctrl.cntlid, "DH-HMAC-CHAP authentication failed");
                }
            }
            _ => {}
        }
    }

    fn connect(&mut self, sqe: &Sqe, data: &[u8]) -> Completion {
        let req = match ConnectRequest::parse(sqe, data) {
            Ok(r) => r,
            Err(r) => {
                tracing::warn!("NVMe connect refused: {}", r.why());
                return Completion {
                    dw0: r.dw0,
                    ..Completion::status(r.status)
                };
            }
        };
        match self.registry.connect(&req, self.cfg.kato) {
            Ok(ctrl) => {
                self.qid = req.qid;
                self.sqsize = req.sqsize;
                self.sq_flow_control = !req.disable_sq_flow_control;
                // Count the Connect itself.
                self.sqhd = 1 % (self.sqsize + 1);
                if req.qid == 0 {
                    ctrl.keep_alive();
                    tracing::info!(
                        cntlid = ctrl.cntlid,
                        hostnqn = %req.hostnqn,
                        subnqn = %req.subnqn,
                        kato_ms = ctrl.kato_ms(),
                        "NVMe controller created"
                    );
                } else {
                    tracing::debug!(cntlid = ctrl.cntlid, qid = req.qid, "I/O queue connected");
                }
                let cntlid = ctrl.cntlid;
                let dhchap = ctrl.subsystem().and_then(|s| s.config.dhchap.clone());
                self.ctrl = Some(ctrl);
                match dhchap {
                    Some(cfg) => {
                        self.auth = Some(Arc::new(Mutex::new(QueueAuth::new(
                            cfg,
                            &req.hostnqn,
                            &req.subnqn,
                        ))));
                        self.gate = Gate::Pending;
                        // AUTHREQ.ATR: an authentication transaction is required.
                        Completion::dw0(u32::from(cntlid) | (1 << 17))
                    }
                    None => Completion::dw0(u32::from(cntlid)),
                }
            }
            Err(r) => {
                tracing::warn!(
                    hostnqn = %req.hostnqn,
                    subnqn = %req.subnqn,
                    qid = req.qid,
                    status = ?r.status,
                    "NVMe connect refused: {}",
                    r.why()
                );
                Completion {
                    dw0: r.dw0,
                    ..Completion::status(r.status)
                }
            }
        }
    }

    /// Completes held AERs with pending events (admin queue).
    pub fn deliver_events(&mut self, out: &mut OutQueue) {
        if !self.is_admin() {
            return;
        }
        let Some(ctrl) = self.ctrl.clone() else {
            return;
        };
        for (cid, dw0) in ctrl.take_event_completions() {
            self.complete(cid, Completion::dw0(dw0), out);
        }
    }

    /// Sends a command's answer: its data (C2HData) and its completion (CapsuleResp, or the
    /// SUCCESS flag on the last C2HData when the host disabled SQ flow control).
    pub fn on_complete(&mut self, cid: u16, c: Completion, out: &mut OutQueue) {
        self.complete(cid, c, out);
    }

    fn complete(&mut self, cid: u16, c: Completion, out: &mut OutQueue) {
        let Some(cmd) = self.inflight.remove(&cid) else {
            return;
        };
        if self.auth_cid == Some(cid) {
            self.auth_step_done();
        }
        let xfer = match cmd.sqe.data_pointer() {
            DataPointer::Transport { len }
                if cmd.sqe.direction() != Direction::HostToController =>
            {
                len as usize
            }
            _ => 0,
        };
        if let Some(data) = c
            .data
            .as_ref()
            .filter(|_| c.status.is_success() && xfer > 0)
        {
            let len = xfer.min(data.len());
            let success_flag = !self.sq_flow_control;
            self.framer
                .encode_c2h(cid, data, len, self.cfg.max_c2h_data, success_flag, out);
            if success_flag {
                return;
            }
        }
        let cqe = Cqe {
            dw0: c.dw0,
            dw1: c.dw1,
            sqhd: if self.sq_flow_control {
                self.sqhd
            } else {
                0xffff
            },
            sqid: self.qid,
            cid,
            status: c.status,
        };
        self.framer.encode(&Pdu::CapsuleResp(cqe), out.tail());
    }

    /// The connection is gone: an admin queue takes its controller with it.
    pub fn on_close(&mut self, why: &str) {
        if let Some(ctrl) = self.ctrl.take() {
            if self.qid == 0 {
                self.registry.remove_controller(ctrl.cntlid, why);
            } else {
                ctrl.detach_io_queue(self.qid);
            }
        }
    }
}

fn pdu_name(p: &Pdu) -> &'static str {
    match p {
        Pdu::IcReq(_) => "ICReq",
        Pdu::IcResp(_) => "ICResp",
        Pdu::H2CTermReq(_) => "H2CTermReq",
        Pdu::C2HTermReq(_) => "C2HTermReq",
        Pdu::CapsuleCmd { .. } => "CapsuleCmd",
        Pdu::CapsuleResp(_) => "CapsuleResp",
        Pdu::H2CData(_) => "H2CData",
        Pdu::C2HData(_) => "C2HData",
        Pdu::R2t(_) => "R2T",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::spec::{Cqe, put_str};
    use crate::nvme::subsystem::{Namespace, NamespaceIdentity, SubsystemConfig};
    use crate::nvme::tcp::pdu::{Decoded, IcReq};
    use crate::nvme::testdisk::RamDisk;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const SUB: &str = "nqn.test:sub";
    const HOST: &str = "nqn.test:host";

    fn queue() -> (Arc<Registry>, Queue) {
        queue_with(None)
    }

    fn queue_with(dhchap: Option<Arc<auth::DhchapConfig>>) -> (Arc<Registry>, Queue) {
        let reg = Arc::new(Registry::new(None));
        reg.add(SubsystemConfig {
            nqn: SUB.into(),
            hosts: vec![HOST.into()],
            namespaces: BTreeMap::from([(
                1,
                Arc::new(Namespace::new(
                    Arc::new(RamDisk::new(1 << 20)),
                    false,
                    NamespaceIdentity::from_volume_id("z"),
                )),
            )]),
            serial: "s".into(),
            model: "m".into(),
            dhchap,
        });
        let q = Queue::new(
            reg.clone(),
            Portal::parse("127.0.0.1:4420"),
            QueueConfig::default(),
        );
        (reg, q)
    }

    fn connect_capsule(cid: u16, qid: u16, cntlid: u16) -> Pdu {
        let mut sqe = Sqe::new(admin::FABRICS, cid, 0);
        sqe.0[4] = fctype::CONNECT;
        sqe.set_cdw(10, u32::from(qid) << 16);
        sqe.set_cdw(11, 31);
        sqe.set_data_pointer(DataPointer::InCapsule {
            offset: 0,
            len: 1024,
        });
        let mut data = vec![0u8; 1024];
        crate::nvme::spec::put16(&mut data, 16, cntlid);
        put_str(&mut data, 256, 256, SUB, 0);
        put_str(&mut data, 512, 256, HOST, 0);
        Pdu::CapsuleCmd {
            sqe,
            data,
            digest_ok: true,
        }
    }

    fn ic() -> Pdu {
        Pdu::IcReq(IcReq {
            pfv: 0,
            hpda: 0,
            header_digest: false,
            data_digest: false,
            maxr2t: 0,
        })
    }

    /// Everything the queue wrote, decoded.
    fn sent(q: &Queue, out: &mut OutQueue) -> Vec<Pdu> {
        let bytes = out.take_all();
        let mut at = 0;
        let mut v = Vec::new();
        let f = Framer {
            max_data: 1 << 21,
            ..*q.framer()
        };
        while at < bytes.len() {
            match f.decode(&bytes[at..]) {
                Ok(Decoded::Pdu(p, n)) => {
                    v.push(p);
                    at += n;
                }
                other => panic!("undecodable output at {at}: {other:?}"),
            }
        }
        v
    }

    fn resp(p: &Pdu) -> Cqe {
        match p {
            Pdu::CapsuleResp(c) => *c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_write_without_in_capsule_data_gets_an_r2t_and_completes_after_the_data() {
        let (_reg, mut q) = queue();
        let mut out = OutQueue::new();
        q.on_pdu(ic(), &mut out).unwrap();
        q.on_pdu(connect_capsule(1, 0, 0xffff), &mut out).unwrap();
        let cntlid = {
            let v = sent(&q, &mut out);
            assert!(matches!(v[0], Pdu::IcResp(_)));
            let c = resp(&v[1]);
            assert!(c.status.is_success(), "{c:?}");
            c.dw0 as u16
        };
        q.controller().unwrap().set_property_for_test_enable();
        let mut ioq = Queue::new(
            q.registry.clone(),
            Portal::parse("127.0.0.1:4420"),
            QueueConfig::default(),
        );
        ioq.on_pdu(ic(), &mut out).unwrap();
        ioq.on_pdu(connect_capsule(1, 1, cntlid), &mut out).unwrap();
        assert!(resp(&sent(&ioq, &mut out)[1]).status.is_success());
        let mut w = Sqe::new(io::WRITE, 7, 1);
        w.set_cdw(12, 7);
        w.set_data_pointer(DataPointer::Transport { len: 4096 });
        ioq.on_pdu(
            Pdu::CapsuleCmd {
                sqe: w,
                data: vec![],
                digest_ok: true,
            },
            &mut out,
        )
        .unwrap();
        let r2t = match &sent(&ioq, &mut out)[..] {
            [Pdu::R2t(r)] => *r,
            other => panic!("{other:?}"),
        };
        assert_eq!((r2t.cccid, r2t.offset, r2t.len), (7, 0, 4096));
        for (off, last) in [(0u32, false), (2048, true)] {
            ioq.on_pdu(
                Pdu::H2CData(DataPdu {
                    cccid: 7,
                    ttag: r2t.ttag,
                    offset: off,
                    last,
                    success: false,
                    data: vec![1; 2048],
                    digest_ok: true,
                }),
                &mut out,
            )
            .unwrap();
        }
        let work = ioq.take_work();
        assert_eq!(work.len(), 1);
        assert!(matches!(&work[0].1, Job::Io(j) if j.data.len() == 4096));
        let (cid, job) = work.into_iter().next().unwrap();
        ioq.on_complete(cid, job.run(), &mut out);
        let c = resp(&sent(&ioq, &mut out)[0]);
        assert_eq!((c.cid, c.sqid), (7, 1));
        assert!(c.status.is_success());
        // Closing the admin queue ends the controller.
        q.on_close("test");
        assert!(ioq.controller().unwrap().killed().is_some());
    }

    fn arb_sqe() -> impl Strategy<Value = Sqe> {
        (
            prop::sample::select(vec![
                0x00u8, 0x01, 0x02, 0x06, 0x08, 0x09, 0x0a, 0x0c, 0x18, 0x7f, 0x55,
            ]),
            0u16..8,
            prop::sample::select(vec![0u32, 1, 2, 0xffff_ffff]),
            prop::collection::vec(any::<u32>(), 6),
            prop::sample::select(vec![0u8, 1, 4, 5, 6, 8]),
            prop::sample::select(vec![
                DataPointer::None,
                DataPointer::InCapsule {
                    offset: 0,
                    len: 512,
                },
                DataPointer::InCapsule {
                    offset: 7,
                    len: 1 << 30,
                },
                DataPointer::Transport { len: 4096 },
                DataPointer::Transport { len: u32::MAX },
                DataPointer::Unsupported,
            ]),
        )
            .prop_map(|(op, cid, nsid, cdws, fct, dp)| {
                let mut s = Sqe::new(op, cid, nsid);
                if op == admin::FABRICS {
                    s.0[4] = fct;
                }
                for (i, v) in cdws.into_iter().enumerate() {
                    s.set_cdw(10 + i, v);
                }
                s.set_data_pointer(dp);
                s
            })
    }

    fn arb_pdu() -> impl Strategy<Value = Pdu> {
        prop_oneof![
            Just(ic()),
            Just(connect_capsule(1, 0, 0xffff)),
            Just(connect_capsule(2, 1, 1)),
            (
                arb_sqe(),
                prop::collection::vec(any::<u8>(), 0..2048),
                any::<bool>()
            )
                .prop_map(|(sqe, data, digest_ok)| Pdu::CapsuleCmd {
                    sqe,
                    data,
                    digest_ok
                }),
            (
                0u16..8,
                0u16..8,
                0u32..8192,
                prop::collection::vec(any::<u8>(), 1..4096),
                any::<bool>()
            )
                .prop_map(|(cccid, ttag, offset, data, last)| Pdu::H2CData(DataPdu {
                    cccid,
                    ttag,
                    offset,
                    last,
                    success: false,
                    data,
                    digest_ok: true,
                })),
            Just(Pdu::R2t(R2t {
                cccid: 1,
                ttag: 1,
                offset: 0,
                len: 1
            })),
            Just(Pdu::H2CTermReq(TermReq {
                fes: 1,
                fei: 0,
                header: vec![]
            })),
        ]
    }

    proptest! {
        /// Whatever a host sends, in whatever order: no panic, output stays decodable and
        /// bounded, and a fatal error ends the connection cleanly.
        #[test]
        fn hostile_pdu_sequences_never_panic(pdus in prop::collection::vec(arb_pdu(), 1..40)) {
            let (reg, mut q) = queue();
            let mut out = OutQueue::new();
            for p in pdus {
                let r = q.on_pdu(p, &mut out);
                for (cid, job) in q.take_work() {
                    let c = job.run_here();
                    q.on_complete(cid, c, &mut out);
                }
                prop_assert!(out.len() < 16 << 20);
                if r.is_err() {
                    break;
                }
            }
            let _ = sent(&q, &mut out);
            q.on_close("end");
            prop_assert_eq!(reg.controller_count(), 0);
        }

        /// On an export that requires DH-HMAC-CHAP, hostile sequences mixing well-formed and
        /// mangled Authentication Send/Receive commands with everything else never reach a
        /// namespace, never authenticate the queue, and never panic.
        #[test]
        fn hostile_sequences_on_an_auth_export_never_reach_the_namespace(
            pdus in prop::collection::vec(prop_oneof![arb_pdu(), arb_auth_pdu()], 1..40)
        ) {
            let mut cfg = auth::DhchapConfig::new(
                auth::Secret::generate(Some(auth::HashId::Sha256)),
                Some(auth::Secret::generate(None)),
            );
            cfg.dhgroups = vec![auth::DhGroup::Null];
            let (reg, mut q) = queue_with(Some(Arc::new(cfg)));
            let mut out = OutQueue::new();
            for p in pdus {
                let r = q.on_pdu(p, &mut out);
                for (cid, job) in q.take_work() {
                    prop_assert!(matches!(job, Job::Auth(_)), "{job:?} before authentication");
                    let c = job.run_here();
                    q.on_complete(cid, c, &mut out);
                }
                prop_assert!(!q.is_ready() || q.controller().is_none());
                prop_assert!(out.len() < 16 << 20);
                if r.is_err() {
                    break;
                }
            }
            let _ = sent(&q, &mut out);
            q.on_close("end");
            prop_assert_eq!(reg.controller_count(), 0);
        }
    }

    /// Authentication Send (a DH-HMAC-CHAP message, well-formed or mangled, in the capsule)
    /// and Authentication Receive commands, with the right or a wrong SECP and lengths.
    fn arb_auth_pdu() -> impl Strategy<Value = Pdu> {
        let host = auth::HostAuth::new(auth::Secret::generate(None), None, HOST, SUB, 1);
        let negotiate = host.negotiate();
        (
            0u16..8,
            any::<bool>(),
            prop_oneof![Just(0xE9u8), any::<u8>()],
            prop_oneof![
                Just(negotiate),
                prop::collection::vec(any::<u8>(), 0..200),
                (0u8..6, prop::collection::vec(any::<u8>(), 16..200)).prop_map(|(id, mut m)| {
                    m[0] = auth::TYPE_DHCHAP;
                    m[1] = id;
                    m
                }),
            ],
            prop_oneof![Just(4096u32), 0u32..300, Just(u32::MAX)],
        )
            .prop_map(|(cid, send, secp, msg, al)| {
                let mut sqe = Sqe::new(admin::FABRICS, cid, 0);
                sqe.0[4] = if send {
                    fctype::AUTH_SEND
                } else {
                    fctype::AUTH_RECEIVE
                };
                sqe.set_cdw(10, (u32::from(secp) << 24) | (1 << 16) | (1 << 8));
                if send {
                    sqe.set_cdw(11, msg.len() as u32);
                    sqe.set_data_pointer(DataPointer::InCapsule {
                        offset: 0,
                        len: msg.len() as u32,
                    });
                    Pdu::CapsuleCmd {
                        sqe,
                        data: msg,
                        digest_ok: true,
                    }
                } else {
                    sqe.set_cdw(11, al);
                    sqe.set_data_pointer(DataPointer::Transport { len: al });
                    Pdu::CapsuleCmd {
                        sqe,
                        data: Vec::new(),
                        digest_ok: true,
                    }
                }
            })
    }
}
