//! What the transport answers without a logical unit: REPORT LUNS (SPC-4 6.33), and commands
//! addressed to a LUN that has no logical unit (SPC-4 6.6.2, 6.39). Also the 8-byte LUN
//! structure (SAM-5 4.6) both directions.

use super::cdb::{be32, op, u8_at};
use super::inquiry;
use super::sense::{Asc, Sense};
use super::{Response, Status};

/// Encodes a LUN number as a single-level LUN: peripheral device addressing below 256, flat
/// space addressing below 16384. Larger values are taken to be an already encoded 8-byte LUN.
pub fn encode_lun(lun: u64) -> [u8; 8] {
    match lun {
        0..=0xFF => [0, lun as u8, 0, 0, 0, 0, 0, 0],
        0x100..=0x3FFF => [0x40 | (lun >> 8) as u8, lun as u8, 0, 0, 0, 0, 0, 0],
        _ => lun.to_be_bytes(),
    }
}

/// Decodes a single-level LUN in peripheral or flat space addressing back to its number;
/// anything else (hierarchical LUNs, well-known LUNs) is returned as the raw 8-byte value.
pub fn decode_lun(lun: [u8; 8]) -> u64 {
    let rest_zero = lun[2..].iter().all(|&b| b == 0);
    match lun[0] >> 6 {
        0b00 if lun[0] == 0 && rest_zero => u64::from(lun[1]),
        0b01 if rest_zero => (u64::from(lun[0] & 0x3F) << 8) | u64::from(lun[1]),
        _ => u64::from_be_bytes(lun),
    }
}

/// REPORT LUNS for a target whose logical units have the numbers `luns` (SPC-4 6.33). The
/// response lists every LUN whatever the allocation length and is then cut to it.
pub fn report_luns(luns: &[u64], cdb: &[u8]) -> Response {
    match report_luns_data(luns, cdb) {
        Ok(data) => Response::data(data),
        Err(sense) => Response::check(sense),
    }
}

fn report_luns_data(luns: &[u64], cdb: &[u8]) -> Result<Vec<u8>, Sense> {
    if cdb.len() < 12 {
        return Err(Sense::invalid_cdb_field(cdb.len(), None));
    }
    if let Some(i) = [1, 3, 4, 5, 10].into_iter().find(|&i| u8_at(cdb, i) != 0) {
        return Err(Sense::invalid_cdb_field(i, None));
    }
    if u8_at(cdb, 11) & 0x07 != 0 {
        return Err(Sense::invalid_cdb_field(11, None));
    }
    let listed: &[u64] = match u8_at(cdb, 2) {
        // All logical units, or all of them plus the well-known ones (we have none).
        0x00 | 0x02 => luns,
        // Well-known logical units only.
        0x01 => &[],
        _ => return Err(Sense::invalid_cdb_field(2, None)),
    };
    let allocation_length = be32(cdb, 6);
    // SPC-3 requires at least 16 bytes; SPC-4 allows refusing less, which keeps initiators from
    // mistaking a truncated header for an empty list.
    if allocation_length < 16 {
        return Err(Sense::invalid_cdb_field(6, None));
    }
    let list_bytes = listed.len().saturating_mul(8);
    let mut data = Vec::with_capacity(8 + list_bytes.min(allocation_length as usize));
    data.extend_from_slice(&u32::try_from(list_bytes).unwrap_or(u32::MAX).to_be_bytes());
    data.extend_from_slice(&[0; 4]);
    for &lun in listed {
        if data.len() >= allocation_length as usize {
            break;
        }
        data.extend_from_slice(&encode_lun(lun));
    }
    data.truncate(allocation_length as usize);
    Ok(data)
}

/// The response to a command addressed to a LUN without a logical unit: INQUIRY returns data
/// with peripheral qualifier 011b, REQUEST SENSE returns GOOD with LOGICAL UNIT NOT SUPPORTED
/// as its data, anything else is CHECK CONDITION / LOGICAL UNIT NOT SUPPORTED.
pub fn lun_not_supported(cdb: &[u8]) -> Response {
    let unsupported = Sense::lun_not_supported();
    match cdb.first() {
        Some(&op::INQUIRY) if cdb.len() >= 6 => {
            let evpd = u8_at(cdb, 1) & 0x01 != 0;
            let page = u8_at(cdb, 2);
            if u8_at(cdb, 1) & 0xFE != 0 || (!evpd && page != 0) {
                return Response::check(Sense::invalid_cdb_field(if evpd { 1 } else { 2 }, None));
            }
            let data = if evpd {
                // A VPD page header naming no device, with an empty body.
                vec![inquiry::NO_LOGICAL_UNIT, page, 0, 0]
            } else {
                inquiry::no_logical_unit()
            };
            let allocation_length = usize::from(super::cdb::be16(cdb, 3));
            let mut data = data;
            data.truncate(allocation_length);
            Response::data(data)
        }
        Some(&op::REQUEST_SENSE) if cdb.len() >= 6 => {
            let mut data = if u8_at(cdb, 1) & 0x01 != 0 {
                unsupported.to_descriptor()
            } else {
                unsupported.to_fixed().to_vec()
            };
            data.truncate(usize::from(u8_at(cdb, 4)));
            Response::data(data)
        }
        _ => Response {
            status: Status::CheckCondition,
            sense: Some(Sense::illegal_request(Asc::LUN_NOT_SUPPORTED)),
            data_in: Vec::new(),
            spdtl_out: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rl(select: u8, alloc: u32) -> Vec<u8> {
        let mut cdb = [0u8; 12];
        cdb[0] = 0xA0;
        cdb[2] = select;
        cdb[6..10].copy_from_slice(&alloc.to_be_bytes());
        cdb.to_vec()
    }

    #[test]
    fn lun_encoding_round_trips() {
        for lun in [0u64, 1, 255, 256, 0x3FFF] {
            assert_eq!(decode_lun(encode_lun(lun)), lun);
        }
        assert_eq!(encode_lun(300), [0x41, 0x2C, 0, 0, 0, 0, 0, 0]);
        let raw = 0xC101_0000_0000_0000;
        assert_eq!(decode_lun(encode_lun(raw)), raw);
    }

    #[test]
    fn report_luns_lists_and_truncates() {
        let r = report_luns(&[0, 1, 300], &rl(0, 512));
        assert_eq!(r.status, Status::Good);
        assert_eq!(be32(&r.data_in, 0), 24);
        assert_eq!(r.data_in.len(), 32);
        assert_eq!(&r.data_in[24..26], &[0x41, 0x2C]);
        let r = report_luns(&[0, 1, 300], &rl(0, 16));
        assert_eq!((be32(&r.data_in, 0), r.data_in.len()), (24, 16));
        let r = report_luns(&[0, 1], &rl(1, 512));
        assert_eq!(r.data_in, vec![0; 8]);
        assert_eq!(
            report_luns(&[0], &rl(7, 512)).status,
            Status::CheckCondition
        );
        assert_eq!(report_luns(&[0], &rl(0, 8)).status, Status::CheckCondition);
        assert_eq!(report_luns(&[0], &[0xA0]).status, Status::CheckCondition);
    }

    #[test]
    fn missing_lun_responses() {
        let r = lun_not_supported(&[0x12, 0, 0, 0, 255, 0]);
        assert_eq!(r.status, Status::Good);
        assert_eq!(r.data_in[0], 0x7F);
        assert_eq!(r.data_in.len(), 36);
        let r = lun_not_supported(&[0x03, 0, 0, 0, 252, 0]);
        assert_eq!(r.status, Status::Good);
        assert_eq!((r.data_in[2], r.data_in[12]), (0x05, 0x25));
        let r = lun_not_supported(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(r.status, Status::CheckCondition);
        assert_eq!(r.sense.map(|s| s.asc), Some(Asc::LUN_NOT_SUPPORTED));
        assert_eq!(lun_not_supported(&[]).status, Status::CheckCondition);
    }
}
