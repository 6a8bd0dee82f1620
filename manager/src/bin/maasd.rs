//! maasd: the all-in-one MaaS server (manager, media engine and pool in one process).
//! With no arguments it runs on embedded defaults: data in ./maas-data, SQLite catalog,
//! a file-backed pool created on first start, REST on 127.0.0.1:8080. The catalog records the
//! pool's UUID: a later start without that pool (a disk not mounted) or with another one is
//! refused, unless `--create-pool` asks for a new pool.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use maas_manager::config::Config;

#[derive(Parser)]
#[command(
    name = "maasd",
    version,
    about = "MaaS server: volumes as disks, snapshots as backups"
)]
struct Args {
    /// TOML configuration file (see --print-default-config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (overrides data.dir and MAAS_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// REST listen address (overrides api.listen and MAAS_API_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// Print the annotated default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Create a new, empty pool although the catalog names a pool (or holds volumes,
    /// snapshots or exports) that is not in DATA_DIR/pool; reconciliation then drops the
    /// catalog's objects. Without it such a start is refused (a disk that is not mounted must
    /// not erase the catalog). It never replaces a pool that is there, so it is refused once
    /// the pool exists: a flag for one start, deliberately not a configuration setting.
    #[arg(long)]
    create_pool: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", Config::annotated_defaults());
        return Ok(());
    }
    let mut cfg = Config::load(args.config.as_deref(), |k| std::env::var(k).ok())?;
    if let Some(d) = args.data_dir {
        cfg.data.dir = d;
    }
    if let Some(l) = args.listen {
        cfg.api.listen = l;
    }
    cfg.validate()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        sub.json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        sub.init();
    }
    raise_open_files_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let sys = actix_web::rt::System::with_tokio_rt(|| rt);
    let start = maas_manager::server::StartOptions {
        create_pool: args.create_pool,
    };
    sys.block_on(maas_manager::server::serve(cfg, start))
}

/// Every connection takes a file descriptor: the soft limit on open files goes up to the hard
/// one (as systemd's default soft limit of 1024 is meant to be raised by servers that need it),
/// so that the targets' connection caps, not the descriptor limit, decide what is refused.
fn raise_open_files_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2)/setrlimit(2) on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 || r.rlim_cur >= r.rlim_max {
            return;
        }
        let from = r.rlim_cur;
        r.rlim_cur = r.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) == 0 {
            tracing::debug!(from, to = r.rlim_cur, "raised the open files limit");
        }
    }
}
