#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Power loss, not just SIGKILL: the pool runs on the power-loss simulation of its own I/O layer
//! (`maas_pool::powerloss`), which at a cut keeps only what a completed sync covered plus an
//! arbitrary, reordered, sector-torn subset of the rest, for the devices and the metadata store
//! alike. Several writer threads write, write zeroes, discard, write atomically and flush while
//! the background folds and cleans the log; the power goes at a random I/O (mid-write,
//! mid-sync, mid-fold), sometimes again during the next open's replay. After every cut:
//! - every write acknowledged before a completed flush of its volume reads back (each block:
//!   that value, or the value of a write issued after it);
//! - an atomic write is there entirely or not at all;
//! - nothing is reported damaged (a cut tears only what was in flight: torn is not damage).
//!
//! `MAAS_POWERLOSS_CYCLES` sets the number of cycles (default 300; the soak ran 3000),
//! `MAAS_POWERLOSS_SEED` the random seed; with `RUST_LOG` set the pool's log goes to stderr.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use maas_pool::powerloss::Sim;
use maas_pool::{BlockDevice, OpenOptions, Pool};
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;
const VOL_BLOCKS: u64 = 1024; // 4 MiB
const THREADS: u64 = 3;

fn opts() -> OpenOptions {
    OpenOptions {
        cache_bytes: 4 << 20,
        log_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
        write_back_delay: Duration::from_millis(5),
        wal_segment_bytes: 1 << 20,
        wal_fold_threshold: 3 << 20,
        background: true,
        ram_tier: None,
    }
}

#[derive(Clone)]
enum Write {
    Data {
        first: u64,
        data: Vec<u8>,
        atomic: bool,
    },
    Zero {
        first: u64,
        n: u64,
    },
}

impl Write {
    fn range(&self) -> std::ops::Range<u64> {
        match self {
            Write::Data { first, data, .. } => *first..*first + (data.len() / BLOCK) as u64,
            Write::Zero { first, n } => *first..*first + n,
        }
    }
    fn block(&self, b: u64) -> Vec<u8> {
        match self {
            Write::Data { first, data, .. } => {
                let i = (b - first) as usize;
                data[i * BLOCK..(i + 1) * BLOCK].to_vec()
            }
            Write::Zero { .. } => vec![0u8; BLOCK],
        }
    }
}

/// One writer's view: blocks as of its last completed flush, and its writes since.
struct Region {
    lo: u64,
    hi: u64,
    durable: HashMap<u64, Vec<u8>>,
    pending: Vec<Write>,
}

fn writer(v: &maas_pool::Volume, r: &mut Region, seed: u64, stop: &AtomicBool) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        let n = rng.gen_range(1..=12u64).min(r.hi - r.lo);
        let first = rng.gen_range(r.lo..=r.hi - n);
        let off = first * BLOCK as u64;
        let res = match rng.gen_range(0..10) {
            0..=5 => {
                let atomic = rng.gen_range(0..6) == 0;
                let mut data = vec![0u8; n as usize * BLOCK];
                rng.fill(&mut data[..]);
                let w = Write::Data {
                    first,
                    data: data.clone(),
                    atomic,
                };
                // Recorded before the call: a write that fails may still have landed.
                r.pending.push(w);
                if atomic {
                    v.write_atomic(off, &data, false)
                } else {
                    v.write(off, &data, false)
                }
            }
            6 => {
                r.pending.push(Write::Zero { first, n });
                v.write_zeroes(off, n * BLOCK as u64, false)
            }
            7 => {
                r.pending.push(Write::Zero { first, n });
                v.discard(off, n * BLOCK as u64)
            }
            _ => {
                let res = v.flush();
                if res.is_ok() {
                    for w in r.pending.drain(..) {
                        for b in w.range() {
                            r.durable.insert(b, w.block(b));
                        }
                    }
                }
                res
            }
        };
        if res.is_err() {
            return; // the power is gone
        }
    }
}

fn check(cycle: u64, got: &[u8], r: &Region) {
    let at = |b: u64| &got[b as usize * BLOCK..(b as usize + 1) * BLOCK];
    for b in r.lo..r.hi {
        let durable = r
            .durable
            .get(&b)
            .cloned()
            .unwrap_or_else(|| vec![0u8; BLOCK]);
        if at(b) == durable.as_slice() {
            continue;
        }
        let later = r
            .pending
            .iter()
            .any(|w| w.range().contains(&b) && w.block(b) == at(b));
        assert!(
            later,
            "cycle {cycle}: block {b} lost its flushed value and holds no later write"
        );
    }
    // Atomic writes: visible in one block (and not overwritten after) means visible in all.
    for (i, w) in r.pending.iter().enumerate() {
        let Write::Data {
            atomic: true,
            first,
            data,
        } = w
        else {
            continue;
        };
        let range = w.range();
        let overwritten = r.pending[i + 1..]
            .iter()
            .any(|l| l.range().start < range.end && range.start < l.range().end);
        if overwritten {
            continue;
        }
        let shows: Vec<bool> = range.clone().map(|b| at(b) == w.block(b)).collect();
        assert!(
            shows.iter().all(|s| *s) || !shows.iter().any(|s| *s),
            "cycle {cycle}: atomic write at block {first} ({} blocks) is torn: {shows:?}",
            data.len() / BLOCK
        );
    }
}

/// Opens the pool, maybe cutting the power again during the open (replay, recording, the first
/// background round). Returns an opened pool with nothing cut.
fn reopen(dir: &std::path::Path, sim: &Arc<Sim>, rng: &mut impl Rng, cycle: u64) -> Pool {
    if rng.gen_range(0..3) == 0 {
        sim.fail_after(Some(rng.gen_range(0..120)));
        // The open may fail (the power went during replay) or succeed and be cut after.
        if let Ok(p) = Pool::open(dir, opts()) {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..20)));
            p.kill();
        }
        sim.power_cut(rng.r#gen()).unwrap();
    }
    Pool::open(dir, opts()).unwrap_or_else(|e| panic!("cycle {cycle}: reopen failed: {e}"))
}

#[test]
fn power_loss_never_loses_flushed_writes_nor_reports_torn_writes_as_damage() {
    let cycles: u64 = std::env::var("MAAS_POWERLOSS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    // Soaks run several seeds at once; RUST_LOG shows what the pool did before a failure.
    let seed: u64 = std::env::var("MAAS_POWERLOSS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9047_1055);
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_thread_names(true)
            .try_init();
    }
    let dir = tempfile::tempdir().unwrap();
    let pool_dir = dir.path().join("pool");
    std::fs::create_dir_all(&pool_dir).unwrap();
    let sim = Sim::start(&pool_dir).unwrap();
    let pool = Pool::create(
        &pool_dir,
        small_pool_opts(&pool_dir, 64 * MIB, 64 << 10),
        opts(),
    )
    .unwrap();
    let vid = pool
        .create_volume("v", VOL_BLOCKS * BLOCK as u64, 4096)
        .unwrap()
        .id;
    pool.close().unwrap();
    drop(pool);

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut base = vec![0u8; VOL_BLOCKS as usize * BLOCK];
    let (mut rolled_back, mut unsynced) = (0u64, 0u64);
    let per = VOL_BLOCKS / THREADS;
    for cycle in 0..cycles {
        if std::env::var_os("RUST_LOG").is_some() {
            eprintln!("==== cycle {cycle}");
        }
        let pool = reopen(&pool_dir, &sim, &mut rng, cycle);
        let v = pool.open_volume(vid).unwrap();
        let mut got = vec![0u8; base.len()];
        v.read(0, &mut got).unwrap();
        let stop = AtomicBool::new(false);
        let regions: Vec<Region> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (lo, hi) = (t * per, (t + 1) * per);
                    let durable = (lo..hi)
                        .map(|b| {
                            (
                                b,
                                got[b as usize * BLOCK..(b as usize + 1) * BLOCK].to_vec(),
                            )
                        })
                        .collect();
                    let v = pool.open_volume(vid).unwrap();
                    let stop = &stop;
                    let seed = rng.r#gen();
                    s.spawn(move || {
                        let mut r = Region {
                            lo,
                            hi,
                            durable,
                            pending: Vec::new(),
                        };
                        writer(&v, &mut r, seed, stop);
                        r
                    })
                })
                .collect();
            // Let them run, sometimes through a fold, then cut at a random further I/O.
            std::thread::sleep(Duration::from_millis(rng.gen_range(5..60)));
            if rng.gen_range(0..4) == 0 {
                let _ = pool.checkpoint();
            }
            sim.fail_after(Some(rng.gen_range(0..40)));
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..15)));
            stop.store(true, Ordering::Relaxed);
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        drop(v);
        pool.kill();
        let cut = sim.power_cut(rng.r#gen()).unwrap();
        rolled_back += cut.rolled_back;
        unsynced += cut.unsynced_sectors;

        let pool = reopen(&pool_dir, &sim, &mut rng, cycle);
        let v = pool.open_volume(vid).unwrap();
        let mut after = vec![0u8; base.len()];
        v.read(0, &mut after)
            .unwrap_or_else(|e| panic!("cycle {cycle}: read after the cut: {e}"));
        for r in &regions {
            check(cycle, &after, r);
        }
        let rep = pool.verify().unwrap();
        assert!(
            rep.is_clean(),
            "cycle {cycle}: a power cut was reported as damage: {rep:?}"
        );
        base = after;
        drop(v);
        pool.close().unwrap();
    }
    sim.stop();
    let (writes, syncs) = sim.counts();
    eprintln!(
        "{cycles} power cuts (seed {seed}): {writes} writes, {syncs} syncs, {unsynced} unsynced sectors at the \
         cuts, {rolled_back} rolled back"
    );
    assert!(
        rolled_back > cycles,
        "the cuts rolled back almost nothing ({rolled_back}): the test did not test"
    );
    assert!(!base.is_empty());
}
