//! Snapshot file manifests: what a file-tree backup put in a snapshot (path, kind, size, mode,
//! owner, mtime, BLAKE3 of content), recorded by the probe after the seal and kept in the
//! catalog with the snapshot (deleted with it), for browsing, drills and audit.
//!
//! The body is JSON lines (one [`maas_api::ManifestEntry`] per line), read as a stream up to
//! [`MAX_MANIFEST_BYTES`], every line checked, and stored zstd-compressed.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use futures_util::StreamExt as _;
use maas_api as api;

use crate::auth::{Caller, Role};
use crate::catalog::ManifestRow;
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, blocking, now_ms, rfc3339};

type State = web::Data<AppState>;

/// Largest manifest body accepted (about a million files).
pub const MAX_MANIFEST_BYTES: usize = 512 << 20;
/// Longest line (one entry: a path of up to 4096 bytes and its fields).
const MAX_LINE: usize = 16 << 10;

fn bad(msg: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "INVALID_MANIFEST", msg)
}

/// Checks one line; returns the file bytes it counts.
fn check_entry(line: &[u8], n: u64) -> ApiResult<u64> {
    let e: api::ManifestEntry = serde_json::from_slice(line)
        .map_err(|err| bad(format!("line {n}: not a manifest entry: {err}")))?;
    if !e.path.starts_with('/') || e.path.len() > 4096 || e.path.contains('\0') {
        return Err(bad(format!(
            "line {n}: path must be absolute, at most 4096 bytes"
        )));
    }
    if !api::ManifestEntry::KINDS.contains(&e.kind.as_str()) {
        return Err(bad(format!("line {n}: unknown kind {:?}", e.kind)));
    }
    if let Some(h) = &e.blake3
        && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(bad(format!("line {n}: blake3 must be 64 hex digits")));
    }
    Ok(if e.kind == "file" { e.size } else { 0 })
}

#[utoipa::path(put, path = "/api/v1/snapshots/{id}/manifest", params(("id" = String, Path, description = "Snapshot id")), tag = "snapshots",
    request_body(content = String, content_type = "application/x-ndjson", description = "One ManifestEntry per line"),
    security(("bearer" = [])),
    responses((status = 200, body = api::ManifestInfo), (status = 400, body = api::ErrorBody), (status = 404, body = api::ErrorBody), (status = 413, body = api::ErrorBody)))]
pub async fn put_manifest(
    state: State,
    c: Caller,
    id: web::Path<String>,
    mut body: web::Payload,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    let id2 = id.clone();
    blocking(&state, move |st| {
        crate::api::snapshot_row(st, &id2).map(|_| ())
    })
    .await?;
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3)
        .map_err(|e| ApiError::internal(format!("zstd: {e}")))?;
    let (mut total, mut entries, mut file_bytes) = (0usize, 0u64, 0u64);
    let mut line: Vec<u8> = Vec::new();
    let mut take_line =
        |line: &mut Vec<u8>, enc: &mut zstd::stream::Encoder<'static, Vec<u8>>| -> ApiResult<()> {
            let l = line.trim_ascii();
            if !l.is_empty() {
                entries += 1;
                file_bytes = file_bytes.saturating_add(check_entry(l, entries)?);
                use std::io::Write as _;
                enc.write_all(l)
                    .and_then(|_| enc.write_all(b"\n"))
                    .map_err(|e| ApiError::internal(format!("zstd: {e}")))?;
            }
            line.clear();
            Ok(())
        };
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| bad(format!("cannot read body: {e}")))?;
        total += chunk.len();
        if total > MAX_MANIFEST_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "MANIFEST_TOO_LARGE",
                format!("a manifest is at most {MAX_MANIFEST_BYTES} bytes"),
            ));
        }
        for part in chunk.split_inclusive(|&b| b == b'\n') {
            line.extend_from_slice(part);
            if line.len() > MAX_LINE {
                return Err(bad(format!(
                    "line {}: longer than {MAX_LINE} bytes",
                    entries + 1
                )));
            }
            if part.ends_with(b"\n") {
                take_line(&mut line, &mut enc)?;
            }
        }
    }
    take_line(&mut line, &mut enc)?;
    let data = enc
        .finish()
        .map_err(|e| ApiError::internal(format!("zstd: {e}")))?;
    let row = ManifestRow {
        snapshot: id.clone(),
        entries: entries as i64,
        file_bytes: file_bytes as i64,
        created_ms: now_ms(),
        data,
    };
    let info = api::ManifestInfo {
        snapshot: id,
        entries,
        file_bytes,
        created_at: rfc3339(row.created_ms),
    };
    blocking(&state, move |st| {
        // The snapshot may have been deleted meanwhile: never keep a manifest without it.
        if st.catalog.put_manifest(&row)? {
            Ok(())
        } else {
            Err(ApiError::not_found(
                "SNAPSHOT_NOT_FOUND",
                "snapshot",
                &row.snapshot,
            ))
        }
    })
    .await?;
    tracing::info!(snapshot = %info.snapshot, entries, file_bytes, "file manifest recorded");
    Ok(HttpResponse::Ok().json(info))
}

#[utoipa::path(get, path = "/api/v1/snapshots/{id}/manifest", params(("id" = String, Path, description = "Snapshot id")), tag = "snapshots",
    security(("bearer" = [])),
    responses((status = 200, description = "One ManifestEntry per line", content_type = "application/x-ndjson", body = String),
        (status = 404, body = api::ErrorBody)))]
pub async fn get_manifest(
    state: State,
    _c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = id.into_inner();
    let row = blocking(&state, move |st| {
        crate::api::snapshot_row(st, &id)?;
        st.catalog
            .manifest(&id)?
            .ok_or_else(|| ApiError::not_found("MANIFEST_NOT_FOUND", "manifest of snapshot", &id))
    })
    .await?;
    let text = zstd::stream::decode_all(row.data.as_slice())
        .map_err(|e| ApiError::internal(format!("stored manifest unreadable: {e}")))?;
    Ok(HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header(("x-manifest-entries", row.entries.to_string()))
        .body(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_checked() {
        let ok = br#"{"path":"/a","kind":"file","size":3,"mode":420,"uid":0,"gid":0,"mtime_ns":1,"blake3":"0000000000000000000000000000000000000000000000000000000000000000"}"#;
        assert_eq!(check_entry(ok, 1).ok(), Some(3));
        let rel = br#"{"path":"a","kind":"file","size":3,"mode":420,"uid":0,"gid":0,"mtime_ns":1}"#;
        assert!(check_entry(rel, 1).is_err());
        let kind =
            br#"{"path":"/a","kind":"door","size":3,"mode":420,"uid":0,"gid":0,"mtime_ns":1}"#;
        assert!(check_entry(kind, 1).is_err());
        let hash = br#"{"path":"/a","kind":"file","size":3,"mode":420,"uid":0,"gid":0,"mtime_ns":1,"blake3":"xyz"}"#;
        assert!(check_entry(hash, 1).is_err());
        assert!(check_entry(b"{}", 1).is_err());
        assert!(check_entry(b"\xff\xfe", 1).is_err());
    }
}
