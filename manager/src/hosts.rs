//! Protected hosts and the jobs their probes run. A probe registers its host (name, IQN,
//! host NQN), heartbeats, claims the jobs queued for it and reports their progress and
//! outcome. The work and its data stay on the host and the block path: maasd only records
//! intent and what the probe reports, so a maasd restart interrupts nothing (the probe keeps
//! working and reports once maasd is back; such jobs are not failed at start-up as maasd's
//! own are).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use maas_api as api;

use crate::api::{Body, Page, page, validate_name};
use crate::auth::{Caller, Role};
use crate::catalog::HostRow;
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, blocking, job_out, new_id, now_ms, rfc3339};

type State = web::Data<AppState>;

/// A host is `online` while its last heartbeat is younger than this.
pub const ONLINE_WITHIN_MS: i64 = 60_000;
/// Most jobs waiting for one host (a runaway scheduler cannot fill the catalog).
const MAX_QUEUED_PER_HOST: usize = 1000;

fn host_row(st: &AppState, id: &str) -> ApiResult<HostRow> {
    st.catalog
        .host(id)?
        .ok_or_else(|| ApiError::not_found("HOST_NOT_FOUND", "host", id))
}

fn host_out(st: &AppState, r: &HostRow) -> ApiResult<api::Host> {
    let now = now_ms();
    let state = match r.last_heartbeat_ms {
        None => "registered",
        Some(t) if now - t <= ONLINE_WITHIN_MS => "online",
        Some(_) => "offline",
    };
    let queued = st.catalog.count_host_jobs(&r.id, "queued")?;
    let running = st.catalog.count_host_jobs(&r.id, "running")?;
    Ok(api::Host {
        id: r.id.clone(),
        name: r.name.clone(),
        hostnqn: r.hostnqn.clone(),
        iqn: r.iqn.clone(),
        version: r.version.clone(),
        state: state.into(),
        last_heartbeat: r.last_heartbeat_ms.map(rfc3339),
        jobs_queued: queued.max(0) as u64,
        jobs_running: running.max(0) as u64,
        created_at: rfc3339(r.created_ms),
    })
}

fn validate_register(b: &api::RegisterHost) -> ApiResult<()> {
    validate_name("name", &b.name)?;
    if !b.hostnqn.starts_with("nqn.") || b.hostnqn.len() > 223 {
        return Err(ApiError::invalid(
            "hostnqn",
            "an NVMe Qualified Name (nqn.…), at most 223 bytes",
        ));
    }
    let iqn_ok =
        (b.iqn.starts_with("iqn.") || b.iqn.starts_with("eui.") || b.iqn.starts_with("naa."))
            && b.iqn.len() <= 223;
    if !iqn_ok {
        return Err(ApiError::invalid(
            "iqn",
            "an iSCSI name (iqn.…, eui.… or naa.…), at most 223 bytes",
        ));
    }
    if b.hostnqn.chars().chain(b.iqn.chars()).any(char::is_control) {
        return Err(ApiError::invalid("hostnqn", "no control characters"));
    }
    if b.version.len() > 64 {
        return Err(ApiError::invalid("version", "at most 64 characters"));
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/hosts", tag = "hosts", request_body = api::RegisterHost, security(("bearer" = [])),
    responses((status = 201, body = api::Host, description = "Registered"), (status = 200, body = api::Host, description = "Registered again (same name and host NQN)"),
        (status = 400, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn register_host(
    state: State,
    c: Caller,
    body: Body<api::RegisterHost>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let b = body.0;
    validate_register(&b)?;
    let (created, host) = blocking(&state, move |st| {
        let now = now_ms();
        match st.catalog.host_by_name(&b.name)? {
            // The same host again (a reinstalled probe keeps its identity file, or the
            // registration is repeated): its record is brought up to date.
            Some(mut r) if r.hostnqn == b.hostnqn => {
                r.iqn = b.iqn;
                r.version = b.version;
                r.last_heartbeat_ms = Some(now);
                st.catalog.update_host(&r)?;
                Ok((false, host_out(st, &r)?))
            }
            Some(r) => Err(ApiError::conflict(
                "HOST_NAME_TAKEN",
                format!(
                    "host name {:?} is registered with another host NQN ({}); delete that host \
                     (DELETE /api/v1/hosts/{}) or register under another name",
                    r.name, r.hostnqn, r.id
                ),
            )),
            None => {
                let r = HostRow {
                    id: new_id("host"),
                    name: b.name,
                    hostnqn: b.hostnqn,
                    iqn: b.iqn,
                    version: b.version,
                    created_ms: now,
                    last_heartbeat_ms: Some(now),
                };
                st.catalog.insert_host(&r)?;
                tracing::info!(host = %r.id, name = %r.name, "host registered");
                Ok((true, host_out(st, &r)?))
            }
        }
    })
    .await?;
    Ok(if created {
        HttpResponse::Created()
            .insert_header(("location", format!("/api/v1/hosts/{}", host.id)))
            .json(host)
    } else {
        HttpResponse::Ok().json(host)
    })
}

#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts", params(Page), security(("bearer" = [])),
    responses((status = 200, body = api::List<api::Host>)))]
pub async fn list_hosts(state: State, _c: Caller, q: web::Query<Page>) -> ApiResult<HttpResponse> {
    let limit = q.limit()?;
    let cursor = q.cursor.clone();
    let list = blocking(&state, move |st| {
        let rows = st.catalog.hosts(cursor.as_deref(), limit + 1)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(host_out(st, r)?);
        }
        Ok(page(
            out.into_iter().zip(rows).collect::<Vec<_>>(),
            limit,
            |(_, r)| r.id.clone(),
            |(h, _)| h.clone(),
        ))
    })
    .await?;
    Ok(HttpResponse::Ok().json(list))
}

#[utoipa::path(get, path = "/api/v1/hosts/{id}", params(("id" = String, Path, description = "Host id")), tag = "hosts", security(("bearer" = [])),
    responses((status = 200, body = api::Host), (status = 404, body = api::ErrorBody)))]
pub async fn get_host(state: State, _c: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = id.into_inner();
    let h = blocking(&state, move |st| host_out(st, &host_row(st, &id)?)).await?;
    Ok(HttpResponse::Ok().json(h))
}

#[utoipa::path(delete, path = "/api/v1/hosts/{id}", params(("id" = String, Path, description = "Host id")), tag = "hosts", security(("bearer" = [])),
    responses((status = 204, description = "Deleted; its queued jobs failed"), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn delete_host(
    state: State,
    c: Caller,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    blocking(&state, move |st| {
        let r = host_row(st, &id)?;
        if !st.catalog.host_jobs(&r.id, "running", 1)?.is_empty() {
            return Err(ApiError::conflict(
                "HOST_BUSY",
                format!(
                    "host {} is running a job; wait for it to end (or stop its probe) first",
                    r.name
                ),
            ));
        }
        let e = ApiError::new(
            StatusCode::GONE,
            "HOST_DELETED",
            format!("host {} was deleted before its probe ran this job", r.name),
        );
        let err = serde_json::to_string(&e.body()).unwrap_or_default();
        st.catalog.delete_host(&r.id, &err, now_ms())?;
        tracing::info!(host = %r.id, name = %r.name, "host deleted");
        Ok(())
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(post, path = "/api/v1/hosts/{id}/heartbeat", params(("id" = String, Path, description = "Host id")), tag = "hosts",
    request_body = api::Heartbeat, security(("bearer" = [])),
    responses((status = 200, body = api::Host), (status = 404, body = api::ErrorBody)))]
pub async fn heartbeat(
    state: State,
    c: Caller,
    id: web::Path<String>,
    body: Body<api::Heartbeat>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    let version = body.0.version;
    if version.len() > 64 {
        return Err(ApiError::invalid("version", "at most 64 characters"));
    }
    let h = blocking(&state, move |st| {
        let v = (!version.is_empty()).then_some(version.as_str());
        if !st.catalog.touch_host(&id, now_ms(), v)? {
            return Err(ApiError::not_found("HOST_NOT_FOUND", "host", &id));
        }
        host_out(st, &host_row(st, &id)?)
    })
    .await?;
    Ok(HttpResponse::Ok().json(h))
}

fn check_task(t: &api::HostTask) -> ApiResult<()> {
    let path_ok = |field: &str, p: &str| -> ApiResult<()> {
        if p.is_empty() || p.len() > 4096 || p.contains('\0') {
            return Err(ApiError::invalid(field, "1-4096 bytes, no NUL"));
        }
        Ok(())
    };
    match t {
        api::HostTask::Backup {
            volume,
            source,
            postgres,
            pre,
            post,
            exclude,
            ..
        } => {
            validate_name("volume", volume)?;
            match postgres {
                Some(pg) if source.is_empty() => path_ok("postgres", pg)?,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "source",
                        "a backup takes source or postgres, not both",
                    ));
                }
                None => path_ok("source", source)?,
            }
            for (field, cmd) in [("pre", pre), ("post", post)] {
                if let Some(c) = cmd {
                    path_ok(field, c)?;
                }
            }
            if exclude.len() > 1000 {
                return Err(ApiError::invalid("exclude", "at most 1000 patterns"));
            }
            for e in exclude {
                path_ok("exclude", e)?;
            }
        }
        api::HostTask::Restore {
            snapshot,
            path,
            to,
            image,
        } => {
            path_ok("snapshot", snapshot)?;
            match (path, to, image) {
                (Some(p), Some(t), None) => {
                    path_ok("path", p)?;
                    path_ok("to", t)?;
                }
                (None, None, Some(i)) => path_ok("image", i)?,
                _ => {
                    return Err(ApiError::invalid(
                        "path",
                        "a restore takes path and to, or image",
                    ));
                }
            }
        }
        api::HostTask::Mount { snapshot, dir } => {
            path_ok("snapshot", snapshot)?;
            path_ok("dir", dir)?;
        }
        api::HostTask::Umount { dir } => path_ok("dir", dir)?,
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/hosts/{id}/jobs", params(("id" = String, Path, description = "Host id")), tag = "hosts",
    request_body = api::HostTask, security(("bearer" = [])),
    responses((status = 202, body = api::Job, description = "Queued for the host's probe"), (status = 400, body = api::ErrorBody),
        (status = 404, body = api::ErrorBody), (status = 429, body = api::ErrorBody)))]
pub async fn queue_job(
    state: State,
    c: Caller,
    id: web::Path<String>,
    body: Body<api::HostTask>,
) -> ApiResult<HttpResponse> {
    // Admin: a job makes a host's probe (root there) read or write that host's files and
    // devices; the operator tokens probes themselves hold must not reach other hosts this way.
    c.require(Role::Admin)?;
    let task = body.0;
    check_task(&task)?;
    let id = id.into_inner();
    let job = blocking(&state, move |st| {
        let h = host_row(st, &id)?;
        if st.catalog.count_host_jobs(&h.id, "queued")? >= MAX_QUEUED_PER_HOST as i64 {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "HOST_QUEUE_FULL",
                format!(
                    "host {} has {MAX_QUEUED_PER_HOST} jobs waiting; is its probe running?",
                    h.name
                ),
            ));
        }
        let target = match &task {
            api::HostTask::Backup { volume, .. } => Some(volume.clone()),
            api::HostTask::Restore { snapshot, .. } | api::HostTask::Mount { snapshot, .. } => {
                Some(snapshot.clone())
            }
            api::HostTask::Umount { .. } => None,
        };
        let mut row = crate::jobs::queued_row(task.kind(), target);
        row.host = Some(h.id.clone());
        row.params = serde_json::to_string(&task).ok();
        st.catalog.insert_job(&row)?;
        tracing::info!(job = %row.id, host = %h.name, kind = %row.kind, "job queued for a host");
        Ok(row)
    })
    .await?;
    Ok(HttpResponse::Accepted()
        .insert_header(("location", format!("/api/v1/jobs/{}", job.id)))
        .json(job_out(&job)))
}

#[utoipa::path(post, path = "/api/v1/hosts/{id}/jobs/claim", params(("id" = String, Path, description = "Host id")), tag = "hosts",
    security(("bearer" = [])),
    responses((status = 200, body = api::Job, description = "The job is now the probe's (running)"), (status = 204, description = "Nothing to do"),
        (status = 404, body = api::ErrorBody)))]
pub async fn claim_job(state: State, c: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    let job = blocking(&state, move |st| {
        let h = host_row(st, &id)?;
        let now = now_ms();
        let j = st.catalog.claim_host_job(&h.id, now)?;
        // Claiming is a sign of life too.
        st.catalog.touch_host(&h.id, now, None)?;
        if let Some(j) = &j {
            tracing::info!(job = %j.id, host = %h.name, kind = %j.kind, "job claimed by the host's probe");
        }
        Ok(j)
    })
    .await?;
    Ok(match job {
        Some(j) => HttpResponse::Ok().json(job_out(&j)),
        None => HttpResponse::NoContent().finish(),
    })
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/report", params(("id" = String, Path, description = "Job id")), tag = "hosts",
    request_body = api::JobReport, security(("bearer" = [])),
    responses((status = 200, body = api::Job), (status = 400, body = api::ErrorBody), (status = 404, body = api::ErrorBody),
        (status = 409, body = api::ErrorBody)))]
pub async fn report_job(
    state: State,
    c: Caller,
    id: web::Path<String>,
    body: Body<api::JobReport>,
) -> ApiResult<HttpResponse> {
    c.require(Role::Operator)?;
    let id = id.into_inner();
    let r = body.0;
    if !matches!(r.state.as_str(), "running" | "succeeded" | "failed") {
        return Err(ApiError::invalid(
            "state",
            "state must be running, succeeded or failed",
        ));
    }
    if let Some(p) = r.progress
        && !(0.0..=1.0).contains(&p)
    {
        return Err(ApiError::invalid("progress", "progress is between 0 and 1"));
    }
    let size = |v: &Option<serde_json::Value>| v.as_ref().map_or(0, |v| v.to_string().len());
    if size(&r.result) > 64 << 10 || size(&r.progress_detail) > 16 << 10 {
        return Err(ApiError::invalid(
            "result",
            "result is at most 64 KiB and progress_detail 16 KiB of JSON",
        ));
    }
    if r.state == "failed" && r.error.is_none() {
        return Err(ApiError::invalid("error", "a failed job says why (error)"));
    }
    let job = blocking(&state, move |st| {
        let mut j = st
            .catalog
            .job(&id)?
            .filter(|j| j.host.is_some())
            .ok_or_else(|| ApiError::not_found("JOB_NOT_FOUND", "job of a host", &id))?;
        if j.state != "running" {
            return Err(ApiError::conflict(
                "JOB_NOT_RUNNING",
                format!(
                    "job {id} is {}; only a claimed (running) job takes reports",
                    j.state
                ),
            ));
        }
        j.updated_ms = now_ms();
        if let Some(p) = r.progress {
            j.progress_milli = j.progress_milli.max((p * 1000.0) as i64);
        }
        if let Some(d) = &r.progress_detail {
            j.progress_detail = Some(d.to_string());
        }
        match r.state.as_str() {
            "succeeded" => {
                j.state = "succeeded".into();
                j.progress_milli = 1000;
                j.result = r.result.as_ref().map(|v| v.to_string());
            }
            "failed" => {
                j.state = "failed".into();
                let e = r.error.clone().unwrap_or(api::JobReportError {
                    code: "FAILED".into(),
                    message: String::new(),
                });
                let body = api::ErrorBody {
                    code: e.code.chars().take(64).collect(),
                    message: e.message.chars().take(4096).collect(),
                    request_id: crate::error::current_request_id(),
                    field: None,
                };
                j.error = serde_json::to_string(&body).ok();
            }
            _ => {}
        }
        if !st.catalog.update_running_job(&j)? {
            return Err(ApiError::conflict(
                "JOB_NOT_RUNNING",
                format!("job {id} ended meanwhile; this report changes nothing"),
            ));
        }
        if j.state != "running" {
            tracing::info!(job = %j.id, state = %j.state, "host job finished");
        }
        Ok(j)
    })
    .await?;
    Ok(HttpResponse::Ok().json(job_out(&job)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_are_checked() {
        let backup = |volume: &str| api::HostTask::Backup {
            volume: volume.into(),
            source: "/srv".into(),
            postgres: None,
            bitmap: None,
            pre: None,
            post: None,
            size: None,
            exclude: vec![],
        };
        assert!(check_task(&backup("v")).is_ok());
        assert!(check_task(&backup("a b")).is_err());
        let mixed = api::HostTask::Restore {
            snapshot: "s".into(),
            path: Some("/a".into()),
            to: None,
            image: Some("/dev/x".into()),
        };
        assert!(check_task(&mixed).is_err());
        let t: api::HostTask =
            serde_json::from_str(r#"{"kind":"mount","snapshot":"s","dir":"/mnt"}"#)
                .unwrap_or(api::HostTask::Umount { dir: String::new() });
        assert_eq!(t.kind(), "host-mount");
    }
}
