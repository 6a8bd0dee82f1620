//! `maas-probe backup --source DEVICE_OR_FILE`: a block image backed up onto a volume of its
//! own, straight over NVMe/TCP (no FUSE, no loop device, no filesystem on this side), sending
//! only changed blocks ([`crate::image`]). The snapshot's file manifest holds one entry,
//! `/image`, with the image's length and BLAKE3, which restores use to give back exactly the
//! image's bytes.

use std::path::Path;
use std::time::Instant;

use crate::attach::Record;
use crate::image::{Baseline, BlockMap, ImageChanges, ImageSource, sync_image};
use crate::ops::{BackupReport, Probe, ProbeError, R, lock_volume, name_ok};
use crate::server;
use crate::sys;
use crate::tree::TreeError;

/// The manifest path of an image backup's one entry.
pub const IMAGE_PATH: &str = "/image";

impl Probe {
    fn block_map_path(&self, attachment: &str) -> std::path::PathBuf {
        self.state
            .join("blockmaps")
            .join(format!("{attachment}.map"))
    }

    /// `maas-probe backup --volume NAME --source DEVICE_OR_FILE`.
    pub fn backup_image(
        &self,
        volume: &str,
        src_path: &Path,
        size: Option<u64>,
        progress: &dyn Fn(&str, u64),
    ) -> R<BackupReport> {
        let t0 = Instant::now();
        if !name_ok(volume) {
            return Err(ProbeError::Usage(format!(
                "volume name {volume:?}: use 1-128 of A-Z a-z 0-9 . _ -"
            )));
        }
        let mut src = ImageSource::open(src_path).map_err(|e| match e {
            crate::image::ImageError::Source(_, io)
                if io.kind() == std::io::ErrorKind::NotFound =>
            {
                ProbeError::from(TreeError::NoSource(src_path.display().to_string()))
            }
            other => ProbeError::Usage(format!("cannot read the source: {other}")),
        })?;
        if src.len == 0 {
            return Err(TreeError::NoSource(format!("{} is empty", src_path.display())).into());
        }
        let _lock = lock_volume(&self.state, volume)?;
        self.clean_stale();
        progress("volume", 0);
        let need = src.len.div_ceil(1 << 20) * (1 << 20);
        let want = size.unwrap_or(0).max(need).div_ceil(1 << 20) * (1 << 20);
        let (vol, created) = match server::volume_by_name(&self.client, volume)? {
            // An image that grew grows its volume: the backup never fails for want of room
            // that the pool has.
            Some(v) if v.size < want => (server::grow_volume(&self.client, &v.id, want)?, false),
            Some(v) => (v, false),
            None => (server::create_volume(&self.client, volume, want)?, true),
        };
        let name = format!("backup-{volume}");
        let map_path = self.block_map_path(&name);
        let prev = BlockMap::load(&map_path);
        // The map is trusted only when maasd vouches that the volume holds exactly the
        // snapshot the map was made for: nothing (another host, a file-tree backup, an
        // operator's export, a killed run) wrote to it since.
        let unchanged = if created {
            None
        } else {
            server::volume(&self.client, &vol.id)?.unchanged_since
        };
        let (base, old_len) = if created {
            (None, 0)
        } else {
            match (&prev, &unchanged) {
                (Some(m), Some(s)) if m.snapshot == *s => (Some(m), m.source_len),
                // Unknown: compare with the volume, and zero all of it past the image.
                _ => (None, vol.size),
            }
        };
        let baseline = match (created, base) {
            (true, _) => Baseline::Blank,
            (false, Some(m)) => Baseline::Map(m),
            (false, None) => Baseline::Volume,
        };
        // From the first write on, the map no longer describes the volume: it goes now and
        // comes back only with the next seal.
        BlockMap::forget(&map_path).map_err(|e| ProbeError::Usage(e.to_string()))?;

        let mut rec = Record {
            name: name.clone(),
            pid: std::process::id(),
            pid_start: sys::start_time(std::process::id()).unwrap_or(0),
            ..Record::default()
        };
        rec.save(&self.state)?;
        let export = server::export_to_host(&self.client, &vol.id, &self.id.hostnqn, false)?;
        rec.export = Some(export.id.clone());
        rec.save(&self.state)?;
        progress("attach", 0);
        let synced = (|| -> R<(Vec<[u8; 16]>, ImageChanges, u64, u64)> {
            let disk = self.connect(&export)?;
            progress("copy", 0);
            let (digests, ch) = sync_image(
                self.rt.handle(),
                &disk,
                &mut src,
                baseline,
                old_len,
                &|done, _| progress("copy", done),
            )
            .map_err(|e| match e {
                crate::image::ImageError::Disk(d) => ProbeError::Disk(d),
                other => ProbeError::Usage(other.to_string()),
            })?;
            if let Some(why) = disk.write_failure() {
                return Err(ProbeError::Usage(format!(
                    "writing to the volume failed ({why}); the backup is not sealed (is the \
                     pool full?)"
                )));
            }
            let (w, r) = (
                disk.bytes_written
                    .load(std::sync::atomic::Ordering::Relaxed),
                disk.bytes_read.load(std::sync::atomic::Ordering::Relaxed),
            );
            Ok((digests, ch, w, r))
        })();
        // The export goes whatever happened; if maasd cannot be told now, the record stays
        // for the next command to finish the job.
        self.drop_clone(&rec);
        let (digests, changes, written, read) = synced?;
        progress("seal", written);
        let snap = server::seal(&self.client, &vol.id, &|_| {})?;
        let map = BlockMap {
            snapshot: snap.clone(),
            source_len: src.len,
            digests,
        };
        if let Err(e) = map.save(&map_path) {
            // The next backup compares with the volume instead: slower, never wrong.
            tracing::warn!(error = %e, "the block map was not kept");
        }
        let entry = maas_api::ManifestEntry {
            path: IMAGE_PATH.into(),
            kind: if crate::image::is_block_device(src_path) {
                "block"
            } else {
                "file"
            }
            .into(),
            size: src.len,
            mode: src.mode,
            uid: src.uid,
            gid: src.gid,
            mtime_ns: src.mtime_ns,
            blake3: Some(changes.blake3.clone()),
            target: None,
        };
        // The manifest carries the image's length (restores give back exactly it) and hash:
        // worth a few tries before the backup reports it missing.
        let text = crate::manifest::to_ndjson(std::slice::from_ref(&entry));
        let mut manifest_error = None;
        for attempt in 0..5 {
            match server::put_manifest(&self.client, &snap, &text) {
                Ok(_) => {
                    manifest_error = None;
                    break;
                }
                Err(e) => {
                    manifest_error = Some(e.to_string());
                    std::thread::sleep(std::time::Duration::from_millis(500 << attempt));
                }
            }
        }
        if let Some(e) = &manifest_error {
            tracing::warn!(snapshot = %snap, error = %e, "the manifest was not recorded");
        }
        if changes.changed_during_backup {
            tracing::warn!(source = %src_path.display(), "the source changed while it was read");
        }
        Ok(BackupReport {
            volume: volume.to_string(),
            volume_id: vol.id,
            snapshot: snap,
            created_volume: created,
            made_filesystem: false,
            changes: None,
            image: Some(changes),
            postgres: None,
            post_hook_error: None,
            manifest: crate::manifest::ManifestStats {
                entries: 1,
                ..Default::default()
            },
            manifest_error,
            bytes_written: written,
            bytes_read: read,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}
