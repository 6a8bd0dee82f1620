//! maas-probe: the MaaS agent on a protected host. One-shot commands for people and scripts
//! (`backup`, `mount`, `umount`, `cleanup`), each with a progress line on a terminal and JSON
//! with `--json`. maasd is reached with `--server` (MAAS_URL) and a token from `--token-file`
//! (MAAS_TOKEN_FILE) or MAAS_TOKEN — never from the command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use maas_api::client::{Client, Connect};
use maas_probe::identity::Identity;
use maas_probe::ops::{self, Probe, ProbeError, R};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(
    name = "maas-probe",
    version,
    about = "Back up this host to MaaS, and bring it back"
)]
struct Cli {
    /// maasd's URL.
    #[arg(
        long,
        env = "MAAS_URL",
        default_value = "https://127.0.0.1:8080",
        global = true
    )]
    server: String,
    /// File holding the API token (one line; `-` reads standard input).
    #[arg(long, env = "MAAS_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// PEM certificate (CA or maasd's own) to trust for https.
    #[arg(long, env = "MAAS_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// SHA-256 fingerprint of maasd's certificate to trust.
    #[arg(long, env = "MAAS_TLS_FINGERPRINT", global = true)]
    fingerprint: Option<String>,
    /// Where the probe keeps this host's identity and what it has attached.
    #[arg(
        long,
        env = "MAAS_PROBE_STATE_DIR",
        default_value = "/var/lib/maas-probe",
        global = true
    )]
    state_dir: PathBuf,
    /// This host's name (on first use; kept afterwards).
    #[arg(long, global = true)]
    name: Option<String>,
    /// Print JSON for scripts instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Back up a source into a volume (made on first use) and seal a snapshot.
    Backup {
        /// The volume (made if it does not exist).
        #[arg(long)]
        volume: String,
        /// A directory (file-tree backup), or a block device or image file (image backup:
        /// only changed blocks are sent).
        #[arg(
            long,
            required_unless_present = "postgres",
            conflicts_with = "postgres"
        )]
        source: Option<PathBuf>,
        /// With an NBD source: the QEMU dirty bitmap that tracks changes since the last
        /// backup (`qemu:dirty-bitmap:NAME`); incremental backups read only its dirty ranges.
        #[arg(long)]
        bitmap: Option<String>,
        /// A PostgreSQL cluster to back up online and consistently, by libpq connection
        /// string (e.g. "host=/run/postgresql user=postgres"); it must run on this host.
        #[arg(long)]
        postgres: Option<String>,
        /// Run this (sh -c) first; if it fails, nothing is backed up.
        #[arg(long)]
        pre: Option<String>,
        /// Run this (sh -c) after the backup, whatever happened (MAAS_BACKUP_STATUS,
        /// MAAS_SNAPSHOT and MAAS_VOLUME say what).
        #[arg(long)]
        post: Option<String>,
        /// Size of a new volume, or grow an existing one to it (e.g. 20G).
        #[arg(long)]
        size: Option<String>,
        /// Leave out paths matching this pattern (rsync syntax; repeatable).
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// Mount a snapshot read-only at DIR (a clone, exported to this host only).
    Mount { snapshot: String, dir: PathBuf },
    /// Restore files or a folder (`--path P --to DIR`), or the whole image (`--image DEST`).
    Restore {
        snapshot: String,
        /// A file or folder inside the snapshot (`/` for everything).
        #[arg(long, requires = "to", conflicts_with = "image")]
        path: Option<String>,
        /// The folder to restore into (made if missing).
        #[arg(long)]
        to: Option<PathBuf>,
        /// A block device or a file to write the whole image to.
        #[arg(long)]
        image: Option<PathBuf>,
    },
    /// Register this host with maasd (name, IQN, host NQN); `run` does it too when needed.
    Register,
    /// Run as the host's agent: heartbeat, and run the jobs maasd queues for this host.
    Run {
        /// Seconds between heartbeats.
        #[arg(long, default_value_t = 15)]
        heartbeat: u64,
        /// Seconds between asks for work while there is none.
        #[arg(long, default_value_t = 5)]
        poll: u64,
    },
    /// Unmount a snapshot mounted with `mount`, and delete its clone.
    Umount { dir: PathBuf },
    /// Remove what a stopped probe left attached (mounts, loop devices, exports, clones).
    Cleanup,
    /// Prints this host's identity (name, host NQN, IQN).
    Identity,
    /// (internal) Serves a mount's volume until stopped.
    #[command(hide = true)]
    ServeAttachment { name: String },
}

fn parse_size(s: &str) -> R<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split]
        .parse()
        .map_err(|_| ProbeError::Usage(format!("not a size: {s:?} (e.g. 20G)")))?;
    let mult: u64 = match t[split..]
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(ProbeError::Usage(format!(
                "unknown size unit in {s:?} (K, M, G, T)"
            )));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| ProbeError::Usage(format!("size too large: {s:?}")))
}

fn token(cli: &Cli) -> R<Option<Zeroizing<String>>> {
    if let Some(p) = &cli.token_file {
        let text = if p.as_os_str() == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            s
        } else {
            std::fs::read_to_string(p)
                .map_err(|e| ProbeError::Usage(format!("token file {}: {e}", p.display())))?
        };
        let t = text.trim();
        if t.is_empty() || t.contains('\n') {
            return Err(ProbeError::Usage(format!(
                "token file {} must hold the token on one line",
                p.display()
            )));
        }
        return Ok(Some(Zeroizing::new(t.to_string())));
    }
    Ok(std::env::var("MAAS_TOKEN")
        .ok()
        .map(|t| Zeroizing::new(t.trim().to_string())))
}

fn runtime() -> R<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("maas-probe-io")
        .enable_all()
        .build()?)
}

fn emit<T: serde::Serialize>(json: bool, v: &T, text: impl FnOnce()) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        text();
    }
}

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn run(cli: &Cli) -> R<()> {
    let id = Identity::load_or_create(&cli.state_dir, cli.name.as_deref())?;
    if let Cmd::ServeAttachment { name } = &cli.cmd {
        let rt = runtime()?;
        return ops::serve_attachment(&cli.state_dir, &id, &rt, name);
    }
    if let Cmd::Identity = &cli.cmd {
        emit(cli.json, &id, || {
            println!("name     {}", id.name);
            println!("host NQN {}", id.hostnqn);
            println!("IQN      {}", id.iqn);
        });
        return Ok(());
    }
    let client = Client::new(Connect {
        base: &cli.server,
        token: token(cli)?,
        ca_cert: cli.ca_cert.as_deref(),
        fingerprint: cli.fingerprint.as_deref(),
        timeout: None,
    })?;
    let probe = Probe {
        state: cli.state_dir.clone(),
        id,
        client,
        rt: runtime()?,
    };
    let bar = (!cli.json && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        pb
    });
    let progress = |stage: &str, _bytes: u64| {
        if let Some(pb) = &bar {
            pb.set_message(stage.to_string());
        }
    };
    match &cli.cmd {
        Cmd::Backup {
            volume,
            source,
            postgres,
            bitmap,
            size,
            exclude,
            pre,
            post,
        } => {
            let size = size.as_deref().map(parse_size).transpose()?;
            let source = source.as_ref().map(|p| p.to_string_lossy());
            let rep = probe.backup(
                &ops::BackupRequest {
                    volume,
                    source: source.as_deref(),
                    postgres: postgres.as_deref(),
                    bitmap: bitmap.as_deref(),
                    size,
                    exclude,
                    pre: pre.as_deref(),
                    post: post.as_deref(),
                },
                &progress,
            );
            if let Some(pb) = &bar {
                pb.finish_and_clear();
            }
            let rep = rep?;
            emit(cli.json, &rep, || {
                if let Some(c) = &rep.changes {
                    println!(
                        "snapshot {} of {}: {} files, {} changed ({}), {} new, {} deleted; {} written in {:.1} s",
                        rep.snapshot,
                        rep.volume,
                        c.files,
                        c.files_transferred,
                        human(c.transferred_file_bytes),
                        c.files_created,
                        c.files_deleted,
                        human(rep.bytes_written),
                        rep.seconds
                    );
                    if c.vanished > 0 {
                        println!(
                            "note: {} files vanished from the source while it was read",
                            c.vanished
                        );
                    }
                }
                if let Some(p) = &rep.postgres {
                    println!(
                        "PostgreSQL {} backed up online from {} to {}",
                        p.data_directory.display(),
                        p.start_lsn,
                        p.stop_lsn
                    );
                }
                if let Some(e) = &rep.post_hook_error {
                    println!("warning: the --post command failed: {e}");
                }
                if let Some(i) = &rep.image {
                    println!(
                        "snapshot {} of {}: image of {}, {} of {} blocks changed (compared with the {}); {} written in {:.1} s",
                        rep.snapshot,
                        rep.volume,
                        human(i.source_bytes),
                        i.blocks_changed,
                        i.blocks,
                        i.compared_with,
                        human(rep.bytes_written),
                        rep.seconds
                    );
                    if i.changed_during_backup {
                        println!(
                            "warning: the source changed while it was read; snapshot it first \
                             (e.g. LVM) for a consistent image"
                        );
                    }
                }
            });
            Ok(())
        }
        Cmd::Mount { snapshot, dir } => {
            let exe = std::env::current_exe()?;
            let rep = probe.mount(&exe, snapshot, dir);
            if let Some(pb) = &bar {
                pb.finish_and_clear();
            }
            let rep = rep?;
            emit(cli.json, &rep, || {
                println!(
                    "{} mounted read-only at {} in {:.2} s (clone {}, {})",
                    rep.snapshot,
                    rep.dir.display(),
                    rep.seconds,
                    rep.clone_volume,
                    rep.loop_device.display()
                )
            });
            Ok(())
        }
        Cmd::Restore {
            snapshot,
            path,
            to,
            image,
        } => {
            let rep = probe.restore(snapshot, path.as_deref(), to.as_deref(), image.as_deref());
            if let Some(pb) = &bar {
                pb.finish_and_clear();
            }
            let rep = rep?;
            emit(cli.json, &rep, || {
                println!(
                    "restored {} of {} to {} ({}) in {:.1} s",
                    rep.restored,
                    rep.snapshot,
                    rep.to.display(),
                    human(rep.bytes),
                    rep.seconds
                )
            });
            Ok(())
        }
        Cmd::Umount { dir } => {
            let name = probe.umount(dir)?;
            emit(
                cli.json,
                &serde_json::json!({ "unmounted": dir, "attachment": name }),
                || println!("{} unmounted; its clone is deleted", dir.display()),
            );
            Ok(())
        }
        Cmd::Register => {
            let h = probe.register()?;
            emit(cli.json, &h, || {
                println!(
                    "host {} registered as {} ({}, {})",
                    h.name, h.id, h.hostnqn, h.iqn
                )
            });
            Ok(())
        }
        Cmd::Run { heartbeat, poll } => {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = stop.clone();
            // SIGTERM (systemd's stop) and SIGINT end the agent after the job at hand.
            probe.rt.spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                tracing::info!("stopping after the job at hand");
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            let exe = std::env::current_exe()?;
            let opts = maas_probe::agent::AgentOptions {
                heartbeat: std::time::Duration::from_secs((*heartbeat).max(1)),
                poll: std::time::Duration::from_secs((*poll).max(1)),
            };
            probe.run_agent(&exe, &opts, &stop)
        }
        Cmd::Cleanup => {
            let cleaned = probe.clean_stale();
            emit(cli.json, &serde_json::json!({ "cleaned": cleaned }), || {
                if cleaned.is_empty() {
                    println!("nothing left behind");
                } else {
                    println!("cleaned: {}", cleaned.join(", "));
                }
            });
            Ok(())
        }
        Cmd::Identity | Cmd::ServeAttachment { .. } => Ok(()),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MAAS_PROBE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
