//! What the benchmarks share: the pool they measure, fio with its libiscsi engine (from
//! `scripts/iscsi-peers.sh`) as the iSCSI load generator, and medians.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub fn cache_dir() -> PathBuf {
    std::env::var("MAAS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/maas")
        })
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// fio rebuilt with the libiscsi engine.
pub fn fio_bin() -> Result<PathBuf> {
    let p = std::env::var("MAAS_FIO_LIBISCSI")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("peers/bin/fio-libiscsi"));
    if !p.exists() {
        bail!("{} missing: run scripts/iscsi-peers.sh first", p.display());
    }
    Ok(p)
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One fio job.
#[derive(Clone, Copy, Debug)]
pub struct FioJob<'a> {
    /// fio's `--rw`.
    pub rw: &'a str,
    /// fio's `--bs`.
    pub bs: &'a str,
    pub depth: u32,
    /// Time-based run of this many seconds; 0: one pass over `size`, however long it takes.
    pub seconds: u64,
    pub size: u64,
}

/// What a fio job measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct FioResult {
    pub mib_s: f64,
    pub iops: f64,
    /// Completion latency, microseconds.
    pub lat_avg_us: f64,
    pub lat_p99_us: f64,
    /// CPU time fio's own process spent per I/O (user + system, as fio reports it),
    /// microseconds; 0 where not measured.
    pub cpu_us_per_io: f64,
}

/// Runs one fio job with the libiscsi engine against `url` as `initiator`.
pub fn fio_iscsi(fio: &Path, url: &str, initiator: &str, job: FioJob<'_>) -> Result<FioResult> {
    // fio splits filenames at ':'; libiscsi URLs need them escaped.
    let filename = url.replace(':', "\\:");
    fio_run(
        fio,
        &[
            "--ioengine=libiscsi".into(),
            format!("--filename={filename}"),
            format!("--initiator={initiator}"),
        ],
        job,
    )
}

/// Writes all `size` bytes of an iSCSI volume once (sequential 1 MiB writes at QD32), so that
/// reads measured afterwards read data, not holes.
pub fn fill_iscsi(fio: &Path, url: &str, initiator: &str, size: u64) -> Result<()> {
    let job = FioJob {
        rw: "write",
        bs: "1M",
        depth: 32,
        seconds: 0,
        size,
    };
    fio_iscsi(fio, url, initiator, job).map(|_| ())
}

/// Exports maasd's volume `vol` over iSCSI to `initiator`; returns the libiscsi URL of its LUN
/// on 127.0.0.1.
pub fn maasd_iscsi_url(m: &crate::maasd::Maasd, vol: &str, initiator: &str) -> Result<String> {
    let e = crate::maasd::export(m, vol, &[initiator], None);
    let target = e["target"].as_str().context("export without a target")?;
    let lun = e["lun"].as_u64().unwrap_or(0);
    Ok(format!("iscsi://127.0.0.1:{}/{target}/{lun}", m.iscsi_port))
}

/// Runs one fio job on a plain file with io_uring and O_DIRECT: the raw device's figure, as the
/// pool's own device I/O reaches it (the file is laid out first; `job.size` of it).
pub fn fio_file(fio: &Path, file: &Path, job: FioJob<'_>) -> Result<FioResult> {
    fio_run(
        fio,
        &[
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            format!("--filename={}", file.display()),
        ],
        job,
    )
}

fn fio_run(fio: &Path, engine: &[String], job: FioJob<'_>) -> Result<FioResult> {
    let timing = if job.seconds == 0 {
        Vec::new()
    } else {
        vec![format!("--runtime={}", job.seconds), "--time_based".into()]
    };
    let out = Command::new(fio)
        .args(timing)
        .args(engine)
        .args([
            "--name=bench",
            &format!("--rw={}", job.rw),
            &format!("--bs={}", job.bs),
            &format!("--iodepth={}", job.depth),
            &format!("--size={}", job.size),
            "--numjobs=1",
            "--randrepeat=0",
            "--output-format=json",
        ])
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notices before the JSON document.
    let start = text.find('{').context("no JSON from fio")?;
    let v: Value = serde_json::from_str(&text[start..]).context("parsing fio JSON")?;
    let j = &v["jobs"][0];
    if j["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio job error {}", j["error"]);
    }
    let side = if job.rw.contains("write") {
        &j["write"]
    } else {
        &j["read"]
    };
    let clat = &side["clat_ns"];
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let ios = f(&side["total_ios"]);
    let cpu_seconds = (f(&j["usr_cpu"]) + f(&j["sys_cpu"])) / 100.0 * f(&j["job_runtime"]) / 1000.0;
    Ok(FioResult {
        mib_s: f(&side["bw_bytes"]) / (1024.0 * 1024.0),
        iops: f(&side["iops"]),
        lat_avg_us: f(&clat["mean"]) / 1000.0,
        lat_p99_us: f(&clat["percentile"]["99.000000"]) / 1000.0,
        cpu_us_per_io: if ios > 0.0 {
            cpu_seconds / ios * 1e6
        } else {
            0.0
        },
    })
}

/// The pool a benchmark measures: one sparse file device 16 times the volume (the log-structured
/// pool needs room for the log between folds, as any pool does for a volume overwritten again
/// and again), and a RAM tier as large as the volume.
pub fn bench_pool(dir: &Path, size: u64) -> Result<maas_pool::Pool> {
    bench_pool_ram(dir, size, (size + (256 << 20)) as usize)
}

/// As [`bench_pool`] with a RAM tier of `ram` bytes for each of its parts; 0 turns it off, so
/// that every read goes to the device (the data is written through the log at once).
pub fn bench_pool_ram(dir: &Path, size: u64, ram: usize) -> Result<maas_pool::Pool> {
    Ok(maas_pool::Pool::create(
        dir,
        maas_pool::CreateOptions {
            devices: vec![maas_pool::DeviceSpec {
                path: "data-0.dev".into(),
                tier: maas_pool::Tier::Ssd,
                size: size * 16,
            }],
            ..Default::default()
        },
        maas_pool::OpenOptions {
            background: true,
            // The peers read through the kernel's page cache, which holds the whole volume
            // here; the RAM tier gets the same room, for recently written blocks and for sealed
            // chunks (what the background fold turns them into once the log grows).
            log_cache_bytes: ram,
            cache_bytes: ram,
            // The peers' page cache also holds the volume's dirty pages until the kernel's
            // writeback (up to 30 s); the write buffer holds as much, for at most 5 s.
            write_buffer_bytes: ram,
            // Fold (hash + compress into sealed chunks, at low CPU priority) when space asks for
            // it, not at a fixed log size: seals are not part of these benchmarks.
            wal_fold_threshold: u64::MAX,
            ..Default::default()
        },
    )?)
}

/// The logs of the code under test on stderr, when `RUST_LOG` asks for them.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
}

/// Measurements per side (e.g. "maas", "tgt") and figure, over rounds.
#[derive(Debug, Default)]
pub struct Results(
    std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<f64>>>,
);

impl Results {
    /// Records one measurement (and shows it on stderr unless `quiet`).
    pub fn push(&mut self, side: &str, key: &str, v: f64, quiet: bool) {
        if !quiet {
            eprintln!("{side:>8} {key:<18} {v:>10.1}");
        }
        self.0
            .entry(side.to_string())
            .or_default()
            .entry(key.to_string())
            .or_default()
            .push(v);
    }

    /// The median of a figure's rounds (0 if it was not measured).
    pub fn median(&self, side: &str, key: &str) -> f64 {
        median(
            self.0
                .get(side)
                .and_then(|r| r.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    }
}

/// Runs a command to completion; its standard output, or an error with everything it printed.
pub fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails unless `tool` is on the PATH, saying how to install it (`install`).
pub fn need(tool: &str, install: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()));
    if !found {
        bail!("{tool} is missing: {install}");
    }
    Ok(())
}

/// The benchmark dataset's generator: `MAAS_DATASET_SCRIPT` if set, else the steering
/// repository's `../shared/datasets/mkdataset.py` beside this repository, else the copy in
/// `tests/data/` (a clone on its own, as CI has it).
pub fn dataset_script() -> PathBuf {
    if let Some(p) = std::env::var_os("MAAS_DATASET_SCRIPT") {
        return PathBuf::from(p);
    }
    let shared = repo_root().join("../shared/datasets/mkdataset.py");
    if shared.is_file() {
        return shared;
    }
    repo_root().join("tests/data/mkdataset.py")
}

/// The `maasd` binary beside this one (built if missing), or `MAAS_MAASD_BIN`.
pub fn maasd_beside_me() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MAAS_MAASD_BIN") {
        return Ok(PathBuf::from(p));
    }
    beside_me("maas-manager", "maasd")
}

/// The `maas-probe` binary beside this one (built if missing), or `MAAS_PROBE_BIN`.
pub fn probe_beside_me() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MAAS_PROBE_BIN") {
        return Ok(PathBuf::from(p));
    }
    beside_me("maas-probe", "maas-probe")
}

fn beside_me(package: &str, name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no directory above this binary")?;
    let bin = dir.join(name);
    if !bin.is_file() {
        let target = dir
            .parent()
            .context("no target directory above this binary")?;
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(repo_root())
            .env("CARGO_TARGET_DIR", target)
            .args(["build", "-q", "-p", package, "--bin", name]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().with_context(|| format!("building {name}"))?;
        if !st.success() || !bin.is_file() {
            bail!("building {} failed ({st})", bin.display());
        }
    }
    Ok(bin)
}
