#![allow(clippy::unwrap_used, clippy::expect_used)]
//! maasd as a daemon: annotated defaults, JSON logs with a request id on every request.

mod common;

use std::process::Command;

use common::*;

#[test]
fn print_default_config_is_valid_annotated_toml() {
    let out = Command::new(env!("CARGO_BIN_EXE_maasd"))
        .arg("--print-default-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("MAAS_<SECTION>_<KEY>"));
    assert!(
        text.lines().filter(|l| l.starts_with('#')).count() >= 15,
        "annotated:\n{text}"
    );
    // The printed file is accepted back as a config.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("maasd.toml");
    std::fs::write(
        &f,
        text.replace("127.0.0.1:8080", &format!("127.0.0.1:{}", free_port())),
    )
    .unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[api]\nlisten = 12\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_maasd"))
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.toml"),
        "the error names the file"
    );
}

#[test]
fn json_logs_carry_request_ids() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: set before maasd is spawned (inherited by the child); no other thread reads it.
    unsafe { std::env::set_var("MAAS_LOG_FORMAT", "json") };
    let mut m = Maasd::start(dir.path(), None);
    let (_, body) = m.call("GET", "/volumes/vol-nope", None);
    let rid = body["request_id"].as_str().unwrap().to_string();
    m.ok(
        "POST",
        "/volumes",
        serde_json::json!({"name": "j", "size": 1u64 << 20}).into(),
    );
    m.stop();
    let log = m.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 5);
    let created = lines
        .iter()
        .find(|l| l["fields"]["message"] == "volume created")
        .expect("volume created is logged");
    assert!(
        created["span"]["request_id"]
            .as_str()
            .is_some_and(|r| r.len() == 32),
        "{created}"
    );
    assert!(rid.len() == 32);
}

#[test]
fn logs_to_a_file_are_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start(dir.path(), None);
    m.stop();
    let log = m.log();
    assert!(log.contains("maasd stopped cleanly"));
    assert!(!log.contains('\u{1b}'), "no ANSI escapes in a log file");
}
