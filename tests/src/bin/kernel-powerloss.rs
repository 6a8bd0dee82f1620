//! The workload and the checker of the power-loss test through a real kernel
//! (`tests/tests/guest_powerloss.rs`).
//!
//! `run` (in the guest, on ext4 over `dm-log-writes`): creates a pool, then several writer
//! threads write, write atomically, write with FUA, write zeroes, discard and flush their own
//! region of one volume while the pool folds and cleans its log in the background. Every
//! operation is journaled before it is issued; every acknowledged flush or FUA write is followed
//! by a mark in the kernel's write log (`ack-THREAD-SEQ`), so a replay of the log knows which
//! acknowledgements preceded the cut.
//!
//! `check` (on the host, on the device state a replay of the log produced): opens the pool
//! (replay included), reads the volume and checks it against the journal and the marks the
//! replayed prefix holds:
//! - each block holds its latest acknowledged value (flushed, or written with FUA), or the value
//!   of a write issued after it;
//! - an atomic write is there entirely or not at all;
//! - `verify` reports nothing: a cut tears only what was in flight.
//!
//! `extract-log`: copies the used part of a `dm-log-writes` log device to a file.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::{Parser, Subcommand};
use maas_pool::{BlockDevice, CreateOptions, DeviceSpec, OpenOptions, Pool, Tier, VolumeId};
use rand::{Rng, SeedableRng};

const BLOCK: u64 = 4096;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the workload on a fresh pool in DIR.
    Run {
        #[arg(long)]
        pool: PathBuf,
        #[arg(long)]
        journal: PathBuf,
        /// The device-mapper device of the write log (for `dmsetup message NAME 0 mark`).
        #[arg(long)]
        dm_name: String,
        #[arg(long, default_value_t = 3)]
        threads: u64,
        #[arg(long, default_value_t = 300)]
        ops_per_thread: u64,
        #[arg(long, default_value_t = 1024)]
        volume_blocks: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Checks the pool in DIR against the journal, given the acknowledgement marks the replayed
    /// log holds.
    Check {
        #[arg(long)]
        pool: PathBuf,
        #[arg(long)]
        journal: PathBuf,
        /// Comma-separated `THREAD-SEQ` of the `ack-` marks in the replayed prefix.
        #[arg(long, default_value = "")]
        acked: String,
    },
    /// Copies the used part of a dm-log-writes log device to a file.
    ExtractLog {
        #[arg(long)]
        device: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Pool options that make the log roll, fold and get cleaned many times in a short run.
fn open_opts(background: bool) -> OpenOptions {
    OpenOptions {
        cache_bytes: 4 << 20,
        log_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
        write_back_delay: Duration::from_millis(5),
        wal_segment_bytes: 1 << 20,
        wal_fold_threshold: 3 << 20,
        background,
        ram_tier: None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Write,
    Atomic,
    Fua,
    Zeroes,
    Discard,
    Flush,
}

impl Kind {
    fn letter(self) -> char {
        match self {
            Kind::Write => 'W',
            Kind::Atomic => 'A',
            Kind::Fua => 'F',
            Kind::Zeroes => 'Z',
            Kind::Discard => 'D',
            Kind::Flush => 'S',
        }
    }
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "W" => Kind::Write,
            "A" => Kind::Atomic,
            "F" => Kind::Fua,
            "Z" => Kind::Zeroes,
            "D" => Kind::Discard,
            "S" => Kind::Flush,
            _ => return None,
        })
    }
    fn writes_data(self) -> bool {
        matches!(self, Kind::Write | Kind::Atomic | Kind::Fua)
    }
}

#[derive(Clone, Debug)]
struct Op {
    thread: u64,
    seq: u64,
    kind: Kind,
    first: u64,
    n: u64,
}

impl Op {
    fn touches(&self, b: u64) -> bool {
        self.kind != Kind::Flush && (self.first..self.first + self.n).contains(&b)
    }
    /// The content this operation gives block `b` (which it touches).
    fn block(&self, b: u64) -> Vec<u8> {
        let mut out = vec![0u8; BLOCK as usize];
        if self.kind.writes_data() {
            fill(self.thread, self.seq, b, &mut out);
        }
        out
    }
}

/// The data of block `b` of write `seq` of `thread`: derived, so the journal need not hold it.
fn fill(thread: u64, seq: u64, b: u64, out: &mut [u8]) {
    let mut h = blake3::Hasher::new_derive_key("maas kernel-powerloss block data v1");
    h.update(&thread.to_le_bytes())
        .update(&seq.to_le_bytes())
        .update(&b.to_le_bytes());
    h.finalize_xof().fill(out);
}

struct Journal {
    volume: VolumeId,
    volume_blocks: u64,
    ops: Vec<Op>,
}

impl Journal {
    fn write(&self, path: &Path) -> Result<()> {
        let mut s = format!(
            "maas-kernel-powerloss 1 volume {} blocks {}\n",
            self.volume.0, self.volume_blocks
        );
        for o in &self.ops {
            s.push_str(&format!(
                "{} {} {} {} {}\n",
                o.thread,
                o.seq,
                o.kind.letter(),
                o.first,
                o.n
            ));
        }
        let mut f = std::fs::File::create(path).with_context(|| path.display().to_string())?;
        f.write_all(s.as_bytes())?;
        f.sync_all()?;
        Ok(())
    }

    fn read(path: &Path) -> Result<Journal> {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        let mut lines = text.lines();
        let head: Vec<&str> = lines
            .next()
            .ok_or_else(|| anyhow!("empty journal"))?
            .split(' ')
            .collect();
        ensure!(
            head.len() == 6 && head[0] == "maas-kernel-powerloss" && head[1] == "1",
            "not a journal: {head:?}"
        );
        let mut ops = Vec::new();
        for l in lines {
            let f: Vec<&str> = l.split(' ').collect();
            ensure!(f.len() == 5, "journal line {l:?}");
            ops.push(Op {
                thread: f[0].parse()?,
                seq: f[1].parse()?,
                kind: Kind::parse(f[2]).ok_or_else(|| anyhow!("journal line {l:?}"))?,
                first: f[3].parse()?,
                n: f[4].parse()?,
            });
        }
        Ok(Journal {
            volume: VolumeId(head[3].parse()?),
            volume_blocks: head[5].parse()?,
            ops,
        })
    }
}

fn mark(dm_name: &str, name: &str) -> Result<()> {
    let st = std::process::Command::new("dmsetup")
        .args(["message", dm_name, "0", "mark", name])
        .status()
        .context("running dmsetup")?;
    ensure!(
        st.success(),
        "dmsetup message {dm_name} 0 mark {name}: {st}"
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn writer(
    v: &maas_pool::Volume,
    thread: u64,
    (lo, hi): (u64, u64),
    ops: u64,
    seed: u64,
    dm_name: &str,
    journal: &Mutex<Vec<Op>>,
) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ thread.wrapping_mul(0x9e37_79b9));
    for seq in 0..ops {
        let n = rng.gen_range(1..=8u64).min(hi - lo);
        let first = rng.gen_range(lo..=hi - n);
        let kind = match rng.gen_range(0..20) {
            0..=8 => Kind::Write,
            9..=10 => Kind::Atomic,
            11..=12 => Kind::Fua,
            13 => Kind::Zeroes,
            14 => Kind::Discard,
            _ => Kind::Flush,
        };
        let op = Op {
            thread,
            seq,
            kind,
            first,
            n,
        };
        // Journaled before it is issued: a write that is cut may still land.
        journal
            .lock()
            .map_err(|_| anyhow!("journal lock poisoned"))?
            .push(op.clone());
        let (off, len) = (first * BLOCK, n * BLOCK);
        let data = || {
            let mut d = vec![0u8; len as usize];
            for (i, b) in (first..first + n).enumerate() {
                fill(
                    thread,
                    seq,
                    b,
                    &mut d[i * BLOCK as usize..(i + 1) * BLOCK as usize],
                );
            }
            d
        };
        match kind {
            Kind::Write => v.write(off, &data(), false)?,
            Kind::Atomic => v.write_atomic(off, &data(), false)?,
            Kind::Fua => v.write(off, &data(), true)?,
            Kind::Zeroes => v.write_zeroes(off, len, false)?,
            Kind::Discard => v.discard(off, len)?,
            Kind::Flush => v.flush()?,
        }
        if matches!(kind, Kind::Fua | Kind::Flush) {
            mark(dm_name, &format!("ack-{thread}-{seq}"))?;
        }
    }
    Ok(())
}

fn run(
    pool_dir: &Path,
    journal_path: &Path,
    dm_name: &str,
    threads: u64,
    ops: u64,
    volume_blocks: u64,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(pool_dir)?;
    let create = CreateOptions {
        devices: vec![DeviceSpec {
            // Relative: the checks open the pool where the host mounts the replayed image.
            path: "dev0".into(),
            tier: Tier::Ssd,
            size: 64 << 20,
        }],
        chunk_size: 64 << 10,
        zstd_level: 1,
    };
    let pool = Pool::create(pool_dir, create, open_opts(true))?;
    let volume = pool
        .create_volume("v", volume_blocks * BLOCK, BLOCK as u32)?
        .id;
    pool.close()?;
    drop(pool);
    // A cut before this mark would find no pool: the checks start after it.
    mark(dm_name, "created")?;

    let pool = Pool::open(pool_dir, open_opts(true))?;
    let journal = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    let per = volume_blocks / threads;
    let result: Result<()> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let v = pool.open_volume(volume)?;
                let journal = &journal;
                Ok(s.spawn(move || {
                    writer(&v, t, (t * per, (t + 1) * per), ops, seed, dm_name, journal)
                }))
            })
            .collect::<Result<_>>()?;
        // Folds beside the writers, at random moments, on top of the background ones.
        let checkpoints = s.spawn(|| -> Result<()> {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(rng.gen_range(50..400)));
                pool.checkpoint()?;
            }
            Ok(())
        });
        let mut res = Ok(());
        for h in handles {
            let r = h.join().map_err(|_| anyhow!("a writer panicked"))?;
            if res.is_ok() {
                res = r;
            }
        }
        done.store(true, Ordering::Relaxed);
        checkpoints
            .join()
            .map_err(|_| anyhow!("the checkpoint thread panicked"))??;
        res
    });
    result?;
    let ops = journal
        .into_inner()
        .map_err(|_| anyhow!("journal lock poisoned"))?;
    let n = ops.len();
    Journal {
        volume,
        volume_blocks,
        ops,
    }
    .write(journal_path)?;
    mark(dm_name, "done")?;
    // The power goes: no clean close.
    pool.kill();
    println!("workload: {n} operations by {threads} threads");
    Ok(())
}

fn check(pool_dir: &Path, journal_path: &Path, acked: &str) -> Result<()> {
    let j = Journal::read(journal_path)?;
    let acked: Vec<(u64, u64)> = acked
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (t, q) = s.split_once('-').ok_or_else(|| anyhow!("ack {s:?}"))?;
            Ok((t.parse()?, q.parse()?))
        })
        .collect::<Result<_>>()?;
    // Per thread: its operations by sequence number, and the highest acknowledged flush.
    let mut by_thread: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
    for o in &j.ops {
        by_thread.entry(o.thread).or_default().push(o);
    }
    let find = |t: u64, q: u64| -> Result<&Op> {
        by_thread
            .get(&t)
            .and_then(|ops| ops.iter().find(|o| o.seq == q).copied())
            .ok_or_else(|| anyhow!("ack-{t}-{q} is not in the journal"))
    };
    let mut flushed: HashMap<u64, u64> = HashMap::new();
    let mut fua_acked: Vec<(u64, u64)> = Vec::new();
    for &(t, q) in &acked {
        match find(t, q)?.kind {
            Kind::Flush => {
                let e = flushed.entry(t).or_insert(q);
                *e = (*e).max(q);
            }
            Kind::Fua => fua_acked.push((t, q)),
            k => bail!("ack-{t}-{q} marks a {k:?}"),
        }
    }

    let pool = Pool::open(pool_dir, open_opts(false)).context("opening the pool after the cut")?;
    let v = pool.open_volume(j.volume)?;
    let mut got = vec![0u8; (j.volume_blocks * BLOCK) as usize];
    v.read(0, &mut got).context("reading the volume")?;
    let at = |b: u64| &got[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];

    let mut checked_nonzero = 0u64;
    for (&t, ops) in &by_thread {
        let flushed_to = flushed.get(&t).copied();
        let blocks: std::collections::BTreeSet<u64> = ops
            .iter()
            .flat_map(|o| o.first..o.first + if o.kind == Kind::Flush { 0 } else { o.n })
            .collect();
        for b in blocks {
            // The latest acknowledged operation on b: covered by a flush, or a FUA write.
            let durable = ops
                .iter()
                .filter(|o| o.touches(b))
                .filter(|o| {
                    flushed_to.is_some_and(|f| o.seq < f) || fua_acked.contains(&(t, o.seq))
                })
                .max_by_key(|o| o.seq);
            let want = durable.map_or_else(|| vec![0u8; BLOCK as usize], |o| o.block(b));
            let floor = durable.map(|o| o.seq);
            if at(b) == want.as_slice() {
                checked_nonzero += u64::from(want.iter().any(|x| *x != 0));
                continue;
            }
            let later = ops
                .iter()
                .filter(|o| o.touches(b) && floor.is_none_or(|f| o.seq > f))
                .any(|o| o.block(b) == at(b));
            ensure!(
                later,
                "block {b} (thread {t}) lost its acknowledged value ({}) and holds no later write",
                durable.map_or("never written: zeroes".to_string(), |o| format!(
                    "{:?} seq {}",
                    o.kind, o.seq
                ))
            );
        }
        // Atomic writes: visible in one block (and not overwritten after) means in all.
        for (i, w) in ops.iter().enumerate() {
            if w.kind != Kind::Atomic {
                continue;
            }
            let range = w.first..w.first + w.n;
            let overwritten = ops[i + 1..].iter().any(|l| {
                l.kind != Kind::Flush && l.first < range.end && range.start < l.first + l.n
            });
            if overwritten {
                continue;
            }
            let shows: Vec<bool> = range.clone().map(|b| at(b) == w.block(b)).collect();
            ensure!(
                shows.iter().all(|s| *s) || !shows.iter().any(|s| *s),
                "atomic write seq {} of thread {t} at block {} is torn: {shows:?}",
                w.seq,
                w.first
            );
        }
    }
    let rep = pool.verify()?;
    ensure!(
        rep.is_clean(),
        "a power cut was reported as damage: {rep:?}"
    );
    drop(v);
    pool.close()?;
    println!(
        "check: ok ({} acknowledgements, {checked_nonzero} blocks hold acknowledged data)",
        acked.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Run {
            pool,
            journal,
            dm_name,
            threads,
            ops_per_thread,
            volume_blocks,
            seed,
        } => run(
            &pool,
            &journal,
            &dm_name,
            threads,
            ops_per_thread,
            volume_blocks,
            seed,
        ),
        Cmd::Check {
            pool,
            journal,
            acked,
        } => check(&pool, &journal, &acked),
        Cmd::ExtractLog { device, out } => maas_tests::dmlog::extract(&device, &out)
            .map(|n| println!("extract-log: {n} bytes"))
            .map_err(Into::into),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kernel-powerloss: {e:#}");
            ExitCode::FAILURE
        }
    }
}
