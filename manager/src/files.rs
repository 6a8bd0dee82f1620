//! Browsing the files inside a snapshot (the server side of fine-grained restore): list a
//! directory, download one file (with HTTP ranges, so a large download can resume). The bytes
//! are read by the media engine straight from the snapshot ([`maas_engine::snapfs`]): nothing
//! is cloned, exported or mounted.
//!
//! Listing needs any role (the file manifest shows the same names); reading a file's content
//! is restoring data and needs an operator. Snapshots whose data lives only in an archive are
//! refused with a hint (rehydrate or clone first): browsing never starts a transfer on its own.

use std::time::Duration;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use maas_api as api;
use maas_engine::snapfs::{FilesError, SnapshotFiles};
use maas_pool::{SnapshotId, SnapshotReader};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::{Caller, Role};
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, blocking};

type State = web::Data<AppState>;

/// Bytes read and sent per piece of a download.
const PIECE: usize = 1 << 20;
/// How long a download waits for a client that stopped reading before it gives up.
const STALLED_CLIENT: Duration = Duration::from_secs(120);
const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;

impl From<FilesError> for ApiError {
    fn from(e: FilesError) -> Self {
        use StatusCode as S;
        let (status, code) = match &e {
            FilesError::Pool(_) => {
                let FilesError::Pool(p) = e else {
                    return ApiError::internal("unreachable");
                };
                return p.into();
            }
            FilesError::NoFilesystem(_) => (S::UNPROCESSABLE_ENTITY, "NO_FILESYSTEM"),
            FilesError::NotFound(_) => (S::NOT_FOUND, "PATH_NOT_FOUND"),
            FilesError::NotADirectory(_) => (S::UNPROCESSABLE_ENTITY, "NOT_A_DIRECTORY"),
            FilesError::NotAFile(_) => (S::UNPROCESSABLE_ENTITY, "NOT_A_FILE"),
            FilesError::InvalidPath(..) => (S::BAD_REQUEST, "INVALID_ARGUMENT"),
            FilesError::DirectoryTooLarge(_) => (S::UNPROCESSABLE_ENTITY, "DIRECTORY_TOO_LARGE"),
            FilesError::Filesystem(_) => (S::UNPROCESSABLE_ENTITY, "FILESYSTEM_UNREADABLE"),
            FilesError::Read(_) => (S::INTERNAL_SERVER_ERROR, "READ_FAILED"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Absolute path of a directory in the snapshot's filesystem; default `/`.
    pub path: Option<String>,
    /// Where the previous page ended: its `next_after` (opaque).
    pub after: Option<String>,
    /// 1..10000, default 1000.
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ContentQuery {
    /// Absolute path of a regular file in the snapshot's filesystem.
    pub path: String,
}

/// The snapshot's row and a reader of its bytes in the pool.
async fn reader(state: &State, id: String) -> ApiResult<SnapshotReader> {
    blocking(state, move |st| {
        let row = crate::api::snapshot_row(st, &id)?;
        if row.location != "local" || row.pool_snapshot < 0 {
            return Err(ApiError::conflict(
                "SNAPSHOT_NOT_LOCAL",
                format!(
                    "snapshot {id} is held only in an archive: bring it back \
                     (POST /api/v1/snapshots/{id}/rehydrate) or clone it, then browse it"
                ),
            ));
        }
        Ok(st
            .pool
            .snapshot_reader(SnapshotId(row.pool_snapshot as u64))?)
    })
    .await
}

#[utoipa::path(get, path = "/api/v1/snapshots/{id}/files", tag = "snapshots",
    params(("id" = String, Path, description = "Snapshot id"), ListQuery),
    security(("bearer" = [])),
    responses((status = 200, body = api::SnapshotFileListing), (status = 400, body = api::ErrorBody),
        (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody), (status = 422, body = api::ErrorBody)))]
pub async fn list_files(
    state: State,
    _c: Caller,
    id: web::Path<String>,
    q: web::Query<ListQuery>,
) -> ApiResult<HttpResponse> {
    let id = id.into_inner();
    let q = q.into_inner();
    let limit = match q.limit {
        None => DEFAULT_LIMIT,
        Some(l) if (1..=MAX_LIMIT as u32).contains(&l) => l as usize,
        Some(_) => {
            return Err(ApiError::invalid(
                "limit",
                format!("limit must be between 1 and {MAX_LIMIT}"),
            ));
        }
    };
    let path = q.path.unwrap_or_else(|| "/".into());
    // The cursor is the last name's raw bytes in hex: names need not be UTF-8, and a lossy
    // cursor would skip or repeat entries.
    let after = match q.after.as_deref() {
        None => None,
        Some(h) => Some(
            hex::decode(h)
                .map_err(|_| ApiError::invalid("after", "after is a previous page's next_after"))?,
        ),
    };
    let r = reader(&state, id.clone()).await?;
    let path2 = path.clone();
    let _slot = browse_slot()?;
    let listing = blocking(&state, move |_| {
        let fs = SnapshotFiles::open(r)?;
        Ok(fs.list(&path2, after.as_deref(), limit)?)
    })
    .await?;
    let next_after = if listing.more {
        listing.entries.last().map(|e| hex::encode(&e.raw_name))
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(api::SnapshotFileListing {
        snapshot: id,
        path,
        entries: listing
            .entries
            .into_iter()
            .map(|e| api::SnapshotFileEntry {
                name: e.name,
                name_is_utf8: e.name_is_utf8,
                kind: e.kind.into(),
                size: e.size,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                link_target: e.link_target,
            })
            .collect(),
        next_after,
    }))
}

/// A single byte range asked for with `Range:` (the only kind served; anything else gets the
/// whole file, as HTTP allows). `Err` when the range cannot be satisfied.
fn parse_range(value: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        // The last `b` bytes.
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end: u64 = if b.is_empty() {
            u64::MAX
        } else {
            b.parse().ok()?
        };
        if end < start {
            return None;
        }
        if start >= len {
            return Some(Err(()));
        }
        (start, end.min(len - 1))
    };
    Some(Ok(range))
}

/// A `Content-Disposition` value naming the file's last component, safe for any name.
fn disposition(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or("file");
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' && c != '%' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// Listings and downloads in progress at once: each holds a blocking thread (shared with the
/// catalog's calls) while it works, so they are capped, and a client over the cap is told to
/// come back rather than queued.
const MAX_BROWSING: usize = 16;

static BROWSING: std::sync::LazyLock<std::sync::Arc<tokio::sync::Semaphore>> =
    std::sync::LazyLock::new(|| std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_BROWSING)));

fn browse_slot() -> ApiResult<tokio::sync::OwnedSemaphorePermit> {
    BROWSING.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TOO_MANY_DOWNLOADS",
            format!("{MAX_BROWSING} snapshot listings or downloads are in progress; retry shortly"),
        )
    })
}

/// A download that takes longer than this is cut off (a client reading one piece now and
/// then would otherwise hold its thread for ever).
const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(6 * 3600);

/// What the reading thread reports once the file is open.
struct Opened {
    len: u64,
    range: Option<Result<(u64, u64), ()>>,
}

#[utoipa::path(get, path = "/api/v1/snapshots/{id}/files/content", tag = "snapshots",
    params(("id" = String, Path, description = "Snapshot id"), ContentQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range of the file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, body = api::ErrorBody), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody),
        (status = 416, description = "The range lies outside the file"), (status = 422, body = api::ErrorBody)))]
pub async fn file_content(
    state: State,
    c: Caller,
    req: HttpRequest,
    id: web::Path<String>,
    q: web::Query<ContentQuery>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    let path = q.into_inner().path;
    let range_header = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let r = reader(&state, id.clone()).await?;
    let slot = browse_slot()?;

    // `Ext4` is not `Send`: one blocking thread opens the file and reads it to the end,
    // handing pieces to the response through a small channel (back-pressure: it reads no
    // faster than the client takes).
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel::<ApiResult<Opened>>();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let handle = tokio::runtime::Handle::current();
    let request_id = crate::error::current_request_id();
    let span = tracing::Span::current();
    let path2 = path.clone();
    tokio::task::spawn_blocking(move || {
        // Held until the last piece is handed over.
        let _slot = slot;
        let started = std::time::Instant::now();
        let _e = span.enter();
        crate::error::REQUEST_ID.sync_scope(request_id, || {
            let opened = SnapshotFiles::open(r).and_then(|fs| {
                let f = fs.open_file(&path2)?;
                Ok((fs, f))
            });
            let (_fs, mut f) = match opened {
                Ok(x) => x,
                Err(e) => {
                    let _ = opened_tx.send(Err(e.into()));
                    return;
                }
            };
            let len = f.len();
            let range = range_header.as_deref().and_then(|h| parse_range(h, len));
            let (start, end) = match range {
                Some(Ok((a, b))) => (a, b + 1),
                Some(Err(())) => {
                    let _ = opened_tx.send(Ok(Opened { len, range }));
                    return;
                }
                None => (0, len),
            };
            if let Err(e) = f.seek(start) {
                let _ = opened_tx.send(Err(e.into()));
                return;
            }
            if opened_tx.send(Ok(Opened { len, range })).is_err() {
                return;
            }
            let mut at = start;
            while at < end {
                if started.elapsed() > DOWNLOAD_DEADLINE {
                    tracing::warn!(path = %path2, sent = at - start, "file download cut off at its deadline");
                    return;
                }
                let want = PIECE.min((end - at) as usize);
                let mut buf = vec![0u8; want];
                let piece = match f.read(&mut buf) {
                    Ok(n) if n == want => Ok(Bytes::from(buf)),
                    Ok(n) => Err(std::io::Error::other(format!(
                        "{path2}: the file ended at {} bytes, before its recorded length {len}",
                        at + n as u64
                    ))),
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                };
                let failed = piece.is_err();
                if let Err(e) = &piece {
                    // The status line is gone already: the client sees a short body (the
                    // length was announced), and the log says why.
                    tracing::error!(path = %path2, offset = at, error = %e, "file download failed");
                }
                match handle.block_on(tokio::time::timeout(STALLED_CLIENT, tx.send(piece))) {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return, // the client went away
                    Err(_) => {
                        tracing::warn!(path = %path2, "file download abandoned: the client stopped reading");
                        return;
                    }
                }
                if failed {
                    return;
                }
                at += want as u64;
            }
            tracing::info!(path = %path2, bytes = end - start, "file downloaded from snapshot");
        })
    });
    let opened = opened_rx
        .await
        .map_err(|_| ApiError::internal("the file reader stopped before opening the file"))??;
    let (status, start, end) = match opened.range {
        None => (StatusCode::OK, 0, opened.len),
        Some(Ok((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b + 1),
        Some(Err(())) => {
            return Ok(HttpResponse::RangeNotSatisfiable()
                .insert_header((header::CONTENT_RANGE, format!("bytes */{}", opened.len)))
                .finish());
        }
    };
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut resp = HttpResponse::build(status);
    resp.content_type("application/octet-stream")
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .insert_header((header::CONTENT_DISPOSITION, disposition(&path)))
        .no_chunking(end - start);
    if status == StatusCode::PARTIAL_CONTENT {
        resp.insert_header((
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{}", end - 1, opened.len),
        ));
    }
    Ok(resp.streaming(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=90-500", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-1000", 100), Some(Ok((0, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=-0", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-", 0), Some(Err(())));
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=x-1", 100), None);
    }

    #[test]
    fn dispositions_are_safe() {
        assert_eq!(
            disposition("/a/report.txt"),
            "attachment; filename=\"report.txt\"; filename*=UTF-8''report.txt"
        );
        let d = disposition("/a/\"x\"\r\nSet-Cookie: é");
        assert!(!d.contains('\r') && !d.contains('\n'));
        assert!(d.contains("filename*=UTF-8''%22x%22%0D%0ASet-Cookie%3A%20%C3%A9"));
    }
}
