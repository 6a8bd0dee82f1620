//! `maas-probe register` and `maas-probe run`: the probe as an agent. It registers its host
//! with maasd (name, IQN, host NQN), heartbeats, claims the jobs maasd queues for the host,
//! runs them with the same code as the one-shot commands, and reports progress and outcome.
//!
//! maasd may restart or be unreachable at any time: the agent keeps running, retries with
//! backoff, and a job's outcome is kept on disk (`STATE/agent-job.json`) until maasd took it.
//! A probe stopped mid-job finds that file at its next start and reports the job failed (what
//! it left attached is removed by the usual clean-up), so no job stays "running" forever
//! because its probe died.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use maas_api as api;
use maas_api::client::{Client, ClientError};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::ops::{Probe, ProbeError, R};

/// What the agent keeps about its registration.
#[derive(Debug, Serialize, Deserialize)]
struct HostRecord {
    id: String,
    server: String,
}

/// The job the agent is working on, and its outcome once known (until maasd has it).
#[derive(Debug, Serialize, Deserialize)]
struct CurrentJob {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<api::JobReport>,
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub heartbeat: Duration,
    /// How often it asks for work when there is none.
    pub poll: Duration,
}

/// Writes a file so that after a crash (or a power loss) it is either the old or the new one.
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Whether a refused report may be accepted later: maasd busy or failing, or the token not
/// accepted right now (expired, being rotated). Anything else will not change by retrying.
fn retryable(status: u16) -> bool {
    status >= 500 || status == 429 || status == 401 || status == 0
}

/// A stable code for a failure the probe reports.
fn error_code(e: &ProbeError) -> String {
    match e {
        ProbeError::Server(c) => c.code().unwrap_or("SERVER_UNREACHABLE").to_string(),
        ProbeError::Usage(_) => "INVALID_REQUEST".into(),
        ProbeError::Tree(crate::tree::TreeError::NoSource(_)) => "SOURCE_MISSING".into(),
        ProbeError::Tree(crate::tree::TreeError::NoSpace) => "VOLUME_FULL".into(),
        ProbeError::Disk(_) | ProbeError::Attach(_) => "ATTACH_FAILED".into(),
        _ => "PROBE_FAILED".into(),
    }
}

impl Probe {
    fn host_file(&self) -> PathBuf {
        self.state.join("host.json")
    }

    fn job_file(&self) -> PathBuf {
        self.state.join("agent-job.json")
    }

    /// Registers this host with maasd (again, harmlessly) and keeps its id.
    pub fn register(&self) -> R<api::Host> {
        let h: api::Host = self.client.post(
            "/hosts",
            Some(json!({
                "name": self.id.name,
                "hostnqn": self.id.hostnqn,
                "iqn": self.id.iqn,
                "version": env!("CARGO_PKG_VERSION"),
            })),
        )?;
        let rec = HostRecord {
            id: h.id.clone(),
            server: self.client.base().to_string(),
        };
        std::fs::create_dir_all(&self.state)?;
        write_atomic(
            &self.host_file(),
            &serde_json::to_vec_pretty(&rec).map_err(std::io::Error::other)?,
        )?;
        Ok(h)
    }

    /// This host's id at this server: from the last registration, or registered now.
    fn host_id(&self) -> R<String> {
        if let Ok(b) = std::fs::read(self.host_file())
            && let Ok(r) = serde_json::from_slice::<HostRecord>(&b)
            && r.server == self.client.base()
        {
            return Ok(r.id);
        }
        Ok(self.register()?.id)
    }

    /// `maas-probe run`: serves the host's jobs until stopped.
    pub fn run_agent(&self, exe: &Path, opts: &AgentOptions, stop: &AtomicBool) -> R<()> {
        // One agent per state folder: a second would report the first one's job as lost.
        std::fs::create_dir_all(&self.state)?;
        let lock = std::fs::File::create(self.state.join("agent.lock"))?;
        // SAFETY: flock(2) on a descriptor we own; released when `lock` is dropped.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(ProbeError::Usage(format!(
                "another maas-probe agent runs with state folder {}",
                self.state.display()
            )));
        }
        let mut host = loop {
            match self.host_id() {
                Ok(id) => break id,
                Err(ProbeError::Server(e)) if e.is_unreachable() => {
                    tracing::warn!(error = %e, "maasd unreachable; registering when it answers");
                    sleep_unless(stop, Duration::from_secs(5));
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        };
        tracing::info!(host = %host, "agent running");
        let beating = Arc::new(AtomicBool::new(true));
        let beat_host = Arc::new(std::sync::Mutex::new(host.clone()));
        let beat = {
            let (client, host, beating, every) = (
                self.client.clone(),
                beat_host.clone(),
                beating.clone(),
                opts.heartbeat,
            );
            std::thread::spawn(move || heartbeats(&client, &host, &beating, every))
        };
        self.finish_interrupted_job(stop);
        let mut backoff = Duration::from_secs(1);
        while !stop.load(Ordering::Relaxed) {
            let claimed = self
                .client
                .call("POST", &format!("/hosts/{host}/jobs/claim"), None);
            let job: api::Job = match claimed {
                Ok(v) if v.is_null() => {
                    backoff = Duration::from_secs(1);
                    sleep_unless(stop, opts.poll);
                    continue;
                }
                Ok(v) => match api::client::typed(v) {
                    Ok(j) => j,
                    Err(e) => {
                        tracing::error!(error = %e, "maasd handed out a job this probe cannot read");
                        sleep_unless(stop, opts.poll);
                        continue;
                    }
                },
                Err(e) if e.code() == Some("HOST_NOT_FOUND") => {
                    // Deleted by an operator: register anew (a new id), as a fresh install would.
                    tracing::warn!("this host was deleted at maasd; registering again");
                    let _ = std::fs::remove_file(self.host_file());
                    match self.host_id() {
                        Ok(id) => {
                            if let Ok(mut h) = beat_host.lock() {
                                h.clone_from(&id);
                            }
                            host = id;
                        }
                        Err(e) => tracing::warn!(error = %e, "registering again failed"),
                    }
                    sleep_unless(stop, backoff);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "cannot ask maasd for work");
                    sleep_unless(stop, backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            backoff = Duration::from_secs(1);
            self.run_job(exe, &job, stop);
        }
        beating.store(false, Ordering::Relaxed);
        let _ = beat.join();
        Ok(())
    }

    /// A job this probe claimed before it stopped: its outcome is reported now (or, if it
    /// never knew one, the job is reported failed).
    fn finish_interrupted_job(&self, stop: &AtomicBool) {
        let Ok(b) = std::fs::read(self.job_file()) else {
            return;
        };
        let Ok(cur) = serde_json::from_slice::<CurrentJob>(&b) else {
            let _ = std::fs::remove_file(self.job_file());
            return;
        };
        let outcome = cur.outcome.unwrap_or(api::JobReport {
            state: "failed".into(),
            progress: None,
            progress_detail: None,
            result: None,
            error: Some(api::JobReportError {
                code: "PROBE_STOPPED".into(),
                message: "the probe stopped while it ran this job; what it left attached was \
                          removed and nothing was sealed (a backup's volume keeps its last \
                          snapshot; a restore's destination may be partly written): run it again"
                    .into(),
            }),
        });
        tracing::warn!(job = %cur.id, state = %outcome.state, "reporting a job of an earlier run of the probe");
        self.clean_stale();
        self.deliver(&cur.id, &outcome, stop);
    }

    /// Reports a final outcome, retrying until maasd takes it (or says it cannot); then the
    /// job file goes.
    fn deliver(&self, job: &str, outcome: &api::JobReport, stop: &AtomicBool) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let sent = self.client.call(
                "POST",
                &format!("/jobs/{job}/report"),
                serde_json::to_value(outcome).ok(),
            );
            match sent {
                Ok(_) => break,
                Err(ClientError::Api { status, body }) if !retryable(status) => {
                    // Not running any more, deleted, or refused: nothing a retry changes.
                    tracing::warn!(job, code = %body.code, error = %body.message, "maasd refused the job's report");
                    break;
                }
                Err(e) => {
                    if stop.load(Ordering::Relaxed) {
                        // Kept on disk: the next start reports it.
                        return;
                    }
                    tracing::warn!(job, error = %e, "cannot report the job's outcome yet; retrying");
                    sleep_unless(stop, backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        let _ = std::fs::remove_file(self.job_file());
    }

    fn run_job(&self, exe: &Path, job: &api::Job, stop: &AtomicBool) {
        let span = tracing::info_span!("job", id = %job.id, kind = %job.kind);
        let _e = span.enter();
        let cur = CurrentJob {
            id: job.id.clone(),
            outcome: None,
        };
        if let Err(e) = write_atomic(
            &self.job_file(),
            &serde_json::to_vec(&cur).unwrap_or_default(),
        ) {
            tracing::error!(error = %e, "cannot record the job locally; running it anyway");
        }
        let task: Result<api::HostTask, String> = job
            .params
            .clone()
            .ok_or_else(|| "the job says nothing to do".to_string())
            .and_then(|p| serde_json::from_value(p).map_err(|e| e.to_string()));
        let t0 = Instant::now();
        let last = std::sync::Mutex::new(Instant::now() - Duration::from_secs(10));
        let progress = |stage: &str, bytes: u64| {
            let Ok(mut l) = last.lock() else { return };
            if l.elapsed() < Duration::from_secs(2) {
                return;
            }
            *l = Instant::now();
            let _ = self.client.call(
                "POST",
                &format!("/jobs/{}/report", job.id),
                Some(json!({ "state": "running", "progress_detail": { "stage": stage, "bytes": bytes } })),
            );
        };
        let result: R<serde_json::Value> = match task {
            Err(e) => Err(ProbeError::Usage(format!("job {}: {e}", job.id))),
            Ok(t) => self.execute(exe, &t, &progress),
        };
        let outcome = match result {
            Ok(v) => {
                tracing::info!(seconds = t0.elapsed().as_secs_f64(), "job succeeded");
                api::JobReport {
                    state: "succeeded".into(),
                    progress: Some(1.0),
                    progress_detail: None,
                    result: Some(v),
                    error: None,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "job failed");
                api::JobReport {
                    state: "failed".into(),
                    progress: None,
                    progress_detail: None,
                    result: None,
                    error: Some(api::JobReportError {
                        code: error_code(&e),
                        message: e.to_string(),
                    }),
                }
            }
        };
        let cur = CurrentJob {
            id: job.id.clone(),
            outcome: Some(outcome.clone()),
        };
        let _ = write_atomic(
            &self.job_file(),
            &serde_json::to_vec(&cur).unwrap_or_default(),
        );
        self.deliver(&job.id, &outcome, stop);
    }

    fn execute(
        &self,
        exe: &Path,
        t: &api::HostTask,
        progress: &dyn Fn(&str, u64),
    ) -> R<serde_json::Value> {
        let json = |v: Result<serde_json::Value, serde_json::Error>| {
            v.map_err(|e| ProbeError::Usage(format!("report: {e}")))
        };
        match t {
            api::HostTask::Backup {
                volume,
                source,
                postgres,
                bitmap,
                pre,
                post,
                size,
                exclude,
            } => {
                let req = crate::ops::BackupRequest {
                    volume,
                    source: (!source.is_empty()).then_some(source.as_str()),
                    postgres: postgres.as_deref(),
                    bitmap: bitmap.as_deref(),
                    size: *size,
                    exclude,
                    pre: pre.as_deref(),
                    post: post.as_deref(),
                };
                json(serde_json::to_value(self.backup(&req, progress)?))
            }
            api::HostTask::Restore {
                snapshot,
                path,
                to,
                image,
            } => {
                let rep = self.restore(
                    snapshot,
                    path.as_deref(),
                    to.as_deref().map(Path::new),
                    image.as_deref().map(Path::new),
                )?;
                json(serde_json::to_value(rep))
            }
            api::HostTask::Mount { snapshot, dir } => json(serde_json::to_value(self.mount(
                exe,
                snapshot,
                Path::new(dir),
            )?)),
            api::HostTask::Umount { dir } => {
                let name = self.umount(Path::new(dir))?;
                Ok(json!({ "unmounted": dir, "attachment": name }))
            }
        }
    }
}

fn heartbeats(
    client: &Client,
    host: &std::sync::Mutex<String>,
    beating: &AtomicBool,
    every: Duration,
) {
    let body = json!({ "version": env!("CARGO_PKG_VERSION") });
    while beating.load(Ordering::Relaxed) {
        let id = host.lock().map(|h| h.clone()).unwrap_or_default();
        if let Err(e) = client.call(
            "POST",
            &format!("/hosts/{id}/heartbeat"),
            Some(body.clone()),
        ) {
            tracing::debug!(error = %e, "heartbeat not delivered");
        }
        let t = Instant::now();
        while t.elapsed() < every && beating.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Sleeps `d`, waking early (every 100 ms it looks) once `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100).min(d.saturating_sub(t.elapsed())));
    }
}
