//! Crash-test workload (driven by the pool's crash test; not a user tool).
//!
//! Opens (or creates) a pool, then writes pseudo-random data to one 512-byte-block volume, with
//! a flush every few writes and a seal now and then, forever, until it is killed. After every
//! completed flush it appends `F <n>` to a journal (fsynced): the first n writes are durable.
//! After every completed seal it appends `S <snapshot id> <n>`: the snapshot holds the first n
//! writes. The parent replays the same write sequence (same seed) to know what must be there.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use maas_pool::{BlockDevice, CreateOptions, DeviceSpec, OpenOptions, Pool, SnapshotId, Tier};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    pool: PathBuf,
    #[arg(long)]
    journal: PathBuf,
    #[arg(long)]
    seed: u64,
    #[arg(long, default_value_t = 16 << 20)]
    volume_size: u64,
}

/// The write sequence: (offset, length, data seed) for write i of a run seeded with `seed`.
pub fn write_op(seed: u64, i: u64, volume_size: u64) -> (u64, u64, u64) {
    let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let sectors = volume_size / 512;
    let len = match next() % 4 {
        0 => 1 + next() % 8,       // sub-4K
        1 => 8 * (1 + next() % 4), // a few 4K blocks
        2 => 1 + next() % 300,     // unaligned mid-size
        _ => 2048,                 // 1 MiB
    }
    .min(sectors);
    let at = next() % (sectors - len + 1);
    (at * 512, len * 512, next())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let opts = OpenOptions {
        cache_bytes: 8 << 20,
        wal_segment_bytes: 1 << 20,
        wal_fold_threshold: 6 << 20,
        background: true,
    };
    let pool = if a.pool.join("pool.json").exists() {
        Pool::open(&a.pool, opts).context("open pool")?
    } else {
        let create = CreateOptions {
            devices: vec![DeviceSpec {
                path: "dev0".into(),
                tier: Tier::Ssd,
                size: 256 << 20,
            }],
            chunk_size: 64 << 10,
            zstd_level: 1,
        };
        Pool::create(&a.pool, create, opts).context("create pool")?
    };
    let vol = match pool.volume_by_name("crash") {
        Ok(v) => v,
        Err(_) => pool.create_volume("crash", a.volume_size, 512)?,
    };
    let v = pool.open_volume(vol.id)?;
    let mut journal = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.journal)?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut i = 0u64;
    loop {
        let (off, len, dseed) = write_op(a.seed, i, a.volume_size);
        let data = pattern(dseed, len as usize);
        v.write(off, &data, false)?;
        i += 1;
        if i % 5 == 0 {
            v.flush()?;
            writeln!(journal, "F {i}")?;
            journal.sync_data()?;
        }
        if i % 37 == 0 {
            let s = pool.seal(vol.id)?;
            writeln!(journal, "S {} {i}", s.id.0)?;
            journal.sync_data()?;
            // Keep the two newest snapshots.
            let snaps = pool.snapshots()?;
            for old in snaps.iter().rev().skip(2) {
                pool.delete_snapshot(SnapshotId(old.id.0))?;
            }
        }
    }
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = vec![0u8; len];
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    out
}
