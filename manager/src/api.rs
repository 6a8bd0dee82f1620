//! REST API v1 handlers. Every call but health needs a token; writes need operator (tokens:
//! admin). Long operations answer 202 with a job.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, HttpResponse, web};
use maas_api as api;
use maas_pool::{SnapshotId, VolumeId};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::{Caller, Role, hash_secret, new_secret};
use crate::catalog::{ExportRow, SnapshotRow, TokenRow, VolumeRow};
use crate::error::{ApiError, ApiResult};
use crate::jobs;
use crate::state::{
    AppState, POOL_ID, blocking, export_out, job_out, new_id, now_ms, snapshot_out, token_out,
    volume_out,
};

type State = web::Data<AppState>;

/// JSON body extractor whose errors name the offending field.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned + 'static> FromRequest for Body<T> {
    type Error = ApiError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let fut = web::Bytes::from_request(req, payload);
        Box::pin(async move {
            let bytes = fut.await.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "INVALID_BODY",
                    format!("cannot read body: {e}"),
                )
            })?;
            let de = &mut serde_json::Deserializer::from_slice(&bytes);
            serde_path_to_error::deserialize(de).map(Body).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let msg = inner.to_string();
                // serde reports a missing field at its parent's path; name the field itself.
                let missing = msg
                    .strip_prefix("missing field `")
                    .and_then(|r| r.split('`').next());
                match missing {
                    _ if inner.is_syntax() || inner.is_eof() => ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "INVALID_BODY",
                        format!("malformed JSON body: {msg}"),
                    ),
                    Some(f) => {
                        let field = if path == "." {
                            f.to_string()
                        } else {
                            format!("{path}.{f}")
                        };
                        ApiError::invalid(&field, format!("{field} is required"))
                    }
                    None if path == "." => ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "INVALID_BODY",
                        format!("wrong JSON body: {msg}"),
                    ),
                    None => ApiError::invalid(&path, format!("{path}: {msg}")),
                }
            })
        })
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// 1..1000, default 100.
    pub limit: Option<u32>,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
}

impl Page {
    pub(crate) fn limit(&self) -> ApiResult<i64> {
        match self.limit {
            None => Ok(100),
            Some(l) if (1..=1000).contains(&l) => Ok(l as i64),
            Some(_) => Err(ApiError::invalid(
                "limit",
                "limit must be between 1 and 1000",
            )),
        }
    }
}

/// One page from `rows`, fetched as `limit + 1` rows of exactly the rows listed (filtered in
/// the query, never after it): the extra row says whether a next page exists.
pub(crate) fn page<T, R>(
    rows: Vec<R>,
    limit: i64,
    id: impl Fn(&R) -> String,
    out: impl Fn(&R) -> T,
) -> api::List<T> {
    let more = rows.len() as i64 > limit;
    let rows = &rows[..rows.len().min(limit as usize)];
    api::List {
        items: rows.iter().map(out).collect(),
        next_cursor: if more { rows.last().map(id) } else { None },
    }
}

pub(crate) fn validate_name(field: &str, name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "1-128 characters of letters, digits, '-', '_', '.'",
        ))
    }
}

fn validate_labels(l: &BTreeMap<String, String>) -> ApiResult<()> {
    if l.len() > 64
        || l.iter()
            .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 512)
    {
        return Err(ApiError::invalid(
            "labels",
            "at most 64 labels; keys 1-128 and values up to 512 characters",
        ));
    }
    Ok(())
}

fn validate_size(st: &AppState, size: u64, block_size: u32) -> ApiResult<()> {
    if size == 0 || size % 4096 != 0 || size % block_size as u64 != 0 {
        return Err(ApiError::invalid(
            "size",
            "size must be a positive multiple of 4096 bytes",
        ));
    }
    if size > st.pool.max_volume_size() {
        return Err(ApiError::invalid(
            "size",
            format!(
                "size exceeds the largest volume ({} bytes)",
                st.pool.max_volume_size()
            ),
        ));
    }
    Ok(())
}

fn volume_row(st: &AppState, id: &str) -> ApiResult<VolumeRow> {
    match st.catalog.volume(id)? {
        Some(r) if r.state == "ready" => Ok(r),
        _ => Err(ApiError::not_found("VOLUME_NOT_FOUND", "volume", id)),
    }
}

fn pool_volume(st: &AppState, id: &str) -> ApiResult<VolumeId> {
    Ok(st
        .pool
        .volume_by_name(id)
        .map_err(|_| ApiError::not_found("VOLUME_NOT_FOUND", "volume", id))?
        .id)
}

pub(crate) fn snapshot_row(st: &AppState, id: &str) -> ApiResult<SnapshotRow> {
    match st.catalog.snapshot(id)? {
        Some(r) if r.state == "ready" => Ok(r),
        _ => Err(ApiError::not_found("SNAPSHOT_NOT_FOUND", "snapshot", id)),
    }
}

pub(crate) fn accepted(job: &crate::catalog::JobRow) -> HttpResponse {
    HttpResponse::Accepted()
        .insert_header(("location", format!("/api/v1/jobs/{}", job.id)))
        .json(job_out(job))
}

// ---------------------------------------------------------------- health, pools

#[utoipa::path(get, path = "/api/v1/health", tag = "system", responses((status = 200, body = api::Health)))]
pub async fn health(state: State) -> HttpResponse {
    HttpResponse::Ok().json(api::Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        catalog: state.catalog.backend().into(),
    })
}

fn pool_out(st: &AppState) -> ApiResult<api::Pool> {
    let s = st.pool.stats()?;
    let devices: Vec<api::Device> = st
        .pool
        .devices()
        .into_iter()
        .map(|(index, path, tier, size)| api::Device {
            index,
            path: path.display().to_string(),
            tier: format!("{tier:?}").to_lowercase(),
            size,
        })
        .collect();
    let mut tiers: Vec<String> = vec!["ram".into()];
    for t in ["ssd", "hdd"] {
        if devices.iter().any(|d| d.tier == t) {
            tiers.push(t.into());
        }
    }
    Ok(api::Pool {
        id: POOL_ID.into(),
        name: POOL_ID.into(),
        devices,
        tiers,
        chunk_size: st.pool.chunk_size(),
        capacity: s.capacity_bytes,
        used: s.used_bytes,
        free: s.free_bytes,
        wal_bytes: s.wal_bytes,
        logical_bytes: s.logical_bytes,
        unique_bytes: s.unique_bytes,
        stored_bytes: s.stored_bytes,
        dedup_ratio: s.dedup_ratio,
        compression_ratio: s.compression_ratio,
        volumes: s.volumes,
        snapshots: s.snapshots,
        ram_tier: api::RamTier {
            auto: s.ram_tier.auto,
            target_bytes: s.ram_tier.target_bytes,
            max_bytes: s.ram_tier.max_bytes,
            chunk_cache_limit: s.ram_tier.chunk_cache_limit,
            chunk_cache_bytes: s.ram_tier.chunk_cache_bytes,
            log_cache_limit: s.ram_tier.log_cache_limit,
            log_cache_bytes: s.ram_tier.log_cache_bytes,
            write_buffer_limit: s.ram_tier.write_buffer_limit,
            write_buffer_bytes: s.ram_tier.write_buffer_bytes,
            shrinks: s.ram_tier.shrinks,
            mem_total_bytes: s.ram_tier.mem_total_bytes,
            mem_available_bytes: s.ram_tier.mem_available_bytes,
        },
        reads: api::PoolReads {
            from_memory: s.async_reads.in_memory,
            device_async: s.async_reads.device,
            blocking: s.async_reads.blocking,
        },
    })
}

#[utoipa::path(get, path = "/api/v1/pools", tag = "pools", params(Page), security(("bearer" = [])),
    responses((status = 200, body = api::List<api::Pool>), (status = 401, body = api::ErrorBody)))]
pub async fn list_pools(state: State, _c: Caller, q: web::Query<Page>) -> ApiResult<HttpResponse> {
    q.limit()?;
    let p = blocking(&state, pool_out).await?;
    Ok(HttpResponse::Ok().json(api::List {
        items: vec![p],
        next_cursor: None,
    }))
}

#[utoipa::path(get, path = "/api/v1/pools/{id}", params(("id" = String, Path, description = "Resource id")), tag = "pools", security(("bearer" = [])),
    responses((status = 200, body = api::Pool), (status = 404, body = api::ErrorBody)))]
pub async fn get_pool(state: State, _c: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    if id.as_str() != POOL_ID {
        return Err(ApiError::not_found("POOL_NOT_FOUND", "pool", &id));
    }
    Ok(HttpResponse::Ok().json(blocking(&state, pool_out).await?))
}

#[utoipa::path(post, path = "/api/v1/pools/{id}/verify", params(("id" = String, Path, description = "Resource id")), tag = "pools", security(("bearer" = [])),
    responses((status = 202, body = api::Job), (status = 404, body = api::ErrorBody)))]
pub async fn verify_pool(
    state: State,
    c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    if id.as_str() != POOL_ID {
        return Err(ApiError::not_found("POOL_NOT_FOUND", "pool", &id));
    }
    let job = jobs::start(&state, "verify", Some(POOL_ID.into()), |st, _p| {
        let rep = st.pool.verify()?;
        Ok(serde_json::to_value(&rep).unwrap_or_default())
    })
    .await?;
    Ok(accepted(&job))
}

#[utoipa::path(post, path = "/api/v1/pools/{id}/devices", params(("id" = String, Path, description = "Pool id")), tag = "pools",
    request_body = api::AddDevice, security(("bearer" = [])),
    responses((status = 201, body = api::Pool), (status = 400, body = api::ErrorBody), (status = 403, body = api::ErrorBody), (status = 404, body = api::ErrorBody)))]
pub async fn add_device(
    state: State,
    c: Caller,
    id: web::Path<String>,
    body: Body<api::AddDevice>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Admin)?;
    if id.as_str() != POOL_ID {
        return Err(ApiError::not_found("POOL_NOT_FOUND", "pool", &id));
    }
    let b = body.0;
    let tier: maas_pool::Tier = match b.tier.as_str() {
        "ssd" => maas_pool::Tier::Ssd,
        "hdd" => maas_pool::Tier::Hdd,
        _ => {
            return Err(ApiError::invalid(
                "tier",
                "tier must be ssd or hdd (ram is the cache, sized in the config)",
            ));
        }
    };
    // The API never creates files outside the pool: a relative path is a file in the pool's
    // directory; an absolute one must be an existing block device under /dev/.
    let rel = std::path::Path::new(&b.path);
    let is_dev = b.path.starts_with("/dev/");
    let plain = !b.path.is_empty()
        && b.path.len() <= 255
        && !b.path.contains('\0')
        && rel.components().all(|c| {
            matches!(c, std::path::Component::Normal(_))
                || (is_dev && matches!(c, std::path::Component::RootDir))
        });
    if is_dev {
        let block = std::fs::metadata(rel)
            .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            .unwrap_or(false);
        if !block {
            return Err(ApiError::invalid(
                "path",
                format!("{} is not a block device", b.path),
            ));
        }
    }
    // A file device is a plain file name in the pool's directory.
    let single = rel.components().count() == 1;
    if !plain || (rel.is_absolute() && !is_dev) || (!is_dev && !single) {
        return Err(ApiError::invalid(
            "path",
            "a file name inside the pool directory, or a block device under /dev/",
        ));
    }
    let size = b.size.unwrap_or(0);
    if !b.path.starts_with("/dev/") && !(16 << 20..=1 << 60).contains(&size) {
        return Err(ApiError::invalid(
            "size",
            "a file device needs a size from 16 MiB to 1 EiB",
        ));
    }
    let p = blocking(&state, move |st| {
        st.pool
            .add_device(maas_pool::DeviceSpec {
                path: b.path.into(),
                tier,
                size,
            })
            .map_err(|e| match e {
                maas_pool::PoolError::InvalidArgument(m) => ApiError::invalid("path", m),
                other => other.into(),
            })?;
        pool_out(st)
    })
    .await?;
    Ok(HttpResponse::Created().json(p))
}

#[utoipa::path(post, path = "/api/v1/pools", tag = "pools", security(("bearer" = [])),
    responses((status = 405, body = api::ErrorBody)))]
pub async fn create_pool(_c: Caller) -> ApiResult<HttpResponse> {
    Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "ONE_POOL_PER_NODE",
        "this release serves one pool per maasd; grow it with POST /api/v1/pools/default/devices",
    ))
}

// ---------------------------------------------------------------- volumes

#[utoipa::path(get, path = "/api/v1/volumes", tag = "volumes", params(Page), security(("bearer" = [])),
    responses((status = 200, body = api::List<api::Volume>), (status = 401, body = api::ErrorBody)))]
pub async fn list_volumes(
    state: State,
    _c: Caller,
    q: web::Query<Page>,
) -> ApiResult<HttpResponse> {
    let limit = q.limit()?;
    let cursor = q.cursor.clone();
    let rows = blocking(&state, move |st| {
        Ok(st.catalog.volumes(cursor.as_deref(), limit + 1)?)
    })
    .await?;
    Ok(HttpResponse::Ok().json(page(rows, limit, |r| r.id.clone(), volume_out)))
}

#[utoipa::path(post, path = "/api/v1/volumes", tag = "volumes", request_body = api::CreateVolume, security(("bearer" = [])),
    responses((status = 201, body = api::Volume), (status = 400, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn create_volume(
    state: State,
    c: Caller,
    body: Body<api::CreateVolume>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let b = body.0;
    validate_name("name", &b.name)?;
    let bs = b.block_size.unwrap_or(512);
    if bs != 512 && bs != 4096 {
        return Err(ApiError::invalid(
            "block_size",
            "block_size must be 512 or 4096",
        ));
    }
    if let Some(p) = &b.pool
        && p != POOL_ID
    {
        return Err(ApiError::invalid("pool", format!("unknown pool {p:?}")));
    }
    let labels = b.labels.unwrap_or_default();
    validate_labels(&labels)?;
    validate_size(&state, b.size, bs)?;
    let row = blocking(&state, move |st| {
        if st.catalog.volume_by_name(&b.name)?.is_some() {
            return Err(ApiError::conflict(
                "VOLUME_EXISTS",
                format!("a volume named {:?} exists", b.name),
            ));
        }
        let mut row = VolumeRow {
            id: new_id("vol"),
            name: b.name.clone(),
            pool: POOL_ID.into(),
            size: b.size as i64,
            block_size: bs as i64,
            labels: serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into()),
            origin_snapshot: None,
            state: "creating".into(),
            created_ms: now_ms(),
        };
        st.catalog.insert_volume(&row)?;
        if let Err(e) = st.pool.create_volume(&row.id, b.size, bs) {
            st.catalog.delete_volume_row(&row.id)?;
            return Err(e.into());
        }
        row.state = "ready".into();
        st.catalog.update_volume(&row)?;
        tracing::info!(volume = %row.id, name = %row.name, size = b.size, "volume created");
        Ok(row)
    })
    .await?;
    Ok(HttpResponse::Created().json(volume_out(&row)))
}

#[utoipa::path(get, path = "/api/v1/volumes/{id}", params(("id" = String, Path, description = "Resource id")), tag = "volumes", security(("bearer" = [])),
    responses((status = 200, body = api::Volume), (status = 404, body = api::ErrorBody)))]
pub async fn get_volume(
    state: State,
    _c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = id.into_inner();
    let v = blocking(&state, move |st| {
        let row = volume_row(st, &id)?;
        let mut v = volume_out(&row);
        if let Some(s) = st.catalog.newest_snapshot_of(&row.id)?
            && s.location == "local"
            && s.pool_snapshot >= 0
        {
            let vid = pool_volume(st, &row.id)?;
            if st
                .pool
                .volume_unchanged_since(vid, SnapshotId(s.pool_snapshot as u64))?
            {
                v.unchanged_since = Some(s.id);
            }
        }
        Ok(v)
    })
    .await?;
    Ok(HttpResponse::Ok().json(v))
}

#[utoipa::path(patch, path = "/api/v1/volumes/{id}", params(("id" = String, Path, description = "Resource id")), tag = "volumes", request_body = api::UpdateVolume, security(("bearer" = [])),
    responses((status = 200, body = api::Volume), (status = 400, body = api::ErrorBody), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn patch_volume(
    state: State,
    c: Caller,
    id: web::Path<String>,
    body: Body<api::UpdateVolume>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let (id, b) = (id.into_inner(), body.0);
    if let Some(n) = &b.name {
        validate_name("name", n)?;
    }
    if let Some(l) = &b.labels {
        validate_labels(l)?;
    }
    let row = blocking(&state, move |st| {
        let mut row = volume_row(st, &id)?;
        if let Some(size) = b.size {
            validate_size(st, size, row.block_size as u32)?;
            if size < row.size as u64 {
                return Err(ApiError::conflict(
                    "SHRINK_REFUSED",
                    "volumes can grow but never shrink",
                ));
            }
            st.pool.resize_volume(pool_volume(st, &id)?, size)?;
            row.size = size as i64;
            // NVMe hosts hear of it through an asynchronous event (iSCSI initiators through
            // the capacity-changed unit attention their logical unit raises itself).
            for e in st.catalog.exports_of(&id, None, 1024)? {
                st.engine.volume_resized(&e);
            }
        }
        if let Some(n) = b.name
            && n != row.name
        {
            if st.catalog.volume_by_name(&n)?.is_some() {
                return Err(ApiError::conflict(
                    "VOLUME_EXISTS",
                    format!("a volume named {n:?} exists"),
                ));
            }
            row.name = n;
        }
        if let Some(l) = b.labels {
            row.labels = serde_json::to_string(&l).unwrap_or_else(|_| "{}".into());
        }
        st.catalog.update_volume(&row)?;
        Ok(row)
    })
    .await?;
    Ok(HttpResponse::Ok().json(volume_out(&row)))
}

#[utoipa::path(delete, path = "/api/v1/volumes/{id}", params(("id" = String, Path, description = "Resource id")), tag = "volumes", security(("bearer" = [])),
    responses((status = 202, body = api::Job), (status = 404, body = api::ErrorBody)))]
pub async fn delete_volume(
    state: State,
    c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    let id2 = id.clone();
    blocking(&state, move |st| {
        let mut row = volume_row(st, &id2)?;
        row.state = "deleting".into();
        Ok(st.catalog.update_volume(&row)?)
    })
    .await?;
    let target = id.clone();
    let job = jobs::start(&state, "delete-volume", Some(target), move |st, _p| {
        // Sessions on the volume's exports end before its data goes.
        for row in st.catalog.exports_of(&id, None, i64::MAX)? {
            st.engine.unexport(&row);
            st.catalog.delete_export(&row.id)?;
        }
        if let Ok(v) = st.pool.volume_by_name(&id) {
            st.pool.delete_volume(v.id)?;
        }
        st.catalog.delete_volume_row(&id)?;
        Ok(serde_json::json!({ "volume": id }))
    })
    .await?;
    Ok(accepted(&job))
}

// ---------------------------------------------------------------- snapshots

#[utoipa::path(post, path = "/api/v1/volumes/{id}/snapshots", params(("id" = String, Path, description = "Resource id")), tag = "snapshots", security(("bearer" = [])),
    responses((status = 202, body = api::Job), (status = 404, body = api::ErrorBody)))]
pub async fn seal(state: State, c: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    let id2 = id.clone();
    let vrow = blocking(&state, move |st| volume_row(st, &id2)).await?;
    let job = jobs::start(&state, "seal", Some(id.clone()), move |st, p| {
        let pv = pool_volume(st, &id)?;
        let s = st.pool.seal_with_progress(pv, &|f| p.set(f))?;
        let row = SnapshotRow {
            id: new_id("snap"),
            volume: id.clone(),
            volume_name: vrow.name.clone(),
            pool: POOL_ID.into(),
            pool_snapshot: s.id.0 as i64,
            size: s.size as i64,
            block_size: s.block_size as i64,
            starred: 0,
            locked_until_ms: None,
            state: "ready".into(),
            created_ms: now_ms(),
            location: "local".into(),
        };
        st.catalog.insert_snapshot(&row)?;
        Ok(serde_json::json!({ "snapshot": row.id }))
    })
    .await?;
    Ok(accepted(&job))
}

#[utoipa::path(get, path = "/api/v1/volumes/{id}/snapshots", tag = "snapshots", params(("id" = String, Path, description = "Resource id"), Page), security(("bearer" = [])),
    responses((status = 200, body = api::List<api::Snapshot>), (status = 404, body = api::ErrorBody)))]
pub async fn list_snapshots(
    state: State,
    _c: Caller,
    id: web::Path<String>,
    q: web::Query<Page>,
) -> ApiResult<HttpResponse> {
    let limit = q.limit()?;
    let cursor = q.cursor.clone();
    let id = id.into_inner();
    let rows = blocking(&state, move |st| {
        if st.catalog.volume(&id)?.is_none() {
            return Err(ApiError::not_found("VOLUME_NOT_FOUND", "volume", &id));
        }
        Ok(st.catalog.snapshots_of(&id, cursor.as_deref(), limit + 1)?)
    })
    .await?;
    Ok(HttpResponse::Ok().json(page(rows, limit, |r| r.id.clone(), snapshot_out)))
}

#[utoipa::path(get, path = "/api/v1/snapshots/{id}", params(("id" = String, Path, description = "Resource id")), tag = "snapshots", security(("bearer" = [])),
    responses((status = 200, body = api::Snapshot), (status = 404, body = api::ErrorBody)))]
pub async fn get_snapshot(
    state: State,
    _c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = id.into_inner();
    let (row, copies) = blocking(&state, move |st| {
        let row = snapshot_row(st, &id)?;
        let copies = st.catalog.archives_of(&id)?;
        Ok((row, copies))
    })
    .await?;
    Ok(HttpResponse::Ok().json(crate::state::snapshot_with_archives(&row, &copies)))
}

#[utoipa::path(patch, path = "/api/v1/snapshots/{id}", params(("id" = String, Path, description = "Resource id")), tag = "snapshots", request_body = api::UpdateSnapshot, security(("bearer" = [])),
    responses((status = 200, body = api::Snapshot), (status = 400, body = api::ErrorBody), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn patch_snapshot(
    state: State,
    c: Caller,
    id: web::Path<String>,
    body: Body<api::UpdateSnapshot>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let (id, b) = (id.into_inner(), body.0);
    let lock = match &b.locked_until {
        Some(t) => Some(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|_| {
                    ApiError::invalid(
                        "locked_until",
                        "must be an RFC 3339 time, e.g. 2030-01-01T00:00:00Z",
                    )
                })?
                .timestamp(),
        ),
        None => None,
    };
    let row = blocking(&state, move |st| {
        let mut row = snapshot_row(st, &id)?;
        if lock.is_some() && row.location != "local" {
            return Err(ApiError::conflict(
                "SNAPSHOT_NOT_LOCAL",
                "only a local snapshot can be locked; rehydrate it first",
            ));
        }
        if let Some(until) = lock {
            if until > 253_402_300_799 {
                return Err(ApiError::invalid(
                    "locked_until",
                    "must be before the year 10000",
                ));
            }
            st.pool
                .lock_snapshot(SnapshotId(row.pool_snapshot as u64), until)?;
            row.locked_until_ms = Some(until * 1000);
        }
        if let Some(s) = b.starred {
            row.starred = s as i64;
        }
        st.catalog.update_snapshot(&row)?;
        Ok(row)
    })
    .await?;
    Ok(HttpResponse::Ok().json(snapshot_out(&row)))
}

#[utoipa::path(delete, path = "/api/v1/snapshots/{id}", params(("id" = String, Path, description = "Resource id")), tag = "snapshots", security(("bearer" = [])),
    responses((status = 202, body = api::Job), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn delete_snapshot(
    state: State,
    c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    let id2 = id.clone();
    let row = blocking(&state, move |st| {
        let mut row = snapshot_row(st, &id2)?;
        if let Some(ms) = row.locked_until_ms
            && ms > now_ms()
        {
            return Err(ApiError::conflict(
                "SNAPSHOT_LOCKED",
                format!("snapshot is locked until {}", crate::state::rfc3339(ms)),
            ));
        }
        // Deleting a snapshot deletes all its copies, in the pool and in archive targets.
        crate::archive::check_copies_deletable(st, &id2)?;
        row.state = "deleting".into();
        st.catalog.update_snapshot(&row)?;
        Ok(row)
    })
    .await?;
    let job = jobs::start(
        &state,
        "delete-snapshot",
        Some(id.clone()),
        move |st, _p| {
            if row.location == "local" {
                match st
                    .pool
                    .delete_snapshot(SnapshotId(row.pool_snapshot as u64))
                {
                    Ok(()) | Err(maas_pool::PoolError::SnapshotNotFound(_)) => {}
                    Err(e) => {
                        let mut r = row.clone();
                        r.state = "ready".into();
                        st.catalog.update_snapshot(&r)?;
                        return Err(e.into());
                    }
                }
            }
            let archives = match crate::archive::delete_copies(st, &row) {
                Ok(r) => r,
                Err(e) => {
                    // The local copy is gone; the copies not deleted keep the snapshot listed.
                    let mut r = row.clone();
                    r.state = "ready".into();
                    r.location = "archive".into();
                    r.pool_snapshot = -1;
                    if st.catalog.archives_of(&id)?.is_empty() {
                        st.catalog.delete_snapshot_row(&id)?;
                    } else {
                        st.catalog.update_snapshot(&r)?;
                    }
                    return Err(e);
                }
            };
            st.catalog.delete_snapshot_row(&id)?;
            st.catalog.delete_archives_of(&id)?;
            Ok(serde_json::json!({ "snapshot": id, "archives": archives }))
        },
    )
    .await?;
    Ok(accepted(&job))
}

#[utoipa::path(post, path = "/api/v1/snapshots/{id}/clones", params(("id" = String, Path, description = "Resource id")), tag = "snapshots", request_body = api::CreateClone, security(("bearer" = [])),
    responses((status = 202, body = api::Job), (status = 400, body = api::ErrorBody), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn clone_snapshot(
    state: State,
    c: Caller,
    id: web::Path<String>,
    body: Body<api::CreateClone>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let (id, b) = (id.into_inner(), body.0);
    validate_name("name", &b.name)?;
    let labels = b.labels.unwrap_or_default();
    validate_labels(&labels)?;
    let id2 = id.clone();
    let name = b.name.clone();
    let (srow, vrow) = blocking(&state, move |st| {
        let srow = snapshot_row(st, &id2)?;
        if srow.location != "local" {
            // Mounted straight from the archive: checked here, done by the job.
            crate::archive::archived_copy(st, &id2)?;
        }
        if st.catalog.volume_by_name(&name)?.is_some() {
            return Err(ApiError::conflict(
                "VOLUME_EXISTS",
                format!("a volume named {name:?} exists"),
            ));
        }
        let mut vrow = VolumeRow {
            id: new_id("vol"),
            name: name.clone(),
            pool: POOL_ID.into(),
            size: srow.size,
            block_size: srow.block_size,
            labels: serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into()),
            origin_snapshot: Some(srow.id.clone()),
            state: "creating".into(),
            created_ms: now_ms(),
        };
        st.catalog.insert_volume(&vrow)?;
        vrow.state = "ready".into();
        Ok((srow, vrow))
    })
    .await?;
    // One job at a time brings an archive-only snapshot into the pool.
    let claim = if srow.location == "local" {
        None
    } else {
        match AppState::claim_moving(&state, &id) {
            Some(c) => Some(c),
            None => {
                let vid = vrow.id.clone();
                blocking(&state, move |st| Ok(st.catalog.delete_volume_row(&vid)?)).await?;
                return Err(crate::archive::busy());
            }
        }
    };
    let job = jobs::start(&state, "clone", Some(id), move |st, _p| {
        let _claim = claim;
        let srow = if srow.location == "local" {
            srow
        } else {
            // Another job may have brought it in meanwhile.
            let now = snapshot_row(st, &srow.id)?;
            if now.location == "local" {
                now
            } else {
                match crate::archive::mount_lazily(st, &now) {
                    Ok(r) => r,
                    Err(e) => {
                        st.catalog.delete_volume_row(&vrow.id)?;
                        return Err(e);
                    }
                }
            }
        };
        if let Err(e) = st
            .pool
            .clone_snapshot(SnapshotId(srow.pool_snapshot as u64), &vrow.id)
        {
            st.catalog.delete_volume_row(&vrow.id)?;
            return Err(e.into());
        }
        st.catalog.update_volume(&vrow)?;
        Ok(serde_json::json!({ "volume": vrow.id }))
    })
    .await?;
    Ok(accepted(&job))
}

// ---------------------------------------------------------------- exports

fn validate_export(b: &api::CreateExport) -> ApiResult<()> {
    match b.protocol.as_str() {
        "iscsi" | "nvme-tcp" => {}
        "nbd" | "nvme-rdma" => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "PROTOCOL_UNAVAILABLE",
                format!("protocol {:?} is not served by this build yet", b.protocol),
            ));
        }
        _ => {
            return Err(ApiError::invalid(
                "protocol",
                "protocol must be iscsi or nvme-tcp",
            ));
        }
    }
    if b.initiators.len() > 256 {
        return Err(ApiError::invalid("initiators", "at most 256 initiators"));
    }
    for (i, name) in b.initiators.iter().enumerate() {
        let ok = match b.protocol.as_str() {
            "iscsi" => {
                name.starts_with("iqn.") || name.starts_with("eui.") || name.starts_with("naa.")
            }
            _ => name.starts_with("nqn."),
        } && name.len() <= 223
            && !name.chars().any(|c| c.is_whitespace() || c.is_control());
        if !ok {
            return Err(ApiError::invalid(
                &format!("initiators[{i}]"),
                "an iSCSI name (iqn./eui./naa.) or NVMe host NQN (nqn.), at most 223 characters",
            ));
        }
    }
    if let Some(d) = &b.dhchap {
        if b.protocol != "nvme-tcp" {
            return Err(ApiError::invalid(
                "dhchap",
                "DH-HMAC-CHAP applies to nvme-tcp exports",
            ));
        }
        crate::engine::dhchap_config(d).map_err(|(field, why)| ApiError::invalid(field, why))?;
    }
    if let Some(ch) = &b.chap {
        if b.protocol != "iscsi" {
            return Err(ApiError::invalid("chap", "CHAP applies to iSCSI exports"));
        }
        let secret_ok = |s: &str| (12..=255).contains(&s.len());
        if ch.user.is_empty() || ch.user.len() > 255 {
            return Err(ApiError::invalid("chap.user", "1-255 characters"));
        }
        if !secret_ok(&ch.secret) {
            return Err(ApiError::invalid(
                "chap.secret",
                "12-255 characters (Windows needs 12-16)",
            ));
        }
        match (&ch.mutual_user, &ch.mutual_secret) {
            (None, None) => {}
            (Some(u), Some(s)) if !u.is_empty() && secret_ok(s) && s != &ch.secret => {}
            _ => {
                return Err(ApiError::invalid(
                    "chap.mutual_secret",
                    "mutual CHAP needs mutual_user and a 12-255 character mutual_secret different from secret",
                ));
            }
        }
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/volumes/{id}/exports", tag = "exports", params(("id" = String, Path, description = "Resource id"), Page), security(("bearer" = [])),
    responses((status = 200, body = api::List<api::Export>), (status = 404, body = api::ErrorBody)))]
pub async fn list_exports(
    state: State,
    _c: Caller,
    id: web::Path<String>,
    q: web::Query<Page>,
) -> ApiResult<HttpResponse> {
    let limit = q.limit()?;
    let cursor = q.cursor.clone();
    let id = id.into_inner();
    let rows = blocking(&state, move |st| {
        volume_row(st, &id)?;
        Ok(st.catalog.exports_of(&id, cursor.as_deref(), limit + 1)?)
    })
    .await?;
    Ok(HttpResponse::Ok().json(page(
        rows,
        limit,
        |r| r.id.clone(),
        |r| export_out(r, &state),
    )))
}

#[utoipa::path(post, path = "/api/v1/volumes/{id}/exports", params(("id" = String, Path, description = "Resource id")), tag = "exports", request_body = api::CreateExport, security(("bearer" = [])),
    responses((status = 201, body = api::Export), (status = 400, body = api::ErrorBody), (status = 404, body = api::ErrorBody), (status = 422, body = api::ErrorBody)))]
pub async fn create_export(
    state: State,
    c: Caller,
    id: web::Path<String>,
    body: Body<api::CreateExport>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let (id, b) = (id.into_inner(), body.0);
    validate_export(&b)?;
    let row = blocking(&state, move |st| {
        volume_row(st, &id)?;
        let eid = new_id("exp");
        let target = match b.protocol.as_str() {
            "nvme-tcp" => format!("nqn.2026-11.io.maas:{eid}"),
            _ => format!("iqn.2026-11.io.maas:{eid}"),
        };
        let row = ExportRow {
            id: eid.clone(),
            volume: id,
            protocol: b.protocol.clone(),
            initiators: serde_json::to_string(&b.initiators).unwrap_or_else(|_| "[]".into()),
            // The per-export secret column: CHAP for iSCSI, DH-HMAC-CHAP for NVMe/TCP, sealed.
            chap: match (&b.chap, &b.dhchap) {
                (Some(c), _) => Some(
                    crate::secrets::seal_chap(&st.vault, &eid, c)
                        .map_err(|e| ApiError::internal(e.to_string()))?,
                ),
                (None, Some(d)) => Some(
                    crate::secrets::seal_dhchap(&st.vault, &eid, d)
                        .map_err(|e| ApiError::internal(e.to_string()))?,
                ),
                (None, None) => None,
            },
            target,
            created_ms: now_ms(),
            read_only: i64::from(b.read_only),
        };
        st.catalog.insert_export(&row)?;
        if let Err(e) = st.engine.export(&st.pool, &row, &st.vault) {
            let _ = st.catalog.delete_export(&row.id);
            return Err(e);
        }
        tracing::info!(export = %row.id, volume = %row.volume, protocol = %row.protocol, "export created");
        Ok(row)
    })
    .await?;
    Ok(HttpResponse::Created().json(export_out(&row, &state)))
}

#[utoipa::path(get, path = "/api/v1/exports/{id}", params(("id" = String, Path, description = "Resource id")), tag = "exports", security(("bearer" = [])),
    responses((status = 200, body = api::Export), (status = 404, body = api::ErrorBody)))]
pub async fn get_export(
    state: State,
    _c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = id.into_inner();
    let row = blocking(&state, move |st| {
        st.catalog
            .export(&id)?
            .ok_or_else(|| ApiError::not_found("EXPORT_NOT_FOUND", "export", &id))
    })
    .await?;
    Ok(HttpResponse::Ok().json(export_out(&row, &state)))
}

#[utoipa::path(delete, path = "/api/v1/exports/{id}", params(("id" = String, Path, description = "Resource id")), tag = "exports", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = api::ErrorBody)))]
pub async fn delete_export(
    state: State,
    c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    blocking(&state, move |st| {
        let row = st
            .catalog
            .export(&id)?
            .ok_or_else(|| ApiError::not_found("EXPORT_NOT_FOUND", "export", &id))?;
        st.engine.unexport(&row);
        Ok(st.catalog.delete_export(&id)?)
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

// ---------------------------------------------------------------- jobs

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", params(Page), security(("bearer" = [])),
    responses((status = 200, body = api::List<api::Job>)))]
pub async fn list_jobs(state: State, _c: Caller, q: web::Query<Page>) -> ApiResult<HttpResponse> {
    let limit = q.limit()?;
    let cursor = q.cursor.clone();
    let rows = blocking(&state, move |st| {
        Ok(st.catalog.jobs(cursor.as_deref(), limit + 1)?)
    })
    .await?;
    Ok(HttpResponse::Ok().json(page(rows, limit, |r| r.id.clone(), job_out)))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", params(("id" = String, Path, description = "Resource id")), tag = "jobs", security(("bearer" = [])),
    responses((status = 200, body = api::Job), (status = 404, body = api::ErrorBody)))]
pub async fn get_job(state: State, _c: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = id.into_inner();
    let row = blocking(&state, move |st| {
        st.catalog
            .job(&id)?
            .ok_or_else(|| ApiError::not_found("JOB_NOT_FOUND", "job", &id))
    })
    .await?;
    Ok(HttpResponse::Ok().json(job_out(&row)))
}

// ---------------------------------------------------------------- tokens

#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", security(("bearer" = [])),
    responses((status = 200, body = api::List<api::Token>), (status = 403, body = api::ErrorBody)))]
pub async fn list_tokens(state: State, c: Caller) -> ApiResult<HttpResponse> {
    c.require(Role::Admin)?;
    let (rows, st) = (
        blocking(&state, |st| Ok(st.catalog.tokens()?)).await?,
        state.clone(),
    );
    Ok(HttpResponse::Ok().json(api::List {
        items: rows.iter().map(|r| st.token_out(r)).collect(),
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = api::CreateToken, security(("bearer" = [])),
    responses((status = 201, body = api::CreatedToken), (status = 400, body = api::ErrorBody), (status = 403, body = api::ErrorBody)))]
pub async fn create_token(
    state: State,
    c: Caller,
    body: Body<api::CreateToken>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Admin)?;
    let b = body.0;
    validate_name("name", &b.name)?;
    let role = Role::parse(&b.role)
        .ok_or_else(|| ApiError::invalid("role", "role must be admin, operator or viewer"))?;
    let now = now_ms();
    let expires_ms = match &b.expires_at {
        None => None,
        Some(t) => {
            let at = chrono::DateTime::parse_from_rfc3339(t).map_err(|e| {
                ApiError::invalid(
                    "expires_at",
                    format!("expires_at must be an RFC 3339 time: {e}"),
                )
            })?;
            let ms = at.timestamp_millis();
            if ms <= now {
                return Err(ApiError::invalid(
                    "expires_at",
                    "expires_at must be in the future",
                ));
            }
            Some(ms)
        }
    };
    let secret = new_secret();
    let row = TokenRow {
        id: new_id("tok"),
        name: b.name,
        role: role.as_str().into(),
        secret_hash: hash_secret(&secret),
        created_ms: now,
        expires_ms,
        last_used_ms: None,
    };
    let r2 = row.clone();
    blocking(&state, move |st| {
        st.catalog.insert_token(&r2)?;
        st.reload_tokens()
    })
    .await?;
    Ok(HttpResponse::Created().json(api::CreatedToken {
        token: token_out(&row),
        secret,
    }))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", params(("id" = String, Path, description = "Resource id")), tag = "tokens", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn delete_token(
    state: State,
    c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Admin)?;
    let id = id.into_inner();
    if id == c.token_id {
        return Err(ApiError::conflict(
            "TOKEN_IN_USE",
            "a token cannot revoke itself",
        ));
    }
    blocking(&state, move |st| {
        if !st.catalog.delete_token(&id)? {
            return Err(ApiError::not_found("TOKEN_NOT_FOUND", "token", &id));
        }
        st.reload_tokens()
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}
