//! archive-bench: MaaS's archive tier against restic, on the same dataset, to the same S3
//! server (s3s-fs on 127.0.0.1), in one run.
//!
//! MaaS: the shared dataset (`../shared/datasets/mkdataset.py`) on an ext4 filesystem
//! (`mkfs.ext4 -d`), written into a MaaS volume with qemu-img over iSCSI, sealed, and pushed
//! to the bucket (`POST /snapshots/{id}/archive`). restic 0.14: `restic backup` of the same
//! directory tree to the same server. Then `mkdataset.py mutate` (the next day): the
//! filesystem is loop-mounted and brought up to date with rsync, written into the volume
//! again, sealed and pushed; restic backs up again. Then the full restore: the MaaS snapshot
//! evicted and rehydrated, against `restic restore`. Last, mounting straight from the
//! archive: the snapshot evicted again (and the ingest volume deleted, so nothing of it is
//! local), cloned (a lazy mount), and its first MiB read over iSCSI with qemu-io (time to
//! first byte), then all of it with qemu-img; against `restic dump` of the snapshot's first
//! file (restic's quickest way to a first byte).
//!
//! Reported side by side: push times (MaaS's ingest and seal apart: they are the backup, the
//! push is the tiering), objects and bytes in the bucket, the objects added by the second day,
//! restore times, and the S3 requests of each phase by type (from s3s-fs's request log).
//! `--json` prints everything as one object with the ratios (restic / MaaS for times and
//! objects: above 1 is MaaS ahead).
//!
//! Needs restic and rsync (`apt-get install restic rsync`), root (loop mount), and the release
//! maasd beside this binary (`cargo build --release -p maas-manager -p maas-tests`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use maas_tests::bench::{init_logging, maasd_beside_me, need, run};
use maas_tests::maasd::{Maasd, export, seal, volume};
use maas_tests::s3::{ACCESS_KEY, Kind, S3Server, SECRET_KEY};
use serde_json::{Value, json};

const INITIATOR: &str = "iqn.2008-11.org.linux-kvm";
const GIB: u64 = 1 << 30;

#[derive(Parser, Debug)]
#[command(
    name = "archive-bench",
    about = "MaaS archive tier vs restic, same dataset, same S3 server"
)]
struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Dataset scale (1.0: about 2.1 GB; 0.05 for a quick run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Working directory (dataset, images, S3 data, restores). Emptied first.
    #[arg(long, default_value = "/tmp/archive-bench")]
    dir: PathBuf,
    /// Archive to a target with client-side encryption (restic always encrypts: this is
    /// the like-for-like comparison).
    #[arg(long)]
    encrypt: bool,
}

fn timed(cmd: &mut Command, what: &str) -> Result<f64> {
    let t = Instant::now();
    run(cmd, what)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Where s3s-fs's request log ends now: a phase's requests are those after it.
fn log_mark(log: &Path) -> usize {
    std::fs::metadata(log)
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

/// S3 requests by type in s3s-fs's request log since byte `from`.
fn requests(log: &Path, from: usize) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut counts = BTreeMap::new();
    let new = text.get(from..).unwrap_or("");
    for line in new.lines() {
        let Some(rest) = line.split("req: Request { method: ").nth(1) else {
            continue;
        };
        let method = rest.split(',').next().unwrap_or("");
        let uri = rest
            .split("uri: ")
            .nth(1)
            .and_then(|u| u.split(',').next())
            .unwrap_or("");
        let ranged = line.contains("\"range\":");
        let kind = match method {
            "GET" if uri.contains("list-type") || uri.contains("?prefix") => "LIST",
            "GET" if ranged => "GET (ranged)",
            m => m,
        };
        *counts.entry(kind.to_string()).or_insert(0) += 1;
    }
    counts
}

fn bucket_usage(s3: &S3Server, bucket: &str) -> (u64, u64) {
    let objects = s3.list(bucket);
    (objects.len() as u64, objects.iter().map(|(_, n)| n).sum())
}

fn job_seconds(m: &Maasd, method: &str, path: &str, body: Option<Value>) -> Result<(f64, Value)> {
    let t = Instant::now();
    let (s, job) = m.call(method, path, body);
    if s != 202 {
        bail!("{path}: {s} {job}");
    }
    let j = m.wait_job(&job);
    Ok((t.elapsed().as_secs_f64(), j))
}

fn iscsi_opts(e: &Value) -> String {
    format!(
        "driver=iscsi,transport=tcp,portal={},target={},lun=0,initiator-name={INITIATOR}",
        e["portal"].as_str().unwrap_or(""),
        e["target"].as_str().unwrap_or("")
    )
}

/// Writes an image into a volume with qemu-img over iSCSI.
fn write_image(m: &Maasd, vol: &str, image: &Path) -> Result<f64> {
    let e = export(m, vol, &[INITIATOR], None);
    let opts = iscsi_opts(&e);
    let t = timed(
        Command::new(maas_tests::peers::qemu_img())
            .args(["convert", "-n", "-f", "raw", "-t", "none", "-W", "-m", "8"])
            .arg(image)
            .args(["--target-image-opts", &opts]),
        "qemu-img convert into the volume",
    )?;
    m.ok(
        "DELETE",
        &format!("/exports/{}", e["id"].as_str().unwrap_or("")),
        None,
    );
    Ok(t)
}

fn restic(port: u16, args: &[&str]) -> Command {
    let mut c = Command::new("restic");
    c.args([
        "-r",
        &format!("s3:http://127.0.0.1:{port}/restic"),
        "--quiet",
    ])
    .args(args)
    .env("RESTIC_PASSWORD", "archive-bench")
    .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    .arg("--no-cache");
    c
}

fn main() -> Result<()> {
    init_logging();
    let a = Args::parse();
    for t in ["restic", "rsync", "mkfs.ext4"] {
        need(t, "apt-get install restic rsync")?;
    }
    let dir = &a.dir;
    if dir.exists() {
        let _ = Command::new("umount").arg(dir.join("mnt")).output();
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("mnt"))?;
    let data = dir.join("data");
    let mkdataset = maas_tests::bench::dataset_script();
    eprintln!("== dataset (scale {})", a.scale);
    run(
        Command::new("python3")
            .arg(&mkdataset)
            .arg("create")
            .arg(&data)
            .args(["--scale", &a.scale.to_string()]),
        "mkdataset create",
    )?;
    let du = run(Command::new("du").args(["-sb"]).arg(&data), "du")?;
    let data_bytes: u64 = du.split_whitespace().next().unwrap_or("0").parse()?;
    let image = dir.join("fs.img");
    let image_size = (data_bytes * 3 / 2 + GIB / 2).div_ceil(GIB) * GIB;
    eprintln!("== ext4 image of {} GiB", image_size / GIB);
    run(
        Command::new("truncate")
            .arg("-s")
            .arg(image_size.to_string())
            .arg(&image),
        "truncate",
    )?;
    run(
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                "-d",
            ])
            .arg(&data)
            .arg(&image),
        "mkfs.ext4 -d",
    )?;

    let mut s3 = S3Server::start_logging_requests(Kind::S3sFs, &dir.join("s3"));
    s3.create_bucket("maas", false);
    s3.create_bucket("restic", false);
    let log = dir.join("s3.log");
    let m = Maasd::builder(maasd_beside_me()?, &dir.join("maasd"))
        .pool_defaults()
        .start();
    let (st, t) = m.call(
        "POST",
        "/archive-targets",
        Some(
            json!({"name": "bench", "endpoint": s3.endpoint(), "bucket": "maas",
                    "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY,
                    "encryption": if a.encrypt { "xchacha20-poly1305" } else { "none" }}),
        ),
    );
    if st != 201 {
        bail!("archive target: {st} {t}");
    }
    let target = t["id"].as_str().unwrap_or("").to_string();

    let mut r: BTreeMap<&str, Value> = BTreeMap::new();
    // Day 1.
    eprintln!("== day 1: MaaS");
    let vol = volume(&m, "bench", image_size, 512);
    let ingest1 = write_image(&m, &vol, &image)?;
    let mark = log_mark(&log);
    let t = Instant::now();
    let snap1 = seal(&m, &vol);
    let seal1 = t.elapsed().as_secs_f64();
    let (push1, j1) = job_seconds(
        &m,
        "POST",
        &format!("/snapshots/{snap1}/archive"),
        Some(json!({"target": target})),
    )?;
    let req_push1 = requests(&log, mark);
    let (maas_objects1, maas_bytes1) = bucket_usage(&s3, "maas");
    eprintln!("== day 1: restic");
    run(&mut restic(s3.port, &["init"]), "restic init")?;
    let mark = log_mark(&log);
    let restic1 = timed(
        restic(s3.port, &["backup", "."]).current_dir(&data),
        "restic backup",
    )?;
    let req_restic1 = requests(&log, mark);
    let (restic_objects1, restic_bytes1) = bucket_usage(&s3, "restic");

    // Day 2.
    eprintln!("== day 2: mutate");
    run(
        Command::new("python3")
            .arg(&mkdataset)
            .arg("mutate")
            .arg(&data),
        "mkdataset mutate",
    )?;
    let mnt = dir.join("mnt");
    run(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt),
        "mount -o loop",
    )?;
    let synced = run(
        Command::new("rsync")
            .args(["-a", "--delete", "--inplace", "--no-whole-file"])
            .arg(format!("{}/", data.display()))
            .arg(format!("{}/", mnt.display())),
        "rsync",
    );
    run(Command::new("umount").arg(&mnt), "umount")?;
    synced?;
    eprintln!("== day 2: MaaS");
    let ingest2 = write_image(&m, &vol, &image)?;
    let mark = log_mark(&log);
    let t = Instant::now();
    let snap2 = seal(&m, &vol);
    let seal2 = t.elapsed().as_secs_f64();
    let (push2, j2) = job_seconds(
        &m,
        "POST",
        &format!("/snapshots/{snap2}/archive"),
        Some(json!({"target": target})),
    )?;
    let req_push2 = requests(&log, mark);
    let (maas_objects2, maas_bytes2) = bucket_usage(&s3, "maas");
    eprintln!("== day 2: restic");
    let mark = log_mark(&log);
    let restic2 = timed(
        restic(s3.port, &["backup", "."]).current_dir(&data),
        "restic backup",
    )?;
    let req_restic2 = requests(&log, mark);
    let (restic_objects2, restic_bytes2) = bucket_usage(&s3, "restic");

    // Full restore of day 2.
    eprintln!("== restore: MaaS (evict, then rehydrate)");
    job_seconds(&m, "POST", &format!("/snapshots/{snap2}/evict"), None)?;
    let mark = log_mark(&log);
    let (restore_maas, _) =
        job_seconds(&m, "POST", &format!("/snapshots/{snap2}/rehydrate"), None)?;
    let req_restore_maas = requests(&log, mark);
    eprintln!("== restore: restic");
    let mark = log_mark(&log);
    let target_dir = dir.join("restic-restore");
    let restore_restic = timed(
        &mut restic(
            s3.port,
            &[
                "restore",
                "latest",
                "--target",
                &target_dir.display().to_string(),
            ],
        ),
        "restic restore",
    )?;
    let req_restore_restic = requests(&log, mark);

    // Mounted straight from the archive.
    eprintln!("== mount from the archive: MaaS (clone of the evicted snapshot, read over iSCSI)");
    m.ok("DELETE", &format!("/volumes/{vol}"), None);
    job_seconds(&m, "POST", &format!("/snapshots/{snap2}/evict"), None)?;
    let mark = log_mark(&log);
    let t = Instant::now();
    let (mount_s, jc) = job_seconds(
        &m,
        "POST",
        &format!("/snapshots/{snap2}/clones"),
        Some(json!({"name": "mounted"})),
    )?;
    let clone = jc["result"]["volume"]
        .as_str()
        .context("the clone job names no volume")?
        .to_string();
    let e = export(&m, &clone, &[INITIATOR], None);
    let opts = iscsi_opts(&e);
    run(
        Command::new(maas_tests::peers::qemu_io()).args(["--image-opts", &opts, "-c", "read 0 1M"]),
        "qemu-io read of the first MiB",
    )?;
    let first_byte_maas = t.elapsed().as_secs_f64();
    let req_first_maas = requests(&log, mark);
    let copy = dir.join("mounted.img");
    let full_read_maas = timed(
        Command::new(maas_tests::peers::qemu_img())
            .args(["convert", "-O", "raw", "-m", "8", "--image-opts", &opts])
            .arg(&copy),
        "qemu-img convert from the mounted clone",
    )?;
    let _ = std::fs::remove_file(&copy);
    eprintln!("== first byte: restic (dump of the snapshot's first file)");
    let ls = run(
        &mut restic(s3.port, &["ls", "--json", "latest"]),
        "restic ls",
    )?;
    let file = ls
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "file")
        .and_then(|v| v["path"].as_str().map(String::from))
        .context("no file in the restic snapshot")?;
    let mark = log_mark(&log);
    let first_byte_restic = timed(
        &mut restic(s3.port, &["dump", "latest", &file]),
        "restic dump",
    )?;
    let req_first_restic = requests(&log, mark);
    drop(m);
    s3.kill();

    let ratio = |restic: f64, maas: f64| if maas > 0.0 { restic / maas } else { 0.0 };
    r.insert("maas_encrypted", json!(a.encrypt));
    r.insert("dataset_bytes", json!(data_bytes));
    r.insert("image_bytes", json!(image_size));
    r.insert(
        "maas",
        json!({
            "day1": {"ingest_s": ingest1, "seal_s": seal1, "push_s": push1,
                     "objects": maas_objects1, "bytes": maas_bytes1,
                     "requests": req_push1, "job": j1["result"]},
            "day2": {"ingest_s": ingest2, "seal_s": seal2, "push_s": push2,
                     "objects_added": maas_objects2 - maas_objects1,
                     "bytes_added": maas_bytes2 - maas_bytes1,
                     "requests": req_push2, "job": j2["result"]},
            "restore": {"rehydrate_s": restore_maas, "requests": req_restore_maas},
            "mount_from_archive": {"clone_s": mount_s, "first_mib_s": first_byte_maas,
                                   "requests_to_first_mib": req_first_maas,
                                   "full_read_s": full_read_maas},
        }),
    );
    r.insert(
        "restic",
        json!({
            "day1": {"backup_s": restic1, "objects": restic_objects1, "bytes": restic_bytes1,
                     "requests": req_restic1},
            "day2": {"backup_s": restic2, "objects_added": restic_objects2 - restic_objects1,
                     "bytes_added": restic_bytes2 - restic_bytes1, "requests": req_restic2},
            "restore": {"restore_s": restore_restic, "requests": req_restore_restic},
            "first_file_dump": {"dump_s": first_byte_restic, "requests": req_first_restic},
        }),
    );
    r.insert(
        "ratio",
        json!({
            "push_day1": ratio(restic1, push1),
            "push_day2": ratio(restic2, push2),
            "objects_day1": ratio(restic_objects1 as f64, maas_objects1 as f64),
            "restore": ratio(restore_restic, restore_maas),
            "first_byte": ratio(first_byte_restic, first_byte_maas),
            "mounted_full_read_vs_restore": ratio(restore_restic, full_read_maas),
        }),
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "dataset {:.0} MiB; MaaS volume holds it on ext4 ({} GiB image); MaaS archive {}",
        mib(data_bytes),
        image_size / GIB,
        if a.encrypt {
            "encrypted (XChaCha20-Poly1305), as restic's"
        } else {
            "not encrypted (restic's is)"
        }
    );
    println!("{:<34} {:>12} {:>12} {:>8}", "", "MaaS", "restic", "ratio");
    let row = |k: &str, m: f64, rs: f64, unit: &str| {
        println!(
            "{:<34} {:>10.2}{unit:<2} {:>10.2}{unit:<2} {:>7.2}x",
            k,
            m,
            rs,
            ratio(rs, m)
        );
    };
    row("day 1 push (restic: backup)", push1, restic1, "s");
    row(
        "day 1 objects in the bucket",
        maas_objects1 as f64,
        restic_objects1 as f64,
        "",
    );
    row(
        "day 1 MiB in the bucket",
        mib(maas_bytes1),
        mib(restic_bytes1),
        "",
    );
    row("day 2 push (restic: backup)", push2, restic2, "s");
    row(
        "day 2 objects added",
        (maas_objects2 - maas_objects1) as f64,
        (restic_objects2 - restic_objects1) as f64,
        "",
    );
    row(
        "day 2 MiB added",
        mib(maas_bytes2 - maas_bytes1),
        mib(restic_bytes2 - restic_bytes1),
        "",
    );
    row(
        "full restore (rehydrate)",
        restore_maas,
        restore_restic,
        "s",
    );
    println!(
        "MaaS ingest (qemu-img over iSCSI) day 1 {ingest1:.2} s, day 2 {ingest2:.2} s; seal {seal1:.2} s, {seal2:.2} s"
    );
    row(
        "first byte (MaaS: mount+1 MiB; dump)",
        first_byte_maas,
        first_byte_restic,
        "s",
    );
    row(
        "read all of the mounted clone",
        full_read_maas,
        restore_restic,
        "s",
    );
    println!(
        "MaaS mount from the archive: clone job {mount_s:.2} s, S3 requests to the first MiB {req_first_maas:?}; restic dump {req_first_restic:?}"
    );
    println!(
        "S3 requests: MaaS push day 1 {req_push1:?}, day 2 {req_push2:?}, restore {req_restore_maas:?}"
    );
    println!(
        "S3 requests: restic backup day 1 {req_restic1:?}, day 2 {req_restic2:?}, restore {req_restore_restic:?}"
    );
    Ok(())
}
