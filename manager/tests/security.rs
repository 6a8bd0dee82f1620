#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Security fails closed: maasd's files are private whatever the umask; CHAP secrets are
//! encrypted in the catalog, and an export whose secrets cannot be read stays down.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::process::Command;

use common::iscsi::{export, run_with_timeout, text, url};
use common::*;
use maas_manager::catalog::Catalog;
use serde_json::json;

const MIB: u64 = 1 << 20;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every path under `dir` (and `dir`).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Directories 0700 and files 0600, everywhere in maasd's data directory.
fn assert_private(data: &Path) {
    let all = walk(data);
    for name in [
        "admin.token",
        "catalog.sqlite",
        "catalog.sqlite-wal",
        "catalog.sqlite-shm",
        "pool/pool.json",
        "pool/meta.redb",
        "pool/data-0.dev",
    ] {
        assert!(
            all.contains(&data.join(name)),
            "{name} missing from {all:?}"
        );
    }
    for p in &all {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(p), want, "{} is {:04o}", p.display(), mode(p));
    }
}

#[test]
fn maasd_files_are_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::builder(MAASD, dir.path()).umask(0).start();
    let vol = maas_tests::maasd::volume(&m, "private", 64 * MIB, 512);
    export(
        &m,
        &vol,
        &["iqn.2026-11.test:host"],
        Some(json!({"user": "backup", "secret": "s3cret-s3cret"})),
    );
    let data = dir.path().join("data");
    assert_private(&data);
    m.stop();

    // Modes widened while maasd was down are tightened at the next start, and logged.
    for p in walk(&data) {
        let wide = if p.is_dir() { 0o777 } else { 0o666 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(wide)).unwrap();
    }
    m.umask = None;
    m.start_again();
    assert_private(&data);
    let log = m.log();
    for name in [
        "admin.token",
        "catalog.sqlite",
        "pool.json",
        "meta.redb",
        "data-0.dev",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("tightened permissions") && l.contains(name)),
            "{name} not logged:\n{log}"
        );
    }
}

/// `iscsi-inq` from `initiator` to an export with these CHAP credentials: did it log in?
fn logs_in(initiator: &str, e: &serde_json::Value, creds: Option<(&str, &str)>) -> (bool, String) {
    let out = run_with_timeout(
        Command::new("iscsi-inq").args(["-i", initiator, &url(e, creds)]),
        60,
    );
    (out.status.success(), text(&out))
}

/// Does any of the catalog's files hold `needle`?
fn catalog_files_hold(data: &Path, needle: &str) -> bool {
    ["catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"]
        .iter()
        .filter_map(|f| std::fs::read(data.join(f)).ok())
        .any(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
}

fn catalog(data: &Path) -> Catalog {
    Catalog::open(&data.join("catalog.sqlite").display().to_string()).unwrap()
}

const HOST: &str = "iqn.2026-11.test:host";
const SECRET_A: &str = "s3cret-of-export-a";
const SECRET_B: &str = "s3cret-of-export-b";
const MUTUAL_B: &str = "mutual-s3cret-of-b";

#[test]
fn unreadable_chap_secrets_keep_their_export_down_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start_local(dir.path());
    let data = dir.path().join("data");
    let vol = maas_tests::maasd::volume(&m, "guarded", 64 * MIB, 512);
    let a = export(
        &m,
        &vol,
        &[HOST],
        Some(json!({"user": "backup", "secret": SECRET_A})),
    );
    let b = export(
        &m,
        &vol,
        &[HOST],
        Some(
            json!({"user": "backup", "secret": SECRET_B, "mutual_user": "maas", "mutual_secret": MUTUAL_B}),
        ),
    );
    let (ia, ib) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    assert_eq!(a["state"], "live");
    for (e, secret) in [(&a, SECRET_A), (&b, SECRET_B)] {
        let (ok, out) = logs_in(HOST, e, Some(("backup", secret)));
        assert!(ok, "{out}");
    }
    // The catalog holds the secrets sealed (user names in clear), never in clear.
    let col = catalog(&data).export(ia).unwrap().unwrap().chap.unwrap();
    assert!(
        col.contains("maas-sealed:v1:") && col.contains("\"backup\""),
        "{col}"
    );
    for s in [SECRET_A, SECRET_B, MUTUAL_B] {
        assert!(
            !catalog_files_hold(&data, s),
            "{s} is in the catalog's files"
        );
    }
    m.stop();

    // Damage A's sealed secrets in the catalog, behind maasd's back.
    let cat = catalog(&data);
    let mut bytes = col.clone().into_bytes();
    let pos = col.rfind('"').unwrap() - 5;
    bytes[pos] = if bytes[pos] == b'a' { b'b' } else { b'a' };
    cat.set_export_chap(ia, std::str::from_utf8(&bytes).unwrap())
        .unwrap();
    drop(cat);
    m.start_again();

    // A is not served: the right secret, no secret, all refused. B still works.
    for creds in [Some(("backup", SECRET_A)), None] {
        let (ok, out) = logs_in(HOST, &a, creds);
        assert!(!ok, "export A with damaged secrets let {creds:?} in: {out}");
    }
    let (ok, out) = logs_in(HOST, &b, Some(("backup", SECRET_B)));
    assert!(ok, "{out}");
    // The reason is visible over REST and in the log, with the export's id.
    let ga = m.ok("GET", &format!("/exports/{ia}"), None);
    assert_eq!(ga["state"], "failed", "{ga}");
    assert_eq!(ga["error"]["code"], "CHAP_SECRET_UNREADABLE", "{ga}");
    let msg = ga["error"]["message"].as_str().unwrap();
    assert!(msg.contains(ia) && msg.contains("damaged"), "{msg}");
    assert_eq!(
        ga["chap"]["user"], "backup",
        "still shown as a CHAP export: {ga}"
    );
    let gb = m.ok("GET", &format!("/exports/{ib}"), None);
    assert_eq!(gb["state"], "live", "{gb}");
    assert!(gb.get("error").is_none(), "{gb}");
    let log = m.log();
    assert!(
        log.lines()
            .any(|l| l.contains("export could not be restored")
                && l.contains(ia)
                && l.contains("CHAP_SECRET_UNREADABLE")),
        "{log}"
    );
    // Malformed JSON in the column fails the same way (never "no CHAP").
    m.stop();
    catalog(&data).set_export_chap(ia, "{not json").unwrap();
    m.start_again();
    let (ok, out) = logs_in(HOST, &a, None);
    assert!(!ok, "{out}");
    let ga = m.ok("GET", &format!("/exports/{ia}"), None);
    assert_eq!(ga["error"]["code"], "CHAP_SECRET_UNREADABLE", "{ga}");

    // A lost key: every CHAP export stays down, and says the key changed.
    m.stop();
    std::fs::remove_file(data.join("catalog.key")).unwrap();
    m.start_again();
    let (ok, out) = logs_in(HOST, &b, Some(("backup", SECRET_B)));
    assert!(!ok, "{out}");
    let gb = m.ok("GET", &format!("/exports/{ib}"), None);
    assert_eq!(gb["state"], "failed", "{gb}");
    assert!(
        gb["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another catalog key"),
        "{gb}"
    );
    // A failed export can be deleted.
    m.ok("DELETE", &format!("/exports/{ia}"), None);
}

#[test]
fn chap_secrets_kept_in_clear_by_older_builds_are_sealed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start_local(dir.path());
    let data = dir.path().join("data");
    let vol = maas_tests::maasd::volume(&m, "legacy", 64 * MIB, 512);
    let e = export(
        &m,
        &vol,
        &[HOST],
        Some(json!({"user": "backup", "secret": SECRET_A})),
    );
    let id = e["id"].as_str().unwrap();
    m.stop();
    // What builds before encryption wrote: the api::Chap JSON, secrets in clear.
    let legacy = json!({"user": "backup", "secret": SECRET_B, "mutual_user": "maas", "mutual_secret": MUTUAL_B});
    catalog(&data)
        .set_export_chap(id, &legacy.to_string())
        .unwrap();
    assert!(catalog_files_hold(&data, SECRET_B));
    m.start_again();
    // Still served, with those secrets (mutual CHAP included)...
    let (ok, out) = logs_in(HOST, &e, Some(("backup", SECRET_B)));
    assert!(ok, "{out}");
    let out = run_with_timeout(
        Command::new("iscsi-inq")
            .args(["-i", HOST, &url(&e, Some(("backup", SECRET_B)))])
            .env("LIBISCSI_CHAP_TARGET_USERNAME", "maas")
            .env("LIBISCSI_CHAP_TARGET_PASSWORD", MUTUAL_B),
        60,
    );
    assert!(out.status.success(), "mutual CHAP: {}", text(&out));
    let (ok, _) = logs_in(HOST, &e, None);
    assert!(!ok, "still CHAP-protected");
    // ... and now sealed in the catalog, with no copy left in its files.
    let col = catalog(&data).export(id).unwrap().unwrap().chap.unwrap();
    assert!(
        col.contains("maas-sealed:v1:") && !col.contains(SECRET_B),
        "{col}"
    );
    for s in [SECRET_B, MUTUAL_B] {
        assert!(
            !catalog_files_hold(&data, s),
            "{s} still in the catalog's files"
        );
    }
    assert!(m.log().contains("encrypted in the catalog"), "{}", m.log());
    let g = m.ok("GET", &format!("/exports/{id}"), None);
    assert_eq!(
        (g["state"].as_str(), g["chap"]["mutual_user"].as_str()),
        (Some("live"), Some("maas")),
        "{g}"
    );
}
