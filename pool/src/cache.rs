//! The RAM tier's read caches: byte-bounded LRUs split into shards, each under its own lock.
//!
//! Every reader of a sealed block takes a cache lock (often three: node, table, chunk). With
//! one lock per cache, 32 readers on 2 cores queued behind whichever reader the scheduler had
//! preempted while it held the lock: `pool-bench` measured sealed random reads that miss RAM
//! at half the log's rate, the difference being futex waits and `sched_yield` on these locks.
//! Sixteen shards make a reader wait only for writers of the same shard, and lookups share
//! their shard's lock: every read of a volume walks the same root index node, so one key is
//! as hot as all the others together. A lookup therefore does not reorder the LRU (that needs
//! the shard exclusively); it sets the entry's referenced bit, and eviction gives an entry with
//! the bit set a second chance (clears it and moves it to the recently used end), as the
//! CLOCK algorithm of page caches does.
//!
//! Keys are spread by their digest (keyed BLAKE3: uniform), so every key of one chunk — the
//! whole chunk and each of its frames — lands in the same shard, and a reader can look at all
//! of them under one lock ([`ShardedLru::shard`]). The byte budget is global: a put that goes
//! over it evicts its own shard's least recently used entries first, then other shards'.
//! Recency is per shard, which with uniform keys approximates one global LRU.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use lru::LruCache;
use parking_lot::{RwLock, RwLockReadGuard};

use crate::types::Digest;

const SHARDS: usize = 16;

/// Keys that name the digest they belong to (the shard they go to).
pub trait ByDigest: std::hash::Hash + Eq + Clone {
    fn digest(&self) -> &Digest;
}

impl ByDigest for Digest {
    fn digest(&self) -> &Digest {
        self
    }
}

fn shard_of(d: &Digest) -> usize {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.0[..8]);
    (u64::from_le_bytes(b) % SHARDS as u64) as usize
}

/// A cached value, its accounted size, and whether it was used since eviction last looked.
type Entry<V> = (Arc<V>, usize, AtomicBool);

/// One shard: an LRU of values with their accounted sizes.
#[derive(Debug)]
pub struct Shard<V, K: ByDigest> {
    lru: LruCache<K, Entry<V>>,
}

impl<V, K: ByDigest> Shard<V, K> {
    /// `k`'s value, marked as used (it gets a second chance before eviction).
    pub fn get(&self, k: &K) -> Option<Arc<V>> {
        self.lru.peek(k).map(|(v, _, used)| {
            used.store(true, Ordering::Relaxed);
            v.clone()
        })
    }
    /// `k`'s value if held, without marking it used.
    pub fn peek(&self, k: &K) -> Option<Arc<V>> {
        self.lru.peek(k).map(|(v, _, _)| v.clone())
    }
    /// Whether `k` is held, without marking it used.
    pub fn contains(&self, k: &K) -> bool {
        self.lru.contains(k)
    }
    /// Takes the least recently used entry not used since it was last looked at; used ones
    /// move to the recently used end with their mark cleared (so this ends within one pass).
    fn pop_victim(&mut self) -> Option<(K, Entry<V>)> {
        for _ in 0..=self.lru.len() {
            let (k, e) = self.lru.pop_lru()?;
            if e.2.swap(false, Ordering::Relaxed) {
                self.lru.push(k, e);
            } else {
                return Some((k, e));
            }
        }
        self.lru.pop_lru()
    }
}

/// A byte-bounded LRU cache in [`SHARDS`] shards (see the module docs).
#[derive(Debug)]
pub struct ShardedLru<V, K: ByDigest = Digest> {
    shards: Vec<RwLock<Shard<V, K>>>,
    /// Bytes held, all shards together.
    bytes: AtomicUsize,
    limit: AtomicUsize,
}

impl<V, K: ByDigest> ShardedLru<V, K> {
    pub fn new(limit: usize) -> Self {
        ShardedLru {
            shards: (0..SHARDS)
                .map(|_| {
                    RwLock::new(Shard {
                        lru: LruCache::unbounded(),
                    })
                })
                .collect(),
            bytes: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
        }
    }

    /// The shard holding every key of digest `d`, locked shared: for several lookups under
    /// one lock.
    pub fn shard(&self, d: &Digest) -> RwLockReadGuard<'_, Shard<V, K>> {
        self.shards[shard_of(d)].read()
    }

    /// `k`'s value, marked as used.
    pub fn get(&self, k: &K) -> Option<Arc<V>> {
        self.shard(k.digest()).get(k)
    }

    /// `k`'s value if held, without making it more recently used.
    pub fn peek(&self, k: &K) -> Option<Arc<V>> {
        self.shard(k.digest()).peek(k)
    }

    pub fn remove(&self, k: &K) -> Option<Arc<V>> {
        let (v, size, _) = self.shards[shard_of(k.digest())].write().lru.pop(k)?;
        self.bytes.fetch_sub(size, Ordering::Relaxed);
        Some(v)
    }

    /// Caches `v` (accounted as `size` bytes), evicting least recently used entries while the
    /// cache is over its budget. A value larger than the whole budget is not cached.
    pub fn put(&self, k: K, v: Arc<V>, size: usize) {
        if size > self.limit() {
            return;
        }
        let home = shard_of(k.digest());
        let mut evicted = Vec::new();
        {
            let mut s = self.shards[home].write();
            let new_key = k.clone();
            if let Some((_, (_, old, _))) = s.lru.push(k, (v, size, AtomicBool::new(false))) {
                // The same key replaced (unbounded: push hands back nothing else).
                self.bytes.fetch_sub(old, Ordering::Relaxed);
            }
            self.bytes.fetch_add(size, Ordering::Relaxed);
            // Its own shard first, never the entry just put.
            while self.over() && s.lru.len() > 1 {
                match s.pop_victim() {
                    Some((vk, e)) if vk == new_key => {
                        s.lru.push(vk, e);
                        break;
                    }
                    Some(e) => evicted.push(self.account_evicted(e)),
                    None => break,
                }
            }
        }
        // Then the others, one lock at a time (never two held: no lock order to get wrong).
        for i in 1..SHARDS {
            if !self.over() {
                break;
            }
            let mut s = self.shards[(home + i) % SHARDS].write();
            while self.over() {
                match s.pop_victim() {
                    Some(e) => evicted.push(self.account_evicted(e)),
                    None => break,
                }
            }
        }
        if self.over() {
            // Still over: the budget shrank meanwhile below what is left here, this entry
            // included.
            let mut s = self.shards[home].write();
            while self.over() {
                match s.pop_victim() {
                    Some(e) => evicted.push(self.account_evicted(e)),
                    None => break,
                }
            }
        }
        drop(evicted); // outside every lock
    }

    fn over(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) > self.limit()
    }

    fn account_evicted(&self, (_, (v, size, _)): (K, Entry<V>)) -> Arc<V> {
        self.bytes.fetch_sub(size, Ordering::Relaxed);
        v
    }

    pub fn clear(&self) {
        for s in &self.shards {
            let mut s = s.write();
            let held: usize = s.lru.iter().map(|(_, (_, size, _))| size).sum();
            s.lru.clear();
            self.bytes.fetch_sub(held, Ordering::Relaxed);
        }
    }

    /// Changes the byte budget; a smaller one evicts at once, each shard's least recently used
    /// (and not since used) first, taking from the shards in turn. Returns the evicted values so the caller can drop
    /// them outside its own locks.
    pub fn set_limit(&self, limit: usize) -> Vec<Arc<V>> {
        self.limit.store(limit, Ordering::Relaxed);
        let mut evicted = Vec::new();
        while self.over() {
            let mut took = false;
            for s in &self.shards {
                if !self.over() {
                    break;
                }
                if let Some(e) = s.write().pop_victim() {
                    evicted.push(self.account_evicted(e));
                    took = true;
                }
            }
            if !took {
                break;
            }
        }
        evicted
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys that all fall in one shard (same first bytes).
    fn one_shard_key(i: u8) -> Digest {
        let mut d = [0u8; 32];
        d[31] = i;
        Digest(d)
    }

    fn key(i: u8) -> Digest {
        // Spread over the shards as digests are: the shard comes from the first 8 bytes.
        let mut d = [0u8; 32];
        d[0] = i.wrapping_mul(37);
        d[31] = i;
        Digest(d)
    }

    #[test]
    fn set_limit_evicts_down_at_once_and_raising_it_keeps_everything() {
        let c: ShardedLru<u32> = ShardedLru::new(100);
        for i in 0..10u8 {
            c.put(key(i), Arc::new(u32::from(i)), 10);
        }
        assert_eq!(c.bytes(), 100);
        let gone = c.set_limit(35);
        assert_eq!(gone.len(), 7);
        assert_eq!(c.bytes(), 30);
        assert!(c.set_limit(1000).is_empty());
        for i in 10..40u8 {
            c.put(key(i), Arc::new(u32::from(i)), 10);
        }
        assert_eq!(c.bytes(), 330);
        c.clear();
        assert_eq!(c.bytes(), 0);
        assert!(c.get(&key(39)).is_none());
    }

    #[test]
    fn the_budget_holds_across_shards_and_the_newest_entry_stays() {
        let c: ShardedLru<u32> = ShardedLru::new(50);
        for i in 0..200u8 {
            c.put(key(i), Arc::new(u32::from(i)), 10);
            assert!(c.bytes() <= 50, "over budget after put {i}: {}", c.bytes());
            assert_eq!(c.peek(&key(i)).as_deref(), Some(&u32::from(i)));
        }
        let held = (0..200u8).filter(|i| c.peek(&key(*i)).is_some()).count();
        assert_eq!(held, 5);
        // Replacing a key accounts only its new size.
        c.put(key(199), Arc::new(7), 20);
        assert!(c.bytes() <= 50);
        assert_eq!(c.get(&key(199)).as_deref(), Some(&7));
        assert_eq!(c.remove(&key(199)).as_deref(), Some(&7));
        assert!(c.get(&key(199)).is_none());
        // Too large for the whole budget: not cached, nothing evicted for it.
        let before = c.bytes();
        c.put(key(250), Arc::new(1), 51);
        assert!(c.peek(&key(250)).is_none());
        assert_eq!(c.bytes(), before);
    }

    #[test]
    fn within_a_shard_the_least_recently_used_goes_first() {
        let c: ShardedLru<u32> = ShardedLru::new(30);
        // Same first bytes: one shard.
        let k = one_shard_key;
        c.put(k(1), Arc::new(1), 10);
        c.put(k(2), Arc::new(2), 10);
        c.put(k(3), Arc::new(3), 10);
        c.get(&k(1));
        c.put(k(4), Arc::new(4), 10);
        assert!(c.peek(&k(2)).is_none());
        for i in [1, 3, 4] {
            assert!(c.peek(&k(i)).is_some(), "{i} evicted");
        }
    }

    #[test]
    fn an_entry_in_use_outlives_entries_put_after_it() {
        // The hot-key case: a volume's root node, read by every reader, must not be what goes.
        let c: ShardedLru<u32> = ShardedLru::new(30);
        let k = one_shard_key;
        c.put(k(0), Arc::new(0), 10);
        for i in 1..50u8 {
            assert!(c.get(&k(0)).is_some(), "the entry in use went at put {i}");
            c.put(k(i), Arc::new(u32::from(i)), 10);
            assert!(c.bytes() <= 30);
        }
        assert!(c.peek(&k(0)).is_some());
        // Once nobody uses it, it goes like any other.
        for i in 50..56u8 {
            c.put(k(i), Arc::new(u32::from(i)), 10);
        }
        assert!(c.peek(&k(0)).is_none());
    }

    #[test]
    fn concurrent_puts_keep_the_account_exact() {
        let c: Arc<ShardedLru<u32>> = Arc::new(ShardedLru::new(1000));
        let hs: Vec<_> = (0..4u8)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..2000u32 {
                        let mut d = [0u8; 32];
                        d[..4].copy_from_slice(&(i * 4 + u32::from(t)).to_le_bytes());
                        c.put(Digest(d), Arc::new(i), 7 + (i % 5) as usize);
                        if i % 3 == 0 {
                            c.get(&Digest(d));
                        }
                        if i % 7 == 0 {
                            c.remove(&Digest(d));
                        }
                        if t == 0 && i % 100 == 0 {
                            c.set_limit(if i % 200 == 0 { 500 } else { 1000 });
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().expect("no panic");
        }
        let held: usize = c
            .shards
            .iter()
            .map(|s| s.read().lru.iter().map(|(_, (_, n, _))| n).sum::<usize>())
            .sum();
        assert_eq!(held, c.bytes());
        assert!(c.bytes() <= c.limit(), "{} over {}", c.bytes(), c.limit());
    }
}
