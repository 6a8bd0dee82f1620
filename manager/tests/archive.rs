#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The archive tier through the real maasd: targets checked against real S3 servers (s3s-fs,
//! moto) before they are stored, their secrets kept; snapshots written by QEMU over iSCSI
//! pushed incrementally, with progress, inspected with aws-cli; object lock retention on the
//! objects; maasd killed in the middle of a push and the push resumed.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::iscsi::{
    QEMU_INITIATOR, clone_snapshot, export, qemu_img, qemu_opts, run_with_timeout, seal, text,
    volume,
};
use common::*;
use maas_tests::TestDir;
use maas_tests::relay::Relay;
use maas_tests::s3::{ACCESS_KEY, Kind, S3Server, SECRET_KEY};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

fn target_body(name: &str, endpoint: &str, bucket: &str) -> Value {
    json!({
        "name": name,
        "endpoint": endpoint,
        "bucket": bucket,
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
    })
}

fn create_target(m: &Maasd, body: Value) -> String {
    let (s, t) = m.call("POST", "/archive-targets", Some(body));
    assert_eq!(s, 201, "{t}");
    t["id"].as_str().unwrap().to_string()
}

/// Writes `bytes` of random data (from a file, returned) into a volume with qemu-img over iSCSI.
fn qemu_write(m: &Maasd, dir: &std::path::Path, vol: &str, name: &str, bytes: u64) {
    let src = dir.join(name);
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {bytes} /dev/urandom > '{}'",
            src.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let e = export(m, vol, &[QEMU_INITIATOR], None);
    let out = run_with_timeout(
        Command::new(qemu_img())
            .args(["convert", "-n", "-f", "raw"])
            .arg(&src)
            .args(["--target-image-opts", &qemu_opts(&e, QEMU_INITIATOR)]),
        600,
    );
    assert!(out.status.success(), "qemu-img convert: {}", text(&out));
    m.ok(
        "DELETE",
        &format!("/exports/{}", e["id"].as_str().unwrap()),
        None,
    );
}

fn archive(m: &Maasd, snap: &str, target: &str) -> Value {
    let (s, job) = m.call(
        "POST",
        &format!("/snapshots/{snap}/archive"),
        Some(json!({ "target": target })),
    );
    assert_eq!(s, 202, "{job}");
    job
}

#[test]
fn targets_that_cannot_work_are_refused_and_secrets_never_come_back() {
    let dir = TestDir::new("maas-archive-targets");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let moto = S3Server::start(Kind::Moto, &dir.path().join("moto"));
    moto.create_bucket("locked", true);
    moto.create_bucket("unlocked", false);
    let m = Maasd::start_local(&dir.path().join("maasd"));

    let refused = |body: Value, status: u16, want: &str| {
        let (s, e) = m.call("POST", "/archive-targets", Some(body.clone()));
        assert_eq!((s, code(&e)), (status, want), "{body} -> {e}");
        let msg = e["message"].as_str().unwrap_or("");
        assert!(!msg.contains(SECRET_KEY), "the secret is in an error: {e}");
        e
    };
    let mut b = target_body("a", &s3.endpoint(), "maas");
    b["secret_access_key"] = json!("wrong-secret");
    refused(b, 400, "ARCHIVE_CREDENTIALS_REJECTED");
    refused(
        target_body("a", &s3.endpoint(), "nope"),
        400,
        "ARCHIVE_BUCKET_NOT_FOUND",
    );
    let e = refused(
        target_body("a", "http://no-such-host.invalid:9000", "maas"),
        400,
        "ARCHIVE_UNREACHABLE",
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("no-such-host.invalid"),
        "{e}"
    );
    let mut b = target_body("a", &s3.endpoint(), "maas");
    b["object_lock"] = json!({"mode": "GOVERNANCE", "days": 1});
    refused(b, 400, "ARCHIVE_OBJECT_LOCK_UNAVAILABLE");
    let mut b = target_body("a", &moto.endpoint(), "unlocked");
    b["object_lock"] = json!({"mode": "COMPLIANCE", "days": 1});
    refused(b, 400, "ARCHIVE_OBJECT_LOCK_UNAVAILABLE");
    let mut b = target_body("a", &moto.endpoint(), "locked");
    b["object_lock"] = json!({"mode": "FOREVER", "days": 1});
    refused(b, 400, "INVALID_FIELD");
    let mut b = target_body("a", &s3.endpoint(), "maas");
    b["encryption"] = json!("xchacha20poly1305");
    refused(b, 400, "ARCHIVE_ENCRYPTION_UNSUPPORTED");
    let mut b = target_body("a", "ftp://x", "maas");
    b["name"] = json!("a");
    refused(b, 400, "INVALID_ARCHIVE_TARGET");
    // Nothing that cannot work was stored.
    let l = m.ok("GET", "/archive-targets", None);
    assert_eq!(l["items"].as_array().unwrap().len(), 0, "{l}");

    let id = create_target(&m, target_body("offsite", &s3.endpoint(), "maas"));
    let t = m.ok("GET", &format!("/archive-targets/{id}"), None);
    assert_eq!(t["path_style"], true, "{t}");
    assert_eq!(t["region"], "us-east-1");
    assert_eq!(t["encryption"], "none");
    assert_eq!(t["access_key_id"], ACCESS_KEY);
    assert!(!t.to_string().contains(SECRET_KEY), "{t}");
    let l = m.ok("GET", "/archive-targets", None);
    assert!(!l.to_string().contains(SECRET_KEY));
    let (s, e) = m.call(
        "POST",
        "/archive-targets",
        Some(target_body("offsite", &s3.endpoint(), "maas")),
    );
    assert_eq!((s, code(&e)), (409, "ARCHIVE_TARGET_EXISTS"), "{e}");
    // The prefix now says what it is.
    let objects = s3.list("maas");
    assert!(
        objects.iter().any(|(k, _)| k == "maas-archive.json"),
        "{objects:?}"
    );
    // A second installation on the same bucket, under its own prefix.
    let mut b = target_body("site-b", &s3.endpoint(), "maas");
    b["prefix"] = json!("/site-b/");
    let id_b = create_target(&m, b);
    let t = m.ok("GET", &format!("/archive-targets/{id_b}"), None);
    assert_eq!(t["prefix"], "site-b/");
    let mut b = target_body("vault", &moto.endpoint(), "locked");
    b["object_lock"] = json!({"mode": "GOVERNANCE", "days": 1});
    create_target(&m, b);

    // The secret is in no log and not in the catalog in the clear.
    assert!(
        !m.log().contains(SECRET_KEY),
        "the secret is in maasd's log"
    );
    let mut catalog = std::fs::read(dir.path().join("maasd/data/catalog.sqlite")).unwrap();
    catalog.extend(
        std::fs::read(dir.path().join("maasd/data/catalog.sqlite-wal")).unwrap_or_default(),
    );
    assert!(
        !catalog
            .windows(SECRET_KEY.len())
            .any(|w| w == SECRET_KEY.as_bytes()),
        "the secret is in the catalog in the clear"
    );
    m.ok("DELETE", &format!("/archive-targets/{id_b}"), None);
    let (s, e) = m.call("GET", &format!("/archive-targets/{id_b}"), None);
    assert_eq!((s, code(&e)), (404, "ARCHIVE_TARGET_NOT_FOUND"));
}

#[test]
fn snapshots_written_by_qemu_are_archived_incrementally_with_progress() {
    let dir = TestDir::new("maas-archive-push");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let moto = S3Server::start(Kind::Moto, &dir.path().join("moto"));
    moto.create_bucket("locked", true);
    let m = Maasd::start_local(&dir.path().join("maasd"));
    let target = create_target(&m, target_body("offsite", &s3.endpoint(), "maas"));

    let vol = volume(&m, "fileserver", 256 * MIB, 512);
    qemu_write(&m, dir.path(), &vol, "day1.img", 96 * MIB);
    let s1 = seal(&m, &vol);
    let job = archive(&m, &s1, &target);
    let j = m.wait_job(&job);
    assert_eq!(j["kind"], "archive");
    let r = &j["result"];
    let d = &j["progress_detail"];
    assert_eq!(r["objects_sent"], d["objects_total"], "{j}");
    assert!(d["bytes_sent"].as_u64().unwrap() >= 96 * MIB, "{j}");
    assert!(d["bytes_per_second"].as_u64().unwrap() > 0, "{j}");
    let first_packs = r["packs_sent"].as_u64().unwrap();
    assert!(
        (3..=4).contains(&first_packs),
        "96 MiB in 32 MiB packs: {j}"
    );

    let snap = m.ok("GET", &format!("/snapshots/{s1}"), None);
    assert_eq!(snap["location"], "local");
    let a = &snap["archives"][0];
    assert_eq!(a["target"], target.as_str(), "{snap}");
    assert_eq!(a["state"], "archived");
    assert!(a["archived_at"].is_string());
    assert!(a["bytes"].as_u64().unwrap() >= 96 * MIB, "{snap}");
    assert_eq!(a["objects"].as_u64().unwrap(), first_packs + 1);

    // What aws-cli sees: the manifests and the packs, no object under the pack size but the
    // last pack and the JSON documents.
    let objects = s3.list("maas");
    let packs: Vec<_> = objects
        .iter()
        .filter(|(k, _)| k.starts_with("packs/"))
        .collect();
    assert_eq!(packs.len() as u64, first_packs, "{objects:?}");
    assert!(
        packs.iter().filter(|(_, n)| *n < 32 * MIB).count() <= 1,
        "{packs:?}"
    );
    assert!(
        objects
            .iter()
            .any(|(k, _)| *k == format!("snapshots/{s1}.json"))
    );
    let manifest = s3.aws(&["s3", "cp", &format!("s3://maas/snapshots/{s1}.json"), "-"]);
    let manifest: Value = serde_json::from_slice(&manifest.stdout).unwrap();
    assert_eq!(manifest["format"], "maas-snapshot");
    assert_eq!(manifest["version"], 1);
    assert_eq!(manifest["volume_name"], "fileserver");
    assert_eq!(
        manifest["packs"].as_array().unwrap().len() as u64,
        first_packs
    );

    // The next day: 3 MiB rewritten. Only the changed chunks and index nodes go, in one pack.
    let e = export(&m, &vol, &[QEMU_INITIATOR], None);
    let patch = dir.path().join("patch.img");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {} /dev/urandom > '{}'",
            3 * MIB,
            patch.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let opts = qemu_opts(&e, QEMU_INITIATOR);
    let out = run_with_timeout(
        Command::new(maas_tests::peers::tool("MAAS_QEMU_IO", "qemu-io-7.2")).args([
            "--image-opts",
            &opts,
            "-c",
            &format!("write -s {} {} {}", patch.display(), 20 * MIB, 3 * MIB),
        ]),
        120,
    );
    assert!(out.status.success(), "qemu-io: {}", text(&out));
    m.ok(
        "DELETE",
        &format!("/exports/{}", e["id"].as_str().unwrap()),
        None,
    );
    let s2 = seal(&m, &vol);
    // maasctl, as a user runs it.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_maasctl"));
    cmd.args([
        "--json", "snapshot", "archive", &s2, "--target", &target, "--wait",
    ]);
    for (k, v) in m.maasctl_env() {
        cmd.env(k, v);
    }
    let out = run_with_timeout(&mut cmd, 120);
    assert!(out.status.success(), "maasctl: {}", text(&out));
    let j2: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j2["state"], "succeeded", "{j2}");
    let sent = j2["result"]["objects_sent"].as_u64().unwrap();
    // 3 MiB in 256 KiB chunks: 12 chunks, a leaf and the root.
    assert!(
        (12..=16).contains(&sent),
        "incremental push sent {sent} objects: {j2}"
    );
    assert_eq!(j2["result"]["packs_sent"], 1);
    assert_eq!(
        s3.list("maas")
            .iter()
            .filter(|(k, _)| k.starts_with("packs/"))
            .count() as u64,
        first_packs + 1
    );

    // Deleting the second snapshot deletes its copy too: the pack only it needed goes.
    let (s, job) = m.call("DELETE", &format!("/snapshots/{s2}"), None);
    assert_eq!(s, 202, "{job}");
    let j = m.wait_job(&job);
    assert_eq!(j["result"]["archives"][0]["packs_deleted"], 1, "{j}");
    assert_eq!(
        s3.list("maas")
            .iter()
            .filter(|(k, _)| k.starts_with("packs/"))
            .count() as u64,
        first_packs
    );
    // A target that holds copies is not deleted.
    let (s, e) = m.call("DELETE", &format!("/archive-targets/{target}"), None);
    assert_eq!((s, code(&e)), (409, "ARCHIVE_TARGET_IN_USE"), "{e}");

    // Object lock: every object MaaS writes to a locked target carries the retention.
    let mut b = target_body("vault", &moto.endpoint(), "locked");
    b["object_lock"] = json!({"mode": "GOVERNANCE", "days": 2});
    let vault = create_target(&m, b);
    m.wait_job(&archive(&m, &s1, &vault));
    let locked = moto.list("locked");
    let packs: Vec<_> = locked
        .iter()
        .filter(|(k, _)| k.starts_with("packs/"))
        .collect();
    assert!(!packs.is_empty(), "{locked:?}");
    for key in packs
        .iter()
        .map(|(k, _)| k.clone())
        .chain([format!("snapshots/{s1}.json")])
    {
        // (moto answers get-object-retention with a 500; head-object carries the same.)
        let out = moto.aws(&["s3api", "head-object", "--bucket", "locked", "--key", &key]);
        assert!(out.status.success(), "{key}: {}", text(&out));
        let h: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(h["ObjectLockMode"], "GOVERNANCE", "{key}: {h}");
        let until = days_from_now(h["ObjectLockRetainUntilDate"].as_str().unwrap());
        assert!(
            (1.9..=2.1).contains(&until),
            "{key}: retained {until} days: {h}"
        );
        // The lock holds: the version cannot be deleted.
        let version = h["VersionId"].as_str().unwrap();
        let out = moto.aws(&[
            "s3api",
            "delete-object",
            "--bucket",
            "locked",
            "--key",
            &key,
            "--version-id",
            version,
        ]);
        assert!(!out.status.success(), "{key}: a locked version was deleted");
    }
}

#[test]
fn a_push_interrupted_by_a_maasd_crash_resumes_at_restart() {
    let dir = TestDir::new("maas-archive-resume");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    // maasd reaches the S3 server through a relay the test can freeze.
    let mut relay = Relay::listen();
    relay.forward_to(s3.port);
    let mut m = Maasd::start_local_with(&dir.path().join("maasd"), 8 << 30);
    let endpoint = format!("http://127.0.0.1:{}", relay.port());
    let target = create_target(&m, target_body("offsite", &endpoint, "maas"));
    let vol = volume(&m, "big", 1024 * MIB, 512);
    qemu_write(&m, dir.path(), &vol, "big.img", 768 * MIB);
    let s1 = seal(&m, &vol);

    let job = archive(&m, &s1, &target);
    let id = job["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    loop {
        let j = m.ok("GET", &format!("/jobs/{id}"), None);
        assert_ne!(
            j["state"], "succeeded",
            "the push finished before it could be interrupted: {j}"
        );
        assert_ne!(j["state"], "failed", "{j}");
        if j["progress_detail"]["packs_sent"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no progress: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The network to the bucket goes silent and maasd dies with the push in flight.
    relay.freeze();
    m.kill9();
    relay.thaw();
    m.start_again();

    // The interrupted job says so; a new archive job finishes the push.
    let j = m.ok("GET", &format!("/jobs/{id}"), None);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "INTERRUPTED", "{j}");
    let t = Instant::now();
    let snap = loop {
        let snap = m.ok("GET", &format!("/snapshots/{s1}"), None);
        match snap["archives"][0]["state"].as_str() {
            Some("archived") => break snap,
            Some("pushing") => {}
            other => panic!("copy state {other:?}: {snap}"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "not resumed: {snap}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let resumed = snap["archives"][0]["job"].as_str().unwrap().to_string();
    assert_ne!(resumed, id);
    // The copy is recorded archived just before its job ends.
    let j = m.wait_job(&json!({ "id": resumed }));
    let d = &j["progress_detail"];
    assert!(
        d["objects_to_send"].as_u64().unwrap() < d["objects_total"].as_u64().unwrap(),
        "the resumed push sent everything again: {j}"
    );
    assert!(m.log().contains("resuming an interrupted archive push"));
    // What the bucket holds is whole: the manifest names packs that are all there.
    let objects = s3.list("maas");
    let manifest = s3.aws(&["s3", "cp", &format!("s3://maas/snapshots/{s1}.json"), "-"]);
    let manifest: Value = serde_json::from_slice(&manifest.stdout).unwrap();
    for p in manifest["packs"].as_array().unwrap() {
        let p = p.as_str().unwrap();
        assert!(objects.iter().any(|(k, _)| k == p), "{p} is missing");
    }
}

/// Days from now until an RFC 3339 time.
fn days_from_now(t: &str) -> f64 {
    let t = chrono::DateTime::parse_from_rfc3339(t).unwrap();
    (t.timestamp() - chrono::Utc::now().timestamp()) as f64 / 86_400.0
}

/// Reads a whole volume back with qemu-img over iSCSI into `dst`.
fn qemu_read(m: &Maasd, vol: &str, dst: &std::path::Path) {
    let e = export(m, vol, &[QEMU_INITIATOR], None);
    let out = run_with_timeout(
        Command::new(qemu_img())
            .args([
                "convert",
                "-O",
                "raw",
                "--image-opts",
                &qemu_opts(&e, QEMU_INITIATOR),
            ])
            .arg(dst),
        600,
    );
    assert!(
        out.status.success(),
        "qemu-img convert from iSCSI: {}",
        text(&out)
    );
    m.ok(
        "DELETE",
        &format!("/exports/{}", e["id"].as_str().unwrap()),
        None,
    );
}

/// Clones `snap` as `name`, reads the clone back with QEMU over iSCSI, and says whether it
/// holds the file `expected` (under `dir`) followed by zeroes.
fn clone_reads_back(
    m: &Maasd,
    snap: &str,
    name: &str,
    dir: &std::path::Path,
    expected: &str,
) -> bool {
    let c = clone_snapshot(m, snap, name);
    let back = dir.join(format!("{name}.back.img"));
    qemu_read(m, &c, &back);
    same_prefix(&back, &dir.join(expected))
}

fn same_prefix(image: &std::path::Path, src: &std::path::Path) -> bool {
    let a = std::fs::read(image).unwrap();
    let b = std::fs::read(src).unwrap();
    a.len() >= b.len() && a[..b.len()] == b[..] && a[b.len()..].iter().all(|&x| x == 0)
}

#[test]
fn evicted_snapshots_rehydrate_and_a_fresh_maasd_imports_the_bucket() {
    let dir = TestDir::new("maas-archive-evict");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let m = Maasd::start_local(&dir.path().join("maasd"));
    let target = create_target(&m, target_body("offsite", &s3.endpoint(), "maas"));
    let vol = volume(&m, "fileserver", 128 * MIB, 512);
    qemu_write(&m, dir.path(), &vol, "src.img", 40 * MIB);
    let src = dir.path().join("src.img");
    let s1 = seal(&m, &vol);

    // Not archived yet: nothing to evict to.
    let (s, e) = m.call("POST", &format!("/snapshots/{s1}/evict"), None);
    assert_eq!((s, code(&e)), (409, "SNAPSHOT_NOT_ARCHIVED"), "{e}");
    m.wait_job(&archive(&m, &s1, &target));
    let snaps_before = m.ok("GET", "/pools/default", None)["snapshots"]
        .as_u64()
        .unwrap();
    let (s, job) = m.call("POST", &format!("/snapshots/{s1}/evict"), None);
    assert_eq!(s, 202, "{job}");
    let j = m.wait_job(&job);
    assert!(j["result"]["objects_checked"].as_u64().unwrap() > 0, "{j}");
    let snap = m.ok("GET", &format!("/snapshots/{s1}"), None);
    assert_eq!(snap["location"], "archive", "{snap}");
    assert_eq!(snap["archives"][0]["state"], "archived");
    let snaps_after = m.ok("GET", "/pools/default", None)["snapshots"]
        .as_u64()
        .unwrap();
    assert_eq!(
        snaps_after,
        snaps_before - 1,
        "the pool still holds the snapshot"
    );
    let l = m.ok("GET", "/snapshots?location=archive", None);
    assert_eq!(l["items"].as_array().unwrap().len(), 1, "{l}");
    // A restart keeps it where it is (reconciliation knows archive-only snapshots).
    let mut m = m;
    m.restart();
    assert_eq!(
        m.ok("GET", &format!("/snapshots/{s1}"), None)["location"],
        "archive"
    );

    // Rehydrate, clone, read back: the bytes QEMU wrote.
    let (s, job) = m.call("POST", &format!("/snapshots/{s1}/rehydrate"), None);
    assert_eq!(s, 202, "{job}");
    let j = m.wait_job(&job);
    assert_eq!(j["kind"], "rehydrate");
    assert_eq!(
        m.ok("GET", &format!("/snapshots/{s1}"), None)["location"],
        "local"
    );
    let c = clone_snapshot(&m, &s1, "restored");
    let back = dir.path().join("back.img");
    qemu_read(&m, &c, &back);
    assert!(same_prefix(&back, &src), "rehydrated data differs");

    // Disaster: a fresh maasd with an empty data directory, given the same bucket.
    let fresh = Maasd::start_local(&dir.path().join("fresh"));
    let t2 = create_target(&fresh, target_body("offsite", &s3.endpoint(), "maas"));
    let (s, job) = fresh.call("POST", &format!("/archive-targets/{t2}/import"), None);
    assert_eq!(s, 202, "{job}");
    let j = fresh.wait_job(&job);
    assert_eq!(j["result"]["snapshots_imported"], json!([s1]), "{j}");
    let l = fresh.ok("GET", "/snapshots", None);
    let items = l["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{l}");
    assert_eq!(items[0]["volume_name"], "fileserver");
    assert_eq!(items[0]["location"], "archive");
    assert_eq!(items[0]["size"], 128 * MIB);
    // Its volume does not exist here; the snapshot is listed all the same.
    let l = fresh.ok("GET", &format!("/snapshots?volume={vol}"), None);
    assert_eq!(l["items"].as_array().unwrap().len(), 1, "{l}");
    // Importing again finds nothing new.
    let j = fresh.wait_job(
        &fresh
            .call("POST", &format!("/archive-targets/{t2}/import"), None)
            .1,
    );
    assert_eq!(j["result"]["snapshots_imported"], json!([]), "{j}");
    assert_eq!(j["result"]["snapshots_known"], 1, "{j}");
    // Rehydrated here (another pool: checked with the writer's keys, re-keyed), cloned, read.
    fresh.wait_job(
        &fresh
            .call("POST", &format!("/snapshots/{s1}/rehydrate"), None)
            .1,
    );
    let c = clone_snapshot(&fresh, &s1, "restored");
    let back2 = dir.path().join("back2.img");
    qemu_read(&fresh, &c, &back2);
    assert!(
        same_prefix(&back2, &src),
        "data imported on a fresh maasd differs"
    );
}

#[test]
fn a_verify_finds_a_damaged_pack_and_the_copy_is_not_used_any_more() {
    let dir = TestDir::new("maas-archive-verify");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let m = Maasd::start_local(&dir.path().join("maasd"));
    let target = create_target(&m, target_body("offsite", &s3.endpoint(), "maas"));
    let vol = volume(&m, "db", 64 * MIB, 512);
    qemu_write(&m, dir.path(), &vol, "db.img", 24 * MIB);
    let s1 = seal(&m, &vol);
    m.wait_job(&archive(&m, &s1, &target));
    let path = format!("/snapshots/{s1}/archives/{target}/verify");
    let (s, job) = m.call("POST", &path, None);
    assert_eq!(s, 202, "{job}");
    let j = m.wait_job(&job);
    assert!(j["result"]["objects"].as_u64().unwrap() > 0, "{j}");
    assert!(
        j["result"]["bytes_read"].as_u64().unwrap() >= 24 * MIB,
        "{j}"
    );

    // One flipped byte in the largest pack, under the server.
    let (victim, len) = s3
        .list("maas")
        .into_iter()
        .filter(|(k, _)| k.starts_with("packs/"))
        .max_by_key(|(_, n)| *n)
        .unwrap();
    let file = s3.object_path("maas", &victim);
    let mut b = std::fs::read(&file).unwrap();
    b[(len / 3) as usize] ^= 0x01;
    std::fs::write(&file, &b).unwrap();
    let (s, job) = m.call("POST", &path, None);
    assert_eq!(s, 202, "{job}");
    let id = job["id"].as_str().unwrap();
    let t = Instant::now();
    let j = loop {
        let j = m.ok("GET", &format!("/jobs/{id}"), None);
        if j["state"] == "failed" || j["state"] == "succeeded" {
            break j;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{j}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(j["state"], "failed", "a damaged pack verified: {j}");
    assert_eq!(j["error"]["code"], "ARCHIVE_OBJECT_DAMAGED", "{j}");
    assert!(
        j["error"]["message"].as_str().unwrap().contains(&victim),
        "{j}"
    );
    let snap = m.ok("GET", &format!("/snapshots/{s1}"), None);
    assert_eq!(snap["archives"][0]["state"], "damaged", "{snap}");
    // The damaged copy replaces nothing.
    let (s, e) = m.call("POST", &format!("/snapshots/{s1}/evict"), None);
    assert_eq!((s, code(&e)), (409, "SNAPSHOT_NOT_ARCHIVED"), "{e}");
}

#[test]
fn the_archive_catalog_works_on_postgresql() {
    let dir = TestDir::new("maas-archive-pg");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let mut m = Maasd::builder(MAASD, &dir.path().join("maasd"))
        .catalog_url(Some(postgres_catalog()))
        .start();
    let target = create_target(&m, target_body("offsite", &s3.endpoint(), "maas"));
    let vol = volume(&m, "pg", 32 * MIB, 512);
    qemu_write(&m, dir.path(), &vol, "pg.img", 8 * MIB);
    let src = dir.path().join("pg.img");
    let s1 = seal(&m, &vol);
    m.wait_job(&archive(&m, &s1, &target));
    // Twice: the copy row is updated, not duplicated.
    m.wait_job(&archive(&m, &s1, &target));
    let snap = m.ok("GET", &format!("/snapshots/{s1}"), None);
    assert_eq!(snap["archives"].as_array().unwrap().len(), 1, "{snap}");
    m.wait_job(&m.call("POST", &format!("/snapshots/{s1}/evict"), None).1);
    m.restart();
    let l = m.ok("GET", "/snapshots?location=archive", None);
    assert_eq!(l["items"][0]["id"], s1.as_str(), "{l}");
    m.wait_job(
        &m.call("POST", &format!("/snapshots/{s1}/rehydrate"), None)
            .1,
    );
    let c = clone_snapshot(&m, &s1, "back");
    let back = dir.path().join("back.img");
    qemu_read(&m, &c, &back);
    assert!(same_prefix(&back, &src));
    let (s, e) = m.call("DELETE", &format!("/archive-targets/{target}"), None);
    assert_eq!((s, code(&e)), (409, "ARCHIVE_TARGET_IN_USE"), "{e}");
}

#[test]
fn deleting_archived_snapshots_reclaims_only_what_no_other_snapshot_needs() {
    let dir = TestDir::new("maas-archive-delete");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let moto = S3Server::start(Kind::Moto, &dir.path().join("moto"));
    moto.create_bucket("locked", true);
    let m = Maasd::start_local(&dir.path().join("maasd"));
    let target = create_target(&m, target_body("offsite", &s3.endpoint(), "maas"));
    let vol = volume(&m, "files", 128 * MIB, 512);
    qemu_write(&m, dir.path(), &vol, "day1.img", 48 * MIB);
    let s1 = seal(&m, &vol);
    // Day 2: the first 4 MiB rewritten.
    qemu_write(&m, dir.path(), &vol, "day2.img", 4 * MIB);
    let mut day2 = std::fs::read(dir.path().join("day1.img")).unwrap();
    let patch = std::fs::read(dir.path().join("day2.img")).unwrap();
    day2[..patch.len()].copy_from_slice(&patch);
    std::fs::write(dir.path().join("day2-full.img"), &day2).unwrap();
    let s2 = seal(&m, &vol);
    m.wait_job(&archive(&m, &s1, &target));
    m.wait_job(&archive(&m, &s2, &target));
    let packs = |s3: &S3Server| {
        s3.list("maas")
            .into_iter()
            .filter(|(k, _)| k.starts_with("packs/"))
            .count()
    };
    let before = packs(&s3);
    m.wait_job(&m.call("POST", &format!("/snapshots/{s2}/evict"), None).1);

    // Day 1 goes: day 2 still needs most of its chunks, so no pack it uses is deleted.
    let (s, job) = m.call("DELETE", &format!("/snapshots/{s1}"), None);
    assert_eq!(s, 202, "{job}");
    let j = m.wait_job(&job);
    assert!(
        !s3.list("maas")
            .iter()
            .any(|(k, _)| *k == format!("snapshots/{s1}.json"))
    );
    let (s, _) = m.call("GET", &format!("/snapshots/{s1}"), None);
    assert_eq!(s, 404);
    assert!(packs(&s3) <= before, "{j}");
    // Day 2 comes back whole from what is left.
    m.wait_job(
        &m.call("POST", &format!("/snapshots/{s2}/rehydrate"), None)
            .1,
    );
    let c = clone_snapshot(&m, &s2, "day2-back");
    let back = dir.path().join("back.img");
    qemu_read(&m, &c, &back);
    assert!(
        same_prefix(&back, &dir.path().join("day2-full.img")),
        "day 2 lost data"
    );
    // The clone holds its data locally now; day 2 goes too, and with it every pack.
    m.ok("DELETE", &format!("/volumes/{c}"), None);
    let j = m.wait_job(&m.call("DELETE", &format!("/snapshots/{s2}"), None).1);
    assert_eq!(
        packs(&s3),
        0,
        "packs left after the last snapshot went: {j}"
    );
    let deleted = j["result"]["archives"][0]["packs_deleted"]
        .as_u64()
        .unwrap();
    assert!(deleted > 0, "{j}");
    // Nothing refers to the target any more.
    m.ok("DELETE", &format!("/archive-targets/{target}"), None);

    // Under object lock, a copy cannot be deleted before its retention ends.
    let mut b = target_body("vault", &moto.endpoint(), "locked");
    b["object_lock"] = json!({"mode": "GOVERNANCE", "days": 1});
    let vault = create_target(&m, b);
    let s3snap = seal(&m, &vol);
    m.wait_job(&archive(&m, &s3snap, &vault));
    let (s, e) = m.call("DELETE", &format!("/snapshots/{s3snap}"), None);
    assert_eq!((s, code(&e)), (409, "SNAPSHOT_ARCHIVE_LOCKED"), "{e}");
    assert_eq!(
        m.ok("GET", &format!("/snapshots/{s3snap}"), None)["archives"][0]["state"],
        "archived"
    );

    // A remaining copy that cannot be read (its manifest gone behind our back) does not block
    // deleting another snapshot, and no pack is deleted while what it needs is unknown.
    let target = create_target(&m, target_body("offsite2", &s3.endpoint(), "maas"));
    let s4 = seal(&m, &vol);
    qemu_write(&m, dir.path(), &vol, "day4.img", 2 * MIB);
    let s5 = seal(&m, &vol);
    m.wait_job(&archive(&m, &s4, &target));
    m.wait_job(&archive(&m, &s5, &target));
    let before = packs(&s3);
    let out = s3.aws(&["s3", "rm", &format!("s3://maas/snapshots/{s5}.json")]);
    assert!(out.status.success(), "{out:?}");
    let j = m.wait_job(&m.call("DELETE", &format!("/snapshots/{s4}"), None).1);
    let deferred = j["result"]["archives"][0]["reclaim_deferred"]
        .as_str()
        .unwrap_or_default();
    assert!(deferred.contains(&s5), "{j}");
    assert_eq!(packs(&s3), before, "{j}");
    let (s, _) = m.call("GET", &format!("/snapshots/{s4}"), None);
    assert_eq!(s, 404);
}

/// The image QEMU wrote as `base`, with `patch` written over its start.
fn patched(dir: &std::path::Path, base: &str, patch: &str, out: &str) {
    let mut img = std::fs::read(dir.join(base)).unwrap();
    let p = std::fs::read(dir.join(patch)).unwrap();
    img[..p.len()].copy_from_slice(&p);
    std::fs::write(dir.join(out), &img).unwrap();
}

#[test]
fn an_evicted_snapshot_mounts_straight_from_the_archive() {
    let dir = TestDir::new("maas-archive-lazy");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let m = Maasd::start_local(&dir.path().join("maasd"));
    let target = create_target(&m, target_body("offsite", &s3.endpoint(), "maas"));
    let vol = volume(&m, "files", 128 * MIB, 512);
    qemu_write(&m, dir.path(), &vol, "day1.img", 48 * MIB);
    let s1 = seal(&m, &vol);
    qemu_write(&m, dir.path(), &vol, "day2.img", 4 * MIB);
    patched(dir.path(), "day1.img", "day2.img", "day2-full.img");
    let s2 = seal(&m, &vol);
    qemu_write(&m, dir.path(), &vol, "day3.img", 4 * MIB);
    patched(dir.path(), "day1.img", "day3.img", "day3-full.img");
    let s3snap = seal(&m, &vol);
    for s in [&s1, &s2, &s3snap] {
        m.wait_job(&archive(&m, s, &target));
        m.wait_job(&m.call("POST", &format!("/snapshots/{s}/evict"), None).1);
    }
    // Nothing of the data is local any more.
    m.ok("DELETE", &format!("/volumes/{vol}"), None);

    // Day 1, mounted straight from the archive: the clone is there at once; QEMU reads, over
    // iSCSI, what it wrote (the chunks come from the bucket as they are read).
    let c1 = clone_snapshot(&m, &s1, "day1-mounted");
    assert_eq!(
        m.ok("GET", &format!("/snapshots/{s1}"), None)["location"],
        "local"
    );
    let back = dir.path().join("back1.img");
    qemu_read(&m, &c1, &back);
    assert!(
        same_prefix(&back, &dir.path().join("day1.img")),
        "day 1 read from the archive differs"
    );
    // All of it came while QEMU read: nothing left to rehydrate.
    let (s, e) = m.call("POST", &format!("/snapshots/{s1}/rehydrate"), None);
    assert_eq!((s, code(&e)), (409, "SNAPSHOT_LOCAL"), "{e}");

    // Day 3, mounted, then made whole local by a rehydrate: only its own chunks come (day 1's
    // are local now).
    let c3 = clone_snapshot(&m, &s3snap, "day3-mounted");
    let (s, job) = m.call("POST", &format!("/snapshots/{s3snap}/rehydrate"), None);
    assert_eq!(s, 202, "{job}");
    let j = m.wait_job(&job);
    let fetched = j["result"]["chunks_fetched"].as_u64().unwrap();
    let chunk = m.ok("GET", "/pools/default", None)["chunk_size"]
        .as_u64()
        .unwrap();
    assert!((1..=4 * MIB / chunk).contains(&fetched), "{j}");
    let (s, e) = m.call("POST", &format!("/snapshots/{s3snap}/rehydrate"), None);
    assert_eq!((s, code(&e)), (409, "SNAPSHOT_LOCAL"), "{e}");
    let back = dir.path().join("back3.img");
    qemu_read(&m, &c3, &back);
    assert!(same_prefix(&back, &dir.path().join("day3-full.img")));

    // Day 2, mounted, and its snapshot deleted with its archive copy: the clone still reads
    // chunks only the bucket has, so reclamation keeps their packs.
    let c2 = clone_snapshot(&m, &s2, "day2-mounted");
    let (s, job) = m.call("DELETE", &format!("/snapshots/{s2}"), None);
    assert_eq!(s, 202, "{job}");
    let j = m.wait_job(&job);
    assert_eq!(j["state"], "succeeded", "{j}");
    let back = dir.path().join("back2.img");
    qemu_read(&m, &c2, &back);
    assert!(
        same_prefix(&back, &dir.path().join("day2-full.img")),
        "a clone lost chunks to reclamation: {j}"
    );
}

/// Every file under `root` (s3s-fs keeps one per object, plus its own metadata).
fn files_under(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// How many of `needles` occur in any file under `root`.
fn found_in(root: &std::path::Path, needles: &[Vec<u8>]) -> usize {
    let files: Vec<Vec<u8>> = files_under(root)
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    needles
        .iter()
        .filter(|n| {
            files
                .iter()
                .any(|f| f.windows(n.len()).any(|w| w == &n[..]))
        })
        .count()
}

#[test]
fn an_encrypted_target_holds_only_ciphertext_and_a_new_installation_needs_its_recovery_key() {
    let dir = TestDir::new("maas-archive-sealed");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("sealed", false);
    s3.create_bucket("plain", false);
    let m = Maasd::start_local(&dir.path().join("maasd"));
    let mut body = target_body("vault", &s3.endpoint(), "sealed");
    body["encryption"] = json!("xchacha20-poly1305");
    let (s, t) = m.call("POST", "/archive-targets", Some(body.clone()));
    assert_eq!(s, 201, "{t}");
    let sealed = t["id"].as_str().unwrap().to_string();
    let recovery = t["recovery_key"].as_str().unwrap().to_string();
    let key_id = t["key_id"].as_str().unwrap().to_string();
    assert!(recovery.starts_with("maasrk1-"), "{t}");
    assert_eq!(t["encryption"], "xchacha20-poly1305");
    // Shown once: never again, nowhere.
    for got in [
        m.ok("GET", &format!("/archive-targets/{sealed}"), None),
        m.ok("GET", "/archive-targets", None),
    ] {
        assert!(!got.to_string().contains(&recovery), "{got}");
        assert!(got.to_string().contains(&key_id), "{got}");
    }
    assert!(!m.log().contains(&recovery[8..40]), "the key is in the log");
    let plain = create_target(&m, target_body("plain", &s3.endpoint(), "plain"));

    // A volume a host filled (random data: the pool stores it uncompressed, so a plaintext
    // copy would show byte for byte).
    let vol = volume(&m, "payroll-db", 64 * MIB, 512);
    qemu_write(&m, dir.path(), &vol, "day1.img", 24 * MIB);
    let src = std::fs::read(dir.path().join("day1.img")).unwrap();
    let s1 = seal(&m, &vol);
    m.wait_job(&archive(&m, &s1, &sealed));
    m.wait_job(&archive(&m, &s1, &plain));
    let mut needles: Vec<Vec<u8>> = (0..24)
        .map(|i| src[i * MIB as usize + 4096..][..48].to_vec())
        .collect();
    needles.push(b"payroll-db".to_vec());
    // The same snapshot in the plain bucket shows its data and name: the search works.
    assert!(found_in(&dir.path().join("s3/plain"), &needles) >= 20);
    let found = found_in(&dir.path().join("s3/sealed"), &needles);
    assert_eq!(found, 0, "the encrypted bucket holds plaintext");
    // Nor the digests: the pool's digest of any chunk would name it. The manifest is sealed.
    let manifest =
        std::fs::read(s3.object_path("sealed", &format!("snapshots/{s1}.json"))).unwrap();
    let manifest = String::from_utf8(manifest).unwrap();
    assert!(manifest.contains("\"maas-sealed\""), "{manifest}");
    assert!(!manifest.contains("\"root\""), "{manifest}");
    let listed = s3.list("sealed");
    assert!(
        listed.iter().any(|(k, _)| k.starts_with("packs/")),
        "{listed:?}"
    );

    // Evicted, then mounted straight from the encrypted archive and read over iSCSI; verified.
    m.wait_job(&m.call("POST", &format!("/snapshots/{s1}/evict"), None).1);
    assert!(clone_reads_back(&m, &s1, "mounted", dir.path(), "day1.img"));
    let (s, job) = m.call(
        "POST",
        &format!("/snapshots/{s1}/archives/{sealed}/verify"),
        None,
    );
    assert_eq!(s, 202, "{job}");
    assert_eq!(m.wait_job(&job)["state"], "succeeded");

    // A new installation: without the key, with a new key, with another archive's key, with
    // a mistyped key, the prefix is refused with a code saying why; a key on a plain prefix too.
    let fresh = Maasd::start_local(&dir.path().join("fresh"));
    let refused = |body: Value, want: &str| {
        let (s, e) = fresh.call("POST", "/archive-targets", Some(body));
        assert_eq!((s, code(&e)), (400, want), "{e}");
        assert!(!e.to_string().contains(&recovery[8..40]), "{e}");
    };
    refused(
        target_body("vault", &s3.endpoint(), "sealed"),
        "ARCHIVE_KEY_REQUIRED",
    );
    refused(body.clone(), "ARCHIVE_KEY_REQUIRED");
    s3.create_bucket("other", false);
    let mut other = target_body("other", &s3.endpoint(), "other");
    other["encryption"] = json!("xchacha20-poly1305");
    let (s, o) = fresh.call("POST", "/archive-targets", Some(other));
    assert_eq!(s, 201, "{o}");
    let mut b = body.clone();
    b["recovery_key"] = o["recovery_key"].clone();
    refused(b, "ARCHIVE_KEY_MISMATCH");
    let mut typo = recovery.clone().into_bytes();
    let last = typo.len() - 1;
    typo[last] = if typo[last] == b'0' { b'1' } else { b'0' };
    let mut b = body.clone();
    b["recovery_key"] = json!(String::from_utf8(typo).unwrap());
    refused(b, "INVALID_FIELD");
    let mut b = target_body("plain", &s3.endpoint(), "plain");
    b["recovery_key"] = json!(recovery);
    refused(b, "ARCHIVE_ENCRYPTION_MISMATCH");

    // With its recovery key: imported, rehydrated, cloned, the same bytes.
    let mut b = body.clone();
    b["recovery_key"] = json!(recovery);
    let (s, t2) = fresh.call("POST", "/archive-targets", Some(b));
    assert_eq!(s, 201, "{t2}");
    assert_eq!(t2["key_id"], json!(key_id));
    assert!(t2.get("recovery_key").is_none(), "{t2}");
    let t2 = t2["id"].as_str().unwrap();
    let j = fresh.wait_job(
        &fresh
            .call("POST", &format!("/archive-targets/{t2}/import"), None)
            .1,
    );
    assert_eq!(j["result"]["snapshots_imported"], json!([s1]), "{j}");
    let l = fresh.ok("GET", "/snapshots", None);
    assert_eq!(l["items"][0]["volume_name"], "payroll-db", "{l}");
    fresh.wait_job(
        &fresh
            .call("POST", &format!("/snapshots/{s1}/rehydrate"), None)
            .1,
    );
    assert!(clone_reads_back(
        &fresh,
        &s1,
        "restored",
        dir.path(),
        "day1.img"
    ));
}

#[test]
fn mostly_dead_packs_are_repacked_and_the_remaining_snapshot_stays_whole_everywhere() {
    let dir = TestDir::new("maas-archive-repack");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let m = Maasd::start_local(&dir.path().join("maasd"));
    // Encrypted: a repack opens every object it moves and seals it again.
    let mut body = target_body("offsite", &s3.endpoint(), "maas");
    body["encryption"] = json!("xchacha20-poly1305");
    let (s, t) = m.call("POST", "/archive-targets", Some(body.clone()));
    assert_eq!(s, 201, "{t}");
    let target = t["id"].as_str().unwrap().to_string();
    let recovery = t["recovery_key"].clone();
    let vol = volume(&m, "files", 64 * MIB, 512);
    // Day 1: 40 MiB, pushed as a 32 MiB pack and an 8 MiB one. Day 2: the first 24 MiB
    // rewritten, so three quarters of the first pack die with day 1.
    qemu_write(&m, dir.path(), &vol, "day1.img", 40 * MIB);
    let s1 = seal(&m, &vol);
    qemu_write(&m, dir.path(), &vol, "day2.img", 24 * MIB);
    patched(dir.path(), "day1.img", "day2.img", "day2-full.img");
    let s2 = seal(&m, &vol);
    m.wait_job(&archive(&m, &s1, &target));
    m.wait_job(&archive(&m, &s2, &target));
    let pack_bytes = |s3: &S3Server| -> u64 {
        s3.list("maas")
            .into_iter()
            .filter(|(k, _)| k.starts_with("packs/"))
            .map(|(_, n)| n)
            .sum()
    };
    let before = pack_bytes(&s3);
    assert!(before >= 64 * MIB, "{before}");

    let j = m.wait_job(&m.call("DELETE", &format!("/snapshots/{s1}"), None).1);
    let r = &j["result"]["archives"][0];
    assert_eq!(r["packs_repacked"], 1, "{j}");
    assert_eq!(r["packs_written"], 1, "{j}");
    let moved = r["bytes_rewritten"].as_u64().unwrap();
    assert!((7 * MIB..10 * MIB).contains(&moved), "{j}");
    assert!(r["manifests_rewritten"].as_u64().unwrap() >= 1, "{j}");
    // What is left is day 2's 40 MiB (and its index), not day 1's dead 24 MiB.
    let after = pack_bytes(&s3);
    assert!(
        (40 * MIB..=41 * MIB).contains(&after),
        "{after} bytes of packs: {j}"
    );

    // Day 2 verifies, evicts, mounts from the archive and reads back what QEMU wrote.
    let (s, job) = m.call(
        "POST",
        &format!("/snapshots/{s2}/archives/{target}/verify"),
        None,
    );
    assert_eq!(s, 202, "{job}");
    assert_eq!(m.wait_job(&job)["state"], "succeeded");
    m.wait_job(&m.call("POST", &format!("/snapshots/{s2}/evict"), None).1);
    assert!(clone_reads_back(
        &m,
        &s2,
        "day2-mounted",
        dir.path(),
        "day2-full.img"
    ));

    // A new installation reading the bucket finds day 2 whole (its manifest names the packs
    // that hold it now).
    let fresh = Maasd::start_local(&dir.path().join("fresh"));
    body["recovery_key"] = recovery;
    let (s, t2) = fresh.call("POST", "/archive-targets", Some(body));
    assert_eq!(s, 201, "{t2}");
    let t2 = t2["id"].as_str().unwrap();
    let j = fresh.wait_job(
        &fresh
            .call("POST", &format!("/archive-targets/{t2}/import"), None)
            .1,
    );
    assert_eq!(j["result"]["snapshots_imported"], json!([s2]), "{j}");
    fresh.wait_job(
        &fresh
            .call("POST", &format!("/snapshots/{s2}/rehydrate"), None)
            .1,
    );
    assert!(clone_reads_back(
        &fresh,
        &s2,
        "restored",
        dir.path(),
        "day2-full.img"
    ));
}

#[test]
fn a_bucket_deleted_under_a_target_fails_clearly_and_damages_nothing() {
    let dir = TestDir::new("maas-archive-gone");
    // moto: s3s-fs writes objects into a deleted bucket's directory as if it were there.
    let s3 = S3Server::start(Kind::Moto, &dir.path().join("s3"));
    s3.create_bucket("gone", false);
    let m = Maasd::start_local(&dir.path().join("maasd"));
    let target = create_target(&m, target_body("offsite", &s3.endpoint(), "gone"));
    let vol = volume(&m, "files", 32 * MIB, 512);
    qemu_write(&m, dir.path(), &vol, "day1.img", 8 * MIB);
    let s1 = seal(&m, &vol);
    m.wait_job(&archive(&m, &s1, &target));
    let s2 = seal(&m, &vol);
    m.wait_job(&archive(&m, &s2, &target));
    m.wait_job(&m.call("POST", &format!("/snapshots/{s2}/evict"), None).1);
    qemu_write(&m, dir.path(), &vol, "day3.img", 2 * MIB);
    let s3snap = seal(&m, &vol);

    // Someone deletes the bucket.
    let out = s3.aws(&["s3", "rb", "s3://gone", "--force"]);
    assert!(out.status.success(), "{out:?}");
    let failed = |job: Value, want: &str| {
        let j = m.wait_job_end(&job);
        assert_eq!(j["state"], "failed", "{j}");
        assert_eq!(j["error"]["code"], want, "{j}");
    };
    let started = Instant::now();
    failed(archive(&m, &s3snap, &target), "ARCHIVE_BUCKET_NOT_FOUND");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "retried a missing bucket"
    );
    let (s, job) = m.call("POST", &format!("/snapshots/{s2}/rehydrate"), None);
    assert_eq!(s, 202, "{job}");
    failed(job, "ARCHIVE_BUCKET_NOT_FOUND");
    let (s, job) = m.call(
        "POST",
        &format!("/snapshots/{s2}/clones"),
        Some(json!({"name": "from-gone"})),
    );
    assert_eq!(s, 202, "{job}");
    failed(job, "ARCHIVE_BUCKET_NOT_FOUND");
    // Nothing local was touched: day 3 and day 1 read back; day 2 is still listed where it was.
    let snap = m.ok("GET", &format!("/snapshots/{s2}"), None);
    assert_eq!(snap["location"], "archive", "{snap}");
    assert!(clone_reads_back(&m, &s1, "day1", dir.path(), "day1.img"));
    let rep = maas_tests::maasd::verify_pool(&m);
    assert!(
        rep["damaged"].as_array().is_some_and(|d| d.is_empty()),
        "{rep}"
    );

    // A snapshot whose copy was in the bucket can still be deleted.
    let j = m.wait_job(&m.call("DELETE", &format!("/snapshots/{s1}"), None).1);
    assert_eq!(j["result"]["archives"][0]["bucket_missing"], true, "{j}");

    // The bucket recreated empty (or the prefix wiped): a push must not count on the packs
    // the pool remembers there.
    s3.create_bucket("gone", false);
    failed(archive(&m, &s3snap, &target), "ARCHIVE_PREFIX_LOST");

    // The way out: the snapshots whose copies are gone can be deleted, then the target.
    let j = m.wait_job(&m.call("DELETE", &format!("/snapshots/{s2}"), None).1);
    assert_eq!(j["state"], "succeeded", "{j}");
    let j = m.wait_job(&m.call("DELETE", &format!("/snapshots/{s3snap}"), None).1);
    assert_eq!(j["state"], "succeeded", "{j}");
    m.ok("DELETE", &format!("/archive-targets/{target}"), None);
}

#[test]
fn a_rehydrate_cut_short_after_the_pools_commit_is_finished_at_restart() {
    let dir = TestDir::new("maas-archive-cut");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let mut m = Maasd::start_local(&dir.path().join("maasd"));
    let target = create_target(&m, target_body("offsite", &s3.endpoint(), "maas"));
    let vol = volume(&m, "files", 32 * MIB, 512);
    qemu_write(&m, dir.path(), &vol, "day1.img", 8 * MIB);
    let s1 = seal(&m, &vol);
    m.wait_job(&archive(&m, &s1, &target));
    m.wait_job(&m.call("POST", &format!("/snapshots/{s1}/evict"), None).1);
    m.stop();
    // What the rehydrate job does up to its last step, the pool's commit; maasd "dies" before
    // the catalog hears of it.
    {
        let pool = maas_pool::Pool::open(
            &dir.path().join("maasd/data/pool"),
            maas_pool::OpenOptions::default(),
        )
        .unwrap();
        let bucket = maas_s3::Bucket::new(maas_s3::TargetConfig {
            endpoint: s3.endpoint(),
            region: "us-east-1".into(),
            bucket: "maas".into(),
            prefix: String::new(),
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
            path_style: true,
            storage_class: None,
            object_lock: None,
            cipher: None,
        })
        .unwrap();
        let archive = maas_s3::Archive::new(1).unwrap();
        maas_s3::restore::restore_snapshot(
            &archive,
            &pool,
            &bucket,
            &target,
            &s1,
            None,
            maas_s3::restore::RestoreOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        pool.close().unwrap();
    }
    m.start_again();
    assert!(
        m.log().contains("finished an interrupted rehydrate"),
        "{}",
        m.log()
    );
    // The snapshot is local again, once: no stranger adopted beside it.
    let l = m.ok("GET", "/snapshots", None);
    let items = l["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{l}");
    assert_eq!(items[0]["id"], json!(s1));
    assert_eq!(items[0]["location"], "local");
    let c = clone_snapshot(&m, &s1, "back");
    let back = dir.path().join("back.img");
    qemu_read(&m, &c, &back);
    assert!(same_prefix(&back, &dir.path().join("day1.img")));

    // Now an eviction of that brought-back snapshot cut after the catalog moved it to the
    // archive, before the pool's delete: the restart finishes the eviction, and the pool
    // snapshot it deletes (which still names the catalog's snapshot as its origin) is not
    // then taken for an interrupted rehydrate.
    m.ok("DELETE", &format!("/volumes/{c}"), None);
    m.stop();
    {
        let cat = maas_manager::catalog::Catalog::open(
            &dir.path()
                .join("maasd/data/catalog.sqlite")
                .display()
                .to_string(),
        )
        .unwrap();
        let mut row = cat.snapshot(&s1).unwrap().unwrap();
        row.location = "archive".into();
        cat.update_snapshot(&row).unwrap();
    }
    m.start_again();
    assert!(
        m.log().contains("finished an interrupted eviction"),
        "{}",
        m.log()
    );
    let snap = m.ok("GET", &format!("/snapshots/{s1}"), None);
    assert_eq!(snap["location"], "archive", "{snap}");
    assert_eq!(m.ok("GET", "/pools/default", None)["snapshots"], 0);
    // Still whole in the archive: rehydrated once more, it reads back.
    m.wait_job(
        &m.call("POST", &format!("/snapshots/{s1}/rehydrate"), None)
            .1,
    );
    let c = clone_snapshot(&m, &s1, "again");
    qemu_read(&m, &c, &back);
    assert!(same_prefix(&back, &dir.path().join("day1.img")));
}

#[test]
fn a_check_finds_lost_and_orphan_packs_and_after_a_repair_a_push_heals_the_copy() {
    let dir = TestDir::new("maas-archive-check");
    let s3 = S3Server::start(Kind::S3sFs, &dir.path().join("s3"));
    s3.create_bucket("maas", false);
    let m = Maasd::start_local(&dir.path().join("maasd"));
    let target = create_target(&m, target_body("offsite", &s3.endpoint(), "maas"));
    let vol = volume(&m, "files", 64 * MIB, 512);
    qemu_write(&m, dir.path(), &vol, "day1.img", 40 * MIB);
    let s1 = seal(&m, &vol);
    m.wait_job(&archive(&m, &s1, &target));
    let check = |body: Value| {
        let (s, job) = m.call(
            "POST",
            &format!("/archive-targets/{target}/check"),
            Some(body),
        );
        assert_eq!(s, 202, "{job}");
        m.wait_job(&job)["result"].clone()
    };
    let packs = || -> Vec<String> {
        s3.list("maas")
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with("packs/"))
            .collect()
    };
    let r = check(json!({}));
    assert_eq!(r["packs_missing"], json!([]), "{r}");
    assert_eq!(r["orphans"], json!([]), "{r}");
    assert_eq!(r["orphans_young"], 0, "{r}");
    assert_eq!(r["snapshots_damaged"], json!([]), "{r}");
    let before = packs();
    assert!(before.len() >= 2, "{before:?}");

    // Behind MaaS's back: one of the snapshot's packs deleted, and an orphan left (as by a
    // push cut short between its upload and its record).
    let lost = before[0].clone();
    let out = s3.aws(&["s3", "rm", &format!("s3://maas/{lost}")]);
    assert!(out.status.success(), "{out:?}");
    let orphan = format!("packs/ee/{}", "e".repeat(64));
    std::fs::write(dir.path().join("orphan"), vec![7u8; 4096]).unwrap();
    let out = s3.aws(&[
        "s3",
        "cp",
        &dir.path().join("orphan").display().to_string(),
        &format!("s3://maas/{orphan}"),
    ]);
    assert!(out.status.success(), "{out:?}");

    // A check reports both and sets the copy aside, deleting nothing.
    let r = check(json!({}));
    assert_eq!(r["packs_missing"], json!([lost]), "{r}");
    assert_eq!(r["snapshots_damaged"], json!([s1]), "{r}");
    assert_eq!(r["copies_marked_damaged"], json!([s1]), "{r}");
    assert_eq!(r["orphans_young"], 1, "{r}");
    assert_eq!(r["orphans"], json!([]), "{r}");
    assert_eq!(
        m.ok("GET", &format!("/snapshots/{s1}"), None)["archives"][0]["state"],
        "damaged"
    );
    assert!(packs().contains(&orphan));
    let (s, e) = m.call("POST", &format!("/snapshots/{s1}/evict"), None);
    assert_eq!(s, 409, "a damaged copy must not replace the local one: {e}");

    // A repair (no grace): the orphan goes, the lost pack is forgotten; nothing else moves.
    let r = check(json!({"repair": true, "orphan_grace_hours": 0}));
    assert_eq!(r["orphans_deleted"], 1, "{r}");
    assert_eq!(r["packs_forgotten"], 1, "{r}");
    let after = packs();
    assert!(!after.contains(&orphan), "{after:?}");
    assert_eq!(after.len(), before.len() - 1, "{after:?}");

    // Pushing the snapshot again sends what was lost, and the copy verifies whole.
    let j = m.wait_job(&archive(&m, &s1, &target));
    assert!(j["result"]["objects_sent"].as_u64().unwrap() > 0, "{j}");
    let (s, job) = m.call(
        "POST",
        &format!("/snapshots/{s1}/archives/{target}/verify"),
        None,
    );
    assert_eq!(s, 202, "{job}");
    m.wait_job(&job);
    assert_eq!(
        m.ok("GET", &format!("/snapshots/{s1}"), None)["archives"][0]["state"],
        "archived"
    );
    let r = check(json!({}));
    assert_eq!(
        (r["packs_missing"].clone(), r["snapshots_damaged"].clone()),
        (json!([]), json!([])),
        "{r}"
    );
}
