//! `--pre CMD` and `--post CMD` around a backup, for any application the probe has no source
//! for (flush and freeze a database, stop a service, take an LVM snapshot...). The pre command
//! must succeed or nothing is backed up; the post command always runs, told the outcome.

use crate::ops::{BackupReport, ProbeError, R};

/// Runs `cmd` with `sh -c`; an error carries its exit status and the end of what it printed.
fn run_hook(cmd: &str, env: &[(&str, &str)]) -> Result<(), String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    Err(format!(
        "{cmd:?} exited with {}: {}",
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

/// Runs `backup` between the hooks. Environment of both: `MAAS_VOLUME`; of the post command
/// also `MAAS_BACKUP_STATUS` (`succeeded` or `failed`) and `MAAS_SNAPSHOT` (when one was made).
pub fn around(
    pre: Option<&str>,
    post: Option<&str>,
    volume: &str,
    backup: impl FnOnce() -> R<BackupReport>,
) -> R<BackupReport> {
    if let Some(cmd) = pre {
        run_hook(cmd, &[("MAAS_VOLUME", volume)]).map_err(|e| {
            ProbeError::Usage(format!(
                "the --pre command failed, so nothing was backed up: {e}"
            ))
        })?;
    }
    let mut r = backup();
    if let Some(cmd) = post {
        let (status, snap) = match &r {
            Ok(rep) => ("succeeded", rep.snapshot.clone()),
            Err(_) => ("failed", String::new()),
        };
        let env = [
            ("MAAS_VOLUME", volume),
            ("MAAS_BACKUP_STATUS", status),
            ("MAAS_SNAPSHOT", snap.as_str()),
        ];
        if let Err(e) = run_hook(cmd, &env) {
            tracing::warn!(error = %e, "the --post command failed");
            if let Ok(rep) = &mut r {
                rep.post_hook_error = Some(e);
            }
        }
    }
    r
}
