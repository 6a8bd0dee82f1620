//! The overlay of a live volume: 4 KiB blocks written since its base index, each pointing at
//! its copy in the WAL, plus whole chunks zeroed (discard / write-zeroes). Lookups fall through
//! active overlay -> frozen overlay (being sealed) -> base index.

use std::collections::BTreeMap;

/// Where a block's current data lives in the WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// LSN of the WAL batch holding it; batches above the written mark are still in memory.
    pub lsn: u64,
    pub device: u16,
    /// Byte offset of the 4 KiB block on the device.
    pub offset: u64,
}

impl Loc {
    /// Whether this is the block `blocks` blocks after `first` in the same batch (so both
    /// are copied or read as one run).
    pub fn follows(&self, first: &Loc, blocks: u64) -> bool {
        self.lsn == first.lsn
            && self.device == first.device
            && self.offset == first.offset + blocks * 4096
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Data(Loc),
    Zero,
    /// The block's latest write is known to be lost: a durable log batch holding it failed its
    /// checksum (replay) or a fold found its log copy damaged. Reads fail with a medium error
    /// until the block is written again. The LSN is that of the damaged batch.
    Damaged(u64),
}

/// Result of looking a block up in an overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Data(Loc),
    Zero,
    /// Damaged in the batch with this LSN (see [`Slot::Damaged`]).
    Damaged(u64),
    /// Not in this overlay: look below.
    Below,
}

#[derive(Clone, Debug, Default)]
pub struct Overlay {
    pub blocks: BTreeMap<u64, Slot>,
    /// Zeroed whole chunks, as disjoint ranges start -> end (exclusive).
    pub zeroed: BTreeMap<u64, u64>,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.zeroed.is_empty()
    }

    pub fn chunk_zeroed(&self, chunk: u64) -> bool {
        self.zeroed
            .range(..=chunk)
            .next_back()
            .is_some_and(|(_, &e)| chunk < e)
    }

    pub fn lookup(&self, block: u64, chunk_blocks: u64) -> Lookup {
        match self.blocks.get(&block) {
            Some(Slot::Data(l)) => Lookup::Data(*l),
            Some(Slot::Zero) => Lookup::Zero,
            Some(Slot::Damaged(lsn)) => Lookup::Damaged(*lsn),
            None if self.chunk_zeroed(block / chunk_blocks) => Lookup::Zero,
            None => Lookup::Below,
        }
    }

    /// Points blocks [block, block+n) at consecutive log blocks from `first`; the log
    /// locations they pointed at before go to `released` (the log cleaner's accounting).
    pub fn set_data(&mut self, block: u64, n: u64, first: Loc, released: &mut Vec<Loc>) {
        for i in 0..n {
            let loc = Loc {
                offset: first.offset + i * 4096,
                ..first
            };
            if let Some(Slot::Data(old)) = self.blocks.insert(block + i, Slot::Data(loc)) {
                released.push(old);
            }
        }
    }

    /// Zeroes blocks [block, block+n): whole chunks go to the range set, the rest block by block.
    /// Log locations no longer pointed at go to `released`.
    pub fn set_zero(&mut self, block: u64, n: u64, chunk_blocks: u64, released: &mut Vec<Loc>) {
        let end = block + n;
        let first_full = block.div_ceil(chunk_blocks);
        let last_full = end / chunk_blocks; // exclusive
        let zero = |blocks: &mut BTreeMap<u64, Slot>, b: u64, released: &mut Vec<Loc>| {
            if let Some(Slot::Data(old)) = blocks.insert(b, Slot::Zero) {
                released.push(old);
            }
        };
        if first_full < last_full {
            let (fb, lb) = (first_full * chunk_blocks, last_full * chunk_blocks);
            let doomed: Vec<u64> = self.blocks.range(fb..lb).map(|(k, _)| *k).collect();
            for k in doomed {
                if let Some(Slot::Data(old)) = self.blocks.remove(&k) {
                    released.push(old);
                }
            }
            self.insert_zero_range(first_full, last_full);
            for b in block..fb.min(end) {
                zero(&mut self.blocks, b, released);
            }
            for b in lb.max(block)..end {
                zero(&mut self.blocks, b, released);
            }
        } else {
            for b in block..end {
                zero(&mut self.blocks, b, released);
            }
        }
    }

    /// Calls `f(block, what)` for every block of [first, first+n) this overlay decides (data
    /// or zero; never `Lookup::Below`), walking its maps once over the range. Blocks of a
    /// zeroed chunk come first and may be reported again with what the block map says, which
    /// takes precedence (as in [`Overlay::lookup`]).
    pub fn for_each_in(
        &self,
        first: u64,
        n: u64,
        chunk_blocks: u64,
        mut f: impl FnMut(u64, Lookup),
    ) {
        if n == 0 {
            return;
        }
        let end = first + n;
        let (c0, c1) = (first / chunk_blocks, (end - 1) / chunk_blocks);
        let zeroed = self.zeroed.range(..=c1).rev().take_while(|(_, e)| **e > c0);
        for (&s, &e) in zeroed {
            let from = (s * chunk_blocks).max(first);
            let to = (e * chunk_blocks).min(end);
            for b in from..to {
                f(b, Lookup::Zero);
            }
        }
        for (&b, slot) in self.blocks.range(first..end) {
            f(
                b,
                match slot {
                    Slot::Data(l) => Lookup::Data(*l),
                    Slot::Zero => Lookup::Zero,
                    Slot::Damaged(lsn) => Lookup::Damaged(*lsn),
                },
            );
        }
    }

    /// The log locations of blocks [block, block+n) that hold data here, as runs of blocks
    /// stored consecutively in one batch: (first block, blocks, location of the first).
    pub fn data_runs(&self, block: u64, n: u64) -> Vec<(u64, u64, Loc)> {
        let mut runs: Vec<(u64, u64, Loc)> = Vec::new();
        for (&b, slot) in self.blocks.range(block..block + n) {
            let Slot::Data(loc) = slot else { continue };
            match runs.last_mut() {
                Some((first, count, at)) if *first + *count == b && loc.follows(at, *count) => {
                    *count += 1
                }
                _ => runs.push((b, 1, *loc)),
            }
        }
        runs
    }

    /// Log locations this overlay points at.
    pub fn data_locs(&self) -> impl Iterator<Item = Loc> + '_ {
        self.blocks.values().filter_map(|s| match s {
            Slot::Data(l) => Some(*l),
            Slot::Zero | Slot::Damaged(_) => None,
        })
    }

    /// Marks blocks [block, block+n) damaged in the batch `lsn` (their log copy failed its
    /// checksum). Log locations no longer pointed at go to `released`.
    pub fn set_damaged(&mut self, block: u64, n: u64, lsn: u64, released: &mut Vec<Loc>) {
        for b in block..block + n {
            if let Some(Slot::Data(old)) = self.blocks.insert(b, Slot::Damaged(lsn)) {
                released.push(old);
            }
        }
    }

    /// Blocks marked damaged here, with the LSN of the batch that lost them.
    pub fn damaged(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.blocks.iter().filter_map(|(b, s)| match s {
            Slot::Damaged(lsn) => Some((*b, *lsn)),
            _ => None,
        })
    }

    fn insert_zero_range(&mut self, mut s: u64, mut e: u64) {
        // Merge with any overlapping or adjacent ranges.
        let overlapping: Vec<(u64, u64)> = self
            .zeroed
            .range(..=e)
            .rev()
            .take_while(|(_, end)| **end >= s)
            .map(|(a, b)| (*a, *b))
            .collect();
        for (a, b) in overlapping {
            self.zeroed.remove(&a);
            s = s.min(a);
            e = e.max(b);
        }
        self.zeroed.insert(s, e);
    }

    /// Chunks touched by this overlay's blocks (sorted, unique).
    pub fn dirty_block_chunks(&self, chunk_blocks: u64) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for b in self.blocks.keys() {
            let c = b / chunk_blocks;
            if out.last() != Some(&c) {
                out.push(c);
            }
        }
        out
    }

    /// Applies a newer overlay on top of this one (used when a failed seal returns its frozen
    /// overlay under the writes that arrived meanwhile).
    pub fn merge_newer(&mut self, newer: &Overlay, chunk_blocks: u64) {
        // What the newer overlay replaces stays counted as live by the log cleaner: it only
        // keeps those segments a little longer (until the next fold frees them).
        let mut ignored = Vec::new();
        for (&s, &e) in &newer.zeroed {
            self.set_zero(
                s * chunk_blocks,
                (e - s) * chunk_blocks,
                chunk_blocks,
                &mut ignored,
            );
        }
        for (&b, &slot) in &newer.blocks {
            self.blocks.insert(b, slot);
        }
    }

    /// Drops every entry (a deleted volume's overlay).
    pub fn clear(&mut self) {
        self.blocks.clear();
        self.zeroed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `for_each_in` reports, applied in order, is what `lookup` says block by block.
    #[test]
    fn range_walk_matches_lookup() {
        let cb = 16;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        let mut rel = Vec::new();
        for _ in 0..200 {
            let mut o = Overlay::default();
            for _ in 0..next(12) {
                let (b, n) = (next(200), 1 + next(40));
                if next(3) == 0 {
                    o.set_zero(b, n, cb, &mut rel);
                } else {
                    let loc = Loc {
                        lsn: next(5),
                        device: 0,
                        offset: next(1000) * 4096,
                    };
                    o.set_data(b, n, loc, &mut rel);
                }
            }
            let (first, n) = (next(220), next(60));
            let mut seen = vec![Lookup::Below; n as usize];
            o.for_each_in(first, n, cb, |b, l| seen[(b - first) as usize] = l);
            for (i, l) in seen.iter().enumerate() {
                assert_eq!(
                    *l,
                    o.lookup(first + i as u64, cb),
                    "block {}",
                    first + i as u64
                );
            }
        }
    }

    #[test]
    fn zero_ranges_and_blocks() {
        let cb = 256;
        let mut o = Overlay::default();
        let loc = Loc {
            lsn: 1,
            device: 0,
            offset: 1 << 20,
        };
        let mut rel = Vec::new();
        o.set_data(10, 3, loc, &mut rel);
        o.set_data(300, 1, loc, &mut rel);
        assert!(rel.is_empty());
        assert_eq!(
            o.lookup(11, cb),
            Lookup::Data(Loc {
                offset: (1 << 20) + 4096,
                ..loc
            })
        );
        // Zero blocks 5..(3*256+7): chunk 0 partial, chunks 1..3 whole, chunk 3 partial.
        o.set_zero(5, 3 * 256 + 2, cb, &mut rel);
        // The four data blocks it covered (10..13 and 300) are no longer pointed at.
        assert_eq!(rel.len(), 4);
        assert_eq!(o.lookup(4, cb), Lookup::Below);
        assert_eq!(o.lookup(11, cb), Lookup::Zero);
        assert_eq!(o.lookup(300, cb), Lookup::Zero);
        assert!(o.chunk_zeroed(1) && o.chunk_zeroed(2) && !o.chunk_zeroed(3));
        assert_eq!(o.lookup(3 * 256 + 6, cb), Lookup::Zero);
        assert_eq!(o.lookup(3 * 256 + 7, cb), Lookup::Below);
        // Writing after zeroing wins.
        rel.clear();
        o.set_data(300, 1, loc, &mut rel);
        assert!(rel.is_empty());
        assert_eq!(o.lookup(300, cb), Lookup::Data(loc));
        // Overwriting data releases the old location.
        let newer = Loc { lsn: 2, ..loc };
        o.set_data(300, 1, newer, &mut rel);
        assert_eq!(rel, vec![loc]);
        // Adjacent zero ranges merge.
        o.set_zero(3 * 256, 256, cb, &mut rel);
        assert_eq!(o.zeroed.len(), 1);
        assert_eq!(o.zeroed.get(&1), Some(&4));
    }
}
