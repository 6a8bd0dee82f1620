//! The backup-and-restore scenario the guest tests run over each block protocol (iSCSI,
//! NVMe/TCP): a host backs up a file tree onto a MaaS volume, the volume is sealed, an
//! incremental backup changes it, sealed again; clones of both snapshots restore exactly their
//! point in time to a fresh host, `fsck.ext4 -n` finds them clean, writes on the clones touch
//! neither the snapshots nor the original, and the pool re-reads clean.
//!
//! The guests attach volumes through a [`Protocol`]; the host reads whole volumes back with
//! QEMU's iSCSI driver whatever the guests used ([`read_raw`]), so every protocol is held to
//! the same bit-for-bit checks.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Guest, GuestRun, ISCSI_SH, NVME_SH, TREE_SH};
use crate::maasd::{Maasd, clone_snapshot, export, nvme_export, seal, verify_pool, volume};
use crate::peers::{qemu_img, run_with_timeout, text};

pub const MIB: u64 = 1 << 20;

/// Runs `script` under bash on the host with [`TREE_SH`]; returns stdout.
pub fn host_sh(script: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{TREE_SH}\n{script}"))
        .output()
        .unwrap_or_else(|e| panic!("running bash: {e}"));
    assert!(
        out.status.success(),
        "host script failed: {script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Prints how long each step took (run with --nocapture to see them).
#[derive(Debug)]
pub struct Clock {
    test: &'static str,
    start: Instant,
    step: Instant,
}

impl Clock {
    pub fn new(test: &'static str) -> Clock {
        Clock {
            test,
            start: Instant::now(),
            step: Instant::now(),
        }
    }

    pub fn lap(&mut self, what: &str) {
        eprintln!(
            "[{}] {what}: {:.1} s (total {:.1} s)",
            self.test,
            self.step.elapsed().as_secs_f64(),
            self.start.elapsed().as_secs_f64()
        );
        self.step = Instant::now();
    }

    /// Prints a line under the test's name.
    pub fn note(&self, what: &str) {
        eprintln!("[{}] {what}", self.test);
    }
}

/// One scenario at a time in this process (`cargo test` runs tests in parallel; nextest runs
/// guest tests one at a time anyway, see .config/nextest.toml): two TCG guests on two cores
/// only slow each other down.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a guest and asserts it succeeded.
pub fn run_ok(g: &Guest, script: &str) -> GuestRun {
    let run = g.run(script);
    run.assert_success();
    run
}

/// A deterministic pseudo-random stream (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn bytes(&mut self, n: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(n as usize + 8);
        while (v.len() as u64) < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n as usize);
        v
    }
}

/// Writes a file, creating its directory.
pub fn write_file(path: &Path, data: &[u8]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    }
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(data))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn write_text(path: &Path, text: &str) {
    write_file(path, text.as_bytes());
}

pub fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Step 2's file tree: a few hundred files of varied sizes (empty to 10 MiB, odd sizes around
/// sector and block boundaries) and contents (random, text, all-zero, duplicates), a 24 MiB
/// "database" that step 3 patches in place, symlinks. Returns the relative paths of the
/// regular files with their sizes.
fn make_tree(root: &Path, rng: &mut Rng) -> BTreeMap<String, u64> {
    const DIRS: [&str; 10] = [
        "home/alice/docs",
        "home/alice/photos/2025",
        "home/bob/src/maas",
        "home/bob/mail",
        "srv/www/static",
        "srv/db/archive",
        "etc/app/conf.d",
        "var/log/old",
        "var/lib/state",
        "opt/tools/bin",
    ];
    const TINY: [u64; 8] = [0, 1, 511, 512, 513, 4095, 4096, 4097];
    let mut files = BTreeMap::new();
    let mut earlier: Vec<Vec<u8>> = Vec::new();
    for i in 0..320u64 {
        let size = match i % 16 {
            0 => TINY[(i / 16) as usize % TINY.len()],
            1..=8 => rng.range(1024, 64 << 10),
            9..=12 => rng.range(64 << 10, MIB),
            13 | 14 => rng.range(MIB, 3 * MIB),
            _ => rng.range(3 * MIB, 8 * MIB),
        };
        let data = match i % 7 {
            0 => {
                let mut t = String::new();
                let mut n = 0;
                while (t.len() as u64) < size {
                    t.push_str(&format!(
                        "{i:04} line {n:06}: the quick brown fox backs up the lazy dog\n"
                    ));
                    n += 1;
                }
                t.truncate(size as usize);
                t.into_bytes()
            }
            1 => vec![0u8; size as usize],
            2 if !earlier.is_empty() => {
                let j = rng.range(0, earlier.len() as u64 - 1) as usize;
                earlier[j].clone()
            }
            _ => rng.bytes(size),
        };
        if data.len() as u64 <= MIB {
            earlier.push(data.clone());
        }
        let rel = format!("{}/file-{i:03}.dat", DIRS[(i % 10) as usize]);
        write_file(&root.join(&rel), &data);
        files.insert(rel, data.len() as u64);
    }
    let db = rng.bytes(24 * MIB);
    write_file(&root.join("srv/db/data.img"), &db);
    files.insert("srv/db/data.img".into(), db.len() as u64);
    for (target, link) in [
        ("alice/docs", "home/docs"),
        ("../../srv/db/data.img", "var/lib/db.img"),
    ] {
        std::os::unix::fs::symlink(target, root.join(link))
            .unwrap_or_else(|e| panic!("symlink {link}: {e}"));
    }
    files
}

/// The first file of `files` that `pick` accepts.
fn find_file(
    files: &BTreeMap<String, u64>,
    what: &str,
    pick: impl Fn(&String, u64) -> bool,
) -> (String, u64) {
    files
        .iter()
        .find(|(p, s)| pick(p, **s))
        .map(|(p, s)| (p.clone(), *s))
        .unwrap_or_else(|| panic!("the tree has no {what}"))
}

/// Step 3's changes (see `apply_step3` in [`TREE_SH`]) in `delta`; returns the paths that
/// only exist after step 3 and those that step 3 deletes.
fn make_delta(
    delta: &Path,
    files: &BTreeMap<String, u64>,
    rng: &mut Rng,
) -> (Vec<String>, Vec<String>) {
    let paths: Vec<&String> = files.keys().collect();
    let pick = |n: usize| -> &String { paths[n * 37 % paths.len()] };
    // Deleted: eight files and a whole directory.
    let mut deleted: Vec<String> = (0..8).map(|n| pick(n).clone()).collect();
    deleted.retain(|p| !p.starts_with("var/log/old/") && p != "srv/db/data.img");
    deleted.push("var/log/old".into());
    let mut added = Vec::new();
    // New files (about 10 MiB) in a new directory and in an existing one.
    for n in 0..24u64 {
        let rel = if n % 3 == 0 {
            format!("home/alice/docs/new-{n:02}.txt")
        } else {
            format!("new-in-step3/batch-{}/new-{n:02}.bin", n % 4)
        };
        let size = rng_size(rng, n);
        write_file(&delta.join("files").join(&rel), &rng.bytes(size));
        added.push(rel);
    }
    // Rewritten files, with other sizes.
    let mut rewritten = Vec::new();
    for n in 10..15 {
        let p = pick(n).clone();
        if deleted.iter().any(|d| p.starts_with(d.as_str())) || p == "srv/db/data.img" {
            continue;
        }
        let size = files[&p] / 2 + 777;
        write_file(&delta.join("files").join(&p), &rng.bytes(size));
        rewritten.push(p);
    }
    // In-place patches: inside the database (unaligned, across a 256 KiB chunk boundary, at
    // the very start and end), in a medium file, and past the end of a small one (a hole).
    let untouched =
        |p: &String| !deleted.iter().any(|d| p.starts_with(d.as_str())) && !rewritten.contains(p);
    let medium = find_file(files, "medium file of alice's", |p, s| {
        s > 200 << 10 && s < MIB && untouched(p) && p.contains("alice")
    });
    let small = find_file(files, "small file of bob's", |p, s| {
        s > 2000 && s < 60 << 10 && untouched(p) && p.contains("bob")
    });
    let patches: Vec<(String, u64, u64)> = vec![
        ("srv/db/data.img".into(), MIB + 123, 4096),
        ("srv/db/data.img".into(), 3 * (256 << 10) - 5000, 100 << 10),
        ("srv/db/data.img".into(), 0, 512),
        ("srv/db/data.img".into(), 24 * MIB - 4096, 4096),
        (medium.0.clone(), medium.1 / 3, 20_000),
        (small.0.clone(), small.1 + 5000, 3000),
    ];
    let mut list = String::new();
    for (n, (p, off, len)) in patches.iter().enumerate() {
        let name = format!("patches/{n}.bin");
        write_file(&delta.join(&name), &rng.bytes(*len));
        list.push_str(&format!("{p} {off} {name}\n"));
    }
    write_text(&delta.join("patches.txt"), &list);
    // Truncations: a big file shrinks, a tiny one grows (a hole).
    let big = find_file(files, "big file", |p, s| {
        s > 4 * MIB && untouched(p) && p != "srv/db/data.img"
    });
    let tiny = find_file(files, "513-byte file", |p, s| s == 513 && untouched(p)).0;
    write_text(
        &delta.join("truncate.txt"),
        &format!("{} {}\n{tiny} {}\n", big.0, big.1 / 2, MIB + 1),
    );
    // Renames.
    let renamed = find_file(files, "file in etc/app", |p, _| {
        p.starts_with("etc/app/") && untouched(p) && *p != tiny
    })
    .0;
    write_text(
        &delta.join("renames.txt"),
        &format!("{renamed} etc/app/renamed-in-step3.dat\n"),
    );
    added.push("etc/app/renamed-in-step3.dat".into());
    let mut gone = deleted.clone();
    gone.push(renamed);
    write_text(&delta.join("deleted.txt"), &(deleted.join("\n") + "\n"));
    (added, gone)
}

fn rng_size(rng: &mut Rng, n: u64) -> u64 {
    match n % 4 {
        0 => rng.range(100, 8 << 10),
        1 => rng.range(64 << 10, 512 << 10),
        2 => rng.range(MIB, 2 * MIB),
        _ => rng.range(0, 4096),
    }
}

/// What the backups hold, made on the host in the exchange directory: `src1/` (step 2's tree),
/// `step3/` (the incremental's changes), the expected manifests and listings of both points in
/// time (`expect-step{2,3}.{md5,list}`), `added.txt` and `gone.txt` (paths only after, only
/// before step 3), computed with the same tools the guests use.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Step 2's regular files with their sizes.
    pub files: BTreeMap<String, u64>,
    /// Their total size.
    pub total: u64,
    /// The manifests (see `manifest` in [`TREE_SH`]) after steps 2 and 3.
    pub expect2: String,
    pub expect3: String,
}

impl Dataset {
    pub fn create(xchg: &Path) -> Dataset {
        let mut rng = Rng(0x6d61_6173_2d74_6573);
        let files = make_tree(&xchg.join("src1"), &mut rng);
        let total: u64 = files.values().sum();
        let (added, gone) = make_delta(&xchg.join("step3"), &files, &mut rng);
        host_sh(&format!(
            "cd {x}; manifest src1 >expect-step2.md5; listing src1 >expect-step2.list
             cp -a src1 expect3; apply_step3 expect3 step3
             manifest expect3 >expect-step3.md5; listing expect3 >expect-step3.list; rm -rf expect3",
            x = xchg.display()
        ));
        let expect2 = read_text(&xchg.join("expect-step2.md5"));
        let expect3 = read_text(&xchg.join("expect-step3.md5"));
        assert_ne!(expect2, expect3);
        write_text(&xchg.join("added.txt"), &(added.join("\n") + "\n"));
        write_text(&xchg.join("gone.txt"), &(gone.join("\n") + "\n"));
        assert!(files.len() >= 300 && total > 200 * MIB, "{total}");
        Dataset {
            files,
            total,
            expect2,
            expect3,
        }
    }
}

/// How guests reach a MaaS volume: the initiator's shell library and, over it, the four shell
/// functions the scenario's scripts use, with the export's `portal` in `$PORTAL`:
/// `disk_start` (the initiator), `disk_find TARGET` (discovery lists TARGET, else fail),
/// `disk_attach TARGET` (log in or connect; prints the block device) and `disk_detach TARGET`.
#[derive(Debug, Clone, Copy)]
pub struct Protocol {
    /// As the REST API names it.
    pub name: &'static str,
    lib: &'static str,
    disk_sh: &'static str,
}

/// The guests' open-iscsi.
pub const ISCSI: Protocol = Protocol {
    name: "iscsi",
    lib: ISCSI_SH,
    disk_sh: r#"
disk_start() { iscsi_start; }
disk_find() {
    iscsi_discover "$PORTAL" | tee /tmp/targets >&2
    grep -q " $1\$" /tmp/targets || fail "SendTargets does not list $1"
}
disk_attach() { iscsi_login "$1" "$PORTAL" >&2 || fail "login to $1"; iscsi_disk "$1"; }
disk_detach() { iscsi_logout "$1" "$PORTAL" >&2; }
"#,
};

/// The guests' nvme-cli and kernel NVMe/TCP host.
pub const NVME_TCP: Protocol = Protocol {
    name: "nvme-tcp",
    lib: NVME_SH,
    disk_sh: r#"
disk_start() { nvme_start; }
disk_find() {
    nvme_discovered "${PORTAL%:*}" "${PORTAL##*:}" | tee /tmp/subsystems >&2
    grep -qxF "tcp $1 ${PORTAL%:*} ${PORTAL##*:}" /tmp/subsystems \
        || fail "the discovery log does not list $1 at $PORTAL"
}
disk_attach() {
    nvme_connect "${PORTAL%:*}" "${PORTAL##*:}" "$1" >/dev/null || fail "nvme connect $1"
    nvme_ns "$1"
}
disk_detach() { nvme_disconnect "$1"; }
"#,
};

impl Protocol {
    /// A guest with this protocol's shell functions and [`TREE_SH`].
    pub fn guest(&self, name: &str, xchg: &Path, secs: u64) -> Guest {
        Guest::new(name)
            .exchange(xchg)
            .lib(self.lib)
            .lib(TREE_SH)
            .lib(self.disk_sh)
            .timeout(Duration::from_secs(secs))
    }

    /// The guest's name in export allow-lists: its IQN or host NQN.
    pub fn initiator<'g>(&self, g: &'g Guest) -> &'g str {
        match self.name {
            "iscsi" => g.initiator_name(),
            _ => g.host_nqn(),
        }
    }

    /// Exports `vol` over this protocol to these guests.
    pub fn export(&self, m: &Maasd, vol: &str, guests: &[&Guest]) -> Value {
        let names: Vec<&str> = guests.iter().map(|g| self.initiator(g)).collect();
        match self.name {
            "iscsi" => export(m, vol, &names, None),
            _ => nvme_export(m, vol, &names),
        }
    }

    /// What exports of this protocol advertise.
    pub fn advertised<'m>(&self, m: &'m Maasd) -> &'m str {
        match self.name {
            "iscsi" => &m.iscsi_advertise,
            _ => &m.nvme_advertise,
        }
    }
}

/// An export's `portal`.
pub fn portal(e: &Value) -> String {
    e["portal"]
        .as_str()
        .unwrap_or_else(|| panic!("no portal in {e}"))
        .to_string()
}

/// An export's `target` (IQN or subsystem NQN).
pub fn target(e: &Value) -> String {
    e["target"]
        .as_str()
        .unwrap_or_else(|| panic!("no target in {e}"))
        .to_string()
}

/// The initiator name the host's own reads (QEMU's iSCSI driver) use.
pub const READER: &str = "iqn.2026-11.io.maas.test:host-reader";

/// Reads a whole volume from the host, through an iSCSI export `e` to [`READER`], with QEMU
/// 7.2's iSCSI driver (which skips unmapped ranges: GET LBA STATUS) into a sparse raw file at
/// `out`; returns `out`.
pub fn read_raw(m: &Maasd, e: &Value, out: &Path) -> PathBuf {
    let opts = format!(
        "driver=iscsi,transport=tcp,portal=127.0.0.1:{},target={},lun=0,initiator-name={READER}",
        m.iscsi_port,
        target(e)
    );
    let _ = std::fs::remove_file(out);
    let o = run_with_timeout(
        Command::new(qemu_img())
            .args(["convert", "-O", "raw", "--image-opts", &opts])
            .arg(out),
        300,
    );
    assert!(o.status.success(), "qemu-img convert: {}", text(&o));
    out.to_path_buf()
}

/// BLAKE3 of a file.
pub fn digest(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    std::fs::File::open(path)
        .and_then(|f| h.update_reader(f).map(|_| ()))
        .unwrap_or_else(|e| panic!("hashing {}: {e}", path.display()));
    h.finalize().to_hex().to_string()
}

/// The volume the scenario backed up, for a test's further steps.
#[derive(Debug, Clone)]
pub struct BackedUp {
    pub volume: String,
    /// Its export to the backup host.
    pub export: Value,
}

/// Runs the scenario against `m` with guests attaching over `proto`; the exchange directory
/// `xchg` must hold a [`Dataset`]. Scratch images go to `images`.
///
/// 1. A volume through the REST API, exported to the backup host.
/// 2. The full backup: discovery, attach, mkfs, files, checksums, sync, unmount, detach.
/// 3. Seal; the incremental backup from the same host; seal again.
/// 4. Clones of both snapshots, restored on a fresh host: every checksum of its point in time,
///    none of the other's changes, fsck clean; then writes on both clones.
/// 5. The clones kept their writes; the pool re-reads clean; fresh clones of both snapshots and
///    the original volume are bit for bit what they were before.
pub fn mount_and_restore(
    m: &Maasd,
    proto: &Protocol,
    data: &Dataset,
    xchg: &Path,
    images: &Path,
    clock: &mut Clock,
) -> BackedUp {
    std::fs::create_dir_all(images)
        .unwrap_or_else(|e| panic!("creating {}: {e}", images.display()));
    clock.note(&format!(
        "step 2 tree: {} files, {:.1} MiB",
        data.files.len(),
        data.total as f64 / MIB as f64
    ));
    // 1.
    let writer = proto.guest("backup-host", xchg, 600);
    let vol = volume(m, "fileserver", 1 << 30, 512);
    let e = proto.export(m, &vol, &[&writer]);
    assert_eq!(portal(&e), proto.advertised(m));
    let env = |g: &Guest, e: &Value| g.clone().env("PORTAL", portal(e)).env("TARGET", target(e));

    // 2.
    run_ok(
        &env(&writer, &e),
        r#"
set -euo pipefail
disk_start
disk_find "$TARGET"
dev=$(disk_attach "$TARGET")
echo "disk $dev: $(blockdev --getsize64 "$dev") bytes, $(blockdev --getss "$dev")-byte sectors"
mkfs.ext4 -q -F -L backup "$dev"
mkdir -p /mnt/vol
mount "$dev" /mnt/vol
time cp -a /xchg/src1/. /mnt/vol/
manifest /mnt/vol >/xchg/guest-step2.md5
listing /mnt/vol >/xchg/guest-step2.list
time sync
umount /mnt/vol
disk_detach "$TARGET"
"#,
    );
    assert_eq!(
        read_text(&xchg.join("guest-step2.md5")),
        data.expect2,
        "the backup host's checksums differ from the source's"
    );
    clock.lap("step 2: full backup in a guest");

    // 3.
    let snap1 = seal(m, &vol);
    clock.lap("step 3: seal");
    run_ok(
        &env(&writer, &e),
        r#"
set -euo pipefail
disk_start
disk_find "$TARGET"
dev=$(disk_attach "$TARGET")
mkdir -p /mnt/vol
mount "$dev" /mnt/vol
apply_step3 /mnt/vol /xchg/step3
sync
umount /mnt/vol
disk_detach "$TARGET"
"#,
    );
    clock.lap("step 3: incremental backup in a guest");
    let snap2 = seal(m, &vol);
    assert_ne!(snap1, snap2);
    clock.lap("step 3: seal");

    // 4. Before the restore, the host takes a raw image of each clone and of the original.
    let restorer = proto.guest("restore-host", xchg, 600);
    let c1 = clone_snapshot(m, &snap1, "restore-step2");
    let c2 = clone_snapshot(m, &snap2, "restore-step3");
    let e1 = proto.export(m, &c1, &[&restorer]);
    let e2 = proto.export(m, &c2, &[&restorer]);
    let r1 = export(m, &c1, &[READER], None);
    let r2 = export(m, &c2, &[READER], None);
    let ro = export(m, &vol, &[READER], None);
    let h_c1 = digest(&read_raw(m, &r1, &images.join("c1.raw")));
    let h_c2 = digest(&read_raw(m, &r2, &images.join("c2.raw")));
    let h_orig = digest(&read_raw(m, &ro, &images.join("orig.raw")));
    assert_ne!(h_c1, h_c2, "the two snapshots hold different states");
    assert_eq!(h_c2, h_orig, "the second snapshot is the volume as sealed");
    clock.lap("raw images of both clones and the original (host)");
    let garbage = Rng(0xbad).bytes(8 * MIB);
    write_file(&xchg.join("clone-garbage.bin"), &garbage);
    run_ok(
        &restorer
            .clone()
            .env("PORTAL", portal(&e1))
            .env("T1", target(&e1))
            .env("T2", target(&e2)),
        r#"
set -euo pipefail
disk_start
for t in "$T1" "$T2"; do disk_find "$t"; done
d1=$(disk_attach "$T1"); d2=$(disk_attach "$T2")
# verify DEV NAME STEP: a read-only mount holds exactly STEP's files, then fsck -n is clean.
verify() {
    mkdir -p "/mnt/$2"
    mount -o ro "$1" "/mnt/$2"
    (cd "/mnt/$2" && md5sum -c --quiet "/xchg/expect-$3.md5") || fail "$2: checksums differ"
    listing "/mnt/$2" | diff -u "/xchg/expect-$3.list" - || fail "$2: the file tree differs"
    echo "$2: $(wc -l <"/xchg/expect-$3.md5") files verified"
    umount "/mnt/$2"
    fsck.ext4 -n -f "$1" || fail "$2: fsck.ext4 -n found problems"
}
verify "$d1" snap1 step2
# The first snapshot has none of step 3's changes, and everything step 3 removed.
mount -o ro "$d1" /mnt/snap1
while read -r p; do [ ! -e "/mnt/snap1/$p" ] || fail "snap1 has $p (added by step 3)"; done </xchg/added.txt
while read -r p; do [ -e "/mnt/snap1/$p" ] || fail "snap1 lacks $p"; done </xchg/gone.txt
umount /mnt/snap1
verify "$d2" snap2 step3
mount -o ro "$d2" /mnt/snap2
while read -r p; do [ -e "/mnt/snap2/$p" ] || fail "snap2 lacks $p"; done </xchg/added.txt
while read -r p; do [ ! -e "/mnt/snap2/$p" ] || fail "snap2 still has $p"; done </xchg/gone.txt
umount /mnt/snap2
# Writes on the clones: files changed and removed, new ones, and raw garbage under ext4.
mount "$d1" /mnt/snap1
rm -rf /mnt/snap1/home /mnt/snap1/srv/db/archive
dd if=/dev/urandom of=/mnt/snap1/srv/db/data.img bs=64k count=64 conv=notrunc status=none
head -c 16M /dev/urandom >/mnt/snap1/clone-only.bin
echo clone1 >/mnt/snap1/CLONE-MARK
umount /mnt/snap1
mount "$d2" /mnt/snap2
find /mnt/snap2/new-in-step3 -type f -exec truncate -s 0 {} +
echo clone2 >/mnt/snap2/CLONE-MARK
umount /mnt/snap2
dd if=/xchg/clone-garbage.bin of="$d2" bs=1M seek=300 oflag=direct conv=fsync status=none
sync
disk_detach "$T1"
disk_detach "$T2"
"#,
    );
    clock.lap("steps 4-5: both clones restored, verified, fsck'd, written in a fresh guest");

    // 5.
    let c1_after = read_raw(m, &r1, &images.join("c1.raw"));
    assert_ne!(digest(&c1_after), h_c1, "clone 1 lost its writes");
    let c2_after = read_raw(m, &r2, &images.join("c2.raw"));
    let raw = std::fs::read(&c2_after).unwrap_or_else(|e| panic!("reading c2.raw: {e}"));
    assert!(
        raw.get(300 * MIB as usize..308 * MIB as usize) == Some(&garbage[..]),
        "clone 2 lost its raw write"
    );
    let report = verify_pool(m);
    assert_eq!(report["damaged"], json!([]), "{report}");
    let c1b = clone_snapshot(m, &snap1, "again-step2");
    let c2b = clone_snapshot(m, &snap2, "again-step3");
    let e1b = export(m, &c1b, &[READER], None);
    let e2b = export(m, &c2b, &[READER], None);
    assert_eq!(
        digest(&read_raw(m, &e1b, &images.join("c1b.raw"))),
        h_c1,
        "the first snapshot changed"
    );
    assert_eq!(
        digest(&read_raw(m, &e2b, &images.join("c2b.raw"))),
        h_c2,
        "the second snapshot changed"
    );
    assert_eq!(
        digest(&read_raw(m, &ro, &images.join("orig.raw"))),
        h_orig,
        "the original volume changed"
    );
    clock.lap("step 5: originals bit for bit unchanged after the clone writes (host)");
    BackedUp {
        volume: vol,
        export: e,
    }
}
