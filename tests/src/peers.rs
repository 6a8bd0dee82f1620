//! Third-party tools prepared by `scripts/iscsi-peers.sh` (QEMU 7.2's qemu-img/qemu-io, fio
//! with libiscsi, tgt, libiscsi's tools), and running tools with a hard timeout.

use std::path::PathBuf;
use std::process::{Command, Output};

fn peers_dir() -> PathBuf {
    let cache = std::env::var_os("MAAS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/maas")))
        .unwrap_or_else(|| PathBuf::from("/nonexistent"));
    cache.join("peers")
}

/// A peer tool: from its environment variable, else where `scripts/iscsi-peers.sh` puts it
/// (`fallback`: a name in its bin directory, or an absolute path). A missing tool is a failure
/// with instructions, never a skip.
pub fn tool(var: &str, fallback: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let p = if fallback.starts_with('/') {
        PathBuf::from(fallback)
    } else {
        peers_dir().join("bin").join(fallback)
    };
    assert!(
        p.exists(),
        "{} is missing: run scripts/iscsi-peers.sh (the README's test command does)",
        p.display()
    );
    p
}

/// QEMU 7.2's qemu-img (with its iSCSI block driver).
pub fn qemu_img() -> PathBuf {
    tool("MAAS_QEMU_IMG", "qemu-img-7.2")
}

/// QEMU 7.2's qemu-io (with its iSCSI block driver).
pub fn qemu_io() -> PathBuf {
    tool("MAAS_QEMU_IO", "qemu-io-7.2")
}

/// Runs a command with a hard timeout (`timeout -k 5 SECS`), returning its output.
pub fn run_with_timeout(cmd: &mut Command, secs: u64) -> Output {
    let mut full = Command::new("timeout");
    full.arg("-k")
        .arg("5")
        .arg(secs.to_string())
        .arg(cmd.get_program());
    full.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => full.env(k, v),
            None => full.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        full.current_dir(d);
    }
    full.output()
        .unwrap_or_else(|e| panic!("running {:?}: {e}", cmd.get_program()))
}

/// stdout then stderr of a finished command, as text.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
