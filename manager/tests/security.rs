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
        "tls/api-key.pem",
        "tls/api-cert.pem",
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
        "api-key.pem",
        "api-cert.pem",
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

/// Runs the real maasctl against `m` with extra environment; stdin is not a terminal.
fn maasctl(m: &Maasd, env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_maasctl"));
    c.envs(m.maasctl_env())
        .env("MAASCTL_CONFIG", m.dir.join("no-such-config.toml"))
        .env_remove("MAAS_CHAP_SECRET")
        .env_remove("MAAS_CHAP_MUTUAL_SECRET")
        .stdin(std::process::Stdio::null())
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = run_with_timeout(&mut c, 60);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn secret_file(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

#[test]
fn maasctl_refuses_incomplete_chap_options_and_secrets_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let m = Maasd::start_local(dir.path());
    let vol = maas_tests::maasd::volume(&m, "flags", 64 * MIB, 512);
    let one = secret_file(dir.path(), "one", "s3cret-s3cret\n");
    let two = secret_file(dir.path(), "two", "mutual-s3cret\n");
    let empty = secret_file(dir.path(), "empty", "\n");
    let base = ["export", "create", vol.as_str(), "--initiator", HOST];
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["--chap-user", "backup"],
            vec![],
            "--chap-user needs a secret",
        ),
        (
            vec!["--chap-secret-file", &one],
            vec![],
            "--chap-secret-file needs --chap-user",
        ),
        (
            vec![],
            vec![("MAAS_CHAP_SECRET", "s3cret-s3cret")],
            "MAAS_CHAP_SECRET is set but --chap-user is not",
        ),
        (
            vec!["--mutual-user", "maas", "--mutual-secret-file", &two],
            vec![],
            "mutual CHAP needs one-way CHAP",
        ),
        (
            vec![],
            vec![("MAAS_CHAP_MUTUAL_SECRET", "mutual-s3cret")],
            "mutual CHAP needs one-way CHAP",
        ),
        (
            vec![
                "--chap-user",
                "backup",
                "--chap-secret-file",
                &one,
                "--mutual-user",
                "maas",
            ],
            vec![],
            "--mutual-user needs a secret",
        ),
        (
            vec![
                "--chap-user",
                "backup",
                "--chap-secret-file",
                &one,
                "--mutual-secret-file",
                &two,
            ],
            vec![],
            "--mutual-secret-file needs --mutual-user",
        ),
        (
            vec!["--chap-user", "backup", "--chap-secret-file", &one],
            vec![("MAAS_CHAP_MUTUAL_SECRET", "mutual-s3cret")],
            "MAAS_CHAP_MUTUAL_SECRET is set but --mutual-user is not",
        ),
        (
            vec!["--chap-user", "backup", "--chap-secret-file", &empty],
            vec![],
            "must hold the secret on one line",
        ),
        (
            vec![
                "--chap-user",
                "backup",
                "--chap-secret-file",
                "/nonexistent/secret",
            ],
            vec![],
            "CHAP secret file /nonexistent/secret",
        ),
        (
            vec![
                "--protocol",
                "nvme-tcp",
                "--chap-user",
                "backup",
                "--chap-secret-file",
                &one,
            ],
            vec![],
            "CHAP applies to iSCSI exports",
        ),
        (
            vec!["--chap-user", "backup", "--chap-secret", "s3cret-s3cret"],
            vec![],
            "--chap-secret and --mutual-secret were removed",
        ),
    ];
    for (flags, env, want) in &cases {
        let mut args = base.to_vec();
        args.extend_from_slice(flags);
        let (ok, out, err) = maasctl(&m, env, &args);
        assert!(!ok, "maasctl {args:?} {env:?} succeeded: {out}");
        assert!(err.contains(want), "maasctl {args:?} {env:?}: {err}");
        assert!(!err.contains("s3cret"), "a secret in the message: {err}");
    }
    // None of them created an export, with or without CHAP.
    let list = m.ok("GET", &format!("/volumes/{vol}/exports"), None);
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "{list}");
}

#[test]
fn maasctl_takes_chap_secrets_from_a_file_the_environment_or_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let m = Maasd::start_local(dir.path());
    let vol = maas_tests::maasd::volume(&m, "secrets", 64 * MIB, 512);
    let one = secret_file(dir.path(), "one", "s3cret-from-file\n");
    let two = secret_file(dir.path(), "two", "mutual-from-file\r\n");
    let create = |env: &[(&str, &str)], flags: &[&str]| {
        let mut args = vec![
            "--json",
            "export",
            "create",
            vol.as_str(),
            "--initiator",
            HOST,
        ];
        args.extend_from_slice(flags);
        let (ok, out, err) = maasctl(&m, env, &args);
        assert!(ok, "maasctl {args:?}: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    // Files (the line ending is not part of the secret), mutual CHAP included.
    let e = create(
        &[],
        &[
            "--chap-user",
            "backup",
            "--chap-secret-file",
            &one,
            "--mutual-user",
            "maas",
            "--mutual-secret-file",
            &two,
        ],
    );
    assert_eq!(e["chap"]["mutual_user"], "maas", "{e}");
    let out = run_with_timeout(
        Command::new("iscsi-inq")
            .args(["-i", HOST, &url(&e, Some(("backup", "s3cret-from-file")))])
            .env("LIBISCSI_CHAP_TARGET_USERNAME", "maas")
            .env("LIBISCSI_CHAP_TARGET_PASSWORD", "mutual-from-file"),
        60,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(!logs_in(HOST, &e, None).0, "CHAP is required");
    // The environment.
    let e = create(
        &[("MAAS_CHAP_SECRET", "s3cret-from-env")],
        &["--chap-user", "backup"],
    );
    assert!(logs_in(HOST, &e, Some(("backup", "s3cret-from-env"))).0);
    // A terminal: typed twice at the prompt (script(1) gives maasctl a pseudo-terminal).
    let cmd = format!(
        "{} export create {vol} --initiator {HOST} --chap-user backup --json",
        env!("CARGO_BIN_EXE_maasctl")
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .envs(m.maasctl_env())
        .env("MAASCTL_CONFIG", m.dir.join("no-such-config.toml"))
        .env_remove("MAAS_CHAP_SECRET")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for _ in 0..2 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        std::io::Write::write_all(&mut stdin, b"s3cret-typed-in\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("CHAP secret for backup"),
        "prompted: {shown}"
    );
    assert!(!shown.contains("s3cret-typed-in"), "echoed: {shown}");
    // script(1) turns \n into \r\n.
    let json_start = shown.find('{').unwrap();
    let e: serde_json::Value =
        serde_json::from_str(&shown[json_start..].replace("\r\n", "\n")).unwrap();
    assert!(logs_in(HOST, &e, Some(("backup", "s3cret-typed-in"))).0);
}
