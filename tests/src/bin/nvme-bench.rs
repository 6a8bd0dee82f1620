//! nvme-bench: MaaS's NVMe/TCP target against its own iSCSI target, on the same volume, side by
//! side in one run.
//!
//! One pool volume (1 GiB by default) is exported over both protocols by the engine's targets on
//! 127.0.0.1. NVMe/TCP is driven by a load generator on our host-side NVMe/TCP codec (this
//! binary's `load` subcommand, in its own process as fio is), iSCSI by fio's libiscsi engine,
//! with the same jobs: 1 MiB sequential write and read and 4 KiB random read and write at queue
//! depth 32, and 4 KiB reads at queue depth 1 for latency (average and p99). Workloads
//! alternate between the protocols so drift on a noisy machine hits both alike; with
//! `--rounds N` each figure is the median of N runs. Loopback TCP's own limit (iperf3) is
//! printed beside them.
//!
//! `--defaults` adds, beside them, the real `maasd` started exactly as the README's first
//! command starts it plus NVMe/TCP switched on (no chunk size, device size, cache or buffer
//! settings), one volume exported through the REST API over both NVMe/TCP and iSCSI and filled
//! once (sequential 1 MiB writes over all of it) before anything is measured.
//!
//! `--json` prints `{"nvme_tcp": {...}, "iscsi": {...}, "ratio": {...}, "loopback_tcp_gbit_s": x}`,
//! with `--defaults` also `"maasd_nvme_tcp"`, `"maasd_iscsi"` and `"ratio_defaults"` (the same
//! ratios between maasd's two targets on defaults).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use maas_engine::iscsi::{IscsiServer, TargetConfig};
use maas_engine::nvme::spec::{Sqe, io, le32};
use maas_engine::nvme::tcp::client::{Client, ClientOptions};
use maas_engine::nvme::{
    Namespace, NamespaceIdentity, NvmeTcpServer, QueueConfig, SubsystemConfig,
};
use maas_engine::scsi::{LogicalUnit, LuIdentity};
use maas_tests::bench::{
    FioJob, FioResult, Results, bench_pool, bench_pool_ram, fill_iscsi, fio_bin, fio_file,
    fio_iscsi, free_port, init_logging, maasd_beside_me, maasd_iscsi_url,
};
use maas_tests::maasd::{Maasd, nvme_export, volume};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(
    name = "nvme-bench",
    about = "MaaS NVMe/TCP vs MaaS iSCSI, same volume, side by side"
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds per workload and protocol.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Runs of each workload per protocol; figures are medians.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Volume size in GiB.
    #[arg(long, default_value_t = 1)]
    size_gib: u64,
    /// Run only these workloads (e.g. `--only qd1_read`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// NVMe/TCP header and data digests on (CRC32C).
    #[arg(long)]
    digests: bool,
    /// Working directory (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Reads that miss RAM: the measured pool's RAM tier off (every read goes to the device),
    /// the volume filled once first, and fio's random read on a file of the same disk
    /// (io_uring, O_DIRECT) printed beside, as the device's own limit.
    #[arg(long)]
    cold: bool,
    /// Also measure the real maasd on its defaults, NVMe/TCP on (see above).
    #[arg(long)]
    defaults: bool,
    /// Threads (single-threaded runtimes) serving the in-process targets' connections
    /// (default: one per core, as maasd's).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    target_workers: Option<u16>,
}

/// How one side of the comparison is reached.
enum Side {
    Nvme { addr: String, nqn: String },
    Iscsi { url: String },
}

/// Which process serves a side: this one (the in-process targets) or a maasd.
#[derive(Clone, Copy)]
enum Server {
    Me,
    Pid(u32),
}

impl Server {
    fn cpu_seconds(self) -> f64 {
        match self {
            Server::Me => rusage_seconds(libc::RUSAGE_SELF),
            Server::Pid(p) => process_cpu_seconds(p),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The NVMe/TCP load generator (run by the benchmark in its own process).
    Load(LoadArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct LoadArgs {
    #[arg(long)]
    addr: String,
    #[arg(long)]
    nqn: String,
    #[arg(long)]
    hostnqn: String,
    /// read, write, randread or randwrite.
    #[arg(long)]
    rw: String,
    /// Block size in bytes.
    #[arg(long)]
    bs: usize,
    #[arg(long)]
    depth: usize,
    #[arg(long)]
    seconds: u64,
    /// Bytes of the namespace to cover.
    #[arg(long)]
    size: u64,
    #[arg(long)]
    digests: bool,
}

const SUBNQN: &str = "nqn.2026-11.io.maas:bench";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:6d616173-0000-4000-8000-62656e636821";
const IQN: &str = "iqn.2026-11.io.maas:bench";
const INITIATOR: &str = "iqn.2026-11.io.maas:bench-initiator";

struct Workload {
    key: &'static str,
    rw: &'static str,
    bs: usize,
    depth: u32,
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        key: "seq_write",
        rw: "write",
        bs: 1 << 20,
        depth: 32,
    },
    Workload {
        key: "seq_read",
        rw: "read",
        bs: 1 << 20,
        depth: 32,
    },
    Workload {
        key: "rand_read",
        rw: "randread",
        bs: 4096,
        depth: 32,
    },
    Workload {
        key: "rand_write",
        rw: "randwrite",
        bs: 4096,
        depth: 32,
    },
    Workload {
        key: "qd1_read",
        rw: "randread",
        bs: 4096,
        depth: 1,
    },
];

/// The figures a workload contributes: (JSON key, value).
fn figures(w: &Workload, r: &FioResult) -> Vec<(&'static str, f64)> {
    match w.key {
        "seq_write" => vec![("seq_write_mib_s", r.mib_s)],
        "seq_read" => vec![("seq_read_mib_s", r.mib_s)],
        "rand_read" => vec![("rand_read_iops", r.iops)],
        "rand_write" => vec![("rand_write_iops", r.iops)],
        _ => vec![
            ("qd1_read_us_avg", r.lat_avg_us),
            ("qd1_read_us_p99", r.lat_p99_us),
        ],
    }
}

const KEYS: [&str; 8] = [
    "seq_write_mib_s",
    "seq_read_mib_s",
    "rand_read_iops",
    "rand_write_iops",
    "qd1_read_us_avg",
    "qd1_read_us_p99",
    "rand_read_cpu_us_target",
    "rand_read_cpu_us_initiator",
];

/// CPU time (user + system), seconds, of `who` (`RUSAGE_SELF` or `RUSAGE_CHILDREN`: the
/// children waited for so far, the load generator and fio).
fn rusage_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the struct we own; zeroed is a valid rusage.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage.
    if unsafe { libc::getrusage(who, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// CPU time, seconds, of process `pid` (from /proc; 0 if unreadable).
fn process_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The fields after the command name (which may hold spaces) follow its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat: 12th and 13th after the name.
    (ticks(11) + ticks(12)) / hz
}

fn main() -> Result<()> {
    let args = Args::parse();
    init_logging();
    match &args.cmd {
        Some(Cmd::Load(l)) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(load(l.clone()))?;
            println!(
                "{}",
                json!({"mib_s": r.mib_s, "iops": r.iops, "lat_avg_us": r.lat_avg_us, "lat_p99_us": r.lat_p99_us})
            );
            Ok(())
        }
        None => bench(&args),
    }
}

fn bench(args: &Args) -> Result<()> {
    let fio_path = fio_bin()?;
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let size = args.size_gib << 30;
    let pool = if args.cold {
        bench_pool_ram(&dir.join("pool"), size, 0)?
    } else {
        bench_pool(&dir.join("pool"), size)?
    };
    let info = pool.create_volume("bench", size, 512)?;
    let vol = Arc::new(pool.open_volume(info.id)?);
    if let Some(n) = args.target_workers {
        maas_engine::io_runtimes::set_threads(usize::from(n));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    // The same volume behind both targets.
    let iscsi_reg = Arc::new(maas_engine::iscsi::Registry::new(None));
    iscsi_reg.add(TargetConfig {
        name: IQN.into(),
        alias: None,
        initiators: vec![INITIATOR.into()],
        chap: None,
        luns: BTreeMap::from([(
            0,
            Arc::new(LogicalUnit::new(
                vol.clone(),
                LuIdentity::from_volume_id("bench"),
            )),
        )]),
    });
    let iscsi_port = free_port()?;
    let iscsi = rt.block_on(IscsiServer::bind(
        &format!("127.0.0.1:{iscsi_port}"),
        iscsi_reg,
    ))?;
    let iscsi_url = format!("iscsi://127.0.0.1:{iscsi_port}/{IQN}/0");

    let nvme_reg = Arc::new(maas_engine::nvme::Registry::new(None));
    nvme_reg.add(SubsystemConfig {
        nqn: SUBNQN.into(),
        hosts: vec![HOSTNQN.into()],
        namespaces: BTreeMap::from([(
            1,
            Arc::new(Namespace::new(
                vol.clone(),
                false,
                NamespaceIdentity::from_volume_id("bench"),
            )),
        )]),
        serial: "bench".into(),
        model: "MaaS bench".into(),
        dhchap: None,
    });
    let nvme_port = free_port()?;
    let nvme = rt.block_on(NvmeTcpServer::bind(
        &format!("127.0.0.1:{nvme_port}"),
        nvme_reg,
        QueueConfig::default(),
    ))?;
    let nvme_addr = format!("127.0.0.1:{nvme_port}");

    let loopback = iperf3_gbit_s().unwrap_or_else(|e| {
        eprintln!("loopback TCP not measured: {e:#}");
        0.0
    });
    // maasd as a user starts it (plus NVMe/TCP): one volume behind both of its targets.
    let maasd = if args.defaults {
        let m = Maasd::builder(maasd_beside_me()?, &dir.join("maasd"))
            .pool_defaults()
            .nvme_tcp()
            .start();
        let v = volume(&m, "bench", size, 512);
        let n = nvme_export(&m, &v, &[HOSTNQN]);
        let nqn = n["target"]
            .as_str()
            .context("NVMe export without a subsystem")?;
        let port = m.nvme_port.context("maasd without an NVMe/TCP port")?;
        let url = maasd_iscsi_url(&m, &v, INITIATOR)?;
        fill_iscsi(&fio_path, &url, INITIATOR, size).context("filling maasd's volume")?;
        let pid = Server::Pid(m.pid().context("maasd without a pid")?);
        let sides = [
            (
                "maasd_nvme_tcp",
                pid,
                Side::Nvme {
                    addr: format!("127.0.0.1:{port}"),
                    nqn: nqn.to_string(),
                },
            ),
            ("maasd_iscsi", pid, Side::Iscsi { url }),
        ];
        Some((m, sides))
    } else {
        None
    };
    let mut sides: Vec<(&str, Server, Side)> = vec![
        (
            "nvme_tcp",
            Server::Me,
            Side::Nvme {
                addr: nvme_addr.clone(),
                nqn: SUBNQN.to_string(),
            },
        ),
        (
            "iscsi",
            Server::Me,
            Side::Iscsi {
                url: iscsi_url.clone(),
            },
        ),
    ];
    let maasd = maasd.map(|(m, extra)| {
        sides.extend(extra);
        m
    });

    if args.cold {
        fill_iscsi(&fio_path, &iscsi_url, INITIATOR, size).context("filling the volume")?;
    }
    // The raw device's random read, measured in every round beside the targets (this machine's
    // disk speed drifts by a third within minutes): the ratios use the median.
    let raw_device = |results: &mut Results| -> Result<()> {
        let raw = fio_file(
            &fio_path,
            &dir.join("fio.raw"),
            FioJob {
                rw: "randread",
                bs: "4k",
                depth: 32,
                seconds: args.seconds,
                size,
            },
        )
        .context("fio on the raw device")?;
        std::fs::remove_file(dir.join("fio.raw"))?;
        results.push("raw_device", "rand_read_iops", raw.iops, args.json);
        // What the device alone costs a thread per read (fio's process): the part of a
        // target's cost per cold read that no target can avoid.
        results.push(
            "raw_device",
            "rand_read_cpu_us",
            raw.cpu_us_per_io,
            args.json,
        );
        Ok(())
    };

    let me = std::env::current_exe()?;
    let mut results = Results::default();
    for round in 0..args.rounds {
        for w in &WORKLOADS {
            if !args.only.is_empty() && !args.only.iter().any(|o| o == w.key) {
                continue;
            }
            if args.cold && w.key == "rand_read" {
                raw_device(&mut results)?;
            }
            // Each round starts with the next side: background work one side's writes set off
            // (maasd folds its log past 2 GiB, for one) lands on each side in turn rather than
            // always on the one after it.
            let n = sides.len();
            for (name, server, side) in sides.iter().cycle().skip(round % n).take(n) {
                let (target0, initiator0) =
                    (server.cpu_seconds(), rusage_seconds(libc::RUSAGE_CHILDREN));
                let r = match side {
                    Side::Nvme { addr, nqn } => run_load(&me, addr, nqn, w, args, size),
                    Side::Iscsi { url } => {
                        let job = FioJob {
                            rw: w.rw,
                            bs: if w.bs == 4096 { "4k" } else { "1M" },
                            depth: w.depth,
                            seconds: args.seconds,
                            size,
                        };
                        fio_iscsi(&fio_path, url, INITIATOR, job)
                    }
                }
                .with_context(|| format!("{name} {}", w.key))?;
                for (k, v) in figures(w, &r) {
                    results.push(name, k, v, args.json);
                }
                // CPU per I/O of the target's process and of the initiator's (the load
                // generator or fio): on a machine where both share the cores, what bounds the
                // IOPS of each protocol.
                let ios = r.iops * args.seconds as f64;
                if w.key == "rand_read" && ios > 0.0 {
                    let target = server.cpu_seconds() - target0;
                    let initiator = rusage_seconds(libc::RUSAGE_CHILDREN) - initiator0;
                    results.push(
                        name,
                        "rand_read_cpu_us_target",
                        target / ios * 1e6,
                        args.json,
                    );
                    let per = initiator / ios * 1e6;
                    results.push(name, "rand_read_cpu_us_initiator", per, args.json);
                }
            }
        }
    }
    rt.block_on(nvme.shutdown());
    rt.block_on(iscsi.shutdown());
    drop(rt);
    drop(vol);
    pool.close()?;
    drop(maasd);

    let fig = |side: &str, key: &str| results.median(side, key);
    let raw_rand_read = fig("raw_device", "rand_read_iops");
    let round1 = |v: f64| (v * 10.0).round() / 10.0;
    // Ratios read "NVMe/TCP is x times better": for latencies and CPU per I/O, iSCSI's over
    // ours.
    let ratio = |k: &str, n: f64, i: f64| {
        let r = if k.contains("_us") {
            if n > 0.0 { i / n } else { 0.0 }
        } else if i > 0.0 {
            n / i
        } else {
            0.0
        };
        json!((r * 100.0).round() / 100.0)
    };
    let mut out = json!({"nvme_tcp": {}, "iscsi": {}, "ratio": {}});
    for k in KEYS {
        let (n, i) = (fig("nvme_tcp", k), fig("iscsi", k));
        out["nvme_tcp"][k] = json!(round1(n));
        out["iscsi"][k] = json!(round1(i));
        out["ratio"][k] = ratio(k, n, i);
        if args.defaults {
            let (n, i) = (fig("maasd_nvme_tcp", k), fig("maasd_iscsi", k));
            out["maasd_nvme_tcp"][k] = json!(round1(n));
            out["maasd_iscsi"][k] = json!(round1(i));
            out["ratio_defaults"][k] = ratio(k, n, i);
        }
    }
    out["loopback_tcp_gbit_s"] = json!(round1(loopback));
    if args.cold {
        let of_raw = |side: &str| {
            let v = fig(side, "rand_read_iops") / raw_rand_read.max(1.0);
            json!((v * 100.0).round() / 100.0)
        };
        out["raw_device"] = json!({
            "rand_read_iops": round1(raw_rand_read),
            "rand_read_cpu_us": round1(fig("raw_device", "rand_read_cpu_us")),
        });
        // How the targets' reads were served: a read that misses RAM should wait for the
        // device asynchronously, not on a blocking thread.
        let served = pool.stats()?.async_reads;
        out["async_reads"] = json!({
            "in_memory": served.in_memory,
            "device": served.device,
            "blocking": served.blocking,
        });
        out["of_raw_device"] = json!({
            "nvme_tcp_rand_read": of_raw("nvme_tcp"),
            "iscsi_rand_read": of_raw("iscsi"),
        });
    }
    out["config"] = json!({
        "seconds": args.seconds, "rounds": args.rounds, "size_gib": args.size_gib,
        "digests": args.digests, "queues": 1, "cold": args.cold, "target_workers": args.target_workers,
        "nvme_host": "nvme-bench load (our NVMe/TCP host codec)",
        "iscsi_initiator": "fio libiscsi engine",
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "{:<18} {:>12} {:>12} {:>8}",
            "figure", "nvme_tcp", "iscsi", "ratio"
        );
        let mut groups = vec![("", "nvme_tcp", "iscsi", "ratio")];
        if args.defaults {
            groups.push((
                "maasd on defaults:",
                "maasd_nvme_tcp",
                "maasd_iscsi",
                "ratio_defaults",
            ));
        }
        for (title, n, i, r) in groups {
            if !title.is_empty() {
                println!("{title}");
            }
            for k in KEYS {
                println!(
                    "{k:<18} {:>12.1} {:>12.1} {:>7.2}x",
                    fig(n, k),
                    fig(i, k),
                    out[r][k].as_f64().unwrap_or(0.0)
                );
            }
        }
        println!("loopback TCP (iperf3): {loopback:.1} Gbit/s");
        if args.cold {
            println!(
                "raw device random read (fio io_uring O_DIRECT, 4k x32): {raw_rand_read:.0} IOPS \
                 at {:.1} µs of fio's CPU per read; NVMe/TCP {:.2}x, iSCSI {:.2}x of it",
                fig("raw_device", "rand_read_cpu_us"),
                out["of_raw_device"]["nvme_tcp_rand_read"]
                    .as_f64()
                    .unwrap_or(0.0),
                out["of_raw_device"]["iscsi_rand_read"]
                    .as_f64()
                    .unwrap_or(0.0)
            );
            let r = &out["async_reads"];
            println!(
                "reads the targets served: {} from memory, {} waiting for the device \
                 asynchronously, {} on blocking threads",
                r["in_memory"], r["device"], r["blocking"]
            );
        }
    }
    Ok(())
}

/// Runs the NVMe/TCP load generator in its own process.
fn run_load(
    me: &std::path::Path,
    addr: &str,
    nqn: &str,
    w: &Workload,
    args: &Args,
    size: u64,
) -> Result<FioResult> {
    let mut cmd = Command::new(me);
    cmd.args([
        "load",
        "--addr",
        addr,
        "--nqn",
        nqn,
        "--hostnqn",
        HOSTNQN,
        "--rw",
        w.rw,
        "--bs",
        &w.bs.to_string(),
        "--depth",
        &w.depth.to_string(),
        "--seconds",
        &args.seconds.to_string(),
        "--size",
        &size.to_string(),
    ]);
    if args.digests {
        cmd.arg("--digests");
    }
    let out = cmd.output().context("running the load generator")?;
    if !out.status.success() {
        bail!(
            "load generator failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("load generator output")?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok(FioResult {
        mib_s: f("mib_s"),
        iops: f("iops"),
        lat_avg_us: f("lat_avg_us"),
        lat_p99_us: f("lat_p99_us"),
        cpu_us_per_io: 0.0,
    })
}

/// Keeps `depth` commands in flight on one I/O queue for `seconds`.
async fn load(a: LoadArgs) -> Result<FioResult> {
    let opts = ClientOptions {
        hostnqn: a.hostnqn.clone(),
        header_digest: a.digests,
        data_digest: a.digests,
        kato_ms: 30_000,
        ..ClientOptions::default()
    };
    let mut admin = Client::connect(&a.addr, &a.nqn, 0, 0xffff, &opts).await?;
    admin.enable().await?;
    let id = admin.identify(1, 0).await?;
    let in_capsule = (le32(&id, 1792) as usize * 16).saturating_sub(64);
    let ns = admin.identify(0, 1).await?;
    let block = 1usize << ns[130];
    let mut q = Client::connect(&a.addr, &a.nqn, 1, admin.cntlid, &opts).await?;
    q.set_in_capsule(in_capsule);
    let write = a.rw.contains("write");
    let random = a.rw.starts_with("rand");
    let blocks_per_io = (a.bs / block) as u64;
    let slots = (a.size / a.bs as u64).max(1);
    let data = Arc::new(
        (0..a.bs)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut seq = 0u64;
    let mut next_slot = || {
        if random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % slots
        } else {
            let s = seq % slots;
            seq += 1;
            s
        }
    };
    let mut started: HashMap<u16, Instant> = HashMap::new();
    let mut lats: Vec<u32> = Vec::with_capacity(1 << 20);
    let (mut ops, mut bytes) = (0u64, 0u64);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(a.seconds);
    loop {
        while q.outstanding() < a.depth && Instant::now() < end {
            let slba = next_slot() * blocks_per_io;
            let op = if write { io::WRITE } else { io::READ };
            let sqe = Sqe::block_io(op, 0, 1, slba, blocks_per_io as u32);
            let cid = if write {
                q.submit(sqe, Some(data.clone()), 0).await?
            } else {
                q.submit(sqe, None, a.bs).await?
            };
            started.insert(cid, Instant::now());
        }
        if q.outstanding() == 0 {
            break;
        }
        let done = q.next().await?;
        if !done.cqe.status.is_success() {
            bail!("I/O failed: {:?}", done.cqe.status);
        }
        if let Some(t) = started.remove(&done.cqe.cid) {
            lats.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        }
        ops += 1;
        bytes += a.bs as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    lats.sort_unstable();
    let avg = lats.iter().map(|&l| f64::from(l)).sum::<f64>() / lats.len().max(1) as f64;
    let p99 = lats
        .get((lats.len() * 99 / 100).min(lats.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0);
    Ok(FioResult {
        mib_s: bytes as f64 / secs / (1024.0 * 1024.0),
        iops: ops as f64 / secs,
        lat_avg_us: avg,
        lat_p99_us: f64::from(p99),
        cpu_us_per_io: 0.0,
    })
}

/// Loopback TCP throughput with iperf3 (from `scripts/iscsi-peers.sh`), Gbit/s.
fn iperf3_gbit_s() -> Result<f64> {
    let port = free_port()?;
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 (scripts/iscsi-peers.sh installs it)")?;
    let mut out = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let o = Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", "3", "-J"])
            .output()?;
        if o.status.success() {
            out = Some(o);
            break;
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let out = out.context("iperf3 client never connected")?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9)
}
