//! Server state shared by handlers and jobs, and conversions from catalog rows to API types.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};

use actix_web::web;
use maas_api as api;

use crate::auth::{Caller, Role};
use crate::catalog::{
    ArchiveTargetRow, Catalog, ExportRow, JobRow, SnapshotArchiveRow, SnapshotRow, TokenRow,
    VolumeRow,
};
use crate::config::Config;
use crate::error::{ApiError, ApiResult};

pub const POOL_ID: &str = "default";

/// How often the last use of tokens goes from memory to the catalog (also at a clean stop):
/// requests never write the catalog, and a crash loses at most this much of the record.
pub const TOKEN_USE_FLUSH: std::time::Duration = std::time::Duration::from_secs(60);

pub struct AppState {
    pub cfg: Config,
    pub pool: maas_pool::Pool,
    pub catalog: Arc<Catalog>,
    /// secret hash -> caller
    pub tokens: RwLock<HashMap<String, Caller>>,
    pub running_jobs: AtomicUsize,
    /// What the media engine exports (targets are driven from catalog export rows).
    pub engine: crate::engine::Engine,
    /// The key that seals secrets in the catalog.
    pub vault: crate::secrets::Vault,
    /// Token id -> latest use (ms) not yet written to the catalog ([`TOKEN_USE_FLUSH`]).
    pub token_use: Mutex<HashMap<String, i64>>,
    /// The archive tier's runtime (S3 requests).
    pub archive: maas_s3::Archive,
    /// Snapshots an evict or rehydrate job is moving: one at a time per snapshot.
    pub moving_snapshots: Mutex<std::collections::HashSet<String>>,
    /// Per archive target: pushes hold it shared, space reclamation exclusive (a push must not
    /// count on an object in a pack being deleted).
    pub target_locks: Mutex<HashMap<String, Arc<RwLock<()>>>>,
}

impl AppState {
    pub fn target_lock(&self, target: &str) -> Arc<RwLock<()>> {
        let mut m = match self.target_locks.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(target.to_string()).or_default().clone()
    }
}

/// A snapshot claimed by an evict or rehydrate job; released when dropped.
#[derive(Debug)]
pub struct MovingSnapshot {
    st: web::Data<AppState>,
    id: String,
}

impl AppState {
    /// Claims `id` for a job that moves its data, or None if one does already.
    pub fn claim_moving(st: &web::Data<AppState>, id: &str) -> Option<MovingSnapshot> {
        let mut m = match st.moving_snapshots.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.insert(id.to_string()).then(|| MovingSnapshot {
            st: st.clone(),
            id: id.to_string(),
        })
    }
}

impl Drop for MovingSnapshot {
    fn drop(&mut self) {
        let mut m = match self.st.moving_snapshots.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.remove(&self.id);
    }
}

/// Token hashes stay out of logs: only their number is shown.
impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tokens = self.tokens.read().map(|t| t.len()).unwrap_or(0);
        f.debug_struct("AppState")
            .field("cfg", &self.cfg)
            .field("pool", &self.pool)
            .field("catalog", &self.catalog)
            .field("tokens", &format_args!("<{tokens} redacted>"))
            .field("running_jobs", &self.running_jobs)
            .field("engine", &self.engine)
            .field("vault", &self.vault)
            .finish()
    }
}

impl AppState {
    pub fn reload_tokens(&self) -> ApiResult<()> {
        let rows = self.catalog.tokens()?;
        let map = rows
            .into_iter()
            .filter_map(|t| {
                Role::parse(&t.role).map(|role| {
                    (
                        t.secret_hash,
                        Caller {
                            token_id: t.id,
                            name: t.name,
                            role,
                            expires_ms: t.expires_ms,
                        },
                    )
                })
            })
            .collect();
        if let Ok(mut w) = self.tokens.write() {
            *w = map;
        }
        Ok(())
    }
}

impl AppState {
    /// Records a request made with a token, in memory only.
    pub fn note_token_use(&self, token_id: &str, ms: i64) {
        let mut m = match self.token_use.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        match m.get_mut(token_id) {
            Some(v) => *v = (*v).max(ms),
            None => {
                m.insert(token_id.to_string(), ms);
            }
        }
    }

    /// The latest use of a token not yet in the catalog.
    pub fn pending_token_use(&self, token_id: &str) -> Option<i64> {
        let m = match self.token_use.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.get(token_id).copied()
    }

    /// Writes the uses recorded in memory to the catalog (one transaction; at most one write
    /// per token per [`TOKEN_USE_FLUSH`]). On failure they stay in memory for the next flush.
    pub fn flush_token_use(&self) -> ApiResult<()> {
        let uses: Vec<(String, i64)> = {
            let mut m = match self.token_use.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            m.drain().collect()
        };
        if uses.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.catalog.record_token_use(&uses) {
            tracing::warn!(error = %e, "recording the last use of tokens failed; retried at the next flush");
            for (id, ms) in uses {
                self.note_token_use(&id, ms);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// A token as the API shows it, with its latest use (the catalog's or a newer one in memory).
    pub fn token_out(&self, r: &TokenRow) -> api::Token {
        let mut t = token_out(r);
        let last = match (r.last_used_ms, self.pending_token_use(&r.id)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        t.last_used_at = last.map(rfc3339);
        t
    }
}

/// Runs blocking work (catalog, pool) off the async workers.
pub async fn blocking<T: Send + 'static>(
    state: &web::Data<AppState>,
    f: impl FnOnce(&AppState) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let st = state.clone();
    let id = crate::error::current_request_id();
    // The request's span follows the work onto the blocking thread, so its logs carry the id.
    let span = tracing::Span::current();
    web::block(move || {
        let _e = span.enter();
        crate::error::REQUEST_ID.sync_scope(id, || f(&st))
    })
    .await
    .map_err(|e| ApiError::internal(format!("worker failed: {e}")))?
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Time-ordered opaque ids: `prefix-<12 hex ms><8 hex random>`.
pub fn new_id(prefix: &str) -> String {
    let r: u32 = rand::random();
    format!(
        "{prefix}-{:012x}{r:08x}",
        now_ms() as u64 & 0xffff_ffff_ffff
    )
}

pub fn labels_of(s: &str) -> BTreeMap<String, String> {
    serde_json::from_str(s).unwrap_or_default()
}

pub fn volume_out(r: &VolumeRow) -> api::Volume {
    api::Volume {
        id: r.id.clone(),
        name: r.name.clone(),
        size: r.size as u64,
        block_size: r.block_size as u32,
        pool: r.pool.clone(),
        labels: labels_of(&r.labels),
        origin_snapshot: r.origin_snapshot.clone(),
        created_at: rfc3339(r.created_ms),
        unchanged_since: None,
    }
}

pub fn snapshot_out(r: &SnapshotRow) -> api::Snapshot {
    api::Snapshot {
        id: r.id.clone(),
        volume: r.volume.clone(),
        volume_name: r.volume_name.clone(),
        size: r.size as u64,
        block_size: r.block_size as u32,
        created_at: rfc3339(r.created_ms),
        starred: r.starred != 0,
        locked_until: r.locked_until_ms.map(rfc3339),
        location: r.location.clone(),
        archives: Vec::new(),
    }
}

/// A snapshot with where its copies are.
pub fn snapshot_with_archives(r: &SnapshotRow, archives: &[SnapshotArchiveRow]) -> api::Snapshot {
    let mut s = snapshot_out(r);
    s.archives = archives.iter().map(snapshot_archive_out).collect();
    s
}

pub fn snapshot_archive_out(r: &SnapshotArchiveRow) -> api::SnapshotArchive {
    api::SnapshotArchive {
        target: r.target.clone(),
        state: r.state.clone(),
        archived_at: r.archived_ms.map(rfc3339),
        bytes: r.bytes.max(0) as u64,
        objects: r.objects.max(0) as u64,
        job: r.job.clone(),
    }
}

pub fn archive_target_out(r: &ArchiveTargetRow) -> api::ArchiveTarget {
    api::ArchiveTarget {
        id: r.id.clone(),
        name: r.name.clone(),
        endpoint: r.endpoint.clone(),
        region: r.region.clone(),
        bucket: r.bucket.clone(),
        prefix: r.prefix.clone(),
        access_key_id: r.access_key_id.clone(),
        path_style: r.path_style != 0,
        storage_class: r.storage_class.clone(),
        object_lock: match (&r.object_lock_mode, r.object_lock_days) {
            (Some(mode), Some(days)) => Some(api::ObjectLock {
                mode: mode.clone(),
                days: days.clamp(0, u32::MAX as i64) as u32,
            }),
            _ => None,
        },
        encryption: r.encryption.clone(),
        key_id: r.key_id.clone(),
        recovery_key: None,
        created_at: rfc3339(r.created_ms),
    }
}

pub fn export_out(r: &ExportRow, st: &AppState) -> api::Export {
    let cfg = &st.cfg;
    let error = st.engine.failure(&r.id);
    let (portal, lun, nsid) = match r.protocol.as_str() {
        "nvme-tcp" => (
            crate::config::advertised(&cfg.nvme_tcp.portal()),
            None,
            Some(1),
        ),
        _ => (
            crate::config::advertised(&cfg.iscsi.portal()),
            Some(0),
            None,
        ),
    };
    api::Export {
        id: r.id.clone(),
        volume: r.volume.clone(),
        protocol: r.protocol.clone(),
        initiators: serde_json::from_str(&r.initiators).unwrap_or_default(),
        chap: r
            .chap
            .as_deref()
            .filter(|_| r.protocol != "nvme-tcp")
            .map(|c| {
                crate::secrets::chap_users(c).unwrap_or_else(|| api::ChapInfo {
                    user: String::new(),
                    mutual_user: None,
                })
            }),
        // NVMe/TCP exports keep their DH-HMAC-CHAP secrets where iSCSI exports keep CHAP's.
        dhchap: r
            .chap
            .as_deref()
            .filter(|_| r.protocol == "nvme-tcp")
            .map(|c| {
                crate::secrets::dhchap_info(c).unwrap_or(api::DhChapInfo {
                    ctrl_secret: false,
                    hash: None,
                    dhgroup: None,
                })
            }),
        portal,
        target: r.target.clone(),
        lun,
        nsid,
        read_only: r.read_only != 0,
        created_at: rfc3339(r.created_ms),
        state: if error.is_some() { "failed" } else { "live" }.into(),
        error,
    }
}

pub fn job_out(r: &JobRow) -> api::Job {
    api::Job {
        id: r.id.clone(),
        kind: r.kind.clone(),
        state: r.state.clone(),
        progress: r.progress_milli as f64 / 1000.0,
        error: r
            .error
            .as_deref()
            .and_then(|e| serde_json::from_str(e).ok()),
        result: r
            .result
            .as_deref()
            .and_then(|e| serde_json::from_str(e).ok()),
        target: r.target.clone(),
        progress_detail: r
            .progress_detail
            .as_deref()
            .and_then(|e| serde_json::from_str(e).ok()),
        created_at: rfc3339(r.created_ms),
        updated_at: rfc3339(r.updated_ms),
        host: r.host.clone(),
        params: r
            .params
            .as_deref()
            .and_then(|e| serde_json::from_str(e).ok()),
    }
}

pub fn token_out(r: &TokenRow) -> api::Token {
    api::Token {
        id: r.id.clone(),
        name: r.name.clone(),
        role: r.role.clone(),
        created_at: rfc3339(r.created_ms),
        expires_at: r.expires_ms.map(rfc3339),
        last_used_at: r.last_used_ms.map(rfc3339),
    }
}
