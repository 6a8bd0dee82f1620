//! Decoding of CDB (and parameter list) fields. Every reader tolerates a short buffer and
//! reads missing bytes as zero: the command table has already checked that the CDB is as long
//! as the command, so a zero here only ever stands for bytes the initiator did not send.

use super::sense::Sense;

/// Operation codes this layer knows by name.
pub(crate) mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const SEND_DIAGNOSTIC: u8 = 0x1D;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const SANITIZE: u8 = 0x48;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9C;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_AND_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;
}

/// Service actions of SERVICE ACTION IN (16), MAINTENANCE IN and SANITIZE.
pub(crate) mod sa {
    pub const READ_CAPACITY_16: u8 = 0x10;
    pub const GET_LBA_STATUS: u8 = 0x12;
    pub const REPORT_SUPPORTED_OPERATION_CODES: u8 = 0x0C;
    pub const SANITIZE_OVERWRITE: u8 = 0x01;
    pub const SANITIZE_BLOCK_ERASE: u8 = 0x02;
    /// Not supported (no per-volume key to destroy); listed for the tests that name it.
    #[cfg(test)]
    pub const SANITIZE_CRYPTO_ERASE: u8 = 0x03;
    pub const SANITIZE_EXIT_FAILURE_MODE: u8 = 0x1F;
}

pub(crate) fn u8_at(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

fn be_at<const N: usize>(b: &[u8], at: usize) -> u64 {
    (0..N).fold(0u64, |acc, i| {
        (acc << 8) | u64::from(u8_at(b, at.saturating_add(i)))
    })
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    be_at::<2>(b, at) as u16
}

pub(crate) fn be24(b: &[u8], at: usize) -> u32 {
    be_at::<3>(b, at) as u32
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    be_at::<4>(b, at) as u32
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    be_at::<8>(b, at)
}

/// True when bit `bit` of byte `at` is set.
pub(crate) fn bit(b: &[u8], at: usize, bit: u8) -> bool {
    u8_at(b, at) & (1 << (bit & 7)) != 0
}

/// Cuts Data-In to the allocation length of the CDB (SPC-4 4.2.5.6): a short allocation length
/// is never an error, the initiator just gets the first bytes.
pub(crate) fn truncate(mut data: Vec<u8>, allocation_length: u32) -> Vec<u8> {
    let limit = usize::try_from(allocation_length).unwrap_or(usize::MAX);
    data.truncate(limit);
    data
}

/// LBA, length and caching hints of the READ/WRITE/VERIFY/PRE-FETCH/ORWRITE family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockRange {
    pub lba: u64,
    pub blocks: u32,
}

/// Decodes the LBA and transfer length of the block commands whose layout only depends on the
/// CDB length (SBC-3 5.*): 10-byte (LBA 2..6, length 7..9), 12-byte (LBA 2..6, length 6..10)
/// and 16-byte (LBA 2..10, length 10..14). READ(6)/WRITE(6) have their own layout and treat a
/// transfer length of 0 as 256 blocks.
pub(crate) fn block_range(cdb: &[u8]) -> BlockRange {
    match u8_at(cdb, 0) {
        op::READ_6 | op::WRITE_6 => {
            let lba = u64::from(be24(cdb, 1) & 0x1F_FFFF);
            let blocks = match u8_at(cdb, 4) {
                0 => 256,
                n => u32::from(n),
            };
            BlockRange { lba, blocks }
        }
        opcode => match opcode >> 5 {
            // Group 1 and 2: 10-byte CDBs.
            1 | 2 => BlockRange {
                lba: u64::from(be32(cdb, 2)),
                blocks: u32::from(be16(cdb, 7)),
            },
            // Group 5: 12-byte CDBs.
            5 => BlockRange {
                lba: u64::from(be32(cdb, 2)),
                blocks: be32(cdb, 6),
            },
            // Group 4: 16-byte CDBs.
            _ => BlockRange {
                lba: be64(cdb, 2),
                blocks: be32(cdb, 10),
            },
        },
    }
}

/// Checks that [lba, lba + blocks) lies within a medium of `capacity` blocks (SBC-3 4.5). A
/// zero-length range is fine anywhere up to and including the end of the medium.
pub(crate) fn check_range(lba: u64, blocks: u64, capacity: u64) -> Result<(), Sense> {
    match lba.checked_add(blocks) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(Sense::lba_out_of_range()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_tolerate_short_buffers() {
        let b = [0x12, 0x34, 0x56];
        assert_eq!(be16(&b, 0), 0x1234);
        assert_eq!(be16(&b, 2), 0x5600);
        assert_eq!(be32(&b, 1), 0x3456_0000);
        assert_eq!(be64(&b, usize::MAX), 0);
        assert_eq!(be24(&b, 0), 0x12_3456);
        assert!(bit(&b, 0, 4));
        assert!(!bit(&b, 9, 0));
    }

    #[test]
    fn block_ranges_of_each_cdb_size() {
        assert_eq!(
            block_range(&[0x08, 0xFF, 0x12, 0x34, 0, 0]),
            BlockRange {
                lba: 0x1F_1234,
                blocks: 256
            }
        );
        let mut c10 = [0u8; 10];
        c10[0] = op::READ_10;
        c10[2..6].copy_from_slice(&7u32.to_be_bytes());
        c10[7..9].copy_from_slice(&9u16.to_be_bytes());
        assert_eq!(block_range(&c10), BlockRange { lba: 7, blocks: 9 });
        let mut c12 = [0u8; 12];
        c12[0] = op::WRITE_12;
        c12[2..6].copy_from_slice(&7u32.to_be_bytes());
        c12[6..10].copy_from_slice(&70_000u32.to_be_bytes());
        assert_eq!(
            block_range(&c12),
            BlockRange {
                lba: 7,
                blocks: 70_000
            }
        );
        let mut c16 = [0u8; 16];
        c16[0] = op::READ_16;
        c16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        c16[10..14].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(
            block_range(&c16),
            BlockRange {
                lba: u64::MAX,
                blocks: 3
            }
        );
    }

    #[test]
    fn range_checks() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(10, 0, 10).is_ok());
        assert!(check_range(11, 0, 10).is_err());
        assert!(check_range(9, 2, 10).is_err());
        assert!(check_range(u64::MAX, 2, 10).is_err());
    }
}
