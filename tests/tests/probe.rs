#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The client probe on this machine, which has no kernel iSCSI or NVMe/TCP initiator: the real
//! `maas-probe` binary attaches volumes with its userspace NVMe/TCP initiator, FUSE and a loop
//! device, backs up a file tree (the shared dataset, plus the metadata rsync must keep), and
//! mounts snapshots back; trees and metadata are compared with the source by rsync's itemised
//! dry run (modes, owners, times, xattrs, ACLs, hard links, symlinks, devices) and by `diff -r`.
//! Faults: a probe killed mid-backup (never sealed; cleaned up; the next backup repairs and the
//! previous snapshot is intact), a missing source, a wrong token, a volume too small.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use maas_tests::TestDir;
use maas_tests::maasd::{Maasd, maasd_bin, probe_bin};
use serde_json::Value;

struct Probe<'a> {
    maasd: &'a Maasd,
    state: PathBuf,
}

/// A test that fails midway still leaves nothing attached: the serving processes of its mounts
/// are stopped and `maas-probe cleanup` removes mounts, loop devices and FUSE mounts.
impl Drop for Probe<'_> {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-f", "--"])
            .arg(format!(
                "--state-dir {} serve-attachment",
                self.state.display()
            ))
            .status();
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.cmd(&["cleanup"]).output();
    }
}

impl Probe<'_> {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(probe_bin());
        c.args(args)
            .env("MAAS_PROBE_STATE_DIR", &self.state)
            .env("MAAS_PROBE_LOG", "warn");
        for (k, v) in self.maasd.maasctl_env() {
            c.env(k, v);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let t = Instant::now();
        let out = self
            .cmd(args)
            .output()
            .unwrap_or_else(|e| panic!("running maas-probe: {e}"));
        eprintln!("maas-probe {args:?}: {:.2} s", t.elapsed().as_secs_f64());
        out
    }

    /// Runs with `--json`; panics with its stderr unless it succeeded.
    fn ok(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.run(&a);
        assert!(
            out.status.success(),
            "maas-probe {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "maas-probe {args:?} printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap_or_else(|e| panic!("sh -c {cmd}: {e}"))
}

fn sh_ok(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "{cmd} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dataset(dir: &Path, scale: &str) {
    let script = maas_tests::bench::dataset_script();
    sh_ok(&format!(
        "python3 {} create {} --scale {scale} >/dev/null",
        script.display(),
        dir.display()
    ));
}

fn mutate(dir: &Path) {
    let script = maas_tests::bench::dataset_script();
    sh_ok(&format!(
        "python3 {} mutate {} >/dev/null",
        script.display(),
        dir.display()
    ));
}

/// What rsync must keep beyond the dataset: owners by number, odd modes, old times, user
/// xattrs, a POSIX ACL, hard links, a dangling symlink, a FIFO, a sparse file.
fn add_metadata_cases(dir: &Path) {
    let d = dir.join("meta");
    std::fs::create_dir_all(&d).expect("mkdir meta");
    let p = d.display();
    sh_ok(&format!(
        "cd {p} && echo owned > owned && chown 1234:5678 owned && chmod 0640 owned \
         && echo setuid > sticky && chmod 4751 sticky \
         && echo old > old && touch -m -d '2001-02-03 04:05:06.123456789' old \
         && echo x > xattr && setfattr -n user.maas.test -v hello xattr \
         && echo acl > acl && setfacl -m u:4321:rw acl \
         && echo linked > hard1 && ln hard1 hard2 \
         && ln -s /nonexistent/target dangling \
         && mkfifo fifo \
         && truncate -s 64M sparse && echo tail >> sparse"
    ));
}

/// The two trees are the same: rsync's itemised dry run (which compares content by checksum,
/// and every attribute -aHAX keeps) lists nothing, and diff finds no difference.
fn assert_same_tree(expected: &Path, actual: &Path) {
    let out = sh_ok(&format!(
        "rsync -naHAXci --delete --exclude=/lost+found {}/ {}/",
        expected.display(),
        actual.display()
    ));
    assert!(
        out.trim().is_empty(),
        "{} differs from {}:\n{out}",
        actual.display(),
        expected.display()
    );
    sh_ok(&format!(
        // (diff cannot compare FIFOs; rsync above did.)
        "diff -r --no-dereference -x lost+found -x fifo {} {}",
        expected.display(),
        actual.display()
    ));
}

fn manifest_text(m: &Maasd, snapshot: &str) -> (u16, String) {
    match m
        .agent()
        .get(&m.url(&format!("/snapshots/{snapshot}/manifest")))
        .set("Authorization", &format!("Bearer {}", m.token))
        .call()
    {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET manifest: {e}"),
    }
}

/// The snapshot's manifest names every entry of `tree` (but lost+found) with its kind, size,
/// mode, owner and mtime as `lstat` sees them, and each file's BLAKE3 as Python's blake3
/// computes it from the file.
fn assert_manifest_matches(m: &Maasd, snapshot: &str, tree: &Path) {
    let (code, text) = manifest_text(m, snapshot);
    assert_eq!(code, 200, "{text}");
    let dir = tree.parent().expect("parent");
    let listing = dir.join(format!("{snapshot}.ndjson"));
    std::fs::write(&listing, &text).expect("write manifest");
    let script = r#"
import sys, os, stat, json, blake3
tree, listing = sys.argv[1], sys.argv[2]
got = {}
for line in open(listing):
    e = json.loads(line)
    got[e["path"]] = e
want = {}
for root, dirs, files in os.walk(tree):
    for name in dirs + files:
        full = os.path.join(root, name)
        want["/" + os.path.relpath(full, tree)] = full
want["/"] = tree
missing = sorted(set(want) - set(got))
extra = sorted(set(got) - set(want))
assert not missing and not extra, f"missing {missing[:5]} extra {extra[:5]}"
kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo"}
for path, full in want.items():
    st, e = os.lstat(full), got[path]
    assert e["kind"] == kinds[stat.S_IFMT(st.st_mode)], (path, e)
    assert e["mode"] == stat.S_IMODE(st.st_mode), (path, e, oct(st.st_mode))
    assert (e["uid"], e["gid"]) == (st.st_uid, st.st_gid), (path, e)
    assert e["mtime_ns"] == st.st_mtime_ns, (path, e, st.st_mtime_ns)
    if e["kind"] == "file":
        assert e["size"] == st.st_size, (path, e)
        h = blake3.blake3()
        with open(full, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
        assert e["blake3"] == h.hexdigest(), (path, e)
    if e["kind"] == "symlink":
        assert e["target"] == os.readlink(full), (path, e)
print(len(got))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(tree)
        .arg(&listing)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "manifest of {snapshot} does not match {}:\n{}",
        tree.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn snapshots(m: &Maasd, volume_id: &str) -> Vec<String> {
    let v = m.ok("GET", &format!("/volumes/{volume_id}/snapshots"), None);
    v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn volume_names(m: &Maasd) -> Vec<String> {
    let v = m.ok("GET", "/volumes", None);
    let mut names: Vec<String> = v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Nothing of the probe's is left on the host: no FUSE mount, no loop device on its files.
fn assert_nothing_attached(state: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let s = state.display().to_string();
    assert!(
        !mounts.contains(&s),
        "mounts of the probe are left:\n{}",
        mounts
            .lines()
            .filter(|l| l.contains(&s))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let loops = sh_ok("losetup --list --noheadings --output NAME,BACK-FILE");
    assert!(
        !loops.contains(&s),
        "loop devices of the probe are left:\n{loops}"
    );
}

fn start_maasd(dir: &Path) -> Maasd {
    Maasd::builder(maasd_bin(), &dir.join("maasd"))
        .device_size(6 << 30)
        .nvme_tcp_advertise("")
        .start()
}

#[test]
fn file_tree_backups_mount_back_exactly_through_the_userspace_initiator() {
    let t = TestDir::new("probe-tree");
    let m = start_maasd(t.path());
    let probe = Probe {
        maasd: &m,
        state: t.path().join("probe"),
    };
    let src = t.path().join("src");
    dataset(&src, "0.02");
    add_metadata_cases(&src);

    let b1 = probe.ok(&[
        "backup",
        "--volume",
        "files",
        "--source",
        &src.display().to_string(),
    ]);
    assert_eq!(b1["created_volume"], true);
    assert_eq!(b1["made_filesystem"], true);
    let s1 = b1["snapshot"].as_str().expect("snapshot id").to_string();
    let vol = b1["volume_id"].as_str().expect("volume id").to_string();
    assert!(b1["changes"]["files"].as_u64().unwrap_or(0) > 50, "{b1}");
    let day1 = t.path().join("day1");
    sh_ok(&format!("cp -a {} {}", src.display(), day1.display()));
    // The file manifest recorded with the snapshot lists the day's tree exactly.
    assert!(b1.get("manifest_error").is_none(), "{b1}");
    assert_manifest_matches(&m, &s1, &day1);

    mutate(&src);
    sh_ok(&format!(
        "rm {0}/meta/hard2 && echo changed >> {0}/meta/old && setfattr -n user.maas.test -v again {0}/meta/xattr \
         && ln -s / {0}/meta/root-link",
        src.display()
    ));
    let b2 = probe.ok(&[
        "backup",
        "--volume",
        "files",
        "--source",
        &src.display().to_string(),
    ]);
    assert_eq!(b2["created_volume"], false);
    assert_eq!(b2["made_filesystem"], false);
    let s2 = b2["snapshot"].as_str().expect("snapshot id").to_string();
    assert_ne!(s1, s2);
    assert!(
        b2["changes"]["files_deleted"].as_u64().unwrap_or(0) >= 1,
        "{b2}"
    );
    // An incremental sends what changed, not the whole tree again.
    assert!(
        b2["bytes_written"].as_u64() < b1["bytes_written"].as_u64(),
        "second backup wrote as much as the first: {b1} {b2}"
    );
    assert_eq!(snapshots(&m, &vol).len(), 2);
    // Unchanged files are not hashed again: only about what rsync copied is.
    let hashed = b2["manifest"]["files_hashed"].as_u64().unwrap_or(u64::MAX);
    let copied = b2["changes"]["files_transferred"].as_u64().unwrap_or(0);
    assert!(hashed <= copied + 2, "{b2}");
    assert!(
        b2["manifest"]["bytes_hashed"].as_u64().unwrap_or(u64::MAX)
            < b1["manifest"]["bytes_hashed"].as_u64().unwrap_or(0) / 2,
        "{b1} {b2}"
    );
    assert_manifest_matches(&m, &s2, &src);

    // Both points in time, mounted at once, each exactly its day's tree.
    let (m1, m2) = (t.path().join("m1"), t.path().join("m2"));
    std::fs::create_dir_all(&m1).expect("mkdir");
    std::fs::create_dir_all(&m2).expect("mkdir");
    let t0 = Instant::now();
    let r1 = probe.ok(&["mount", &s1, &m1.display().to_string()]);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "mount took {:?}",
        t0.elapsed()
    );
    assert_eq!(r1["snapshot"], s1.as_str());
    probe.ok(&["mount", &s2, &m2.display().to_string()]);
    assert_same_tree(&day1, &m1);
    assert_same_tree(&src, &m2);
    // Read-only: nothing can change a mounted point in time.
    let w = sh(&format!("touch {}/new-file", m1.display()));
    assert!(
        !w.status.success(),
        "a write to a mounted snapshot succeeded"
    );
    // Mounting on a mount point is refused, not stacked.
    let again = probe.run(&["mount", &s1, &m1.display().to_string()]);
    assert_eq!(again.status.code(), Some(2), "{again:?}");

    probe.ok(&["umount", &m1.display().to_string()]);
    probe.ok(&["umount", &m2.display().to_string()]);
    assert_nothing_attached(&probe.state);

    // Fine-grained restore: a folder and a single file of the first day, metadata and all.
    let out = t.path().join("restored");
    let r = probe.ok(&[
        "restore",
        &s1,
        "--path",
        "/meta",
        "--to",
        &out.display().to_string(),
    ]);
    assert!(r["bytes"].as_u64().unwrap_or(0) > 64 << 20, "{r}");
    assert_same_tree(&day1.join("meta"), &out.join("meta"));
    let one = t.path().join("one");
    probe.ok(&[
        "restore",
        &s1,
        "--path",
        "meta/old",
        "--to",
        &one.display().to_string(),
    ]);
    sh_ok(&format!(
        "cmp {0}/meta/old {1}/old && test \"$(stat -c %Y.%y {0}/meta/old)\" = \"$(stat -c %Y.%y {1}/old)\"",
        day1.display(),
        one.display()
    ));
    // A symbolic link in the snapshot pointing out of it does not lead a restore to this
    // host's files: `small/dir-01/logs-link`-like links are in the dataset; make one to /.
    let through_link = probe.run(&[
        "restore",
        &s2,
        "--path",
        "meta/root-link/etc/hostname",
        "--to",
        &one.display().to_string(),
    ]);
    assert_eq!(through_link.status.code(), Some(2), "{through_link:?}");
    assert!(!one.join("hostname").exists());
    let escape = probe.run(&[
        "restore",
        &s1,
        "--path",
        "../../etc",
        "--to",
        &one.display().to_string(),
    ]);
    assert_eq!(escape.status.code(), Some(2));
    let absent = probe.run(&[
        "restore",
        &s1,
        "--path",
        "/no/such/file",
        "--to",
        &one.display().to_string(),
    ]);
    assert_eq!(absent.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&absent.stderr).contains("not in snapshot"));

    // Whole-image restore into a file: the file is the second day's filesystem, even where
    // the file held other bytes before (they must not show through the image's zeros).
    let img = t.path().join("day2.img");
    sh_ok(&format!(
        "yes MAAS-OLD-BYTES | head -c 300M > {}",
        img.display()
    ));
    let ri = probe.ok(&["restore", &s2, "--image", &img.display().to_string()]);
    assert_eq!(
        ri["bytes"].as_u64(),
        std::fs::metadata(&img).ok().map(|m| m.len())
    );
    let im = t.path().join("im");
    std::fs::create_dir_all(&im).expect("mkdir");
    sh_ok(&format!(
        "mount -o ro,loop,noload {} {}",
        img.display(),
        im.display()
    ));
    // Nothing of the old file is left where the image is zero.
    sh_ok(&format!("! grep -aq MAAS-OLD-BYTES {}", img.display()));
    let same = std::panic::catch_unwind(|| assert_same_tree(&src, &im));
    sh_ok(&format!("umount {}", im.display()));
    if let Err(e) = same {
        std::panic::resume_unwind(e);
    }
    assert_nothing_attached(&probe.state);

    // The clones the mounts and restores used are gone; the backed-up volume stays.
    assert_eq!(volume_names(&m), vec!["files".to_string()]);
    let mut have = snapshots(&m, &vol);
    have.sort();
    let mut want = vec![s1, s2];
    want.sort();
    assert_eq!(have, want);
}

/// A probe killed mid-backup: the half-written volume is never sealed, the next command
/// removes what it left, the next backup repairs the filesystem and completes, and the
/// previous snapshot still mounts as it was.
#[test]
fn a_killed_backup_is_never_sealed_and_the_next_one_repairs() {
    let t = TestDir::new("probe-kill");
    let m = start_maasd(t.path());
    let probe = Probe {
        maasd: &m,
        state: t.path().join("probe"),
    };
    let src = t.path().join("src");
    dataset(&src, "0.01");
    let b1 = probe.ok(&[
        "backup",
        "--volume",
        "k",
        "--source",
        &src.display().to_string(),
        "--size",
        "2G",
    ]);
    let s1 = b1["snapshot"].as_str().expect("snapshot").to_string();
    let vol = b1["volume_id"].as_str().expect("volume").to_string();
    let day1 = t.path().join("day1");
    sh_ok(&format!("cp -a {} {}", src.display(), day1.display()));

    // Enough new data that the copy is surely under way when the probe is killed.
    sh_ok(&format!(
        "mkdir -p {0}/big && for i in 1 2 3 4; do head -c 64M /dev/urandom > {0}/big/f$i; done",
        src.display()
    ));
    let mut child = probe
        .cmd(&[
            "backup",
            "--volume",
            "k",
            "--source",
            &src.display().to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn maas-probe");
    let record = probe.state.join("attachments/backup-k.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        if text.contains("\"mount_dir\": \"") {
            break;
        }
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the backup ended before it was killed"
        );
        assert!(
            Instant::now() < deadline,
            "the backup never mounted its volume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(700));
    child.kill().expect("kill -9 the probe");
    let _ = child.wait();

    // Never sealed.
    assert_eq!(snapshots(&m, &vol), vec![s1.clone()]);
    // Cleaned up by the next command.
    let c = probe.ok(&["cleanup"]);
    assert_eq!(c["cleaned"], serde_json::json!(["backup-k"]), "{c}");
    assert_nothing_attached(&probe.state);
    let exports = m.ok("GET", &format!("/volumes/{vol}/exports"), None);
    assert_eq!(
        exports["items"].as_array().map(Vec::len),
        Some(0),
        "{exports}"
    );

    // The next backup repairs and completes; both points in time are right.
    let b3 = probe.ok(&[
        "backup",
        "--volume",
        "k",
        "--source",
        &src.display().to_string(),
    ]);
    let s3 = b3["snapshot"].as_str().expect("snapshot").to_string();
    let (m1, m3) = (t.path().join("m1"), t.path().join("m3"));
    std::fs::create_dir_all(&m1).expect("mkdir");
    std::fs::create_dir_all(&m3).expect("mkdir");
    probe.ok(&["mount", &s1, &m1.display().to_string()]);
    probe.ok(&["mount", &s3, &m3.display().to_string()]);
    assert_same_tree(&day1, &m1);
    assert_same_tree(&src, &m3);
    probe.ok(&["umount", &m1.display().to_string()]);
    probe.ok(&["umount", &m3.display().to_string()]);
    assert_nothing_attached(&probe.state);
}

#[test]
fn bad_inputs_end_in_clear_messages_and_exit_codes_never_in_a_snapshot() {
    let t = TestDir::new("probe-bad");
    let m = start_maasd(t.path());
    let probe = Probe {
        maasd: &m,
        state: t.path().join("probe"),
    };
    let src = t.path().join("src");
    dataset(&src, "0.01");

    let missing = probe.run(&["backup", "--volume", "b", "--source", "/nonexistent/dir"]);
    assert_eq!(missing.status.code(), Some(4), "{missing:?}");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/dir"));

    let bad_token = t.path().join("wrong.token");
    std::fs::write(&bad_token, "maas_wrong_token\n").expect("write");
    let wrong = probe
        .cmd(&[
            "backup",
            "--volume",
            "b",
            "--source",
            &src.display().to_string(),
        ])
        .env("MAAS_TOKEN_FILE", &bad_token)
        .output()
        .expect("run");
    assert_eq!(wrong.status.code(), Some(3), "{wrong:?}");
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("UNAUTHORIZED")
            || String::from_utf8_lossy(&wrong.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    // A volume too small for the source: a clear message, exit 4, nothing sealed; growing it
    // with --size makes the next backup fit (the filesystem grows with the volume).
    sh_ok(&format!("head -c 80M /dev/urandom > {}/big", src.display()));
    let small = probe.run(&[
        "backup",
        "--volume",
        "b",
        "--source",
        &src.display().to_string(),
        "--size",
        "64M",
    ]);
    assert_eq!(
        small.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&small.stderr)
    );
    assert!(String::from_utf8_lossy(&small.stderr).contains("too small"));
    let v = m.ok("GET", "/volumes", None);
    let vol = v["items"][0]["id"].as_str().expect("volume").to_string();
    assert!(snapshots(&m, &vol).is_empty());
    assert_nothing_attached(&probe.state);
    let grown = probe.ok(&[
        "backup",
        "--volume",
        "b",
        "--source",
        &src.display().to_string(),
        "--size",
        "512M",
    ]);
    let s = grown["snapshot"].as_str().expect("snapshot").to_string();
    let mnt = t.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    probe.ok(&["mount", &s, &mnt.display().to_string()]);
    assert_same_tree(&src, &mnt);
    probe.ok(&["umount", &mnt.display().to_string()]);

    // Manifests: what is not one is refused whole; a snapshot without one says so.
    let (code, body) = m.raw(
        "PUT",
        &format!("/snapshots/{s}/manifest"),
        "{\"path\":\"relative\"}",
    );
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["code"], "INVALID_MANIFEST");
    let (code, _) = manifest_text(&m, &s);
    assert_eq!(code, 200, "the bad PUT replaced the good manifest");
    let (code, body) = m.raw("PUT", "/snapshots/snap-nope/manifest", "");
    assert_eq!(code, 404, "{body}");

    let not_ours = probe.run(&["umount", &t.path().display().to_string()]);
    assert_eq!(not_ours.status.code(), Some(2));
    let bad_snap = probe.run(&["mount", "snap-nope", &mnt.display().to_string()]);
    assert_eq!(bad_snap.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&bad_snap.stderr).contains("SNAPSHOT_NOT_FOUND"));
    assert_nothing_attached(&probe.state);
    assert_eq!(volume_names(&m), vec!["b".to_string()]);
}
