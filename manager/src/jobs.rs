//! Long operations (seal, clone, deletes, verify) run as jobs persisted in the catalog: a POST
//! answers 202 with the job; the work runs on a blocking thread; the row records progress,
//! the result or a typed error. Jobs left unfinished by a crash are failed at start-up (each
//! pool operation is atomic, and reconciliation adopts whatever completed).

use std::sync::atomic::Ordering;

use actix_web::web;
use tracing::Instrument;

use crate::catalog::JobRow;
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, new_id, now_ms};

/// Handed to a job's work: reports progress to the catalog (at most every 250 ms).
pub struct Progress<'a> {
    st: &'a AppState,
    row: std::sync::Mutex<(JobRow, std::time::Instant)>,
}

impl std::fmt::Debug for Progress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

impl Progress<'_> {
    pub fn set(&self, fraction: f64) {
        let Ok(mut g) = self.row.lock() else { return };
        let milli = (fraction.clamp(0.0, 1.0) * 1000.0) as i64;
        if milli <= g.0.progress_milli || g.1.elapsed() < std::time::Duration::from_millis(250) {
            return;
        }
        g.0.progress_milli = milli;
        g.0.updated_ms = now_ms();
        g.1 = std::time::Instant::now();
        if let Err(e) = self.st.catalog.update_job(&g.0) {
            tracing::warn!(error = %e, "cannot record job progress");
        }
    }

    /// Progress with what the job has done so far (bytes, objects...), recorded at most every
    /// 250 ms, or at once when `force`.
    pub fn set_detail(&self, fraction: f64, detail: serde_json::Value, force: bool) {
        let Ok(mut g) = self.row.lock() else { return };
        if !force && g.1.elapsed() < std::time::Duration::from_millis(250) {
            return;
        }
        let milli = (fraction.clamp(0.0, 1.0) * 1000.0) as i64;
        g.0.progress_milli = g.0.progress_milli.max(milli);
        g.0.progress_detail = Some(detail.to_string());
        g.0.updated_ms = now_ms();
        g.1 = std::time::Instant::now();
        if let Err(e) = self.st.catalog.update_job(&g.0) {
            tracing::warn!(error = %e, "cannot record job progress");
        }
    }

    /// The job's id.
    pub fn job_id(&self) -> String {
        self.row.lock().map(|g| g.0.id.clone()).unwrap_or_default()
    }

    /// The detail last recorded.
    pub fn detail(&self) -> Option<String> {
        self.row
            .lock()
            .ok()
            .and_then(|g| g.0.progress_detail.clone())
    }
}

pub async fn start(
    state: &web::Data<AppState>,
    kind: &'static str,
    target: Option<String>,
    work: impl FnOnce(&AppState, &Progress<'_>) -> ApiResult<serde_json::Value> + Send + 'static,
) -> ApiResult<JobRow> {
    let row = queued_row(kind, target);
    let r2 = row.clone();
    crate::state::blocking(state, move |st| Ok(st.catalog.insert_job(&r2)?)).await?;
    let st = state.clone();
    let mut job = row.clone();
    let span = tracing::info_span!("job", id = %job.id, kind, target = ?job.target, request_id = %crate::error::current_request_id());
    st.running_jobs.fetch_add(1, Ordering::SeqCst);
    tokio::task::spawn_blocking(move || {
        let _e = span.enter();
        job.state = "running".into();
        job.updated_ms = now_ms();
        if let Err(e) = st.catalog.update_job(&job) {
            tracing::warn!(error = %e, "cannot record job start");
        }
        let progress = Progress {
            st: &st,
            row: std::sync::Mutex::new((job.clone(), std::time::Instant::now())),
        };
        let outcome = work(&st, &progress);
        job.progress_detail = progress.detail();
        drop(progress);
        job.updated_ms = now_ms();
        match outcome {
            Ok(result) => {
                job.state = "succeeded".into();
                job.progress_milli = 1000;
                job.result = Some(result.to_string());
                tracing::info!("job succeeded");
            }
            Err(e) => {
                job.state = "failed".into();
                job.error = serde_json::to_string(&e.body()).ok();
                tracing::warn!(code = e.code, error = %e.message, "job failed");
            }
        }
        if let Err(e) = st.catalog.update_job(&job) {
            tracing::error!(error = %e, "cannot record job outcome");
        }
        st.running_jobs.fetch_sub(1, Ordering::SeqCst);
    });
    Ok(row)
}

/// A new job's row, queued now (for maasd to run; [`JobRow::host`] set makes it a probe's).
pub fn queued_row(kind: &str, target: Option<String>) -> JobRow {
    let now = now_ms();
    JobRow {
        id: new_id("job"),
        kind: kind.into(),
        state: "queued".into(),
        progress_milli: 0,
        target,
        error: None,
        result: None,
        created_ms: now,
        updated_ms: now,
        progress_detail: None,
        host: None,
        params: None,
    }
}

/// Fails jobs a previous run left unfinished.
pub fn fail_interrupted(st: &AppState) -> ApiResult<usize> {
    let jobs = st.catalog.unfinished_jobs()?;
    let n = jobs.len();
    for mut j in jobs {
        j.state = "failed".into();
        j.updated_ms = now_ms();
        let e = ApiError::new(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "INTERRUPTED",
            "maasd stopped while this job ran; what it completed has been reconciled, retry if needed",
        );
        j.error = serde_json::to_string(&e.body()).ok();
        st.catalog.update_job(&j)?;
        tracing::warn!(job = %j.id, kind = %j.kind, "job interrupted by a restart marked failed");
    }
    Ok(n)
}

/// Waits (bounded) for running jobs to finish, for a graceful shutdown.
pub async fn drain(st: &AppState, max: std::time::Duration) {
    let t = std::time::Instant::now();
    while st.running_jobs.load(Ordering::SeqCst) > 0 && t.elapsed() < max {
        tokio::time::sleep(std::time::Duration::from_millis(50))
            .instrument(tracing::debug_span!("drain"))
            .await;
    }
}
