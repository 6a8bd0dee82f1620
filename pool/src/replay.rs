//! WAL replay: rebuilds the overlays from the log after an open, telling torn batches (in flight
//! at the crash, discarded) from damaged ones (durable, reported).
//!
//! Replay reads every segment and walks its batches in LSN order. A batch whose header is
//! unreadable is found by its footer; a batch with neither is skipped over to the next valid
//! header of the segment. Then every batch is judged against the **durable LSN**: the highest
//! LSN any valid header claims was durable when it was written, or that the metadata store
//! recorded (see [`crate::walfmt`]).
//! - A batch that checks out is applied.
//! - A batch above the durable LSN that fails a check (data block CRC, or header and footer
//!   both unreadable, or missing from a segment that should hold it) can have been in flight at
//!   the crash: it is torn and ends its segment's chain, with nothing after it in that segment
//!   applied (a flush covered none of it).
//! - A batch at or below the durable LSN that fails a check is **damage**: its good blocks are
//!   applied, its bad blocks become damaged blocks (reads fail with a medium error until they
//!   are written again), and the damage is reported with a copy of the bytes as evidence. If
//!   neither its header nor its footer can be read, the damage cannot be tied to blocks and is
//!   reported as unattributed.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::{PoolError, Result};
use crate::io::{self, AlignedBuf, Op};
use crate::meta::{LogDamageRec, SegRec};
use crate::overlay::Loc;
use crate::shared::Shared;
use crate::wal::{BatchSums, Replayed, Segment};
use crate::walfmt::{self, BatchHeader, EntryKind, Parsed};

const BLOCK: usize = 4096;
/// Most bytes of an unattributed damaged range kept as evidence.
const MAX_EVIDENCE: usize = 8 << 20;

/// Damage found by replay: a durable batch (or run of batches) that failed its checks — the
/// record the pool keeps (not yet stamped with its detection time and evidence file) and a
/// copy of the damaged bytes.
#[derive(Debug)]
pub struct FoundDamage {
    pub rec: LogDamageRec,
    pub evidence: Vec<u8>,
}

/// What the walk of one segment found at one place.
enum Item {
    /// A batch whose header or footer is readable; `bad` lists its data blocks that fail their
    /// CRC (indices in data order).
    Batch {
        pos: usize,
        h: BatchHeader,
        bad: Vec<usize>,
        footer_only: bool,
    },
    /// Batches [lsn, end_lsn) at [pos, pos+len) whose header and footer are both unreadable,
    /// followed by a valid batch of the segment.
    Unreadable {
        pos: usize,
        len: usize,
        lsn: u64,
        end_lsn: u64,
    },
}

struct Walked {
    seq: u64,
    rec: SegRec,
    buf: AlignedBuf,
    items: Vec<Item>,
    /// LSN at which the walk found nothing more, and where.
    chain_end: u64,
    tail_pos: usize,
    /// Highest durable LSN a valid header or footer of the segment claims.
    claim: u64,
}

/// The header (or, if unreadable, the footer) of batch `lsn` of segment `seq` at `pos`.
fn batch_at(buf: &[u8], pos: usize, seq: u64, lsn: u64) -> Option<(BatchHeader, bool)> {
    let ours = |h: &BatchHeader| h.seg_seq == seq && h.lsn == lsn;
    if let Parsed::Header(h) = walfmt::parse(&buf[pos..]) {
        let end = pos + walfmt::batch_len(h.data_blocks());
        if ours(&h) && end <= buf.len() {
            return Some((h, false));
        }
    }
    // The footer follows the data: look for it at every place a batch's end can be.
    let max_blocks = walfmt::MAX_BATCH_DATA / BLOCK;
    for d in 0..=max_blocks {
        let at = pos + BLOCK + d * BLOCK;
        if at + BLOCK > buf.len() {
            break;
        }
        if let Parsed::Footer(f) = walfmt::parse(&buf[at..]) {
            if ours(&f) && f.data_blocks() == d {
                return Some((f, true));
            }
        }
    }
    None
}

/// The next valid header of segment `seq` after `pos` with an LSN above `lsn`.
fn next_header(buf: &[u8], pos: usize, seq: u64, lsn: u64) -> Option<(usize, u64)> {
    let mut at = pos + BLOCK;
    while at + BLOCK <= buf.len() {
        if let Parsed::Header(h) = walfmt::parse(&buf[at..])
            && h.seg_seq == seq
            && h.lsn > lsn
            && at + walfmt::batch_len(h.data_blocks()) <= buf.len()
        {
            return Some((at, h.lsn));
        }
        at += BLOCK;
    }
    None
}

fn walk(shared: &Shared, seq: u64, rec: SegRec) -> Result<Walked> {
    let dev = shared.device(rec.extent.device)?;
    let mut buf = AlignedBuf::zeroed(rec.extent.len as usize);
    io::run_batch(&mut [Op::Read {
        file: dev.file(),
        offset: rec.extent.offset,
        buf: &mut buf,
    }])
    .map_err(|e| dev.io_err(e))?;
    let mut items = Vec::new();
    let mut claim = 0;
    let mut pos = 0usize;
    let mut lsn = rec.first_lsn;
    let limit = rec.end_lsn.unwrap_or(u64::MAX);
    while pos + BLOCK <= buf.len() && lsn < limit {
        if &buf[pos..pos + 8] == walfmt::WAL_MAGIC
            && u16::from_le_bytes([buf[pos + 8], buf[pos + 9]]) < walfmt::WAL_FORMAT_VERSION
        {
            return Err(PoolError::UnsupportedFormat {
                what: format!("write-ahead log segment {seq}"),
                detail: format!(
                    "batch format {} from an earlier MaaS build; this build reads format {} \
                     (no release wrote the old format: recreate the pool)",
                    u16::from_le_bytes([buf[pos + 8], buf[pos + 9]]),
                    walfmt::WAL_FORMAT_VERSION
                ),
            });
        }
        if let Some((h, footer_only)) = batch_at(&buf, pos, seq, lsn) {
            claim = claim.max(h.durable_lsn);
            let data = pos + BLOCK;
            let bad: Vec<usize> = h
                .crcs
                .iter()
                .enumerate()
                .filter(|(i, c)| {
                    let at = data + i * BLOCK;
                    crc32c::crc32c(&buf[at..at + BLOCK]) != **c
                })
                .map(|(i, _)| i)
                .collect();
            let len = walfmt::batch_len(h.data_blocks());
            items.push(Item::Batch {
                pos,
                h,
                bad,
                footer_only,
            });
            pos += len;
            lsn += 1;
            continue;
        }
        match next_header(&buf, pos, seq, lsn) {
            Some((at, next)) if next <= limit => {
                items.push(Item::Unreadable {
                    pos,
                    len: at - pos,
                    lsn,
                    end_lsn: next,
                });
                pos = at;
                lsn = next;
            }
            _ => break,
        }
    }
    Ok(Walked {
        seq,
        rec,
        buf,
        items,
        chain_end: lsn,
        tail_pos: pos.min(rec.extent.len as usize),
        claim,
    })
}

/// Walks the log (segments in order) and calls `apply(entry, batch_lsn, first_block_location,
/// bad)` for every entry of every batch to apply, in LSN order; `bad` lists the entry's blocks
/// (offsets from its first) that are damaged. `recorded_durable` is the durable LSN the
/// metadata store records.
pub fn replay(
    shared: &Shared,
    segs: &[(u64, SegRec)],
    recorded_durable: u64,
    mut apply: impl FnMut(&walfmt::Entry, u64, Option<Loc>, &[u64]),
) -> Result<Replayed> {
    let mut walked = Vec::with_capacity(segs.len());
    for &(seq, rec) in segs {
        walked.push(walk(shared, seq, rec)?);
    }
    let durable = walked
        .iter()
        .map(|w| w.claim)
        .fold(recorded_durable, u64::max);
    // Where the durable LSN comes from, for the damage report.
    let claims: String = std::iter::once(format!("recorded {recorded_durable}"))
        .chain(
            walked
                .iter()
                .filter(|w| w.claim > 0)
                .map(|w| format!("segment {} claims {}", w.seq, w.claim)),
        )
        .collect::<Vec<_>>()
        .join(", ");
    let mut next_lsn = 1;
    let mut out = Replayed {
        next_lsn: 1,
        segments: Vec::with_capacity(walked.len()),
        batches: 0,
        sums: BTreeMap::new(),
        durable_lsn: durable,
        damage: Vec::new(),
        ends: Vec::new(),
    };
    let next_first: Vec<Option<u64>> = (0..walked.len())
        .map(|i| walked.get(i + 1).map(|w| w.rec.first_lsn))
        .collect();
    for (w, next_first) in walked.into_iter().zip(next_first) {
        let Walked {
            seq,
            rec,
            buf,
            items,
            chain_end,
            tail_pos,
            ..
        } = w;
        next_lsn = u64::max(next_lsn, rec.first_lsn);
        let dev = rec.extent.device;
        let mut seg = Segment::new(seq, rec);
        let mut end = None;
        for item in items {
            match item {
                Item::Batch {
                    pos,
                    h,
                    bad,
                    footer_only,
                } => {
                    if !bad.is_empty() && h.lsn > durable {
                        tracing::info!(
                            segment = seq,
                            lsn = h.lsn,
                            "WAL replay: torn batch ends this segment (never flushed)"
                        );
                        end = Some(h.lsn);
                        break;
                    }
                    if footer_only {
                        tracing::warn!(
                            segment = seq,
                            lsn = h.lsn,
                            "WAL replay: batch header unreadable; its footer names its blocks"
                        );
                    }
                    let data_offset = rec.extent.offset + (pos + BLOCK) as u64;
                    let mut lost = Vec::new();
                    let mut at = 0usize;
                    for e in &h.entries {
                        let loc = (e.kind == EntryKind::Data).then_some(Loc {
                            lsn: h.lsn,
                            device: dev,
                            offset: data_offset + (at * BLOCK) as u64,
                        });
                        let mut bad_here = Vec::new();
                        if e.kind == EntryKind::Data {
                            let n = e.nblocks as usize;
                            for &i in bad.iter().filter(|&&i| i >= at && i < at + n) {
                                bad_here.push((i - at) as u64);
                                lost.push((e.vol, e.block + (i - at) as u64));
                            }
                            at += n;
                        }
                        let m = seg.vols.entry(e.vol).or_insert(0);
                        *m = (*m).max(h.lsn);
                        if e.kind == EntryKind::Zero {
                            seg.live += 1;
                        }
                        apply(e, h.lsn, loc, &bad_here);
                    }
                    if !bad.is_empty() {
                        seg.suspect = true;
                        let len = walfmt::batch_len(h.data_blocks());
                        tracing::error!(
                            segment = seq,
                            lsn = h.lsn,
                            durable_lsn = durable,
                            blocks = lost.len(),
                            "WAL replay: a durable batch is damaged; its blocks will read as \
                             medium errors until rewritten (restore them from a snapshot)"
                        );
                        out.damage.push(FoundDamage {
                            rec: LogDamageRec {
                                segment: seq,
                                lsn: h.lsn,
                                end_lsn: h.lsn + 1,
                                device: dev,
                                offset: rec.extent.offset + pos as u64,
                                len: len as u64,
                                blocks: lost,
                                unattributed: false,
                                detected_unix: 0,
                                evidence: None,
                                detail: format!(
                                    "{} of {} data blocks fail their CRC in a batch at or below \
                                     the durable LSN {durable}",
                                    bad.len(),
                                    h.data_blocks()
                                ),
                            },
                            evidence: buf[pos..pos + len].to_vec(),
                        });
                    }
                    if h.data_blocks() > 0 {
                        out.sums.insert(
                            h.lsn,
                            Arc::new(BatchSums {
                                device: dev,
                                data_offset,
                                crcs: h.crcs.clone().into_boxed_slice(),
                            }),
                        );
                    }
                    seg.last_lsn = h.lsn;
                    out.batches += 1;
                    next_lsn = next_lsn.max(h.lsn + 1);
                }
                Item::Unreadable {
                    pos,
                    len,
                    lsn,
                    end_lsn,
                } => {
                    if lsn > durable {
                        tracing::info!(
                            segment = seq,
                            lsn,
                            "WAL replay: unreadable batch ends this segment (never flushed)"
                        );
                        end = Some(lsn);
                        break;
                    }
                    seg.suspect = true;
                    out.damage.push(unattributed(
                        seq, &rec, &buf, pos, len, lsn, end_lsn, durable,
                    ));
                    next_lsn = next_lsn.max(end_lsn);
                }
            }
        }
        let chain_end = end.unwrap_or(chain_end);
        if end.is_none() {
            // Nothing found from `chain_end` on: LSNs the segment should still hold that were
            // durable are lost (header, data and footer unreadable to the segment's end).
            // A segment closed by a roll has its end recorded; one from before ends were
            // recorded ends where the next segment starts; the last one, at the durable LSN.
            let end = rec.end_lsn.or(next_first).unwrap_or(u64::MAX);
            let expected = end.min(durable.saturating_add(1));
            if chain_end < expected {
                let pos = tail_pos;
                seg.suspect = true;
                let mut d = unattributed(
                    seq,
                    &rec,
                    &buf,
                    pos,
                    buf.len() - pos,
                    chain_end,
                    expected,
                    durable,
                );
                d.rec.detail = format!(
                    "{}; the segment (first LSN {}, end {:?}, next segment's first LSN {:?}) \
                     ends at LSN {chain_end}; durable LSN from: {claims}",
                    d.rec.detail, rec.first_lsn, rec.end_lsn, next_first
                );
                out.damage.push(d);
                next_lsn = next_lsn.max(expected);
            }
        }
        // Record where this segment's chain ends, so that a later replay, which may know a
        // higher durable LSN (from segments written after this open), reads exactly the same
        // batches here and judges nothing twice.
        let chain_end = chain_end.max(rec.first_lsn);
        if rec.end_lsn != Some(chain_end) {
            out.ends.push((seq, chain_end));
            seg.rec.end_lsn = Some(chain_end);
        }
        out.segments.push(seg);
    }
    out.next_lsn = next_lsn;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn unattributed(
    seq: u64,
    rec: &SegRec,
    buf: &[u8],
    pos: usize,
    len: usize,
    lsn: u64,
    end_lsn: u64,
    durable: u64,
) -> FoundDamage {
    tracing::error!(
        segment = seq,
        lsn,
        end_lsn,
        durable_lsn = durable,
        "WAL replay: durable batches are unreadable (header and footer damaged); the blocks \
         they held cannot be named: verify the volumes written then against their snapshots"
    );
    let keep = len.min(MAX_EVIDENCE);
    FoundDamage {
        rec: LogDamageRec {
            segment: seq,
            lsn,
            end_lsn,
            device: rec.extent.device,
            offset: rec.extent.offset + pos as u64,
            len: len as u64,
            blocks: Vec::new(),
            unattributed: true,
            detected_unix: 0,
            evidence: None,
            detail: format!(
                "batches {lsn}..{end_lsn} at or below the durable LSN {durable} have neither a \
                 readable header nor a readable footer"
            ),
        },
        evidence: buf[pos..pos + keep].to_vec(),
    }
}
