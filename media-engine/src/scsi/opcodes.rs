//! The table of supported commands: one entry per operation code (and service action) with its
//! CDB usage map (SPC-4 6.35.3). The same map drives REPORT SUPPORTED OPERATION CODES and the
//! check that rejects set bits in fields we do not implement, so what we report and what we
//! accept can never drift apart.

use super::cdb::{be16, be32, op, sa, u8_at};
use super::sense::Sense;

/// One supported command.
#[derive(Debug)]
pub(crate) struct CommandInfo {
    pub op: u8,
    /// Service action (bits 4..0 of CDB byte 1) for commands that have them.
    pub sa: Option<u8>,
    /// CDB usage data: byte 0 is the operation code, the service action field holds the service
    /// action, every other set bit is a bit the device server looks at. Its length is the CDB
    /// length. Bits 2..0 of the control byte (NACA, LINK) are never supported.
    pub usage: &'static [u8],
    /// Flushes and whole-medium operations get a longer recommended timeout.
    pub slow: bool,
}

/// A command without service actions; its operation code is the first usage byte.
const fn cmd(usage: &'static [u8]) -> CommandInfo {
    CommandInfo {
        op: usage[0],
        sa: None,
        usage,
        slow: false,
    }
}

/// A command with service actions; its service action is in the second usage byte.
const fn cmd_sa(usage: &'static [u8]) -> CommandInfo {
    CommandInfo {
        op: usage[0],
        sa: Some(usage[1] & SA_MASK),
        usage,
        slow: false,
    }
}

const fn slow(mut c: CommandInfo) -> CommandInfo {
    c.slow = true;
    c
}

const FF: u8 = 0xFF;
/// READ (10/12/16): DPO, FUA, RARC, FUA_NV; RDPROTECT is not supported.
const RD: u8 = 0x1E;
/// WRITE (10/12/16), COMPARE AND WRITE, ORWRITE: DPO, FUA, FUA_NV; no WRPROTECT.
const WR: u8 = 0x1A;
/// WRITE AND VERIFY: DPO and BYTCHK.
const WV: u8 = 0x12;
/// VERIFY: DPO and the two-bit BYTCHK field.
const VF: u8 = 0x16;
/// Group number fields.
const GRP: u8 = 0x1F;

/// Every command the logical unit implements (REPORT LUNS is answered by the transport, see
/// [`super::luns`], but belongs to the logical unit's command set all the same). One row per
/// command, as its CDB usage data.
#[rustfmt::skip]
pub(crate) static COMMANDS: &[CommandInfo] = &[
    cmd(&[op::TEST_UNIT_READY, 0, 0, 0, 0, 0]),
    cmd(&[op::REQUEST_SENSE, 0x01, 0, 0, FF, 0]),
    cmd(&[op::READ_6, 0x1F, FF, FF, FF, 0]),
    cmd(&[op::WRITE_6, 0x1F, FF, FF, FF, 0]),
    cmd(&[op::INQUIRY, 0x01, FF, FF, FF, 0]),
    cmd(&[op::MODE_SELECT_6, 0x11, 0, 0, FF, 0]),
    cmd(&[op::RESERVE_6, 0, 0, 0, 0, 0]),
    cmd(&[op::RELEASE_6, 0, 0, 0, 0, 0]),
    cmd(&[op::MODE_SENSE_6, 0x08, FF, FF, FF, 0]),
    slow(cmd(&[op::START_STOP_UNIT, 0x01, 0, 0x0F, 0xF7, 0])),
    cmd(&[op::SEND_DIAGNOSTIC, 0x17, 0, FF, FF, 0]),
    cmd(&[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0x03, 0]),
    cmd(&[op::READ_CAPACITY_10, 0, FF, FF, FF, FF, 0, 0, 0x01, 0]),
    cmd(&[op::READ_10, RD, FF, FF, FF, FF, GRP, FF, FF, 0]),
    cmd(&[op::WRITE_10, WR, FF, FF, FF, FF, GRP, FF, FF, 0]),
    cmd(&[op::WRITE_AND_VERIFY_10, WV, FF, FF, FF, FF, GRP, FF, FF, 0]),
    cmd(&[op::VERIFY_10, VF, FF, FF, FF, FF, GRP, FF, FF, 0]),
    cmd(&[op::PRE_FETCH_10, 0x02, FF, FF, FF, FF, GRP, FF, FF, 0]),
    slow(cmd(&[op::SYNCHRONIZE_CACHE_10, 0x06, FF, FF, FF, FF, GRP, FF, FF, 0])),
    cmd(&[op::READ_DEFECT_DATA_10, 0, 0x1F, 0, 0, 0, 0, FF, FF, 0]),
    slow(cmd(&[op::WRITE_SAME_10, 0x08, FF, FF, FF, FF, GRP, FF, FF, 0])),
    slow(cmd(&[op::UNMAP, 0, 0, 0, 0, 0, GRP, FF, FF, 0])),
    // SANITIZE: IMMED and AUSE (AUSE is ignored by EXIT FAILURE MODE); ZNR (zoned devices) is
    // not supported. CRYPTOGRAPHIC ERASE is not listed: there is no per-volume key to destroy.
    slow(cmd_sa(&[op::SANITIZE, 0xA0 | sa::SANITIZE_OVERWRITE, 0, 0, 0, 0, 0, FF, FF, 0])),
    slow(cmd_sa(&[op::SANITIZE, 0xA0 | sa::SANITIZE_BLOCK_ERASE, 0, 0, 0, 0, 0, FF, FF, 0])),
    slow(cmd_sa(&[op::SANITIZE, 0xA0 | sa::SANITIZE_EXIT_FAILURE_MODE, 0, 0, 0, 0, 0, FF, FF,
                  0])),
    cmd(&[op::MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, FF, FF, 0]),
    cmd(&[op::MODE_SENSE_10, 0x18, FF, FF, 0, 0, 0, FF, FF, 0]),
    cmd_sa(&[op::PERSISTENT_RESERVE_IN, 0x00, 0, 0, 0, 0, 0, FF, FF, 0]),
    cmd_sa(&[op::PERSISTENT_RESERVE_IN, 0x01, 0, 0, 0, 0, 0, FF, FF, 0]),
    cmd_sa(&[op::PERSISTENT_RESERVE_IN, 0x02, 0, 0, 0, 0, 0, FF, FF, 0]),
    cmd_sa(&[op::PERSISTENT_RESERVE_IN, 0x03, 0, 0, 0, 0, 0, FF, FF, 0]),
    cmd_sa(&[op::PERSISTENT_RESERVE_OUT, 0x00, FF, 0, 0, FF, FF, FF, FF, 0]),
    cmd_sa(&[op::PERSISTENT_RESERVE_OUT, 0x01, FF, 0, 0, FF, FF, FF, FF, 0]),
    cmd_sa(&[op::PERSISTENT_RESERVE_OUT, 0x02, FF, 0, 0, FF, FF, FF, FF, 0]),
    cmd_sa(&[op::PERSISTENT_RESERVE_OUT, 0x03, FF, 0, 0, FF, FF, FF, FF, 0]),
    cmd_sa(&[op::PERSISTENT_RESERVE_OUT, 0x04, FF, 0, 0, FF, FF, FF, FF, 0]),
    cmd_sa(&[op::PERSISTENT_RESERVE_OUT, 0x05, FF, 0, 0, FF, FF, FF, FF, 0]),
    cmd_sa(&[op::PERSISTENT_RESERVE_OUT, 0x06, FF, 0, 0, FF, FF, FF, FF, 0]),
    slow(cmd_sa(&[op::EXTENDED_COPY, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0])),
    cmd_sa(&[op::RECEIVE_COPY_RESULTS, 0x00, FF, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0]),
    cmd_sa(&[op::RECEIVE_COPY_RESULTS, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0]),
    cmd(&[op::READ_16, RD, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0]),
    cmd(&[op::COMPARE_AND_WRITE, WR, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, GRP, 0]),
    cmd(&[op::WRITE_16, WR, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0]),
    cmd(&[op::ORWRITE_16, WR, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0]),
    cmd(&[op::WRITE_AND_VERIFY_16, WV, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0]),
    cmd(&[op::VERIFY_16, VF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0]),
    cmd(&[op::PRE_FETCH_16, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0]),
    slow(cmd(&[op::SYNCHRONIZE_CACHE_16, 0x06, FF, FF, FF, FF, FF, FF, FF, FF,
               FF, FF, FF, FF, GRP, 0])),
    slow(cmd(&[op::WRITE_SAME_16, 0x09, FF, FF, FF, FF, FF, FF, FF, FF,
               FF, FF, FF, FF, GRP, 0])),
    // WRITE ATOMIC (16): DPO, FUA; no WRPROTECT; ATOMIC BOUNDARY must be zero (the maximum
    // atomic boundary size is zero); 16-bit transfer length.
    cmd(&[op::WRITE_ATOMIC_16, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, FF, FF, GRP, 0]),
    cmd_sa(&[op::SERVICE_ACTION_IN_16, sa::READ_CAPACITY_16, 0, 0, 0, 0, 0, 0, 0, 0,
             FF, FF, FF, FF, 0, 0]),
    cmd_sa(&[op::SERVICE_ACTION_IN_16, sa::GET_LBA_STATUS, FF, FF, FF, FF, FF, FF, FF, FF,
             FF, FF, FF, FF, 0, 0]),
    cmd(&[op::REPORT_LUNS, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, 0]),
    cmd_sa(&[op::MAINTENANCE_IN, sa::REPORT_SUPPORTED_OPERATION_CODES, 0x87, FF, FF, FF,
             FF, FF, FF, FF, 0, 0]),
    cmd(&[op::READ_12, RD, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0]),
    cmd(&[op::WRITE_12, WR, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0]),
    cmd(&[op::WRITE_AND_VERIFY_12, WV, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0]),
    cmd(&[op::VERIFY_12, VF, FF, FF, FF, FF, FF, FF, FF, FF, GRP, 0]),
    cmd(&[op::READ_DEFECT_DATA_12, 0x1F, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
];

/// Mask of the service action field in CDB byte 1.
const SA_MASK: u8 = 0x1F;
/// NACA and the obsolete LINK/FLAG bits of the control byte: we support none of them.
const CONTROL_CHECKED: u8 = 0x07;

fn has_service_actions(opcode: u8) -> bool {
    COMMANDS.iter().any(|c| c.op == opcode && c.sa.is_some())
}

fn find(opcode: u8, service_action: Option<u8>) -> Option<&'static CommandInfo> {
    COMMANDS
        .iter()
        .find(|c| c.op == opcode && (c.sa.is_none() || c.sa == service_action))
}

/// Finds the table entry for a CDB and checks it against the usage map: unknown operation code
/// -> INVALID COMMAND OPERATION CODE; unknown service action -> INVALID FIELD IN CDB on the
/// service action field; short CDB or a set bit outside the map -> INVALID FIELD IN CDB.
pub(crate) fn lookup(cdb: &[u8]) -> Result<&'static CommandInfo, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(Sense::invalid_opcode());
    };
    let service_action = has_service_actions(opcode).then(|| u8_at(cdb, 1) & SA_MASK);
    let Some(info) = find(opcode, service_action) else {
        return Err(if service_action.is_some() {
            Sense::invalid_cdb_field(1, Some(4))
        } else {
            Sense::invalid_opcode()
        });
    };
    if cdb.len() < info.usage.len() {
        return Err(Sense::invalid_cdb_field(cdb.len(), None));
    }
    let last = info.usage.len() - 1;
    for (i, (&byte, &usage)) in cdb.iter().zip(info.usage).enumerate().skip(1) {
        let allowed = match i {
            i if i == last => !CONTROL_CHECKED,
            1 if info.sa.is_some() => usage | SA_MASK,
            _ => usage,
        };
        let stray = byte & !allowed;
        if stray != 0 {
            return Err(Sense::invalid_cdb_field(
                i,
                Some(7 - stray.leading_zeros() as u8),
            ));
        }
    }
    Ok(info)
}

/// REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN / 0Ch, SPC-4 6.35). `supported` says
/// which table entries this logical unit implements (some depend on its block device).
pub(crate) fn report_supported_operation_codes(
    cdb: &[u8],
    supported: impl Fn(&CommandInfo) -> bool,
) -> Result<Vec<u8>, Sense> {
    let rctd = u8_at(cdb, 2) & 0x80 != 0;
    let options = u8_at(cdb, 2) & 0x07;
    let requested_op = u8_at(cdb, 3);
    let requested_sa = be16(cdb, 4);
    let allocation_length = be32(cdb, 6);
    let mut out = Vec::new();
    match options {
        0 => {
            for c in COMMANDS.iter().filter(|c| supported(c)) {
                let flags = (u8::from(rctd) << 1) | u8::from(c.sa.is_some());
                out.extend_from_slice(&[c.op, 0, 0, c.sa.unwrap_or(0), 0, flags]);
                out.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                if rctd {
                    out.extend_from_slice(&timeouts(c));
                }
            }
            let len = (out.len() as u32).to_be_bytes();
            out.splice(0..0, len);
        }
        1..=3 => {
            let with_sa = has_service_actions(requested_op);
            // Reporting option 1 names a command without service actions, option 2 one with
            // them; option 3 uses the service action only where the command has one.
            if (options == 1 && with_sa)
                || (options == 2 && !with_sa && COMMANDS.iter().any(|c| c.op == requested_op))
            {
                return Err(Sense::invalid_cdb_field(2, Some(2)));
            }
            let sa = with_sa.then(|| u8::try_from(requested_sa).ok()).flatten();
            let found = if with_sa && sa.is_none() {
                None
            } else {
                find(requested_op, sa).filter(|c| supported(c))
            };
            match found {
                Some(c) => {
                    out.extend_from_slice(&[0, (u8::from(rctd) << 7) | 0b011]);
                    out.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                    out.extend_from_slice(c.usage);
                    if rctd {
                        out.extend_from_slice(&timeouts(c));
                    }
                }
                // SUPPORT 001b: not supported.
                None => out.extend_from_slice(&[0, 0b001, 0, 0]),
            }
        }
        _ => return Err(Sense::invalid_cdb_field(2, Some(2))),
    }
    out.truncate(usize::try_from(allocation_length).unwrap_or(usize::MAX));
    Ok(out)
}

/// Command timeouts descriptor (SPC-4 6.35.4), in seconds.
fn timeouts(c: &CommandInfo) -> [u8; 12] {
    let (nominal, recommended): (u32, u32) = if c.slow { (5, 120) } else { (1, 30) };
    let mut t = [0u8; 12];
    t[1] = 0x0A;
    t[4..8].copy_from_slice(&nominal.to_be_bytes());
    t[8..12].copy_from_slice(&recommended.to_be_bytes());
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::sense::{Asc, SenseKey};

    #[test]
    fn table_is_consistent() {
        for c in COMMANDS {
            assert_eq!(c.usage[0], c.op, "usage byte 0 of {:#04x}", c.op);
            let expected_len = match c.op >> 5 {
                0 => 6,
                1 | 2 => 10,
                4 => 16,
                5 => 12,
                _ => unreachable!(),
            };
            assert_eq!(c.usage.len(), expected_len, "CDB length of {:#04x}", c.op);
            if let Some(sa) = c.sa {
                assert_eq!(c.usage[1] & SA_MASK, sa);
            }
            let dups = COMMANDS
                .iter()
                .filter(|d| d.op == c.op && d.sa == c.sa)
                .count();
            assert_eq!(dups, 1, "duplicate entry {:#04x}/{:?}", c.op, c.sa);
        }
    }

    #[test]
    fn lookup_rejects_unknown_and_stray_bits() {
        let err = lookup(&[0xFF; 16]).unwrap_err();
        assert_eq!(err.asc, Asc::INVALID_COMMAND_OPERATION_CODE);
        // Unknown service action of a known two-byte opcode: field pointer on byte 1.
        let err = lookup(&[0x9E, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(err.asc, Asc::INVALID_FIELD_IN_CDB);
        assert_eq!(err.key_specific, Some([0xC8 | 4, 0, 1]));
        // RDPROTECT is not supported.
        let err = lookup(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap_err();
        assert_eq!(err.key_specific, Some([0xC8 | 5, 0, 1]));
        // NACA in the control byte.
        let err = lookup(&[0x00, 0, 0, 0, 0, 0x04]).unwrap_err();
        assert_eq!(err.key_specific, Some([0xC8 | 2, 0, 5]));
        // Short CDB.
        assert_eq!(
            lookup(&[0x28, 0, 0]).unwrap_err().key,
            SenseKey::IllegalRequest
        );
        // Vendor bits of the control byte and bytes past the CDB length are ignored.
        assert!(lookup(&[0x00, 0, 0, 0, 0, 0xC0, 0xFF, 0xFF]).is_ok());
        assert!(lookup(&[0x28, 0x1E, 1, 2, 3, 4, 0x1F, 0, 1, 0]).is_ok());
    }

    fn rsoc(options: u8, rctd: bool, op: u8, sa: u16) -> Result<Vec<u8>, Sense> {
        let mut cdb = [0u8; 12];
        cdb[0] = 0xA3;
        cdb[1] = 0x0C;
        cdb[2] = options | if rctd { 0x80 } else { 0 };
        cdb[3] = op;
        cdb[4..6].copy_from_slice(&sa.to_be_bytes());
        cdb[6..10].copy_from_slice(&65535u32.to_be_bytes());
        report_supported_operation_codes(&cdb, |_| true)
    }

    #[test]
    fn rsoc_all_commands() {
        let d = rsoc(0, false, 0, 0).unwrap();
        assert_eq!(be32(&d, 0) as usize, d.len() - 4);
        assert_eq!((d.len() - 4) / 8, COMMANDS.len());
        let d = rsoc(0, true, 0, 0).unwrap();
        assert_eq!((d.len() - 4) / 20, COMMANDS.len());
        assert_eq!(d[4 + 5] & 0x02, 0x02);
        assert_eq!(be16(&d, 4 + 8), 0x0A);
    }

    #[test]
    fn rsoc_one_command() {
        let d = rsoc(1, false, 0x28, 0).unwrap();
        assert_eq!(d[1] & 0x07, 0b011);
        assert_eq!(be16(&d, 2), 10);
        assert_eq!(d[4], 0x28);
        assert_eq!(d[5] & 0x18, 0x18);
        // Option 1 on a command with service actions, option 2 on one without: both errors
        // whose field pointer is not byte 1 (byte 1 would read as "not implemented").
        let e = rsoc(1, false, 0x9E, 0x10).unwrap_err();
        assert_eq!(e.key_specific, Some([0xC8 | 2, 0, 2]));
        assert!(rsoc(2, false, 0x28, 0).is_err());
        let d = rsoc(2, true, 0x9E, 0x10).unwrap();
        assert_eq!(d[1], 0x80 | 0b011);
        assert_eq!(d.len(), 4 + 16 + 12);
        assert_eq!(&d[4..6], &[0x9E, 0x10]);
        assert_eq!(rsoc(2, false, 0x9E, 0x11).unwrap(), vec![0, 1, 0, 0]);
        assert_eq!(rsoc(1, false, 0xFF, 0).unwrap(), vec![0, 1, 0, 0]);
        assert_eq!(rsoc(3, false, 0x28, 7).unwrap()[1] & 7, 0b011);
        assert!(rsoc(5, false, 0, 0).is_err());
    }
}
