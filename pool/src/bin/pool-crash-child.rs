//! Crash-test workload (driven by the pool's crash test; not a user tool).
//!
//! Opens (or creates) a pool, then writes pseudo-random data to one 512-byte-block volume, with
//! a flush every few writes and a seal now and then, forever, until it is killed. After every
//! completed flush it appends `F <n>` to a journal (fsynced): the first n writes are durable.
//! After every completed seal it appends `S <snapshot id> <n>`: the snapshot holds the first n
//! writes. The parent replays the same write sequence (same seed) to know what must be there.
//!
//! Every fourth write is an atomic write ([`BlockDevice::write_atomic`]) of up to the volume's
//! atomic limit (close to one whole WAL segment, at a misaligned offset) into the last
//! [`ATOMIC_REGION`] bytes of the volume, which plain writes never touch: after the crash each
//! of them must be there entirely or not at all. Half of the plain writes try
//! [`BlockDevice::write_nowait`] first, as the network front-ends do.

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

/// The tail of the volume that only atomic writes touch.
pub const ATOMIC_REGION: u64 = 4 << 20;
/// Largest atomic write of the workload, in sectors: the atomic limit of a 512-byte volume with
/// the 1 MiB WAL segments used here (1 MiB less the segment's batch header, less 3.5 KiB of
/// worst-case misalignment).
pub const ATOMIC_MAX_SECTORS: u64 = ((1 << 20) - 4096 - 3584) / 512;

/// Whether write i is an atomic write (into the atomic region).
pub fn is_atomic(i: u64) -> bool {
    i % 4 == 3
}

/// The write sequence: (offset, length, data seed) for write i of a run seeded with `seed`.
/// Plain writes land below the atomic region, atomic writes inside it.
pub fn write_op(seed: u64, i: u64, volume_size: u64) -> (u64, u64, u64) {
    let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let region = ATOMIC_REGION.min(volume_size / 2) / 512;
    let plain_sectors = volume_size / 512 - region;
    if is_atomic(i) {
        let len = match next() % 3 {
            0 => 1 + next() % 16, // within one or two 4K blocks
            // Large: crosses WAL batch (and segment) boundaries unless kept in one batch.
            _ => ATOMIC_MAX_SECTORS - next() % 512,
        }
        .min(region);
        let at = plain_sectors + next() % (region - len + 1);
        return (at * 512, len * 512, next());
    }
    let len = match next() % 4 {
        0 => 1 + next() % 8,       // sub-4K
        1 => 8 * (1 + next() % 4), // a few 4K blocks
        2 => 1 + next() % 300,     // unaligned mid-size
        _ => 2048,                 // 1 MiB
    }
    .min(plain_sectors);
    let at = next() % (plain_sectors - len + 1);
    (at * 512, len * 512, next())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let opts = OpenOptions {
        cache_bytes: 8 << 20,
        log_cache_bytes: 8 << 20,
        // A small write buffer that hands batches over often: crashes land while blocks are
        // being replaced in place, handed over, written and synced.
        write_buffer_bytes: 8 << 20,
        write_back_delay: std::time::Duration::from_millis(30),
        wal_segment_bytes: 1 << 20,
        wal_fold_threshold: 6 << 20,
        background: true,
        ram_tier: None,
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
        if is_atomic(i) {
            v.write_atomic(off, &data, false)?;
        } else if i % 2 == 1 && v.write_nowait(off, &data)? {
            // A network front-end's fast path (declined when misaligned or the log is busy,
            // then the plain write below does it): the same durability.
        } else {
            v.write(off, &data, false)?;
        }
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
