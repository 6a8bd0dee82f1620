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

/// Writes a fake meminfo (atomically) for `MAAS_TEST_MEMINFO`.
fn fake_meminfo(path: &std::path::Path, total: u64, available: u64) {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!(
            "MemTotal: {} kB\nMemAvailable: {} kB\n",
            total / 1024,
            available / 1024
        ),
    )
    .unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Started with no RAM tier settings, maasd sizes the RAM tier from the machine's memory (half
/// of it here, split 5:2:1), says so in its log and in the pool's API, and gives memory back
/// when memory runs short.
#[test]
fn default_start_sizes_the_ram_tier_from_memory() {
    const GIB: u64 = 1 << 30;
    let dir = tempfile::tempdir().unwrap();
    let fake = tempfile::tempdir().unwrap();
    let mem = fake.path().join("meminfo");
    fake_meminfo(&mem, 8 * GIB, 7 * GIB);
    let mut m = Maasd::builder(MAASD, dir.path())
        .env("MAAS_TEST_MEMINFO", mem.to_str().unwrap())
        .start();
    let p = m.ok("GET", "/pools/default", None);
    // No target has read anything yet.
    for k in ["from_memory", "device_async", "blocking"] {
        assert_eq!(p["reads"][k], 0, "{p}");
    }
    let r = &p["ram_tier"];
    assert_eq!(r["auto"], true, "{p}");
    assert_eq!(r["max_bytes"], 4 * GIB, "{p}");
    assert_eq!(r["target_bytes"], 4 * GIB, "{p}");
    assert_eq!(r["chunk_cache_limit"], 4 * GIB * 5 / 8, "{p}");
    assert_eq!(r["log_cache_limit"], 4 * GIB * 2 / 8, "{p}");
    assert_eq!(r["write_buffer_limit"], 4 * GIB / 8, "{p}");
    let log = m.log();
    assert!(log.contains("RAM tier sized automatically"), "{log}");
    assert!(
        log.contains("from a test file"),
        "the test override is loud: {log}"
    );
    // Memory runs short: the tier shrinks within a few seconds.
    fake_meminfo(&mem, 8 * GIB, 8 * GIB / 50);
    let t0 = std::time::Instant::now();
    loop {
        let p = m.ok("GET", "/pools/default", None);
        if p["ram_tier"]["shrinks"].as_u64().unwrap() > 0 {
            assert!(p["ram_tier"]["target_bytes"].as_u64().unwrap() < GIB, "{p}");
            break;
        }
        assert!(t0.elapsed().as_secs() < 20, "no shrink: {p}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    m.stop();
    assert!(m.log().contains("giving memory back"));
}

/// Explicit sizes win: fixed, no watcher.
#[test]
fn explicit_ram_tier_sizes_are_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::builder(MAASD, dir.path())
        .env("MAAS_POOL_CACHE_BYTES", "33554432")
        .env("MAAS_POOL_LOG_CACHE_BYTES", "16777216")
        .env("MAAS_POOL_WRITE_BUFFER_BYTES", "8388608")
        .start();
    let p = m.ok("GET", "/pools/default", None);
    let r = &p["ram_tier"];
    assert_eq!(r["auto"], false, "{p}");
    assert_eq!(r["chunk_cache_limit"], 32u64 << 20, "{p}");
    assert_eq!(r["log_cache_limit"], 16u64 << 20, "{p}");
    assert_eq!(r["write_buffer_limit"], 8u64 << 20, "{p}");
    m.stop();
    assert!(m.log().contains("every size fixed by configuration"));
}

/// A restart is prompt even while clients hold connections: an idle kept-alive one (as every
/// HTTP client's pool keeps), and one that connected and never sent a byte. maasd's graceful
/// stop waits for open connections up to its 30 s shutdown timeout; its connection timeouts
/// must stay short enough that a stop does not sit out that limit.
#[test]
fn sigterm_stops_promptly_while_clients_hold_idle_connections() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start(dir.path(), None);
    m.ok(
        "POST",
        "/volumes",
        serde_json::json!({"name": "idle", "size": 1u64 << 20}).into(),
    );
    let _silent = std::net::TcpStream::connect(("127.0.0.1", m.port)).unwrap();
    let t = std::time::Instant::now();
    m.stop();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(12),
        "maasd took {:?} to stop",
        t.elapsed()
    );
}
