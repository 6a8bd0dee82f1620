#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! Third-party iSCSI clients for the tests: libiscsi's tools, QEMU 7.2's iSCSI driver and
//! fio's libiscsi engine, as prepared by `scripts/iscsi-peers.sh`.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use super::Maasd;

/// Initiator names libiscsi's test tool uses by default.
pub const TEST_CU_INITIATOR: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test";
pub const TEST_CU_INITIATOR_2: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2";
/// QEMU's default initiator name.
pub const QEMU_INITIATOR: &str = "iqn.2008-11.org.linux-kvm";

fn peers_dir() -> PathBuf {
    let cache = std::env::var("MAAS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/maas"));
    cache.join("peers")
}

/// A peer tool: from its environment variable, else where `scripts/iscsi-peers.sh` puts it.
/// A missing tool is a failure with instructions, never a skip.
pub fn tool(var: &str, fallback: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
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

pub fn qemu_img() -> PathBuf {
    tool("MAAS_QEMU_IMG", "qemu-img-7.2")
}

/// Runs a command with a hard timeout (killing it after), returning its output.
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
    full.output().unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Creates a volume; returns its id.
pub fn volume(m: &Maasd, name: &str, size: u64, block_size: u32) -> String {
    let (st, v) = m.call(
        "POST",
        "/volumes",
        Some(json!({"name": name, "size": size, "block_size": block_size})),
    );
    assert_eq!(st, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// Exports a volume over iSCSI; returns the export object.
pub fn export(m: &Maasd, vol: &str, initiators: &[&str], chap: Option<Value>) -> Value {
    let mut body = json!({"protocol": "iscsi", "initiators": initiators});
    if let Some(c) = chap {
        body["chap"] = c;
    }
    let (st, e) = m.call("POST", &format!("/volumes/{vol}/exports"), Some(body));
    assert_eq!(st, 201, "{e}");
    e
}

/// `iscsi://[user%secret@]portal/target/lun` for an export.
pub fn url(e: &Value, creds: Option<(&str, &str)>) -> String {
    let auth = creds.map(|(u, s)| format!("{u}%{s}@")).unwrap_or_default();
    format!(
        "iscsi://{auth}{}/{}/{}",
        e["portal"].as_str().unwrap(),
        e["target"].as_str().unwrap(),
        e["lun"].as_u64().unwrap()
    )
}

/// QEMU `--image-opts` for an export with a chosen initiator name.
pub fn qemu_opts(e: &Value, initiator: &str) -> String {
    format!(
        "driver=iscsi,transport=tcp,portal={},target={},lun={},initiator-name={}",
        e["portal"].as_str().unwrap(),
        e["target"].as_str().unwrap(),
        e["lun"].as_u64().unwrap(),
        initiator
    )
}

/// Waits for a job to finish; returns its result.
pub fn wait_job(m: &Maasd, job: &Value) -> Value {
    let id = job["id"].as_str().unwrap();
    let t = std::time::Instant::now();
    loop {
        let (st, j) = m.call("GET", &format!("/jobs/{id}"), None);
        assert_eq!(st, 200);
        if j["state"] == "succeeded" {
            return j["result"].clone();
        }
        assert_ne!(j["state"], "failed", "job failed: {j}");
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "job {id} did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Seals a volume; returns the snapshot id.
pub fn seal(m: &Maasd, vol: &str) -> String {
    let (st, job) = m.call("POST", &format!("/volumes/{vol}/snapshots"), None);
    assert_eq!(st, 202, "{job}");
    wait_job(m, &job)["snapshot"].as_str().unwrap().to_string()
}

/// Clones a snapshot into a new volume; returns its id.
pub fn clone_snapshot(m: &Maasd, snap: &str, name: &str) -> String {
    let (st, job) = m.call(
        "POST",
        &format!("/snapshots/{snap}/clones"),
        Some(json!({"name": name})),
    );
    assert_eq!(st, 202, "{job}");
    wait_job(m, &job)["volume"].as_str().unwrap().to_string()
}
