//! iscsi-bench: MaaS's iSCSI target against Debian's tgt, side by side in one run.
//!
//! Both serve a 1 GiB file-backed volume on 127.0.0.1; the same userspace initiator (fio's
//! libiscsi engine, rebuilt by `scripts/iscsi-peers.sh`) drives each with the same jobs:
//! sequential 1 MiB write and read, 4 KiB random read and write at queue depth 32. Workloads
//! alternate between the two targets (MaaS, tgt, MaaS, tgt ...) so drift on a noisy machine hits
//! both alike; with `--rounds N` each figure is the median of N runs.
//!
//! `--defaults` adds, beside them, the real `maasd` started exactly as the README's first
//! command starts it (no chunk size, device size, cache or buffer settings: every figure what a
//! user gets before tuning anything), its volume exported through the REST API. Every volume is
//! filled once (sequential 1 MiB writes over all of it) before anything is measured, so reads
//! read data, not holes.
//!
//! `--json` prints `{"maas": {...}, "tgt": {...}, "ratio": {...}}`, with `--defaults` also
//! `"maasd_defaults"` and `"ratio_defaults"` (maasd on defaults / tgt).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use maas_engine::iscsi::{IscsiServer, Registry, TargetConfig};
use maas_engine::scsi::{LogicalUnit, LuIdentity};
use maas_tests::bench::{
    FioJob, Results, bench_pool, fill_iscsi, fio_bin, fio_iscsi, free_port, init_logging,
    maasd_beside_me, maasd_iscsi_url, repo_root,
};
use maas_tests::maasd::{Maasd, volume};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "iscsi-bench",
    about = "MaaS iSCSI target vs tgt, same initiator, same volume size"
)]
struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds per workload and target.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Runs of each workload per target; figures are medians.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Volume size in GiB.
    #[arg(long, default_value_t = 1)]
    size_gib: u64,
    /// Queue depth of the sequential jobs (the random ones run at 32).
    #[arg(long, default_value_t = 32)]
    seq_depth: u32,
    /// Run only these workloads (e.g. `--only rand_read_iops`); for profiling one of them.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run only MaaS (`maas`) or only tgt (`tgt`); for profiling. Ratios need both.
    #[arg(long)]
    side: Option<String>,
    /// Working directory (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also measure the real maasd on its defaults (see above).
    #[arg(long)]
    defaults: bool,
}

const MAAS_IQN: &str = "iqn.2026-11.io.maas:bench";
const TGT_IQN: &str = "iqn.2026-11.io.maas:bench-tgt";
const INITIATOR: &str = "iqn.2026-11.io.maas:bench-initiator";

struct Workload {
    key: &'static str,
    rw: &'static str,
    bs: &'static str,
    bandwidth: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        key: "seq_write_mib_s",
        rw: "write",
        bs: "1M",
        bandwidth: true,
    },
    Workload {
        key: "seq_read_mib_s",
        rw: "read",
        bs: "1M",
        bandwidth: true,
    },
    Workload {
        key: "rand_read_iops",
        rw: "randread",
        bs: "4k",
        bandwidth: false,
    },
    Workload {
        key: "rand_write_iops",
        rw: "randwrite",
        bs: "4k",
        bandwidth: false,
    },
];

/// tgt through scripts/tgt-target.sh; stopped on drop.
struct Tgt {
    port: u16,
}

impl Tgt {
    fn start(port: u16, file: &Path, size: u64) -> Result<Tgt> {
        let st = Command::new(repo_root().join("scripts/tgt-target.sh"))
            .args(["start", &port.to_string(), TGT_IQN])
            .arg(file)
            .arg(size.to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .context("starting tgt")?;
        if !st.success() {
            bail!("tgt-target.sh start failed");
        }
        Ok(Tgt { port })
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/tgt-target.sh"))
            .args(["stop", &self.port.to_string()])
            .status();
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    init_logging();
    let fio_path = fio_bin()?;
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let size = args.size_gib << 30;

    // MaaS: a pool on a file device, one volume, served by the engine's iSCSI target.
    let pool = bench_pool(&dir.join("pool"), size)?;
    let info = pool.create_volume("bench", size, 512)?;
    let vol = pool.open_volume(info.id)?;
    let lu = Arc::new(LogicalUnit::new(
        Arc::new(vol),
        LuIdentity::from_volume_id("bench"),
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let registry = Arc::new(Registry::new(None));
    registry.add(TargetConfig {
        name: MAAS_IQN.into(),
        alias: None,
        initiators: vec![INITIATOR.into()],
        chap: None,
        luns: BTreeMap::from([(0, lu)]),
    });
    let maas_port = free_port()?;
    let server = rt.block_on(IscsiServer::bind(
        &format!("127.0.0.1:{maas_port}"),
        registry,
    ))?;
    let maas_url = format!("iscsi://127.0.0.1:{maas_port}/{MAAS_IQN}/0");

    // tgtd takes its port as its control-channel number too, which must stay small.
    let tgt_port = (3270..4000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .context("no free port in 3270..4000 for tgt")?;
    let _tgt = Tgt::start(tgt_port, &dir.join("tgt.img"), size)?;
    let tgt_url = format!("iscsi://127.0.0.1:{tgt_port}/{TGT_IQN}/1");

    // maasd as a user starts it: no settings but its addresses (and HTTPS, its default).
    let maasd = if args.defaults {
        let m = Maasd::builder(maasd_beside_me()?, &dir.join("maasd"))
            .pool_defaults()
            .start();
        let vol = volume(&m, "bench", size, 512);
        let url = maasd_iscsi_url(&m, &vol, INITIATOR)?;
        Some((m, url))
    } else {
        None
    };
    let mut sides: Vec<(&str, &str)> = vec![("maas", &maas_url)];
    if let Some((_, url)) = &maasd {
        sides.push(("maasd_defaults", url));
    }
    sides.push(("tgt", &tgt_url));
    let sides: Vec<(&str, &str)> = sides
        .into_iter()
        .filter(|(name, _)| args.side.as_deref().is_none_or(|s| s == *name))
        .collect();

    // Every volume filled once: reads then read data, not holes.
    for (name, url) in &sides {
        fill_iscsi(&fio_path, url, INITIATOR, size).with_context(|| format!("filling {name}"))?;
    }

    let mut results = Results::default();
    for _ in 0..args.rounds {
        for w in &WORKLOADS {
            if !args.only.is_empty() && !args.only.iter().any(|o| o == w.key) {
                continue;
            }
            let depth = if w.bandwidth { args.seq_depth } else { 32 };
            for &(name, url) in &sides {
                let job = FioJob {
                    rw: w.rw,
                    bs: w.bs,
                    depth,
                    seconds: args.seconds,
                    size,
                };
                let r = fio_iscsi(&fio_path, url, INITIATOR, job)
                    .with_context(|| format!("{name} {}", w.key))?;
                let v = if w.bandwidth { r.mib_s } else { r.iops };
                results.push(name, w.key, v, args.json);
            }
        }
    }
    rt.block_on(server.shutdown());
    drop(rt);
    pool.close()?;
    drop(maasd);

    let fig = |name: &str, key: &str| results.median(name, key);
    let ratio = |m: f64, t: f64| {
        if t > 0.0 {
            (m / t * 100.0).round() / 100.0
        } else {
            0.0
        }
    };
    let mut out = json!({"maas": {}, "tgt": {}, "ratio": {}});
    for w in &WORKLOADS {
        let (m, t) = (fig("maas", w.key), fig("tgt", w.key));
        out["maas"][w.key] = json!((m * 10.0).round() / 10.0);
        out["tgt"][w.key] = json!((t * 10.0).round() / 10.0);
        out["ratio"][w.key] = json!(ratio(m, t));
        if args.defaults {
            let d = fig("maasd_defaults", w.key);
            out["maasd_defaults"][w.key] = json!((d * 10.0).round() / 10.0);
            out["ratio_defaults"][w.key] = json!(ratio(d, t));
        }
    }
    out["config"] = json!({
        "seconds": args.seconds, "rounds": args.rounds, "size_gib": args.size_gib,
        "seq_depth": args.seq_depth, "rand_depth": 32, "initiator": "fio libiscsi engine",
    });
    if args.json {
        println!("{out}");
    } else {
        if args.defaults {
            println!(
                "{:<18} {:>12} {:>14} {:>12} {:>8} {:>9}",
                "workload", "maas tuned", "maasd defaults", "tgt", "ratio", "defaults"
            );
        } else {
            println!(
                "{:<18} {:>12} {:>12} {:>8}",
                "workload", "maas", "tgt", "ratio"
            );
        }
        for w in &WORKLOADS {
            let r = |k: &str| out[k][w.key].as_f64().unwrap_or(0.0);
            if args.defaults {
                println!(
                    "{:<18} {:>12.1} {:>14.1} {:>12.1} {:>7.2}x {:>8.2}x",
                    w.key,
                    fig("maas", w.key),
                    fig("maasd_defaults", w.key),
                    fig("tgt", w.key),
                    r("ratio"),
                    r("ratio_defaults")
                );
            } else {
                println!(
                    "{:<18} {:>12.1} {:>12.1} {:>7.2}x",
                    w.key,
                    fig("maas", w.key),
                    fig("tgt", w.key),
                    r("ratio")
                );
            }
        }
    }
    Ok(())
}
