//! What the probe asks of maasd, over its REST API only: volumes, exports for this host, seals,
//! clones and the jobs behind them. No block data ever goes this way.

use std::time::{Duration, Instant};

use maas_api as api;
use maas_api::client::{Client, ClientError};
use serde_json::json;

use crate::nvme_disk::Target;

pub type R<T> = Result<T, ClientError>;

fn other(s: impl Into<String>) -> ClientError {
    ClientError::Other(s.into())
}

/// The volume named `name`, if there is one.
pub fn volume_by_name(c: &Client, name: &str) -> R<Option<api::Volume>> {
    let all: Vec<api::Volume> = c.list("/volumes?limit=1000")?;
    Ok(all.into_iter().find(|v| v.name == name))
}

pub fn create_volume(c: &Client, name: &str, size: u64) -> R<api::Volume> {
    c.post(
        "/volumes",
        Some(json!({ "name": name, "size": size, "block_size": 4096 })),
    )
}

/// Grows a volume (never shrinks).
pub fn grow_volume(c: &Client, id: &str, size: u64) -> R<api::Volume> {
    api::client::typed(c.call(
        "PATCH",
        &format!("/volumes/{id}"),
        Some(json!({ "size": size })),
    )?)
}

/// An NVMe/TCP export of `volume` that only this host (`hostnqn`) may connect to.
pub fn export_to_host(c: &Client, volume: &str, hostnqn: &str, read_only: bool) -> R<api::Export> {
    c.post(
        &format!("/volumes/{volume}/exports"),
        Some(json!({ "protocol": "nvme-tcp", "initiators": [hostnqn], "read_only": read_only })),
    )
}

/// Deletes an export; one already gone is fine.
pub fn delete_export(c: &Client, id: &str) -> R<()> {
    match c.call("DELETE", &format!("/exports/{id}"), None) {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("EXPORT_NOT_FOUND") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Where and how to connect to an export, as this host sees it: a portal advertised as a
/// wildcard or loopback address is reached at the host of the server's URL.
pub fn target_of(c: &Client, e: &api::Export, hostnqn: &str, hostid: [u8; 16]) -> R<Target> {
    if e.state != "live" {
        let why = e
            .error
            .as_ref()
            .map(|x| format!("{}: {}", x.code, x.message))
            .unwrap_or_default();
        return Err(other(format!("export {} is not served: {why}", e.id)));
    }
    let nsid = e.nsid.unwrap_or(1);
    let port = e
        .portal
        .rsplit_once(':')
        .map(|(_, p)| p.to_string())
        .ok_or_else(|| other(format!("export {} has no port in {:?}", e.id, e.portal)))?;
    let host = e.portal.rsplit_once(':').map(|(h, _)| h).unwrap_or("");
    let addr = if host.is_empty() || host == "0.0.0.0" || host == "[::]" {
        let server_host = c
            .base()
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|hp| {
                hp.rsplit_once(':')
                    .map(|(h, _)| h.to_string())
                    .or(Some(hp.to_string()))
            })
            .unwrap_or_else(|| "127.0.0.1".into());
        format!("{server_host}:{port}")
    } else {
        e.portal.clone()
    };
    Ok(Target {
        addr,
        subnqn: e.target.clone(),
        nsid,
        hostnqn: hostnqn.to_string(),
        hostid,
    })
}

/// Waits for a job; a failed job is an error carrying the server's code. `tick` sees progress.
pub fn wait_job(c: &Client, job: api::Job, tick: &dyn Fn(&api::Job)) -> R<api::Job> {
    let mut j = job;
    let start = Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        tick(&j);
        if j.is_done() {
            break;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(500));
        j = c.get(&format!("/jobs/{}", j.id))?;
        if start.elapsed() > Duration::from_secs(24 * 3600) {
            return Err(other(format!("job {} did not finish in a day", j.id)));
        }
    }
    if let Some(e) = &j.error {
        return Err(ClientError::Api {
            status: 0,
            body: e.clone(),
        });
    }
    Ok(j)
}

/// Seals the volume; the new snapshot's id.
pub fn seal(c: &Client, volume: &str, tick: &dyn Fn(&api::Job)) -> R<String> {
    let j: api::Job = c.post(&format!("/volumes/{volume}/snapshots"), None)?;
    let j = wait_job(c, j, tick)?;
    j.result
        .as_ref()
        .and_then(|r| r["snapshot"].as_str())
        .map(str::to_string)
        .ok_or_else(|| other(format!("seal job {} named no snapshot", j.id)))
}

/// Clones a snapshot into a new volume named `name`; the clone's id.
pub fn clone_snapshot(c: &Client, snapshot: &str, name: &str) -> R<String> {
    let j: api::Job = c.post(
        &format!("/snapshots/{snapshot}/clones"),
        Some(json!({ "name": name, "labels": { "maas.probe/mount": "true" } })),
    )?;
    let j = wait_job(c, j, &|_| {})?;
    j.result
        .as_ref()
        .and_then(|r| r["volume"].as_str())
        .map(str::to_string)
        .ok_or_else(|| other(format!("clone job {} named no volume", j.id)))
}

pub fn snapshot(c: &Client, id: &str) -> R<api::Snapshot> {
    c.get(&format!("/snapshots/{id}"))
}

/// Deletes a volume (a clone made for a mount); one already gone is fine.
pub fn delete_volume(c: &Client, id: &str) -> R<()> {
    match c.call("DELETE", &format!("/volumes/{id}"), None) {
        Ok(v) if v.is_null() => Ok(()),
        Ok(v) => {
            let j: api::Job = api::client::typed(v)?;
            wait_job(c, j, &|_| {}).map(|_| ())
        }
        Err(e) if e.code() == Some("VOLUME_NOT_FOUND") => Ok(()),
        Err(e) => Err(e),
    }
}

/// A volume, with what maasd knows of it (`unchanged_since`).
pub fn volume(c: &Client, id: &str) -> R<api::Volume> {
    c.get(&format!("/volumes/{id}"))
}

/// A snapshot's file manifest, if one was recorded.
pub fn manifest(c: &Client, snapshot: &str) -> R<Option<Vec<api::ManifestEntry>>> {
    match c.get_text(&format!("/snapshots/{snapshot}/manifest"), 1 << 30) {
        Ok(text) => Ok(Some(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).map_err(|e| other(format!("manifest: {e}"))))
                .collect::<R<Vec<_>>>()?,
        )),
        Err(e) if e.code() == Some("MANIFEST_NOT_FOUND") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records a snapshot's file manifest (JSON lines).
pub fn put_manifest(c: &Client, snapshot: &str, ndjson: &[u8]) -> R<api::ManifestInfo> {
    api::client::typed(c.send_bytes(
        "PUT",
        &format!("/snapshots/{snapshot}/manifest"),
        "application/x-ndjson",
        ndjson,
    )?)
}
