#![allow(clippy::unwrap_used, clippy::expect_used)]
//! maasctl against the real server, and catalog/pool reconciliation after crashes.

mod common;

use std::process::Command;

use common::*;
use serde_json::{Value, json};

fn maasctl(m: &Maasd, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_maasctl"))
        .envs(m.maasctl_env())
        .env("MAASCTL_CONFIG", m.dir.join("no-such-config.toml"))
        .env_remove("MAAS_TOKEN")
        .env_remove("MAAS_TLS_FINGERPRINT")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn ok_json(m: &Maasd, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (ok, out, err) = maasctl(m, &a);
    assert!(ok, "maasctl {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("maasctl {args:?}: {e}: {out}"))
}

#[test]
fn maasctl_drives_every_resource() {
    let dir = tempfile::tempdir().unwrap();
    let m = Maasd::start(dir.path(), None);
    let (ok, out, _) = maasctl(&m, &["health"]);
    assert!(ok && out.contains("ok"));
    let v = ok_json(
        &m,
        &[
            "volume",
            "create",
            "fileserver",
            "50G",
            "--label",
            "site=paris",
            "--block-size",
            "4096",
        ],
    );
    assert_eq!(v["size"], 50u64 << 30);
    assert_eq!(v["labels"]["site"], "paris");
    let vid = v["id"].as_str().unwrap().to_string();
    // Human table by default.
    let (ok, out, _) = maasctl(&m, &["volume", "list"]);
    assert!(
        ok && out.lines().next().unwrap().starts_with("ID")
            && out.contains("fileserver")
            && out.contains("50.0 GiB"),
        "{out}"
    );
    let r = ok_json(&m, &["volume", "resize", &vid, "60G"]);
    assert_eq!(r["size"], 60u64 << 30);
    // Seal with --wait: the job is finished when maasctl returns.
    let j = ok_json(&m, &["--wait", "snapshot", "create", &vid]);
    assert_eq!(j["state"], "succeeded");
    let sid = j["result"]["snapshot"].as_str().unwrap().to_string();
    let list = ok_json(&m, &["snapshot", "list", &vid]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    ok_json(&m, &["snapshot", "star", &sid]);
    let l = ok_json(&m, &["snapshot", "lock", &sid, "2031-05-01T00:00:00Z"]);
    assert_eq!(l["locked_until"], "2031-05-01T00:00:00Z");
    // A refused operation prints the API's code and message and fails.
    let (ok, _, err) = maasctl(&m, &["--wait", "snapshot", "delete", &sid]);
    assert!(!ok && err.contains("SNAPSHOT_LOCKED"), "{err}");
    let (ok, _, err) = maasctl(&m, &["volume", "resize", &vid, "1G"]);
    assert!(!ok && err.contains("SHRINK_REFUSED"), "{err}");
    let (ok, _, err) = maasctl(&m, &["volume", "get", "vol-missing"]);
    assert!(
        !ok && err.contains("VOLUME_NOT_FOUND") && err.contains("404"),
        "{err}"
    );
    let c = ok_json(
        &m,
        &["--wait", "snapshot", "clone", &sid, "fileserver-restore"],
    );
    let cid = c["result"]["volume"].as_str().unwrap().to_string();
    let e = ok_json(
        &m,
        &[
            "export",
            "create",
            &cid,
            "--initiator",
            "iqn.2005-03.org.open-iscsi:guest",
        ],
    );
    assert_eq!(e["protocol"], "iscsi");
    assert_eq!(
        ok_json(&m, &["export", "list", &cid])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (ok, out, _) = maasctl(&m, &["export", "delete", e["id"].as_str().unwrap()]);
    assert!(ok && out.contains("deleted"));
    // NVMe/TCP with DH-HMAC-CHAP (nvme gen-dhchap-key's form); the secret is never shown back.
    let secret = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:";
    let secret_file = dir.path().join("dhchap.key");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let bad_file = dir.path().join("bad.key");
    std::fs::write(&bad_file, "x\n").unwrap();
    let e = ok_json(
        &m,
        &[
            "export",
            "create",
            &cid,
            "--protocol",
            "nvme-tcp",
            "--initiator",
            "nqn.2014-08.org.nvmexpress:uuid:cli",
            "--dhchap-secret-file",
            secret_file.to_str().unwrap(),
            "--dhchap-dhgroup",
            "ffdhe3072",
        ],
    );
    assert_eq!(e["dhchap"]["ctrl_secret"], false, "{e}");
    assert_eq!(e["dhchap"]["dhgroup"], "ffdhe3072", "{e}");
    assert!(!e.to_string().contains("AAECAw"), "{e}");
    let (ok, _, err) = maasctl(
        &m,
        &[
            "export",
            "create",
            &cid,
            "--protocol",
            "nvme-tcp",
            "--dhchap-secret-file",
            bad_file.to_str().unwrap(),
        ],
    );
    assert!(!ok && err.contains("dhchap.host_secret"), "{err}");
    // A secret in argv is refused, and nothing is created.
    let (ok, _, err) = maasctl(
        &m,
        &[
            "export",
            "create",
            &cid,
            "--protocol",
            "nvme-tcp",
            "--dhchap-secret",
            secret,
        ],
    );
    assert!(!ok && err.contains("command line"), "{err}");
    let (ok, out, _) = maasctl(&m, &["export", "delete", e["id"].as_str().unwrap()]);
    assert!(ok && out.contains("deleted"));
    let t = ok_json(&m, &["token", "create", "auditor", "--role", "viewer"]);
    assert_eq!(t["token"]["role"], "viewer");
    let jobs = ok_json(&m, &["job", "list"]);
    assert!(jobs.as_array().unwrap().len() >= 2);
    let p = ok_json(&m, &["pool", "list"]);
    assert_eq!(p[0]["volumes"], 2);
    let j = ok_json(&m, &["--wait", "volume", "delete", &cid]);
    assert_eq!(j["state"], "succeeded");
    // A token from MAAS_TOKEN; a wrong one is refused with the API's code.
    let out = Command::new(env!("CARGO_BIN_EXE_maasctl"))
        .env("MAAS_URL", m.base_url())
        .env("MAAS_CA_CERT", m.ca_cert())
        .env("MAAS_TOKEN", "maas_wrong")
        .env("MAASCTL_CONFIG", m.dir.join("no-such-config.toml"))
        .env_remove("MAAS_TOKEN_FILE")
        .args(["volume", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("UNAUTHORIZED"));
    // A config file works too.
    let cfg = dir.path().join("maasctl.toml");
    std::fs::write(
        &cfg,
        format!(
            "url = \"{}\"\ntoken_file = \"{}\"\nca_cert = \"{}\"\n",
            m.base_url(),
            m.dir.join("data/admin.token").display(),
            m.ca_cert().display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_maasctl"))
        .env("MAASCTL_CONFIG", &cfg)
        .env_remove("MAAS_URL")
        .env_remove("MAAS_TOKEN")
        .env_remove("MAAS_TOKEN_FILE")
        .env_remove("MAAS_CA_CERT")
        .env_remove("MAAS_TLS_FINGERPRINT")
        .args(["--json", "volume", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn restart_reconciles_orphans_and_phantoms() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start(dir.path(), None);
    let keep = m.ok(
        "POST",
        "/volumes",
        Some(json!({"name": "keep", "size": 1u64 << 30})),
    );
    let gone = m.ok(
        "POST",
        "/volumes",
        Some(json!({"name": "gone", "size": 1u64 << 30})),
    );
    let s = m.wait_job(&m.ok(
        "POST",
        &format!("/volumes/{}/snapshots", keep["id"].as_str().unwrap()),
        None,
    ));
    m.stop();
    // Behind maasd's back, as a crash between pool and catalog would leave things: one pool
    // volume and one snapshot the catalog never heard of, one catalog volume the pool lost.
    {
        let pool = maas_pool::Pool::open(
            &dir.path().join("data/pool"),
            maas_pool::OpenOptions::default(),
        )
        .unwrap();
        let orphan = pool.create_volume("orphan-vol", 1 << 20, 512).unwrap();
        pool.seal(orphan.id).unwrap();
        let g = pool.volume_by_name(gone["id"].as_str().unwrap()).unwrap();
        pool.delete_volume(g.id).unwrap();
        pool.close().unwrap();
    }
    m.start_again();
    let vols = m.ok("GET", "/volumes", None);
    let names: Vec<&str> = vols["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"keep") && names.contains(&"orphan-vol") && !names.contains(&"gone"),
        "{names:?}"
    );
    let log = m.log();
    assert!(log.contains("adopted a pool volume"), "{log}");
    assert!(log.contains("dropped a catalog volume"), "{log}");
    assert!(log.contains("adopted a pool snapshot"), "{log}");
    let orphan = vols["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "orphan-vol")
        .unwrap()
        .clone();
    assert_eq!(orphan["labels"]["maas.adopted"], "true");
    assert_eq!(
        m.ok(
            "GET",
            &format!("/volumes/{}/snapshots", orphan["id"].as_str().unwrap()),
            None
        )["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let sid = s["result"]["snapshot"].as_str().unwrap();
    assert_eq!(
        m.ok("GET", &format!("/snapshots/{sid}"), None)["volume_name"],
        "keep"
    );
    let p = m.ok("GET", "/pools/default", None);
    assert_eq!(
        (p["volumes"].as_u64(), p["snapshots"].as_u64()),
        (Some(2), Some(2))
    );
}

#[test]
fn sigkill_during_jobs_leaves_catalog_and_pool_agreeing() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start(dir.path(), None);
    let v = m.ok(
        "POST",
        "/volumes",
        Some(json!({"name": "busy", "size": 1u64 << 30})),
    );
    let vid = v["id"].as_str().unwrap().to_string();
    let mut jobs = Vec::new();
    for _ in 0..5 {
        jobs.push(m.ok("POST", &format!("/volumes/{vid}/snapshots"), None));
    }
    m.kill9();
    m.start_again();
    // Every job ended: succeeded, or failed as interrupted.
    for j in &jobs {
        let now = m.ok("GET", &format!("/jobs/{}", j["id"].as_str().unwrap()), None);
        let st = now["state"].as_str().unwrap();
        assert!(
            st == "succeeded" || (st == "failed" && now["error"]["code"] == "INTERRUPTED"),
            "{now}"
        );
    }
    let snaps = m.ok("GET", &format!("/volumes/{vid}/snapshots"), None)["items"]
        .as_array()
        .unwrap()
        .len() as u64;
    let p = m.ok("GET", "/pools/default", None);
    assert_eq!(
        p["snapshots"].as_u64().unwrap(),
        snaps,
        "catalog and pool agree on snapshots"
    );
    assert_eq!(p["volumes"], 1);
}
