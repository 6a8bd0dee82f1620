#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The REST API against the real maasd binary: the whole lifecycle, restart persistence, bad
//! input, roles, on SQLite and PostgreSQL.

mod common;

use common::*;
use serde_json::{Value, json};

const GIB: u64 = 1 << 30;

fn lifecycle(m: &mut Maasd) {
    // Volumes.
    let v = m.ok(
        "POST",
        "/volumes",
        Some(json!({"name": "db01", "size": 10 * GIB, "labels": {"host": "db01"}})),
    );
    let vid = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["size"], 10 * GIB);
    assert_eq!(v["block_size"], 512);
    assert_eq!(v["pool"], "default");
    let (s, e) = m.call(
        "POST",
        "/volumes",
        Some(json!({"name": "db01", "size": GIB})),
    );
    assert_eq!((s, code(&e)), (409, "VOLUME_EXISTS"));
    for i in 0..3 {
        m.ok(
            "POST",
            "/volumes",
            Some(json!({"name": format!("web{i}"), "size": GIB, "block_size": 4096})),
        );
    }
    // Pagination: pages of 2 cover all 4 volumes exactly once.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let p = m.ok("GET", &format!("/volumes?limit=2{cursor}"), None);
        for it in p["items"].as_array().unwrap() {
            seen.push(it["name"].as_str().unwrap().to_string());
        }
        match p["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ["db01", "web0", "web1", "web2"]);
    let g = m.ok(
        "PATCH",
        &format!("/volumes/{vid}"),
        Some(json!({"size": 20 * GIB})),
    );
    assert_eq!(g["size"], 20 * GIB);
    let (s, e) = m.call(
        "PATCH",
        &format!("/volumes/{vid}"),
        Some(json!({"size": GIB})),
    );
    assert_eq!((s, code(&e)), (409, "SHRINK_REFUSED"));
    m.ok(
        "PATCH",
        &format!("/volumes/{vid}"),
        Some(json!({"name": "db01-renamed"})),
    );

    // Seal -> job -> snapshot.
    let (s, job) = m.call("POST", &format!("/volumes/{vid}/snapshots"), None);
    assert_eq!(s, 202);
    assert_eq!(job["kind"], "seal");
    let done = m.wait_job(&job);
    assert_eq!(done["progress"], 1.0);
    let sid = done["result"]["snapshot"].as_str().unwrap().to_string();
    let snaps = m.ok("GET", &format!("/volumes/{vid}/snapshots"), None);
    assert_eq!(snaps["items"].as_array().unwrap().len(), 1);
    assert_eq!(snaps["items"][0]["id"], sid.as_str());
    assert_eq!(snaps["items"][0]["volume_name"], "db01-renamed");
    manifest_round_trip(m, &sid);
    let st = m.ok(
        "PATCH",
        &format!("/snapshots/{sid}"),
        Some(json!({"starred": true})),
    );
    assert_eq!(st["starred"], true);
    let l = m.ok(
        "PATCH",
        &format!("/snapshots/{sid}"),
        Some(json!({"locked_until": "2099-01-01T00:00:00Z"})),
    );
    assert_eq!(l["locked_until"], "2099-01-01T00:00:00Z");
    let (s, e) = m.call(
        "PATCH",
        &format!("/snapshots/{sid}"),
        Some(json!({"locked_until": "2098-01-01T00:00:00Z"})),
    );
    assert_eq!((s, code(&e)), (409, "LOCK_SHORTENED"));
    let (s, e) = m.call("DELETE", &format!("/snapshots/{sid}"), None);
    assert_eq!((s, code(&e)), (409, "SNAPSHOT_LOCKED"));

    // Clone = instant mount.
    let (s, job) = m.call(
        "POST",
        &format!("/snapshots/{sid}/clones"),
        Some(json!({"name": "db01-restore"})),
    );
    assert_eq!(s, 202);
    let cid = m.wait_job(&job)["result"]["volume"]
        .as_str()
        .unwrap()
        .to_string();
    let c = m.ok("GET", &format!("/volumes/{cid}"), None);
    assert_eq!(c["origin_snapshot"], sid.as_str());
    assert_eq!(c["size"], 20 * GIB);

    // Exports carry what a host needs.
    let ex = m.ok(
        "POST",
        &format!("/volumes/{cid}/exports"),
        Some(json!({"protocol": "iscsi", "initiators": ["iqn.1993-08.org.debian:01:host1"],
            "chap": {"user": "u1", "secret": "0123456789abcdef", "mutual_user": "t1", "mutual_secret": "fedcba9876543210"}})),
    );
    assert_eq!(ex["portal"], "10.0.2.2:3260");
    assert!(ex["target"].as_str().unwrap().starts_with("iqn."));
    assert_eq!(ex["lun"], 0);
    assert_eq!(ex["chap"]["user"], "u1");
    assert!(
        ex.get("secret").is_none() && ex["chap"].get("secret").is_none(),
        "secrets are never returned"
    );
    let nv = m.ok(
        "POST",
        &format!("/volumes/{vid}/exports"),
        Some(
            json!({"protocol": "nvme-tcp", "initiators": ["nqn.2014-08.org.nvmexpress:uuid:1234"]}),
        ),
    );
    assert_eq!(nv["nsid"], 1);
    assert!(nv["target"].as_str().unwrap().starts_with("nqn."));
    let eid = nv["id"].as_str().unwrap().to_string();
    assert_eq!(
        m.ok("GET", &format!("/exports/{eid}"), None)["volume"],
        vid.as_str()
    );

    // Tokens and roles.
    let t = m.ok(
        "POST",
        "/tokens",
        Some(json!({"name": "ro", "role": "viewer"})),
    );
    let viewer = t["secret"].as_str().unwrap().to_string();
    let tid = t["token"]["id"].as_str().unwrap().to_string();
    let (s, _) = m.call_as(Some(&viewer), "GET", "/volumes", None);
    assert_eq!(s, 200);
    let (s, e) = m.call_as(
        Some(&viewer),
        "POST",
        "/volumes",
        Some(json!({"name": "nope", "size": GIB})),
    );
    assert_eq!((s, code(&e)), (403, "FORBIDDEN"));
    let (s, e) = m.call_as(Some(&viewer), "DELETE", &format!("/volumes/{vid}"), None);
    assert_eq!((s, code(&e)), (403, "FORBIDDEN"));
    let op = m.ok(
        "POST",
        "/tokens",
        Some(json!({"name": "ops", "role": "operator"})),
    )["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, e) = m.call_as(
        Some(&op),
        "POST",
        "/tokens",
        Some(json!({"name": "x", "role": "admin"})),
    );
    assert_eq!((s, code(&e)), (403, "FORBIDDEN"));

    // Restart: everything is still there.
    m.restart();
    let vols = m.ok("GET", "/volumes", None);
    assert_eq!(vols["items"].as_array().unwrap().len(), 5);
    assert_eq!(
        m.ok("GET", &format!("/snapshots/{sid}"), None)["starred"],
        true
    );
    assert_eq!(
        m.ok("GET", &format!("/exports/{eid}"), None)["protocol"],
        "nvme-tcp"
    );
    let (s, _) = m.call_as(Some(&viewer), "GET", "/pools", None);
    assert_eq!(s, 200, "tokens survive a restart");
    let pool = m.ok("GET", "/pools/default", None);
    assert_eq!(pool["volumes"], 5);
    assert_eq!(pool["snapshots"], 1);
    assert!(pool["capacity"].as_u64().unwrap() > 0);
    assert!(
        m.ok("GET", "/jobs", None)["items"]
            .as_array()
            .unwrap()
            .len()
            >= 2
    );

    // Revoking and deleting.
    m.ok("DELETE", &format!("/tokens/{tid}"), None);
    let (s, e) = m.call_as(Some(&viewer), "GET", "/volumes", None);
    assert_eq!((s, code(&e)), (401, "UNAUTHORIZED"));
    m.ok("DELETE", &format!("/exports/{eid}"), None);
    let (s, _) = m.call("GET", &format!("/exports/{eid}"), None);
    assert_eq!(s, 404);
    let (s, job) = m.call("DELETE", &format!("/volumes/{cid}"), None);
    assert_eq!(s, 202);
    m.wait_job(&job);
    let (s, e) = m.call("GET", &format!("/volumes/{cid}"), None);
    assert_eq!((s, code(&e)), (404, "VOLUME_NOT_FOUND"));
    // Growing the pool with a device (admin only).
    let before = m.ok("GET", "/pools/default", None)["capacity"]
        .as_u64()
        .unwrap();
    let p = m.ok(
        "POST",
        "/pools/default/devices",
        Some(json!({"path": "extra-0.dev", "tier": "hdd", "size": 1u64 << 30})),
    );
    assert_eq!(p["devices"].as_array().unwrap().len(), 2);
    assert!(p["capacity"].as_u64().unwrap() > before);
    assert_eq!(p["tiers"], json!(["ram", "ssd", "hdd"]));
    let (s, e) = m.call_as(
        Some(&op),
        "POST",
        "/pools/default/devices",
        Some(json!({"path": "x.dev", "tier": "hdd", "size": 1u64 << 30})),
    );
    assert_eq!((s, code(&e)), (403, "FORBIDDEN"));
    let (s, e) = m.call(
        "POST",
        "/pools/default/devices",
        Some(json!({"path": "extra-0.dev", "tier": "hdd", "size": 1u64 << 30})),
    );
    assert_eq!((s, code(&e)), (400, "INVALID_FIELD"));
    for bad in [
        "/etc/maas-evil",
        "../escape.dev",
        "/dev/../etc/x",
        "",
        "sub/dir.dev",
        "/dev/maas-no-such-disk",
    ] {
        let (s, e) = m.call(
            "POST",
            "/pools/default/devices",
            Some(json!({"path": bad, "tier": "hdd", "size": 1u64 << 30})),
        );
        assert_eq!((s, code(&e)), (400, "INVALID_FIELD"), "{bad}");
    }
    assert!(!std::path::Path::new("/etc/maas-evil").exists());
    let (s, e) = m.call("POST", "/pools", Some(json!({})));
    assert_eq!((s, code(&e)), (405, "ONE_POOL_PER_NODE"));
    let v = m.ok("POST", "/pools/default/verify", None);
    let rep = m.wait_job(&v);
    assert_eq!(rep["result"]["damaged"], json!([]));
}

#[test]
fn lifecycle_and_restart_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start(dir.path(), None);
    assert_eq!(m.ok("GET", "/health", None)["catalog"], "sqlite");
    lifecycle(&mut m);
    m.stop();
    assert!(m.log().contains("maasd stopped cleanly"));
}

#[test]
fn lifecycle_and_restart_on_postgresql() {
    // A catalog of its own: the database is shared by the other PostgreSQL tests, each with
    // its own pool, and a catalog serves only the pool it is bound to.
    let url = postgres_catalog();
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start(dir.path(), Some(url));
    assert_eq!(m.ok("GET", "/health", None)["catalog"], "postgresql");
    lifecycle(&mut m);
    m.stop();
}

fn get_text(m: &Maasd, path: &str) -> (u16, String) {
    match m
        .agent()
        .get(&m.url(path))
        .set("Authorization", &format!("Bearer {}", m.token))
        .call()
    {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

/// A snapshot's file manifest: stored as given (JSON lines), read back the same, replaced
/// whole, refused whole when a line is not an entry.
fn manifest_round_trip(m: &Maasd, sid: &str) {
    let path = format!("/snapshots/{sid}/manifest");
    let (s, e) = get_text(m, &path);
    assert_eq!(s, 404, "{e}");
    assert!(e.contains("MANIFEST_NOT_FOUND"));
    let lines = [
        json!({"path": "/", "kind": "dir", "size": 0, "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 1}),
        json!({"path": "/a b/ü.txt", "kind": "file", "size": 5, "mode": 0o644, "uid": 1000, "gid": 100,
               "mtime_ns": 1_700_000_000_123_456_789i64, "blake3": blake3::hash(b"hello").to_hex().to_string()}),
        json!({"path": "/l", "kind": "symlink", "size": 7, "mode": 0o777, "uid": 0, "gid": 0, "mtime_ns": -5, "target": "a b/ü.txt"}),
    ];
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let (s, info) = m.raw("PUT", &path, &body);
    assert_eq!(s, 200, "{info}");
    assert_eq!(info["entries"], 3);
    assert_eq!(info["file_bytes"], 5);
    let (s, text) = get_text(m, &path);
    assert_eq!(s, 200);
    let back: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back, lines.to_vec());
    // A bad line refuses the whole body; the stored manifest is untouched.
    let bad = format!("{}\n{{\"path\": \"/x\", \"kind\": \"file\"}}\n", lines[0]);
    let (s, e) = m.raw("PUT", &path, &bad);
    assert_eq!((s, code(&e)), (400, "INVALID_MANIFEST"));
    assert_eq!(get_text(m, &path).1, text);
    // Replaced whole.
    let (s, _) = m.raw("PUT", &path, &format!("{}\n", lines[0]));
    assert_eq!(s, 200);
    assert_eq!(get_text(m, &path).1.lines().count(), 1);
}

fn counts(m: &Maasd) -> (usize, u64, u64) {
    let v = m.ok("GET", "/volumes?limit=1000", None)["items"]
        .as_array()
        .unwrap()
        .len();
    let p = m.ok("GET", "/pools/default", None);
    (
        v,
        p["volumes"].as_u64().unwrap(),
        p["snapshots"].as_u64().unwrap(),
    )
}

#[test]
fn bad_input_gets_4xx_with_a_code_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = Maasd::start(dir.path(), None);
    let v = m.ok(
        "POST",
        "/volumes",
        Some(json!({"name": "keep", "size": GIB})),
    );
    let vid = v["id"].as_str().unwrap().to_string();
    let before = counts(&m);
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        (
            "POST",
            "/volumes".into(),
            Some("{\"name\": \"x\", "),
            400,
            "INVALID_BODY",
        ),
        (
            "POST",
            "/volumes".into(),
            Some("not json"),
            400,
            "INVALID_BODY",
        ),
        (
            "POST",
            "/volumes".into(),
            Some("{\"name\": \"x\", \"size\": \"big\"}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/volumes".into(),
            Some("{\"name\": \"x\", \"size\": -1}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/volumes".into(),
            Some("{\"name\": \"x\", \"size\": 0}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/volumes".into(),
            Some("{\"name\": \"x\", \"size\": 1000}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/volumes".into(),
            Some("{\"name\": \"x\", \"size\": 18446744073709547520}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/volumes".into(),
            Some("{\"name\": \"x\", \"size\": 1e30}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/volumes".into(),
            Some("{\"name\": \"\", \"size\": 4096}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/volumes".into(),
            Some("{\"name\": \"a b/c\", \"size\": 4096}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/volumes".into(),
            Some("{\"name\": \"x\", \"size\": 4096, \"block_size\": 1024}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/volumes".into(),
            Some("{\"name\": \"x\", \"size\": 4096, \"bogus\": 1}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/volumes".into(),
            Some("{\"size\": 4096}"),
            400,
            "INVALID_FIELD",
        ),
        ("POST", "/volumes".into(), Some("[]"), 400, "INVALID_BODY"),
        (
            "PATCH",
            format!("/volumes/{vid}"),
            Some("{\"size\": -5}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "PATCH",
            format!("/volumes/{vid}"),
            Some("{\"size\": 512}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "PATCH",
            "/volumes/vol-nope".into(),
            Some("{\"size\": 4096}"),
            404,
            "VOLUME_NOT_FOUND",
        ),
        (
            "GET",
            "/volumes/vol-nope".into(),
            None,
            404,
            "VOLUME_NOT_FOUND",
        ),
        (
            "DELETE",
            "/volumes/vol-nope".into(),
            None,
            404,
            "VOLUME_NOT_FOUND",
        ),
        (
            "POST",
            "/volumes/vol-nope/snapshots".into(),
            None,
            404,
            "VOLUME_NOT_FOUND",
        ),
        (
            "GET",
            "/snapshots/snap-nope".into(),
            None,
            404,
            "SNAPSHOT_NOT_FOUND",
        ),
        (
            "POST",
            "/snapshots/snap-nope/clones".into(),
            Some("{\"name\": \"c\"}"),
            404,
            "SNAPSHOT_NOT_FOUND",
        ),
        (
            "GET",
            "/exports/exp-nope".into(),
            None,
            404,
            "EXPORT_NOT_FOUND",
        ),
        ("GET", "/jobs/job-nope".into(), None, 404, "JOB_NOT_FOUND"),
        ("GET", "/pools/nope".into(), None, 404, "POOL_NOT_FOUND"),
        ("GET", "/volumes?limit=0".into(), None, 400, "INVALID_FIELD"),
        (
            "GET",
            "/volumes?limit=abc".into(),
            None,
            400,
            "INVALID_QUERY",
        ),
        (
            "POST",
            format!("/volumes/{vid}/exports"),
            Some("{\"protocol\": \"fc\"}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            format!("/volumes/{vid}/exports"),
            Some("{\"protocol\": \"nbd\"}"),
            422,
            "PROTOCOL_UNAVAILABLE",
        ),
        (
            "POST",
            format!("/volumes/{vid}/exports"),
            Some("{\"protocol\": \"iscsi\", \"initiators\": [\"bob\"]}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            format!("/volumes/{vid}/exports"),
            Some("{\"protocol\": \"iscsi\", \"chap\": {\"user\": \"u\", \"secret\": \"short\"}}"),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/tokens".into(),
            Some("{\"name\": \"t\", \"role\": \"god\"}"),
            400,
            "INVALID_FIELD",
        ),
        ("GET", "/nothing-here".into(), None, 404, "NOT_FOUND"),
    ];
    for (method, path, body, status, want) in cases {
        let (s, e) = match body {
            Some(b) => m.raw(method, &path, b),
            None => m.call(method, &path, None),
        };
        assert_eq!(
            (s, code(&e)),
            (status, want),
            "{method} {path} {body:?}: {e}"
        );
        assert!(
            e["request_id"].as_str().is_some_and(|r| r.len() >= 16),
            "{e}"
        );
        assert!(!e["message"].as_str().unwrap_or("").is_empty());
    }
    let (_, e) = m.raw("POST", "/volumes", "{\"name\": \"x\", \"size\": \"big\"}");
    assert_eq!(e["field"], "size", "validation errors name the field");
    let (_, e) = m.raw("POST", "/volumes", "{\"size\": 4096}");
    assert_eq!(e["field"], "name", "a missing field is named");
    // Auth.
    let (s, e) = m.call_as(None, "GET", "/volumes", None);
    assert_eq!((s, code(&e)), (401, "UNAUTHORIZED"));
    let (s, e) = m.call_as(
        Some("maas_wrong"),
        "POST",
        "/volumes",
        Some(json!({"name": "y", "size": 4096})),
    );
    assert_eq!((s, code(&e)), (401, "UNAUTHORIZED"));
    let (s, _) = m.call_as(None, "GET", "/health", None);
    assert_eq!(s, 200, "health needs no token");
    assert_eq!(counts(&m), before, "nothing changed in catalog or pool");
    let after: Value = m.ok("GET", "/volumes", None);
    assert_eq!(after["items"][0]["name"], "keep");
}

#[test]
fn openapi_document_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let m = Maasd::start(dir.path(), None);
    let (s, doc) = m.call_as(None, "GET", "/openapi.json", None);
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/v1/health",
        "/api/v1/pools",
        "/api/v1/pools/{id}",
        "/api/v1/volumes",
        "/api/v1/volumes/{id}",
        "/api/v1/volumes/{id}/snapshots",
        "/api/v1/snapshots/{id}",
        "/api/v1/snapshots/{id}/clones",
        "/api/v1/volumes/{id}/exports",
        "/api/v1/exports/{id}",
        "/api/v1/jobs",
        "/api/v1/jobs/{id}",
        "/api/v1/tokens",
        "/api/v1/hosts",
        "/api/v1/hosts/{id}/jobs",
        "/api/v1/hosts/{id}/jobs/claim",
        "/api/v1/jobs/{id}/report",
        "/api/v1/snapshots/{id}/files",
        "/api/v1/snapshots/{id}/files/content",
    ] {
        assert!(
            paths.contains_key(p),
            "{p} missing from the OpenAPI document"
        );
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for s in [
        "Volume",
        "Snapshot",
        "Export",
        "Job",
        "ErrorBody",
        "Pool",
        "Token",
        "Host",
        "HostTask",
        "SnapshotFileListing",
    ] {
        assert!(schemas.contains_key(s), "schema {s} missing");
    }
}

/// Every ready row exactly once, in pages of `limit`: each page full but the last, a cursor
/// exactly when more ready rows follow. Returns the ids in order.
fn page_through(m: &Maasd, path: &str, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("{path}?limit={limit}&cursor={c}"),
            None => format!("{path}?limit={limit}"),
        };
        let page = m.ok("GET", &q, None);
        let items: Vec<String> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect();
        ids.extend(items.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(
                    items.len(),
                    limit,
                    "{q}: a page with a cursor is full: {page}"
                );
                assert_eq!(Some(c), items.last().map(String::as_str), "{q}: {page}");
                cursor = Some(c.to_string());
            }
            None => {
                assert!(items.len() <= limit, "{q}: {page}");
                return ids;
            }
        }
    }
}

/// Rows being created or deleted (as an interrupted or running job leaves them) sit between
/// ready ones in id order: listings skip them in the query, so no page ends early and the
/// cursor is there exactly when more ready rows exist.
#[test]
fn listings_page_exactly_past_rows_that_are_not_ready() {
    use maas_manager::catalog::{Catalog, SnapshotRow, VolumeRow};
    let dir = tempfile::tempdir().unwrap();
    let m = Maasd::start(dir.path(), None);
    let mut vols: Vec<String> = (0..7)
        .map(|i| maas_tests::maasd::volume(&m, &format!("p{i}"), 1 << 20, 512))
        .collect();
    vols.sort();
    let snaps: Vec<String> = {
        let mut s: Vec<String> = (0..5)
            .map(|_| maas_tests::maasd::seal(&m, &vols[3]))
            .collect();
        s.sort();
        s
    };
    // Beside maasd (SQLite allows it), the rows an unfinished create or delete leaves.
    let cat = Catalog::open(&dir.path().join("data/catalog.sqlite").display().to_string()).unwrap();
    let ghost_vol = |id: String, state: &str| VolumeRow {
        name: format!("ghost-{id}"),
        id,
        pool: "default".into(),
        size: 1 << 20,
        block_size: 512,
        labels: "{}".into(),
        origin_snapshot: None,
        state: state.into(),
        created_ms: 0,
    };
    let mut ghosts = Vec::new();
    for (after, n) in [
        ("vol-0", 3),
        (vols[0].as_str(), 2),
        (vols[2].as_str(), 4),
        (vols[6].as_str(), 3),
    ] {
        for j in 0..n {
            let state = if j % 2 == 0 { "creating" } else { "deleting" };
            ghosts.push(ghost_vol(format!("{after}-ghost{j}"), state));
        }
    }
    for g in &ghosts {
        cat.insert_volume(g).unwrap();
    }
    for (after, n) in [
        ("snap-0", 2),
        (snaps[1].as_str(), 3),
        (snaps[4].as_str(), 2),
    ] {
        for j in 0..n {
            cat.insert_snapshot(&SnapshotRow {
                id: format!("{after}-ghost{j}"),
                volume: vols[3].clone(),
                volume_name: "p3".into(),
                pool: "default".into(),
                pool_snapshot: 1_000_000 + j,
                size: 1 << 20,
                block_size: 512,
                starred: 0,
                locked_until_ms: None,
                state: "deleting".into(),
                created_ms: 0,
                location: "local".into(),
            })
            .unwrap();
        }
    }
    for limit in 1..=8 {
        assert_eq!(page_through(&m, "/volumes", limit), vols, "limit {limit}");
        assert_eq!(
            page_through(&m, &format!("/volumes/{}/snapshots", vols[3]), limit),
            snaps,
            "limit {limit}"
        );
    }
}

/// Hosts and the jobs their probes run, as a probe and an admin use them: registration (again
/// with the same NQN is the same host; another NQN under the name is refused), heartbeats,
/// jobs queued only by admins, claimed once (a claim repeated while the job runs hands the same
/// job back, so a lost answer loses no job), reported on while running and finished once, and
/// a deleted host's queued jobs failed, never left waiting.
fn hosts_and_their_jobs(m: &Maasd) {
    let reg = json!({"name": "web-1", "hostnqn": "nqn.2014-08.org.nvmexpress:uuid:0f8fad5b-d9cb-469f-a165-70867728950e",
                     "iqn": "iqn.2026-12.net.example:web-1", "version": "0.1.0"});
    let (s, h) = m.call("POST", "/hosts", Some(reg.clone()));
    assert_eq!(s, 201, "{h}");
    let id = h["id"].as_str().unwrap().to_string();
    assert_eq!(h["state"], "online");
    let (s, again) = m.call("POST", "/hosts", Some(reg.clone()));
    assert_eq!((s, again["id"].as_str()), (200, Some(id.as_str())));
    let mut other = reg.clone();
    other["hostnqn"] =
        json!("nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555");
    let (s, e) = m.call("POST", "/hosts", Some(other));
    assert_eq!((s, code(&e)), (409, "HOST_NAME_TAKEN"));
    let mut bad = reg.clone();
    bad["hostnqn"] = json!("not-an-nqn");
    let (s, e) = m.call("POST", "/hosts", Some(bad));
    assert_eq!((s, code(&e)), (400, "INVALID_FIELD"));
    let hb = m.ok(
        "POST",
        &format!("/hosts/{id}/heartbeat"),
        Some(json!({"version": "0.2.0"})),
    );
    assert_eq!(hb["version"], "0.2.0");
    let (s, e) = m.call("POST", "/hosts/host-nope/heartbeat", Some(json!({})));
    assert_eq!((s, code(&e)), (404, "HOST_NOT_FOUND"));

    // Queueing needs an admin: an operator's token (what probes hold) cannot make other
    // hosts' probes act.
    let (_, tok) = m.call(
        "POST",
        "/tokens",
        Some(json!({"name": "probe", "role": "operator"})),
    );
    let op = tok["secret"].as_str().unwrap().to_string();
    let backup = json!({"kind": "backup", "volume": "web", "source": "/srv"});
    let (s, e) = m.call_as(
        Some(&op),
        "POST",
        &format!("/hosts/{id}/jobs"),
        Some(backup.clone()),
    );
    assert_eq!((s, code(&e)), (403, "FORBIDDEN"), "{e}");
    let (s, e) = m.call(
        "POST",
        &format!("/hosts/{id}/jobs"),
        Some(json!({"kind": "restore", "snapshot": "s"})),
    );
    assert_eq!((s, code(&e)), (400, "INVALID_FIELD"), "{e}");
    let (s, j1) = m.call("POST", &format!("/hosts/{id}/jobs"), Some(backup.clone()));
    assert_eq!(s, 202, "{j1}");
    assert_eq!(
        (j1["state"].as_str(), j1["kind"].as_str()),
        (Some("queued"), Some("host-backup"))
    );
    assert_eq!(j1["params"], backup);
    let (_, j2) = m.call(
        "POST",
        &format!("/hosts/{id}/jobs"),
        Some(json!({"kind": "umount", "dir": "/mnt/x"})),
    );
    assert_eq!(m.ok("GET", &format!("/hosts/{id}"), None)["jobs_queued"], 2);

    // The probe (operator) claims: the oldest first; asking again while it runs gives it again.
    let (s, c1) = m.call_as(Some(&op), "POST", &format!("/hosts/{id}/jobs/claim"), None);
    assert_eq!((s, c1["id"].as_str()), (200, j1["id"].as_str()), "{c1}");
    assert_eq!(c1["state"], "running");
    let (_, c1b) = m.call_as(Some(&op), "POST", &format!("/hosts/{id}/jobs/claim"), None);
    assert_eq!(c1b["id"], c1["id"]);
    let j1id = j1["id"].as_str().unwrap();
    let r = m.ok(
        "POST",
        &format!("/jobs/{j1id}/report"),
        Some(json!({"state": "running", "progress": 0.5, "progress_detail": {"stage": "copy"}})),
    );
    assert_eq!(
        (r["state"].as_str(), r["progress"].as_f64()),
        (Some("running"), Some(0.5))
    );
    let (s, e) = m.call(
        "POST",
        &format!("/jobs/{j1id}/report"),
        Some(json!({"state": "failed"})),
    );
    assert_eq!(
        (s, code(&e)),
        (400, "INVALID_FIELD"),
        "a failure must say why"
    );
    let r = m.ok(
        "POST",
        &format!("/jobs/{j1id}/report"),
        Some(json!({"state": "succeeded", "result": {"snapshot": "snap-x"}})),
    );
    assert_eq!(r["result"]["snapshot"], "snap-x");
    // Once ended, a job takes no more reports (a late progress report cannot revive it).
    let (s, e) = m.call(
        "POST",
        &format!("/jobs/{j1id}/report"),
        Some(json!({"state": "running", "progress": 0.9})),
    );
    assert_eq!((s, code(&e)), (409, "JOB_NOT_RUNNING"));
    assert_eq!(
        m.ok("GET", &format!("/jobs/{j1id}"), None)["state"],
        "succeeded"
    );
    // maasd's own jobs take no reports.
    let (_, hosts_before) = m.call("GET", "/hosts", None);
    assert_eq!(hosts_before["items"].as_array().unwrap().len(), 1);

    // Deleting the host fails what still waits for it.
    let (s, _) = m.call("DELETE", &format!("/hosts/{id}"), None);
    assert_eq!(s, 204);
    let j2 = m.ok(
        "GET",
        &format!("/jobs/{}", j2["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(
        (j2["state"].as_str(), code(&j2["error"])),
        (Some("failed"), "HOST_DELETED")
    );
    let (s, e) = m.call("POST", &format!("/hosts/{id}/jobs/claim"), None);
    assert_eq!((s, code(&e)), (404, "HOST_NOT_FOUND"));
}

#[test]
fn hosts_and_their_jobs_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let m = Maasd::start(dir.path(), None);
    hosts_and_their_jobs(&m);
}

#[test]
fn hosts_and_their_jobs_on_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    let m = Maasd::start(dir.path(), Some(postgres_catalog()));
    hosts_and_their_jobs(&m);
}
