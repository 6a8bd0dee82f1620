#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The archive tier end to end with a real Linux host: a guest backs up a file tree onto an
//! ext4 filesystem on a MaaS volume (open-iscsi, the guest's kernel); the volume is sealed,
//! pushed to an S3 server (s3s-fs), and the local copy evicted. Then, as after the loss of the
//! MaaS server, a fresh maasd with an empty data directory is given the same bucket: it
//! imports it, rehydrates the snapshot, clones it, and a second host logs in to the clone,
//! finds every file's checksum as backed up, and fsck.ext4 finds the filesystem clean.
//!
//! Before that, on the first maasd, the evicted snapshot is mounted straight from the bucket
//! (nothing of it local: the volume is deleted too): with the S3 server down, a host's read
//! fails (EREMOTEIO: the target failed; never other bytes); with the server back, the host mounts the clone
//! and every file checks out as its chunks arrive.
//!
//! Run alone with `cargo test -p maas-tests --test guest_archive -- --nocapture`.

use maas_tests::TestDir;
use maas_tests::guest::workflow::{
    Clock, Dataset, ISCSI, one_at_a_time, portal, read_text, run_ok, target,
};
use maas_tests::maasd::{Maasd, clone_snapshot, maasd_bin, seal, volume};
use maas_tests::s3::{ACCESS_KEY, Kind, S3Server, SECRET_KEY};
use serde_json::json;

fn create_target(m: &Maasd, endpoint: &str) -> String {
    let (s, t) = m.call(
        "POST",
        "/archive-targets",
        Some(json!({
            "name": "offsite",
            "endpoint": endpoint,
            "bucket": "maas",
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
        })),
    );
    assert_eq!(s, 201, "{t}");
    t["id"].as_str().unwrap().to_string()
}

fn job(m: &Maasd, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
    let (s, j) = m.call("POST", path, body);
    assert_eq!(s, 202, "{path}: {j}");
    m.wait_job(&j)
}

#[test]
fn a_host_backup_archived_evicted_and_restored_on_a_fresh_maasd_checks_out() {
    let _one = one_at_a_time();
    let mut clock = Clock::new("archive");
    let tmp = TestDir::new("guest-archive-");
    let xchg = tmp.path().join("xchg");
    std::fs::create_dir_all(&xchg).unwrap();
    let mut s3 = S3Server::start(Kind::S3sFs, &tmp.path().join("s3"));
    s3.create_bucket("maas", false);
    let m = Maasd::builder(maasd_bin(), &tmp.path().join("maasd"))
        .device_size(4 << 30)
        .guest_portal()
        .start();
    let data = Dataset::create(&xchg);
    clock.lap("data set on the host");

    // The backup: a host writes a file tree onto ext4 on a MaaS volume.
    let writer = ISCSI.guest("backup-host", &xchg, 600);
    let vol = volume(&m, "fileserver", 1 << 30, 512);
    let e = ISCSI.export(&m, &vol, &[&writer]);
    run_ok(
        &writer
            .clone()
            .env("PORTAL", portal(&e))
            .env("TARGET", target(&e)),
        r#"
set -euo pipefail
disk_start
disk_find "$TARGET"
dev=$(disk_attach "$TARGET")
mkfs.ext4 -q -F -L backup "$dev"
mkdir -p /mnt/vol
mount "$dev" /mnt/vol
cp -a /xchg/src1/. /mnt/vol/
manifest /mnt/vol >/xchg/guest-step2.md5
sync
umount /mnt/vol
disk_detach "$TARGET"
"#,
    );
    assert_eq!(read_text(&xchg.join("guest-step2.md5")), data.expect2);
    clock.lap("backup in a guest");

    // Seal, archive, evict.
    let snap = seal(&m, &vol);
    let t = create_target(&m, &s3.endpoint());
    let j = job(
        &m,
        &format!("/snapshots/{snap}/archive"),
        Some(json!({"target": t})),
    );
    clock.note(&format!("archive: {}", j["result"]));
    job(&m, &format!("/snapshots/{snap}/evict"), None);
    assert_eq!(
        m.ok("GET", &format!("/snapshots/{snap}"), None)["location"],
        "archive"
    );
    clock.lap("seal, archive, evict");

    // Mounted straight from the bucket.
    m.ok("DELETE", &format!("/volumes/{vol}"), None);
    let mounted = clone_snapshot(&m, &snap, "mounted");
    let reader = ISCSI.guest("lazy-host", &xchg, 900);
    let el = ISCSI.export(&m, &mounted, &[&reader]);
    let reader = reader
        .clone()
        .env("PORTAL", portal(&el))
        .env("TARGET", target(&el));
    s3.kill();
    run_ok(
        &reader,
        r#"
set -euo pipefail
disk_start
disk_find "$TARGET"
dev=$(disk_attach "$TARGET")
if dd if="$dev" of=/dev/null bs=1M count=64 iflag=direct 2>/xchg/lazy-dd.err; then
    fail "a read succeeded while the bucket holding its data was down"
fi
disk_detach "$TARGET"
"#,
    );
    // Linux reports the target's failure (HARDWARE ERROR, not MEDIUM ERROR: nothing is known
    // to be damaged) as EREMOTEIO.
    let err = read_text(&xchg.join("lazy-dd.err"));
    assert!(
        err.contains("Remote I/O error") || err.contains("Input/output error"),
        "{err}"
    );
    clock.lap("mounted from the bucket, bucket down: the host's read fails");
    s3.restart();
    run_ok(
        &reader,
        r#"
set -euo pipefail
disk_start
disk_find "$TARGET"
dev=$(disk_attach "$TARGET")
mkdir -p /mnt/m
mount -o ro "$dev" /mnt/m
(cd /mnt/m && md5sum -c --quiet /xchg/expect-step2.md5) || fail "checksums differ when mounted from the bucket"
umount /mnt/m
fsck.ext4 -n -f "$dev" || fail "fsck.ext4 -n found problems"
disk_detach "$TARGET"
"#,
    );
    clock.lap("mounted from the bucket: every file checks out");
    drop(m); // the server is gone

    // A fresh maasd, the same bucket.
    let fresh = Maasd::builder(maasd_bin(), &tmp.path().join("fresh"))
        .device_size(4 << 30)
        .guest_portal()
        .start();
    let t2 = create_target(&fresh, &s3.endpoint());
    let j = job(&fresh, &format!("/archive-targets/{t2}/import"), None);
    assert_eq!(j["result"]["snapshots_imported"], json!([snap]), "{j}");
    let j = job(&fresh, &format!("/snapshots/{snap}/rehydrate"), None);
    clock.note(&format!("rehydrate: {}", j["result"]));
    let c = clone_snapshot(&fresh, &snap, "restored");
    clock.lap("import, rehydrate, clone on a fresh maasd");

    let restorer = ISCSI.guest("restore-host", &xchg, 600);
    let ec = ISCSI.export(&fresh, &c, &[&restorer]);
    run_ok(
        &restorer
            .clone()
            .env("PORTAL", portal(&ec))
            .env("TARGET", target(&ec)),
        r#"
set -euo pipefail
disk_start
disk_find "$TARGET"
dev=$(disk_attach "$TARGET")
mkdir -p /mnt/r
mount -o ro "$dev" /mnt/r
(cd /mnt/r && md5sum -c --quiet /xchg/expect-step2.md5) || fail "checksums differ after the round trip through the bucket"
echo "verified $(wc -l </xchg/expect-step2.md5) files"
umount /mnt/r
fsck.ext4 -n -f "$dev" || fail "fsck.ext4 -n found problems"
disk_detach "$TARGET"
"#,
    );
    clock.lap("restore host verified every file");
}
