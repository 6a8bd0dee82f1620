#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Security fails closed: maasd's files are private whatever the umask.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::iscsi::export;
use common::*;
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
