//! VM disks over NBD, as agentless hypervisor backup reads them: the hypervisor exports the
//! disk (`qemu-nbd`, QEMU's NBD server, libvirt's backup jobs) and tracks changed blocks in a
//! dirty bitmap. The first backup reads only what is allocated (`base:allocation`); a later
//! one reads only the ranges the bitmap (`qemu:dirty-bitmap:NAME`) marks dirty — provided the
//! volume still holds exactly the snapshot of the last backup (maasd says so:
//! `unchanged_since`) and the disk kept its size; otherwise it reads the allocated ranges
//! again. Keeping the bitmap in step (a new one per backup, or clearing it) is the
//! hypervisor's side, as with every changed-block-tracking API.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use maas_proto::nbd::{Client, NbdError, STATE_DIRTY, STATE_ZERO};
use serde::{Deserialize, Serialize};

use crate::image::ImageChanges;
use crate::image_backup::image_report;
use crate::ops::{BackupReport, Probe, ProbeError, R, check_volume_name, lock_volume};
use crate::server;

/// Bytes handled at a time (one NBD read, one or more volume writes).
const WINDOW: u64 = 4 << 20;

/// Where an NBD export is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub socket: Option<PathBuf>,
    pub tcp: Option<String>,
    pub export: String,
}

pub fn is_nbd(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+unix://")
}

/// Parses `nbd+unix:///EXPORT?socket=PATH` and `nbd://HOST[:PORT]/EXPORT` (the NBD URI form
/// QEMU and libnbd use).
pub fn parse_uri(s: &str) -> Option<NbdUri> {
    if let Some(rest) = s.strip_prefix("nbd+unix://") {
        let (path, query) = rest.split_once('?')?;
        let export = path.trim_start_matches('/').to_string();
        let socket = query.split('&').find_map(|kv| kv.strip_prefix("socket="))?;
        return Some(NbdUri {
            socket: Some(PathBuf::from(socket)),
            tcp: None,
            export,
        });
    }
    let rest = s.strip_prefix("nbd://")?;
    let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
    if hostport.is_empty() {
        return None;
    }
    let addr = if hostport.contains(':') && !hostport.ends_with(']') {
        hostport.to_string()
    } else {
        format!("{hostport}:10809")
    };
    Some(NbdUri {
        socket: None,
        tcp: Some(addr),
        export: export.to_string(),
    })
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

fn connect(uri: &NbdUri, queries: &[&str]) -> Result<Client<Box<dyn Stream>>, NbdError> {
    let s: Box<dyn Stream> = match (&uri.socket, &uri.tcp) {
        (Some(p), _) => Box::new(std::os::unix::net::UnixStream::connect(p)?),
        (None, Some(a)) => {
            let t = std::net::TcpStream::connect(a)?;
            t.set_nodelay(true)?;
            Box::new(t)
        }
        (None, None) => return Err(NbdError::Protocol("no address".into())),
    };
    Client::connect(s, &uri.export, queries)
}

/// What the probe keeps of the last NBD backup of a volume.
#[derive(Debug, Serialize, Deserialize)]
struct LastNbd {
    snapshot: String,
    size: u64,
}

fn nbd_err(e: NbdError) -> ProbeError {
    ProbeError::Usage(format!("NBD source: {e}"))
}

/// The ranges of `[0, size)` whose `context` runs satisfy `want`, merged and widened to whole
/// 64 KiB (so volume writes are aligned).
fn ranges<S: Read + Write>(
    c: &mut Client<S>,
    context: u32,
    want: impl Fn(u32) -> bool,
) -> Result<Vec<(u64, u64)>, NbdError> {
    let size = c.export.size;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    while at < size {
        let len = (size - at).min(1 << 30) as u32;
        let runs = c.block_status(context, at, len)?;
        for (l, flags) in runs {
            let l = u64::from(l).min(size - at);
            if want(flags) {
                let (s, e) = ((at / 65536) * 65536, (at + l).div_ceil(65536) * 65536);
                match out.last_mut() {
                    Some(last) if last.1 >= s => last.1 = last.1.max(e),
                    _ => out.push((s, e)),
                }
            }
            at += l;
            if at >= size {
                break;
            }
        }
    }
    Ok(out)
}

impl Probe {
    fn nbd_state(&self, attachment: &str) -> PathBuf {
        self.state.join("nbd").join(format!("{attachment}.json"))
    }

    /// `maas-probe backup --volume NAME --source nbd://... [--bitmap NAME]`.
    pub fn backup_nbd(
        &self,
        volume: &str,
        uri_text: &str,
        bitmap: Option<&str>,
        size: Option<u64>,
        progress: &dyn Fn(&str, u64),
    ) -> R<BackupReport> {
        let t0 = Instant::now();
        check_volume_name(volume)?;
        let uri = parse_uri(uri_text).ok_or_else(|| {
            ProbeError::Usage(format!(
                "{uri_text:?} is not an NBD URI (nbd+unix:///EXPORT?socket=PATH or \
                 nbd://HOST[:PORT]/EXPORT)"
            ))
        })?;
        let bitmap_ctx = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
        let mut queries = vec!["base:allocation"];
        if let Some(b) = &bitmap_ctx {
            queries.push(b.as_str());
        }
        let mut nbd = connect(&uri, &queries).map_err(nbd_err)?;
        let disk_size = nbd.export.size;
        if disk_size == 0 {
            return Err(ProbeError::Usage("the NBD export is empty".into()));
        }
        if let (Some(b), None) = (
            &bitmap_ctx,
            bitmap_ctx.as_deref().and_then(|b| nbd.context(b)),
        ) {
            return Err(ProbeError::Usage(format!(
                "the NBD server does not offer {b} (is the export started with that bitmap, \
                 e.g. qemu-nbd -B?)"
            )));
        }
        let _lock = lock_volume(&self.state, volume)?;
        self.clean_stale();
        let (vol, created) = self.image_volume(volume, disk_size, size)?;
        let name = format!("backup-{volume}");
        let state_path = self.nbd_state(&name);
        let last: Option<LastNbd> = std::fs::read(&state_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let unchanged = if created {
            None
        } else {
            server::volume(&self.client, &vol.id)?.unchanged_since
        };
        let incremental = match (&last, &unchanged, &bitmap_ctx) {
            (Some(l), Some(s), Some(_)) => l.snapshot == *s && l.size == disk_size,
            _ => false,
        };
        // From the first write on, the record no longer describes the volume.
        match std::fs::remove_file(&state_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        progress("extents", 0);
        let to_copy = if incremental {
            let id = bitmap_ctx
                .as_deref()
                .and_then(|b| nbd.context(b))
                .ok_or_else(|| ProbeError::Usage("bitmap context lost".into()))?;
            ranges(&mut nbd, id, |f| f & STATE_DIRTY != 0).map_err(nbd_err)?
        } else {
            match nbd.context("base:allocation") {
                // Everything but what the server says reads as zeroes.
                Some(id) => ranges(&mut nbd, id, |f| f & STATE_ZERO == 0).map_err(nbd_err)?,
                // No allocation map: everything is read.
                None => vec![(0, disk_size.div_ceil(65536) * 65536)],
            }
        };

        let (rec, export) = self.export_for_backup(&name, &vol.id)?;
        progress("attach", 0);
        let copied = (|| -> R<(ImageChanges, u64, u64)> {
            let disk = self.connect(&export)?;
            let vol_size = disk.size();
            let mut ch = ImageChanges {
                source_bytes: disk_size,
                compared_with: if incremental {
                    "dirty-bitmap"
                } else {
                    "allocation"
                }
                .into(),
                blocks: disk_size.div_ceil(65536),
                ..Default::default()
            };
            // A full backup into an existing volume: what is not copied must read as zero.
            if !incremental && !created {
                let mut at = 0u64;
                for &(s, e) in &to_copy {
                    if s > at {
                        self.rt.block_on(disk.write_zeroes(at, s - at))?;
                    }
                    at = e.min(vol_size);
                }
                if at < vol_size {
                    self.rt.block_on(disk.write_zeroes(at, vol_size - at))?;
                }
            }
            let mut done = 0u64;
            for &(s, e) in &to_copy {
                let mut at = s;
                let end = e.min(disk_size.div_ceil(4096) * 4096);
                while at < end {
                    let n = (end - at).min(WINDOW);
                    // The disk's bytes (its last partial 4 KiB padded with zeroes).
                    let readable = (disk_size.saturating_sub(at)).min(n) as u32;
                    let mut buf = nbd.read(at, readable).map_err(nbd_err)?;
                    buf.resize(n as usize, 0);
                    // The window's 64 KiB blocks go out together (several commands in flight);
                    // the next window is read while nothing else waits.
                    let mut writes = Vec::new();
                    for (k, blk) in buf.chunks(65536).enumerate() {
                        let off = at + (k * 65536) as u64;
                        ch.blocks_changed += 1;
                        let d = disk.clone();
                        if blk.iter().all(|&b| b == 0) {
                            ch.blocks_zeroed += 1;
                            let n = blk.len() as u64;
                            writes.push(self.rt.spawn(async move { d.write_zeroes(off, n).await }));
                        } else {
                            let data = blk.to_vec();
                            writes.push(self.rt.spawn(async move { d.write(off, data).await }));
                        }
                    }
                    for w in writes {
                        self.rt
                            .block_on(w)
                            .map_err(|e| ProbeError::Usage(format!("write task: {e}")))??;
                    }
                    at += n;
                    done += n;
                    progress("copy", done);
                }
            }
            self.rt.block_on(disk.flush())?;
            if let Some(why) = disk.write_failure() {
                return Err(ProbeError::Usage(format!(
                    "writing to the volume failed ({why}); the backup is not sealed"
                )));
            }
            ch.bytes_read = nbd.data_bytes;
            Ok((
                ch,
                disk.bytes_written
                    .load(std::sync::atomic::Ordering::Relaxed),
                disk.bytes_read.load(std::sync::atomic::Ordering::Relaxed),
            ))
        })();
        self.drop_clone(&rec);
        let (changes, written, read) = copied?;
        nbd.disconnect();
        progress("seal", written);
        let snap = server::seal(&self.client, &vol.id, &|_| {})?;
        let last = LastNbd {
            snapshot: snap.clone(),
            size: disk_size,
        };
        if let Err(e) = std::fs::create_dir_all(self.state.join("nbd")).and_then(|_| {
            std::fs::write(&state_path, serde_json::to_vec(&last).unwrap_or_default())
        }) {
            tracing::warn!(error = %e, "the NBD backup record was not kept: the next backup reads all");
        }
        let entry = maas_api::ManifestEntry {
            path: crate::image_backup::IMAGE_PATH.into(),
            kind: "block".into(),
            size: disk_size,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            blake3: None,
            target: None,
        };
        let manifest_error = self.record_image_manifest(&snap, &entry);
        Ok(image_report(
            volume,
            vol.id,
            snap,
            created,
            changes,
            manifest_error,
            written,
            read,
            t0,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse_uri("nbd+unix:///disk0?socket=/run/q.sock"),
            Some(NbdUri {
                socket: Some("/run/q.sock".into()),
                tcp: None,
                export: "disk0".into()
            })
        );
        assert_eq!(
            parse_uri("nbd://10.0.0.5/vm").map(|u| u.tcp),
            Some(Some("10.0.0.5:10809".into()))
        );
        assert_eq!(
            parse_uri("nbd://10.0.0.5:10810/vm").map(|u| u.tcp),
            Some(Some("10.0.0.5:10810".into()))
        );
        assert_eq!(parse_uri("nbd+unix:///x"), None);
        assert_eq!(parse_uri("/dev/sda"), None);
    }
}
