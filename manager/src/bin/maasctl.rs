//! maasctl: the MaaS command line, over the REST API. Human tables by default, `--json` for
//! scripts, `--wait` follows jobs with a progress bar. URL and token come from flags, then
//! MAAS_URL / MAAS_TOKEN, then the config file (~/.config/maas/maasctl.toml: `url = ...`,
//! `token = ...` or `token_file = ...`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use maas_api as api;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "maasctl", version, about = "Drive a MaaS server")]
struct Cli {
    /// Server URL (default http://127.0.0.1:8080).
    #[arg(long, global = true, env = "MAAS_URL")]
    url: Option<String>,
    /// API token.
    #[arg(long, global = true, env = "MAAS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the token (e.g. DATA_DIR/admin.token).
    #[arg(long, global = true, env = "MAAS_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Config file (default ~/.config/maas/maasctl.toml).
    #[arg(long, global = true, env = "MAASCTL_CONFIG")]
    config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Wait for jobs to finish (with a progress bar unless --json).
    #[arg(long, global = true)]
    wait: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Is the server up?
    Health,
    /// Pools and their usage.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Volumes (the disks hosts back up to).
    #[command(subcommand, alias = "vol")]
    Volume(VolumeCmd),
    /// Snapshots (sealed points in time).
    #[command(subcommand, alias = "snap")]
    Snapshot(SnapshotCmd),
    /// Exports (how hosts reach a volume).
    #[command(subcommand)]
    Export(ExportCmd),
    /// Long-running operations.
    #[command(subcommand)]
    Job(JobCmd),
    /// API tokens (admin).
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand)]
enum PoolCmd {
    List,
    Get {
        id: String,
    },
    /// Re-read and check every stored chunk.
    Verify {
        id: String,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    List,
    Get {
        id: String,
    },
    Create {
        name: String,
        /// Size, e.g. 10G, 512M, 1T or bytes.
        size: String,
        #[arg(long)]
        block_size: Option<u32>,
        /// key=value, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Grow a volume (never shrinks).
    Resize {
        id: String,
        size: String,
    },
    Rename {
        id: String,
        name: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Snapshots of a volume.
    List {
        volume: String,
    },
    Get {
        id: String,
    },
    /// Seal a snapshot of a volume now.
    Create {
        volume: String,
    },
    Star {
        id: String,
    },
    Unstar {
        id: String,
    },
    /// Lock until an RFC 3339 time (can only be extended).
    Lock {
        id: String,
        until: String,
    },
    Delete {
        id: String,
    },
    /// Clone a snapshot into a new writable volume (instant mount).
    Clone {
        id: String,
        name: String,
    },
}

#[derive(Subcommand)]
// Parsed once per run: the size of the Create variant does not matter.
#[allow(clippy::large_enum_variant)]
enum ExportCmd {
    List {
        volume: String,
    },
    Get {
        id: String,
    },
    Create {
        volume: String,
        #[arg(long, default_value = "iscsi")]
        protocol: String,
        /// Allowed initiator IQN / host NQN, repeatable.
        #[arg(long = "initiator")]
        initiators: Vec<String>,
        #[arg(long)]
        chap_user: Option<String>,
        #[arg(long)]
        chap_secret: Option<String>,
        #[arg(long)]
        mutual_user: Option<String>,
        #[arg(long)]
        mutual_secret: Option<String>,
        /// NVMe/TCP: DH-HMAC-CHAP host secret every host must authenticate with
        /// (DHHC-1:xx:...:, from `nvme gen-dhchap-key`).
        #[arg(long)]
        dhchap_secret: Option<String>,
        /// NVMe/TCP: DH-HMAC-CHAP controller secret, for hosts that authenticate the target.
        #[arg(long, requires = "dhchap_secret")]
        dhchap_ctrl_secret: Option<String>,
        /// NVMe/TCP: only this DH-HMAC-CHAP hash (sha256, sha384, sha512).
        #[arg(long, requires = "dhchap_secret")]
        dhchap_hash: Option<String>,
        /// NVMe/TCP: only this DH group (null, ffdhe2048 ... ffdhe8192).
        #[arg(long, requires = "dhchap_secret")]
        dhchap_dhgroup: Option<String>,
        /// Refuse writes (mount a snapshot clone for restore without changing it).
        #[arg(long)]
        read_only: bool,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
enum JobCmd {
    List,
    Get {
        id: String,
    },
    /// Wait for a job to finish.
    Wait {
        id: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    List,
    Create {
        name: String,
        #[arg(long, default_value = "viewer")]
        role: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Deserialize, Default)]
struct FileConfig {
    url: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

#[derive(Debug)]
enum CliError {
    Api { status: u16, body: api::ErrorBody },
    Other(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Api { status, body } => {
                write!(f, "{} ({}): {}", body.code, status, body.message)?;
                if let Some(field) = &body.field {
                    write!(f, " [field: {field}]")?;
                }
                write!(f, " [request {}]", body.request_id)
            }
            CliError::Other(s) => f.write_str(s),
        }
    }
}

type R<T> = Result<T, CliError>;

impl Client {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> R<Value> {
        let url = format!("{}/api/v1{}", self.base, path);
        let mut req = self.agent.request(method, &url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) => {
                if r.status() == 204 {
                    return Ok(Value::Null);
                }
                r.into_json()
                    .map_err(|e| CliError::Other(format!("bad response from {url}: {e}")))
            }
            Err(ureq::Error::Status(status, r)) => {
                let text = r.into_string().unwrap_or_default();
                match serde_json::from_str::<api::ErrorBody>(&text) {
                    Ok(body) => Err(CliError::Api { status, body }),
                    Err(_) => Err(CliError::Other(format!("HTTP {status} from {url}: {text}"))),
                }
            }
            Err(e) => Err(CliError::Other(format!("cannot reach {url}: {e}"))),
        }
    }
    fn get<T: DeserializeOwned>(&self, path: &str) -> R<T> {
        typed(self.call("GET", path, None)?)
    }
    /// Follows `next_cursor` to the end.
    fn list<T: DeserializeOwned>(&self, path: &str) -> R<Vec<T>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let p = match &cursor {
                Some(c) => format!("{path}{sep}cursor={c}"),
                None => path.to_string(),
            };
            let page: api::List<T> = self.get(&p)?;
            out.extend(page.items);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }
}

fn typed<T: DeserializeOwned>(v: Value) -> R<T> {
    serde_json::from_value(v).map_err(|e| CliError::Other(format!("unexpected response: {e}")))
}

fn parse_size(s: &str) -> R<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                "P" => 1 << 50,
                _ => {
                    return Err(CliError::Other(format!(
                        "unknown size unit in {s:?} (K, M, G, T, P)"
                    )));
                }
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| CliError::Other(format!("not a size: {s:?}")))?;
    n.checked_mul(mult)
        .ok_or_else(|| CliError::Other(format!("size too large: {s:?}")))
}

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn print_volumes(v: &[api::Volume]) {
    table(
        &["ID", "NAME", "SIZE", "BLOCK", "ORIGIN", "CREATED"],
        v.iter()
            .map(|v| {
                vec![
                    v.id.clone(),
                    v.name.clone(),
                    human(v.size),
                    v.block_size.to_string(),
                    v.origin_snapshot.clone().unwrap_or_default(),
                    v.created_at.clone(),
                ]
            })
            .collect(),
    );
}

fn print_snapshots(v: &[api::Snapshot]) {
    table(
        &["ID", "VOLUME", "SIZE", "STARRED", "LOCKED UNTIL", "CREATED"],
        v.iter()
            .map(|s| {
                vec![
                    s.id.clone(),
                    s.volume_name.clone(),
                    human(s.size),
                    if s.starred { "*".into() } else { String::new() },
                    s.locked_until.clone().unwrap_or_default(),
                    s.created_at.clone(),
                ]
            })
            .collect(),
    );
}

fn print_exports(v: &[api::Export]) {
    table(
        &[
            "ID",
            "VOLUME",
            "PROTOCOL",
            "PORTAL",
            "TARGET",
            "LUN/NSID",
            "INITIATORS",
        ],
        v.iter()
            .map(|e| {
                vec![
                    e.id.clone(),
                    e.volume.clone(),
                    e.protocol.clone(),
                    e.portal.clone(),
                    e.target.clone(),
                    e.lun.or(e.nsid).map(|x| x.to_string()).unwrap_or_default(),
                    e.initiators.join(","),
                ]
            })
            .collect(),
    );
}

fn print_jobs(v: &[api::Job]) {
    table(
        &[
            "ID",
            "KIND",
            "STATE",
            "PROGRESS",
            "TARGET",
            "RESULT / ERROR",
        ],
        v.iter()
            .map(|j| {
                let outcome = match (&j.result, &j.error) {
                    (_, Some(e)) => format!("{}: {}", e.code, e.message),
                    (Some(r), _) => r.to_string(),
                    _ => String::new(),
                };
                vec![
                    j.id.clone(),
                    j.kind.clone(),
                    j.state.clone(),
                    format!("{:.0}%", j.progress * 100.0),
                    j.target.clone().unwrap_or_default(),
                    outcome,
                ]
            })
            .collect(),
    );
}

fn emit<T: serde::Serialize>(json_out: bool, v: &T, human_out: impl FnOnce()) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        human_out();
    }
}

fn wait_job(c: &Client, id: &str, bar: bool) -> R<api::Job> {
    let pb = bar.then(|| {
        let pb = indicatif::ProgressBar::new(1000);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {percent}% {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    loop {
        let j: api::Job = c.get(&format!("/jobs/{id}"))?;
        if let Some(pb) = &pb {
            pb.set_message(format!("{} {}", j.kind, j.state));
            pb.set_position((j.progress * 1000.0) as u64);
            pb.tick();
        }
        if j.is_done() {
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            return Ok(j);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Prints a job (after waiting for it with --wait); a failed job is an error.
fn job_result(cli: &Cli, c: &Client, v: Value) -> R<()> {
    let mut j: api::Job = typed(v)?;
    if cli.wait {
        j = wait_job(c, &j.id, !cli.json)?;
    }
    emit(cli.json, &j, || print_jobs(std::slice::from_ref(&j)));
    if let Some(e) = &j.error {
        return Err(CliError::Api {
            status: 0,
            body: e.clone(),
        });
    }
    Ok(())
}

fn run(cli: &Cli) -> R<()> {
    let cfg_path = cli.config.clone().or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/maas/maasctl.toml"))
    });
    let file: FileConfig = match cfg_path
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
    {
        Some(t) => toml::from_str(&t).map_err(|e| CliError::Other(format!("config file: {e}")))?,
        None => FileConfig::default(),
    };
    let token_file = cli.token_file.clone().or(file.token_file);
    let token = match (&cli.token, token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(p)) => Some(
            std::fs::read_to_string(&p)
                .map_err(|e| CliError::Other(format!("token file {}: {e}", p.display())))?
                .trim()
                .to_string(),
        ),
        (None, None) => file.token,
    };
    let base = cli
        .url
        .clone()
        .or(file.url)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let c = Client {
        base: base.trim_end_matches('/').to_string(),
        token,
        agent: ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build(),
    };
    let j = cli.json;
    match &cli.cmd {
        Cmd::Health => {
            let h: api::Health = c.get("/health")?;
            emit(j, &h, || println!("{} (maasd {})", h.status, h.version));
        }
        Cmd::Pool(p) => match p {
            PoolCmd::List => {
                let v: Vec<api::Pool> = c.list("/pools")?;
                emit(j, &v, || {
                    table(
                        &[
                            "ID",
                            "CAPACITY",
                            "USED",
                            "FREE",
                            "DEDUP",
                            "COMPRESSION",
                            "VOLUMES",
                            "SNAPSHOTS",
                        ],
                        v.iter()
                            .map(|p| {
                                vec![
                                    p.id.clone(),
                                    human(p.capacity),
                                    human(p.used),
                                    human(p.free),
                                    format!("{:.2}x", p.dedup_ratio),
                                    format!("{:.2}x", p.compression_ratio),
                                    p.volumes.to_string(),
                                    p.snapshots.to_string(),
                                ]
                            })
                            .collect(),
                    )
                });
            }
            PoolCmd::Get { id } => {
                let p: Value = c.get(&format!("/pools/{id}"))?;
                println!("{}", serde_json::to_string_pretty(&p).unwrap_or_default());
            }
            PoolCmd::Verify { id } => job_result(
                cli,
                &c,
                c.call("POST", &format!("/pools/{id}/verify"), None)?,
            )?,
        },
        Cmd::Volume(v) => match v {
            VolumeCmd::List => {
                let v: Vec<api::Volume> = c.list("/volumes")?;
                emit(j, &v, || print_volumes(&v));
            }
            VolumeCmd::Get { id } => {
                let v: api::Volume = c.get(&format!("/volumes/{id}"))?;
                emit(j, &v, || print_volumes(std::slice::from_ref(&v)));
            }
            VolumeCmd::Create {
                name,
                size,
                block_size,
                labels,
            } => {
                let mut l = serde_json::Map::new();
                for kv in labels {
                    let (k, v) = kv.split_once('=').ok_or_else(|| {
                        CliError::Other(format!("label {kv:?} must be key=value"))
                    })?;
                    l.insert(k.into(), v.into());
                }
                let mut body = json!({"name": name, "size": parse_size(size)?, "labels": l});
                if let Some(bs) = block_size {
                    body["block_size"] = json!(bs);
                }
                let v: api::Volume = typed(c.call("POST", "/volumes", Some(body))?)?;
                emit(j, &v, || print_volumes(std::slice::from_ref(&v)));
            }
            VolumeCmd::Resize { id, size } => {
                let v: api::Volume = typed(c.call(
                    "PATCH",
                    &format!("/volumes/{id}"),
                    Some(json!({"size": parse_size(size)?})),
                )?)?;
                emit(j, &v, || print_volumes(std::slice::from_ref(&v)));
            }
            VolumeCmd::Rename { id, name } => {
                let v: api::Volume = typed(c.call(
                    "PATCH",
                    &format!("/volumes/{id}"),
                    Some(json!({"name": name})),
                )?)?;
                emit(j, &v, || print_volumes(std::slice::from_ref(&v)));
            }
            VolumeCmd::Delete { id } => {
                job_result(cli, &c, c.call("DELETE", &format!("/volumes/{id}"), None)?)?
            }
        },
        Cmd::Snapshot(s) => match s {
            SnapshotCmd::List { volume } => {
                let v: Vec<api::Snapshot> = c.list(&format!("/volumes/{volume}/snapshots"))?;
                emit(j, &v, || print_snapshots(&v));
            }
            SnapshotCmd::Get { id } => {
                let v: api::Snapshot = c.get(&format!("/snapshots/{id}"))?;
                emit(j, &v, || print_snapshots(std::slice::from_ref(&v)));
            }
            SnapshotCmd::Create { volume } => job_result(
                cli,
                &c,
                c.call("POST", &format!("/volumes/{volume}/snapshots"), None)?,
            )?,
            SnapshotCmd::Star { id } | SnapshotCmd::Unstar { id } => {
                let star = matches!(s, SnapshotCmd::Star { .. });
                let v: api::Snapshot = typed(c.call(
                    "PATCH",
                    &format!("/snapshots/{id}"),
                    Some(json!({"starred": star})),
                )?)?;
                emit(j, &v, || print_snapshots(std::slice::from_ref(&v)));
            }
            SnapshotCmd::Lock { id, until } => {
                let v: api::Snapshot = typed(c.call(
                    "PATCH",
                    &format!("/snapshots/{id}"),
                    Some(json!({"locked_until": until})),
                )?)?;
                emit(j, &v, || print_snapshots(std::slice::from_ref(&v)));
            }
            SnapshotCmd::Delete { id } => job_result(
                cli,
                &c,
                c.call("DELETE", &format!("/snapshots/{id}"), None)?,
            )?,
            SnapshotCmd::Clone { id, name } => job_result(
                cli,
                &c,
                c.call(
                    "POST",
                    &format!("/snapshots/{id}/clones"),
                    Some(json!({"name": name})),
                )?,
            )?,
        },
        Cmd::Export(e) => match e {
            ExportCmd::List { volume } => {
                let v: Vec<api::Export> = c.list(&format!("/volumes/{volume}/exports"))?;
                emit(j, &v, || print_exports(&v));
            }
            ExportCmd::Get { id } => {
                let v: api::Export = c.get(&format!("/exports/{id}"))?;
                emit(j, &v, || print_exports(std::slice::from_ref(&v)));
            }
            ExportCmd::Create {
                volume,
                protocol,
                initiators,
                chap_user,
                chap_secret,
                mutual_user,
                mutual_secret,
                dhchap_secret,
                dhchap_ctrl_secret,
                dhchap_hash,
                dhchap_dhgroup,
                read_only,
            } => {
                let mut body =
                    json!({"protocol": protocol, "initiators": initiators, "read_only": read_only});
                if let (Some(u), Some(s)) = (chap_user, chap_secret) {
                    body["chap"] = json!({"user": u, "secret": s, "mutual_user": mutual_user, "mutual_secret": mutual_secret});
                }
                if let Some(s) = dhchap_secret {
                    body["dhchap"] = json!({"host_secret": s, "ctrl_secret": dhchap_ctrl_secret,
                        "hash": dhchap_hash, "dhgroup": dhchap_dhgroup});
                }
                let v: api::Export =
                    typed(c.call("POST", &format!("/volumes/{volume}/exports"), Some(body))?)?;
                emit(j, &v, || print_exports(std::slice::from_ref(&v)));
            }
            ExportCmd::Delete { id } => {
                c.call("DELETE", &format!("/exports/{id}"), None)?;
                if !j {
                    println!("export {id} deleted");
                }
            }
        },
        Cmd::Job(jc) => match jc {
            JobCmd::List => {
                let v: Vec<api::Job> = c.list("/jobs")?;
                emit(j, &v, || print_jobs(&v));
            }
            JobCmd::Get { id } => {
                let v: api::Job = c.get(&format!("/jobs/{id}"))?;
                emit(j, &v, || print_jobs(std::slice::from_ref(&v)));
            }
            JobCmd::Wait { id } => {
                let v = wait_job(&c, id, !j)?;
                emit(j, &v, || print_jobs(std::slice::from_ref(&v)));
                if let Some(e) = v.error {
                    return Err(CliError::Api { status: 0, body: e });
                }
            }
        },
        Cmd::Token(t) => match t {
            TokenCmd::List => {
                let v: Vec<api::Token> = c.list("/tokens")?;
                emit(j, &v, || {
                    table(
                        &["ID", "NAME", "ROLE", "CREATED"],
                        v.iter()
                            .map(|t| {
                                vec![
                                    t.id.clone(),
                                    t.name.clone(),
                                    t.role.clone(),
                                    t.created_at.clone(),
                                ]
                            })
                            .collect(),
                    )
                });
            }
            TokenCmd::Create { name, role } => {
                let v: api::CreatedToken =
                    typed(c.call("POST", "/tokens", Some(json!({"name": name, "role": role})))?)?;
                emit(j, &v, || {
                    println!(
                        "token {} ({}) created; secret (shown once):\n{}",
                        v.token.id, v.token.role, v.secret
                    )
                });
            }
            TokenCmd::Delete { id } => {
                c.call("DELETE", &format!("/tokens/{id}"), None)?;
                if !j {
                    println!("token {id} revoked");
                }
            }
        },
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
