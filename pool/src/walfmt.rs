//! The on-device format of a WAL batch (sans-IO: encode, parse, room accounting).
//!
//! ```text
//! header block (4 KiB), and the same block as a footer after the data (magic "MAASWALF"):
//!   0 magic "MAASWAL\0" | 8 version u16 = 2 | 10 0 u16 | 12 entry count u32 | 16 segment seq u64
//!   24 batch LSN u64 | 32 data blocks u32 | 36 0 u32 | 40 durable LSN u64 | 48..60 0
//!   60 CRC32C of the block (field = 0)
//!   64 + 24*i: entry { volume u64 | first block u64 | block count u32 | kind u8 (1 data, 2 zero)
//!                      | 0 [3] }
//!   64 + 24*entries: CRC32C of each data block, u32 each, in data order
//! data blocks, entry after entry
//! footer block
//! ```
//! Every data block has its own CRC, so a read of any block from the device is checked on its
//! own (not only at replay), and a damaged block is named precisely. The footer repeats the
//! header, so a batch whose header block is damaged still says which blocks it held.
//!
//! **Durable LSN.** Each header carries the highest LSN known durable (covered by a completed
//! sync) when the batch was handed to its device. Replay takes the highest of these claims and
//! of the durable LSN the metadata store records: a batch at or below it was durable, so a
//! check failure there is damage, never a torn write. The pool records it when the log has been
//! idle for 20 ms after a sync (so the last flushed batches, which no later header follows, have
//! that proof too), at a clean close, when segments are freed (their headers' claims go with
//! them) and after replay. Each segment's record keeps where its chain ends, so a later replay
//! reads exactly the same batches, and after an open new batches take LSNs above every LSN
//! handed out before (the recorded durable LSN included), so no LSN is ever judged twice.
//! The one window: damage to the last batches synced less than 20 ms before a power cut, with
//! no later batch written, is judged torn (closing it would cost a metadata commit per flush).

pub const WAL_MAGIC: &[u8; 8] = b"MAASWAL\0";
pub const WAL_FOOTER_MAGIC: &[u8; 8] = b"MAASWALF";
pub const WAL_FORMAT_VERSION: u16 = 2;
/// Most data a batch holds.
pub const MAX_BATCH_DATA: usize = 2 << 20;
const HEADER_FIXED: usize = 64;
const ENTRY_LEN: usize = 24;
const BLOCK: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Data = 1,
    Zero = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub vol: u64,
    pub block: u64,
    pub nblocks: u32,
    pub kind: EntryKind,
}

/// A decoded header (or footer) block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub seg_seq: u64,
    pub lsn: u64,
    pub durable_lsn: u64,
    pub entries: Vec<Entry>,
    /// CRC32C of each data block, in data order.
    pub crcs: Vec<u32>,
}

impl BatchHeader {
    pub fn data_blocks(&self) -> usize {
        self.crcs.len()
    }
}

/// Whether a header with `entries` entries and `data_blocks` data blocks fits its 4 KiB block.
pub fn fits(entries: usize, data_blocks: usize) -> bool {
    data_blocks * BLOCK <= MAX_BATCH_DATA
        && HEADER_FIXED + ENTRY_LEN * entries + 4 * data_blocks <= BLOCK
}

/// Data blocks a batch with `entries` entries and `data_blocks` blocks can still take: into
/// its last entry (`new_entry` false) or into a new one.
pub fn room(entries: usize, data_blocks: usize, new_entry: bool) -> usize {
    let entries = entries + usize::from(new_entry);
    let header_left = BLOCK.saturating_sub(HEADER_FIXED + ENTRY_LEN * entries + 4 * data_blocks);
    let data_left = (MAX_BATCH_DATA / BLOCK).saturating_sub(data_blocks);
    (header_left / 4).min(data_left)
}

/// Whether one more entry without data (a zeroing entry) fits.
pub fn room_for_entry(entries: usize, data_blocks: usize) -> bool {
    fits(entries + 1, data_blocks)
}

/// Encodes `h` into `b` (4096 bytes) as a header, or as a footer.
pub fn encode(b: &mut [u8], h: &BatchHeader, footer: bool) {
    b[..BLOCK].fill(0);
    b[0..8].copy_from_slice(if footer { WAL_FOOTER_MAGIC } else { WAL_MAGIC });
    b[8..10].copy_from_slice(&WAL_FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(h.entries.len() as u32).to_le_bytes());
    b[16..24].copy_from_slice(&h.seg_seq.to_le_bytes());
    b[24..32].copy_from_slice(&h.lsn.to_le_bytes());
    b[32..36].copy_from_slice(&(h.crcs.len() as u32).to_le_bytes());
    b[40..48].copy_from_slice(&h.durable_lsn.to_le_bytes());
    let mut o = HEADER_FIXED;
    for e in &h.entries {
        b[o..o + 8].copy_from_slice(&e.vol.to_le_bytes());
        b[o + 8..o + 16].copy_from_slice(&e.block.to_le_bytes());
        b[o + 16..o + 20].copy_from_slice(&e.nblocks.to_le_bytes());
        b[o + 20] = e.kind as u8;
        o += ENTRY_LEN;
    }
    for c in &h.crcs {
        b[o..o + 4].copy_from_slice(&c.to_le_bytes());
        o += 4;
    }
    seal_crc(b);
}

/// Stores the CRC32C of the block (computed with its CRC field zero) in that field.
fn seal_crc(b: &mut [u8]) {
    b[60..64].fill(0);
    let crc = crc32c::crc32c(&b[..BLOCK]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
}

/// Raises the durable LSN an encoded header or footer block claims to `durable_lsn` (never
/// lowers it), keeping the block's CRC right. The writer stamps a batch once when it is
/// sealed and again just before it goes to its device, so its claim is as fresh as a sync
/// allows.
pub fn restamp_durable(b: &mut [u8], durable_lsn: u64) {
    if b.len() < BLOCK {
        return;
    }
    let claimed = u64::from_le_bytes(b[40..48].try_into().unwrap_or([0; 8]));
    if durable_lsn <= claimed {
        return;
    }
    b[40..48].copy_from_slice(&durable_lsn.to_le_bytes());
    seal_crc(b);
}

/// What a 4 KiB block is, as far as the log is concerned.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Header(BatchHeader),
    Footer(BatchHeader),
    /// Not a valid header or footer of this format (damaged, torn, stale or never written).
    Invalid,
}

/// Parses a header or footer block. Every field is checked (CRC, version, entry and block
/// counts consistent and within the block); a hostile or damaged block is `Invalid`, never a
/// panic or a large allocation.
pub fn parse(b: &[u8]) -> Parsed {
    if b.len() < BLOCK {
        return Parsed::Invalid;
    }
    let footer = match &b[0..8] {
        m if m == WAL_MAGIC => false,
        m if m == WAL_FOOTER_MAGIC => true,
        _ => return Parsed::Invalid,
    };
    let stored = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
    let mut copy = [0u8; BLOCK];
    copy.copy_from_slice(&b[..BLOCK]);
    copy[60..64].fill(0);
    if crc32c::crc32c(&copy) != stored {
        return Parsed::Invalid;
    }
    let u64at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
    let u32at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
    if u16::from_le_bytes([b[8], b[9]]) != WAL_FORMAT_VERSION {
        return Parsed::Invalid;
    }
    let count = u32at(12) as usize;
    let data_blocks = u32at(32) as usize;
    if count > BLOCK / ENTRY_LEN || !fits(count, data_blocks) {
        return Parsed::Invalid;
    }
    let mut entries = Vec::with_capacity(count);
    let mut sum = 0usize;
    let mut o = HEADER_FIXED;
    for _ in 0..count {
        let kind = match b[o + 20] {
            1 => EntryKind::Data,
            2 => EntryKind::Zero,
            _ => return Parsed::Invalid,
        };
        let e = Entry {
            vol: u64at(o),
            block: u64at(o + 8),
            nblocks: u32at(o + 16),
            kind,
        };
        if kind == EntryKind::Data {
            sum += e.nblocks as usize;
        }
        entries.push(e);
        o += ENTRY_LEN;
    }
    if sum != data_blocks {
        return Parsed::Invalid;
    }
    let crcs = (0..data_blocks).map(|i| u32at(o + 4 * i)).collect();
    let h = BatchHeader {
        seg_seq: u64at(16),
        lsn: u64at(24),
        durable_lsn: u64at(40),
        entries,
        crcs,
    };
    if footer {
        Parsed::Footer(h)
    } else {
        Parsed::Header(h)
    }
}

/// Bytes a batch of `data_blocks` data blocks takes on its device (header, data, footer).
pub fn batch_len(data_blocks: usize) -> usize {
    (data_blocks + 2) * BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(entries: usize, blocks_each: u32) -> BatchHeader {
        let entries: Vec<Entry> = (0..entries)
            .map(|i| Entry {
                vol: 7 + i as u64,
                block: 100 * i as u64,
                nblocks: blocks_each,
                kind: if blocks_each == 0 {
                    EntryKind::Zero
                } else {
                    EntryKind::Data
                },
            })
            .collect();
        let n: usize = entries.iter().map(|e| e.nblocks as usize).sum();
        BatchHeader {
            seg_seq: 3,
            lsn: 99,
            durable_lsn: 97,
            entries,
            crcs: (0..n as u32).map(|i| i.wrapping_mul(2654435761)).collect(),
        }
    }

    #[test]
    fn roundtrip_header_and_footer() {
        for (e, n) in [(1, 512), (144, 1), (0, 0), (82, 6), (30, 0)] {
            let h = sample(e, n);
            assert!(fits(h.entries.len(), h.data_blocks()), "{e} {n}");
            let mut b = vec![0u8; 4096];
            encode(&mut b, &h, false);
            assert_eq!(parse(&b), Parsed::Header(h.clone()));
            encode(&mut b, &h, true);
            assert_eq!(parse(&b), Parsed::Footer(h));
        }
    }

    #[test]
    fn restamping_raises_the_durable_claim_and_keeps_the_block_valid() {
        let h = sample(3, 2);
        for footer in [false, true] {
            let mut b = vec![0u8; 4096];
            encode(&mut b, &h, footer);
            restamp_durable(&mut b, 120);
            let want = BatchHeader {
                durable_lsn: 120,
                ..h.clone()
            };
            let got = parse(&b);
            match (&got, footer) {
                (Parsed::Header(g), false) | (Parsed::Footer(g), true) => assert_eq!(g, &want),
                _ => panic!("{got:?}"),
            }
            // Never lowered.
            restamp_durable(&mut b, 5);
            assert!(
                matches!(parse(&b), Parsed::Header(g) | Parsed::Footer(g) if g.durable_lsn == 120)
            );
        }
    }

    #[test]
    fn room_is_what_fits() {
        assert_eq!(room(0, 0, true), 512);
        // Small writes: one entry and one CRC each.
        let mut e = 0;
        while room(e, e, true) >= 1 {
            e += 1;
        }
        assert_eq!(e, 144);
        assert!(fits(144, 144) && !fits(145, 145));
        assert_eq!(room(1, 512, false), 0);
        assert!(!room_for_entry(170, 0));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let h = sample(5, 3);
        let mut b = vec![0u8; 4096];
        encode(&mut b, &h, false);
        for bit in (0..4096 * 8).step_by(7) {
            let mut c = b.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(parse(&c), Parsed::Invalid, "bit {bit}");
        }
    }

    proptest! {
        #[test]
        fn hostile_blocks_never_panic(bytes in proptest::collection::vec(any::<u8>(), 4096),
                                      count in 0u32..10_000, blocks in 0u32..10_000) {
            let mut b = bytes;
            b[0..8].copy_from_slice(WAL_MAGIC);
            b[8..10].copy_from_slice(&WAL_FORMAT_VERSION.to_le_bytes());
            b[12..16].copy_from_slice(&count.to_le_bytes());
            b[32..36].copy_from_slice(&blocks.to_le_bytes());
            b[60..64].fill(0);
            let crc = crc32c::crc32c(&b);
            b[60..64].copy_from_slice(&crc.to_le_bytes());
            if let Parsed::Header(h) = parse(&b) {
                prop_assert!(fits(h.entries.len(), h.data_blocks()));
            }
        }
    }
}
