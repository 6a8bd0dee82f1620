//! Geometry and limits of a logical unit, derived from its logical block size. They are
//! advertised in READ CAPACITY (16) and the Block Limits VPD page and enforced by the block
//! commands, from this one place.

/// The pool stores volumes in 4 KiB blocks: smaller writes are read-modify-write, so 4 KiB is
/// the physical block an initiator should align to.
pub(crate) const PHYSICAL_BLOCK: u32 = 4096;
/// Largest Data-In or Data-Out of one command; also bounds the buffers we allocate.
pub(crate) const MAX_TRANSFER_BYTES: u32 = 16 << 20;
/// Transfers of this size amortise per-command costs (one pool chunk).
pub(crate) const OPTIMAL_TRANSFER_BYTES: u32 = 1 << 20;
/// WRITE SAME of a non-zero pattern writes every block, so one command is kept to 1 GiB.
pub(crate) const MAX_WRITE_SAME_BYTES: u64 = 1 << 30;
/// ... and to fewer than 65536 blocks: initiators (libiscsi's suite among them) take a
/// MAXIMUM WRITE SAME LENGTH of 65536 or more as leave to move that many blocks in one plain
/// WRITE, which would exceed the maximum transfer length of 512-byte volumes.
pub(crate) const MAX_WRITE_SAME_BLOCKS: u64 = 65535;
/// Logical blocks one UNMAP command may deallocate (SBC-3 6.6.4; at most 1 Mi so that one
/// command stays short however large the volume).
pub(crate) const MAX_UNMAP_LBA_COUNT: u32 = 1 << 20;
/// LBA status descriptors one GET LBA STATUS returns at most (bounds its Data-In and work).
pub(crate) const MAX_LBA_STATUS_DESCRIPTORS: usize = 1024;
/// UNMAP block descriptors one UNMAP command may carry.
pub(crate) const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// COMPARE AND WRITE holds the logical unit's write lock for its duration; its length field is
/// one byte.
pub(crate) const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Logical blocks per physical block, as an exponent of two.
    pub lbppbe: u8,
    /// Maximum transfer length, in logical blocks.
    pub max_transfer: u32,
    /// Optimal transfer length, in logical blocks.
    pub optimal_transfer: u32,
    /// Maximum WRITE SAME length, in logical blocks.
    pub max_write_same: u64,
    /// Maximum atomic transfer length, in logical blocks (0: WRITE ATOMIC is not supported).
    /// Atomic writes have no alignment or granularity requirement (the pool merges partial
    /// 4 KiB blocks inside the atomic update) and no atomic boundary support.
    pub max_atomic: u32,
}

impl Limits {
    /// Limits for a device of `block_size`-byte logical blocks (a zero block size, which no
    /// pool volume has, is treated as 512 so that no division can fail).
    pub fn new(block_size: u32) -> Limits {
        let block_size = if block_size == 0 { 512 } else { block_size };
        let lbppbe = if block_size < PHYSICAL_BLOCK && PHYSICAL_BLOCK % block_size == 0 {
            (PHYSICAL_BLOCK / block_size).trailing_zeros() as u8
        } else {
            0
        };
        Limits {
            block_size,
            lbppbe,
            max_transfer: (MAX_TRANSFER_BYTES / block_size).max(1),
            optimal_transfer: (OPTIMAL_TRANSFER_BYTES / block_size).max(1),
            max_write_same: (MAX_WRITE_SAME_BYTES / u64::from(block_size))
                .clamp(1, MAX_WRITE_SAME_BLOCKS),
            max_atomic: 0,
        }
    }

    /// These limits for a device that writes up to `max_bytes` atomically: whole blocks, no
    /// more than one transfer, and no more than the 16-bit transfer length of WRITE ATOMIC (16).
    pub fn with_atomic_max(mut self, max_bytes: u64) -> Limits {
        let blocks = max_bytes / u64::from(self.block_size);
        self.max_atomic = blocks
            .min(u64::from(self.max_transfer))
            .min(u64::from(u16::MAX)) as u32;
        self
    }

    /// Logical blocks per physical block.
    pub fn blocks_per_physical(&self) -> u32 {
        1 << self.lbppbe
    }

    /// Byte length of `blocks` logical blocks, if it fits in memory terms.
    pub fn bytes(&self, blocks: u64) -> Option<usize> {
        blocks
            .checked_mul(u64::from(self.block_size))
            .and_then(|b| usize::try_from(b).ok())
    }

    /// Byte offset of `lba`.
    pub fn offset(&self, lba: u64) -> Option<u64> {
        lba.checked_mul(u64::from(self.block_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_for_common_block_sizes() {
        let l = Limits::new(512);
        assert_eq!(l.lbppbe, 3);
        assert_eq!(l.blocks_per_physical(), 8);
        assert_eq!(l.max_transfer, 32768);
        let l = Limits::new(4096);
        assert_eq!(l.lbppbe, 0);
        assert_eq!(l.max_transfer, 4096);
        assert_eq!(l.max_write_same, 65535);
        assert_eq!(Limits::new(0).block_size, 512);
        assert_eq!(Limits::new(8192).lbppbe, 0);
        assert_eq!(l.bytes(u64::MAX), None);
        assert_eq!(l.max_atomic, 0);
        assert_eq!(l.with_atomic_max(2 << 20).max_atomic, 512);
        assert_eq!(Limits::new(512).with_atomic_max(1 << 40).max_atomic, 32768);
        assert_eq!(Limits::new(512).with_atomic_max(511).max_atomic, 0);
    }
}
