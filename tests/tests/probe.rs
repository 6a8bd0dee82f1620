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

/// The snapshot's files, browsed through the REST file endpoints by Python's HTTP client
/// (every directory, in pages) and downloaded with curl, are `tree`'s: names, kinds, sizes,
/// modes, owners, symlink targets and every file's bytes; a byte range of a large file is its
/// bytes; a path that is not there is a 404, a directory is not downloadable.
fn assert_rest_browse_matches(m: &Maasd, snapshot: &str, tree: &Path) {
    let env: std::collections::HashMap<String, String> = m.maasctl_env().into_iter().collect();
    let ca = env.get("MAAS_CA_CERT").cloned().unwrap_or_default();
    let script = r#"
import sys, os, stat, json, ssl, urllib.request, urllib.parse, urllib.error, blake3
base, token, ca, snap, tree = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca) if ca else None
def get(endpoint, **q):
    url = f"{base}/snapshots/{snap}/{endpoint}?" + urllib.parse.urlencode(q)
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(req, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo"}
checked = files = 0
def walk(rel):
    global checked, files
    entries, after = [], None
    while True:
        q = {"path": rel or "/", "limit": 7}
        if after is not None:
            q["after"] = after
        code, body = get("files", **q)
        assert code == 200, (rel, code, body)
        page = json.loads(body)
        entries += page["entries"]
        after = page.get("next_after")
        if after is None:
            break
    names = [e["name"] for e in entries]
    assert names == sorted(names, key=os.fsencode), (rel, names)
    want = sorted(os.listdir(tree + rel) if rel else os.listdir(tree))
    if not rel:
        names = [n for n in names if n != "lost+found"]
        entries = [e for e in entries if e["name"] != "lost+found"]
    assert sorted(names) == want, (rel, sorted(set(names) ^ set(want))[:5])
    for e in entries:
        full = f"{tree}{rel}/{e['name']}"
        st = os.lstat(full)
        assert e["kind"] == kinds[stat.S_IFMT(st.st_mode)], (full, e)
        assert e["mode"] == stat.S_IMODE(st.st_mode), (full, e)
        assert (e["uid"], e["gid"]) == (st.st_uid, st.st_gid), (full, e)
        checked += 1
        if e["kind"] == "file":
            assert e["size"] == st.st_size, (full, e)
            code, data = get("files/content", path=f"{rel}/{e['name']}")
            assert code == 200, (full, code, data[:200])
            with open(full, "rb") as f:
                assert data == f.read(), f"content of {full} differs"
            files += 1
        elif e["kind"] == "symlink":
            assert e["link_target"] == os.readlink(full), (full, e)
        elif e["kind"] == "dir":
            walk(f"{rel}/{e['name']}")
walk("")
code, body = get("files", path="/no/such/dir")
assert code == 404 and json.loads(body)["code"] == "PATH_NOT_FOUND", (code, body)
code, body = get("files/content", path="/meta")
assert code == 422 and json.loads(body)["code"] == "NOT_A_FILE", (code, body)
print(checked, files)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(m.url(""))
        .arg(&m.token)
        .arg(&ca)
        .arg(snapshot)
        .arg(tree)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "REST browsing of {snapshot} does not match {}:\n{}",
        tree.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // Ranges with curl, the way a resumed download asks: the largest file, from its middle.
    let big = sh_ok(&format!(
        "cd {} && find . -type f -printf '%s %P\\n' | sort -n | tail -1 | cut -d' ' -f2-",
        tree.display()
    ));
    let big = big.trim();
    let len = std::fs::metadata(tree.join(big)).expect("stat").len();
    assert!(len > 1 << 20, "the dataset's largest file is {len} bytes");
    let part = tree.parent().expect("parent").join("range.part");
    let cacert = if ca.is_empty() {
        String::new()
    } else {
        format!("--cacert {ca}")
    };
    let url = format!(
        "{}?path=/{}",
        m.url(&format!("/snapshots/{snapshot}/files/content")),
        big
    );
    let half = len / 2 + 12345;
    sh_ok(&format!(
        "curl -sS --fail {cacert} -H 'Authorization: Bearer {tok}' -r {half}- -o {part} '{url}' \
         && tail -c +{skip} {file} | cmp - {part}",
        tok = m.token,
        part = part.display(),
        skip = half + 1,
        file = tree.join(big).display()
    ));
    let code = sh_ok(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' {cacert} -H 'Authorization: Bearer {tok}' -r {len}- '{url}'",
        tok = m.token
    ));
    assert_eq!(code.trim(), "416");
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
    // The same files, browsed and downloaded through the REST API without mounting anything.
    assert_rest_browse_matches(&m, &s1, &day1);

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

/// Image backups: a sparse image file whose size is not a multiple of anything, backed up,
/// changed in three places and backed up again (exactly those blocks sent, compared with the
/// kept block map), then with the map lost as a killed probe leaves it (compared with the
/// volume itself), then shrunk; every snapshot restores to exactly its day's bytes, and the
/// manifest carries the image's length and BLAKE3 (Python's blake3 agrees).
#[test]
fn image_backups_send_changed_blocks_and_restore_exactly() {
    let t = TestDir::new("probe-image");
    let m = start_maasd(t.path());
    let probe = Probe {
        maasd: &m,
        state: t.path().join("probe"),
    };
    let img = t.path().join("disk.img");
    let p = img.display().to_string();
    // 48 MiB + 1000 bytes: data at the start, in the middle and up to the odd end, holes
    // between (never read, never stored).
    sh_ok(&format!(
        "truncate -s $((48*1024*1024+1000)) {p} \
         && head -c 5M /dev/urandom | dd of={p} conv=notrunc status=none \
         && head -c 3M /dev/urandom | dd of={p} bs=1M seek=20 conv=notrunc status=none \
         && head -c 70000 /dev/urandom | dd of={p} bs=1 seek=$((48*1024*1024+1000-70000)) conv=notrunc status=none"
    ));
    let day = |n: u32| {
        let copy = t.path().join(format!("day{n}.img"));
        sh_ok(&format!("cp --sparse=always {p} {}", copy.display()));
        copy
    };
    let b1 = probe.ok(&["backup", "--volume", "disk", "--source", &p]);
    let i1 = &b1["image"];
    assert_eq!(b1["created_volume"], true, "{b1}");
    assert_eq!(i1["compared_with"], "full", "{b1}");
    assert_eq!(i1["source_bytes"], 48 * 1024 * 1024 + 1000, "{b1}");
    assert!(i1["hole_bytes"].as_u64().unwrap_or(0) >= 30 << 20, "{b1}");
    assert!(
        b1["bytes_written"].as_u64().unwrap_or(u64::MAX) < 10 << 20,
        "{b1}"
    );
    let s1 = b1["snapshot"].as_str().expect("snapshot").to_string();
    let day1 = day(1);
    // The manifest: one entry, the image's length and hash.
    let (code, text) = manifest_text(&m, &s1);
    assert_eq!(code, 200, "{text}");
    let e: Value = serde_json::from_str(text.trim()).expect("one manifest entry");
    assert_eq!(e["path"], "/image");
    assert_eq!(e["size"], 48 * 1024 * 1024 + 1000);
    let py_hash = sh_ok(&format!(
        "python3 -c 'import blake3,sys; print(blake3.blake3(open(sys.argv[1],\"rb\").read()).hexdigest())' {p}"
    ));
    assert_eq!(e["blake3"].as_str(), Some(py_hash.trim()));

    // Day 2: three 4 KiB writes in three different 64 KiB blocks (one of them in a hole).
    sh_ok(&format!(
        "for o in 100 5000 9000; do head -c 4096 /dev/urandom | dd of={p} bs=4096 seek=$o conv=notrunc status=none; done"
    ));
    let b2 = probe.ok(&["backup", "--volume", "disk", "--source", &p]);
    let i2 = &b2["image"];
    assert_eq!(i2["compared_with"], "map", "{b2}");
    assert_eq!(i2["blocks_changed"], 3, "{b2}");
    assert!(
        b2["bytes_written"].as_u64().unwrap_or(u64::MAX) <= 3 * 65536,
        "{b2}"
    );
    let s2 = b2["snapshot"].as_str().expect("snapshot").to_string();
    let day2 = day(2);

    // Day 3: the map is gone, as after a probe killed mid-backup: the volume is compared.
    sh_ok(&format!(
        "rm -f {}/blockmaps/* && head -c 4096 /dev/urandom | dd of={p} bs=4096 seek=7000 conv=notrunc status=none",
        probe.state.display()
    ));
    let b3 = probe.ok(&["backup", "--volume", "disk", "--source", &p]);
    assert_eq!(b3["image"]["compared_with"], "volume", "{b3}");
    assert_eq!(b3["image"]["blocks_changed"], 1, "{b3}");
    let s3 = b3["snapshot"].as_str().expect("snapshot").to_string();
    let day3 = day(3);

    // Day 4: the image shrinks; the snapshot holds the shorter image and nothing after it.
    sh_ok(&format!("truncate -s $((21*1024*1024+5)) {p}"));
    let b4 = probe.ok(&["backup", "--volume", "disk", "--source", &p]);
    assert_eq!(b4["image"]["compared_with"], "map", "{b4}");
    let s4 = b4["snapshot"].as_str().expect("snapshot").to_string();
    let day4 = day(4);

    for (s, want) in [(&s1, &day1), (&s2, &day2), (&s3, &day3), (&s4, &day4)] {
        let out = t.path().join(format!("{s}.restored"));
        let r = probe.ok(&["restore", s, "--image", &out.display().to_string()]);
        assert_eq!(
            r["bytes"].as_u64(),
            std::fs::metadata(want).ok().map(|m| m.len()),
            "{r}"
        );
        sh_ok(&format!("cmp {} {}", want.display(), out.display()));
        std::fs::remove_file(&out).expect("rm");
    }
    assert_nothing_attached(&probe.state);
    // An image is not a directory: --exclude is refused before anything is made.
    let ex = probe.run(&[
        "backup",
        "--volume",
        "disk",
        "--source",
        &p,
        "--exclude",
        "x",
    ]);
    assert_eq!(ex.status.code(), Some(2), "{ex:?}");
}

/// A `maas-probe run` agent in the background, stopped (SIGKILL) when dropped.
struct Agent(std::process::Child);

impl Agent {
    fn start(probe: &Probe<'_>, log: &Path) -> Agent {
        let log = std::fs::File::create(log).expect("agent log");
        let child = probe
            .cmd(&["run", "--heartbeat", "1", "--poll", "1"])
            .env("MAAS_PROBE_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("maas-probe run");
        Agent(child)
    }

    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM: the agent ends (after the job at hand) with success.
    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = self.0.try_wait() {
                return st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "agent ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until `f` returns Some, for at most `limit`.
fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The probe as the host's agent: it registers (the host shows with its NQN and IQN, online
/// while it heartbeats), runs the backup and restore jobs queued for the host through the
/// REST API and reports their results, keeps serving across a maasd restart, reports a
/// failed job with a code, and a job cut short by killing the probe is reported failed at its
/// next start, with nothing left attached and the volume's snapshots untouched.
#[test]
fn the_agent_runs_jobs_queued_at_maasd_and_survives_restarts() {
    let t = TestDir::new("probe-agent");
    let mut m = start_maasd(t.path());
    let probe = Probe {
        maasd: &m,
        state: t.path().join("probe"),
    };
    let src = t.path().join("src");
    dataset(&src, "0.01");
    add_metadata_cases(&src);
    let ident = probe.ok(&["identity"]);
    let h = probe.ok(&["register"]);
    let host = h["id"].as_str().expect("host id").to_string();
    assert_eq!(h["hostnqn"], ident["hostnqn"], "{h}");
    assert_eq!(h["iqn"], ident["iqn"], "{h}");
    // Registering again is harmless and keeps the id.
    assert_eq!(probe.ok(&["register"])["id"], host.as_str());

    let mut agent = Agent::start(&probe, &t.path().join("agent.log"));
    let online = wait_for(Duration::from_secs(20), "the host online", || {
        let h = m.ok("GET", &format!("/hosts/{host}"), None);
        (h["state"] == "online").then_some(h)
    });
    assert!(online["last_heartbeat"].is_string(), "{online}");

    let queue = |m: &Maasd, body: Value| -> Value {
        let (code, j) = m.call("POST", &format!("/hosts/{host}/jobs"), Some(body));
        assert_eq!(code, 202, "{j}");
        assert_eq!(j["state"], "queued", "{j}");
        j
    };
    let wait = |m: &Maasd, j: &Value| -> Value {
        let id = j["id"].as_str().expect("job id").to_string();
        wait_for(Duration::from_secs(300), "the host's job", || {
            let j = m.ok("GET", &format!("/jobs/{id}"), None);
            matches!(j["state"].as_str(), Some("succeeded" | "failed")).then_some(j)
        })
    };
    let j1 = queue(
        &m,
        serde_json::json!({ "kind": "backup", "volume": "agent", "source": src.display().to_string() }),
    );
    let j1 = wait(&m, &j1);
    assert_eq!(j1["state"], "succeeded", "{j1}");
    assert_eq!(j1["host"], host.as_str());
    let s1 = j1["result"]["snapshot"]
        .as_str()
        .expect("the job's result names the snapshot")
        .to_string();
    assert_manifest_matches(&m, &s1, &src);

    // maasd restarts; the agent keeps asking and runs the next job.
    drop(probe);
    m.restart();
    let probe = Probe {
        maasd: &m,
        state: t.path().join("probe"),
    };
    let out = t.path().join("restored");
    let j2 = queue(
        &m,
        serde_json::json!({ "kind": "restore", "snapshot": s1, "path": "/meta", "to": out.display().to_string() }),
    );
    let j2 = wait(&m, &j2);
    assert_eq!(j2["state"], "succeeded", "{j2}");
    assert_same_tree(&src.join("meta"), &out.join("meta"));

    // A job that cannot work fails with a code and the probe's words.
    let j3 = queue(
        &m,
        serde_json::json!({ "kind": "backup", "volume": "agent", "source": "/no/such/dir" }),
    );
    let j3 = wait(&m, &j3);
    assert_eq!(j3["state"], "failed", "{j3}");
    assert_eq!(j3["error"]["code"], "SOURCE_MISSING", "{j3}");

    // The probe is killed in the middle of a backup: the next start reports the job failed,
    // removes what it left attached, and the volume keeps exactly its one good snapshot.
    mutate(&src);
    let j4 = queue(
        &m,
        serde_json::json!({ "kind": "backup", "volume": "agent", "source": src.display().to_string() }),
    );
    let j4_id = j4["id"].as_str().expect("id").to_string();
    wait_for(Duration::from_secs(60), "the backup to be attached", || {
        let j = m.ok("GET", &format!("/jobs/{j4_id}"), None);
        let attached = std::fs::read_dir(probe.state.join("attachments"))
            .map(|d| d.count() > 0)
            .unwrap_or(false);
        (j["state"] == "running" && attached).then_some(())
    });
    agent.kill9();
    let _ = Command::new("pkill")
        .args(["-9", "-f", "--"])
        .arg(format!(
            "--state-dir {} serve-attachment",
            probe.state.display()
        ))
        .status();
    let mut agent = Agent::start(&probe, &t.path().join("agent2.log"));
    let j4 = wait(&m, &j4);
    assert_eq!(j4["state"], "failed", "{j4}");
    assert_eq!(j4["error"]["code"], "PROBE_STOPPED", "{j4}");
    let vol = j1["result"]["volume_id"].as_str().expect("volume id");
    assert_eq!(snapshots(&m, vol), vec![s1.clone()]);
    // A graceful stop ends the agent with success, and nothing of the probe is attached.
    let st = agent.stop();
    assert!(st.success(), "{st}");
    assert_nothing_attached(&probe.state);
    assert_eq!(
        m.ok("GET", "/hosts", None)["items"]
            .as_array()
            .map(|a| a.len()),
        Some(1)
    );
}

/// A TCP relay on 127.0.0.1 that counts the bytes it carries (both ways), for proving what
/// crosses a link.
struct CountingRelay {
    port: u16,
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CountingRelay {
    fn start(to: std::net::SocketAddr) -> CountingRelay {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("addr").port();
        let bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = bytes.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let Ok(server) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                for (mut from, mut into) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    let counted = counted.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            use std::io::{Read, Write};
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    counted.fetch_add(n as u64, Ordering::Relaxed);
                                    if into.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = into.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        CountingRelay { port, bytes }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Three-party: the probe reaches maasd's REST API through a relay that counts every byte,
/// and the engine's NVMe/TCP portal directly. A backup of the dataset moves its data on the
/// block path only (the REST bytes are a small fraction: requests, and the file manifest).
/// Then maasd is SIGKILLed in the middle of a backup: the probe ends with a clear error, the
/// earlier snapshot is intact, and after maasd is back the next backup completes exactly.
#[test]
fn backup_data_never_crosses_the_rest_api_and_a_killed_maasd_loses_nothing() {
    let t = TestDir::new("probe-3party");
    let mut m = start_maasd(t.path());
    let api_addr: std::net::SocketAddr = m
        .base_url()
        .split("://")
        .nth(1)
        .expect("url")
        .parse()
        .expect("host:port");
    let relay = CountingRelay::start(api_addr);
    let relayed_url = m
        .base_url()
        .replace(&api_addr.port().to_string(), &relay.port.to_string());
    let state = t.path().join("probe");
    let env = m.maasctl_env();
    // (Not the `Probe` helper: that borrows maasd, which this test kills and starts again.)
    let probe_cmd = |args: &[&str]| -> Command {
        let mut c = Command::new(probe_bin());
        c.args(args)
            .arg("--json")
            .env("MAAS_PROBE_STATE_DIR", &state)
            .env("MAAS_PROBE_LOG", "warn");
        for (k, v) in &env {
            c.env(k, v);
        }
        c.env("MAAS_URL", &relayed_url);
        c
    };
    let src = t.path().join("src");
    dataset(&src, "0.05");
    let data_bytes = maas_probe_du(&src);
    let before = relay.bytes();
    let out = probe_cmd(&[
        "backup",
        "--volume",
        "three",
        "--source",
        &src.display().to_string(),
    ])
    .output()
    .expect("maas-probe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b1: Value = serde_json::from_slice(&out.stdout).expect("json");
    let rest = relay.bytes() - before;
    let written = b1["bytes_written"].as_u64().unwrap_or(0);
    eprintln!("REST bytes {rest}, block bytes written {written}, data {data_bytes}");
    // (rsync leaves zero runs as holes, so a little less than the data may be written.)
    assert!(written > data_bytes / 2, "{b1}");
    assert!(
        rest < data_bytes / 20,
        "{rest} bytes crossed the REST API for {data_bytes} bytes of data"
    );
    let s1 = b1["snapshot"].as_str().expect("snapshot").to_string();
    let vol = b1["volume_id"].as_str().expect("volume").to_string();
    let day1 = t.path().join("day1");
    sh_ok(&format!("cp -a {} {}", src.display(), day1.display()));

    // maasd dies while the probe copies the next day's changes.
    mutate(&src);
    sh_ok(&format!(
        "head -c 400M /dev/urandom > {}/big-new-file",
        src.display()
    ));
    // (stderr to a file: a pipe nobody reads until the end would fill and stall the probe.)
    let err_log = t.path().join("probe.err");
    let src_arg = src.display().to_string();
    let mut child = probe_cmd(&["backup", "--volume", "three", "--source", &src_arg])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_log).expect("probe.err"))
        .spawn()
        .expect("maas-probe");
    wait_for(Duration::from_secs(60), "the copy to start", || {
        std::fs::read_dir(state.join("attachments"))
            .ok()?
            .flatten()
            .any(|e| {
                std::fs::read_to_string(e.path())
                    .map(|t| t.contains("mount_dir"))
                    .unwrap_or(false)
            })
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    m.kill9();
    let t0 = Instant::now();
    let out = wait_for(Duration::from_secs(120), "the probe to give up", || {
        child.try_wait().ok().flatten()
    });
    assert!(
        !out.success(),
        "a backup whose server died mid-way succeeded"
    );
    let err = std::fs::read_to_string(&err_log).unwrap_or_default();
    eprintln!("probe after maasd died ({:?}): {err}", t0.elapsed());
    // The volume's connection is what failed (5), or maasd's API (3) if it died between.
    assert!(
        matches!(out.code(), Some(3 | 5)),
        "unexpected exit {out}: {err}"
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{err}");
    assert!(
        !last.contains("too small"),
        "a dead server reported as a full volume: {err}"
    );
    // A dead target does not flood the log with one line per failed request.
    assert!(err.lines().count() < 40, "{err}");

    // maasd is back: the first snapshot is intact, the next backup repairs and completes.
    m.start_again();
    let (m1, m2) = (t.path().join("m1"), t.path().join("m2"));
    std::fs::create_dir_all(&m1).expect("mkdir");
    std::fs::create_dir_all(&m2).expect("mkdir");
    let probe = Probe {
        maasd: &m,
        state: state.clone(),
    };
    probe.ok(&["mount", &s1, &m1.display().to_string()]);
    assert_same_tree(&day1, &m1);
    probe.ok(&["umount", &m1.display().to_string()]);
    let b2 = probe.ok(&[
        "backup",
        "--volume",
        "three",
        "--source",
        &src.display().to_string(),
    ]);
    let s2 = b2["snapshot"].as_str().expect("snapshot").to_string();
    probe.ok(&["mount", &s2, &m2.display().to_string()]);
    assert_same_tree(&src, &m2);
    probe.ok(&["umount", &m2.display().to_string()]);
    assert!(snapshots(&m, &vol).contains(&s1));
    assert_nothing_attached(&probe.state);
    // No export of the probe's is left at maasd.
    let exports = m.ok("GET", &format!("/volumes/{vol}/exports"), None);
    assert_eq!(
        exports["items"].as_array().map(|a| a.len()),
        Some(0),
        "{exports}"
    );
}

/// Bytes of the regular files under `p`.
fn maas_probe_du(p: &Path) -> u64 {
    let out = sh_ok(&format!("find {} -type f -printf '%s\\n'", p.display()));
    out.lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum()
}

/// PostgreSQL clusters a test started, stopped (immediately) when it ends.
struct PgClusters {
    bin: PathBuf,
    dirs: Vec<PathBuf>,
}

impl PgClusters {
    fn new() -> PgClusters {
        // The newest installed server's programs (Debian: /usr/lib/postgresql/N/bin).
        let bin = sh_ok("ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1");
        PgClusters {
            bin: PathBuf::from(bin.trim()),
            dirs: Vec::new(),
        }
    }

    fn as_postgres(&self, cmd: &str) -> String {
        sh_ok(&format!(
            "runuser -u postgres -- sh -c '{}'",
            cmd.replace('\'', r"'\''")
        ))
    }

    fn start(&mut self, dir: &Path, port: u16, sock: &Path) {
        self.dirs.push(dir.to_path_buf());
        self.as_postgres(&format!(
            "{}/pg_ctl -D {} -l {}/server.log -t 180 -w -o \"-p {port} -k {} -c listen_addresses=\" start",
            self.bin.display(),
            dir.display(),
            sock.display(),
            sock.display()
        ));
    }

    fn psql(&self, sock: &Path, port: u16, sql: &str) -> String {
        self.as_postgres(&format!(
            "psql -X -A -t -q -v ON_ERROR_STOP=1 -h {} -p {port} -U postgres -d postgres -c \"{sql}\"",
            sock.display()
        ))
    }
}

impl Drop for PgClusters {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"))
                .args(["-D"])
                .arg(d)
                .args(["-m", "immediate", "stop"])
                .output();
        }
    }
}

/// PostgreSQL: a live cluster, written to all through the backup, is backed up online by the
/// probe (`--postgres`, between `--pre` and `--post` commands); its snapshot, restored to a
/// folder, starts as a PostgreSQL that replays the copied WAL and holds every transaction
/// committed before the backup began, and passes `pg_amcheck` (heap and every index).
#[test]
fn a_live_postgresql_is_backed_up_consistently_and_starts_from_its_snapshot() {
    let t = TestDir::new("probe-pg");
    sh_ok(&format!("chmod 755 {}", t.path().display()));
    let m = start_maasd(t.path());
    let probe = Probe {
        maasd: &m,
        state: t.path().join("probe"),
    };
    let mut pg = PgClusters::new();
    let (data, sock) = (t.path().join("pgdata"), t.path().join("sock"));
    sh_ok(&format!(
        "mkdir -p {0} {1} && chown postgres: {0} {1}",
        data.display(),
        sock.display()
    ));
    pg.as_postgres(&format!(
        "{}/initdb -D {} -U postgres --auth=trust --no-sync >/dev/null",
        pg.bin.display(),
        data.display()
    ));
    let port = maas_tests::maasd::free_port();
    pg.start(&data, port, &sock);
    pg.psql(
        &sock,
        port,
        "CREATE TABLE t (id bigint PRIMARY KEY, payload text NOT NULL); \
         CREATE INDEX t_payload ON t (payload); \
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g",
    );

    // Writes go on during the whole backup.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, sock, bin) = (stop.clone(), sock.clone(), pg.bin.clone());
        std::thread::spawn(move || {
            let mut next = 1_000_000u64;
            let mut batches = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sql = format!(
                    "INSERT INTO t SELECT g, repeat(md5(g::text), 20) FROM generate_series({next}, {}) g",
                    next + 499
                );
                let ok = Command::new("runuser")
                    .args(["-u", "postgres", "--", "psql", "-X", "-q", "-h"])
                    .arg(&sock)
                    .args([
                        "-p",
                        &port.to_string(),
                        "-U",
                        "postgres",
                        "-d",
                        "postgres",
                        "-c",
                        &sql,
                    ])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                if ok {
                    batches += 1;
                }
                next += 500;
                let _ = bin.as_path();
            }
            batches
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let (pre, post) = (t.path().join("pre.ran"), t.path().join("post.ran"));
    let conninfo = format!(
        "host={} port={port} user=postgres dbname=postgres",
        sock.display()
    );
    let b = probe.ok(&[
        "backup",
        "--volume",
        "pg",
        "--postgres",
        &conninfo,
        "--pre",
        &format!("echo \"$MAAS_VOLUME\" > {}", pre.display()),
        "--post",
        &format!(
            "echo \"$MAAS_BACKUP_STATUS $MAAS_SNAPSHOT\" > {}",
            post.display()
        ),
    ]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let batches = writer.join().expect("writer");
    assert!(batches > 0, "nothing was written during the backup");
    let snap = b["snapshot"].as_str().expect("snapshot").to_string();
    assert!(b["postgres"]["start_lsn"].is_string(), "{b}");
    assert!(b["postgres"]["stop_lsn"].is_string(), "{b}");
    assert!(b.get("post_hook_error").is_none(), "{b}");
    assert_eq!(
        std::fs::read_to_string(&pre).unwrap_or_default().trim(),
        "pg"
    );
    assert_eq!(
        std::fs::read_to_string(&post).unwrap_or_default().trim(),
        format!("succeeded {snap}")
    );

    // The snapshot, restored to a folder, is a data directory PostgreSQL starts from.
    let restored = t.path().join("restored");
    probe.ok(&[
        "restore",
        &snap,
        "--path",
        "/",
        "--to",
        &restored.display().to_string(),
    ]);
    assert!(
        restored.join("backup_label").is_file(),
        "no backup_label in the copy"
    );
    assert!(!restored.join("postmaster.pid").exists());
    sh_ok(&format!(
        "rm -rf {0}/lost+found && chown -R postgres: {0} && chmod 700 {0}",
        restored.display()
    ));
    let (sock2, port2) = (t.path().join("sock2"), maas_tests::maasd::free_port());
    sh_ok(&format!(
        "mkdir -p {0} && chown postgres: {0}",
        sock2.display()
    ));
    pg.start(&restored, port2, &sock2);
    let before = pg.psql(&sock2, port2, "SELECT count(*) FROM t WHERE id <= 20000");
    assert_eq!(before.trim(), "20000");
    let total: u64 = pg
        .psql(&sock2, port2, "SELECT count(*) FROM t")
        .trim()
        .parse()
        .expect("count");
    assert!(
        total >= 20000 && (total - 20000) % 500 == 0,
        "{total}: a batch was half there"
    );
    pg.as_postgres(&format!(
        "{}/pg_amcheck -h {} -p {port2} -U postgres --install-missing --heapallindexed --all",
        pg.bin.display(),
        sock2.display()
    ));
    // A failing --pre stops the backup before anything is touched.
    let refused = probe.run(&[
        "backup",
        "--volume",
        "pg",
        "--postgres",
        &conninfo,
        "--pre",
        "exit 3",
    ]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--pre command failed"));
    assert_nothing_attached(&probe.state);
}

/// `qemu-nbd` serving an image read-only on a UNIX socket (with a dirty bitmap), stopped
/// when dropped.
struct QemuNbd(std::process::Child);

impl QemuNbd {
    fn start(image: &Path, sock: &Path, bitmap: &str) -> QemuNbd {
        let _ = std::fs::remove_file(sock);
        let child = Command::new("qemu-nbd")
            .args(["-r", "-t", "-f", "qcow2", "-x", "disk", "-B", bitmap, "-k"])
            .arg(sock)
            .arg(image)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        wait_for(Duration::from_secs(20), "qemu-nbd's socket", || {
            sock.exists().then_some(())
        });
        QemuNbd(child)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A VM disk over NBD, as a hypervisor exports it: a qcow2 image written by `qemu-io`, with a
/// persistent dirty bitmap made by `qemu-img bitmap`, served by `qemu-nbd -B`. The first
/// backup reads only the allocated data; after more writes the incremental reads only what
/// QEMU's bitmap marks dirty (bytes counted); each snapshot, restored, is the image as it was
/// (`qemu-img compare`).
#[test]
fn vm_disks_over_nbd_back_up_incrementally_from_qemu_dirty_bitmaps() {
    let t = TestDir::new("probe-nbd");
    let m = start_maasd(t.path());
    let probe = Probe {
        maasd: &m,
        state: t.path().join("probe"),
    };
    let img = t.path().join("vm.qcow2");
    let p = img.display().to_string();
    let sock = t.path().join("nbd.sock");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 {p} 96M \
         && qemu-io -f qcow2 -c 'write -P 0x11 0 3M' -c 'write -P 0x22 40M 1M' -c 'write -P 0x33 95M 1M' {p} >/dev/null \
         && qemu-img bitmap --add {p} b0"
    ));
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let day1 = t.path().join("day1.raw");
    sh_ok(&format!("qemu-img convert -O raw {p} {}", day1.display()));

    let nbd = QemuNbd::start(&img, &sock, "b0");
    let b1 = probe.ok(&[
        "backup", "--volume", "vm", "--source", &uri, "--bitmap", "b0",
    ]);
    drop(nbd);
    assert_eq!(b1["image"]["compared_with"], "allocation", "{b1}");
    let read1 = b1["image"]["bytes_read"].as_u64().unwrap_or(u64::MAX);
    assert!(
        (5 << 20..=6 << 20).contains(&read1),
        "read {read1} bytes for 5 MiB allocated: {b1}"
    );
    let s1 = b1["snapshot"].as_str().expect("snapshot").to_string();

    // The guest writes; QEMU's bitmap records where.
    sh_ok(&format!(
        "qemu-io -f qcow2 -c 'write -P 0x44 1M 64k' -c 'write -P 0x55 60M 128k' {p} >/dev/null"
    ));
    let day2 = t.path().join("day2.raw");
    sh_ok(&format!("qemu-img convert -O raw {p} {}", day2.display()));
    let nbd = QemuNbd::start(&img, &sock, "b0");
    let b2 = probe.ok(&[
        "backup", "--volume", "vm", "--source", &uri, "--bitmap", "b0",
    ]);
    drop(nbd);
    assert_eq!(b2["image"]["compared_with"], "dirty-bitmap", "{b2}");
    let read2 = b2["image"]["bytes_read"].as_u64().unwrap_or(u64::MAX);
    assert_eq!(
        read2,
        192 << 10,
        "the incremental read more than the dirty 192 KiB: {b2}"
    );
    let s2 = b2["snapshot"].as_str().expect("snapshot").to_string();

    for (s, want) in [(&s1, &day1), (&s2, &day2)] {
        let out = t.path().join(format!("{s}.raw"));
        let r = probe.ok(&["restore", s, "--image", &out.display().to_string()]);
        assert_eq!(r["bytes"].as_u64(), Some(96 << 20), "{r}");
        sh_ok(&format!(
            "qemu-img compare -q -f raw -F raw {} {}",
            want.display(),
            out.display()
        ));
    }
    assert_nothing_attached(&probe.state);
    // A bitmap the server does not offer is an error, not a silent full read.
    let nbd = QemuNbd::start(&img, &sock, "b0");
    let wrong = probe.run(&[
        "backup", "--volume", "vm", "--source", &uri, "--bitmap", "nope",
    ]);
    drop(nbd);
    assert_eq!(wrong.status.code(), Some(2), "{wrong:?}");
}
