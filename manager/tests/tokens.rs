#![allow(clippy::unwrap_used, clippy::expect_used)]
//! API tokens against the real maasd: expiry (refused with `TOKEN_EXPIRED` once past, on SQLite
//! and PostgreSQL, through REST and maasctl), the last use shown by the token list and kept
//! across a restart, and maasctl refusing a token on its command line.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn maasctl(m: &Maasd, env: &[(&str, &str)], args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_maasctl"));
    c.envs(m.maasctl_env())
        .env("MAASCTL_CONFIG", m.dir.join("no-such-config.toml"))
        .env_remove("MAAS_TOKEN")
        .env_remove("MAAS_TLS_FINGERPRINT")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        std::io::Write::write_all(&mut w, text.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn token_named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no token {name} in {list}"))
}

fn expiry(m: &mut Maasd) {
    // Bad expiry times are refused, naming the field; nothing is created.
    for bad in ["soon", "2001-01-01T00:00:00Z"] {
        let (s, e) = m.call(
            "POST",
            "/tokens",
            Some(json!({"name": "bad", "role": "viewer", "expires_at": bad})),
        );
        assert_eq!(
            (s, code(&e), e["field"].as_str()),
            (400, "INVALID_FIELD", Some("expires_at")),
            "{bad}: {e}"
        );
    }
    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
    let at_text = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let t = m.ok(
        "POST",
        "/tokens",
        Some(json!({"name": "short", "role": "viewer", "expires_at": at_text})),
    );
    assert_eq!(t["token"]["expires_at"], at_text.as_str());
    let secret = t["secret"].as_str().unwrap().to_string();
    let forever = m.ok(
        "POST",
        "/tokens",
        Some(json!({"name": "forever", "role": "viewer"})),
    );
    assert_eq!(forever["token"]["expires_at"], Value::Null);
    let (s, v) = m.call_as(Some(&secret), "GET", "/volumes", None);
    assert_eq!(s, 200, "before its expiry: {v}");
    let list = m.ok("GET", "/tokens", None);
    assert_eq!(token_named(&list, "short")["expires_at"], at_text.as_str());
    std::thread::sleep(Duration::from_millis(
        (at.timestamp_millis() - chrono::Utc::now().timestamp_millis()).max(0) as u64 + 300,
    ));
    let (s, e) = m.call_as(Some(&secret), "GET", "/volumes", None);
    assert_eq!((s, code(&e)), (401, "TOKEN_EXPIRED"), "{e}");
    assert!(e["message"].as_str().unwrap().contains("short"), "{e}");
    // Still expired after a restart (the expiry is in the catalog), and still listed.
    m.restart();
    let (s, e) = m.call_as(Some(&secret), "GET", "/volumes", None);
    assert_eq!((s, code(&e)), (401, "TOKEN_EXPIRED"), "{e}");
    let (s, _) = m.call_as(forever["secret"].as_str(), "GET", "/volumes", None);
    assert_eq!(s, 200);
    let list = m.ok("GET", "/tokens", None);
    assert_eq!(token_named(&list, "short")["expires_at"], at_text.as_str());
}

#[test]
fn expired_tokens_are_refused_with_a_code_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start(dir.path(), None);
    expiry(&mut m);
}

#[test]
fn expired_tokens_are_refused_with_a_code_on_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start(dir.path(), Some(postgres_catalog()));
    expiry(&mut m);
}

fn last_use(m: &mut Maasd) {
    let t = m.ok(
        "POST",
        "/tokens",
        Some(json!({"name": "ci", "role": "viewer"})),
    );
    let secret = t["secret"].as_str().unwrap().to_string();
    let list = m.ok("GET", "/tokens", None);
    assert_eq!(
        token_named(&list, "ci")["last_used_at"],
        Value::Null,
        "never used yet"
    );
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let (s, _) = m.call_as(Some(&secret), "GET", "/volumes", None);
    assert_eq!(s, 200);
    let list = m.ok("GET", "/tokens", None);
    let used = token_named(&list, "ci")["last_used_at"]
        .as_str()
        .unwrap()
        .to_string();
    let used_at = chrono::DateTime::parse_from_rfc3339(&used).unwrap();
    assert!(used_at >= before && used_at <= chrono::Utc::now(), "{used}");
    // The admin token's own use shows too.
    assert!(
        token_named(&list, "bootstrap-admin")["last_used_at"].is_string(),
        "{list}"
    );
    // A clean stop writes the uses it holds in memory: they survive the restart.
    m.restart();
    let list = m.ok("GET", "/tokens", None);
    assert_eq!(
        token_named(&list, "ci")["last_used_at"],
        used.as_str(),
        "{list}"
    );
}

#[test]
fn token_list_shows_last_use_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start(dir.path(), None);
    last_use(&mut m);
}

#[test]
fn token_list_shows_last_use_on_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start(dir.path(), Some(postgres_catalog()));
    last_use(&mut m);
}

#[test]
fn maasctl_token_expiry_last_use_and_no_token_in_argv() {
    let dir = tempfile::tempdir().unwrap();
    let m = Maasd::start(dir.path(), None);
    // A token on the command line is refused, saying where it may come from.
    let o = maasctl(&m, &[], &["--token", "maas_0123456789", "health"], None);
    let e = err(&o);
    assert!(!o.status.success(), "a token in argv was taken");
    assert!(
        e.contains("--token-file") && e.contains("MAAS_TOKEN"),
        "says what to use instead: {e}"
    );

    // --expires-in: the token works until then, then is refused with TOKEN_EXPIRED.
    let o = maasctl(
        &m,
        &[],
        &["--json", "token", "create", "brief", "--expires-in", "3s"],
        None,
    );
    assert!(o.status.success(), "{}", err(&o));
    let created: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(created["token"]["expires_at"].is_string(), "{created}");
    let secret = created["secret"].as_str().unwrap().to_string();
    // From standard input (`--token-file -`) and from MAAS_TOKEN.
    let o = maasctl(
        &m,
        &[],
        &["--token-file", "-", "volume", "list"],
        Some(&secret),
    );
    assert!(o.status.success(), "{}", err(&o));
    let o = maasctl(&m, &[("MAAS_TOKEN", &secret)], &["volume", "list"], None);
    let o2 = o.status.success();
    assert!(o2, "{}", err(&o));
    std::thread::sleep(Duration::from_millis(3500));
    let mut env = m.maasctl_env();
    env.retain(|(k, _)| k != "MAAS_TOKEN_FILE");
    let o = Command::new(env!("CARGO_BIN_EXE_maasctl"))
        .envs(env)
        .env("MAAS_TOKEN", &secret)
        .env("MAASCTL_CONFIG", m.dir.join("no-such-config.toml"))
        .env_remove("MAAS_TOKEN_FILE")
        .args(["volume", "list"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(err(&o).contains("TOKEN_EXPIRED"), "{}", err(&o));

    // --expires-at; bad durations are refused before any request.
    let o = maasctl(
        &m,
        &[],
        &[
            "--json",
            "token",
            "create",
            "dated",
            "--expires-at",
            "2099-01-01T00:00:00Z",
        ],
        None,
    );
    assert!(o.status.success(), "{}", err(&o));
    let o = maasctl(
        &m,
        &[],
        &["token", "create", "x", "--expires-in", "soon"],
        None,
    );
    assert!(
        !o.status.success() && err(&o).contains("not a duration"),
        "{}",
        err(&o)
    );

    // The list shows expiry and last use.
    let o = maasctl(&m, &[], &["token", "list"], None);
    assert!(o.status.success(), "{}", err(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("EXPIRES") && out.contains("LAST USED"),
        "{out}"
    );
    let brief = out.lines().find(|l| l.contains("brief")).unwrap();
    assert!(brief.contains("(expired)"), "{brief}");
    let dated = out.lines().find(|l| l.contains("dated")).unwrap();
    assert!(
        dated.contains("2099-01-01T00:00:00Z") && dated.trim_end().ends_with("never"),
        "{dated}"
    );
    let o = maasctl(&m, &[], &["--json", "token", "list"], None);
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    let brief = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "brief")
        .unwrap();
    assert!(brief["last_used_at"].is_string(), "{brief}");
}
