//! maasctl: the MaaS command line, over the REST API. Human tables by default, `--json` for
//! scripts, `--wait` follows jobs with a progress bar. The URL comes from `--url`, MAAS_URL or
//! the config file (~/.config/maas/maasctl.toml: `url`, `token_file`, `token`, `ca_cert`,
//! `fingerprint`). The token comes from `--token-file` (MAAS_TOKEN_FILE), else MAAS_TOKEN, else
//! the config file — never from the command line, where every user of the machine can read it.
//! HTTPS servers are trusted through `--ca-cert` (MAAS_CA_CERT), `--fingerprint`
//! (MAAS_TLS_FINGERPRINT) or the system's CA certificates; an untrusted certificate is refused
//! with its fingerprint and the flags that would trust it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use maas_api as api;
use maas_api::client::{Client, ClientError as CliError, Connect, typed};
use serde::Deserialize;
use serde_json::{Value, json};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(name = "maasctl", version, about = "Drive a MaaS server")]
struct Cli {
    /// Server URL (default https://127.0.0.1:8080).
    #[arg(long, global = true, env = "MAAS_URL")]
    url: Option<String>,
    /// Removed: refused with an explanation (a token in argv is visible to every user).
    #[arg(long, global = true, hide = true)]
    token: Option<String>,
    /// File holding the API token (e.g. DATA_DIR/admin.token; `-`: standard input). Else the
    /// token comes from MAAS_TOKEN, else from the config file.
    #[arg(long, global = true, env = "MAAS_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM certificate(s) to trust for an https:// URL instead of the system's CAs, e.g.
    /// maasd's generated DATA_DIR/tls/api-cert.pem or your own CA.
    #[arg(long, global = true, env = "MAAS_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Trust only the server certificate with this SHA-256 fingerprint (as maasd logs it at
    /// start, `AB:CD:...`; colons and case optional).
    #[arg(long, global = true, env = "MAAS_TLS_FINGERPRINT")]
    fingerprint: Option<String>,
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
// Parsed once per run: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
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
    /// S3 buckets snapshots are archived to.
    #[command(subcommand)]
    ArchiveTarget(ArchiveTargetCmd),
    /// Protected hosts (registered by their probes) and the jobs queued for them.
    #[command(subcommand)]
    Host(HostCmd),
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
    /// Snapshots (of one volume, or all; archive-only ones too).
    List {
        volume: Option<String>,
        /// local or archive.
        #[arg(long)]
        location: Option<String>,
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
    /// List a directory of the filesystem inside a snapshot (no mount needed).
    Files {
        id: String,
        #[arg(default_value = "/")]
        path: String,
    },
    Clone {
        id: String,
        name: String,
    },
    /// Free a snapshot's local space once its archive copy is read back and checked.
    Evict {
        id: String,
    },
    /// Bring an archive-only snapshot back into the pool.
    Rehydrate {
        id: String,
    },
    /// Read a snapshot's copy in an archive target back whole and check every object.
    VerifyArchive {
        id: String,
        /// Archive target id.
        #[arg(long)]
        target: String,
    },
    /// Push a snapshot to an archive target (only what the bucket does not hold yet).
    Archive {
        id: String,
        /// Archive target id.
        #[arg(long)]
        target: String,
    },
}

/// Environment variable holding an archive target's secret access key.
const S3_SECRET_ENV: &str = "MAAS_S3_SECRET_ACCESS_KEY";

#[derive(Subcommand)]
// Parsed once per run: the size of the Create variant does not matter.
#[allow(clippy::large_enum_variant)]
enum ArchiveTargetCmd {
    List,
    Get {
        id: String,
    },
    /// Add an S3-compatible bucket. maasd checks that it is reachable and writable first.
    /// The secret access key comes from --secret-key-file, else MAAS_S3_SECRET_ACCESS_KEY,
    /// else a prompt; never from the command line.
    Create {
        name: String,
        /// e.g. https://s3.eu-west-1.amazonaws.com or http://10.0.0.5:7480
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        bucket: String,
        #[arg(long)]
        access_key_id: String,
        /// File holding the secret access key (one line; `-`: standard input).
        #[arg(long)]
        secret_key_file: Option<PathBuf>,
        /// Default us-east-1.
        #[arg(long)]
        region: Option<String>,
        /// Lets several installations share a bucket.
        #[arg(long)]
        prefix: Option<String>,
        /// Path-style addressing (default: on for IP addresses and localhost).
        #[arg(long)]
        path_style: Option<bool>,
        /// e.g. STANDARD_IA, GLACIER_IR.
        #[arg(long)]
        storage_class: Option<String>,
        /// GOVERNANCE or COMPLIANCE (needs a bucket with object lock, and --object-lock-days).
        #[arg(long)]
        object_lock_mode: Option<String>,
        #[arg(long)]
        object_lock_days: Option<u32>,
        /// Client-side encryption (XChaCha20-Poly1305): the bucket holds only ciphertext. A
        /// new key is made and its recovery key printed once: write it down.
        #[arg(long)]
        encrypt: bool,
        /// File holding the recovery key of an encrypted archive already in the bucket (a
        /// re-import after a disaster); implies --encrypt.
        #[arg(long)]
        recovery_key_file: Option<PathBuf>,
    },
    Delete {
        id: String,
    },
    /// List every snapshot the bucket holds into the catalog (after a disaster, on a fresh
    /// installation given the same target); they can then be rehydrated.
    Import {
        id: String,
    },
    /// Check the bucket against what this installation recorded: packs lost, damaged
    /// snapshots, orphan packs. --repair forgets lost packs (pushing a damaged snapshot again
    /// re-sends them) and deletes orphans older than --orphan-grace-hours (default 24).
    Check {
        id: String,
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        orphan_grace_hours: Option<u32>,
    },
}

/// An archive target's secret: the file flag, the environment, the terminal.
fn s3_secret(file: Option<&PathBuf>) -> R<Zeroizing<String>> {
    if let Some(p) = file {
        let text = read_secret_file(p, "a secret access key", "secret key file")?;
        let secret = text.trim_end_matches(['\n', '\r']);
        if secret.is_empty() || secret.contains('\n') {
            return Err(CliError::Other(format!(
                "secret key file {} must hold the key on one line",
                p.display()
            )));
        }
        return Ok(Zeroizing::new(secret.to_string()));
    }
    if let Some(v) = std::env::var_os(S3_SECRET_ENV) {
        let v = v
            .into_string()
            .map_err(|_| CliError::Other(format!("{S3_SECRET_ENV} is not valid UTF-8")))?;
        if !v.is_empty() {
            return Ok(Zeroizing::new(v));
        }
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err(CliError::Other(format!(
            "no secret access key: use --secret-key-file FILE or {S3_SECRET_ENV}"
        )));
    }
    rpassword::prompt_password("secret access key: ")
        .map(Zeroizing::new)
        .map_err(|e| CliError::Other(format!("reading the secret access key: {e}")))
}

fn print_archive_targets(v: &[api::ArchiveTarget]) {
    table(
        &[
            "ID",
            "NAME",
            "ENDPOINT",
            "BUCKET",
            "PREFIX",
            "LOCK",
            "ENCRYPTION",
            "CREATED",
        ],
        v.iter()
            .map(|t| {
                vec![
                    t.id.clone(),
                    t.name.clone(),
                    t.endpoint.clone(),
                    t.bucket.clone(),
                    t.prefix.clone(),
                    t.object_lock
                        .as_ref()
                        .map(|l| format!("{} {}d", l.mode, l.days))
                        .unwrap_or_default(),
                    match &t.key_id {
                        Some(id) => format!("{} (key {id})", t.encryption),
                        None => t.encryption.clone(),
                    },
                    t.created_at.clone(),
                ]
            })
            .collect(),
    );
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
    /// Export a volume. CHAP (iSCSI): --chap-user with its secret from --chap-secret-file,
    /// else MAAS_CHAP_SECRET, else a prompt on the terminal; mutual CHAP adds --mutual-user
    /// (secret: --mutual-secret-file, MAAS_CHAP_MUTUAL_SECRET or the prompt). Secrets are
    /// never taken from the command line, where every user of the machine can read them.
    Create {
        volume: String,
        #[arg(long, default_value = "iscsi")]
        protocol: String,
        /// Allowed initiator IQN / host NQN, repeatable.
        #[arg(long = "initiator")]
        initiators: Vec<String>,
        #[command(flatten)]
        chap: ChapArgs,
        #[command(flatten)]
        dhchap: DhchapArgs,
        /// Refuse writes (mount a snapshot clone for restore without changing it).
        #[arg(long)]
        read_only: bool,
    },
    Delete {
        id: String,
    },
}

/// Environment variable holding the one-way CHAP secret.
const CHAP_SECRET_ENV: &str = "MAAS_CHAP_SECRET";
/// Environment variable holding the mutual CHAP secret (the target's).
const MUTUAL_SECRET_ENV: &str = "MAAS_CHAP_MUTUAL_SECRET";

#[derive(clap::Args)]
struct ChapArgs {
    /// CHAP user the initiator logs in as (iSCSI).
    #[arg(long)]
    chap_user: Option<String>,
    /// File holding the CHAP secret (one line; `-`: standard input).
    #[arg(long)]
    chap_secret_file: Option<PathBuf>,
    /// Mutual CHAP: the user the target answers as (needs --chap-user).
    #[arg(long)]
    mutual_user: Option<String>,
    /// File holding the mutual CHAP secret (one line; `-`: standard input).
    #[arg(long)]
    mutual_secret_file: Option<PathBuf>,
    /// Removed: refused with an explanation (a secret in argv is visible to every user).
    #[arg(long, hide = true)]
    chap_secret: Option<String>,
    /// Removed: refused with an explanation.
    #[arg(long, hide = true)]
    mutual_secret: Option<String>,
}

/// NVMe/TCP in-band authentication (DH-HMAC-CHAP) of an export. Secrets come from files, the
/// environment or the terminal, never from the command line.
#[derive(clap::Args, Debug)]
struct DhchapArgs {
    /// File holding the DH-HMAC-CHAP host secret every host must authenticate with
    /// (DHHC-1:xx:...:, from `nvme gen-dhchap-key`; `-`: standard input).
    #[arg(long)]
    dhchap_secret_file: Option<PathBuf>,
    /// Prompt for the host secret (or take it from MAAS_DHCHAP_SECRET).
    #[arg(long)]
    dhchap: bool,
    /// File holding the controller secret, for hosts that authenticate the target too.
    #[arg(long)]
    dhchap_ctrl_secret_file: Option<PathBuf>,
    /// Only this DH-HMAC-CHAP hash (sha256, sha384, sha512).
    #[arg(long)]
    dhchap_hash: Option<String>,
    /// Only this DH group (null, ffdhe2048 ... ffdhe8192).
    #[arg(long)]
    dhchap_dhgroup: Option<String>,
    /// Refused with an explanation (a secret in argv is visible to every user).
    #[arg(long, hide = true)]
    dhchap_secret: Option<String>,
    /// Refused with an explanation.
    #[arg(long, hide = true)]
    dhchap_ctrl_secret: Option<String>,
}

const DHCHAP_SECRET_ENV: &str = "MAAS_DHCHAP_SECRET";
const DHCHAP_CTRL_SECRET_ENV: &str = "MAAS_DHCHAP_CTRL_SECRET";

/// The `dhchap` object of an export body, or None; incomplete options are refused.
fn dhchap_body(a: &DhchapArgs, protocol: &str) -> R<Option<Value>> {
    if a.dhchap_secret.is_some() || a.dhchap_ctrl_secret.is_some() {
        return Err(CliError::Other(format!(
            "--dhchap-secret and --dhchap-ctrl-secret are not taken: a secret on the command line \
             can be read by every user of this machine (ps, /proc) and stays in shell history. \
             Use --dhchap-secret-file / --dhchap-ctrl-secret-file, {DHCHAP_SECRET_ENV} / \
             {DHCHAP_CTRL_SECRET_ENV}, or --dhchap to type it at the prompt"
        )));
    }
    let incomplete = |m: &str| {
        Err(CliError::Other(format!(
            "incomplete DH-HMAC-CHAP options: {m}"
        )))
    };
    let wanted =
        a.dhchap || a.dhchap_secret_file.is_some() || std::env::var_os(DHCHAP_SECRET_ENV).is_some();
    if !wanted {
        if a.dhchap_ctrl_secret_file.is_some()
            || std::env::var_os(DHCHAP_CTRL_SECRET_ENV).is_some()
            || a.dhchap_hash.is_some()
            || a.dhchap_dhgroup.is_some()
        {
            return incomplete("a controller secret, hash or group needs the host secret");
        }
        return Ok(None);
    }
    if protocol != "nvme-tcp" {
        return incomplete(&format!(
            "DH-HMAC-CHAP applies to nvme-tcp exports, not {protocol}"
        ));
    }
    let Some(host) = chap_secret(
        a.dhchap_secret_file.as_ref(),
        DHCHAP_SECRET_ENV,
        "DH-HMAC-CHAP host secret",
    )?
    else {
        return incomplete(&format!(
            "the host secret is missing: --dhchap-secret-file, {DHCHAP_SECRET_ENV}, or a terminal"
        ));
    };
    let ctrl = if a.dhchap_ctrl_secret_file.is_some()
        || std::env::var_os(DHCHAP_CTRL_SECRET_ENV).is_some()
    {
        chap_secret(
            a.dhchap_ctrl_secret_file.as_ref(),
            DHCHAP_CTRL_SECRET_ENV,
            "DH-HMAC-CHAP controller secret",
        )?
    } else {
        None
    };
    Ok(Some(json!({
        "host_secret": host.as_str(),
        "ctrl_secret": ctrl.as_ref().map(|c| c.as_str()),
        "hash": a.dhchap_hash,
        "dhgroup": a.dhchap_dhgroup,
    })))
}

/// The whole of a secret's file (`-`: standard input), as read; warns when others can read the
/// file. `what` and `file_label` name it in errors ("a CHAP secret", "CHAP secret file").
fn read_secret_file(p: &std::path::Path, what: &str, file_label: &str) -> R<Zeroizing<String>> {
    if p.as_os_str() == "-" {
        let mut s = Zeroizing::new(String::new());
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| CliError::Other(format!("reading {what} from stdin: {e}")))?;
        return Ok(s);
    }
    if let Ok(meta) = std::fs::metadata(p)
        && std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0
    {
        eprintln!(
            "warning: {} can be read by other users (chmod 600 it)",
            p.display()
        );
    }
    Ok(Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
        CliError::Other(format!("{file_label} {}: {e}", p.display()))
    })?))
}

/// Where a CHAP secret comes from, in order: the file flag, the environment, the terminal.
fn chap_secret(
    file: Option<&PathBuf>,
    env_var: &str,
    prompt_for: &str,
) -> R<Option<Zeroizing<String>>> {
    if let Some(p) = file {
        let text = read_secret_file(p, "a CHAP secret", "CHAP secret file")?;
        // One line: the line ending is not part of the secret.
        let secret = text.strip_suffix('\n').unwrap_or(&text);
        let secret = secret.strip_suffix('\r').unwrap_or(secret);
        if secret.is_empty() || secret.contains('\n') {
            return Err(CliError::Other(format!(
                "CHAP secret file {} must hold the secret on one line",
                p.display()
            )));
        }
        return Ok(Some(Zeroizing::new(secret.to_string())));
    }
    if let Some(v) = std::env::var_os(env_var) {
        let v = v
            .into_string()
            .map_err(|_| CliError::Other(format!("{env_var} is not valid UTF-8")))?;
        if v.is_empty() {
            return Err(CliError::Other(format!("{env_var} is empty")));
        }
        return Ok(Some(Zeroizing::new(v)));
    }
    if prompt_for.is_empty() || !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Ok(None);
    }
    let ask = |p: &str| {
        rpassword::prompt_password(p)
            .map(Zeroizing::new)
            .map_err(|e| CliError::Other(format!("reading a CHAP secret from the terminal: {e}")))
    };
    let first = ask(&format!("{prompt_for}: "))?;
    let again = ask(&format!("{prompt_for} (again): "))?;
    if first != again {
        return Err(CliError::Other("the two secrets typed differ".into()));
    }
    if first.is_empty() {
        return Err(CliError::Other("an empty CHAP secret".into()));
    }
    Ok(Some(first))
}

/// The `chap` object of an export, or None; any incomplete combination is an error (never an
/// export created without the CHAP its user asked for).
fn chap_body(a: &ChapArgs, protocol: &str) -> R<Option<Value>> {
    if a.chap_secret.is_some() || a.mutual_secret.is_some() {
        return Err(CliError::Other(format!(
            "--chap-secret and --mutual-secret were removed: a secret on the command line can be \
             read by every user of this machine (ps, /proc) and stays in shell history. Use \
             --chap-secret-file / --mutual-secret-file, {CHAP_SECRET_ENV} / {MUTUAL_SECRET_ENV}, \
             or type it at the prompt"
        )));
    }
    let incomplete = |m: &str| Err(CliError::Other(format!("incomplete CHAP options: {m}")));
    let Some(user) = &a.chap_user else {
        if a.chap_secret_file.is_some() {
            return incomplete("--chap-secret-file needs --chap-user");
        }
        if std::env::var_os(CHAP_SECRET_ENV).is_some() {
            return incomplete(&format!(
                "{CHAP_SECRET_ENV} is set but --chap-user is not (unset it to export without CHAP)"
            ));
        }
        if a.mutual_user.is_some()
            || a.mutual_secret_file.is_some()
            || std::env::var_os(MUTUAL_SECRET_ENV).is_some()
        {
            return incomplete("mutual CHAP needs one-way CHAP (--chap-user and its secret)");
        }
        return Ok(None);
    };
    if protocol != "iscsi" {
        return incomplete(&format!("CHAP applies to iSCSI exports, not {protocol}"));
    }
    if a.mutual_user.is_none() && a.mutual_secret_file.is_some() {
        return incomplete("--mutual-secret-file needs --mutual-user");
    }
    if a.chap_secret_file
        .as_deref()
        .is_some_and(|p| p.as_os_str() == "-")
        && a.mutual_secret_file
            .as_deref()
            .is_some_and(|p| p.as_os_str() == "-")
    {
        return incomplete("only one secret can come from standard input");
    }
    let Some(secret) = chap_secret(
        a.chap_secret_file.as_ref(),
        CHAP_SECRET_ENV,
        &format!("CHAP secret for {user}"),
    )?
    else {
        return incomplete(&format!(
            "--chap-user needs a secret: --chap-secret-file, {CHAP_SECRET_ENV}, or a terminal to type it"
        ));
    };
    let mut body = json!({"user": user, "secret": secret.as_str()});
    if let Some(muser) = &a.mutual_user {
        let Some(msecret) = chap_secret(
            a.mutual_secret_file.as_ref(),
            MUTUAL_SECRET_ENV,
            &format!("mutual CHAP secret of the target (user {muser})"),
        )?
        else {
            return incomplete(&format!(
                "--mutual-user needs a secret: --mutual-secret-file, {MUTUAL_SECRET_ENV}, or a terminal to type it"
            ));
        };
        body["mutual_user"] = json!(muser);
        body["mutual_secret"] = json!(msecret.as_str());
    } else if std::env::var_os(MUTUAL_SECRET_ENV).is_some() {
        return incomplete(&format!(
            "{MUTUAL_SECRET_ENV} is set but --mutual-user is not (unset it for one-way CHAP)"
        ));
    }
    Ok(Some(body))
}

#[derive(Subcommand)]
enum HostCmd {
    /// Hosts with their state (online while their probe heartbeats) and jobs.
    List,
    Get {
        id: String,
    },
    /// Forget a host (its queued jobs fail).
    Delete {
        id: String,
    },
    /// Queue a backup for the host's probe (`maas-probe run`): `--wait` waits for it.
    Backup {
        id: String,
        #[arg(long)]
        volume: String,
        /// A directory, block device or image file on the host.
        #[arg(long)]
        source: String,
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// Queue a restore of files (`--path P --to DIR`) or a whole image (`--image DEST`) on the
    /// host.
    Restore {
        id: String,
        snapshot: String,
        #[arg(long, requires = "to", conflicts_with = "image")]
        path: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        image: Option<String>,
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
    /// Tokens with their role, expiry and last use.
    List,
    /// Create a token; its secret is shown once.
    Create {
        name: String,
        #[arg(long, default_value = "viewer")]
        role: String,
        /// Expire after this long: 30d, 12h, 90m, 2w, 45s (default: never).
        #[arg(long, conflicts_with = "expires_at")]
        expires_in: Option<String>,
        /// Expire at this RFC 3339 time (default: never).
        #[arg(long)]
        expires_at: Option<String>,
    },
    Delete {
        id: String,
    },
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    url: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    fingerprint: Option<String>,
}

/// Environment variable holding the API token.
const TOKEN_ENV: &str = "MAAS_TOKEN";

type R<T> = Result<T, CliError>;

const DEFAULT_URL: &str = "https://127.0.0.1:8080";
const TOKEN_FILE_ENV: &str = "MAAS_TOKEN_FILE";

/// A token from a file (one line; `-`: standard input); warns when others can read the file.
fn read_token_file(p: &std::path::Path) -> R<Zeroizing<String>> {
    let text = read_secret_file(p, "the token", "token file")?;
    let t = text.trim();
    if t.is_empty() || t.contains('\n') {
        return Err(CliError::Other(format!(
            "token file {} must hold the token on one line",
            p.display()
        )));
    }
    Ok(Zeroizing::new(t.to_string()))
}

/// `30d`, `12h`, `90m`, `45s`, `2w` (a bare number is seconds).
fn parse_duration(s: &str) -> R<chrono::Duration> {
    let bad = || {
        CliError::Other(format!(
            "not a duration: {s:?} (e.g. 30d, 12h, 90m, 45s, 2w)"
        ))
    };
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: i64 = s[..split].parse().map_err(|_| bad())?;
    let secs = match &s[split..] {
        "" | "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86400),
        "w" => n.checked_mul(7 * 86400),
        _ => None,
    }
    .ok_or_else(bad)?;
    if secs <= 0 {
        return Err(CliError::Other(format!("{s:?}: a token must live a while")));
    }
    chrono::Duration::try_seconds(secs).ok_or_else(bad)
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
        &[
            "ID",
            "VOLUME",
            "SIZE",
            "WHERE",
            "STARRED",
            "LOCKED UNTIL",
            "CREATED",
        ],
        v.iter()
            .map(|s| {
                let copies = s.archives.iter().filter(|a| a.state == "archived").count();
                vec![
                    s.id.clone(),
                    s.volume_name.clone(),
                    human(s.size),
                    if copies > 0 && s.location == "local" {
                        format!("local+{copies} archive")
                    } else {
                        s.location.clone()
                    },
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
            let mut msg = format!("{} {}", j.kind, j.state);
            if let Some(d) = &j.progress_detail
                && let (Some(sent), Some(total)) =
                    (d["bytes_sent"].as_u64(), d["bytes_to_send"].as_u64())
            {
                msg.push_str(&format!(
                    " {} of {}, {} objects, {}/s",
                    human(sent),
                    human(total),
                    d["packs_sent"].as_u64().unwrap_or(0),
                    human(d["bytes_per_second"].as_u64().unwrap_or(0))
                ));
            }
            pb.set_message(msg);
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
fn print_hosts(v: &[api::Host]) {
    table(
        &[
            "ID",
            "NAME",
            "STATE",
            "LAST HEARTBEAT",
            "QUEUED",
            "RUNNING",
            "VERSION",
            "HOST NQN",
        ],
        v.iter()
            .map(|h| {
                vec![
                    h.id.clone(),
                    h.name.clone(),
                    h.state.clone(),
                    h.last_heartbeat.clone().unwrap_or_else(|| "never".into()),
                    h.jobs_queued.to_string(),
                    h.jobs_running.to_string(),
                    h.version.clone(),
                    h.hostnqn.clone(),
                ]
            })
            .collect(),
    )
}

/// Percent-encodes a query parameter's value.
fn query_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

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
    if cli.token.is_some() {
        return Err(CliError::Other(format!(
            "--token is not taken: a token on the command line can be read by every user of \
             this machine (ps, /proc) and stays in shell history. Use --token-file FILE (or \
             {TOKEN_FILE_ENV}; `-` reads standard input), {TOKEN_ENV}, or token_file in the \
             config file"
        )));
    }
    let token = match (cli.token_file.clone(), std::env::var_os(TOKEN_ENV)) {
        (Some(p), _) => Some(read_token_file(&p)?),
        (None, Some(v)) => {
            let v = v
                .into_string()
                .map_err(|_| CliError::Other(format!("{TOKEN_ENV} is not valid UTF-8")))?;
            Some(Zeroizing::new(v.trim().to_string()))
        }
        (None, None) => match (file.token_file, file.token) {
            (Some(p), _) => Some(read_token_file(&p)?),
            (None, t) => t.map(|t| Zeroizing::new(t.trim().to_string())),
        },
    };
    let base = cli
        .url
        .clone()
        .or(file.url)
        .unwrap_or_else(|| DEFAULT_URL.into());
    let base = base.trim_end_matches('/').to_string();
    let ca_cert = cli.ca_cert.clone().or(file.ca_cert);
    let pin = cli.fingerprint.clone().or(file.fingerprint);
    let c = Client::new(Connect {
        base: &base,
        token,
        ca_cert: ca_cert.as_deref(),
        fingerprint: pin.as_deref(),
        timeout: None,
    })?;
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
            SnapshotCmd::List { volume, location } => {
                let mut q = Vec::new();
                if let Some(v) = volume {
                    q.push(format!("volume={v}"));
                }
                if let Some(l) = location {
                    q.push(format!("location={l}"));
                }
                let path = if q.is_empty() {
                    "/snapshots".to_string()
                } else {
                    format!("/snapshots?{}", q.join("&"))
                };
                let v: Vec<api::Snapshot> = c.list(&path)?;
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
            SnapshotCmd::Evict { id } => job_result(
                cli,
                &c,
                c.call("POST", &format!("/snapshots/{id}/evict"), None)?,
            )?,
            SnapshotCmd::VerifyArchive { id, target } => job_result(
                cli,
                &c,
                c.call(
                    "POST",
                    &format!("/snapshots/{id}/archives/{target}/verify"),
                    None,
                )?,
            )?,
            SnapshotCmd::Rehydrate { id } => job_result(
                cli,
                &c,
                c.call("POST", &format!("/snapshots/{id}/rehydrate"), None)?,
            )?,
            SnapshotCmd::Archive { id, target } => job_result(
                cli,
                &c,
                c.call(
                    "POST",
                    &format!("/snapshots/{id}/archive"),
                    Some(json!({"target": target})),
                )?,
            )?,
            SnapshotCmd::Files { id, path } => {
                let mut all: Vec<api::SnapshotFileEntry> = Vec::new();
                let mut after: Option<String> = None;
                loop {
                    let mut q = format!("/snapshots/{id}/files?path={}", query_escape(path));
                    if let Some(a) = &after {
                        q.push_str(&format!("&after={}", query_escape(a)));
                    }
                    let page: api::SnapshotFileListing = c.get(&q)?;
                    all.extend(page.entries);
                    match page.next_after {
                        Some(a) => after = Some(a),
                        None => break,
                    }
                }
                emit(j, &all, || {
                    table(
                        &["MODE", "UID", "GID", "SIZE", "NAME"],
                        all.iter()
                            .map(|e| {
                                let name = match &e.link_target {
                                    Some(t) => format!("{} -> {t}", e.name),
                                    None if e.kind == "dir" => format!("{}/", e.name),
                                    None => e.name.clone(),
                                };
                                vec![
                                    format!("{} {:04o}", e.kind, e.mode),
                                    e.uid.to_string(),
                                    e.gid.to_string(),
                                    e.size.to_string(),
                                    name,
                                ]
                            })
                            .collect(),
                    )
                });
            }
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
                chap,
                dhchap,
                read_only,
            } => {
                let mut body =
                    json!({"protocol": protocol, "initiators": initiators, "read_only": read_only});
                if let Some(c) = chap_body(chap, protocol)? {
                    body["chap"] = c;
                }
                if let Some(d) = dhchap_body(dhchap, protocol)? {
                    body["dhchap"] = d;
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
        Cmd::ArchiveTarget(a) => match a {
            ArchiveTargetCmd::List => {
                let v: Vec<api::ArchiveTarget> = c.list("/archive-targets")?;
                emit(j, &v, || print_archive_targets(&v));
            }
            ArchiveTargetCmd::Get { id } => {
                let t: api::ArchiveTarget = c.get(&format!("/archive-targets/{id}"))?;
                emit(j, &t, || print_archive_targets(std::slice::from_ref(&t)));
            }
            ArchiveTargetCmd::Create {
                name,
                endpoint,
                bucket,
                access_key_id,
                secret_key_file,
                region,
                prefix,
                path_style,
                storage_class,
                object_lock_mode,
                object_lock_days,
                encrypt,
                recovery_key_file,
            } => {
                let secret = s3_secret(secret_key_file.as_ref())?;
                let mut body = json!({
                    "name": name,
                    "endpoint": endpoint,
                    "bucket": bucket,
                    "access_key_id": access_key_id,
                    "secret_access_key": secret.as_str(),
                });
                if let Some(r) = region {
                    body["region"] = json!(r);
                }
                if let Some(p) = prefix {
                    body["prefix"] = json!(p);
                }
                if let Some(p) = path_style {
                    body["path_style"] = json!(p);
                }
                if let Some(sc) = storage_class {
                    body["storage_class"] = json!(sc);
                }
                match (object_lock_mode, object_lock_days) {
                    (Some(m), Some(d)) => body["object_lock"] = json!({"mode": m, "days": d}),
                    (None, None) => {}
                    _ => {
                        return Err(CliError::Other(
                            "object lock needs both --object-lock-mode and --object-lock-days"
                                .into(),
                        ));
                    }
                }
                if let Some(f) = &recovery_key_file {
                    let rk = std::fs::read_to_string(f)
                        .map_err(|e| CliError::Other(format!("reading {}: {e}", f.display())))?;
                    body["recovery_key"] = json!(rk.trim());
                    body["encryption"] = json!("xchacha20-poly1305");
                } else if *encrypt {
                    body["encryption"] = json!("xchacha20-poly1305");
                }
                let t: api::ArchiveTarget =
                    typed(c.call("POST", "/archive-targets", Some(body))?)?;
                emit(j, &t, || {
                    print_archive_targets(std::slice::from_ref(&t));
                    if let Some(rk) = &t.recovery_key {
                        println!();
                        println!(
                            "RECOVERY KEY (shown once; without it the archive cannot be read on another installation):"
                        );
                        println!();
                        println!("    {}", rk.0);
                        println!();
                        println!("Keep it apart from this server, e.g. printed in a safe.");
                    }
                });
            }
            ArchiveTargetCmd::Check {
                id,
                repair,
                orphan_grace_hours,
            } => {
                let mut body = json!({ "repair": repair });
                if let Some(h) = orphan_grace_hours {
                    body["orphan_grace_hours"] = json!(h);
                }
                job_result(
                    cli,
                    &c,
                    c.call("POST", &format!("/archive-targets/{id}/check"), Some(body))?,
                )?
            }
            ArchiveTargetCmd::Import { id } => job_result(
                cli,
                &c,
                c.call("POST", &format!("/archive-targets/{id}/import"), None)?,
            )?,
            ArchiveTargetCmd::Delete { id } => {
                c.call("DELETE", &format!("/archive-targets/{id}"), None)?;
                if !j {
                    println!("deleted {id}");
                }
            }
        },
        Cmd::Host(hc) => match hc {
            HostCmd::List => {
                let v: Vec<api::Host> = c.list("/hosts")?;
                emit(j, &v, || print_hosts(&v));
            }
            HostCmd::Get { id } => {
                let v: api::Host = c.get(&format!("/hosts/{id}"))?;
                emit(j, &v, || print_hosts(std::slice::from_ref(&v)));
            }
            HostCmd::Delete { id } => {
                c.call("DELETE", &format!("/hosts/{id}"), None)?;
                emit(j, &json!({ "deleted": id }), || println!("host {id} deleted"));
            }
            HostCmd::Backup {
                id,
                volume,
                source,
                exclude,
            } => job_result(
                cli,
                &c,
                c.call(
                    "POST",
                    &format!("/hosts/{id}/jobs"),
                    Some(json!({ "kind": "backup", "volume": volume, "source": source, "exclude": exclude })),
                )?,
            )?,
            HostCmd::Restore {
                id,
                snapshot,
                path,
                to,
                image,
            } => {
                let mut body = json!({ "kind": "restore", "snapshot": snapshot });
                for (k, v) in [("path", path), ("to", to), ("image", image)] {
                    if let Some(v) = v {
                        body[k] = json!(v);
                    }
                }
                job_result(
                    cli,
                    &c,
                    c.call("POST", &format!("/hosts/{id}/jobs"), Some(body))?,
                )?
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
                let now = chrono::Utc::now();
                emit(j, &v, || {
                    table(
                        &["ID", "NAME", "ROLE", "CREATED", "EXPIRES", "LAST USED"],
                        v.iter()
                            .map(|t| {
                                let expires = match &t.expires_at {
                                    None => "never".to_string(),
                                    Some(e) => match chrono::DateTime::parse_from_rfc3339(e) {
                                        Ok(at) if at <= now => format!("{e} (expired)"),
                                        _ => e.clone(),
                                    },
                                };
                                vec![
                                    t.id.clone(),
                                    t.name.clone(),
                                    t.role.clone(),
                                    t.created_at.clone(),
                                    expires,
                                    t.last_used_at.clone().unwrap_or_else(|| "never".into()),
                                ]
                            })
                            .collect(),
                    )
                });
            }
            TokenCmd::Create {
                name,
                role,
                expires_in,
                expires_at,
            } => {
                let mut body = json!({"name": name, "role": role});
                if let Some(d) = expires_in {
                    let at = chrono::Utc::now() + parse_duration(d)?;
                    body["expires_at"] =
                        json!(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                } else if let Some(at) = expires_at {
                    body["expires_at"] = json!(at);
                }
                let v: api::CreatedToken = typed(c.call("POST", "/tokens", Some(body))?)?;
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
