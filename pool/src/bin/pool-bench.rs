//! pool-bench: the pool's performance, side by side with the raw limit of the same device
//! measured by fio (io_uring, O_DIRECT) in the same run.
//!
//! `pool-bench [--dir DIR] [--big-gib 10] [--seconds 8] [--rounds 3] [--json]`
//!
//! Reads that miss RAM are measured on the same pool reopened with its RAM tier off: random
//! 4 KiB reads from the write-ahead log, from sealed incompressible chunks (4 KiB raw frames)
//! and from sealed mixed, compressible chunks (64 KiB zstd frames); by 32 threads of
//! synchronous reads, and (log and incompressible chunks) 32 in flight from one thread through
//! `read_async`, the path the targets take.
//!
//! The figures the goals are judged on (sequential write and the reads that miss RAM) are
//! measured in `--rounds` alternating rounds, fio then the pool, and each is the median of its
//! rounds: on a shared virtual disk the device's own figure drifts by 1.5x within minutes, and
//! which of two back-to-back runs goes first moved single figures by 2x. The JSON carries
//! every round.
//!
//! Any I/O error ends the run with a non-zero exit and names the test and the offset: a
//! figure that counted failed operations would be a lie.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use maas_pool::{BlockDevice, CreateOptions, DeviceSpec, OpenOptions, Pool, Tier, Volume};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Benchmark the MaaS pool against the raw device (fio) in one run")]
struct Args {
    /// Where the pool and fio's file go (on the disk to measure). Default: a temporary
    /// directory under the current one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the volume for the 1%-rewrite seal test, GiB.
    #[arg(long, default_value_t = 10)]
    big_gib: u64,
    /// Seconds per throughput test.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Alternating rounds (fio, then the pool) for sequential write and the reads that miss
    /// RAM; their figures are medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Only the sequential-write rounds (for profiling the write path).
    #[arg(long)]
    seq_write_only: bool,
}

/// Every round's figure of each measurement, in the order measured.
#[derive(Default)]
struct Rounds(std::collections::BTreeMap<&'static str, Vec<f64>>);

impl Rounds {
    fn push(&mut self, key: &'static str, x: f64) -> f64 {
        self.0.entry(key).or_default().push(x);
        x
    }
    fn median(&self, key: &str) -> f64 {
        let mut v = self.0.get(key).cloned().unwrap_or_default();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect(),
        )
    }
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
    }
}

/// Mixed data, 1 MiB at a time: log-like text (compressible), random, zeros, and repeats of
/// earlier chunks (dedupable), in proportions typical of a server's disk.
struct Mixed {
    rng: Rng,
    history: Vec<Vec<u8>>,
}

impl Mixed {
    fn new(seed: u64) -> Self {
        Mixed {
            rng: Rng(seed | 1),
            history: Vec::new(),
        }
    }
    fn chunk(&mut self) -> Vec<u8> {
        let kind = self.rng.next() % 10;
        let mut b = vec![0u8; MIB as usize];
        match kind {
            0..=3 => {
                let mut pos = 0;
                while pos < b.len() {
                    let n = self.rng.next();
                    let line = format!(
                        "2026-11-22T00:{:02}:{:02}.{:06}Z host-{:03} svc[{}]: request id={:016x} path=/api/v1/volumes/{} status={} bytes={}\n",
                        n % 60,
                        (n >> 8) % 60,
                        (n >> 16) % 1_000_000,
                        (n >> 36) % 200,
                        (n >> 44) % 9000,
                        self.rng.next(),
                        (n >> 20) % 5000,
                        [200, 201, 404, 500][(n >> 12) as usize % 4],
                        (n >> 24) % 100_000
                    );
                    let l = line.len().min(b.len() - pos);
                    b[pos..pos + l].copy_from_slice(&line.as_bytes()[..l]);
                    pos += l;
                }
            }
            4..=6 => self.rng.fill(&mut b),
            7 => {}
            _ if !self.history.is_empty() => {
                let i = self.rng.next() as usize % self.history.len();
                b.copy_from_slice(&self.history[i]);
            }
            _ => self.rng.fill(&mut b),
        }
        if kind != 7 && self.history.len() < 64 {
            self.history.push(b.clone());
        }
        b
    }
}

fn aligned(len: usize) -> maas_pool::io::AlignedBuf {
    maas_pool::io::AlignedBuf::zeroed(len)
}

/// Keeps the first error of a run.
fn record(failed: &Mutex<Option<anyhow::Error>>, e: anyhow::Error) {
    let mut f = match failed.lock() {
        Ok(f) => f,
        Err(p) => p.into_inner(),
    };
    f.get_or_insert(e);
}

/// One benchmark operation: gets the worker's RNG and its aligned buffer.
type BenchOp = Arc<dyn Fn(&mut Rng, &mut [u8]) -> anyhow::Result<()> + Send + Sync>;

/// Runs `threads` workers for `secs`, each calling `op(rng, buf)`; returns operations per
/// second. The first error (or panic) of any worker stops them all and is the result.
fn run_parallel(
    what: &str,
    threads: usize,
    secs: u64,
    op: BenchOp,
    buf: usize,
) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let failed: Arc<Mutex<Option<anyhow::Error>>> = Arc::new(Mutex::new(None));
    let start = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, count, op, failed) =
                (stop.clone(), count.clone(), op.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x1234_5678 + t as u64 * 7919);
                let mut b = aligned(buf);
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = op(&mut rng, &mut b) {
                        record(&failed, e);
                        stop.store(true, Ordering::Relaxed);
                        return;
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let deadline = start + Duration::from_secs(secs);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        if h.join().is_err() {
            record(&failed, anyhow::anyhow!("a worker panicked"));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let failed = match Arc::try_unwrap(failed) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(_) => Some(anyhow::anyhow!("a worker outlived the run")),
    };
    if let Some(e) = failed {
        return Err(e.context(what.to_string()));
    }
    Ok(count.load(Ordering::Relaxed) as f64 / elapsed)
}

/// Random 4 KiB reads at queue depth 32 (32 threads) over the first `span` bytes of `v`, for
/// `secs`; IOPS. With `stamped`, every block read must carry its offset in its first 8 bytes
/// (as the live volume's writes stamp them) or be unwritten: the read returned its data.
fn random_reads(
    what: &str,
    v: &Volume,
    span: u64,
    secs: u64,
    stamped: bool,
) -> anyhow::Result<f64> {
    let v = v.clone();
    let op: BenchOp = Arc::new(move |r, b| {
        let off = (r.next() % (span / 4096)) * 4096;
        v.read(off, b)
            .with_context(|| format!("read of 4 KiB at {off}"))?;
        check_stamp(off, b, stamped)
    });
    run_parallel(what, 32, secs, op, 4096)
}

/// With `stamped`, the block read at `off` must carry `off` in its first 8 bytes (as the live
/// volume's writes stamp them) or be unwritten: the read returned its own data.
fn check_stamp(off: u64, b: &[u8], stamped: bool) -> anyhow::Result<()> {
    let stamp = u64::from_le_bytes(b[..8].try_into()?);
    if stamped && stamp != off && stamp != 0 {
        bail!("the block at {off} holds the block at {stamp}");
    }
    Ok(())
}

/// Random 4 KiB reads kept 32 in flight from ONE thread through [`BlockDevice::read_async`],
/// the path the iSCSI and NVMe/TCP targets take (a connection's task with many commands in
/// flight), as fio's io_uring job keeps 32 in flight from one thread; IOPS. Like the targets'
/// runtime (media-engine `read_completions`), this thread holds the ring's completion source:
/// the reads it starts queue, one `reap` per turn enters them all and finishes what completed,
/// and it sleeps on the ring's eventfd. `stamped` as for [`random_reads`]. Reads the pool
/// cannot start without blocking run synchronously on this thread, and are counted in the
/// pool's stats (`async_reads.blocking`), never hidden.
fn random_reads_async(
    what: &str,
    v: &Volume,
    span: u64,
    secs: u64,
    stamped: bool,
) -> anyhow::Result<f64> {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Wake, Waker};
    type Pending = Pin<Box<dyn Future<Output = maas_pool::Result<Vec<u8>>> + Send>>;

    /// Which in-flight reads were woken, for the loop to poll.
    struct Ready {
        woken: Mutex<Vec<usize>>,
        thread: std::thread::Thread,
    }
    struct SlotWaker(Arc<Ready>, usize);
    impl Wake for SlotWaker {
        fn wake(self: Arc<Self>) {
            let mut w = self.0.woken.lock().unwrap_or_else(|p| p.into_inner());
            w.push(self.1);
            drop(w);
            self.0.thread.unpark();
        }
    }
    const DEPTH: usize = 32;
    let ready = Arc::new(Ready {
        woken: Mutex::new(Vec::new()),
        thread: std::thread::current(),
    });
    let wakers: Vec<Waker> = (0..DEPTH)
        .map(|i| Waker::from(Arc::new(SlotWaker(ready.clone(), i))))
        .collect();
    let mut rng = Rng(0x5eed_1234);
    let check = |off: u64, b: &[u8]| check_stamp(off, b, stamped);
    let mut slots: Vec<Option<(u64, Pending)>> = (0..DEPTH).map(|_| None).collect();
    let mut done = 0u64;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    // Starts reads in slot i until one is in flight (or time is up); reads that finish at once
    // are counted as they finish.
    let mut fill =
        |i: usize, slots: &mut Vec<Option<(u64, Pending)>>, done: &mut u64| -> anyhow::Result<()> {
            while Instant::now() < deadline {
                let off = (rng.next() % (span / 4096)) * 4096;
                let ctx = || format!("{what}: read of 4 KiB at {off}");
                match v.read_async(off, vec![0u8; 4096]) {
                    maas_pool::AsyncRead::Done(r) => {
                        check(off, &r.with_context(ctx)?).with_context(ctx)?;
                        *done += 1;
                    }
                    maas_pool::AsyncRead::Blocking(mut b) => {
                        v.read(off, &mut b).with_context(ctx)?;
                        check(off, &b).with_context(ctx)?;
                        *done += 1;
                    }
                    maas_pool::AsyncRead::Pending(mut f) => {
                        match f.as_mut().poll(&mut Context::from_waker(&wakers[i])) {
                            Poll::Ready(r) => {
                                check(off, &r.with_context(ctx)?).with_context(ctx)?;
                                *done += 1;
                            }
                            Poll::Pending => {
                                slots[i] = Some((off, f));
                                return Ok(());
                            }
                        }
                    }
                }
            }
            Ok(())
        };
    // Ours while this runs (None: io_uring unavailable, or another holds it; then the pool's
    // own thread reaps and wakes this one).
    let source = maas_pool::aio::completion_source();
    if let Some(src) = &source {
        // Told when reads are queued: this loop reaps every turn anyway.
        src.watch_submissions(Waker::noop());
    }
    for i in 0..DEPTH {
        fill(i, &mut slots, &mut done)?;
    }
    while slots.iter().any(Option::is_some) {
        if let Some(src) = &source {
            src.reap();
        }
        let woken: Vec<usize> =
            std::mem::take(&mut *ready.woken.lock().unwrap_or_else(|p| p.into_inner()));
        if woken.is_empty() {
            match &source {
                Some(src) => {
                    let mut pfd = libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(src),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                }
                // A wake before this park makes it return at once.
                None => std::thread::park_timeout(Duration::from_millis(100)),
            }
            continue;
        }
        for i in woken {
            let Some((off, f)) = slots[i].as_mut() else {
                continue;
            };
            let off = *off;
            if let Poll::Ready(r) = f.as_mut().poll(&mut Context::from_waker(&wakers[i])) {
                slots[i] = None;
                let ctx = || format!("{what}: read of 4 KiB at {off}");
                check(off, &r.with_context(ctx)?).with_context(ctx)?;
                done += 1;
                fill(i, &mut slots, &mut done)?;
            }
        }
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

fn fio(file: &Path, rw: &str, bs: &str, depth: u32, secs: u64) -> anyhow::Result<(f64, f64)> {
    // The fio that scripts/iscsi-peers.sh builds (it has io_uring too), else the system's.
    let fio = std::env::var_os("MAAS_FIO_LIBISCSI")
        .filter(|p| Path::new(p).exists())
        .unwrap_or_else(|| "fio".into());
    let out = Command::new(fio)
        .args([
            "--name=raw",
            "--ioengine=io_uring",
            "--direct=1",
            "--size=1G",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={secs}"))
        .output()
        .context("running fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio JSON")?;
    let job = &v["jobs"][0];
    let side = if rw.contains("read") {
        &job["read"]
    } else {
        &job["write"]
    };
    let figure = |k: &str| {
        side[k]
            .as_f64()
            .filter(|x| *x > 0.0)
            .with_context(|| format!("fio --rw={rw} reported no {k}: {side}"))
    };
    if side["total_ios"].as_u64().is_none() || job["error"].as_u64().unwrap_or(1) != 0 {
        bail!("fio --rw={rw} reported an error: {job}");
    }
    Ok((figure("bw_bytes")? / MIB as f64, figure("iops")?))
}

/// Closes the benchmark's pool and removes its directory (devices and metadata).
fn close_and_remove(pool: Pool, dir: &Path) -> anyhow::Result<()> {
    pool.close()?;
    drop(pool);
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

fn fill(v: &Volume, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut m = Mixed::new(seed);
    let mut buf = aligned(MIB as usize);
    let mut off = 0;
    while off < size {
        buf.copy_from_slice(&m.chunk());
        v.write(off, &buf, false)?;
        off += MIB;
    }
    v.flush()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("pool-bench-")
                .tempdir_in(".")?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir)?;
    let secs = a.seconds;
    let say = |s: &str| {
        if !a.json {
            eprintln!("{s}")
        }
    };

    let rounds = a.rounds as usize;
    let mut figures = Rounds::default();
    let raw_file = dir.join("fio.raw");
    let pool_dir = dir.join("pool");
    let create = CreateOptions {
        devices: vec![DeviceSpec {
            path: "data-0.dev".into(),
            tier: Tier::Ssd,
            size: (a.big_gib * 3 + 40) * GIB,
        }],
        ..CreateOptions::default()
    };
    let opts = OpenOptions {
        // Above what the live-path tests write: they measure the WAL path (the live path), not
        // reads of folded, sealed chunks.
        wal_fold_threshold: 32 * GIB,
        // Against the raw device with O_DIRECT: every write goes to the device, none waits
        // in the RAM tier's write buffer.
        write_buffer_bytes: 0,
        ..OpenOptions::default()
    };
    let pool = Pool::create(&pool_dir, create, opts.clone())?;

    // Sequential write, alternating with the raw device's (same filesystem, same engine as
    // our pool). Each round writes a fresh volume; all but the last are deleted (their log
    // space freed), the last is the live volume the next tests read.
    say(&format!(
        "sequential 1 MiB writes x 16, {rounds} rounds of fio (io_uring, O_DIRECT) then the pool..."
    ));
    let mut vi = None;
    for round in 0..rounds {
        figures.push(
            "raw_seq_write_mib_s",
            fio(&raw_file, "write", "1M", 16, secs)?.0,
        );
        let info = pool.create_volume(&format!("live-{round}"), GIB, 4096)?;
        let v = pool.open_volume(info.id)?;
        let pos = Arc::new(AtomicU64::new(0));
        let (wv, pos) = (v.clone(), pos.clone());
        let seq_w = run_parallel(
            "pool live volume: sequential 1 MiB writes",
            16,
            secs,
            Arc::new(move |r, b| {
                let off = pos.fetch_add(MIB, Ordering::Relaxed) % GIB;
                // Unique data per block (random, offset-stamped): nothing dedups or compresses,
                // so later reads measure the device, not a cached shared chunk.
                if b[4104..4112] == [0; 8] {
                    r.fill(b); // once per worker: random content
                }
                for (i, blk) in b.chunks_mut(4096).enumerate() {
                    blk[..8].copy_from_slice(&(off + i as u64 * 4096).to_le_bytes());
                }
                wv.write(off, b, false)
                    .with_context(|| format!("write of 1 MiB at {off}"))
            }),
            MIB as usize,
        )?;
        v.flush()?;
        figures.push("seq_write_mib_s", seq_w);
        if round + 1 < rounds {
            drop(v);
            pool.delete_volume(info.id)?;
        } else {
            vi = Some(info);
        }
    }
    let vi = vi.context("no round ran")?;
    let v = pool.open_volume(vi.id)?;
    let seq_w = figures.median("seq_write_mib_s");
    let raw_sw = figures.median("raw_seq_write_mib_s");
    if a.seq_write_only {
        let result = json!({
            "seq_write_mib_s": seq_w,
            "raw_seq_write_mib_s": raw_sw,
            "ratio_seq_write": seq_w / raw_sw,
            "rounds": rounds,
            "per_round": figures.to_json(),
        });
        if a.json {
            println!("{result}");
        } else {
            println!(
                "seq write MiB/s (1 MiB): pool {seq_w:.0}, raw (fio) {raw_sw:.0}, ratio {:.2}",
                seq_w / raw_sw
            );
        }
        drop(v);
        close_and_remove(pool, &pool_dir)?;
        return Ok(());
    }

    say("raw device: sequential read, random read and write (fio)...");
    let (raw_sr, _) = fio(&raw_file, "read", "1M", 16, secs)?;
    let (_, raw_rr) = fio(&raw_file, "randread", "4k", 32, secs)?;
    let (_, raw_rw) = fio(&raw_file, "randwrite", "4k", 32, secs)?;

    say("pool live volume: sequential 1 MiB reads, random 4 KiB x 32...");
    let seq_r = {
        let (v, pos) = (v.clone(), Arc::new(AtomicU64::new(0)));
        run_parallel(
            "pool live volume: sequential 1 MiB reads",
            16,
            secs,
            Arc::new(move |_r, b| {
                let off = pos.fetch_add(MIB, Ordering::Relaxed) % GIB;
                v.read(off, b)
                    .with_context(|| format!("read of 1 MiB at {off}"))
            }),
            MIB as usize,
        )?
    };
    let rand_r = random_reads("pool live volume: random 4 KiB reads", &v, GIB, secs, false)?;
    let rand_w = {
        let v = v.clone();
        run_parallel(
            "pool live volume: random 4 KiB writes",
            32,
            secs,
            Arc::new(move |r, b| {
                let off = (r.next() % (GIB / 4096)) * 4096;
                // New random content for every write (incompressible, never all zeros: a
                // zero block is cheaper than any real one), stamped with its offset.
                r.fill(b);
                b[..8].copy_from_slice(&off.to_le_bytes());
                v.write(off, b, false)
                    .with_context(|| format!("write of 4 KiB at {off}"))
            }),
            4096,
        )?
    };
    v.flush()?;
    drop(v);

    // Seal throughput of freshly written mixed data.
    say("seal of freshly written data...");
    let si = pool.create_volume("sealme", 2 * GIB, 4096)?;
    let sv = pool.open_volume(si.id)?;
    fill(&sv, 2 * GIB, 7)?;
    let t = Instant::now();
    let snap = pool.seal(si.id)?;
    let seal_changed = (2 * GIB / MIB) as f64 / t.elapsed().as_secs_f64();
    let st = pool.snapshot_stats(snap.id)?;
    let (dedup, compression) = (st.dedup_ratio, st.compression_ratio);

    // Cold sequential read of the snapshot (through a clone).
    pool.drop_caches();
    let c = pool.clone_snapshot(snap.id, "readback")?;
    let cv = pool.open_volume(c.id)?;
    let t = Instant::now();
    let mut buf = aligned(4 * MIB as usize);
    let mut off = 0;
    while off < 2 * GIB {
        cv.read(off, &mut buf)?;
        off += 4 * MIB;
    }
    let read_snap = (2 * GIB / MIB) as f64 / t.elapsed().as_secs_f64();
    pool.delete_volume(c.id)?;
    pool.delete_volume(si.id)?;
    drop((cv, sv));

    // Reads that miss RAM: the same pool reopened with its RAM tier off, so every read goes to
    // the device — the live volume's blocks from the write-ahead log, the snapshot's from
    // sealed chunks.
    say("reads that miss RAM: random 4 KiB x 32 from the log and from sealed chunks...");
    pool.close()?;
    drop(pool);
    let cold_opts = OpenOptions {
        cache_bytes: 0,
        log_cache_bytes: 0,
        write_buffer_bytes: 0,
        ..opts.clone()
    };
    // The device's random-read figure in alternating rounds with the pool's: these machines
    // drift, and the cold reads are compared with the device as it is while they run.
    let raw_cold = |figures: &mut Rounds| -> anyhow::Result<()> {
        figures.push(
            "raw_rand_read_iops_at_cold",
            fio(&raw_file, "randread", "4k", 32, secs)?.1,
        );
        Ok(())
    };
    // Stamped random reads of `v`, by 32 threads and then 32 in flight from one thread.
    let both = |figures: &mut Rounds,
                what: &str,
                keys: [&'static str; 2],
                v: &Volume|
     -> anyhow::Result<()> {
        say(&format!("  {what}..."));
        figures.push(keys[0], random_reads(what, v, GIB, secs, true)?);
        say(&format!("  {what}, asynchronous..."));
        figures.push(keys[1], random_reads_async(what, v, GIB, secs, true)?);
        Ok(())
    };
    let pool = Pool::open(&pool_dir, cold_opts)?;
    let lv = pool.open_volume(vi.id)?;
    for _ in 0..rounds {
        raw_cold(&mut figures)?;
        both(
            &mut figures,
            "random 4 KiB reads from the log, RAM tier off",
            ["rand_read_cold_log_iops", "rand_read_cold_log_async_iops"],
            &lv,
        )?;
    }
    drop(lv);
    // The live volume's data sealed: incompressible, stored as 4 KiB raw frames; and the
    // mixed snapshot's, compressible, in 64 KiB zstd frames.
    let rand_snap = pool.seal(vi.id)?;
    let rc = pool.clone_snapshot(rand_snap.id, "cold-read-random")?;
    let rcv = pool.open_volume(rc.id)?;
    let c = pool.clone_snapshot(snap.id, "cold-read")?;
    let cv = pool.open_volume(c.id)?;
    for _ in 0..rounds {
        raw_cold(&mut figures)?;
        both(
            &mut figures,
            "random 4 KiB reads from sealed incompressible chunks, RAM tier off",
            [
                "rand_read_cold_sealed_incompressible_iops",
                "rand_read_cold_sealed_incompressible_async_iops",
            ],
            &rcv,
        )?;
        let what = "random 4 KiB reads from sealed mixed chunks, RAM tier off";
        say(&format!("  {what}..."));
        figures.push(
            "rand_read_cold_sealed_iops",
            random_reads(what, &cv, 2 * GIB, secs, false)?,
        );
    }
    std::fs::remove_file(&raw_file).with_context(|| format!("removing {}", raw_file.display()))?;
    let raw_rr_cold = figures.median("raw_rand_read_iops_at_cold");
    let rand_r_cold_log = figures.median("rand_read_cold_log_iops");
    let rand_r_cold_sealed_raw = figures.median("rand_read_cold_sealed_incompressible_iops");
    let rand_r_cold_sealed = figures.median("rand_read_cold_sealed_iops");
    let rand_r_cold_log_async = figures.median("rand_read_cold_log_async_iops");
    let rand_r_cold_sealed_raw_async =
        figures.median("rand_read_cold_sealed_incompressible_async_iops");
    // How the asynchronous reads were served: on the device through the ring, or (what the
    // goal does not want) on a blocking thread.
    let async_reads = pool.stats()?.async_reads;
    drop(rcv);
    pool.delete_volume(rc.id)?;
    pool.delete_snapshot(rand_snap.id)?;
    drop(cv);
    pool.delete_volume(c.id)?;
    pool.delete_volume(vi.id)?;
    pool.delete_snapshot(snap.id)?;
    pool.checkpoint()?;
    pool.close()?;
    drop(pool);
    let pool = Pool::open(&pool_dir, opts)?;

    // 10 GiB filled, sealed, 1% rewritten in random 64 KiB pieces, sealed again.
    say(&format!(
        "{} GiB volume: fill, seal, rewrite 1%, seal again...",
        a.big_gib
    ));
    let big = a.big_gib * GIB;
    let bi = pool.create_volume("big", big, 4096)?;
    let bv = pool.open_volume(bi.id)?;
    fill(&bv, big, 11)?;
    pool.seal(bi.id)?;
    let mut r = Rng(99);
    let mut piece = aligned(64 << 10);
    for _ in 0..(big / 100 / (64 << 10)) {
        r.fill(&mut piece);
        let off = (r.next() % (big / (64 << 10))) * (64 << 10);
        bv.write(off, &piece, false)?;
    }
    bv.flush()?;
    let t = Instant::now();
    pool.seal(bi.id)?;
    let seal_1pct = t.elapsed().as_secs_f64() * 1000.0;
    pool.delete_volume(bi.id)?;
    for s in pool.snapshots()? {
        pool.delete_snapshot(s.id)?;
    }

    // Seal of an unchanged thin 100 GiB volume; clone of a 1 TiB snapshot.
    let hi = pool.create_volume("hundred", 100 * GIB, 4096)?;
    let hv = pool.open_volume(hi.id)?;
    hv.write(50 * GIB, &aligned(MIB as usize), true)?;
    pool.seal(hi.id)?;
    let t = Instant::now();
    pool.seal(hi.id)?;
    let seal_100g = t.elapsed().as_secs_f64() * 1000.0;
    let ti = pool.create_volume("tera", 1 << 40, 4096)?;
    let tv = pool.open_volume(ti.id)?;
    let mut m = Mixed::new(5);
    for i in 0..64u64 {
        let mut b = aligned(MIB as usize);
        b.copy_from_slice(&m.chunk());
        tv.write(i * (16 * GIB), &b, false)?;
    }
    let ts = pool.seal(ti.id)?;
    let t = Instant::now();
    pool.clone_snapshot(ts.id, "tera-clone")?;
    let clone_1t = t.elapsed().as_secs_f64() * 1000.0;
    close_and_remove(pool, &pool_dir)?;

    let result = json!({
        "seq_write_mib_s": seq_w,
        "seq_read_mib_s": seq_r,
        "rand_write_iops": rand_w,
        "rand_read_iops": rand_r,
        "rand_read_cold_log_iops": rand_r_cold_log,
        "rand_read_cold_sealed_iops": rand_r_cold_sealed,
        "rand_read_cold_sealed_incompressible_iops": rand_r_cold_sealed_raw,
        "raw_rand_read_iops_at_cold": raw_rr_cold,
        "rand_read_cold_log_async_iops": rand_r_cold_log_async,
        "rand_read_cold_sealed_incompressible_async_iops": rand_r_cold_sealed_raw_async,
        "ratio_rand_read_cold_log_async": rand_r_cold_log_async / raw_rr_cold,
        "ratio_rand_read_cold_sealed_incompressible_async": rand_r_cold_sealed_raw_async / raw_rr_cold,
        "cold_async_reads": async_reads,
        "seal_changed_mib_s": seal_changed,
        "seal_10g_1pct_ms": seal_1pct,
        "seal_100g_nochange_ms": seal_100g,
        "clone_1t_ms": clone_1t,
        "read_snapshot_mib_s": read_snap,
        "dedup_ratio": dedup,
        "compression_ratio": compression,
        "raw_seq_write_mib_s": raw_sw,
        "raw_seq_read_mib_s": raw_sr,
        "raw_rand_read_iops": raw_rr,
        "raw_rand_write_iops": raw_rw,
        "ratio_seq_write": seq_w / raw_sw,
        "ratio_seq_read": seq_r / raw_sr,
        "ratio_rand_read": rand_r / raw_rr,
        "ratio_rand_read_cold_log": rand_r_cold_log / raw_rr_cold,
        "ratio_rand_read_cold_sealed": rand_r_cold_sealed / raw_rr_cold,
        "ratio_rand_read_cold_sealed_incompressible": rand_r_cold_sealed_raw / raw_rr_cold,
        "ratio_rand_write": rand_w / raw_rw,
        "big_gib": a.big_gib,
        "seconds": secs,
        "rounds": rounds,
        "per_round": figures.to_json(),
    });
    if a.json {
        println!("{result}");
    } else {
        println!(
            "{:<28} {:>12} {:>12} {:>7}",
            "metric", "pool", "raw (fio)", "ratio"
        );
        for (name, p, r) in [
            ("seq write MiB/s (1 MiB)", seq_w, raw_sw),
            ("seq read MiB/s (1 MiB)", seq_r, raw_sr),
            ("rand read IOPS (4K x32)", rand_r, raw_rr),
            ("  ...log, RAM tier off", rand_r_cold_log, raw_rr_cold),
            ("    async, 1 thread", rand_r_cold_log_async, raw_rr_cold),
            (
                "  ...sealed random, off",
                rand_r_cold_sealed_raw,
                raw_rr_cold,
            ),
            (
                "    async, 1 thread",
                rand_r_cold_sealed_raw_async,
                raw_rr_cold,
            ),
            ("  ...sealed mixed, off", rand_r_cold_sealed, raw_rr_cold),
            ("rand write IOPS (4K x32)", rand_w, raw_rw),
        ] {
            println!("{name:<28} {p:>12.0} {r:>12.0} {:>7.2}", p / r);
        }
        println!(
            "{:<28} {:>12}",
            "cold async reads served",
            format!(
                "{} device, {} memory, {} blocking",
                async_reads.device, async_reads.in_memory, async_reads.blocking
            )
        );
        println!("{:<28} {:>12.0}", "seal changed data MiB/s", seal_changed);
        println!(
            "{:<28} {:>12.0}",
            format!("seal {}G after 1% ms", a.big_gib),
            seal_1pct
        );
        println!("{:<28} {:>12.1}", "seal 100G unchanged ms", seal_100g);
        println!("{:<28} {:>12.1}", "clone 1T snapshot ms", clone_1t);
        println!("{:<28} {:>12.0}", "read snapshot MiB/s (cold)", read_snap);
        println!("{:<28} {:>12.2}", "dedup ratio (mixed)", dedup);
        println!("{:<28} {:>12.2}", "compression ratio (mixed)", compression);
    }
    Ok(())
}
