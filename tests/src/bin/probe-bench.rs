//! probe-bench: the MaaS probe against restic and borg, on the same dataset, on the same disk,
//! in one run.
//!
//! The shared dataset (`../shared/datasets/mkdataset.py`, about 2.1 GB at scale 1.0) is backed
//! up by each tool, then `mkdataset.py mutate` (the next day) and backed up again. MaaS:
//! `maas-probe backup` with its userspace attach (NVMe/TCP in the probe, FUSE, a loop device;
//! this machine has no kernel initiator) into a release `maasd` on 127.0.0.1 whose pool is a
//! file on the same disk; the time includes the seal. restic 0.14 and borg 1.2: their local
//! repositories on the same disk, with their default settings (restic: zstd "auto"
//! compression and AES; borg: repokey encryption and lz4).
//!
//! Reported: both backups' times; bytes stored after both (the pool's stored bytes against
//! each repository's size on disk); a full restore (`maas-probe restore --path /`, `restic
//! restore`, `borg extract`); and time to the first byte of a file from a mounted snapshot
//! (`maas-probe mount` then one read, against `restic dump` and `borg extract --stdout`, each
//! tool's quickest way to one file's first byte). Page caches are dropped before every timed
//! step. `--json` prints one object with the ratios (peer / MaaS: above 1 is MaaS ahead).
//!
//! Needs restic, borg and rsync (`apt-get install restic borgbackup rsync`), root (FUSE, loop
//! devices, mounts), and the release binaries beside this one (`cargo build --release -p
//! maas-manager -p maas-probe -p maas-tests`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use maas_tests::bench::{init_logging, maasd_beside_me, need, probe_beside_me, run};
use maas_tests::maasd::Maasd;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(
    name = "probe-bench",
    about = "MaaS probe vs restic and borg, same dataset, same disk"
)]
struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Dataset scale (1.0: about 2.1 GB; 0.05 for a quick run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Working directory (dataset, pool, repositories, restores). Emptied first.
    #[arg(long, default_value = "/tmp/probe-bench")]
    dir: PathBuf,
}

/// Drops the page cache (after writing back), so every tool reads the dataset from disk.
fn cold() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn timed(cmd: &mut Command, what: &str) -> Result<(f64, String)> {
    cold();
    let t = Instant::now();
    let out = run(cmd, what)?;
    Ok((t.elapsed().as_secs_f64(), out))
}

fn du_bytes(p: &Path) -> Result<u64> {
    let out = run(
        Command::new("du").args(["-s", "--block-size=1"]).arg(p),
        "du",
    )?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du printed no size")
}

fn mkdataset(args: &[&str]) -> Result<()> {
    let script = maas_tests::bench::dataset_script();
    run(
        Command::new("python3").arg(&script).args(args),
        "mkdataset.py",
    )?;
    Ok(())
}

/// A regular file of the dataset (the first, in sorted order, of a few KiB or more).
fn some_file(root: &Path) -> Result<PathBuf> {
    let out = run(
        Command::new("sh").arg("-c").arg(format!(
            "cd {} && find . -type f -size +4k | sort | head -n 1",
            root.display()
        )),
        "find",
    )?;
    let rel = out.trim().trim_start_matches("./");
    if rel.is_empty() {
        bail!("no file in {}", root.display());
    }
    Ok(PathBuf::from(rel))
}

fn first_byte_of(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut b = [0u8; 1];
    f.read_exact(&mut b)?;
    Ok(())
}

struct Probe {
    bin: PathBuf,
    env: Vec<(String, String)>,
}

impl Probe {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).arg("--json");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }
    fn json(&self, args: &[&str]) -> Result<(f64, Value)> {
        let (t, out) = timed(&mut self.cmd(args), &format!("maas-probe {args:?}"))?;
        Ok((t, serde_json::from_str(&out).context("maas-probe JSON")?))
    }
}

fn main() -> Result<()> {
    init_logging();
    let a = Args::parse();
    for t in ["restic", "borg", "rsync"] {
        need(t, "apt-get install restic borgbackup rsync")?;
    }
    let dir = a.dir.clone();
    if dir.exists() {
        // A previous run may have left a mount under it.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {0}[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l",
                dir.display()
            ))
            .status();
        std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let ds = dir.join("dataset");
    let scale = a.scale.to_string();
    eprintln!("== dataset (scale {scale})");
    mkdataset(&["create", &ds.display().to_string(), "--scale", &scale])?;
    let ds_bytes = du_bytes(&ds)?;

    let device = (ds_bytes * 6).max(4 << 30);
    let m = Maasd::builder(maasd_beside_me()?, &dir.join("maasd"))
        .pool_defaults()
        .device_size(device)
        .nvme_tcp_advertise("")
        .plain_http()
        .start();
    let probe = Probe {
        bin: probe_beside_me()?,
        env: {
            let mut e = m.maasctl_env();
            e.push((
                "MAAS_PROBE_STATE_DIR".into(),
                dir.join("probe").display().to_string(),
            ));
            e
        },
    };
    let restic_repo = dir.join("restic");
    let borg_repo = dir.join("borg");
    // The peers' passwords for this throwaway run.
    let restic = |args: &[&str]| {
        let mut c = Command::new("restic");
        c.arg("-q")
            .arg("-r")
            .arg(&restic_repo)
            .args(args)
            .env("RESTIC_PASSWORD", "bench");
        c
    };
    let borg = |args: &[&str]| {
        let mut c = Command::new("borg");
        c.args(args)
            .env("BORG_PASSPHRASE", "bench")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes");
        c
    };
    run(&mut restic(&["init"]), "restic init")?;
    run(
        &mut borg(&["init", "-e", "repokey", &borg_repo.display().to_string()]),
        "borg init",
    )?;
    let src = ds.display().to_string();
    let borg_archive = |n: &str| format!("{}::{n}", borg_repo.display());

    let mut rows: Vec<(&str, f64, f64, f64)> = Vec::new();
    eprintln!("== day 1 backups");
    let (maas1, b1) = probe.json(&["backup", "--volume", "bench", "--source", &src])?;
    let (restic1, _) = timed(&mut restic(&["backup", &src]), "restic backup")?;
    let (borg1, _) = timed(
        // borg archives paths as given: from inside the dataset, like restic's tree.
        borg(&["create", &borg_archive("day1"), "."]).current_dir(&ds),
        "borg create",
    )?;
    rows.push(("backup day 1 (s)", maas1, restic1, borg1));

    eprintln!("== mutate, day 2 backups");
    mkdataset(&["mutate", &src])?;
    let (maas2, b2) = probe.json(&["backup", "--volume", "bench", "--source", &src])?;
    let (restic2, _) = timed(&mut restic(&["backup", &src]), "restic backup")?;
    let (borg2, _) = timed(
        borg(&["create", &borg_archive("day2"), "."]).current_dir(&ds),
        "borg create",
    )?;
    rows.push(("backup day 2 (s)", maas2, restic2, borg2));

    let pools = m.ok("GET", "/pools", None);
    let maas_stored = pools["items"][0]["stored_bytes"].as_u64().unwrap_or(0);
    let restic_stored = du_bytes(&restic_repo)?;
    let borg_stored = du_bytes(&borg_repo)?;
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    rows.push((
        "stored after both (GiB)",
        gib(maas_stored),
        gib(restic_stored),
        gib(borg_stored),
    ));

    let snap2 = b2["snapshot"].as_str().context("snapshot id")?.to_string();
    eprintln!("== full restores");
    let to_maas = dir.join("restore-maas");
    let (maas_restore, _) = probe.json(&[
        "restore",
        &snap2,
        "--path",
        "/",
        "--to",
        &to_maas.display().to_string(),
    ])?;
    let to_restic = dir.join("restore-restic");
    let (restic_restore, _) = timed(
        &mut restic(&[
            "restore",
            "latest",
            "--target",
            &to_restic.display().to_string(),
        ]),
        "restic restore",
    )?;
    let to_borg = dir.join("restore-borg");
    std::fs::create_dir_all(&to_borg)?;
    let (borg_restore, _) = timed(
        borg(&["extract", &borg_archive("day2")]).current_dir(&to_borg),
        "borg extract",
    )?;
    rows.push((
        "full restore (s)",
        maas_restore,
        restic_restore,
        borg_restore,
    ));
    // Every restore is the day-2 tree.
    let restic_root = to_restic.join(ds.strip_prefix("/").unwrap_or(&ds));
    for (name, root) in [
        ("MaaS", to_maas.clone()),
        ("restic", restic_root),
        ("borg", to_borg.clone()),
    ] {
        let out = run(
            Command::new("diff")
                .args(["-r", "--no-dereference", "-x", "lost+found"])
                .arg(&ds)
                .arg(&root),
            &format!("diff of the {name} restore"),
        )?;
        if !out.trim().is_empty() {
            bail!("the {name} restore differs from the dataset:\n{out}");
        }
    }
    // Three copies of the dataset are a lot of disk: they are checked, they go.
    for d in [&to_maas, &to_restic, &to_borg] {
        let _ = std::fs::remove_dir_all(d);
    }

    eprintln!("== mount and first byte");
    let file = some_file(&ds)?;
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    cold();
    let t = Instant::now();
    probe.json(&["mount", &snap2, &mnt.display().to_string()])?;
    let mount_s = t.elapsed().as_secs_f64();
    first_byte_of(&mnt.join(&file))?;
    let maas_fb = t.elapsed().as_secs_f64();
    probe.json(&["umount", &mnt.display().to_string()])?;
    let in_restic = ds.join(&file).display().to_string();
    let restic_fb = {
        cold();
        let t = Instant::now();
        run(
            Command::new("sh").arg("-c").arg(format!(
                "RESTIC_PASSWORD=bench restic -q -r {} dump latest {} | head -c 1 >/dev/null",
                restic_repo.display(),
                in_restic
            )),
            "restic dump",
        )?;
        t.elapsed().as_secs_f64()
    };
    let borg_fb = {
        cold();
        let t = Instant::now();
        run(
            Command::new("sh").arg("-c").arg(format!(
                "BORG_PASSPHRASE=bench borg extract --stdout {} {} | head -c 1 >/dev/null",
                borg_archive("day2"),
                file.display()
            )),
            "borg extract --stdout",
        )?;
        t.elapsed().as_secs_f64()
    };
    rows.push(("mount + first byte (s)", maas_fb, restic_fb, borg_fb));

    let ratio = |peer: f64, maas: f64| if maas > 0.0 { peer / maas } else { 0.0 };
    let out = json!({
        "scale": a.scale,
        "dataset_bytes": ds_bytes,
        "maas": {
            "backup_day1_s": maas1, "backup_day2_s": maas2,
            "backup_day1_bytes_written": b1["bytes_written"],
            "backup_day2_bytes_written": b2["bytes_written"],
            "stored_bytes": maas_stored, "restore_s": maas_restore,
            "mount_s": mount_s, "first_byte_s": maas_fb,
        },
        "restic": {
            "backup_day1_s": restic1, "backup_day2_s": restic2, "stored_bytes": restic_stored,
            "restore_s": restic_restore, "first_byte_s": restic_fb,
        },
        "borg": {
            "backup_day1_s": borg1, "backup_day2_s": borg2, "stored_bytes": borg_stored,
            "restore_s": borg_restore, "first_byte_s": borg_fb,
        },
        "ratio_restic": {
            "backup_day1": ratio(restic1, maas1), "backup_day2": ratio(restic2, maas2),
            "stored": ratio(restic_stored as f64, maas_stored as f64),
            "restore": ratio(restic_restore, maas_restore),
            "first_byte": ratio(restic_fb, maas_fb),
        },
        "ratio_borg": {
            "backup_day1": ratio(borg1, maas1), "backup_day2": ratio(borg2, maas2),
            "stored": ratio(borg_stored as f64, maas_stored as f64),
            "restore": ratio(borg_restore, maas_restore),
            "first_byte": ratio(borg_fb, maas_fb),
        },
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:<26} {:>9} {:>9} {:>9} {:>10} {:>10}",
            "", "MaaS", "restic", "borg", "restic/M", "borg/M"
        );
        for (k, mv, rv, bv) in &rows {
            println!(
                "{k:<26} {mv:>9.2} {rv:>9.2} {bv:>9.2} {:>10.2} {:>10.2}",
                ratio(*rv, *mv),
                ratio(*bv, *mv)
            );
        }
        println!("mount alone: {mount_s:.2} s (goal: under 1 s)");
    }
    Ok(())
}
