//! A logical unit over one pool volume: the state every session shares (reservations, unit
//! attentions, mode parameters, medium state) and the dispatch of each command to its handler.
//! The block commands live in [`super::block`], EXTENDED COPY in [`super::xcopy`], SANITIZE in
//! [`super::sanitize`].

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use maas_pool::{BlockDevice, PoolError};
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::cdb::{be16, be32, block_range, op, sa, u8_at};
use super::inquiry::{self, InquiryContext};
use super::limits::Limits;
use super::mode::{self, ModeParams, ModeSenseContext};
use super::opcodes::{self, CommandInfo};
use super::pr::{Access, Outcome, Reservations};
use super::sanitize::{self, SanitizeStatus, SanitizeTracker};
use super::sense::{Asc, Sense, SenseKey};
use super::ua::UnitAttentions;
use super::xcopy::CopyResults;
use super::{Command, Nexus, Response, Status};
use crate::flow::Start;

pub use super::ident::{DEFAULT_COMPANY_ID, LuIdentity};

/// One logical unit. Shared by every session that exports the volume (wrap it in an `Arc`);
/// [`LogicalUnit::execute`] may run concurrently from many threads.
pub struct LogicalUnit {
    pub(super) dev: Arc<dyn BlockDevice>,
    pub(super) ident: LuIdentity,
    pub(super) limits: Limits,
    pub(super) state: Mutex<LuState>,
    /// Writes hold this shared; COMPARE AND WRITE, ORWRITE and EXTENDED COPY hold it
    /// exclusively, which makes their read-then-write atomic with respect to every other write
    /// through this logical unit. A sanitize operation takes it exclusively once, to let the
    /// writes in flight finish before it starts.
    pub(super) write_order: RwLock<()>,
    /// Sanitize operations (shared with the thread running one).
    pub(super) sanitize: Arc<SanitizeTracker>,
}

/// State shared by all I_T nexuses, behind one short-held lock (never held across I/O).
#[derive(Debug)]
pub(super) struct LuState {
    pub reservations: Reservations,
    pub unit_attentions: UnitAttentions,
    pub mode: ModeParams,
    /// Capacity in blocks when last seen, to report CAPACITY DATA HAS CHANGED after a resize.
    pub capacity_blocks: u64,
    /// Always true unless a removable medium was ejected.
    pub medium_loaded: bool,
    /// I_T nexuses that sent PREVENT ALLOW MEDIUM REMOVAL with PREVENT set.
    pub prevent_removal: HashSet<Nexus>,
    pub copy_results: CopyResults,
}

impl fmt::Debug for LogicalUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogicalUnit")
            .field("ident", &self.ident)
            .field("limits", &self.limits)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Which way an I/O error happened, for choosing its sense code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IoKind {
    Read,
    Write,
}

impl LogicalUnit {
    pub fn new(dev: Arc<dyn BlockDevice>, ident: LuIdentity) -> LogicalUnit {
        let limits = Limits::new(dev.block_size()).with_atomic_max(dev.atomic_write_max());
        let capacity_blocks = dev.capacity() / u64::from(limits.block_size);
        LogicalUnit {
            dev,
            ident,
            limits,
            state: Mutex::new(LuState {
                reservations: Reservations::default(),
                unit_attentions: UnitAttentions::default(),
                mode: ModeParams::default(),
                capacity_blocks,
                medium_loaded: true,
                prevent_removal: HashSet::new(),
                copy_results: CopyResults::default(),
            }),
            write_order: RwLock::new(()),
            sanitize: Arc::new(SanitizeTracker::default()),
        }
    }

    pub fn identity(&self) -> &LuIdentity {
        &self.ident
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.limits.block_size
    }

    /// Most bytes of Data-In `cdb` makes [`LogicalUnit::execute`] hold, for a transport that
    /// expects `expected` of them: a READ's blocks (at most the maximum transfer length),
    /// whatever the transport expects; for other commands, what it expects (their data is
    /// small and bounded by their allocation length).
    pub fn data_in_bound(&self, cdb: &[u8], expected: u32) -> usize {
        let read = matches!(
            cdb.first(),
            Some(&(op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16))
        );
        let mut bound = expected as usize;
        if read {
            let blocks = block_range(cdb).blocks.min(self.limits.max_transfer);
            bound = bound.max(blocks as usize * self.limits.block_size as usize);
        }
        bound
    }

    /// Executes one command to completion. Never panics, whatever the CDB and Data-Out; the
    /// Data-In it returns is bounded by the CDB's allocation length or the maximum transfer
    /// length (16 MiB). May block on pool I/O: call it from a blocking thread.
    pub fn execute(&self, cmd: &Command<'_>) -> Response {
        let lookup = opcodes::lookup(cmd.cdb);
        let mut response = match self.admit(cmd, lookup) {
            Ok((info, blocks)) => self
                .dispatch(info, cmd, blocks)
                .unwrap_or_else(Response::check),
            Err(response) => response,
        };
        if let Ok(info) = lookup {
            response.spdtl_out = self.data_out_length(info, cmd.cdb);
        }
        response
    }

    /// Executes a READ, or a WRITE the write cache may absorb (no FUA), if it completes without
    /// waiting: the blocks to read are in memory, the write fits the write-ahead log's memory.
    /// Returns None, having changed nothing, for every other command and whenever it would have
    /// to wait: then run it with [`LogicalUnit::execute`] on a blocking thread. Made for a
    /// network thread, which it never blocks on I/O.
    pub fn execute_nowait(&self, cmd: &Command<'_>) -> Option<Response> {
        let opcode = *cmd.cdb.first()?;
        if !matches!(
            opcode,
            op::READ_6
                | op::READ_10
                | op::READ_12
                | op::READ_16
                | op::WRITE_6
                | op::WRITE_10
                | op::WRITE_12
                | op::WRITE_16
        ) {
            return None;
        }
        let lookup = opcodes::lookup(cmd.cdb);
        // Admission changes nothing when it admits (a unit attention is only taken when it is
        // the answer), so a command admitted here and run again by `execute` is admitted once.
        let result = match self.admit(cmd, lookup) {
            Ok((info, blocks)) => {
                let outcome = if matches!(
                    info.op,
                    op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16
                ) {
                    self.read_nowait(cmd.cdb, blocks)
                } else {
                    self.write_nowait(cmd.cdb, cmd.data_out, blocks)
                };
                outcome?.unwrap_or_else(Response::check)
            }
            Err(response) => response,
        };
        let mut response = result;
        if let Ok(info) = lookup {
            response.spdtl_out = self.data_out_length(info, cmd.cdb);
        }
        Some(response)
    }

    /// Starts a command on the caller's (network) thread: a READ answered from memory or a
    /// WRITE the cache takes without waiting completes here (as [`LogicalUnit::execute_nowait`]),
    /// a READ that waits only for the device becomes a future that waits without a blocking
    /// thread (see [`maas_pool::BlockDevice::read_async`]); every other command, and any that
    /// cannot be done that way, is [`Start::Blocking`], having changed nothing: run it with
    /// [`LogicalUnit::execute`] on a blocking thread.
    pub fn execute_start(self: &Arc<Self>, cmd: &Command<'_>) -> Start<Response> {
        let Some(&opcode) = cmd.cdb.first() else {
            return Start::Blocking;
        };
        if !matches!(opcode, op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16) {
            return match self.execute_nowait(cmd) {
                Some(r) => Start::Done(r),
                None => Start::Blocking,
            };
        }
        let lookup = opcodes::lookup(cmd.cdb);
        let spdtl = lookup
            .as_ref()
            .ok()
            .map(|info| self.data_out_length(info, cmd.cdb));
        let with_spdtl = move |mut r: Response| {
            if let Some(n) = spdtl {
                r.spdtl_out = n;
            }
            r
        };
        match self.admit(cmd, lookup) {
            Ok((_, blocks)) => match self.read_start(cmd.cdb, blocks) {
                Start::Done(r) => Start::Done(with_spdtl(r.unwrap_or_else(Response::check))),
                Start::Future(read) => Start::Future(Box::pin(async move {
                    with_spdtl(read.await.unwrap_or_else(Response::check))
                })),
                Start::Blocking => Start::Blocking,
            },
            // Admission refused (it took a unit attention, if that is the answer): that is the
            // command's answer.
            Err(response) => Start::Done(with_spdtl(response)),
        }
    }

    /// LOGICAL UNIT RESET, or a target reset reaching this logical unit: RESERVE(6)
    /// reservations, medium removal prevention and mode parameters return to their initial
    /// state (persistent reservations stay), and every I_T nexus that has used the logical unit
    /// gets the unit attention BUS DEVICE RESET FUNCTION OCCURRED.
    pub fn reset(&self) {
        self.reset_except(None);
    }

    /// As [`LogicalUnit::reset`], for a reset requested by a task management function received
    /// through `requester`: that I_T nexus knows of the reset and gets no unit attention for it.
    pub fn reset_requested_by(&self, requester: &Nexus) {
        self.reset_except(Some(requester));
    }

    fn reset_except(&self, requester: Option<&Nexus>) {
        let mut st = self.state.lock();
        st.reservations.reset();
        st.prevent_removal.clear();
        st.mode = ModeParams::default();
        st.unit_attentions
            .establish_all(Asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED, requester);
    }

    /// The I_T nexus ended (logout, connection loss, session reinstatement): its RESERVE(6)
    /// reservation, medium removal prevention and pending unit attentions go; its persistent
    /// reservation registration stays.
    pub fn nexus_gone(&self, nexus: &Nexus) {
        let mut st = self.state.lock();
        st.reservations.nexus_gone(nexus);
        st.prevent_removal.remove(nexus);
        st.unit_attentions.forget(nexus);
        st.copy_results.nexus_gone(nexus);
    }

    /// Current capacity in logical blocks.
    pub(super) fn capacity_blocks(&self) -> u64 {
        self.dev.capacity() / u64::from(self.limits.block_size)
    }

    /// Everything that decides whether a command runs at all, in SAM-5 order: a pending unit
    /// attention, then an invalid CDB (or a command this logical unit does not implement), then
    /// a reservation conflict, then a missing medium, then a sanitize operation running or
    /// failed.
    /// Returns the command and the capacity in blocks it should see.
    fn admit(
        &self,
        cmd: &Command<'_>,
        lookup: Result<&'static CommandInfo, Sense>,
    ) -> Result<(&'static CommandInfo, u64), Response> {
        let blocks = self.capacity_blocks();
        let mut st = self.state.lock();
        if st.capacity_blocks != blocks {
            st.capacity_blocks = blocks;
            st.unit_attentions
                .establish_all(Asc::CAPACITY_DATA_HAS_CHANGED, None);
        }
        st.unit_attentions.touch(cmd.nexus);
        // INQUIRY and REPORT LUNS run without reporting a unit attention; REQUEST SENSE returns
        // it as its data.
        let opcode = cmd.cdb.first().copied();
        if !matches!(
            opcode,
            Some(op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE)
        ) && let Some(asc) = st.unit_attentions.take(cmd.nexus)
        {
            return Err(Response::check(Sense::unit_attention(asc)));
        }
        let info = lookup.map_err(Response::check)?;
        if !self.implemented(info) {
            return Err(Response::check(Sense::invalid_opcode()));
        }
        if st.reservations.conflicts(cmd.nexus, access(info, cmd.cdb)) {
            return Err(Response::status(Status::ReservationConflict));
        }
        if !st.medium_loaded && needs_medium(info) {
            return Err(Response::check(Sense::new(
                SenseKey::NotReady,
                Asc::MEDIUM_NOT_PRESENT,
            )));
        }
        match self.sanitize.status() {
            // SBC-4 4.11.3: only INQUIRY, REPORT LUNS and REQUEST SENSE run meanwhile.
            SanitizeStatus::Running { progress, .. }
                if !matches!(info.op, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE) =>
            {
                return Err(Response::check(sanitize::in_progress(progress)));
            }
            // The medium stays inaccessible until a sanitize succeeds or its failure is exited.
            SanitizeStatus::Failed { .. } if needs_medium(info) && info.op != op::SANITIZE => {
                return Err(Response::check(sanitize::failed()));
            }
            _ => {}
        }
        Ok((info, blocks))
    }

    /// Whether this logical unit implements a command of the table: WRITE ATOMIC only over a
    /// block device that writes atomically.
    pub(super) fn implemented(&self, info: &CommandInfo) -> bool {
        info.op != op::WRITE_ATOMIC_16 || self.limits.max_atomic > 0
    }

    fn dispatch(
        &self,
        info: &CommandInfo,
        cmd: &Command<'_>,
        blocks: u64,
    ) -> Result<Response, Sense> {
        let cdb = cmd.cdb;
        match info.op {
            op::TEST_UNIT_READY => Ok(Response::good()),
            op::REQUEST_SENSE => Ok(self.request_sense(cmd)),
            op::INQUIRY => {
                let ctx = InquiryContext {
                    ident: &self.ident,
                    limits: &self.limits,
                    nexus: cmd.nexus,
                    third_party_copy: true,
                };
                inquiry::inquiry(cdb, &ctx).map(Response::data)
            }
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
                let params = self.state.lock().mode;
                let ctx = ModeSenseContext {
                    params,
                    block_size: self.limits.block_size,
                    blocks,
                    write_protected: self.ident.read_only || params.swp,
                };
                mode::mode_sense(cdb, info.op == op::MODE_SENSE_10, &ctx).map(Response::data)
            }
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => self.mode_select(info, cmd, blocks),
            op::RESERVE_6 => Ok(outcome_response(
                self.state.lock().reservations.reserve6(cmd.nexus),
            )),
            op::RELEASE_6 => {
                self.state.lock().reservations.release6(cmd.nexus);
                Ok(Response::good())
            }
            op::PERSISTENT_RESERVE_IN => self
                .state
                .lock()
                .reservations
                .persistent_reserve_in(cdb)
                .map(Response::data),
            op::PERSISTENT_RESERVE_OUT => Ok(self.persistent_reserve_out(cmd)),
            op::START_STOP_UNIT => self.start_stop_unit(cmd),
            op::PREVENT_ALLOW_MEDIUM_REMOVAL => self.prevent_allow(cmd),
            op::SEND_DIAGNOSTIC => send_diagnostic(cdb),
            op::MAINTENANCE_IN if info.sa == Some(sa::REPORT_SUPPORTED_OPERATION_CODES) => {
                opcodes::report_supported_operation_codes(cdb, |c| self.implemented(c))
                    .map(Response::data)
            }
            op::REPORT_LUNS => {
                // Only the transport knows the other LUNs of the target; it answers REPORT
                // LUNS itself with super::luns::report_luns.
                tracing::warn!("REPORT LUNS reached a logical unit; the transport must answer it");
                Err(Sense::invalid_opcode())
            }
            op::SANITIZE => self.sanitize(info, cmd),
            op::EXTENDED_COPY => self.extended_copy(cmd, blocks),
            op::RECEIVE_COPY_RESULTS => self.receive_copy_results(cmd),
            _ => self.block_command(info, cmd, blocks),
        }
    }

    /// REQUEST SENSE (SPC-4 6.39): the pending unit attention, if any, or the logical unit's
    /// current condition, in the format the DESC bit asks for.
    fn request_sense(&self, cmd: &Command<'_>) -> Response {
        let sense = {
            let mut st = self.state.lock();
            match st.unit_attentions.take(cmd.nexus) {
                Some(asc) => Sense::unit_attention(asc),
                None if !st.medium_loaded => {
                    Sense::new(SenseKey::NotReady, Asc::MEDIUM_NOT_PRESENT)
                }
                // The way to poll a sanitize operation's progress (SBC-4 4.11.3).
                None => match self.sanitize.status() {
                    SanitizeStatus::Running { progress, .. } => sanitize::in_progress(progress),
                    SanitizeStatus::Failed { .. } => sanitize::failed(),
                    SanitizeStatus::Idle => Sense::no_sense(),
                },
            }
        };
        let mut data = if u8_at(cmd.cdb, 1) & 0x01 != 0 {
            sense.to_descriptor()
        } else {
            sense.to_fixed().to_vec()
        };
        data.truncate(usize::from(u8_at(cmd.cdb, 4)));
        Response::data(data)
    }

    fn mode_select(
        &self,
        info: &CommandInfo,
        cmd: &Command<'_>,
        blocks: u64,
    ) -> Result<Response, Sense> {
        let mut st = self.state.lock();
        let current = st.mode;
        let next = mode::mode_select(
            cmd.cdb,
            info.op == op::MODE_SELECT_10,
            cmd.data_out,
            &current,
            self.limits.block_size,
            blocks,
        )?;
        if next != current {
            st.mode = next;
            st.unit_attentions
                .establish_all(Asc::MODE_PARAMETERS_CHANGED, Some(cmd.nexus));
        }
        Ok(Response::good())
    }

    fn persistent_reserve_out(&self, cmd: &Command<'_>) -> Response {
        let mut st = self.state.lock();
        let (outcome, notices) =
            st.reservations
                .persistent_reserve_out(cmd.nexus, cmd.cdb, cmd.data_out);
        for (nexus, asc) in notices {
            st.unit_attentions.establish(&nexus, asc);
        }
        outcome_response(outcome)
    }

    /// START STOP UNIT (SBC-3 5.25). A pool volume has no spindle and no power conditions, so
    /// starting, stopping and power condition changes succeed without effect (stopping flushes
    /// unless NO_FLUSH). A removable medium can be ejected and loaded.
    fn start_stop_unit(&self, cmd: &Command<'_>) -> Result<Response, Sense> {
        let byte4 = u8_at(cmd.cdb, 4);
        let (power_condition, no_flush, loej, start) = (
            byte4 >> 4,
            byte4 & 0x04 != 0,
            byte4 & 0x02 != 0,
            byte4 & 0x01 != 0,
        );
        if power_condition != 0 {
            return Ok(Response::good());
        }
        if loej && !self.ident.removable {
            return Err(Sense::invalid_cdb_field(4, Some(1)));
        }
        if loej && start {
            self.state.lock().medium_loaded = true;
            return Ok(Response::good());
        }
        if loej && !self.state.lock().prevent_removal.is_empty() {
            return Err(Sense::illegal_request(Asc::MEDIUM_REMOVAL_PREVENTED));
        }
        if !start && !no_flush {
            self.dev
                .flush()
                .map_err(|e| self.io_sense(&e, IoKind::Write))?;
        }
        if loej {
            self.state.lock().medium_loaded = false;
        }
        Ok(Response::good())
    }

    /// PREVENT ALLOW MEDIUM REMOVAL (SBC-3 5.10): prevention is per I_T nexus and lasts until
    /// that nexus allows removal again, ends, or the logical unit is reset.
    fn prevent_allow(&self, cmd: &Command<'_>) -> Result<Response, Sense> {
        let mut st = self.state.lock();
        match u8_at(cmd.cdb, 4) & 0x03 {
            0 => {
                st.prevent_removal.remove(cmd.nexus);
            }
            1 => {
                st.prevent_removal.insert(cmd.nexus.clone());
            }
            // Persistent prevention (10b/11b) is obsolete.
            _ => return Err(Sense::invalid_cdb_field(4, Some(1))),
        }
        Ok(Response::good())
    }

    /// None when the medium accepts writes, else why not.
    pub(super) fn write_protection(&self) -> Option<Sense> {
        if self.ident.read_only {
            return Some(Sense::new(SenseKey::DataProtect, Asc::WRITE_PROTECTED));
        }
        if self.state.lock().mode.swp {
            return Some(Sense::new(
                SenseKey::DataProtect,
                Asc::SOFTWARE_WRITE_PROTECTED,
            ));
        }
        None
    }

    pub(super) fn check_writable(&self) -> Result<(), Sense> {
        self.write_protection().map_or(Ok(()), Err)
    }

    /// Holds the write order shared, for a write. Refused once a sanitize operation has begun:
    /// a write admitted before it began but not yet under way must not land while it runs (or
    /// behind it, on blocks it has already sanitized).
    pub(super) fn write_shared(&self) -> Result<RwLockReadGuard<'_, ()>, Sense> {
        let order = self.write_order.read();
        self.sanitize.check_medium_access()?;
        Ok(order)
    }

    /// As [`LogicalUnit::write_shared`] if the write order is free now; None otherwise.
    pub(super) fn try_write_shared(&self) -> Option<Result<RwLockReadGuard<'_, ()>, Sense>> {
        let order = self.write_order.try_read()?;
        Some(self.sanitize.check_medium_access().map(|()| order))
    }

    /// As [`LogicalUnit::write_shared`], exclusively (read-then-write commands).
    pub(super) fn write_exclusive(&self) -> Result<RwLockWriteGuard<'_, ()>, Sense> {
        let order = self.write_order.write();
        self.sanitize.check_medium_access()?;
        Ok(order)
    }

    /// Whether writes are acknowledged before they are durable (WCE).
    pub(super) fn write_cache_enabled(&self) -> bool {
        self.state.lock().mode.wce
    }

    /// Maps a pool error to sense data (and logs it: the initiator only sees the code).
    pub(super) fn io_sense(&self, err: &PoolError, kind: IoKind) -> Sense {
        let sense = pool_error_sense(err, kind);
        tracing::warn!(
            serial = %self.ident.serial,
            error = %err,
            key = ?sense.key,
            asc = format_args!("{:02X}h/{:02X}h", sense.asc.0, sense.asc.1),
            "pool I/O failed"
        );
        sense
    }

    /// The number of Data-Out bytes the CDB asks for (SPDTL), for the transport's residuals.
    fn data_out_length(&self, info: &CommandInfo, cdb: &[u8]) -> u32 {
        let block_size = self.limits.block_size;
        let blocks = |n: u32| n.saturating_mul(block_size);
        match info.op {
            op::WRITE_6
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
            | op::WRITE_AND_VERIFY_10
            | op::WRITE_AND_VERIFY_12
            | op::WRITE_AND_VERIFY_16
            | op::ORWRITE_16 => blocks(block_range(cdb).blocks),
            op::WRITE_ATOMIC_16 => blocks(u32::from(be16(cdb, 12))),
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => match (u8_at(cdb, 1) >> 1) & 0x03 {
                0b01 => blocks(block_range(cdb).blocks),
                0b11 => block_size,
                _ => 0,
            },
            op::WRITE_SAME_10 => block_size,
            op::WRITE_SAME_16 if u8_at(cdb, 1) & 0x01 == 0 => block_size,
            op::COMPARE_AND_WRITE => blocks(u32::from(u8_at(cdb, 13)).saturating_mul(2)),
            op::UNMAP | op::MODE_SELECT_10 | op::SANITIZE => u32::from(be16(cdb, 7)),
            op::MODE_SELECT_6 => u32::from(u8_at(cdb, 4)),
            op::SEND_DIAGNOSTIC => u32::from(be16(cdb, 3)),
            op::PERSISTENT_RESERVE_OUT => be32(cdb, 5),
            op::EXTENDED_COPY => be32(cdb, 10),
            _ => 0,
        }
    }
}

/// Sense data for a pool error.
fn pool_error_sense(err: &PoolError, kind: IoKind) -> Sense {
    match err {
        PoolError::OutOfRange { .. } => Sense::lba_out_of_range(),
        PoolError::NoSpace(_) => Sense::new(
            SenseKey::DataProtect,
            Asc::SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
        ),
        PoolError::VolumeDeleted(_) | PoolError::VolumeNotFound(_) => {
            Sense::new(SenseKey::NotReady, Asc::LUN_NOT_SUPPORTED)
        }
        PoolError::Closed => Sense::new(SenseKey::NotReady, Asc::LUN_NOT_READY),
        e if e.is_integrity() || matches!(e, PoolError::Io { .. }) => match kind {
            IoKind::Read => Sense::new(SenseKey::MediumError, Asc::UNRECOVERED_READ_ERROR),
            IoKind::Write => Sense::new(SenseKey::MediumError, Asc::WRITE_ERROR),
        },
        _ => Sense::new(SenseKey::HardwareError, Asc::INTERNAL_TARGET_FAILURE),
    }
}

fn outcome_response(outcome: Outcome) -> Response {
    match outcome {
        Outcome::Good => Response::good(),
        Outcome::Conflict => Response::status(Status::ReservationConflict),
        Outcome::Error(sense) => Response::check(sense),
    }
}

/// SEND DIAGNOSTIC (SPC-4 6.42): the default self-test has nothing to exercise beyond what
/// every command does, so it passes; diagnostic pages are not supported.
fn send_diagnostic(cdb: &[u8]) -> Result<Response, Sense> {
    if be16(cdb, 3) != 0 {
        return Err(Sense::invalid_cdb_field(3, None));
    }
    Ok(Response::good())
}

/// How reservations restrict a command (SPC-4 table 52, SBC-3 table 13).
fn access(info: &CommandInfo, cdb: &[u8]) -> Access {
    match info.op {
        op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE | op::RELEASE_6 => Access::Unrestricted,
        op::PREVENT_ALLOW_MEDIUM_REMOVAL if u8_at(cdb, 4) & 0x03 == 0 => Access::Unrestricted,
        op::TEST_UNIT_READY
        | op::READ_CAPACITY_10
        | op::PERSISTENT_RESERVE_IN
        | op::PERSISTENT_RESERVE_OUT
        | op::MAINTENANCE_IN
        | op::RESERVE_6 => Access::PrAllowed,
        op::SERVICE_ACTION_IN_16 if info.sa == Some(sa::READ_CAPACITY_16) => Access::PrAllowed,
        // Starting the unit (without loading or power condition changes) is always allowed.
        op::START_STOP_UNIT if u8_at(cdb, 4) & 0xF3 == 0x01 => Access::PrAllowed,
        op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::PRE_FETCH_10
        | op::PRE_FETCH_16
        | op::SERVICE_ACTION_IN_16
        | op::MODE_SENSE_6
        | op::MODE_SENSE_10
        | op::READ_DEFECT_DATA_10
        | op::READ_DEFECT_DATA_12
        | op::RECEIVE_COPY_RESULTS => Access::Read,
        _ => Access::Write,
    }
}

/// Commands that need the medium; with a removable medium ejected they end in NOT READY,
/// MEDIUM NOT PRESENT.
fn needs_medium(info: &CommandInfo) -> bool {
    !matches!(
        info.op,
        op::INQUIRY
            | op::REQUEST_SENSE
            | op::REPORT_LUNS
            | op::MODE_SENSE_6
            | op::MODE_SENSE_10
            | op::MODE_SELECT_6
            | op::MODE_SELECT_10
            | op::RESERVE_6
            | op::RELEASE_6
            | op::PERSISTENT_RESERVE_IN
            | op::PERSISTENT_RESERVE_OUT
            | op::START_STOP_UNIT
            | op::PREVENT_ALLOW_MEDIUM_REMOVAL
            | op::SEND_DIAGNOSTIC
            | op::MAINTENANCE_IN
            | op::RECEIVE_COPY_RESULTS
    )
}
