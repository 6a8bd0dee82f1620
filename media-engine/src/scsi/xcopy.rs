//! EXTENDED COPY (LID1, SPC-4 6.4) and RECEIVE COPY RESULTS (SPC-4 6.24) for block-to-block
//! copies within this logical unit: the initiator (a hypervisor cloning a VM disk, say) names
//! source and destination ranges and the data never crosses the network. Copy targets other
//! than this logical unit are reported unreachable.

use std::collections::VecDeque;

use super::cdb::{be16, be24, be32, be64, u8_at};
use super::limits::OPTIMAL_TRANSFER_BYTES;
use super::lu::{IoKind, LogicalUnit};
use super::sense::{Asc, Sense, SenseKey};
use super::{Command, Nexus, Response};

/// Target (CSCD) descriptors one command may carry.
const MAX_TARGET_DESCRIPTORS: u16 = 2;
/// Segment descriptors one command may carry.
const MAX_SEGMENT_DESCRIPTORS: u16 = 8;
/// Target plus segment descriptor bytes one command may carry.
const MAX_DESCRIPTOR_LIST_LENGTH: u32 = 1024;
/// Bytes one segment may copy: keeps a command to 8 x 16 MiB.
const MAX_SEGMENT_LENGTH: u32 = 16 << 20;
/// Held copy results kept per logical unit (for RECEIVE COPY RESULTS).
const MAX_HELD_RESULTS: usize = 32;

/// Length of the parameter list header.
const HEADER_LEN: usize = 16;
/// Identification descriptor target descriptor (type E4h), 32 bytes.
const IDENTIFICATION_TARGET: u8 = 0xE4;
const TARGET_DESCRIPTOR_LEN: usize = 32;
/// Block device to block device segment descriptor (type 02h), 28 bytes.
const BLOCK_TO_BLOCK_SEGMENT: u8 = 0x02;
const BLOCK_SEGMENT_LEN: usize = 28;

/// Outcome of one EXTENDED COPY kept for RECEIVE COPY RESULTS (COPY STATUS).
#[derive(Clone, Debug, PartialEq, Eq)]
struct CopyStatus {
    nexus: Nexus,
    list_id: u8,
    failed: bool,
    segments_processed: u16,
    bytes: u64,
}

/// Results of completed copies whose LIST ID USAGE asked for them to be held.
#[derive(Debug, Default)]
pub(super) struct CopyResults {
    held: VecDeque<CopyStatus>,
}

impl CopyResults {
    fn hold(&mut self, status: CopyStatus) {
        self.held
            .retain(|s| !(s.nexus == status.nexus && s.list_id == status.list_id));
        if self.held.len() >= MAX_HELD_RESULTS {
            self.held.pop_front();
        }
        self.held.push_back(status);
    }

    fn find(&self, nexus: &Nexus, list_id: u8) -> Option<&CopyStatus> {
        self.held
            .iter()
            .find(|s| &s.nexus == nexus && s.list_id == list_id)
    }

    /// Held results belong to their I_T nexus and go with it.
    pub fn nexus_gone(&mut self, nexus: &Nexus) {
        self.held.retain(|s| &s.nexus != nexus);
    }
}

/// One block-to-block segment, validated.
#[derive(Clone, Copy, Debug)]
struct Segment {
    src_lba: u64,
    dst_lba: u64,
    blocks: u64,
}

fn copy_aborted(asc: Asc) -> Sense {
    Sense::new(SenseKey::CopyAborted, asc)
}

impl LogicalUnit {
    pub(super) fn extended_copy(
        &self,
        cmd: &Command<'_>,
        capacity: u64,
    ) -> Result<Response, Sense> {
        let list_len = be32(cmd.cdb, 10) as usize;
        if list_len == 0 {
            return Ok(Response::good());
        }
        let data = cmd.data_out.get(..list_len).unwrap_or(cmd.data_out);
        if data.len() < HEADER_LEN {
            return Err(Sense::param_list_length_error());
        }
        let list_id = u8_at(data, 0);
        let hold = match (u8_at(data, 1) >> 3) & 0x03 {
            0b00 => true,
            0b10 | 0b11 => false,
            _ => return Err(Sense::invalid_param_field(1, Some(4))),
        };
        let targets_len = usize::from(be16(data, 2));
        let segments_len = be32(data, 8) as usize;
        let inline_len = be32(data, 12) as usize;
        if targets_len.saturating_add(segments_len) > MAX_DESCRIPTOR_LIST_LENGTH as usize {
            return Err(Sense::param_list_length_error());
        }
        let needed = HEADER_LEN
            .saturating_add(targets_len)
            .saturating_add(segments_len)
            .saturating_add(inline_len);
        if data.len() < needed {
            return Err(Sense::param_list_length_error());
        }
        if inline_len != 0 {
            // No inline data is supported (MAXIMUM INLINE DATA LENGTH 0).
            return Err(Sense::invalid_param_field(12, None));
        }
        let targets = data
            .get(HEADER_LEN..HEADER_LEN + targets_len)
            .unwrap_or_default();
        let segments = data
            .get(HEADER_LEN + targets_len..needed)
            .unwrap_or_default();
        let target_count = self.check_targets(targets)?;
        let segments =
            self.parse_segments(segments, HEADER_LEN + targets_len, target_count, capacity)?;
        self.check_writable()?;

        let mut status = CopyStatus {
            nexus: cmd.nexus.clone(),
            list_id,
            failed: false,
            segments_processed: 0,
            bytes: 0,
        };
        let mut result = Ok(Response::good());
        for seg in &segments {
            if let Err(sense) = self.copy_blocks(seg) {
                status.failed = true;
                // The copy target's error, reported as aborting the copy.
                result = Err(Sense {
                    key: SenseKey::CopyAborted,
                    ..sense
                });
                break;
            }
            status.segments_processed += 1;
            status.bytes += seg.blocks * u64::from(self.limits.block_size);
        }
        if hold {
            self.state.lock().copy_results.hold(status);
        }
        result
    }

    /// Checks the target descriptor list; every descriptor must identify this logical unit.
    /// Returns how many there are.
    fn check_targets(&self, targets: &[u8]) -> Result<usize, Sense> {
        let count = targets.len() / TARGET_DESCRIPTOR_LEN;
        if count > usize::from(MAX_TARGET_DESCRIPTORS) {
            return Err(Sense::illegal_request(Asc::TOO_MANY_TARGET_DESCRIPTORS));
        }
        if targets.len() % TARGET_DESCRIPTOR_LEN != 0 {
            return Err(Sense::param_list_length_error());
        }
        for (i, desc) in targets.chunks_exact(TARGET_DESCRIPTOR_LEN).enumerate() {
            let at = HEADER_LEN + i * TARGET_DESCRIPTOR_LEN;
            if u8_at(desc, 0) != IDENTIFICATION_TARGET {
                return Err(
                    Sense::illegal_request(Asc::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE)
                        .with_field_pointer(false, at, None),
                );
            }
            // Byte 1: LU ID TYPE (ignored since SPC-4), NUL (obsolete), peripheral device type.
            if u8_at(desc, 1) & 0x1F != 0 {
                return Err(
                    Sense::illegal_request(Asc::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE)
                        .with_field_pointer(false, at + 1, Some(4)),
                );
            }
            if !self.designates_this_lu(desc.get(4..24).unwrap_or_default()) {
                return Err(copy_aborted(Asc::UNREACHABLE_COPY_TARGET));
            }
            if be24(desc, 29) != self.limits.block_size {
                return Err(Sense::invalid_param_field(at + 29, None));
            }
        }
        Ok(count)
    }

    /// True when `designator` (a designation descriptor) is this logical unit's NAA or T10
    /// vendor ID designator.
    fn designates_this_lu(&self, designator: &[u8]) -> bool {
        let ty = u8_at(designator, 1) & 0x0F;
        let assoc = (u8_at(designator, 1) >> 4) & 0x03;
        let len = usize::from(u8_at(designator, 3));
        let Some(id) = designator.get(4..4 + len) else {
            return false;
        };
        match (assoc, ty) {
            (0, 0x3) => id == self.ident.naa,
            (0, 0x1) => {
                let vendor: Vec<u8> = self
                    .ident
                    .vendor
                    .bytes()
                    .chain(std::iter::repeat(b' '))
                    .take(8)
                    .collect();
                id.strip_prefix(vendor.as_slice()) == Some(self.ident.serial.as_bytes())
            }
            _ => false,
        }
    }

    fn parse_segments(
        &self,
        mut list: &[u8],
        mut at: usize,
        target_count: usize,
        capacity: u64,
    ) -> Result<Vec<Segment>, Sense> {
        let mut segments = Vec::new();
        while !list.is_empty() {
            if segments.len() >= usize::from(MAX_SEGMENT_DESCRIPTORS) {
                return Err(Sense::illegal_request(Asc::TOO_MANY_SEGMENT_DESCRIPTORS));
            }
            let Some(header) = list.get(..4) else {
                return Err(Sense::param_list_length_error());
            };
            if u8_at(header, 0) != BLOCK_TO_BLOCK_SEGMENT {
                return Err(
                    Sense::illegal_request(Asc::UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE)
                        .with_field_pointer(false, at, None),
                );
            }
            if usize::from(be16(header, 2)) != BLOCK_SEGMENT_LEN - 4 {
                return Err(Sense::invalid_param_field(at + 2, None));
            }
            let Some(desc) = list.get(..BLOCK_SEGMENT_LEN) else {
                return Err(Sense::param_list_length_error());
            };
            let src = usize::from(be16(desc, 4));
            let dst = usize::from(be16(desc, 6));
            if src >= target_count || dst >= target_count {
                return Err(copy_aborted(Asc::COPY_TARGET_DEVICE_NOT_REACHABLE));
            }
            let seg = Segment {
                blocks: u64::from(be16(desc, 10)),
                src_lba: be64(desc, 12),
                dst_lba: be64(desc, 20),
            };
            if seg.blocks * u64::from(self.limits.block_size) > u64::from(MAX_SEGMENT_LENGTH) {
                return Err(Sense::invalid_param_field(at + 10, None));
            }
            for lba in [seg.src_lba, seg.dst_lba] {
                if lba.checked_add(seg.blocks).is_none_or(|end| end > capacity) {
                    return Err(copy_aborted(Asc::NO_ADDITIONAL_SENSE));
                }
            }
            segments.push(seg);
            list = list.get(BLOCK_SEGMENT_LEN..).unwrap_or_default();
            at += BLOCK_SEGMENT_LEN;
        }
        Ok(segments)
    }

    /// Copies one segment a chunk at a time, backwards when the destination overlaps the end
    /// of the source so that no source block is overwritten before it is read.
    fn copy_blocks(&self, seg: &Segment) -> Result<(), Sense> {
        let block_size = u64::from(self.limits.block_size);
        let chunk = (u64::from(OPTIMAL_TRANSFER_BYTES) / block_size).max(1);
        let backwards = seg.dst_lba > seg.src_lba && seg.dst_lba < seg.src_lba + seg.blocks;
        let fua = !self.write_cache_enabled();
        let _order = self.write_shared()?;
        let mut done = 0u64;
        while done < seg.blocks {
            let n = (seg.blocks - done).min(chunk);
            let skip = if backwards {
                seg.blocks - done - n
            } else {
                done
            };
            let mut buf = vec![0u8; (n * block_size) as usize];
            self.dev
                .read((seg.src_lba + skip) * block_size, &mut buf)
                .map_err(|e| self.io_sense(&e, IoKind::Read))?;
            self.dev
                .write((seg.dst_lba + skip) * block_size, &buf, fua)
                .map_err(|e| self.io_sense(&e, IoKind::Write))?;
            done += n;
        }
        Ok(())
    }

    /// RECEIVE COPY RESULTS: COPY STATUS of a held copy, or the OPERATING PARAMETERS.
    pub(super) fn receive_copy_results(&self, cmd: &Command<'_>) -> Result<Response, Sense> {
        let cdb = cmd.cdb;
        let allocation_length = be32(cdb, 10) as usize;
        let mut d = Vec::new();
        match u8_at(cdb, 1) & 0x1F {
            // COPY STATUS
            0x00 => {
                let list_id = u8_at(cdb, 2);
                // Results are held per I_T nexus: another nexus's list id is unknown here.
                let held = self
                    .state
                    .lock()
                    .copy_results
                    .find(cmd.nexus, list_id)
                    .cloned();
                let Some(status) = held else {
                    return Err(Sense::invalid_cdb_field(2, None));
                };
                d.extend_from_slice(&8u32.to_be_bytes());
                d.push(u8::from(status.failed));
                d.extend_from_slice(&status.segments_processed.to_be_bytes());
                // Transfer count in kibibytes (units F1h) so that large copies fit.
                d.push(0xF1);
                d.extend_from_slice(
                    &u32::try_from(status.bytes / 1024)
                        .unwrap_or(u32::MAX)
                        .to_be_bytes(),
                );
            }
            // OPERATING PARAMETERS
            _ => {
                d.extend_from_slice(&[0; 4]);
                d.extend_from_slice(&[0; 4]); // SNLID 0
                d.extend_from_slice(&MAX_TARGET_DESCRIPTORS.to_be_bytes());
                d.extend_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
                d.extend_from_slice(&MAX_DESCRIPTOR_LIST_LENGTH.to_be_bytes());
                d.extend_from_slice(&MAX_SEGMENT_LENGTH.to_be_bytes());
                d.extend_from_slice(&[0; 4]); // maximum inline data length
                d.extend_from_slice(&[0; 4]); // held data limit
                d.extend_from_slice(&[0; 4]); // maximum stream device transfer size
                d.extend_from_slice(&[0; 2]);
                d.extend_from_slice(&1u16.to_be_bytes()); // total concurrent copies
                d.push(1); // maximum concurrent copies
                d.push(self.limits.block_size.trailing_zeros() as u8); // data segment granularity
                d.extend_from_slice(&[0, 0, 0, 0, 0]);
                d.push(2);
                d.extend_from_slice(&[BLOCK_TO_BLOCK_SEGMENT, IDENTIFICATION_TARGET]);
                let available = (d.len() - 4) as u32;
                d[..4].copy_from_slice(&available.to_be_bytes());
            }
        }
        d.truncate(allocation_length);
        Ok(Response::data(d))
    }
}
