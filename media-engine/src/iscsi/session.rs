//! The full feature phase of one session (single connection, ERL 0), sans-IO.
//!
//! Feed it PDUs ([`Session::on_pdu`]) and command completions ([`Session::on_complete`]); it
//! queues [`Output`]s: PDUs to send, SCSI commands to run (the driver runs them on a blocking
//! thread and reports back), and a request to close. It owns everything RFC 7143 asks of a
//! target here: the CmdSN window and ordering, StatSN, immediate/unsolicited data and R2T,
//! Data-In with phase collapse and residuals, DataSN checks, NOP-In/Out both ways, task
//! management, text (SendTargets) and logout.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use super::params::{CMD_WINDOW, MAX_TEXT, Negotiated, SessionType};
use super::pdu::{BHS_LEN, Framer, Pdu, RESERVED_TAG, lun_from_raw, op, reject};
use super::target::{Registry, TPGT, Target};
use super::text;
use crate::outq::OutQueue;
use crate::scsi::{self, LogicalUnit, Nexus, Status};

/// Largest write we buffer (the SCSI layer's maximum transfer is below this; larger writes are
/// swallowed and failed rather than buffered).
pub const MAX_WRITE: u32 = 32 << 20;
/// Bytes of solicited write data a connection may have requested (R2T) but not yet completed
/// (one write always may, whatever its size). With the unsolicited first bursts (at most
/// FirstBurstLength per command in the window) and the connection's in-flight budget, this
/// bounds the write data a connection can make the server hold. 8 MiB, as for an NVMe/TCP
/// queue: eight 1 MiB writes in their R2T phase keep a 25 GbE link busy at 1 ms.
const R2T_BUDGET: u64 = 8 << 20;

const REPORT_LUNS: u8 = 0xa0;

/// Hands out the next target transfer tag, never the reserved value.
fn take_tag(next: &mut u32) -> u32 {
    let t = *next;
    *next = next.wrapping_add(1);
    if *next == RESERVED_TAG {
        *next = 1;
    }
    t
}

/// Serial number arithmetic (RFC 1982) on 32-bit sequence numbers.
fn sn_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// One SCSI command ready to run on a logical unit.
#[derive(Debug)]
pub struct Exec {
    pub itt: u32,
    lu: Option<Arc<LogicalUnit>>,
    luns: Vec<u64>,
    cdb: Vec<u8>,
    data_out: Vec<u8>,
    expected_in: u32,
    nexus: Arc<Nexus>,
}

impl Exec {
    /// Runs the command (blocking: it may do pool I/O).
    pub fn run(&self) -> scsi::Response {
        if self.cdb.first() == Some(&REPORT_LUNS) {
            return scsi::luns::report_luns(&self.luns, &self.cdb);
        }
        match &self.lu {
            Some(lu) => lu.execute(&self.command()),
            None => scsi::luns::lun_not_supported(&self.cdb),
        }
    }

    /// Starts the command on the connection's task (see [`LogicalUnit::execute_start`]);
    /// REPORT LUNS and commands for no LU go to [`Exec::run`].
    pub fn start(&self) -> crate::flow::Start<scsi::Response> {
        match &self.lu {
            Some(lu) if self.cdb.first() != Some(&REPORT_LUNS) => lu.execute_start(&self.command()),
            _ => crate::flow::Start::Blocking,
        }
    }

    fn command(&self) -> scsi::Command<'_> {
        scsi::Command {
            cdb: &self.cdb,
            nexus: &self.nexus,
            data_out: &self.data_out,
            expected_in: self.expected_in,
        }
    }
}

/// What the driver's [`crate::flow::Flow`] runs: the command, charged its Data-Out and the
/// most Data-In it can produce.
impl crate::flow::Job for Exec {
    type Tag = u32;
    type Done = scsi::Response;

    fn tag(&self) -> u32 {
        self.itt
    }

    fn cost(&self) -> usize {
        let data_in = match &self.lu {
            Some(lu) => lu.data_in_bound(&self.cdb, self.expected_in),
            None => self.expected_in as usize,
        };
        self.data_out.len() + data_in
    }

    fn start(&self) -> crate::flow::Start<scsi::Response> {
        Exec::start(self)
    }

    fn run(self) -> scsi::Response {
        Exec::run(&self)
    }

    /// HARDWARE ERROR rather than a hung command or a dropped connection.
    fn panicked(itt: u32) -> scsi::Response {
        tracing::error!(itt, "SCSI command panicked");
        scsi::Response::check(scsi::Sense::new(
            scsi::SenseKey::HardwareError,
            scsi::sense::Asc::INTERNAL_TARGET_FAILURE,
        ))
    }
}

impl Drop for Exec {
    /// A write's buffer serves the next write (see [`crate::bufpool`]).
    fn drop(&mut self) {
        crate::bufpool::give(std::mem::take(&mut self.data_out));
    }
}

/// A read's Data-In PDUs, encoded straight from the response buffer.
#[derive(Debug)]
pub struct DataIn {
    bhs: [u8; BHS_LEN],
    data: Vec<u8>,
    max_seg: usize,
    max_burst: usize,
    /// Status for the last PDU (phase collapse), with its StatSN.
    status: Option<u8>,
}

impl DataIn {
    /// Each Data-In PDU: its BHS and the range of the data it carries.
    fn pdus(&self) -> Vec<([u8; BHS_LEN], Range<usize>)> {
        let total = self.data.len();
        let mut out = Vec::new();
        let mut off = 0usize;
        let mut sn = 0u32;
        while off < total {
            let burst_end = (off / self.max_burst + 1) * self.max_burst;
            let len = self.max_seg.min(total - off).min(burst_end - off);
            let last = off + len == total;
            let mut bhs = self.bhs;
            let mut flags = 0u8;
            if last || off + len == burst_end {
                flags |= 0x80;
            }
            if last && let Some(st) = self.status {
                flags |= 0x01 | (self.bhs[1] & 0x06);
                bhs[3] = st;
            } else {
                // StatSN and residual belong to the status-carrying PDU only.
                bhs[24..28].fill(0);
                bhs[44..48].fill(0);
            }
            bhs[1] = flags;
            bhs[36..40].copy_from_slice(&sn.to_be_bytes());
            bhs[40..44].copy_from_slice(&(off as u32).to_be_bytes());
            out.push((bhs, off..off + len));
            off += len;
            sn += 1;
        }
        out
    }

    /// Queues every Data-In PDU on `out`, the data by reference (no copy) where it is large.
    pub fn encode_into(self, framer: &Framer, out: &mut OutQueue) {
        let pdus = self.pdus();
        let data = Arc::new(self.data);
        for (bhs, range) in pdus {
            framer.encode_shared(&bhs, &data, range, out);
        }
    }

    pub fn pdu_count(&self) -> u32 {
        let mut n = 0;
        let mut off = 0;
        while off < self.data.len() {
            let burst_end = (off / self.max_burst + 1) * self.max_burst;
            off += self.max_seg.min(self.data.len() - off).min(burst_end - off);
            n += 1;
        }
        n
    }
}

/// What the driver must do.
#[derive(Debug)]
pub enum Output {
    Send(Pdu),
    DataIn(DataIn),
    Execute(Exec),
    /// Close the connection once everything before this is sent.
    Close(String),
}

#[derive(Debug)]
struct R2tSeq {
    ttt: u32,
    offset: u32,
    len: u32,
    next_data_sn: u32,
}

#[derive(Debug)]
struct WriteXfer {
    buf: Vec<u8>,
    /// EDTL above [`MAX_WRITE`]: data is counted and dropped, the command fails.
    discard: bool,
    received: u32,
    /// Unsolicited Data-Out still expected (InitialR2T=No and F=0 on the command).
    unsolicited_open: bool,
    unsolicited_data_sn: u32,
    r2ts: VecDeque<R2tSeq>,
    next_r2t_offset: u32,
    r2t_sn: u32,
    /// Counted against the connection's R2T budget.
    budgeted: u64,
}

#[derive(Debug)]
enum Phase {
    Collecting(WriteXfer),
    Executing,
}

#[derive(Debug)]
struct Task {
    lun_raw: u64,
    lun: u64,
    cdb: Vec<u8>,
    edtl: u32,
    write: bool,
    phase: Phase,
    aborted: bool,
    r2t_count: u32,
}

#[derive(Debug)]
enum AfterTmf {
    Nothing,
    Reset(Vec<Arc<LogicalUnit>>),
    Close,
}

#[derive(Debug)]
struct PendingTmf {
    itt: u32,
    waiting: HashSet<u32>,
    response: u8,
    after: AfterTmf,
}

/// TMF function codes and responses (RFC 7143 11.5, 11.6).
mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LUN_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;
    pub const COMPLETE: u8 = 0;
    pub const NO_TASK: u8 = 1;
    pub const NO_LUN: u8 = 2;
    pub const REASSIGN_UNSUPPORTED: u8 = 4;
    pub const NOT_SUPPORTED: u8 = 5;
    pub const REJECTED: u8 = 255;
}

/// One logged-in session.
#[derive(Debug)]
pub struct Session {
    p: Negotiated,
    target: Option<Arc<Target>>,
    registry: Arc<Registry>,
    nexus: Arc<Nexus>,
    /// The portal this connection reached (TargetAddress when none is configured).
    local_portal: String,
    stat_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    /// Commands that arrived ahead of ExpCmdSN, by CmdSN.
    queued: HashMap<u32, Pdu>,
    tasks: HashMap<u32, Task>,
    next_ttt: u32,
    r2t_used: u64,
    r2t_waiting: VecDeque<u32>,
    tmfs: Vec<PendingTmf>,
    logout: Option<Pdu>,
    text_in: Vec<u8>,
    /// A long text response being handed out in pieces: (TTT, rest).
    text_out: Option<(u32, Vec<u8>)>,
    ping: Option<u32>,
    heard: bool,
    out: Vec<Output>,
    closing: bool,
}

impl Session {
    pub fn new(
        p: Negotiated,
        target: Option<Arc<Target>>,
        registry: Arc<Registry>,
        local_portal: String,
    ) -> Session {
        let isid_hex = hex::encode(p.isid);
        let target_name = p.target_name.clone().unwrap_or_default();
        let nexus = Arc::new(Nexus {
            initiator_port: format!("{},i,0x{isid_hex}", p.initiator_name),
            target_port: format!("{target_name},t,0x{TPGT:04x}"),
            relative_target_port: 1,
        });
        let exp = p.cmd_sn;
        Session {
            stat_sn: p.stat_sn,
            exp_cmd_sn: exp,
            max_cmd_sn: exp.wrapping_add(CMD_WINDOW - 1),
            p,
            target,
            registry,
            nexus,
            local_portal,
            queued: HashMap::new(),
            tasks: HashMap::new(),
            next_ttt: 1,
            r2t_used: 0,
            r2t_waiting: VecDeque::new(),
            tmfs: Vec::new(),
            logout: None,
            text_in: Vec::new(),
            text_out: None,
            ping: None,
            heard: true,
            out: Vec::new(),
            closing: false,
        }
    }

    pub fn params(&self) -> &Negotiated {
        &self.p
    }

    pub fn nexus(&self) -> &Arc<Nexus> {
        &self.nexus
    }

    /// Takes the queued outputs.
    pub fn drain(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// Moves the queued outputs to the end of `outs` (reusing its allocation).
    pub fn drain_into(&mut self, outs: &mut Vec<Output>) {
        outs.append(&mut self.out);
    }

    /// Commands received and not yet answered.
    pub fn active_tasks(&self) -> usize {
        self.tasks.len()
    }

    fn close(&mut self, why: impl Into<String>) {
        if !self.closing {
            self.closing = true;
            self.out.push(Output::Close(why.into()));
        }
    }

    /// Fills StatSN (advancing it when `advance`), ExpCmdSN and MaxCmdSN.
    fn seq(&mut self, p: &mut Pdu, advance: bool) {
        p.set_u32(24, self.stat_sn);
        if advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        self.window(p);
    }

    /// ExpCmdSN and MaxCmdSN; the window shrinks while commands are outstanding, so an
    /// initiator can never have more than CMD_WINDOW commands in the target.
    fn window(&mut self, p: &mut Pdu) {
        let free = CMD_WINDOW.saturating_sub(self.tasks.len() as u32).max(1);
        let max = self.exp_cmd_sn.wrapping_add(free - 1);
        if sn_lt(self.max_cmd_sn, max) {
            self.max_cmd_sn = max;
        }
        p.set_u32(28, self.exp_cmd_sn);
        p.set_u32(32, self.max_cmd_sn);
    }

    fn reject(&mut self, reason: u8, bad: &Pdu) {
        let mut p = Pdu::new(op::REJECT);
        p.set_flags(0x80);
        p.set_u8(2, reason);
        p.set_itt(RESERVED_TAG);
        self.seq(&mut p, false);
        p.data = bad.bhs.to_vec();
        self.out.push(Output::Send(p));
    }

    /// Handles one PDU from the initiator.
    pub fn on_pdu(&mut self, pdu: Pdu) {
        if self.closing {
            return;
        }
        self.heard = true;
        match pdu.opcode() {
            op::DATA_OUT => return self.on_data_out(pdu),
            op::SNACK => return self.reject(reject::NOT_SUPPORTED, &pdu),
            op::LOGIN_REQ => return self.reject(reject::PROTOCOL_ERROR, &pdu),
            _ => {}
        }
        if pdu.opcode() == op::NOP_OUT && pdu.itt() == RESERVED_TAG {
            // Answer to our NOP-In ping (or an unsolicited ping that wants no answer).
            if self.ping == Some(pdu.u32_at(20)) {
                self.ping = None;
            }
            return;
        }
        if pdu.immediate() {
            return self.dispatch(pdu);
        }
        let sn = pdu.u32_at(24);
        if sn_lt(sn, self.exp_cmd_sn) || sn_lt(self.max_cmd_sn, sn) {
            // Outside the window: RFC 7143 4.2.2.1 says silently ignore.
            tracing::debug!(
                cmd_sn = sn,
                exp = self.exp_cmd_sn,
                max = self.max_cmd_sn,
                "CmdSN outside the window; ignored"
            );
            return;
        }
        if sn != self.exp_cmd_sn {
            if self.queued.len() < CMD_WINDOW as usize {
                self.queued.insert(sn, pdu);
            }
            return;
        }
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        self.dispatch(pdu);
        while let Some(next) = self.queued.remove(&self.exp_cmd_sn) {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            self.dispatch(next);
        }
    }

    fn dispatch(&mut self, pdu: Pdu) {
        match pdu.opcode() {
            op::SCSI_CMD => self.on_scsi_cmd(pdu),
            op::NOP_OUT => self.on_nop_out(pdu),
            op::TMF_REQ => self.on_tmf(pdu),
            op::TEXT_REQ => self.on_text(pdu),
            op::LOGOUT_REQ => self.on_logout(pdu),
            _ => self.reject(reject::NOT_SUPPORTED, &pdu),
        }
    }

    // ------------------------------------------------------------------ NOP

    fn on_nop_out(&mut self, pdu: Pdu) {
        let mut p = Pdu::new(op::NOP_IN);
        p.set_flags(0x80);
        p.set_lun_raw(pdu.lun_raw());
        p.set_itt(pdu.itt());
        p.set_u32(20, RESERVED_TAG);
        self.seq(&mut p, true);
        let mut data = pdu.data;
        data.truncate(self.p.max_send_data as usize);
        p.data = data;
        self.out.push(Output::Send(p));
    }

    /// Called on a timer. Pings an idle initiator with NOP-In; closes when a ping went
    /// unanswered for a whole period.
    pub fn on_tick(&mut self) {
        if self.closing {
            return;
        }
        if self.ping.is_some() && !self.heard {
            return self.close("initiator did not answer NOP-In");
        }
        if !self.heard && self.ping.is_none() {
            let ttt = self.new_ttt();
            let mut p = Pdu::new(op::NOP_IN);
            p.set_flags(0x80);
            p.set_itt(RESERVED_TAG);
            p.set_u32(20, ttt);
            self.seq(&mut p, false);
            self.out.push(Output::Send(p));
            self.ping = Some(ttt);
        }
        self.heard = false;
    }

    fn new_ttt(&mut self) -> u32 {
        take_tag(&mut self.next_ttt)
    }

    // ------------------------------------------------------------------ SCSI commands

    fn lu(&self, lun: u64) -> Option<Arc<LogicalUnit>> {
        self.target
            .as_ref()
            .and_then(|t| t.cfg.luns.get(&lun).cloned())
    }

    fn on_scsi_cmd(&mut self, mut pdu: Pdu) {
        if self.p.session_type == SessionType::Discovery {
            return self.reject(reject::PROTOCOL_ERROR, &pdu);
        }
        let itt = pdu.itt();
        if itt == RESERVED_TAG || self.tasks.contains_key(&itt) {
            return self.reject(reject::TASK_IN_PROGRESS, &pdu);
        }
        let flags = pdu.flags();
        let write = flags & 0x20 != 0;
        let edtl = pdu.u32_at(20);
        let mut cdb = pdu.bhs[32..48].to_vec();
        // An extended CDB arrives in an AHS of type 1 (RFC 7143 11.3.5).
        if pdu.ahs.len() >= 4 && pdu.ahs[2] == 1 {
            let ahs_len = u16::from_be_bytes([pdu.ahs[0], pdu.ahs[1]]) as usize;
            let ext = pdu
                .ahs
                .get(4..(3 + ahs_len).min(pdu.ahs.len()))
                .unwrap_or(&[]);
            cdb.extend_from_slice(ext);
        }
        let imm = pdu.data.len() as u32;
        if imm > 0 && (!write || !self.p.immediate_data || imm > self.p.first_burst || imm > edtl) {
            return self.reject(reject::PROTOCOL_ERROR, &pdu);
        }
        let lun_raw = pdu.lun_raw();
        let mut task = Task {
            lun_raw,
            lun: lun_from_raw(lun_raw),
            cdb,
            edtl,
            write,
            phase: Phase::Executing,
            aborted: false,
            r2t_count: 0,
        };
        if !write || edtl == 0 {
            self.tasks.insert(itt, task);
            return self.execute(itt, Vec::new());
        }
        let discard = edtl > MAX_WRITE;
        let unsolicited_open =
            !self.p.initial_r2t && !pdu.final_bit() && imm < edtl.min(self.p.first_burst);
        let mut buf = Vec::new();
        if !discard {
            if imm == edtl || pdu.data.capacity() >= edtl as usize {
                // All of the data came with the command (the common small write), or the
                // driver gave its immediate data room for the rest: no copy.
                buf = std::mem::take(&mut pdu.data);
            } else {
                buf = crate::bufpool::take_empty(edtl as usize);
                buf.extend_from_slice(&pdu.data);
            }
        }
        task.phase = Phase::Collecting(WriteXfer {
            buf,
            discard,
            received: imm,
            unsolicited_open,
            unsolicited_data_sn: 0,
            r2ts: VecDeque::new(),
            next_r2t_offset: imm,
            r2t_sn: 0,
            budgeted: 0,
        });
        self.tasks.insert(itt, task);
        self.advance_write(itt);
    }

    /// Moves a write along: runs it when all data is in, issues R2Ts when the unsolicited
    /// part is over and budget allows.
    fn advance_write(&mut self, itt: u32) {
        let (mtr, mb) = (self.p.max_outstanding_r2t as usize, self.p.max_burst);
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        let edtl = task.edtl;
        let Phase::Collecting(x) = &mut task.phase else {
            return;
        };
        if x.received >= edtl {
            let data = std::mem::take(&mut x.buf);
            let (discard, budgeted) = (x.discard, x.budgeted);
            self.r2t_used = self.r2t_used.saturating_sub(budgeted);
            if discard {
                return self.fail_oversized(itt);
            }
            self.execute(itt, data);
            self.pump_r2t_waiting();
            return;
        }
        if x.unsolicited_open || x.discard {
            if x.discard && !x.unsolicited_open {
                return self.fail_oversized(itt);
            }
            return;
        }
        if x.budgeted == 0 {
            let need = u64::from(edtl - x.next_r2t_offset);
            if self.r2t_used + need > R2T_BUDGET && self.r2t_used > 0 {
                if !self.r2t_waiting.contains(&itt) {
                    self.r2t_waiting.push_back(itt);
                }
                return;
            }
            self.r2t_used += need;
            x.budgeted = need;
        }
        let mut r2ts = Vec::new();
        while x.r2ts.len() < mtr && x.next_r2t_offset < edtl {
            let len = mb.min(edtl - x.next_r2t_offset);
            let ttt = take_tag(&mut self.next_ttt);
            x.r2ts.push_back(R2tSeq {
                ttt,
                offset: x.next_r2t_offset,
                len,
                next_data_sn: 0,
            });
            r2ts.push((ttt, x.next_r2t_offset, len, x.r2t_sn));
            x.next_r2t_offset += len;
            x.r2t_sn += 1;
        }
        task.r2t_count += r2ts.len() as u32;
        let lun_raw = task.lun_raw;
        for (ttt, off, len, sn) in r2ts {
            let mut p = Pdu::new(op::R2T);
            p.set_flags(0x80);
            p.set_lun_raw(lun_raw);
            p.set_itt(itt);
            p.set_u32(20, ttt);
            self.seq(&mut p, false);
            p.set_u32(36, sn);
            p.set_u32(40, off);
            p.set_u32(44, len);
            self.out.push(Output::Send(p));
        }
    }

    fn pump_r2t_waiting(&mut self) {
        while let Some(itt) = self.r2t_waiting.pop_front() {
            let before = self.r2t_waiting.len();
            self.advance_write(itt);
            if self.r2t_waiting.len() > before {
                // It went back to the queue: no budget yet.
                break;
            }
        }
    }

    fn fail_oversized(&mut self, itt: u32) {
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        task.phase = Phase::Executing;
        // ILLEGAL REQUEST / INVALID FIELD IN CDB: the transfer is above our maximum.
        let resp = scsi::Response::check(scsi::Sense::invalid_cdb_field(0, None));
        self.on_complete(itt, resp);
    }

    /// A Data-Out PDU whose data segment is `data` (left in the receive buffer by
    /// [`super::pdu::Framer::decode_ref`]): copied once, into its command's buffer.
    pub fn on_data_out_ref(&mut self, pdu: &Pdu, data: &[u8]) {
        if self.closing {
            return;
        }
        self.heard = true;
        self.on_data_out_with(pdu, data);
    }

    /// The buffer the data of a Data-Out may be read into directly, while its header is in and
    /// its data still arriving ([`super::pdu::Framer::data_out_head`]): its command's buffer,
    /// taken out until [`Session::on_data_out_direct`] gives it back with the data appended.
    /// `None` (the data then goes the usual way, through the usual checks) unless the PDU
    /// continues, in order, a command collecting data that fits within its EDTL, so the
    /// buffer never grows past what the command declared.
    pub fn take_data_out_buffer(&mut self, pdu: &Pdu, len: usize) -> Option<Vec<u8>> {
        if self.closing {
            return None;
        }
        let task = self.tasks.get_mut(&pdu.itt())?;
        let edtl = task.edtl as usize;
        let Phase::Collecting(x) = &mut task.phase else {
            return None;
        };
        let offset = pdu.u32_at(40);
        let in_order = !x.discard && offset == x.received && x.buf.len() == offset as usize;
        if !in_order || offset as usize + len > edtl {
            return None;
        }
        Some(std::mem::take(&mut x.buf))
    }

    /// The Data-Out whose data was read straight into `buf` (from
    /// [`Session::take_data_out_buffer`]; its last `len` bytes are the PDU's data): checked
    /// as any Data-Out, and the buffer goes back to its command.
    pub fn on_data_out_direct(&mut self, pdu: &Pdu, buf: Vec<u8>, len: usize) {
        self.heard = true;
        let Some(task) = self.tasks.get_mut(&pdu.itt()) else {
            return;
        };
        let Phase::Collecting(x) = &mut task.phase else {
            return;
        };
        x.buf = buf;
        if self.closing {
            return;
        }
        self.on_data_out_checked(pdu, len as u32, None);
    }

    fn on_data_out(&mut self, pdu: Pdu) {
        self.on_data_out_with(&pdu, &pdu.data);
    }

    fn on_data_out_with(&mut self, pdu: &Pdu, data: &[u8]) {
        self.on_data_out_checked(pdu, data.len() as u32, Some(data));
    }

    /// Checks a Data-Out of `len` bytes and adds them to its command: `data`, or `None` when
    /// they are already at the end of the command's buffer (read there directly).
    fn on_data_out_checked(&mut self, pdu: &Pdu, len: u32, data: Option<&[u8]>) {
        let itt = pdu.itt();
        let ttt = pdu.u32_at(20);
        let data_sn = pdu.u32_at(36);
        let offset = pdu.u32_at(40);
        let fin = pdu.final_bit();
        let Some(task) = self.tasks.get_mut(&itt) else {
            // Data for a task we aborted (or never had): dropped, as RFC 7143 allows.
            return;
        };
        let edtl = task.edtl;
        let Phase::Collecting(x) = &mut task.phase else {
            return self.close("Data-Out for a command that is not receiving data");
        };
        let err = if ttt == RESERVED_TAG {
            if !x.unsolicited_open {
                Some("unsolicited Data-Out not allowed")
            } else if data_sn != x.unsolicited_data_sn {
                Some("DataSN out of order")
            } else if offset != x.received || offset + len > edtl.min(self.p.first_burst) {
                Some("unsolicited Data-Out outside the first burst")
            } else {
                x.unsolicited_data_sn += 1;
                if fin {
                    x.unsolicited_open = false;
                    x.next_r2t_offset = offset + len;
                }
                None
            }
        } else {
            match x.r2ts.front_mut() {
                Some(seq) if seq.ttt == ttt => {
                    let end = seq.offset + seq.len;
                    if data_sn != seq.next_data_sn {
                        Some("DataSN out of order")
                    } else if offset != x.received || offset + len > end {
                        Some("Data-Out offset outside its R2T")
                    } else {
                        seq.next_data_sn += 1;
                        if offset + len == end {
                            x.r2ts.pop_front();
                            None
                        } else if fin {
                            Some("F bit before the end of the R2T's burst")
                        } else {
                            None
                        }
                    }
                }
                _ => Some("Data-Out with an unknown target transfer tag"),
            }
        };
        if let Some(e) = err {
            // ERL 0 has no recovery within a command: the command fails (ABORTED COMMAND,
            // DATA PHASE ERROR) and the rest of its Data-Out is dropped as data for an unknown
            // task. The connection and the initiator's other commands carry on.
            tracing::warn!(itt, ttt, data_sn, offset, len, "{e}; failing the command");
            let budgeted = x.budgeted;
            self.r2t_used = self.r2t_used.saturating_sub(budgeted);
            if let Some(t) = self.tasks.get_mut(&itt) {
                t.phase = Phase::Executing;
            }
            let sense =
                scsi::Sense::new(scsi::SenseKey::AbortedCommand, scsi::sense::Asc(0x4b, 0x00));
            self.on_complete(itt, scsi::Response::check(sense));
            self.pump_r2t_waiting();
            return;
        }
        if !x.discard
            && let Some(data) = data
        {
            x.buf.extend_from_slice(data);
        }
        x.received += len;
        self.advance_write(itt);
    }

    fn execute(&mut self, itt: u32, data_out: Vec<u8>) {
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        task.phase = Phase::Executing;
        let lu = self
            .target
            .as_ref()
            .and_then(|t| t.cfg.luns.get(&task.lun).cloned());
        let exec = Exec {
            itt,
            lu,
            luns: self
                .target
                .as_ref()
                .map(|t| t.lun_numbers())
                .unwrap_or_default(),
            cdb: task.cdb.clone(),
            data_out,
            expected_in: if task.write { 0 } else { task.edtl },
            nexus: self.nexus.clone(),
        };
        self.out.push(Output::Execute(exec));
    }

    /// A command the driver ran has finished.
    pub fn on_complete(&mut self, itt: u32, resp: scsi::Response) {
        let Some(task) = self.tasks.remove(&itt) else {
            return;
        };
        if task.aborted {
            self.task_gone(itt);
            return;
        }
        if self.closing {
            return;
        }
        let edtl = task.edtl;
        // Residuals: for writes SPDTL against EDTL; for everything else the Data-In produced.
        let (mut flags, mut residual) = (0u8, 0u32);
        let mut data = resp.data_in;
        if task.write {
            let spdtl = resp.spdtl_out;
            if spdtl > edtl {
                (flags, residual) = (0x04, spdtl - edtl);
            } else if spdtl < edtl {
                (flags, residual) = (0x02, edtl - spdtl);
            }
            data.clear();
        } else {
            let n = data.len() as u64;
            if n > u64::from(edtl) {
                (flags, residual) = (0x04, (n - u64::from(edtl)).min(u64::from(u32::MAX)) as u32);
                data.truncate(edtl as usize);
            } else if n < u64::from(edtl) && resp.status == Status::Good {
                (flags, residual) = (0x02, edtl - n as u32);
            }
        }
        let status = resp.status as u8;
        let mut data_in_pdus = 0;
        if !data.is_empty() {
            let collapse = resp.status == Status::Good && resp.sense.is_none();
            let mut bhs = Pdu::new(op::DATA_IN);
            bhs.set_flags(flags);
            bhs.set_lun_raw(task.lun_raw);
            bhs.set_itt(itt);
            bhs.set_u32(20, RESERVED_TAG);
            self.seq(&mut bhs, collapse);
            bhs.set_u32(44, residual);
            let d = DataIn {
                bhs: bhs.bhs,
                data,
                max_seg: self.p.max_send_data as usize,
                max_burst: self.p.max_burst as usize,
                status: collapse.then_some(status),
            };
            data_in_pdus = d.pdu_count();
            self.out.push(Output::DataIn(d));
            if collapse {
                self.after_response();
                return;
            }
        }
        let mut p = Pdu::new(op::SCSI_RESP);
        p.set_flags(0x80 | flags);
        p.set_u8(2, 0);
        p.set_u8(3, status);
        p.set_itt(itt);
        self.seq(&mut p, true);
        p.set_u32(
            36,
            if task.write {
                task.r2t_count
            } else {
                data_in_pdus
            },
        );
        p.set_u32(44, residual);
        if let Some(sense) = resp.sense {
            let bytes = sense.to_fixed();
            let mut d = Vec::with_capacity(bytes.len() + 2);
            d.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            d.extend_from_slice(&bytes);
            p.data = d;
        }
        self.out.push(Output::Send(p));
        self.after_response();
    }

    fn after_response(&mut self) {
        if self.tasks.is_empty()
            && let Some(req) = self.logout.take()
        {
            self.logout_response(&req, 0);
        }
    }

    // ------------------------------------------------------------------ task management

    fn on_tmf(&mut self, pdu: Pdu) {
        let function = pdu.flags() & 0x7f;
        let lun = lun_from_raw(pdu.lun_raw());
        let rtt = pdu.u32_at(20);
        let mut after = AfterTmf::Nothing;
        let victims: Vec<u32> = match function {
            tmf::ABORT_TASK => {
                if !self.tasks.contains_key(&rtt) {
                    return self.tmf_response(pdu.itt(), tmf::NO_TASK);
                }
                vec![rtt]
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET | tmf::LUN_RESET => {
                let Some(lu) = self.lu(lun) else {
                    return self.tmf_response(pdu.itt(), tmf::NO_LUN);
                };
                if function == tmf::LUN_RESET {
                    after = AfterTmf::Reset(vec![lu]);
                }
                self.tasks
                    .iter()
                    .filter(|(_, t)| t.lun == lun)
                    .map(|(i, _)| *i)
                    .collect()
            }
            tmf::CLEAR_ACA => return self.tmf_response(pdu.itt(), tmf::COMPLETE),
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                let lus: Vec<Arc<LogicalUnit>> = self
                    .target
                    .as_ref()
                    .map(|t| t.cfg.luns.values().cloned().collect())
                    .unwrap_or_default();
                after = if function == tmf::TARGET_COLD_RESET {
                    for lu in &lus {
                        lu.reset();
                    }
                    AfterTmf::Close
                } else {
                    AfterTmf::Reset(lus)
                };
                self.tasks.keys().copied().collect()
            }
            tmf::TASK_REASSIGN => return self.tmf_response(pdu.itt(), tmf::REASSIGN_UNSUPPORTED),
            0 | 9..=0x7f => return self.tmf_response(pdu.itt(), tmf::REJECTED),
            _ => return self.tmf_response(pdu.itt(), tmf::NOT_SUPPORTED),
        };
        let mut waiting = HashSet::new();
        for itt in victims {
            let Some(task) = self.tasks.get_mut(&itt) else {
                continue;
            };
            match &task.phase {
                Phase::Collecting(x) => {
                    let b = x.budgeted;
                    self.r2t_used = self.r2t_used.saturating_sub(b);
                    self.tasks.remove(&itt);
                    self.r2t_waiting.retain(|i| *i != itt);
                }
                Phase::Executing => {
                    task.aborted = true;
                    waiting.insert(itt);
                }
            }
        }
        let pending = PendingTmf {
            itt: pdu.itt(),
            waiting,
            response: tmf::COMPLETE,
            after,
        };
        self.tmfs.push(pending);
        self.finish_tmfs();
        self.pump_r2t_waiting();
    }

    fn task_gone(&mut self, itt: u32) {
        for t in &mut self.tmfs {
            t.waiting.remove(&itt);
        }
        self.finish_tmfs();
        self.after_response();
    }

    fn finish_tmfs(&mut self) {
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.tmfs)
            .into_iter()
            .partition(|t| t.waiting.is_empty());
        self.tmfs = rest;
        for t in done {
            match &t.after {
                AfterTmf::Reset(lus) => {
                    // The requester knows it reset the LU; every other nexus gets a unit
                    // attention (SAM-5 6.3).
                    for lu in lus {
                        lu.reset();
                    }
                }
                AfterTmf::Nothing | AfterTmf::Close => {}
            }
            self.tmf_response(t.itt, t.response);
            if matches!(t.after, AfterTmf::Close) {
                self.close("TARGET COLD RESET");
            }
        }
    }

    fn tmf_response(&mut self, itt: u32, response: u8) {
        let mut p = Pdu::new(op::TMF_RESP);
        p.set_flags(0x80);
        p.set_u8(2, response);
        p.set_itt(itt);
        self.seq(&mut p, true);
        self.out.push(Output::Send(p));
    }

    // ------------------------------------------------------------------ text

    fn on_text(&mut self, pdu: Pdu) {
        let ttt = pdu.u32_at(20);
        if ttt != RESERVED_TAG {
            // The initiator asks for the next piece of a long response.
            match self.text_out.take() {
                Some((t, rest)) if t == ttt => {
                    return self.text_response(pdu.itt(), pdu.lun_raw(), rest);
                }
                _ => return self.reject(reject::INVALID_PDU_FIELD, &pdu),
            }
        }
        if self.text_in.len() + pdu.data.len() > MAX_TEXT {
            self.text_in.clear();
            return self.reject(reject::PROTOCOL_ERROR, &pdu);
        }
        self.text_in.extend_from_slice(&pdu.data);
        if pdu.flags() & 0x40 != 0 {
            // C bit: more text follows; ask for it.
            let mut p = Pdu::new(op::TEXT_RESP);
            p.set_lun_raw(pdu.lun_raw());
            p.set_itt(pdu.itt());
            let ttt = self.new_ttt();
            p.set_u32(20, ttt);
            self.seq(&mut p, true);
            self.out.push(Output::Send(p));
            return;
        }
        let data = std::mem::take(&mut self.text_in);
        let pairs = match text::parse(&data) {
            Ok(p) => p,
            Err(_) => return self.reject(reject::PROTOCOL_ERROR, &pdu),
        };
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            if k == "SendTargets" {
                self.send_targets(&v, &mut out);
            } else {
                out.push((k, "NotUnderstood".into()));
            }
        }
        self.text_response(pdu.itt(), pdu.lun_raw(), text::serialise(&out));
    }

    fn send_targets(&self, v: &str, out: &mut Vec<(String, String)>) {
        let targets: Vec<Arc<Target>> = match v {
            "All" if self.p.session_type == SessionType::Discovery => {
                self.registry.visible_to(&self.p.initiator_name)
            }
            "All" => {
                out.push(("SendTargets".into(), "Reject".into()));
                return;
            }
            "" => self.target.iter().cloned().collect(),
            name => self
                .registry
                .get(name)
                .filter(|t| t.allows(&self.p.initiator_name))
                .into_iter()
                .collect(),
        };
        let portal = self
            .registry
            .advertise
            .clone()
            .unwrap_or_else(|| self.local_portal.clone());
        for t in targets {
            out.push(("TargetName".into(), t.cfg.name.clone()));
            out.push(("TargetAddress".into(), format!("{portal},{TPGT}")));
        }
    }

    fn text_response(&mut self, itt: u32, lun_raw: u64, mut data: Vec<u8>) {
        let max = self.p.max_send_data as usize;
        let mut p = Pdu::new(op::TEXT_RESP);
        p.set_lun_raw(lun_raw);
        p.set_itt(itt);
        if data.len() > max {
            let rest = data.split_off(max);
            let ttt = self.new_ttt();
            p.set_flags(0x40);
            p.set_u32(20, ttt);
            self.text_out = Some((ttt, rest));
        } else {
            p.set_flags(0x80);
            p.set_u32(20, RESERVED_TAG);
        }
        self.seq(&mut p, true);
        p.data = data;
        self.out.push(Output::Send(p));
    }

    // ------------------------------------------------------------------ logout

    fn on_logout(&mut self, pdu: Pdu) {
        let reason = pdu.flags() & 0x7f;
        match reason {
            0 | 1 => {
                if self.tasks.is_empty() {
                    self.logout_response(&pdu, 0);
                } else {
                    self.logout = Some(pdu);
                }
            }
            // Removing a connection for recovery needs ERL 2.
            _ => self.logout_response(&pdu, 2),
        }
    }

    fn logout_response(&mut self, req: &Pdu, response: u8) {
        let mut p = Pdu::new(op::LOGOUT_RESP);
        p.set_flags(0x80);
        p.set_u8(2, response);
        p.set_itt(req.itt());
        self.seq(&mut p, true);
        p.set_u16(40, 0); // Time2Wait
        p.set_u16(42, 0); // Time2Retain
        self.out.push(Output::Send(p));
        if response == 0 {
            self.close("logout");
        }
    }

    /// Asks the initiator to log out (the target is being unexported), RFC 7143 11.9.1 event 1.
    pub fn request_logout(&mut self, within_secs: u16) {
        if self.closing {
            return;
        }
        let mut p = Pdu::new(op::ASYNC);
        p.set_flags(0x80);
        p.set_itt(RESERVED_TAG);
        self.seq(&mut p, true);
        p.set_u8(36, 1);
        p.set_u16(38, 0);
        p.set_u16(40, 0);
        p.set_u16(42, within_secs);
        self.out.push(Output::Send(p));
    }

    /// Called when the connection ends: releases what this nexus held on its logical units.
    pub fn end(&mut self) {
        if let Some(t) = &self.target {
            for lu in t.cfg.luns.values() {
                lu.nexus_gone(&self.nexus);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use maas_pool::{PoolError, Result as PoolResult};
    use parking_lot::Mutex;
    use proptest::prelude::*;

    use super::*;
    use crate::iscsi::login::{Login, Step};
    use crate::iscsi::params::OUR_FIRST_BURST;
    use crate::iscsi::target::TargetConfig;
    use crate::scsi::LuIdentity;

    /// A RAM disk: the session tests need a real logical unit behind the target.
    struct Ram(Mutex<Vec<u8>>);

    impl crate::BlockDevice for Ram {
        fn capacity(&self) -> u64 {
            self.0.lock().len() as u64
        }
        fn block_size(&self) -> u32 {
            512
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> PoolResult<()> {
            let d = self.0.lock();
            let end = offset as usize + buf.len();
            let size = d.len() as u64;
            let src = d.get(offset as usize..end).ok_or(PoolError::OutOfRange {
                offset,
                len: buf.len() as u64,
                size,
            })?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8], _fua: bool) -> PoolResult<()> {
            let mut d = self.0.lock();
            let size = d.len() as u64;
            let dst = d
                .get_mut(offset as usize..offset as usize + data.len())
                .ok_or(PoolError::OutOfRange {
                    offset,
                    len: data.len() as u64,
                    size,
                })?;
            dst.copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> PoolResult<()> {
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> PoolResult<()> {
            self.write(offset, &vec![0; len as usize], fua)
        }
        fn discard(&self, offset: u64, len: u64) -> PoolResult<()> {
            self.write_zeroes(offset, len, false)
        }
    }

    const TARGET: &str = "iqn.2026-11.io.maas:test";
    const INITIATOR: &str = "iqn.2026-11.test:host";

    fn registry() -> Arc<Registry> {
        let reg = Arc::new(Registry::new(Some("192.0.2.1:3260".into())));
        let dev: Arc<dyn crate::BlockDevice> = Arc::new(Ram(Mutex::new(vec![0; 4 << 20])));
        let lu = Arc::new(LogicalUnit::new(
            dev,
            LuIdentity::from_volume_id("vol-test"),
        ));
        reg.add(TargetConfig {
            name: TARGET.into(),
            alias: None,
            initiators: vec![INITIATOR.into()],
            chap: None,
            luns: BTreeMap::from([(0, lu)]),
        });
        reg
    }

    fn negotiated(initial_r2t: bool) -> Negotiated {
        let mut n = Negotiated::defaults();
        n.initiator_name = INITIATOR.into();
        n.target_name = Some(TARGET.into());
        n.max_send_data = 8192;
        n.max_burst = 16384;
        n.first_burst = 8192;
        n.initial_r2t = initial_r2t;
        n.max_outstanding_r2t = 2;
        n.cmd_sn = 10;
        n.stat_sn = 100;
        n
    }

    fn session(initial_r2t: bool) -> Session {
        let reg = registry();
        let target = reg.get(TARGET);
        Session::new(
            negotiated(initial_r2t),
            target,
            reg,
            "127.0.0.1:3260".into(),
        )
    }

    /// Runs the session like the driver does (commands execute at once); returns every PDU
    /// sent, with Data-In PDUs decoded back from their wire form.
    fn pump(s: &mut Session) -> Vec<Pdu> {
        let framer = Framer {
            header_digest: false,
            data_digest: false,
            max_recv_data: 1 << 24,
        };
        let mut sent = Vec::new();
        loop {
            let outs = s.drain();
            if outs.is_empty() {
                return sent;
            }
            for o in outs {
                match o {
                    Output::Send(p) => sent.push(p),
                    Output::DataIn(d) => {
                        let mut q = OutQueue::new();
                        d.encode_into(&framer, &mut q);
                        let wire = q.take_all();
                        let mut pos = 0;
                        while pos < wire.len() {
                            let Ok(crate::iscsi::pdu::Decoded::Pdu(p, n)) =
                                target_side_decode(&wire[pos..])
                            else {
                                panic!("bad Data-In encoding")
                            };
                            sent.push(p);
                            pos += n;
                        }
                    }
                    Output::Execute(e) => {
                        let r = e.run();
                        s.on_complete(e.itt, r);
                    }
                    Output::Close(_) => {}
                }
            }
        }
    }

    /// Decodes a target PDU (the framer only accepts initiator opcodes, as a target should).
    fn target_side_decode(
        wire: &[u8],
    ) -> Result<crate::iscsi::pdu::Decoded, crate::iscsi::pdu::PduError> {
        let mut w = wire.to_vec();
        let real = w[0];
        w[0] = op::NOP_OUT;
        let framer = Framer {
            header_digest: false,
            data_digest: false,
            max_recv_data: 1 << 24,
        };
        let r = framer.decode(&w)?;
        Ok(match r {
            crate::iscsi::pdu::Decoded::Pdu(mut p, n) => {
                p.bhs[0] = real;
                crate::iscsi::pdu::Decoded::Pdu(p, n)
            }
            other => other,
        })
    }

    fn scsi_cmd(itt: u32, cmd_sn: u32, cdb: &[u8], edtl: u32, write: bool, data: Vec<u8>) -> Pdu {
        let mut p = Pdu::new(op::SCSI_CMD);
        let fin = if write && (data.len() as u32) < edtl {
            0
        } else {
            0x80
        };
        p.set_flags(fin | if write { 0x20 } else { 0x40 });
        p.set_itt(itt);
        p.set_u32(20, edtl);
        p.set_u32(24, cmd_sn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        p.data = data;
        p
    }

    fn write10(lba: u32, blocks: u16) -> Vec<u8> {
        let mut c = vec![0x2a, 0];
        c.extend_from_slice(&lba.to_be_bytes());
        c.push(0);
        c.extend_from_slice(&blocks.to_be_bytes());
        c.push(0);
        c
    }

    fn read10(lba: u32, blocks: u16) -> Vec<u8> {
        let mut c = write10(lba, blocks);
        c[0] = 0x28;
        c
    }

    fn data_out(itt: u32, ttt: u32, data_sn: u32, offset: u32, data: Vec<u8>, fin: bool) -> Pdu {
        let mut p = Pdu::new(op::DATA_OUT);
        p.set_flags(if fin { 0x80 } else { 0 });
        p.set_itt(itt);
        p.set_u32(20, ttt);
        p.set_u32(36, data_sn);
        p.set_u32(40, offset);
        p.data = data;
        p
    }

    #[test]
    fn write_with_immediate_unsolicited_and_solicited_data_then_read_back() {
        let mut s = session(false);
        let total = 40 * 512u32; // 20 KiB: 4 KiB immediate, 4 KiB unsolicited, 12 KiB by R2T
        let payload: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        s.on_pdu(scsi_cmd(
            1,
            10,
            &write10(8, 40),
            total,
            true,
            payload[..4096].to_vec(),
        ));
        assert!(
            pump(&mut s).is_empty(),
            "no R2T before the unsolicited burst ends"
        );
        s.on_pdu(data_out(
            1,
            RESERVED_TAG,
            0,
            4096,
            payload[4096..8192].to_vec(),
            true,
        ));
        let r2ts = pump(&mut s);
        // MaxBurstLength 16 KiB covers the remaining 12 KiB in one R2T.
        assert_eq!(r2ts.len(), 1);
        let r2t = &r2ts[0];
        assert_eq!(
            (r2t.opcode(), r2t.u32_at(40), r2t.u32_at(44)),
            (op::R2T, 8192, 12288)
        );
        let ttt = r2t.u32_at(20);
        // The solicited Data-Outs the way the driver hands them over: the header decoded, the
        // data still in the receive buffer.
        for (sn, off) in [(0u32, 8192usize), (1, 16384)] {
            let end = (off + 8192).min(total as usize);
            let header = data_out(1, ttt, sn, off as u32, Vec::new(), end == total as usize);
            s.on_data_out_ref(&header, &payload[off..end]);
        }
        let resp = pump(&mut s);
        assert_eq!(resp.len(), 1);
        assert_eq!((resp[0].opcode(), resp[0].u8_at(3)), (op::SCSI_RESP, 0));
        assert_eq!(resp[0].u32_at(24), 100, "first StatSN");

        // Read it back: 20 KiB in Data-In PDUs of at most 8 KiB, status in the last one.
        s.on_pdu(scsi_cmd(2, 11, &read10(8, 40), total, false, Vec::new()));
        let din = pump(&mut s);
        assert_eq!(din.len(), 3);
        let mut got = Vec::new();
        for (i, p) in din.iter().enumerate() {
            assert_eq!(p.opcode(), op::DATA_IN);
            assert_eq!(p.u32_at(36), i as u32, "DataSN");
            assert_eq!(p.u32_at(40) as usize, got.len(), "buffer offset");
            got.extend_from_slice(&p.data);
        }
        assert_eq!(got, payload);
        let last = din.last().unwrap();
        assert_eq!(last.flags() & 0x81, 0x81, "F and S on the last Data-In");
        assert_eq!(last.u32_at(24), 101, "StatSN of the collapsed status");
        // The burst boundary at 16 KiB ends a sequence (F bit) on the second PDU.
        assert_eq!(din[1].flags() & 0x80, 0x80);
        assert_eq!(din[0].flags() & 0x80, 0);
    }

    /// A solicited Data-Out read straight into its command's buffer (the driver's path for
    /// large data segments) lands like one handed over from the receive buffer; a Data-Out
    /// out of order or past the EDTL is not offered the buffer and fails the usual way.
    #[test]
    fn data_out_read_into_the_command_buffer() {
        let mut s = session(true);
        let total = 40 * 512u32;
        let payload: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
        s.on_pdu(scsi_cmd(1, 10, &write10(8, 40), total, true, Vec::new()));
        let r2ts = pump(&mut s);
        assert_eq!(r2ts.len(), 2, "16 KiB MaxBurstLength: two R2Ts");
        let ttt = r2ts[0].u32_at(20);
        // Out of order: not offered.
        let late = data_out(1, ttt, 0, 8192, Vec::new(), false);
        assert!(s.take_data_out_buffer(&late, 8192).is_none());
        // Past the EDTL: not offered.
        let long = data_out(1, ttt, 0, 0, Vec::new(), false);
        assert!(
            s.take_data_out_buffer(&long, total as usize + 512)
                .is_none()
        );
        // In order: the first 16 KiB directly, in two pieces as reads would bring them.
        let first = data_out(1, ttt, 0, 0, Vec::new(), true);
        let mut buf = s.take_data_out_buffer(&first, 16384).unwrap();
        assert!(buf.is_empty());
        buf.extend_from_slice(&payload[..5000]);
        buf.extend_from_slice(&payload[5000..16384]);
        s.on_data_out_direct(&first, buf, 16384);
        assert!(
            pump(&mut s).is_empty(),
            "the second R2T's data is still due"
        );
        let ttt2 = r2ts[1].u32_at(20);
        let second = data_out(1, ttt2, 0, 16384, Vec::new(), true);
        s.on_data_out_ref(&second, &payload[16384..]);
        let resp = pump(&mut s);
        assert_eq!((resp[0].opcode(), resp[0].u8_at(3)), (op::SCSI_RESP, 0));
        s.on_pdu(scsi_cmd(2, 11, &read10(8, 40), total, false, Vec::new()));
        let got: Vec<u8> = pump(&mut s).iter().flat_map(|p| p.data.clone()).collect();
        assert_eq!(got, payload);

        // A direct Data-Out with a wrong DataSN fails its command like any other.
        s.on_pdu(scsi_cmd(3, 12, &write10(8, 8), 4096, true, Vec::new()));
        let r2t = pump(&mut s);
        let bad = data_out(3, r2t[0].u32_at(20), 5, 0, Vec::new(), true);
        let mut buf = s.take_data_out_buffer(&bad, 4096).unwrap();
        buf.extend_from_slice(&[0xee; 4096]);
        s.on_data_out_direct(&bad, buf, 4096);
        let resp = pump(&mut s);
        assert_eq!(
            (resp[0].opcode(), resp[0].u8_at(3)),
            (op::SCSI_RESP, 2),
            "CHECK CONDITION"
        );
    }

    #[test]
    fn residuals_and_short_reads() {
        let mut s = session(true);
        // INQUIRY with allocation length 255 but EDTL 16: overflow residual.
        let inquiry = [0x12u8, 0, 0, 0, 255, 0];
        s.on_pdu(scsi_cmd(5, 10, &inquiry, 16, false, Vec::new()));
        let out = pump(&mut s);
        let last = out.last().unwrap();
        assert_eq!(last.data.len(), 16);
        assert_eq!(last.flags() & 0x04, 0x04, "overflow");
        assert!(last.u32_at(44) > 0);
        // A one-block read with EDTL of two blocks: underflow of one block.
        s.on_pdu(scsi_cmd(6, 11, &read10(0, 1), 1024, false, Vec::new()));
        let out = pump(&mut s);
        let last = out.last().unwrap();
        assert_eq!((last.flags() & 0x02, last.u32_at(44)), (0x02, 512));
    }

    #[test]
    fn bad_data_sn_fails_the_command_but_keeps_the_connection() {
        let mut s = session(true);
        s.on_pdu(scsi_cmd(7, 10, &write10(0, 4), 2048, true, Vec::new()));
        let r2t = pump(&mut s);
        let ttt = r2t[0].u32_at(20);
        s.on_pdu(data_out(7, ttt, 5, 0, vec![1; 1024], false));
        let out = pump(&mut s);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].u8_at(3), Status::CheckCondition as u8);
        assert!(!s.closing);
        // The rest of that write is dropped; the next command works.
        s.on_pdu(data_out(7, ttt, 1, 1024, vec![1; 1024], true));
        s.on_pdu(scsi_cmd(8, 11, &[0, 0, 0, 0, 0, 0], 0, false, Vec::new()));
        let out = pump(&mut s);
        assert_eq!((out.len(), out[0].itt(), out[0].u8_at(3)), (1, 8, 0));
    }

    #[test]
    fn cmd_sn_window_and_ordering() {
        let mut s = session(true);
        let tur = [0u8; 6];
        // Beyond MaxCmdSN: silently ignored.
        s.on_pdu(scsi_cmd(1, 10 + CMD_WINDOW, &tur, 0, false, Vec::new()));
        assert!(pump(&mut s).is_empty());
        // Below ExpCmdSN: ignored too.
        s.on_pdu(scsi_cmd(2, 9, &tur, 0, false, Vec::new()));
        assert!(pump(&mut s).is_empty());
        // Out of order within the window: held until the gap fills, then run in order.
        s.on_pdu(scsi_cmd(3, 11, &tur, 0, false, Vec::new()));
        assert!(pump(&mut s).is_empty());
        s.on_pdu(scsi_cmd(4, 10, &tur, 0, false, Vec::new()));
        let out = pump(&mut s);
        assert_eq!(out.iter().map(Pdu::itt).collect::<Vec<_>>(), vec![4, 3]);
        assert_eq!(out[1].u32_at(28), 12, "ExpCmdSN");
    }

    #[test]
    fn nop_text_tmf_and_logout() {
        let mut s = session(true);
        let mut nop = Pdu::new(op::NOP_OUT);
        nop.bhs[0] |= 0x40;
        nop.set_flags(0x80);
        nop.set_itt(9);
        nop.set_u32(20, RESERVED_TAG);
        nop.data = b"ping".to_vec();
        s.on_pdu(nop);
        let out = pump(&mut s);
        assert_eq!(
            (out[0].opcode(), out[0].itt(), out[0].data.as_slice()),
            (op::NOP_IN, 9, &b"ping"[..])
        );

        let mut text = Pdu::new(op::TEXT_REQ);
        text.set_flags(0x80);
        text.set_itt(10);
        text.set_u32(20, RESERVED_TAG);
        text.set_u32(24, 10);
        text.data = b"SendTargets=\0X-Vendor=1\0".to_vec();
        s.on_pdu(text);
        let out = pump(&mut s);
        let body = String::from_utf8_lossy(&out[0].data).to_string();
        assert!(body.contains(&format!("TargetName={TARGET}")), "{body}");
        assert!(body.contains("TargetAddress=192.0.2.1:3260,1"), "{body}");
        assert!(body.contains("X-Vendor=NotUnderstood"), "{body}");

        // ABORT TASK of a write still waiting for data: the task goes, the TMF completes.
        s.on_pdu(scsi_cmd(11, 11, &write10(0, 2), 1024, true, Vec::new()));
        let _ = pump(&mut s);
        let mut tmf = Pdu::new(op::TMF_REQ);
        tmf.bhs[0] |= 0x40;
        tmf.set_flags(0x80 | 1);
        tmf.set_itt(12);
        tmf.set_u32(20, 11);
        tmf.set_u32(24, 12);
        s.on_pdu(tmf);
        let out = pump(&mut s);
        assert_eq!(
            (out[0].opcode(), out[0].itt(), out[0].u8_at(2)),
            (op::TMF_RESP, 12, 0)
        );
        assert_eq!(s.active_tasks(), 0);

        let mut lo = Pdu::new(op::LOGOUT_REQ);
        lo.bhs[0] |= 0x40;
        lo.set_flags(0x80);
        lo.set_itt(13);
        lo.set_u32(24, 12);
        s.on_pdu(lo);
        let outs = s.drain();
        assert!(matches!(&outs[0], Output::Send(p) if p.opcode() == op::LOGOUT_RESP));
        assert!(matches!(&outs[1], Output::Close(_)));
    }

    #[test]
    fn login_without_and_with_chap() {
        let reg = registry();
        let mut l = Login::new();
        let mut req = Pdu::new(op::LOGIN_REQ);
        req.bhs[0] |= 0x40;
        req.set_flags(0x80 | (1 << 2) | 3); // T, CSG 1 -> NSG 3
        req.bhs[8] = 0x80;
        req.set_u32(24, 1);
        req.data = format!(
            "InitiatorName={INITIATOR}\0TargetName={TARGET}\0SessionType=Normal\0HeaderDigest=CRC32C,None\0MaxBurstLength=1048576\0FirstBurstLength=65536\0ImmediateData=Yes\0InitialR2T=No\0X-foo=bar\0"
        )
        .into_bytes();
        let Step::Complete(resp, li) = l.on_request(&req, &reg) else {
            panic!("login failed")
        };
        let text = String::from_utf8_lossy(&resp.data).to_string();
        assert!(
            text.contains("HeaderDigest=CRC32C") && text.contains("X-foo=NotUnderstood"),
            "{text}"
        );
        assert!(text.contains("TargetPortalGroupTag=1"));
        assert_eq!((resp.u8_at(36), resp.flags() & 0x83), (0, 0x83));
        assert!(li.params.header_digest && !li.params.initial_r2t);
        assert_eq!(
            (li.params.max_burst, li.params.first_burst),
            (1 << 20, OUR_FIRST_BURST.min(65536))
        );

        // An initiator not on the list: 0202.
        let mut l = Login::new();
        req.data = format!("InitiatorName=iqn.x:other\0TargetName={TARGET}\0").into_bytes();
        let Step::Fail(resp, _) = l.on_request(&req, &reg) else {
            panic!("should fail")
        };
        assert_eq!((resp.u8_at(36), resp.u8_at(37)), (2, 2));
    }

    fn arb_pdu() -> impl Strategy<Value = Pdu> {
        (
            prop::sample::select(vec![
                op::NOP_OUT,
                op::SCSI_CMD,
                op::TMF_REQ,
                op::TEXT_REQ,
                op::DATA_OUT,
                op::LOGOUT_REQ,
                op::SNACK,
                op::LOGIN_REQ,
            ]),
            any::<bool>(),
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 48),
            0u32..16,
            0u32..140,
            prop::collection::vec(any::<u8>(), 0..9000),
            prop::sample::select(vec![
                0x00u8, 0x28, 0x2a, 0x12, 0xa0, 0x35, 0x42, 0x89, 0x41, 0x9e,
            ]),
        )
            .prop_map(|(opc, imm, flags, raw, itt, sn, data, cdb0)| {
                let mut p = Pdu::new(opc);
                p.bhs[2..48].copy_from_slice(&raw[2..48]);
                p.bhs[0] = opc | if imm { 0x40 } else { 0 };
                p.set_flags(flags);
                p.set_itt(itt);
                p.set_u32(24, 10 + sn);
                p.set_u32(20, p.u32_at(20) % 70_000);
                if opc == op::SCSI_CMD {
                    p.bhs[32] = cdb0;
                }
                if opc == op::DATA_OUT {
                    p.set_u32(
                        20,
                        if flags & 1 == 0 {
                            RESERVED_TAG
                        } else {
                            sn % 4 + 1
                        },
                    );
                    p.set_u32(36, sn % 3);
                    p.set_u32(40, (sn % 8) * 512);
                }
                p.bhs[8..16].fill(0);
                p.data = data;
                p
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("MAAS_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
        ))]

        /// Hostile PDU sequences: never a panic, and what the session holds stays bounded.
        #[test]
        fn session_survives_hostile_sequences(pdus in prop::collection::vec(arb_pdu(), 1..60),
                                              initial_r2t: bool) {
            let mut s = session(initial_r2t);
            for p in pdus {
                s.on_pdu(p);
                let _ = pump(&mut s);
                prop_assert!(s.tasks.len() <= 2 * CMD_WINDOW as usize);
                prop_assert!(s.queued.len() <= CMD_WINDOW as usize);
                prop_assert!(s.r2t_used <= R2T_BUDGET + u64::from(MAX_WRITE));
            }
        }

        /// Hostile login requests: never a panic; every answer is a login response.
        #[test]
        fn login_survives_hostile_requests(reqs in prop::collection::vec(
            (any::<u8>(), prop::collection::vec(any::<u8>(), 48),
             prop::collection::vec(prop::sample::select(vec![
                 "InitiatorName=iqn.2026-11.test:host", "TargetName=iqn.2026-11.io.maas:test",
                 "SessionType=Discovery", "SessionType=Normal", "AuthMethod=CHAP,None",
                 "AuthMethod=None", "CHAP_A=5", "CHAP_N=x", "CHAP_R=0x00", "CHAP_I=1",
                 "CHAP_C=0xzz", "HeaderDigest=CRC32C", "MaxRecvDataSegmentLength=1",
                 "MaxBurstLength=999999999999", "FirstBurstLength=x", "=", "a", "InitialR2T=Maybe",
             ]), 0..8)), 1..6)) {
            let reg = registry();
            let mut l = Login::new();
            for (flags, raw, keys) in reqs {
                let mut p = Pdu::new(op::LOGIN_REQ);
                p.bhs[2..48].copy_from_slice(&raw[2..48]);
                p.bhs[0] = 0x43;
                p.set_flags(flags);
                p.data = keys.join("\0").into_bytes();
                let step = l.on_request(&p, &reg);
                let (Step::Continue(r) | Step::Complete(r, _) | Step::Fail(r, _)) = &step;
                prop_assert_eq!(r.opcode(), op::LOGIN_RESP);
                if matches!(step, Step::Fail(..) | Step::Complete(..)) {
                    break;
                }
            }
        }
    }

    /// Queuing Data-In by reference puts the same bytes on the wire as copying it, with and
    /// without digests, across PDU and burst boundaries.
    #[test]
    fn data_in_by_reference_matches_data_in_by_copy() {
        for (hd, dd) in [(false, false), (true, true), (false, true)] {
            for len in [0usize, 1, 4093, 20_000, 300_001, 1 << 20] {
                let framer = Framer {
                    header_digest: hd,
                    data_digest: dd,
                    max_recv_data: 1 << 20,
                };
                let mut bhs = [0u8; BHS_LEN];
                bhs[0] = op::DATA_IN;
                bhs[24..28].copy_from_slice(&7u32.to_be_bytes());
                let make = || DataIn {
                    bhs,
                    data: (0..len).map(|i| (i % 253) as u8).collect(),
                    max_seg: 65_536 + 3,
                    max_burst: 262_144,
                    status: Some(0),
                };
                // Every PDU copied whole into one buffer: the plain encoding.
                let d = make();
                let mut copied = Vec::new();
                for (bhs, range) in d.pdus() {
                    framer.encode_parts(&bhs, &[], &d.data[range], &mut copied);
                }
                let mut q = OutQueue::new();
                make().encode_into(&framer, &mut q);
                assert_eq!(q.take_all(), copied, "len {len} hd {hd} dd {dd}");
            }
        }
    }
}
