#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The pool's files are private to its user whatever the umask: directory 0700, devices,
//! metadata store and superblock 0600; wider modes found at open are tightened.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use maas_pool::{DeviceSpec, Pool, Tier};

const CHILD_DIR: &str = "MAAS_PERMS_TEST_DIR";

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every path under `dir` (and `dir`) with its mode.
fn modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = vec![(dir.to_path_buf(), mode(dir))];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(modes(&p));
        } else {
            out.push((p.clone(), mode(&p)));
        }
    }
    out
}

fn assert_private(dir: &Path, outside_device: &Path) {
    let all = modes(dir);
    for name in ["pool.json", "meta.redb", "dev0"] {
        assert!(
            all.iter().any(|(p, _)| p.ends_with(name)),
            "{name} missing: {all:?}"
        );
    }
    for (p, m) in &all {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*m, want, "{} is {m:04o}", p.display());
    }
    assert_eq!(
        mode(outside_device),
        0o600,
        "a device outside the directory"
    );
}

/// Run in a child with umask 0 by [`pool_files_are_private_whatever_the_umask`]: creates a pool
/// with a device in its directory, then adds one outside it.
#[test]
#[ignore = "run by pool_files_are_private_whatever_the_umask in a child process with umask 0"]
fn child_creates_a_pool() {
    let Some(base) = std::env::var_os(CHILD_DIR).map(PathBuf::from) else {
        return;
    };
    // SAFETY: umask(2) only reads and sets the process's mask.
    let was = unsafe { libc::umask(0) };
    assert_eq!(was, 0, "the parent set umask 0");
    let dir = base.join("pool");
    let pool = Pool::create(
        &dir,
        small_pool_opts(&dir, 64 * MIB, 64 << 10),
        test_open_opts(),
    )
    .unwrap();
    pool.add_device(DeviceSpec {
        path: base.join("outside.dev"),
        tier: Tier::Hdd,
        size: 64 * MIB,
    })
    .unwrap();
    let v = pool.create_volume("v", 4 * MIB, 4096).unwrap();
    let vol = pool.open_volume(v.id).unwrap();
    maas_pool::BlockDevice::write(&vol, 0, &pattern(1, 1 << 20), true).unwrap();
    pool.seal(v.id).unwrap();
    drop(vol);
    pool.close().unwrap();
}

#[test]
fn pool_files_are_private_whatever_the_umask() {
    let base = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "child_creates_a_pool",
        "--ignored",
        "--nocapture",
    ])
    .env(CHILD_DIR, base.path());
    // SAFETY: umask(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child: {text}"
    );
    let dir = base.path().join("pool");
    let outside = base.path().join("outside.dev");
    assert_private(&dir, &outside);

    // Modes widened behind the pool's back are tightened when it opens again.
    for (p, _) in modes(&dir) {
        let wide = if p.is_dir() { 0o777 } else { 0o666 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(wide)).unwrap();
    }
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
    let pool = Pool::open(&dir, test_open_opts()).unwrap();
    assert_private(&dir, &outside);
    assert_eq!(pool.volumes().len(), 1);
    pool.close().unwrap();
}
