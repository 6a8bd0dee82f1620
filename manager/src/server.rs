//! maasd's assembly: open the pool and the catalog, reconcile them, bootstrap the admin
//! token, serve the REST API until SIGTERM/SIGINT, then drain jobs and close the pool.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};

use actix_web::dev::Service;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::Context;
use tracing::Instrument;
use utoipa::OpenApi;

use crate::api;
use crate::auth::{Role, hash_secret, new_secret};
use crate::catalog::{Catalog, TokenRow};
use crate::config::Config;
use crate::error::{ApiError, REQUEST_ID};
use crate::state::{AppState, POOL_ID, new_id, now_ms};

#[derive(OpenApi)]
#[openapi(
    info(title = "MaaS REST API", version = "1", description = "Medium as a Service: volumes, snapshots, clones, exports, jobs."),
    paths(
        api::health, api::list_pools, api::get_pool, api::verify_pool, api::add_device, api::create_pool,
        api::list_volumes, api::create_volume, api::get_volume, api::patch_volume, api::delete_volume,
        api::seal, api::list_snapshots, api::get_snapshot, api::patch_snapshot, api::delete_snapshot, api::clone_snapshot,
        api::list_exports, api::create_export, api::get_export, api::delete_export,
        api::list_jobs, api::get_job, api::list_tokens, api::create_token, api::delete_token,
        crate::archive::create_target, crate::archive::list_targets, crate::archive::get_target,
        crate::archive::delete_target, crate::archive::archive_snapshot,
        crate::archive::evict_snapshot, crate::archive::rehydrate_snapshot,
        crate::archive::list_all_snapshots, crate::archive::import_target,
        crate::archive::verify_copy,
        crate::archive::check_target,
        crate::manifest::put_manifest, crate::manifest::get_manifest,
        crate::files::list_files, crate::files::file_content,
        crate::hosts::register_host, crate::hosts::list_hosts, crate::hosts::get_host, crate::hosts::delete_host,
        crate::hosts::heartbeat, crate::hosts::queue_job, crate::hosts::claim_job, crate::hosts::report_job,
    ),
    components(schemas(
        maas_api::ErrorBody, maas_api::Health, maas_api::AddDevice, maas_api::Pool, maas_api::RamTier, maas_api::PoolReads, maas_api::Device, maas_api::Volume,
        maas_api::CreateVolume, maas_api::UpdateVolume, maas_api::Snapshot, maas_api::UpdateSnapshot,
        maas_api::CreateClone, maas_api::Export, maas_api::CreateExport, maas_api::Chap, maas_api::ChapInfo, maas_api::ExportError,
        maas_api::Job, maas_api::Token, maas_api::CreateToken, maas_api::CreatedToken,
        maas_api::ArchiveTarget, maas_api::CreateArchiveTarget, maas_api::ObjectLock, maas_api::ArchiveSnapshot, maas_api::CheckArchiveTarget,
        maas_api::SnapshotArchive, maas_api::ManifestEntry, maas_api::ManifestInfo, maas_api::SnapshotFileEntry, maas_api::SnapshotFileListing, maas_api::Host, maas_api::RegisterHost, maas_api::Heartbeat, maas_api::HostTask, maas_api::JobReport, maas_api::JobReportError,
    )),
    modifiers(&Security),
)]
#[derive(Debug)]
pub struct ApiDoc;

struct Security;
impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        actix_web::http::StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "no such endpoint",
    ))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1")
            .route("/health", web::get().to(api::health))
            .route("/openapi.json", web::get().to(openapi_json))
            .route("/pools", web::get().to(api::list_pools))
            .route("/pools/{id}", web::get().to(api::get_pool))
            .route("/pools", web::post().to(api::create_pool))
            .route("/pools/{id}/verify", web::post().to(api::verify_pool))
            .route("/pools/{id}/devices", web::post().to(api::add_device))
            .route("/volumes", web::get().to(api::list_volumes))
            .route("/volumes", web::post().to(api::create_volume))
            .route("/volumes/{id}", web::get().to(api::get_volume))
            .route("/volumes/{id}", web::patch().to(api::patch_volume))
            .route("/volumes/{id}", web::delete().to(api::delete_volume))
            .route("/volumes/{id}/snapshots", web::post().to(api::seal))
            .route(
                "/volumes/{id}/snapshots",
                web::get().to(api::list_snapshots),
            )
            .route("/volumes/{id}/exports", web::get().to(api::list_exports))
            .route("/volumes/{id}/exports", web::post().to(api::create_export))
            .route("/snapshots/{id}", web::get().to(api::get_snapshot))
            .route("/snapshots/{id}", web::patch().to(api::patch_snapshot))
            .route("/snapshots/{id}", web::delete().to(api::delete_snapshot))
            .route(
                "/snapshots/{id}/manifest",
                web::put().to(crate::manifest::put_manifest),
            )
            .route(
                "/snapshots/{id}/manifest",
                web::get().to(crate::manifest::get_manifest),
            )
            .route("/hosts", web::post().to(crate::hosts::register_host))
            .route("/hosts", web::get().to(crate::hosts::list_hosts))
            .route("/hosts/{id}", web::get().to(crate::hosts::get_host))
            .route("/hosts/{id}", web::delete().to(crate::hosts::delete_host))
            .route(
                "/hosts/{id}/heartbeat",
                web::post().to(crate::hosts::heartbeat),
            )
            .route("/hosts/{id}/jobs", web::post().to(crate::hosts::queue_job))
            .route(
                "/hosts/{id}/jobs/claim",
                web::post().to(crate::hosts::claim_job),
            )
            .route(
                "/jobs/{id}/report",
                web::post().to(crate::hosts::report_job),
            )
            .route(
                "/snapshots/{id}/files",
                web::get().to(crate::files::list_files),
            )
            .route(
                "/snapshots/{id}/files/content",
                web::get().to(crate::files::file_content),
            )
            .route(
                "/snapshots/{id}/clones",
                web::post().to(api::clone_snapshot),
            )
            .route("/exports/{id}", web::get().to(api::get_export))
            .route("/exports/{id}", web::delete().to(api::delete_export))
            .route(
                "/archive-targets",
                web::get().to(crate::archive::list_targets),
            )
            .route(
                "/archive-targets",
                web::post().to(crate::archive::create_target),
            )
            .route(
                "/archive-targets/{id}",
                web::get().to(crate::archive::get_target),
            )
            .route(
                "/archive-targets/{id}",
                web::delete().to(crate::archive::delete_target),
            )
            .route(
                "/archive-targets/{id}/import",
                web::post().to(crate::archive::import_target),
            )
            .route(
                "/archive-targets/{id}/check",
                web::post().to(crate::archive::check_target),
            )
            .route(
                "/snapshots/{id}/archive",
                web::post().to(crate::archive::archive_snapshot),
            )
            .route(
                "/snapshots/{id}/archives/{target}/verify",
                web::post().to(crate::archive::verify_copy),
            )
            .route(
                "/snapshots/{id}/evict",
                web::post().to(crate::archive::evict_snapshot),
            )
            .route(
                "/snapshots/{id}/rehydrate",
                web::post().to(crate::archive::rehydrate_snapshot),
            )
            .route(
                "/snapshots",
                web::get().to(crate::archive::list_all_snapshots),
            )
            .route("/jobs", web::get().to(api::list_jobs))
            .route("/jobs/{id}", web::get().to(api::get_job))
            .route("/tokens", web::get().to(api::list_tokens))
            .route("/tokens", web::post().to(api::create_token))
            .route("/tokens/{id}", web::delete().to(api::delete_token))
            .default_service(web::to(not_found)),
    );
}

fn query_error(
    e: actix_web::error::QueryPayloadError,
    _: &actix_web::HttpRequest,
) -> actix_web::Error {
    ApiError::new(
        actix_web::http::StatusCode::BAD_REQUEST,
        "INVALID_QUERY",
        e.to_string(),
    )
    .into()
}

fn path_error(e: actix_web::error::PathError, _: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::new(
        actix_web::http::StatusCode::BAD_REQUEST,
        "INVALID_PATH",
        e.to_string(),
    )
    .into()
}

/// Writes DATA_DIR/admin.token (0600) and registers it, unless an admin token exists.
fn bootstrap_admin(cfg: &Config, catalog: &Catalog) -> anyhow::Result<()> {
    let path = cfg.data.dir.join("admin.token");
    let tokens = catalog.tokens()?;
    maas_pool::fsmode::restrict_path(&path, maas_pool::fsmode::PRIVATE_FILE)
        .with_context(|| format!("restricting {}", path.display()))?;
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let h = hash_secret(existing.trim());
        if tokens.iter().any(|t| t.secret_hash == h) {
            return Ok(());
        }
        // A fresh catalog (e.g. moved to PostgreSQL): register the token the operator has.
        if !existing.trim().is_empty() {
            catalog.insert_token(&TokenRow {
                id: new_id("tok"),
                name: format!("bootstrap-admin-{}", now_ms()),
                role: Role::Admin.as_str().into(),
                secret_hash: h,
                created_ms: now_ms(),
                expires_ms: None,
                last_used_ms: None,
            })?;
            tracing::info!(path = %path.display(), "registered the existing admin token with this catalog");
            return Ok(());
        }
    }
    if tokens.iter().any(|t| t.role == "admin") {
        tracing::warn!(path = %path.display(), "admin.token missing; an admin token exists in the catalog, none written");
        return Ok(());
    }
    let secret = new_secret();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    maas_pool::fsmode::restrict_file(&f, &path, maas_pool::fsmode::PRIVATE_FILE)
        .with_context(|| format!("restricting {}", path.display()))?;
    writeln!(f, "{secret}")?;
    f.sync_all()?;
    catalog.insert_token(&TokenRow {
        id: new_id("tok"),
        name: "bootstrap-admin".into(),
        role: Role::Admin.as_str().into(),
        secret_hash: hash_secret(&secret),
        created_ms: now_ms(),
        expires_ms: None,
        last_used_ms: None,
    })?;
    tracing::info!(path = %path.display(), "bootstrap admin token written (mode 0600)");
    Ok(())
}

/// Logs the served certificate's SHA-256 fingerprint (what clients pin) and where it is.
fn log_certificate(tls: &crate::tls::ApiTls) {
    match &tls.source {
        crate::tls::CertSource::Configured { cert } => tracing::info!(
            sha256_fingerprint = %tls.fingerprint,
            cert = %cert.display(),
            "REST API serves HTTPS with the configured certificate"
        ),
        crate::tls::CertSource::Generated { cert, created } => tracing::info!(
            sha256_fingerprint = %tls.fingerprint,
            cert = %cert.display(),
            new = created,
            "REST API serves HTTPS with a self-signed certificate generated by maasd; clients \
             trust it with `maasctl --ca-cert {}` (or curl --cacert) or pin it with \
             `maasctl --fingerprint {}`",
            cert.display(),
            tls.fingerprint
        ),
    }
}

/// How this start treats the pool (command-line only: never a persistent setting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// Create a new pool even though the catalog names one (or describes objects) that is not
    /// there. Never replaces a pool that exists.
    pub create_pool: bool,
}

/// A fixed RAM tier size, or the pool's default for an "auto" one (used only if the machine's
/// memory cannot be read).
fn fixed_or_default(s: crate::config::RamSize) -> usize {
    s.fixed().map_or(256 << 20, |b| b as usize)
}

/// The self-sizing RAM tier for the parts configured "auto" (None if every size is fixed).
/// `MAAS_TEST_MEMINFO` / `MAAS_TEST_PRESSURE` point the watcher at other files than /proc's:
/// for tests only, and loud about it (the pool logs it at warn).
fn ram_tier(p: &crate::config::PoolConfig) -> Option<maas_pool::AutoRamTier> {
    let parts = maas_pool::AutoParts {
        chunk_cache: p.cache_bytes.fixed().is_none(),
        log_cache: p.log_cache_bytes.fixed().is_none(),
        write_buffer: p.write_buffer_bytes.fixed().is_none(),
    };
    if !(parts.chunk_cache || parts.log_cache || parts.write_buffer) {
        tracing::info!(
            cache_bytes = ?p.cache_bytes,
            log_cache_bytes = ?p.log_cache_bytes,
            write_buffer_bytes = ?p.write_buffer_bytes,
            "RAM tier: every size fixed by configuration"
        );
        return None;
    }
    let mut auto = maas_pool::AutoRamTier {
        parts,
        ..Default::default()
    };
    if let Some(f) = std::env::var_os("MAAS_TEST_MEMINFO") {
        auto.meminfo_path = f.into();
        // The fake figures are the whole machine: no cgroup limit from the real one.
        auto.cgroup = maas_pool::ramtier::CgroupPaths {
            self_cgroup: "/nonexistent/maas-test-cgroup".into(),
            root: "/nonexistent".into(),
        };
    }
    if let Some(f) = std::env::var_os("MAAS_TEST_PRESSURE") {
        auto.pressure_path = f.into();
    }
    Some(auto)
}

pub fn open_state(cfg: Config, start: StartOptions) -> anyhow::Result<AppState> {
    maas_pool::fsmode::private_dir(&cfg.data.dir)
        .with_context(|| format!("creating {}", cfg.data.dir.display()))?;
    let url = cfg.catalog_url();
    let catalog = Arc::new(Catalog::open(&url)?);
    tracing::info!(catalog = %crate::catalog::redact(&url), backend = catalog.backend(), "catalog open");
    let pool_dir = cfg.data.dir.join("pool");
    let opts = maas_pool::OpenOptions {
        cache_bytes: fixed_or_default(cfg.pool.cache_bytes),
        log_cache_bytes: fixed_or_default(cfg.pool.log_cache_bytes),
        write_buffer_bytes: fixed_or_default(cfg.pool.write_buffer_bytes),
        write_back_delay: std::time::Duration::from_millis(cfg.pool.write_back_delay_ms),
        wal_segment_bytes: cfg.pool.wal_segment_bytes,
        wal_fold_threshold: cfg.pool.wal_fold_threshold,
        background: true,
        ram_tier: ram_tier(&cfg.pool),
    };
    let mut create = maas_pool::CreateOptions {
        chunk_size: cfg.pool.chunk_size,
        ..Default::default()
    };
    if cfg.pool.device_size > 0 {
        create.devices.push(maas_pool::DeviceSpec {
            path: "data-0.dev".into(),
            tier: maas_pool::Tier::Ssd,
            size: cfg.pool.device_size,
        });
    }
    // The catalog is bound to its pool's UUID: a missing or different pool stops the start
    // here, before anything (reconciliation above all) could change the catalog.
    let (pool, binding) = crate::identity::open_bound_pool(
        &catalog,
        POOL_ID,
        &pool_dir,
        create,
        opts,
        start.create_pool,
    )?;
    bootstrap_admin(&cfg, &catalog)?;
    crate::reconcile::reconcile(&catalog, &pool, &binding)
        .map_err(|e| anyhow::anyhow!("reconcile: {e}"))?;
    let advertise = |a: &str| Some(a.to_string()).filter(|a| !a.is_empty());
    let engine = crate::engine::Engine::new(
        advertise(&cfg.iscsi.advertise),
        advertise(&cfg.nvme_tcp.advertise),
    );
    let vault = crate::secrets::Vault::load_or_create(&cfg.catalog_key_file())?;
    engine.restore(&pool, &catalog, &vault);
    let state = AppState {
        cfg,
        pool,
        catalog,
        tokens: RwLock::new(HashMap::new()),
        running_jobs: AtomicUsize::new(0),
        engine,
        vault,
        token_use: std::sync::Mutex::new(HashMap::new()),
        archive: maas_s3::Archive::new(2).map_err(|e| anyhow::anyhow!("{e}"))?,
        moving_snapshots: std::sync::Mutex::new(Default::default()),
        target_locks: std::sync::Mutex::new(Default::default()),
    };
    let interrupted = crate::jobs::fail_interrupted(&state).map_err(|e| anyhow::anyhow!("{e}"))?;
    if interrupted > 0 {
        tracing::warn!(
            jobs = interrupted,
            "jobs interrupted by the previous stop were marked failed"
        );
    }
    state.reload_tokens().map_err(|e| anyhow::anyhow!("{e}"))?;
    // Lazily mounted snapshots read their chunks from the archive targets.
    if let Err(e) = crate::archive::connect_targets(&state) {
        tracing::warn!(error = %e.message, "archive targets not connected: reads of chunks only in an archive will fail until restart");
    }
    Ok(state)
}

pub async fn serve(cfg: Config, start: StartOptions) -> anyhow::Result<()> {
    let listen = cfg.api.listen.clone();
    let workers = cfg.api.workers as usize;
    let state = web::Data::new(open_state(cfg, start)?);
    // The block front-ends accept beside the REST API and serve their connections on their own
    // threads (maas_engine::io_runtimes); a manager restart is a process restart, so data
    // sessions and the API share its lifetime here.
    if !maas_engine::io_runtimes::set_threads(state.cfg.engine.io_threads as usize) {
        tracing::warn!("engine.io_threads: the block targets' threads were already running");
    }
    let iscsi_listen = state.cfg.iscsi.listen.clone();
    let iscsi = if iscsi_listen.is_empty() {
        tracing::info!("iSCSI target disabled (iscsi.listen is empty)");
        None
    } else {
        Some(
            maas_engine::iscsi::IscsiServer::bind_with(
                &iscsi_listen,
                state.engine.iscsi.clone(),
                state.cfg.iscsi.limits(),
            )
            .await
            .with_context(|| format!("binding the iSCSI target to {iscsi_listen}"))?,
        )
    };
    let nvme_listen = state.cfg.nvme_tcp.listen.clone();
    let nvme = if nvme_listen.is_empty() {
        tracing::info!("NVMe/TCP target disabled (nvme_tcp.listen is empty)");
        None
    } else {
        Some(
            maas_engine::nvme::NvmeTcpServer::bind_with(
                &nvme_listen,
                state.engine.nvme.clone(),
                maas_engine::nvme::QueueConfig::default(),
                state.cfg.nvme_tcp.limits(),
            )
            .await
            .with_context(|| format!("binding the NVMe/TCP target to {nvme_listen}"))?,
        )
    };
    match crate::archive::resume_pushes(&state).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(pushes = n, "interrupted archive pushes resumed"),
        Err(e) => tracing::warn!(error = %e.message, "cannot resume interrupted archive pushes"),
    }
    let st = state.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(st.clone())
            .app_data(web::QueryConfig::default().error_handler(query_error))
            .app_data(web::PathConfig::default().error_handler(path_error))
            .app_data(web::PayloadConfig::default().limit(1 << 20))
            .wrap_fn(|req, srv| {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.path());
                let fut = srv.call(req);
                let id2 = id.clone();
                REQUEST_ID.scope(
                    id,
                    async move {
                        let mut res = fut.await?;
                        tracing::debug!(status = res.status().as_u16(), "served");
                        if let Ok(v) = HeaderValue::from_str(&id2) {
                            res.headers_mut().insert(HeaderName::from_static("x-request-id"), v);
                        }
                        Ok(res)
                    }
                    .instrument(span),
                )
            })
            .configure(routes)
    })
    .shutdown_timeout(30)
    // actix's 3 s for a TLS handshake is tight for a loaded two-core node: a handshake that
    // waits on a busy core sees its connection closed without an answer (the API fuzz saw
    // that, or the keep-alive race, once in CI). Every such timeout also bounds a graceful
    // stop, which waits for open connections (a silent one as long as its handshake may
    // take): keep-alive and a request's head stay at actix's 5 s (75 s and 20 s were tried
    // and made every restart sit out the 30 s `shutdown_timeout`).
    .tls_handshake_timeout(std::time::Duration::from_secs(5));
    server = if state.cfg.api.tls {
        let tls = crate::tls::load_or_generate(&state.cfg).context("TLS for the REST API")?;
        log_certificate(&tls);
        server
            .bind_rustls_0_23(&listen, tls.config)
            .with_context(|| format!("binding the REST API to {listen}"))?
    } else {
        match crate::tls::plain_http_warning(&listen) {
            Some(w) => tracing::warn!("{w}"),
            None => {
                tracing::info!("the REST API serves plain HTTP (api.tls = false), on loopback only")
            }
        }
        server
            .bind(&listen)
            .with_context(|| format!("binding the REST API to {listen}"))?
    };
    if workers > 0 {
        server = server.workers(workers);
    }
    let addrs = server.addrs();
    let scheme = if state.cfg.api.tls { "https" } else { "http" };
    tracing::info!(listen = ?addrs, scheme, "maasd serving REST API at /api/v1");
    let flusher = {
        let st = state.clone();
        actix_web::rt::spawn(async move {
            let mut tick = tokio::time::interval(crate::state::TOKEN_USE_FLUSH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let st = st.clone();
                let _ = web::block(move || st.flush_token_use()).await;
            }
        })
    };
    server.run().await?;
    flusher.abort();
    {
        let st = state.clone();
        let _ = web::block(move || st.flush_token_use()).await;
    }
    if let Some(t) = iscsi {
        t.shutdown().await;
    }
    if let Some(t) = nvme {
        t.shutdown().await;
    }
    tracing::info!("REST API stopped; draining jobs");
    crate::jobs::drain(&state, std::time::Duration::from_secs(60)).await;
    state.pool.close().context("closing the pool")?;
    tracing::info!("maasd stopped cleanly");
    Ok(())
}
