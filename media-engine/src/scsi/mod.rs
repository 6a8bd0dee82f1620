//! The SCSI command layer (SPC-4 / SBC-3) for one logical unit backed by a pool volume.
//!
//! Transport-agnostic: the iSCSI transport (and any later SCSI transport) hands it a CDB, the
//! I_T nexus the command came through and the Data-Out the initiator sent, and gets back a
//! status, sense data and Data-In. Residual accounting stays in the transport: a response says
//! how many Data-Out bytes the CDB asked for (`spdtl_out`) and how much Data-In it produced.

mod block;
mod cdb;
mod ident;
mod inquiry;
mod limits;
pub mod lu;
pub mod luns;
mod mode;
mod opcodes;
mod pr;
mod sanitize;
pub mod sense;
mod ua;
mod xcopy;

#[cfg(test)]
mod tests;

pub use lu::{LogicalUnit, LuIdentity};
pub use sense::{Sense, SenseKey};

/// SCSI status codes (SAM-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    TaskAborted = 0x40,
}

/// The I_T nexus a command arrived through. Persistent reservations and RESERVE(6) key on it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// SCSI initiator port name, e.g. `iqn.1993-08.org.debian:01:abc,i,0x23d000000001`.
    pub initiator_port: String,
    /// SCSI target port name, e.g. `iqn.2026-11.io.maas:exp-1,t,0x0001`.
    pub target_port: String,
    /// Relative target port identifier (VPD 83h and PR).
    pub relative_target_port: u16,
}

/// One command as the transport delivers it.
#[derive(Debug)]
pub struct Command<'a> {
    pub cdb: &'a [u8],
    pub nexus: &'a Nexus,
    /// Data-Out exactly as collected by the transport (the initiator's expected transfer length
    /// for write-direction commands, empty otherwise).
    pub data_out: &'a [u8],
    /// The initiator's expected Data-In length. Data-In beyond it is cut by the transport; the
    /// logical unit may use it to avoid building more than will be sent.
    pub expected_in: u32,
}

/// The outcome of one command.
#[derive(Debug)]
pub struct Response {
    pub status: Status,
    /// Fixed-format sense data (SPC-4 4.5.3), present with CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data-In as the command defines it (before the transport truncates it to the expected
    /// length and reports the residual).
    pub data_in: Vec<u8>,
    /// Data-Out bytes the CDB itself asked for (SPDTL), for write-direction commands; the
    /// transport reports a residual when the initiator's expected length differs.
    pub spdtl_out: u32,
}

impl Response {
    pub fn good() -> Self {
        Response {
            status: Status::Good,
            sense: None,
            data_in: Vec::new(),
            spdtl_out: 0,
        }
    }
    pub fn data(data_in: Vec<u8>) -> Self {
        Response {
            status: Status::Good,
            sense: None,
            data_in,
            spdtl_out: 0,
        }
    }
    pub fn check(sense: Sense) -> Self {
        Response {
            status: Status::CheckCondition,
            sense: Some(sense),
            data_in: Vec::new(),
            spdtl_out: 0,
        }
    }
    pub fn status(status: Status) -> Self {
        Response {
            status,
            sense: None,
            data_in: Vec::new(),
            spdtl_out: 0,
        }
    }
}
