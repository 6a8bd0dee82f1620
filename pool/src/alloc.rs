//! Free-space allocator over the pool's devices, in 4 KiB units.
//!
//! The free map is not persisted: it is derived at open from what the metadata store says is in
//! use (sealed objects and WAL segments). An extent freed by a metadata transaction is handed
//! back only after that transaction committed, so a crash can never leave committed metadata
//! pointing at space that was reused.

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

    fn free(&mut self, mut start: u64, mut len: u64) {
        // Space freed twice would be handed out twice, and one owner would overwrite the
        // other's data: a range that is already (partly) free is refused and leaked, loudly.
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
        if len == 0 || overlaps_before || overlaps_after {
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
}

impl Allocator {
    pub fn new(devices: &[(u16, Tier, u64)]) -> Self {
        let mut a = Allocator { devs: Vec::new() };
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
    pub fn alloc(&mut self, len: u64, placement: Placement) -> Option<Extent> {
        let len = align_up(len.max(1), BLOCK);
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
        if let Some(d) = self.devs.iter_mut().find(|d| d.index == e.device) {
            d.free(e.offset, align_up(e.len, BLOCK));
        }
    }

    /// Marks an extent in use while rebuilding; false if it overlaps used space or is off-device
    /// (which means the metadata is inconsistent).
    pub fn mark_used(&mut self, e: Extent) -> bool {
        let len = align_up(e.len, BLOCK);
        match self.devs.iter_mut().find(|d| d.index == e.device) {
            Some(d) if e.offset >= DEVICE_RESERVED && e.offset + len <= d.size => {
                d.mark_used(e.offset, len)
            }
            _ => false,
        }
    }

    pub fn free_bytes(&self) -> u64 {
        self.devs.iter().map(|d| d.free_bytes).sum()
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
    fn log_prefers_fast_tier_objects_slow_tier() {
        let mut a = Allocator::new(&[
            (0, Tier::Hdd, DEVICE_RESERVED + 16 * BLOCK),
            (1, Tier::Ssd, DEVICE_RESERVED + 16 * BLOCK),
        ]);
        assert_eq!(a.alloc(BLOCK, Placement::Log).unwrap().device, 1);
        assert_eq!(a.alloc(BLOCK, Placement::Object).unwrap().device, 0);
    }
}
