//! Reused buffers for the data of reads and writes. A 1 MiB `vec![0; n]` per READ costs the allocator's
//! zeroing, and page faults whenever the allocator has handed the memory back to the kernel:
//! about a tenth of the CPU of a sequential read. A read fills its buffer whole before anyone
//! sees it (on error the buffer is dropped unsent), so a buffer taken from here is not zeroed:
//! it holds whatever an earlier read left in it. Only take one for data that is then
//! overwritten completely.
//!
//! Buffers come back when the connection has sent them ([`crate::outq::OutQueue`] returns the
//! last reference of a shared payload here). Size classes are powers of two from 64 KiB to
//! 8 MiB; smaller reads allocate as usual, and at most [`MAX_POOLED_BYTES`] are kept.

use parking_lot::Mutex;

/// Smallest pooled class: below this the allocator's own caches do well.
const MIN_CLASS: usize = 64 << 10;
/// Largest pooled class (the targets' largest transfer is smaller).
const MAX_CLASS: usize = 8 << 20;
const CLASSES: usize = (MAX_CLASS / MIN_CLASS).trailing_zeros() as usize + 1;
/// Most bytes kept for reuse, over all classes.
pub const MAX_POOLED_BYTES: usize = 64 << 20;

struct Pool {
    free: [Vec<Vec<u8>>; CLASSES],
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: [const { Vec::new() }; CLASSES],
    bytes: 0,
});

fn class_of(capacity: usize) -> Option<usize> {
    if !(MIN_CLASS..=MAX_CLASS).contains(&capacity) || !capacity.is_power_of_two() {
        return None;
    }
    Some((capacity / MIN_CLASS).trailing_zeros() as usize)
}

fn pop(class: usize) -> Option<Vec<u8>> {
    let mut p = POOL.lock();
    let b = p.free[class].pop()?;
    p.bytes -= b.capacity();
    Some(b)
}

/// A buffer of `len` bytes whose contents are unspecified (an earlier read's data, or
/// zeroes): the caller must overwrite all of it before it is sent anywhere.
pub fn take(len: usize) -> Vec<u8> {
    let Some(class) = class_of(len.max(MIN_CLASS).next_power_of_two()) else {
        return vec![0; len];
    };
    match pop(class) {
        Some(mut b) => {
            // Only bytes never written before are zeroed (a buffer last used for less).
            b.resize(len, 0);
            b
        }
        None => {
            let mut b = Vec::with_capacity(MIN_CLASS << class);
            b.resize(len, 0);
            b
        }
    }
}

/// An empty buffer with room for at least `capacity` bytes without reallocating, for data
/// that is appended (a write's Data-Out): what it held before is beyond its length, never
/// visible.
pub fn take_empty(capacity: usize) -> Vec<u8> {
    let Some(class) = class_of(capacity.max(MIN_CLASS).next_power_of_two()) else {
        return Vec::with_capacity(capacity);
    };
    match pop(class) {
        Some(mut b) => {
            b.clear();
            b
        }
        None => Vec::with_capacity(MIN_CLASS << class),
    }
}

/// Keeps `buf` for a later [`take`], if it is of a pooled class and there is room.
pub fn give(buf: Vec<u8>) {
    let Some(class) = class_of(buf.capacity()) else {
        return;
    };
    let mut p = POOL.lock();
    if p.bytes + buf.capacity() <= MAX_POOLED_BYTES {
        p.bytes += buf.capacity();
        p.free[class].push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_class_and_sized_as_asked() {
        let a = take(1 << 20);
        assert_eq!(a.len(), 1 << 20);
        assert_eq!(a.capacity(), 1 << 20);
        let ptr = a.as_ptr();
        give(a);
        // Another test may take it first; either way the length is right.
        let b = take((1 << 20) - 4096);
        assert_eq!(b.len(), (1 << 20) - 4096);
        if b.as_ptr() == ptr {
            assert_eq!(b.capacity(), 1 << 20);
        }
        give(b);
        let c = take(1 << 20);
        assert_eq!(c.len(), 1 << 20, "grows back to the asked length");
        // Small and odd-sized buffers are not pooled.
        let small = take(512);
        assert_eq!(small, vec![0; 512]);
        give(small);
        give(vec![0; 3 << 20]);
        assert!(POOL.lock().bytes <= MAX_POOLED_BYTES);
    }

    #[test]
    fn empty_buffers_have_the_room_asked_for() {
        let mut a = take(256 << 10);
        a.fill(0xab);
        give(a);
        let b = take_empty((256 << 10) - 512);
        assert!(b.is_empty(), "what it held is not visible");
        assert!(b.capacity() >= (256 << 10) - 512);
        give(b);
        let c = take_empty(100);
        assert!(c.is_empty() && c.capacity() >= 100);
    }

    #[test]
    fn the_pool_is_bounded() {
        for _ in 0..2 * MAX_POOLED_BYTES / (8 << 20) + 2 {
            give(Vec::with_capacity(8 << 20));
        }
        assert!(POOL.lock().bytes <= MAX_POOLED_BYTES);
    }
}
