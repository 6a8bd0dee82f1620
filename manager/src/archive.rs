//! REST API of the archive tier: archive targets (S3 buckets, checked before they are stored,
//! secrets sealed and never returned) and pushing snapshots to them as jobs with progress.
//! The bytes move in maas-s3; this module keeps the intent (targets, copies, jobs) in the
//! catalog.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use maas_api as api;
use maas_pool::SnapshotId;
use maas_s3::bucket::{LockMode, ObjectLockRule, normalise_prefix, path_style_default};
use maas_s3::crypt::{ArchiveKey, Cipher};
use maas_s3::{Bucket, TargetConfig};
use std::sync::Arc;

use crate::api::{Body, Page, accepted, page, snapshot_row, validate_name};
use crate::auth::{Caller, Role};
use crate::catalog::{ArchiveTargetRow, SnapshotArchiveRow, SnapshotRow};
use crate::error::{ApiError, ApiResult};
use crate::jobs;
use crate::state::{AppState, archive_target_out, blocking, new_id, now_ms, rfc3339};

type State = web::Data<AppState>;

const DEFAULT_REGION: &str = "us-east-1";

fn secret_context(target_id: &str) -> Vec<u8> {
    format!("archive-target:{target_id}:secret_access_key").into_bytes()
}

fn archive_key_context(target_id: &str) -> Vec<u8> {
    format!("archive-target:{target_id}:archive_key").into_bytes()
}

/// The cipher of a stored encrypted target (its key opened from the vault).
fn cipher_for(st: &AppState, r: &ArchiveTargetRow) -> ApiResult<Option<Arc<Cipher>>> {
    let Some(sealed) = &r.archive_key else {
        return Ok(None);
    };
    let raw = st
        .vault
        .open(&archive_key_context(&r.id), sealed)
        .map_err(|e| ApiError::internal(format!("archive target {} key: {e}", r.id)))?;
    let key: [u8; 32] = raw[..]
        .try_into()
        .map_err(|_| ApiError::internal(format!("archive target {} key length", r.id)))?;
    let key = ArchiveKey::from_bytes(key);
    if r.key_id.as_deref() != Some(key.key_id().as_str()) {
        return Err(ApiError::internal(format!(
            "archive target {}: its key does not match its key id",
            r.id
        )));
    }
    Ok(Some(Arc::new(Cipher::new(&key))))
}

/// The bucket client of a stored target (its secret opened from the vault).
pub fn bucket_for(st: &AppState, r: &ArchiveTargetRow) -> ApiResult<Bucket> {
    let secret = st
        .vault
        .open(&secret_context(&r.id), &r.secret)
        .map_err(|e| ApiError::internal(format!("archive target {}: {e}", r.id)))?;
    let secret = String::from_utf8(secret.to_vec())
        .map_err(|_| ApiError::internal("archive target secret is not UTF-8"))?;
    let object_lock = match (&r.object_lock_mode, r.object_lock_days) {
        (Some(m), Some(days)) => Some(ObjectLockRule {
            mode: LockMode::parse(m)
                .ok_or_else(|| ApiError::internal(format!("object lock mode {m:?}")))?,
            days: days.clamp(1, 36_500) as u32,
        }),
        _ => None,
    };
    Ok(Bucket::new(TargetConfig {
        endpoint: r.endpoint.clone(),
        region: r.region.clone(),
        bucket: r.bucket.clone(),
        prefix: r.prefix.clone(),
        access_key_id: r.access_key_id.clone(),
        secret_access_key: secret,
        path_style: r.path_style != 0,
        storage_class: r.storage_class.clone(),
        object_lock,
        cipher: cipher_for(st, r)?,
    })?)
}

/// Lets the pool read, on demand, chunks that live only in this target (lazily mounted
/// snapshots): at start-up for every target, and for each new one.
pub fn connect_target(st: &AppState, r: &ArchiveTargetRow) -> ApiResult<()> {
    let fetch = maas_s3::lazy::TargetFetch::new(&st.archive, bucket_for(st, r)?);
    st.pool
        .set_remote_fetch(&r.id, std::sync::Arc::new(fetch))?;
    Ok(())
}

/// [`connect_target`] for every stored target.
pub fn connect_targets(st: &AppState) -> ApiResult<usize> {
    let mut n = 0;
    let mut cursor: Option<String> = None;
    loop {
        let rows = st.catalog.archive_targets(cursor.as_deref(), 1000)?;
        let Some(last) = rows.last() else { break };
        cursor = Some(last.id.clone());
        for r in &rows {
            connect_target(st, r)?;
            n += 1;
        }
        if rows.len() < 1000 {
            break;
        }
    }
    Ok(n)
}

/// Mounts an archive-only snapshot lazily in the pool (its index only; chunks come from the
/// archive as they are read) and records it local. The caller holds the snapshot's claim.
pub fn mount_lazily(st: &AppState, srow: &SnapshotRow) -> ApiResult<SnapshotRow> {
    let (_, trow) = archived_copy(st, &srow.id)?;
    // Held like a push: space reclamation in the target (exclusive) then sees the chunks this
    // mount references and keeps their packs.
    let lock = st.target_lock(&trow.id);
    let _shared = read_lock(&lock);
    let bucket = bucket_for(st, &trow)?;
    if source_keys(st, &bucket, srow)?.is_some() {
        return Err(ApiError::conflict(
            "SNAPSHOT_FOREIGN",
            format!(
                "snapshot {} was archived by another pool: its chunks must be re-keyed, which needs all of them; rehydrate it first (POST /api/v1/snapshots/{}/rehydrate)",
                srow.id, srow.id
            ),
        ));
    }
    let info = maas_s3::lazy::mount_snapshot(&st.archive, &st.pool, &bucket, &trow.id, &srow.id)?;
    let mut row = srow.clone();
    row.location = "local".into();
    row.pool_snapshot = info.id.0 as i64;
    st.catalog.update_snapshot(&row)?;
    tracing::info!(snapshot = %srow.id, pool_snapshot = %info.id, target_id = %trow.id, "snapshot mounted from the archive; its chunks are fetched as they are read");
    Ok(row)
}

/// Held by whatever reads or adds to a target's packs (push, lazy mount, evict's verify,
/// rehydrate, verify, import): space reclamation, which deletes and repacks packs, holds the
/// lock exclusively, so nobody reads a pack it is deleting.
fn read_lock(lock: &std::sync::RwLock<()>) -> std::sync::RwLockReadGuard<'_, ()> {
    match lock.read() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn write_lock(lock: &std::sync::RwLock<()>) -> std::sync::RwLockWriteGuard<'_, ()> {
    match lock.write() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn target_row(st: &AppState, id: &str) -> ApiResult<ArchiveTargetRow> {
    st.catalog
        .archive_target(id)?
        .ok_or_else(|| ApiError::not_found("ARCHIVE_TARGET_NOT_FOUND", "archive target", id))
}

fn validate_lock(l: &api::ObjectLock) -> ApiResult<ObjectLockRule> {
    let mode = LockMode::parse(&l.mode).ok_or_else(|| {
        ApiError::invalid(
            "object_lock.mode",
            "object_lock.mode must be GOVERNANCE or COMPLIANCE",
        )
    })?;
    if !(1..=36_500).contains(&l.days) {
        return Err(ApiError::invalid(
            "object_lock.days",
            "object_lock.days must be between 1 and 36500",
        ));
    }
    Ok(ObjectLockRule { mode, days: l.days })
}

#[utoipa::path(post, path = "/api/v1/archive-targets", tag = "archive", request_body = api::CreateArchiveTarget, security(("bearer" = [])),
    responses((status = 201, body = api::ArchiveTarget), (status = 400, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn create_target(
    state: State,
    c: Caller,
    body: Body<api::CreateArchiveTarget>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let b = body.0;
    validate_name("name", &b.name)?;
    let lock = b.object_lock.as_ref().map(validate_lock).transpose()?;
    // The archive key: given back (a re-import, a shared prefix), or new and shown once.
    let (key, generated) = match (b.encryption.as_deref(), &b.recovery_key) {
        (None | Some("none"), None) => (None, false),
        (Some("none"), Some(_)) => {
            return Err(ApiError::invalid(
                "recovery_key",
                "a recovery_key belongs to an encrypted target: drop it or ask for encryption \"xchacha20-poly1305\"",
            ));
        }
        (None | Some(maas_s3::crypt::ALGORITHM), Some(rk)) => (
            Some(
                ArchiveKey::from_recovery_key(&rk.0)
                    .map_err(|e| ApiError::invalid("recovery_key", e.to_string()))?,
            ),
            false,
        ),
        (Some(maas_s3::crypt::ALGORITHM), None) => (Some(ArchiveKey::generate()), true),
        (Some(other), _) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "ARCHIVE_ENCRYPTION_UNSUPPORTED",
                format!(
                    "encryption {other:?} is not supported: \"none\" or \"{}\"",
                    maas_s3::crypt::ALGORITHM
                ),
            ));
        }
    };
    let cipher = key.as_ref().map(|k| Arc::new(Cipher::new(k)));
    if let Some(sc) = &b.storage_class
        && (sc.is_empty()
            || sc.len() > 64
            || !sc.bytes().all(|c| c.is_ascii_uppercase() || c == b'_'))
    {
        return Err(ApiError::invalid(
            "storage_class",
            "storage_class must be an S3 storage class such as STANDARD_IA",
        ));
    }
    let cfg = TargetConfig {
        endpoint: b.endpoint.trim().trim_end_matches('/').to_string(),
        region: b.region.clone().unwrap_or_else(|| DEFAULT_REGION.into()),
        bucket: b.bucket.clone(),
        prefix: normalise_prefix(b.prefix.as_deref().unwrap_or("")),
        access_key_id: b.access_key_id.clone(),
        secret_access_key: b.secret_access_key.clone(),
        path_style: b
            .path_style
            .unwrap_or_else(|| path_style_default(b.endpoint.trim())),
        storage_class: b.storage_class.clone(),
        object_lock: lock,
        cipher,
    };
    let row = blocking(&state, move |st| {
        if st.catalog.archive_target_by_name(&b.name)?.is_some() {
            return Err(ApiError::conflict(
                "ARCHIVE_TARGET_EXISTS",
                format!("an archive target named {:?} exists", b.name),
            ));
        }
        // A user is waiting: no retries beyond the SDK's own few.
        let bucket = Bucket::new(cfg.clone())?.with_retry_for(Duration::ZERO);
        let pool_uuid = st.pool.pool_id().to_string();
        let check = st
            .archive
            .block_on(maas_s3::target::check(&bucket, &pool_uuid, lock.is_some()))
            .map_err(|e| match e {
                // A key made for this request cannot be the archive's: what is missing is the
                // archive's own.
                maas_s3::ArchiveError::KeyMismatch { .. } if generated => {
                    maas_s3::ArchiveError::KeyRequired {
                        detail: "the prefix already holds an encrypted MaaS archive: give its recovery key (\"recovery_key\") instead of asking for a new one".into(),
                    }
                }
                other => other,
            })
            .map_err(|e| {
                tracing::warn!(endpoint = %cfg.endpoint, bucket = %cfg.bucket, code = e.code(), error = %e, "archive target refused");
                // Whatever the endpoint answered, the target cannot be stored: a 4xx.
                let mut a = ApiError::from(e);
                if a.status.is_server_error() && a.code != "INTERNAL" {
                    a.status = StatusCode::BAD_REQUEST;
                }
                a
            })?;
        let id = new_id("arch");
        let secret = st
            .vault
            .seal(&secret_context(&id), cfg.secret_access_key.as_bytes())
            .map_err(|e| ApiError::internal(format!("sealing the secret: {e}")))?;
        let archive_key = key
            .as_ref()
            .map(|k| st.vault.seal(&archive_key_context(&id), k.as_bytes()))
            .transpose()
            .map_err(|e| ApiError::internal(format!("sealing the archive key: {e}")))?;
        let row = ArchiveTargetRow {
            id,
            name: b.name.clone(),
            endpoint: cfg.endpoint.clone(),
            region: cfg.region.clone(),
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            access_key_id: cfg.access_key_id.clone(),
            secret,
            path_style: cfg.path_style as i64,
            storage_class: cfg.storage_class.clone(),
            object_lock_mode: b.object_lock.as_ref().map(|l| l.mode.clone()),
            object_lock_days: b.object_lock.as_ref().map(|l| i64::from(l.days)),
            encryption: if key.is_some() {
                maas_s3::crypt::ALGORITHM.into()
            } else {
                "none".into()
            },
            created_ms: now_ms(),
            archive_key,
            key_id: key.as_ref().map(|k| k.key_id()),
        };
        st.catalog.insert_archive_target(&row)?;
        // The target is stored: its answer (and the recovery key in it) must reach the user.
        if let Err(e) = connect_target(st, &row) {
            tracing::error!(target_id = %row.id, error = %e, "archive target stored but not connected for reads from the archive; restart maasd");
        }
        tracing::info!(target_id = %row.id, name = %row.name, endpoint = %row.endpoint, bucket = %row.bucket, prefix = %row.prefix, existing_archive = check.existing_archive, encryption = %row.encryption, key_id = ?row.key_id, "archive target created");
        // The only time the key leaves maasd.
        let recovery = key
            .filter(|_| generated)
            .map(|k| api::RecoveryKey(k.recovery_key()));
        Ok((row, recovery))
    })
    .await?;
    let (row, recovery_key) = row;
    let mut out = archive_target_out(&row);
    out.recovery_key = recovery_key;
    Ok(HttpResponse::Created()
        .insert_header(("location", format!("/api/v1/archive-targets/{}", row.id)))
        .insert_header(("cache-control", "no-store"))
        .json(out))
}

#[utoipa::path(get, path = "/api/v1/archive-targets", tag = "archive", params(Page), security(("bearer" = [])),
    responses((status = 200, body = api::List<api::ArchiveTarget>)))]
pub async fn list_targets(
    state: State,
    _c: Caller,
    q: web::Query<Page>,
) -> ApiResult<HttpResponse> {
    let limit = q.limit()?;
    let cursor = q.cursor.clone();
    let rows = blocking(&state, move |st| {
        Ok(st.catalog.archive_targets(cursor.as_deref(), limit + 1)?)
    })
    .await?;
    Ok(HttpResponse::Ok().json(page(rows, limit, |r| r.id.clone(), archive_target_out)))
}

#[utoipa::path(get, path = "/api/v1/archive-targets/{id}", params(("id" = String, Path, description = "Resource id")), tag = "archive", security(("bearer" = [])),
    responses((status = 200, body = api::ArchiveTarget), (status = 404, body = api::ErrorBody)))]
pub async fn get_target(
    state: State,
    _c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = id.into_inner();
    let row = blocking(&state, move |st| target_row(st, &id)).await?;
    Ok(HttpResponse::Ok().json(archive_target_out(&row)))
}

#[utoipa::path(delete, path = "/api/v1/archive-targets/{id}", params(("id" = String, Path, description = "Resource id")), tag = "archive", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn delete_target(
    state: State,
    c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    blocking(&state, move |st| {
        target_row(st, &id)?;
        let remote = st.pool.remote_objects(&id)?.len();
        if remote > 0 {
            return Err(ApiError::conflict(
                "ARCHIVE_TARGET_IN_USE",
                format!(
                    "{remote} chunks of volumes mounted from this target are still only there: rehydrate those snapshots or delete their clones first"
                ),
            ));
        }
        if !st.catalog.delete_archive_target(&id)? {
            return Err(ApiError::conflict(
                "ARCHIVE_TARGET_IN_USE",
                "snapshots have copies in this target: delete those copies first",
            ));
        }
        st.pool.archive_forget(&id)?;
        tracing::info!(target_id = %id, "archive target deleted (the bucket's objects stay)");
        Ok(())
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(post, path = "/api/v1/snapshots/{id}/archive", params(("id" = String, Path, description = "Snapshot id")), tag = "archive", request_body = api::ArchiveSnapshot, security(("bearer" = [])),
    responses((status = 202, body = api::Job), (status = 400, body = api::ErrorBody), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn archive_snapshot(
    state: State,
    c: Caller,
    id: web::Path<String>,
    body: Body<api::ArchiveSnapshot>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let (id, target) = (id.into_inner(), body.0.target);
    let (srow, trow) = blocking(&state, move |st| {
        let srow = snapshot_row(st, &id)?;
        let trow = target_row(st, &target).map_err(|e| {
            if e.status == StatusCode::NOT_FOUND {
                ApiError::invalid("target", format!("no archive target {target:?}"))
            } else {
                e
            }
        })?;
        // One push per copy at a time: claim it in the catalog.
        let claimed = st.catalog.tx(|c| {
            use crate::catalog::schema::snapshot_archives::dsl as sa;
            use diesel::prelude::*;
            let cur: Option<SnapshotArchiveRow> = sa::snapshot_archives
                .find((srow.id.clone(), trow.id.clone()))
                .select(SnapshotArchiveRow::as_select())
                .first(c)
                .optional()?;
            if cur.as_ref().is_some_and(|r| r.state == "pushing") {
                return Ok(false);
            }
            let row = SnapshotArchiveRow {
                snapshot: srow.id.clone(),
                target: trow.id.clone(),
                state: "pushing".into(),
                job: None,
                archived_ms: cur.as_ref().and_then(|r| r.archived_ms),
                bytes: cur.as_ref().map_or(0, |r| r.bytes),
                objects: cur.as_ref().map_or(0, |r| r.objects),
                updated_ms: now_ms(),
            };
            if cur.is_some() {
                diesel::update(
                    sa::snapshot_archives.find((row.snapshot.clone(), row.target.clone())),
                )
                .set(&row)
                .execute(c)?;
            } else {
                diesel::insert_into(sa::snapshot_archives)
                    .values(&row)
                    .execute(c)?;
            }
            Ok(true)
        })?;
        if !claimed {
            return Err(ApiError::conflict(
                "ARCHIVE_IN_PROGRESS",
                format!(
                    "snapshot {} is being pushed to {} already",
                    srow.id, trow.id
                ),
            ));
        }
        Ok((srow, trow))
    })
    .await?;
    let job = start_push(&state, srow, trow).await?;
    Ok(accepted(&job))
}

/// Starts the job that pushes a snapshot to a target (its copy row already says `pushing`).
pub async fn start_push(
    state: &State,
    srow: SnapshotRow,
    trow: ArchiveTargetRow,
) -> ApiResult<crate::catalog::JobRow> {
    jobs::start(state, "archive", Some(srow.id.clone()), move |st, p| {
        run_push(st, p, &srow, &trow)
    })
    .await
}

fn copy_row(srow: &SnapshotRow, trow: &ArchiveTargetRow, state: &str) -> SnapshotArchiveRow {
    SnapshotArchiveRow {
        snapshot: srow.id.clone(),
        target: trow.id.clone(),
        state: state.into(),
        job: None,
        archived_ms: None,
        bytes: 0,
        objects: 0,
        updated_ms: now_ms(),
    }
}

fn run_push(
    st: &AppState,
    p: &jobs::Progress<'_>,
    srow: &SnapshotRow,
    trow: &ArchiveTargetRow,
) -> ApiResult<serde_json::Value> {
    let lock = st.target_lock(&trow.id);
    let _shared = read_lock(&lock);
    let prev = st.catalog.snapshot_archive(&srow.id, &trow.id)?;
    let mut row = copy_row(srow, trow, "pushing");
    row.job = Some(p.job_id());
    row.archived_ms = prev.as_ref().and_then(|r| r.archived_ms);
    st.catalog.upsert_snapshot_archive(&row)?;
    let outcome = (|| -> ApiResult<maas_s3::push::PushReport> {
        let bucket = bucket_for(st, trow)?;
        let meta = maas_s3::manifest::SnapshotMeta {
            id: srow.id.clone(),
            volume: srow.volume.clone(),
            volume_name: srow.volume_name.clone(),
            size: srow.size.max(0) as u64,
            block_size: srow.block_size.clamp(0, u32::MAX as i64) as u32,
            created_at: rfc3339(srow.created_ms),
            locked_until: srow.locked_until_ms.map(rfc3339),
        };
        let started = std::time::Instant::now();
        let mut report = |pp: &maas_s3::push::PushProgress| {
            let fraction = if pp.objects_to_send == 0 {
                1.0
            } else {
                pp.objects_sent as f64 / pp.objects_to_send as f64
            };
            let secs = started.elapsed().as_secs_f64().max(0.001);
            p.set_detail(
                fraction * 0.99,
                serde_json::json!({
                    "objects_total": pp.objects_total,
                    "objects_to_send": pp.objects_to_send,
                    "objects_sent": pp.objects_sent,
                    "bytes_to_send": pp.bytes_to_send,
                    "bytes_sent": pp.bytes_sent,
                    "packs_sent": pp.packs_sent,
                    "bytes_per_second": (pp.bytes_sent as f64 / secs) as u64,
                }),
                false,
            );
        };
        Ok(maas_s3::push::push_snapshot(
            &st.archive,
            &st.pool,
            &bucket,
            &trow.id,
            SnapshotId(srow.pool_snapshot as u64),
            meta,
            maas_s3::push::PushOptions::default(),
            &mut report,
        )?)
    })();
    match outcome {
        Ok(r) => {
            let secs = r.seconds.max(0.001);
            let pp = r.progress;
            p.set_detail(
                1.0,
                serde_json::json!({
                    "objects_total": pp.objects_total,
                    "objects_to_send": pp.objects_to_send,
                    "objects_sent": pp.objects_sent,
                    "bytes_to_send": pp.bytes_to_send,
                    "bytes_sent": pp.bytes_sent,
                    "packs_sent": pp.packs_sent,
                    "bytes_per_second": (pp.bytes_sent as f64 / secs) as u64,
                }),
                true,
            );
            row.state = "archived".into();
            row.archived_ms = Some(now_ms());
            row.bytes = r.manifest.stored_bytes as i64;
            row.objects = r.manifest.packs.len() as i64 + 1;
            row.updated_ms = now_ms();
            st.catalog.upsert_snapshot_archive(&row)?;
            Ok(serde_json::json!({
                "snapshot": srow.id,
                "target": trow.id,
                "objects_sent": pp.objects_sent,
                "bytes_sent": pp.bytes_sent,
                "packs_sent": pp.packs_sent,
                "bytes": r.manifest.stored_bytes,
                "objects": row.objects,
                "seconds": r.seconds,
            }))
        }
        Err(e) => {
            row.state = "failed".into();
            row.updated_ms = now_ms();
            if let Err(ce) = st.catalog.upsert_snapshot_archive(&row) {
                tracing::error!(error = %ce, "cannot record the failed archive push");
            }
            Err(e)
        }
    }
}

/// Resumes the pushes a previous run left unfinished (their jobs were marked interrupted):
/// what they completed is recorded in the pool, so they send only the rest.
pub async fn resume_pushes(state: &State) -> ApiResult<usize> {
    let rows = blocking(state, |st| Ok(st.catalog.pushing_archives()?)).await?;
    let mut n = 0;
    for r in rows {
        let (s, t) = (r.snapshot.clone(), r.target.clone());
        let found = blocking(state, move |st| {
            let srow = st.catalog.snapshot(&s)?.filter(|x| x.state == "ready");
            let trow = st.catalog.archive_target(&t)?;
            Ok(srow.zip(trow))
        })
        .await?;
        match found {
            Some((srow, trow)) => {
                tracing::info!(snapshot = %srow.id, target_id = %trow.id, "resuming an interrupted archive push");
                start_push(state, srow, trow).await?;
                n += 1;
            }
            None => {
                let mut failed = r.clone();
                failed.state = "failed".into();
                failed.updated_ms = now_ms();
                blocking(state, move |st| {
                    Ok(st.catalog.upsert_snapshot_archive(&failed)?)
                })
                .await?;
            }
        }
    }
    Ok(n)
}

pub fn busy() -> ApiError {
    ApiError::conflict(
        "SNAPSHOT_BUSY",
        "an evict or rehydrate job is moving this snapshot's data; wait for it",
    )
}

/// The copy evict and rehydrate use: the first archived one.
pub fn archived_copy(
    st: &AppState,
    snapshot: &str,
) -> ApiResult<(SnapshotArchiveRow, ArchiveTargetRow)> {
    for c in st.catalog.archives_of(snapshot)? {
        if c.state == "archived"
            && let Some(t) = st.catalog.archive_target(&c.target)?
        {
            return Ok((c, t));
        }
    }
    Err(ApiError::conflict(
        "SNAPSHOT_NOT_ARCHIVED",
        format!("snapshot {snapshot} has no complete copy in an archive target: archive it first"),
    ))
}

#[utoipa::path(post, path = "/api/v1/snapshots/{id}/evict", params(("id" = String, Path, description = "Snapshot id")), tag = "archive", security(("bearer" = [])),
    responses((status = 202, body = api::Job), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn evict_snapshot(
    state: State,
    c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    let id2 = id.clone();
    let (srow, trow) = blocking(&state, move |st| {
        let srow = snapshot_row(st, &id2)?;
        if srow.location != "local" {
            return Err(ApiError::conflict(
                "SNAPSHOT_NOT_LOCAL",
                format!("snapshot {id2} has no local copy to evict"),
            ));
        }
        if let Some(ms) = srow.locked_until_ms
            && ms > now_ms()
        {
            // Its bucket copy may be deletable by whoever holds the bucket's keys: a locked
            // snapshot keeps its local copy until the lock ends.
            return Err(ApiError::conflict(
                "SNAPSHOT_LOCKED",
                format!(
                    "snapshot is locked until {}: its local copy stays until then",
                    rfc3339(ms)
                ),
            ));
        }
        let (_, trow) = archived_copy(st, &id2)?;
        Ok((srow, trow))
    })
    .await?;
    let claim = AppState::claim_moving(&state, &id).ok_or_else(busy)?;
    let job = jobs::start(&state, "evict", Some(id.clone()), move |st, p| {
        let _claim = claim;
        let lock = st.target_lock(&trow.id);
        let _shared = read_lock(&lock);
        let bucket = bucket_for(st, &trow)?;
        // Only a copy read back whole and checked replaces the local one.
        let report = maas_s3::verify::verify_snapshot(
            &st.archive,
            &st.pool,
            &bucket,
            &trow.id,
            &srow.id,
            &mut |f| p.set(f * 0.9),
        )?;
        // The catalog first: a crash before the pool's delete leaves a local copy that
        // reconciliation deletes at start (the row says where the snapshot is).
        let mut row = srow.clone();
        row.location = "archive".into();
        st.catalog.update_snapshot(&row)?;
        match st.pool.delete_snapshot(SnapshotId(srow.pool_snapshot as u64)) {
            Ok(()) | Err(maas_pool::PoolError::SnapshotNotFound(_)) => {}
            Err(e) => {
                st.catalog.update_snapshot(&srow)?;
                return Err(e.into());
            }
        }
        row.pool_snapshot = -1;
        st.catalog.update_snapshot(&row)?;
        tracing::info!(snapshot = %srow.id, target_id = %trow.id, objects_checked = report.objects, "snapshot evicted: its data is only in the archive now");
        Ok(serde_json::json!({
            "snapshot": srow.id,
            "target": trow.id,
            "objects_checked": report.objects,
            "bytes_read": report.bytes_read,
        }))
    })
    .await?;
    Ok(accepted(&job))
}

#[utoipa::path(post, path = "/api/v1/snapshots/{id}/rehydrate", params(("id" = String, Path, description = "Snapshot id")), tag = "archive", security(("bearer" = [])),
    responses((status = 202, body = api::Job), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn rehydrate_snapshot(
    state: State,
    c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    let id2 = id.clone();
    let (srow, trow) = blocking(&state, move |st| {
        let srow = snapshot_row(st, &id2)?;
        if srow.location == "local" {
            let remote = st
                .pool
                .remote_chunks_of(maas_pool::SnapshotId(srow.pool_snapshot as u64))?
                .len();
            if remote == 0 {
                return Err(ApiError::conflict(
                    "SNAPSHOT_LOCAL",
                    format!("snapshot {id2} is local already"),
                ));
            }
        }
        let (_, trow) = archived_copy(st, &id2)?;
        Ok((srow, trow))
    })
    .await?;
    let claim = AppState::claim_moving(&state, &id).ok_or_else(busy)?;
    if srow.location == "local" {
        // Mounted lazily: the chunks not read yet come now.
        let job = jobs::start(&state, "rehydrate", Some(id.clone()), move |st, p| {
            let _claim = claim;
            let started = std::time::Instant::now();
            let fetched = st.pool.fetch_remote_chunks(
                maas_pool::SnapshotId(srow.pool_snapshot as u64),
                &mut |done, total| {
                    p.set_detail(
                        done as f64 / total.max(1) as f64 * 0.99,
                        serde_json::json!({ "chunks_total": total, "chunks_done": done }),
                        false,
                    );
                },
            )?;
            tracing::info!(snapshot = %srow.id, chunks = fetched, "lazily mounted snapshot made whole local");
            Ok(serde_json::json!({
                "snapshot": srow.id,
                "target": trow.id,
                "chunks_fetched": fetched,
                "seconds": started.elapsed().as_secs_f64(),
            }))
        })
        .await?;
        return Ok(accepted(&job));
    }
    let job = jobs::start(&state, "rehydrate", Some(id.clone()), move |st, p| {
        let _claim = claim;
        let lock = st.target_lock(&trow.id);
        let _shared = read_lock(&lock);
        let bucket = bucket_for(st, &trow)?;
        let source = crate::archive::source_keys(st, &bucket, &srow)?;
        let started = std::time::Instant::now();
        let info = maas_s3::restore::restore_snapshot(
            &st.archive,
            &st.pool,
            &bucket,
            &trow.id,
            &srow.id,
            source.as_ref(),
            maas_s3::restore::RestoreOptions::default(),
            &mut |r| {
                let secs = started.elapsed().as_secs_f64().max(0.001);
                p.set_detail(
                    r.chunks_done as f64 / r.chunks_total.max(1) as f64 * 0.99,
                    serde_json::json!({
                        "chunks_total": r.chunks_total,
                        "chunks_done": r.chunks_done,
                        "bytes_total": r.bytes_total,
                        "bytes_fetched": r.bytes_fetched,
                        "requests": r.requests,
                        "bytes_per_second": (r.bytes_fetched as f64 / secs) as u64,
                    }),
                    false,
                );
            },
        )?;
        let mut row = srow.clone();
        row.location = "local".into();
        row.pool_snapshot = info.id.0 as i64;
        st.catalog.update_snapshot(&row)?;
        tracing::info!(snapshot = %srow.id, pool_snapshot = %info.id, "snapshot rehydrated");
        Ok(serde_json::json!({
            "snapshot": srow.id,
            "target": trow.id,
            "seconds": started.elapsed().as_secs_f64(),
        }))
    })
    .await?;
    Ok(accepted(&job))
}

/// The digest keys of the pool that wrote an archived snapshot, when it is not this pool.
pub fn source_keys(
    st: &AppState,
    bucket: &Bucket,
    srow: &SnapshotRow,
) -> ApiResult<Option<maas_pool::import::DigestKeys>> {
    let manifest = maas_s3::restore::read_manifest(&st.archive, bucket, &srow.id)?;
    Ok(st
        .archive
        .block_on(maas_s3::keys::writer_keys(bucket, &st.pool, &manifest))?)
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SnapshotQuery {
    /// Only snapshots of this volume id (it may no longer exist).
    pub volume: Option<String>,
    /// `local` or `archive`.
    pub location: Option<String>,
    /// 1..1000, default 100.
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/snapshots", tag = "snapshots", params(SnapshotQuery), security(("bearer" = [])),
    responses((status = 200, body = api::List<api::Snapshot>), (status = 400, body = api::ErrorBody)))]
pub async fn list_all_snapshots(
    state: State,
    _c: Caller,
    q: web::Query<SnapshotQuery>,
) -> ApiResult<HttpResponse> {
    let q = q.into_inner();
    let limit = Page {
        limit: q.limit,
        cursor: None,
    }
    .limit()?;
    if let Some(l) = &q.location
        && l != "local"
        && l != "archive"
    {
        return Err(ApiError::invalid(
            "location",
            "location must be local or archive",
        ));
    }
    let rows = blocking(&state, move |st| {
        let rows = st.catalog.snapshots_filtered(
            q.volume.as_deref(),
            q.location.as_deref(),
            q.cursor.as_deref(),
            limit + 1,
        )?;
        let copies = rows
            .iter()
            .map(|r| st.catalog.archives_of(&r.id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows.into_iter().zip(copies).collect::<Vec<_>>())
    })
    .await?;
    Ok(HttpResponse::Ok().json(page(
        rows,
        limit,
        |(r, _)| r.id.clone(),
        |(r, c)| crate::state::snapshot_with_archives(r, c),
    )))
}

#[utoipa::path(post, path = "/api/v1/archive-targets/{id}/import", params(("id" = String, Path, description = "Archive target id")), tag = "archive", security(("bearer" = [])),
    responses((status = 202, body = api::Job), (status = 404, body = api::ErrorBody)))]
pub async fn import_target(
    state: State,
    c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    let id2 = id.clone();
    let trow = blocking(&state, move |st| target_row(st, &id2)).await?;
    let job = jobs::start(&state, "import", Some(id), move |st, p| {
        let lock = st.target_lock(&trow.id);
        let _shared = read_lock(&lock);
        let bucket = bucket_for(st, &trow)?;
        let scan = maas_s3::import::scan_bucket(&st.archive, &st.pool, &bucket, &trow.id, &mut |f| p.set(f))?;
        let mut imported = Vec::new();
        let mut known = 0u64;
        for m in &scan.snapshots {
            if st.catalog.snapshot(&m.meta.id)?.is_some() {
                known += 1;
                if st.catalog.snapshot_archive(&m.meta.id, &trow.id)?.is_none() {
                    st.catalog.upsert_snapshot_archive(&imported_copy(m, &trow.id))?;
                }
                continue;
            }
            let ms = |t: &str| {
                chrono::DateTime::parse_from_rfc3339(t)
                    .map(|t| t.timestamp_millis())
                    .ok()
            };
            let row = SnapshotRow {
                id: m.meta.id.clone(),
                volume: m.meta.volume.clone(),
                volume_name: m.meta.volume_name.clone(),
                pool: crate::state::POOL_ID.into(),
                pool_snapshot: -1,
                size: m.meta.size as i64,
                block_size: i64::from(m.meta.block_size),
                starred: 0,
                locked_until_ms: m.meta.locked_until.as_deref().and_then(ms),
                state: "ready".into(),
                created_ms: ms(&m.meta.created_at).unwrap_or_else(now_ms),
                location: "archive".into(),
            };
            st.catalog.insert_snapshot(&row)?;
            st.catalog.upsert_snapshot_archive(&imported_copy(m, &trow.id))?;
            imported.push(row.id);
        }
        tracing::info!(target_id = %trow.id, imported = imported.len(), known, packs_indexed = scan.packs_indexed, "archive target imported");
        Ok(serde_json::json!({
            "snapshots_imported": imported,
            "snapshots_known": known,
            "incomplete": scan.incomplete,
            "packs_indexed": scan.packs_indexed,
            "packs_known": scan.packs_known,
        }))
    })
    .await?;
    Ok(accepted(&job))
}

#[utoipa::path(post, path = "/api/v1/archive-targets/{id}/check", params(("id" = String, Path, description = "Archive target id")), tag = "archive", request_body = api::CheckArchiveTarget, security(("bearer" = [])),
    responses((status = 202, body = api::Job), (status = 400, body = api::ErrorBody), (status = 404, body = api::ErrorBody)))]
pub async fn check_target(
    state: State,
    c: Caller,
    id: web::Path<String>,
    body: Body<api::CheckArchiveTarget>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let b = body.0;
    let grace_hours = b.orphan_grace_hours.unwrap_or(24);
    if grace_hours > 24 * 3650 {
        return Err(ApiError::invalid(
            "orphan_grace_hours",
            "orphan_grace_hours must be at most 87600 (ten years)",
        ));
    }
    let opts = maas_s3::check::CheckOptions {
        repair: b.repair,
        orphan_grace: Duration::from_secs(u64::from(grace_hours) * 3600),
    };
    let id = id.into_inner();
    let id2 = id.clone();
    let trow = blocking(&state, move |st| target_row(st, &id2)).await?;
    let job = jobs::start(&state, "check-archive", Some(id), move |st, p| {
        let lock = st.target_lock(&trow.id);
        // A repair deletes and forgets packs: alone on the target, as reclamation.
        let (_shared, _exclusive) = if opts.repair {
            (
                None,
                Some(write_lock(&lock)),
            )
        } else {
            (Some(read_lock(&lock)), None)
        };
        let bucket = bucket_for(st, &trow)?;
        let r = maas_s3::check::check_target(&st.archive, &st.pool, &bucket, &trow.id, opts, &mut |f| p.set(f))?;
        // Copies the bucket can no longer serve are not used for evict or rehydrate.
        let mut marked = Vec::new();
        for snap in &r.snapshots_damaged {
            if let Some(mut row) = st.catalog.snapshot_archive(snap, &trow.id)?
                && row.state == "archived"
            {
                row.state = "damaged".into();
                row.updated_ms = now_ms();
                st.catalog.upsert_snapshot_archive(&row)?;
                tracing::error!(snapshot = %snap, target_id = %trow.id, "archived copy is damaged: its manifest names packs the bucket does not hold");
                marked.push(snap.clone());
            }
        }
        Ok(serde_json::json!({
            "repair": opts.repair,
            "packs_listed": r.packs_listed,
            "packs_recorded": r.packs_recorded,
            "manifests_read": r.manifests_read,
            "packs_missing": r.packs_missing,
            "snapshots_damaged": r.snapshots_damaged,
            "copies_marked_damaged": marked,
            "manifests_unreadable": r.manifests_unreadable.iter().map(|(k, why)| serde_json::json!({"key": k, "error": why})).collect::<Vec<_>>(),
            "orphans": r.orphans,
            "orphans_young": r.orphans_young,
            "packs_forgotten": r.packs_forgotten,
            "orphans_deleted": r.orphans_deleted,
            "bytes_freed": r.bytes_freed,
        }))
    })
    .await?;
    Ok(accepted(&job))
}

fn imported_copy(m: &maas_s3::manifest::SnapshotManifest, target: &str) -> SnapshotArchiveRow {
    SnapshotArchiveRow {
        snapshot: m.meta.id.clone(),
        target: target.into(),
        state: "archived".into(),
        job: None,
        archived_ms: chrono::DateTime::parse_from_rfc3339(&m.archived_at)
            .map(|t| t.timestamp_millis())
            .ok(),
        bytes: m.stored_bytes as i64,
        objects: m.packs.len() as i64 + 1,
        updated_ms: now_ms(),
    }
}

#[utoipa::path(post, path = "/api/v1/snapshots/{id}/archives/{target}/verify", params(("id" = String, Path, description = "Snapshot id"), ("target" = String, Path, description = "Archive target id")), tag = "archive", security(("bearer" = [])),
    responses((status = 202, body = api::Job), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn verify_copy(
    state: State,
    c: Caller,
    path: web::Path<(String, String)>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let (id, target) = path.into_inner();
    let (id2, t2) = (id.clone(), target.clone());
    let (copy, trow) = blocking(&state, move |st| {
        let srow = st
            .catalog
            .snapshot(&id2)?
            .filter(|r| r.state == "ready")
            .ok_or_else(|| ApiError::not_found("SNAPSHOT_NOT_FOUND", "snapshot", &id2))?;
        let copy = st
            .catalog
            .snapshot_archive(&srow.id, &t2)?
            .filter(|c| c.state == "archived" || c.state == "damaged")
            .ok_or_else(|| {
                ApiError::not_found(
                    "ARCHIVE_COPY_NOT_FOUND",
                    "archived copy",
                    &format!("{id2} in {t2}"),
                )
            })?;
        Ok((copy, target_row(st, &t2)?))
    })
    .await?;
    let job = jobs::start(&state, "verify-archive", Some(id), move |st, p| {
        let lock = st.target_lock(&trow.id);
        let _shared = read_lock(&lock);
        let bucket = bucket_for(st, &trow)?;
        let r = maas_s3::verify::verify_snapshot(
            &st.archive,
            &st.pool,
            &bucket,
            &trow.id,
            &copy.snapshot,
            &mut |f| p.set(f),
        );
        let mut row = copy.clone();
        row.updated_ms = now_ms();
        match r {
            Ok(rep) => {
                row.state = "archived".into();
                st.catalog.upsert_snapshot_archive(&row)?;
                Ok(serde_json::json!({
                    "snapshot": copy.snapshot,
                    "target": trow.id,
                    "objects": rep.objects,
                    "packs": rep.packs,
                    "bytes_read": rep.bytes_read,
                }))
            }
            Err(e) => {
                if matches!(
                    e,
                    maas_s3::ArchiveError::Damaged { .. } | maas_s3::ArchiveError::Missing { .. }
                ) {
                    // Evict and rehydrate use only copies that are whole.
                    row.state = "damaged".into();
                    st.catalog.upsert_snapshot_archive(&row)?;
                    tracing::error!(snapshot = %copy.snapshot, target_id = %trow.id, error = %e, "archived copy is damaged");
                }
                Err(e.into())
            }
        }
    })
    .await?;
    Ok(accepted(&job))
}

/// Deletes a snapshot's copies from their targets (its manifest, then every pack no remaining
/// snapshot of the target needs) and forgets them. Called by the snapshot's delete job, after
/// the checks of [`check_copies_deletable`].
pub fn delete_copies(st: &AppState, srow: &SnapshotRow) -> ApiResult<serde_json::Value> {
    let mut reports = Vec::new();
    for copy in st.catalog.archives_of(&srow.id)? {
        let Some(trow) = st.catalog.archive_target(&copy.target)? else {
            continue;
        };
        let lock = st.target_lock(&trow.id);
        let _exclusive = write_lock(&lock);
        let bucket = bucket_for(st, &trow)?;
        if copy.state != "failed" {
            match st
                .archive
                .block_on(bucket.delete(&maas_s3::manifest::SnapshotManifest::key(&srow.id)))
            {
                Ok(()) => {}
                // The bucket itself is gone: so is the copy, and there is nothing to reclaim.
                Err(e @ maas_s3::ArchiveError::NoSuchBucket { .. }) => {
                    tracing::warn!(snapshot = %srow.id, target_id = %trow.id, error = %e, "archive copy forgotten: its bucket no longer exists");
                    st.catalog.delete_snapshot_archive(&srow.id, &trow.id)?;
                    reports.push(serde_json::json!({
                        "target": trow.id,
                        "bucket_missing": true,
                    }));
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        st.catalog.delete_snapshot_archive(&srow.id, &trow.id)?;
        // What the target's other snapshots need stays (read from the bucket: should one of
        // them not be readable, nothing is reclaimed this time, see maas_s3::gc).
        let mut keep = Vec::new();
        for other in st.catalog.archives_of_target(&trow.id)? {
            if other.state != "failed" && st.catalog.snapshot(&other.snapshot)?.is_some() {
                keep.push(other.snapshot);
            }
        }
        let r = maas_s3::gc::collect(
            &st.archive,
            &st.pool,
            &bucket,
            &trow.id,
            &keep,
            maas_s3::gc::GcOptions::default(),
        )?;
        reports.push(serde_json::json!({
            "target": trow.id,
            "packs_deleted": r.packs_deleted,
            "bytes_freed": r.bytes_freed,
            "packs_kept": r.packs_kept,
            "packs_repacked": r.packs_repacked,
            "packs_written": r.packs_written,
            "bytes_rewritten": r.bytes_rewritten,
            "manifests_rewritten": r.manifests_rewritten,
            "repack_deferred": r.repack_deferred,
            "reclaim_deferred": r.deferred,
        }));
    }
    Ok(serde_json::Value::Array(reports))
}

/// Refuses to delete a snapshot whose copies cannot go: one being pushed, or one whose
/// objects are under object lock retention.
pub fn check_copies_deletable(st: &AppState, snapshot: &str) -> ApiResult<()> {
    for c in st.catalog.archives_of(snapshot)? {
        if c.state == "pushing" {
            return Err(ApiError::conflict(
                "ARCHIVE_IN_PROGRESS",
                format!("snapshot is being pushed to archive target {}", c.target),
            ));
        }
        let Some(t) = st.catalog.archive_target(&c.target)? else {
            continue;
        };
        if let (Some(days), Some(at)) = (t.object_lock_days, c.archived_ms) {
            let until = at + days * 86_400_000;
            if until > now_ms() {
                return Err(ApiError::conflict(
                    "SNAPSHOT_ARCHIVE_LOCKED",
                    format!(
                        "the snapshot's objects in archive target {} are under object lock until {}: it cannot be deleted before",
                        t.id,
                        rfc3339(until)
                    ),
                ));
            }
        }
    }
    Ok(())
}
