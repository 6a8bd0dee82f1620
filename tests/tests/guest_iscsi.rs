#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real Linux hosts over iSCSI: Debian's kernel and the host's own open-iscsi, e2fsprogs and fio
//! in QEMU guests (`scripts/guest-build.sh`, `maas_tests::guest`) against the real `maasd`.
//!
//! - `mount_and_restore_workflow`: a host backs up a file tree onto a MaaS volume, the volume is
//!   sealed, an incremental backup changes it, sealed again; clones of both snapshots restore
//!   exactly their point in time to a fresh host, `fsck.ext4 -n` finds them clean, writes on
//!   the clones touch neither the snapshots nor the original; unlisted initiators and wrong
//!   CHAP secrets are refused at login.
//! - `fio_verify_survives_maasd_sigkill`: fio writes with `O_DSYNC` (every write FUA) and
//!   crc32c verify headers while `maasd` is SIGKILLed and restarted; the session recovers and
//!   every write fio saw complete verifies, then again after a second crash with all writes done.
//!
//! Run alone with `cargo test -p maas-tests --test guest_iscsi -- --nocapture` (timings on
//! stderr). TCG is slow: guests are for correctness, not speed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use maas_tests::TestDir;
use maas_tests::guest::{Guest, GuestRun, ISCSI_SH};
use maas_tests::maasd::{Maasd, clone_snapshot, export, maasd_bin, seal, verify_pool, volume};
use maas_tests::peers::{qemu_img, run_with_timeout, text};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// Shell functions used on both sides: the host computes what the guests must find with the
/// same tools the guests use.
const TREE_SH: &str = r#"
# manifest DIR: the MD5 of every regular file, sorted by path (lost+found aside).
manifest() {
    (cd "$1" && find . -path ./lost+found -prune -o -type f -print0 | LC_ALL=C sort -z \
        | xargs -0 -r md5sum)
}
# listing DIR: every entry with its type (and a file's size, a link's target), sorted.
listing() {
    (cd "$1" && find . -path ./lost+found -prune -o \( -type f -printf 'f %s %p\n' \) \
        -o \( -type d -printf 'd %p\n' \) -o \( -type l -printf 'l %l %p\n' \) | LC_ALL=C sort)
}
# apply_step3 ROOT DELTA: the incremental backup's changes — deletions, new and rewritten
# files, in-place patches (PATH OFFSET PATCHFILE), truncations (PATH SIZE), renames (FROM TO).
apply_step3() {
    local root="$1" delta="$2" p off patch size to
    while read -r p; do rm -rf "${root:?}/$p"; done <"$delta/deleted.txt"
    cp -a "$delta/files/." "$root/"
    while read -r p off patch; do
        dd if="$delta/$patch" of="$root/$p" bs=64k conv=notrunc oflag=seek_bytes seek="$off" \
            status=none
    done <"$delta/patches.txt"
    while read -r p size; do truncate -s "$size" "$root/$p"; done <"$delta/truncate.txt"
    while read -r p to; do mv "$root/$p" "$root/$to"; done <"$delta/renames.txt"
}
"#;

/// Runs `script` under bash on the host with [`TREE_SH`]; returns stdout.
fn host_sh(script: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{TREE_SH}\n{script}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "host script failed: {script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Prints how long each step took (run with --nocapture to see them).
struct Clock {
    test: &'static str,
    start: Instant,
    step: Instant,
}

impl Clock {
    fn new(test: &'static str) -> Clock {
        Clock {
            test,
            start: Instant::now(),
            step: Instant::now(),
        }
    }

    fn lap(&mut self, what: &str) {
        eprintln!(
            "[{}] {what}: {:.1} s (total {:.1} s)",
            self.test,
            self.step.elapsed().as_secs_f64(),
            self.start.elapsed().as_secs_f64()
        );
        self.step = Instant::now();
    }
}

/// A deterministic pseudo-random stream (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn bytes(&mut self, n: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(n as usize + 8);
        while (v.len() as u64) < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n as usize);
        v
    }
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::File::create(path)
        .unwrap()
        .write_all(data)
        .unwrap();
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
    std::os::unix::fs::symlink("alice/docs", root.join("home/docs")).unwrap();
    std::os::unix::fs::symlink("../../srv/db/data.img", root.join("var/lib/db.img")).unwrap();
    files
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
    let medium = files
        .iter()
        .find(|(p, s)| **s > 200 << 10 && **s < MIB && untouched(p) && p.contains("alice"))
        .map(|(p, s)| (p.clone(), *s))
        .unwrap();
    let small = files
        .iter()
        .find(|(p, s)| **s > 2000 && **s < 60 << 10 && untouched(p) && p.contains("bob"))
        .map(|(p, s)| (p.clone(), *s))
        .unwrap();
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
    std::fs::write(delta.join("patches.txt"), list).unwrap();
    // Truncations: a big file shrinks, a tiny one grows (a hole).
    let big = files
        .iter()
        .find(|(p, s)| **s > 4 * MIB && untouched(p) && *p != "srv/db/data.img")
        .map(|(p, s)| (p.clone(), *s))
        .unwrap();
    let tiny = files
        .iter()
        .find(|(p, s)| **s == 513 && untouched(p))
        .map(|(p, _)| p.clone())
        .unwrap();
    std::fs::write(
        delta.join("truncate.txt"),
        format!("{} {}\n{tiny} {}\n", big.0, big.1 / 2, MIB + 1),
    )
    .unwrap();
    // Renames.
    let renamed = files
        .keys()
        .find(|p| p.starts_with("etc/app/") && untouched(p) && **p != tiny)
        .unwrap()
        .clone();
    std::fs::write(
        delta.join("renames.txt"),
        format!("{renamed} etc/app/renamed-in-step3.dat\n"),
    )
    .unwrap();
    added.push("etc/app/renamed-in-step3.dat".into());
    let mut gone = deleted.clone();
    gone.push(renamed);
    std::fs::write(delta.join("deleted.txt"), deleted.join("\n") + "\n").unwrap();
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

fn guest(name: &str, xchg: &Path, secs: u64) -> Guest {
    Guest::new(name)
        .exchange(xchg)
        .lib(ISCSI_SH)
        .lib(TREE_SH)
        .timeout(Duration::from_secs(secs))
}

fn portal(e: &Value) -> String {
    e["portal"].as_str().unwrap().to_string()
}

fn target(e: &Value) -> String {
    e["target"].as_str().unwrap().to_string()
}

/// The initiator name the host's own reads (QEMU's iSCSI driver) use.
const READER: &str = "iqn.2026-11.io.maas.test:host-reader";

/// Reads a whole export from the host with QEMU 7.2's iSCSI driver (which skips unmapped
/// ranges: GET LBA STATUS) into a sparse raw file at `out`; returns `out`.
fn read_raw(m: &Maasd, e: &Value, out: &Path) -> PathBuf {
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
fn digest(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).unwrap()).unwrap();
    h.finalize().to_hex().to_string()
}

/// One scenario at a time in this process (`cargo test` runs tests in parallel; nextest runs
/// guest tests one at a time anyway, see .config/nextest.toml): two TCG guests on two cores
/// only slow each other down.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a guest and asserts it succeeded.
fn run_ok(g: &Guest, script: &str) -> GuestRun {
    let run = g.run(script);
    run.assert_success();
    run
}

#[test]
fn mount_and_restore_workflow() {
    let _one = one_at_a_time();
    let mut clock = Clock::new("mount_and_restore");
    let tmp = TestDir::new("guest-iscsi-");
    let xchg = tmp.path().join("xchg");
    std::fs::create_dir_all(&xchg).unwrap();
    let m = Maasd::builder(maasd_bin(), &tmp.path().join("maasd"))
        .device_size(4 << 30)
        .guest_portal()
        .start();

    // What the backups hold, computed on the host with the same tools the guests use.
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
    let expect2 = std::fs::read_to_string(xchg.join("expect-step2.md5")).unwrap();
    let expect3 = std::fs::read_to_string(xchg.join("expect-step3.md5")).unwrap();
    assert_ne!(expect2, expect3);
    std::fs::write(xchg.join("added.txt"), added.join("\n") + "\n").unwrap();
    std::fs::write(xchg.join("gone.txt"), gone.join("\n") + "\n").unwrap();
    eprintln!(
        "[mount_and_restore] step 2 tree: {} files, {:.1} MiB",
        files.len(),
        total as f64 / MIB as f64
    );
    assert!(files.len() >= 300 && total > 200 * MIB, "{total}");
    clock.lap("data set on the host");

    // 1. A volume through the REST API, exported to the backup host's initiator name.
    let writer = guest("backup-host", &xchg, 600);
    let vol = volume(&m, "fileserver", 1 << 30, 512);
    let e = export(&m, &vol, &[writer.initiator_name()], None);
    assert_eq!(portal(&e), m.iscsi_advertise);
    let env = |g: Guest, e: &Value| g.env("PORTAL", portal(e)).env("TARGET", target(e));

    // 2. The full backup: discovery, login, mkfs, files, checksums, sync, unmount, logout.
    run_ok(
        &env(writer.clone(), &e),
        r#"
set -euo pipefail
iscsi_start
iscsi_discover "$PORTAL" | tee /tmp/targets
grep -q " $TARGET\$" /tmp/targets || fail "SendTargets does not list $TARGET"
iscsi_login "$TARGET" "$PORTAL"
dev=$(iscsi_disk "$TARGET")
echo "disk $dev: $(blockdev --getsize64 "$dev") bytes, $(blockdev --getss "$dev")-byte sectors"
mkfs.ext4 -q -F -L backup "$dev"
mkdir -p /mnt/vol
mount "$dev" /mnt/vol
time cp -a /xchg/src1/. /mnt/vol/
manifest /mnt/vol >/xchg/guest-step2.md5
listing /mnt/vol >/xchg/guest-step2.list
time sync
umount /mnt/vol
iscsi_logout "$TARGET" "$PORTAL"
"#,
    );
    assert_eq!(
        std::fs::read_to_string(xchg.join("guest-step2.md5")).unwrap(),
        expect2,
        "the backup host's checksums differ from the source's"
    );
    clock.lap("step 2: full backup in a guest");

    // 3. Seal; the incremental backup from the same host; seal again.
    let snap1 = seal(&m, &vol);
    run_ok(
        &env(writer.clone(), &e),
        r#"
set -euo pipefail
iscsi_start
iscsi_discover "$PORTAL" >/dev/null
iscsi_login "$TARGET" "$PORTAL"
dev=$(iscsi_disk "$TARGET")
mkdir -p /mnt/vol
mount "$dev" /mnt/vol
apply_step3 /mnt/vol /xchg/step3
sync
umount /mnt/vol
iscsi_logout "$TARGET" "$PORTAL"
"#,
    );
    let snap2 = seal(&m, &vol);
    assert_ne!(snap1, snap2);
    clock.lap("step 3: seal, incremental backup in a guest, seal");

    // 4-5. Clones of both snapshots, restored on a fresh host: every checksum of its point in
    // time, none of the other's changes, fsck clean; then writes on both clones. Before, the
    // host takes a raw image of each clone and of the original (QEMU's iSCSI driver).
    let restorer = guest("restore-host", &xchg, 600);
    let c1 = clone_snapshot(&m, &snap1, "restore-step2");
    let c2 = clone_snapshot(&m, &snap2, "restore-step3");
    let e1 = export(&m, &c1, &[restorer.initiator_name(), READER], None);
    let e2 = export(&m, &c2, &[restorer.initiator_name(), READER], None);
    let eo = export(&m, &vol, &[READER], None);
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let h_c1 = digest(&read_raw(&m, &e1, &images.join("c1.raw")));
    let h_c2 = digest(&read_raw(&m, &e2, &images.join("c2.raw")));
    let h_orig = digest(&read_raw(&m, &eo, &images.join("orig.raw")));
    assert_ne!(h_c1, h_c2, "the two snapshots hold different states");
    assert_eq!(h_c2, h_orig, "the second snapshot is the volume as sealed");
    clock.lap("raw images of both clones and the original (host)");
    let garbage = Rng(0xbad).bytes(8 * MIB);
    std::fs::write(xchg.join("clone-garbage.bin"), &garbage).unwrap();
    run_ok(
        &restorer
            .clone()
            .env("PORTAL", portal(&e1))
            .env("T1", target(&e1))
            .env("T2", target(&e2)),
        r#"
set -euo pipefail
iscsi_start
iscsi_discover "$PORTAL" | tee /tmp/targets
for t in "$T1" "$T2"; do
    grep -q " $t\$" /tmp/targets || fail "SendTargets does not list $t"
    iscsi_login "$t" "$PORTAL"
done
d1=$(iscsi_disk "$T1"); d2=$(iscsi_disk "$T2")
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
iscsi_logout "$T1" "$PORTAL"
iscsi_logout "$T2" "$PORTAL"
"#,
    );
    clock.lap("steps 4-5: both clones restored, verified, fsck'd, written in a fresh guest");

    // The clones kept their writes; the originals are unchanged by them: the pool re-reads
    // clean, fresh clones of both snapshots and the original volume are bit for bit what they
    // were before.
    let c1_after = read_raw(&m, &e1, &images.join("c1.raw"));
    assert_ne!(digest(&c1_after), h_c1, "clone 1 lost its writes");
    let c2_after = read_raw(&m, &e2, &images.join("c2.raw"));
    let raw = std::fs::read(&c2_after).unwrap();
    assert!(
        raw[300 * MIB as usize..308 * MIB as usize] == garbage[..],
        "clone 2 lost its raw write"
    );
    let report = verify_pool(&m);
    assert_eq!(report["damaged"], json!([]), "{report}");
    let c1b = clone_snapshot(&m, &snap1, "again-step2");
    let c2b = clone_snapshot(&m, &snap2, "again-step3");
    let e1b = export(&m, &c1b, &[READER], None);
    let e2b = export(&m, &c2b, &[READER], None);
    assert_eq!(
        digest(&read_raw(&m, &e1b, &images.join("c1b.raw"))),
        h_c1,
        "the first snapshot changed"
    );
    assert_eq!(
        digest(&read_raw(&m, &e2b, &images.join("c2b.raw"))),
        h_c2,
        "the second snapshot changed"
    );
    assert_eq!(
        digest(&read_raw(&m, &eo, &images.join("orig.raw"))),
        h_orig,
        "the original volume changed"
    );
    clock.lap("step 5: originals bit for bit unchanged after the clone writes (host)");

    // 6. Access control at login: an initiator that is not listed sees no target and cannot
    // log in; with CHAP, no or a wrong secret fails and the right one works, mutual CHAP too.
    let outsider = guest("outsider", &xchg, 300);
    let chap_vol = volume(&m, "chap", 64 * MIB, 512);
    let (user, secret) = ("backup-host", "s3cret-s3cret-42");
    let (muser, msecret) = ("maas-target", "m-s3cret-m-s3cret");
    let ec = export(
        &m,
        &chap_vol,
        &[outsider.initiator_name()],
        Some(
            json!({"user": user, "secret": secret, "mutual_user": muser, "mutual_secret": msecret}),
        ),
    );
    let run = run_ok(
        &outsider
            .clone()
            .env("PORTAL", portal(&e))
            .env("ORIG", target(&e))
            .env("CHAPT", target(&ec))
            .env("USER_", user)
            .env("SECRET", secret)
            .env("MUSER", muser)
            .env("MSECRET", msecret),
        r#"
set -uo pipefail
iscsi_start
iscsi_discover "$PORTAL" >/tmp/targets 2>&1; cat /tmp/targets
grep -q "$ORIG" /tmp/targets && fail "SendTargets shows an unlisted initiator $ORIG"
grep -q " $CHAPT\$" /tmp/targets || fail "SendTargets hides $CHAPT from a listed initiator"
sessions() { ls /sys/class/iscsi_session | wc -l; }
# refused LABEL TARGET STATUS: the login fails with iscsiadm's STATUS (24: authorization
# failure, from the target; 19: non-retryable, the initiator refused the target) and leaves no
# session.
refused() {
    local rc=0
    iscsi_login "$2" "$PORTAL" || rc=$?
    [ "$rc" != 0 ] || fail "$1: logged in"
    echo "$1: refused (iscsiadm status $rc)"
    [ "$rc" = "$3" ] || fail "$1: iscsiadm status $rc, expected $3"
    [ "$(sessions)" = 0 ] || fail "$1: a session remains"
}
# An initiator missing from the allow-list, with a node record made by hand.
iscsi_node "$ORIG" "$PORTAL"
refused unlisted "$ORIG" 24
refused no-chap "$CHAPT" 24
iscsi_chap "$CHAPT" "$PORTAL" "$USER_" wrong-secret-wrong
refused wrong-secret "$CHAPT" 24
iscsi_chap "$CHAPT" "$PORTAL" "$USER_" "$SECRET"
iscsi_login "$CHAPT" "$PORTAL" || fail "one-way CHAP with the right secret"
dd if="$(iscsi_disk "$CHAPT")" of=/dev/null bs=4k count=16 iflag=direct status=none || fail "read"
iscsi_logout "$CHAPT" "$PORTAL"
echo "one-way CHAP: logged in"
# Mutual CHAP: the initiator refuses a target that does not know the secret it expects.
iscsi_chap "$CHAPT" "$PORTAL" "$USER_" "$SECRET" "$MUSER" not-the-target-secret
refused wrong-mutual-secret "$CHAPT" 19
iscsi_chap "$CHAPT" "$PORTAL" "$USER_" "$SECRET" "$MUSER" "$MSECRET"
iscsi_login "$CHAPT" "$PORTAL" || fail "mutual CHAP with the right secrets"
dd if="$(iscsi_disk "$CHAPT")" of=/dev/null bs=4k count=16 iflag=direct status=none || fail "read"
iscsi_logout "$CHAPT" "$PORTAL"
echo "mutual CHAP: logged in"
"#,
    );
    for label in ["unlisted", "no-chap", "wrong-secret", "wrong-mutual-secret"] {
        assert!(
            run.output.contains(&format!("{label}: refused")),
            "{label}\n{run}"
        );
    }
    let log = m.log();
    assert!(
        log.contains("login refused"),
        "maasd logs refused logins:\n{log}"
    );
    clock.lap("step 6: allow-list and CHAP at login");
    drop(m);
    clock.lap("done");
}

/// The pieces of maasd's log after its `n`th start (0: the first).
fn log_since_start(log: &str, n: usize) -> String {
    let starts: Vec<usize> = log
        .match_indices("iSCSI target listening")
        .map(|(i, _)| i)
        .collect();
    assert!(
        starts.len() > n,
        "maasd started {} times:\n{log}",
        starts.len()
    );
    log[starts[n]..].to_string()
}

#[test]
fn fio_verify_survives_maasd_sigkill() {
    let _one = one_at_a_time();
    let mut clock = Clock::new("fio_sigkill");
    let tmp = TestDir::new("guest-iscsi-");
    let mut m = Maasd::builder(maasd_bin(), &tmp.path().join("maasd"))
        .guest_portal()
        .start();
    let g = Guest::new("fio-host")
        .lib(ISCSI_SH)
        .timeout(Duration::from_secs(600));
    let vol = volume(&m, "fio", 256 * MIB, 4096);
    let e = export(&m, &vol, &[g.initiator_name()], None);
    let size = 48 * MIB;
    let g = g
        .env("PORTAL", portal(&e))
        .env("TARGET", target(&e))
        .env("SIZE", size);
    // Every write is O_DSYNC (FUA): fio counts a write done only once maasd made it durable,
    // so a SIGKILL may lose nothing fio saw complete; verify headers (crc32c, offset, length)
    // catch lost, stale, misplaced or torn blocks.
    let mut running = g.spawn(
        r#"
set -uo pipefail
iscsi_start
iscsi_discover "$PORTAL" >/dev/null
iscsi_login "$TARGET" "$PORTAL" || fail login
dev=$(iscsi_disk "$TARGET")
sectors() { awk '{print $7}' "/sys/block/${dev#/dev/}/stat"; }
recoveries() { grep -c "operational after recovery" "$MAAS_RUN/iscsid.log"; }
JOB=(--name=durable --filename="$dev" --direct=1 --sync=dsync --ioengine=libaio --iodepth=8
     --rw=randwrite --bsrange=4k-64k --size="$SIZE" --randrepeat=1 --verify=crc32c
     --verify_fatal=1 --output-format=json)
fio "${JOB[@]}" --output="$MAAS_RUN/fio.json" &
FIO=$!
until [ "$(sectors)" -ge $((SIZE / 512 / 4)) ]; do
    kill -0 $FIO 2>/dev/null || fail "fio ended early: $(cat "$MAAS_RUN/fio.json")"
    sleep 0.2
done
echo "under way: $(sectors) sectors written"
mark under-way
# The host SIGKILLs maasd and starts it again: the session must recover while fio writes.
until [ "$(recoveries)" -ge 1 ]; do
    kill -0 $FIO 2>/dev/null || fail "fio ended before the session recovered"
    sleep 0.2
done
written=$(sectors)
echo "recovered while fio ran: $written of $((SIZE / 512)) sectors written"
[ "$written" -lt $((SIZE / 512)) ] || fail "the write phase was over before the recovery"
wait $FIO; rc=$?
cat "$MAAS_RUN/fio.json"
[ $rc = 0 ] || fail "fio failed ($rc)"
mark written
# A second crash with every write done: all of it must read back.
for i in $(seq 600); do [ "$(recoveries)" -ge 2 ] && break; sleep 0.2; done
[ "$(recoveries)" -ge 2 ] || fail "no second recovery"
fio "${JOB[@]}" --verify_only --output="$MAAS_RUN/fio-verify.json"; rc=$?
cat "$MAAS_RUN/fio-verify.json"
[ $rc = 0 ] || fail "fio --verify_only failed ($rc)"
iscsi_logout "$TARGET" "$PORTAL"
dmesg | grep -E "connection|session" | tail -20
"#,
    );
    running.wait_for_mark("under-way", Duration::from_secs(300));
    clock.lap("boot, login, first quarter of the writes");
    m.kill9();
    std::thread::sleep(Duration::from_secs(2));
    m.start_again();
    clock.lap("maasd SIGKILLed and restarted mid-run");
    running.wait_for_mark("written", Duration::from_secs(400));
    clock.lap("fio write + verify phases done");
    m.kill9();
    std::thread::sleep(Duration::from_secs(1));
    m.start_again();
    let run = running.wait();
    run.assert_success();
    clock.lap("second SIGKILL, fio --verify_only");

    // fio: no errors; every byte written and read back verified, twice.
    let json_of = |name: &str| -> Value {
        let text = run.file(name);
        serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
            .unwrap_or_else(|e| panic!("{name}: {e}\n{text}\n{run}"))
    };
    let first = json_of("fio.json");
    let job = &first["jobs"][0];
    assert_eq!(job["error"], 0, "{first}");
    assert_eq!(job["write"]["io_bytes"], size, "{first}");
    assert_eq!(
        job["read"]["io_bytes"], size,
        "the verify phase read it all: {first}"
    );
    let second = json_of("fio-verify.json");
    let job = &second["jobs"][0];
    assert_eq!(job["error"], 0, "{second}");
    assert_eq!(job["read"]["io_bytes"], size, "{second}");
    assert_eq!(
        job["read"]["total_ios"], first["jobs"][0]["write"]["total_ios"],
        "every write read back: {second}"
    );
    for l in run
        .output
        .lines()
        .filter(|l| l.starts_with("under way") || l.starts_with("recovered"))
    {
        eprintln!("[fio_sigkill] guest: {l}");
    }
    // The initiator really lost its session twice and came back each time, to a new maasd.
    let iscsid = run.file("iscsid.log");
    assert_eq!(
        iscsid.matches("operational after recovery").count(),
        2,
        "{iscsid}"
    );
    let log = m.log();
    for n in 1..=2 {
        let after = log_since_start(&log, n);
        assert!(
            after
                .lines()
                .any(|l| l.contains("logged in") && l.contains(g.initiator_name())),
            "no login from the guest after restart {n}:\n{after}"
        );
    }
    m.stop();
    clock.lap("done");
}
