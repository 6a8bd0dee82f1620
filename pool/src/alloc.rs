//! Free-space allocator over the pool's devices, in 4 KiB units.
//!
//! The free map is not persisted: it is derived at open from what the metadata store says is in
//! use (sealed objects and WAL segments). An extent freed by a metadata transaction is handed
//! back only after that transaction committed, so a crash can never leave committed metadata
//! pointing at space that was reused.
//!
//! **Warm log space.** A WAL segment's space, once freed, is kept aside whole ("warm") rather
//! than given back to the host filesystem, and the next segment takes it first. On a file
//! device a write into space the filesystem never wrote (a hole, or a fallocated unwritten
//! extent) costs an extent conversion and a journal commit per write, and makes every
//! fdatasync commit metadata: measured here, sequential log writes ran 20-40% slower into
//! fresh space than into space already written. PostgreSQL recycles its WAL files for the
//! same reason. Warm space counts as free (it is free: any allocation that finds no other
//! room takes it), is bounded by the WAL's own working set (`set_warm_limit`), and is not
//! persisted: after a restart it is ordinary free space, still written on the host.

use std::collections::BTreeMap;

use crate::device::DEVICE_RESERVED;
use crate::types::{BLOCK, Extent, Tier, align_up};

/// What an allocation is for; decides which tier is tried first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// WAL segments: the fastest durable tier.
    Log,
    /// Sealed chunks and index nodes: the capacity tier.
    Object,
}

#[derive(Debug)]
struct DevSpace {
    index: u16,
    tier: Tier,
    size: u64,
    free: BTreeMap<u64, u64>,
    free_bytes: u64,
    cursor: u64,
}

impl DevSpace {
    fn alloc(&mut self, len: u64) -> Option<u64> {
        let found = self
            .free
            .range(self.cursor..)
            .chain(self.free.range(..self.cursor))
            .find(|(_, l)| **l >= len)
            .map(|(s, l)| (*s, *l))?;
        let (start, flen) = found;
        self.free.remove(&start);
        if flen > len {
            self.free.insert(start + len, flen - len);
        }
        self.free_bytes -= len;
        self.cursor = start + len;
        Some(start)
    }

    /// Whether any of [start, start+len) is in the free map.
    fn overlaps_free(&self, start: u64, len: u64) -> bool {
        let overlaps_before = self
            .free
            .range(..=start)
            .next_back()
            .is_some_and(|(&ps, &pl)| ps + pl > start);
        let overlaps_after = self
            .free
            .range(start..)
            .next()
            .is_some_and(|(&ns, _)| ns < start + len);
        overlaps_before || overlaps_after
    }

    fn free(&mut self, mut start: u64, mut len: u64) {
        // Space freed twice would be handed out twice, and one owner would overwrite the
        // other's data: a range that is already (partly) free is refused and leaked, loudly.
        if len == 0 || self.overlaps_free(start, len) {
            if len > 0 {
                tracing::error!(
                    start,
                    len,
                    "refused to free space that is already free (a bug: it is leaked until the next open rebuilds the free map)"
                );
            }
            return;
        }
        self.free_bytes += len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nl;
        }
        self.free.insert(start, len);
    }

    /// Removes [start, start+len) from the free map (used while rebuilding at open).
    fn mark_used(&mut self, start: u64, len: u64) -> bool {
        let Some((&fs, &fl)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if fs + fl < start + len {
            return false;
        }
        self.free.remove(&fs);
        if start > fs {
            self.free.insert(fs, start - fs);
        }
        if fs + fl > start + len {
            self.free.insert(start + len, fs + fl - start - len);
        }
        self.free_bytes -= len;
        true
    }
}

#[derive(Debug)]
pub struct Allocator {
    devs: Vec<DevSpace>,
    /// Freed log segments kept whole for the next segments (see the module's docs).
    warm: Vec<Extent>,
    warm_bytes: u64,
    warm_limit: u64,
}

impl Allocator {
    pub fn new(devices: &[(u16, Tier, u64)]) -> Self {
        let mut a = Allocator {
            devs: Vec::new(),
            warm: Vec::new(),
            warm_bytes: 0,
            warm_limit: 0,
        };
        for &(index, tier, size) in devices {
            a.add_device(index, tier, size);
        }
        a
    }

    /// Makes a new device's space allocatable.
    pub fn add_device(&mut self, index: u16, tier: Tier, size: u64) {
        let usable = size.saturating_sub(DEVICE_RESERVED) / BLOCK * BLOCK;
        let mut free = BTreeMap::new();
        if usable > 0 {
            free.insert(DEVICE_RESERVED, usable);
        }
        self.devs.push(DevSpace {
            index,
            tier,
            size,
            free,
            free_bytes: usable,
            cursor: DEVICE_RESERVED,
        });
    }

    fn order(&self, placement: Placement) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.devs.len()).collect();
        idx.sort_by_key(|&i| {
            let rank = self.devs[i].tier.speed_rank() as i64;
            let tier_key = match placement {
                Placement::Log => rank,
                Placement::Object => -rank,
            };
            // Within a tier, the device with the most free space first.
            (tier_key, u64::MAX - self.devs[i].free_bytes)
        });
        idx
    }

    /// Allocates `len` bytes (rounded up to 4 KiB); `None` when no device has a large enough hole.
    /// Log space comes from warm space first; anything takes warm space when nothing else fits.
    pub fn alloc(&mut self, len: u64, placement: Placement) -> Option<Extent> {
        let len = align_up(len.max(1), BLOCK);
        if placement == Placement::Log
            && let Some(e) = self.take_warm(len)
        {
            return Some(e);
        }
        if let Some(e) = self.alloc_free(len, placement) {
            return Some(e);
        }
        if self.warm.is_empty() {
            return None;
        }
        self.cool_all();
        self.alloc_free(len, placement)
    }

    fn alloc_free(&mut self, len: u64, placement: Placement) -> Option<Extent> {
        for i in self.order(placement) {
            let d = &mut self.devs[i];
            if let Some(off) = d.alloc(len) {
                return Some(Extent {
                    device: d.index,
                    offset: off,
                    len,
                });
            }
        }
        None
    }

    pub fn free(&mut self, e: Extent) {
        if e.is_remote() {
            return; // nothing of it is on a device
        }
        if self.overlaps_warm(&e) {
            tracing::error!(
                device = e.device,
                offset = e.offset,
                len = e.len,
                "refused to free space that is already free (a bug: it is leaked until the next open rebuilds the free map)"
            );
            return;
        }
        if let Some(d) = self.devs.iter_mut().find(|d| d.index == e.device) {
            d.free(e.offset, align_up(e.len, BLOCK));
        }
    }

    /// How much freed log space may be kept warm (0: none; what is over goes back at once).
    pub fn set_warm_limit(&mut self, limit: u64) {
        self.warm_limit = limit;
        while self.warm_bytes > self.warm_limit {
            let Some(e) = self.warm.pop() else { break };
            self.warm_bytes -= e.len;
            self.free(e);
        }
    }

    /// Frees a log segment's extent into warm space; false (having done nothing) when warm
    /// space is full or the extent is unknown or already free: the caller frees it as usual.
    pub fn free_warm(&mut self, e: Extent) -> bool {
        let e = Extent {
            len: align_up(e.len, BLOCK),
            ..e
        };
        if e.len == 0 || self.warm_bytes + e.len > self.warm_limit || self.overlaps_warm(&e) {
            return false;
        }
        match self.devs.iter().find(|d| d.index == e.device) {
            Some(d) if !d.overlaps_free(e.offset, e.len) => {}
            _ => return false,
        }
        self.warm_bytes += e.len;
        self.warm.push(e);
        true
    }

    /// Bytes of warm space now.
    pub fn warm_bytes(&self) -> u64 {
        self.warm_bytes
    }

    fn overlaps_warm(&self, e: &Extent) -> bool {
        self.warm.iter().any(|w| {
            w.device == e.device && w.offset < e.offset + e.len && e.offset < w.offset + w.len
        })
    }

    /// A warm extent of at least `len` on the log's preferred tier, the rest of it freed.
    fn take_warm(&mut self, len: u64) -> Option<Extent> {
        for i in self.order(Placement::Log) {
            let dev = self.devs[i].index;
            let Some(pos) = self
                .warm
                .iter()
                .position(|w| w.device == dev && w.len >= len)
            else {
                continue;
            };
            let w = self.warm.swap_remove(pos);
            self.warm_bytes -= w.len;
            if w.len > len {
                self.devs[i].free(w.offset + len, w.len - len);
            }
            return Some(Extent { len, ..w });
        }
        None
    }

    /// Gives all warm space back to the free maps (an allocation found no other room).
    fn cool_all(&mut self) {
        for w in self.take_warm_all() {
            self.free(w);
        }
    }

    /// Takes all warm space out of the allocator, for the caller to give back to the host
    /// filesystem and then [`Allocator::free`]; until then it is neither warm nor free.
    pub fn take_warm_all(&mut self) -> Vec<Extent> {
        self.warm_bytes = 0;
        std::mem::take(&mut self.warm)
    }

    /// Marks an extent in use while rebuilding; false if it overlaps used space or is off-device
    /// (which means the metadata is inconsistent).
    pub fn mark_used(&mut self, e: Extent) -> bool {
        if e.is_remote() {
            return true; // an object in an archive target takes no device space
        }
        let len = align_up(e.len, BLOCK);
        match self.devs.iter_mut().find(|d| d.index == e.device) {
            Some(d) if e.offset >= DEVICE_RESERVED && e.offset + len <= d.size => {
                d.mark_used(e.offset, len)
            }
            _ => false,
        }
    }

    /// Free bytes, warm space included.
    pub fn free_bytes(&self) -> u64 {
        self.devs.iter().map(|d| d.free_bytes).sum::<u64>() + self.warm_bytes
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.devs
            .iter()
            .map(|d| d.size.saturating_sub(DEVICE_RESERVED))
            .sum()
    }

    pub fn device_free(&self, index: u16) -> u64 {
        self.devs
            .iter()
            .find(|d| d.index == index)
            .map(|d| d.free_bytes)
            .unwrap_or(0)
            + self
                .warm
                .iter()
                .filter(|w| w.device == index)
                .map(|w| w.len)
                .sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_merge() {
        let mut a = Allocator::new(&[(0, Tier::Ssd, DEVICE_RESERVED + 64 * BLOCK)]);
        let x = a.alloc(4096, Placement::Object).unwrap();
        let y = a.alloc(8192, Placement::Object).unwrap();
        assert_eq!(a.free_bytes(), 61 * BLOCK);
        assert!(a.alloc(62 * BLOCK, Placement::Object).is_none());
        a.free(x);
        a.free(y);
        assert_eq!(a.free_bytes(), 64 * BLOCK);
        assert!(a.alloc(64 * BLOCK, Placement::Object).is_some());
    }

    #[test]
    fn space_freed_twice_is_never_handed_out_twice() {
        let mut a = Allocator::new(&[(0, Tier::Ssd, DEVICE_RESERVED + 64 * BLOCK)]);
        let x = a.alloc(8 * BLOCK, Placement::Object).unwrap();
        let _y = a.alloc(8 * BLOCK, Placement::Object).unwrap();
        a.free(x);
        let free = a.free_bytes();
        // The same extent again, and one overlapping it from either side: all refused.
        a.free(x);
        for (off, len) in [(4, 8), (-4i64, 8)] {
            a.free(Extent {
                device: x.device,
                offset: (x.offset as i64 + off * BLOCK as i64) as u64,
                len: len * BLOCK,
            });
        }
        assert_eq!(a.free_bytes(), free);
        // What is free is allocated once: the two 8-block allocations do not overlap.
        let p = a.alloc(8 * BLOCK, Placement::Object).unwrap();
        let q = a.alloc(8 * BLOCK, Placement::Object).unwrap();
        assert!(
            p.offset + p.len <= q.offset || q.offset + q.len <= p.offset,
            "{p:?} {q:?}"
        );
    }

    #[test]
    fn mark_used_rebuild() {
        let mut a = Allocator::new(&[(0, Tier::Ssd, DEVICE_RESERVED + 16 * BLOCK)]);
        let e = Extent {
            device: 0,
            offset: DEVICE_RESERVED + 4 * BLOCK,
            len: 2 * BLOCK,
        };
        assert!(a.mark_used(e));
        assert!(!a.mark_used(e), "overlap is detected");
        assert_eq!(a.free_bytes(), 14 * BLOCK);
    }

    #[test]
    fn freed_log_segments_are_reused_warm_and_count_as_free() {
        let mut a = Allocator::new(&[(0, Tier::Ssd, DEVICE_RESERVED + 64 * BLOCK)]);
        a.set_warm_limit(16 * BLOCK);
        let seg = a.alloc(8 * BLOCK, Placement::Log).unwrap();
        let free = a.free_bytes();
        assert!(a.free_warm(seg));
        assert_eq!(a.free_bytes(), free + 8 * BLOCK, "warm space is free space");
        assert_eq!(a.device_free(0), a.free_bytes());
        // The same space again, or space overlapping it, is refused either way.
        assert!(!a.free_warm(seg));
        a.free(Extent {
            len: 2 * BLOCK,
            offset: seg.offset + 4 * BLOCK,
            ..seg
        });
        assert_eq!(a.free_bytes(), free + 8 * BLOCK);
        // Objects take other space while there is some; the next segment takes the warm one.
        let obj = a.alloc(8 * BLOCK, Placement::Object).unwrap();
        assert!(obj.offset + obj.len <= seg.offset || seg.offset + seg.len <= obj.offset);
        assert_eq!(a.alloc(8 * BLOCK, Placement::Log), Some(seg));
        assert_eq!(a.warm_bytes(), 0);
    }

    #[test]
    fn warm_space_is_bounded_and_given_up_when_nothing_else_fits() {
        let mut a = Allocator::new(&[(0, Tier::Ssd, DEVICE_RESERVED + 32 * BLOCK)]);
        a.set_warm_limit(8 * BLOCK);
        let s1 = a.alloc(8 * BLOCK, Placement::Log).unwrap();
        let s2 = a.alloc(8 * BLOCK, Placement::Log).unwrap();
        let _rest = a.alloc(16 * BLOCK, Placement::Object).unwrap();
        assert!(a.free_warm(s1));
        assert!(
            !a.free_warm(s2),
            "over the limit: the caller frees it as usual"
        );
        a.free(s2);
        // 16 blocks free, 8 of them warm: a 16-block object needs them all.
        assert_eq!(a.free_bytes(), 16 * BLOCK);
        let big = a.alloc(16 * BLOCK, Placement::Object).unwrap();
        assert_eq!(big.len, 16 * BLOCK);
        assert_eq!((a.free_bytes(), a.warm_bytes()), (0, 0));
        // A lower limit gives back what is over it.
        a.free(big);
        let s = a.alloc(8 * BLOCK, Placement::Log).unwrap();
        assert!(a.free_warm(s));
        a.set_warm_limit(0);
        assert_eq!((a.free_bytes(), a.warm_bytes()), (16 * BLOCK, 0));
        assert!(a.alloc(16 * BLOCK, Placement::Object).is_some());
    }

    #[test]
    fn log_prefers_fast_tier_objects_slow_tier() {
        let mut a = Allocator::new(&[
            (0, Tier::Hdd, DEVICE_RESERVED + 16 * BLOCK),
            (1, Tier::Ssd, DEVICE_RESERVED + 16 * BLOCK),
        ]);
        assert_eq!(a.alloc(BLOCK, Placement::Log).unwrap().device, 1);
        assert_eq!(a.alloc(BLOCK, Placement::Object).unwrap().device, 0);
    }
}
