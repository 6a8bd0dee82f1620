//! `maas-probe backup --source DEVICE_OR_FILE`: a block image backed up onto a volume of its
//! own, straight over NVMe/TCP (no FUSE, no loop device, no filesystem on this side), sending
//! only changed blocks ([`crate::image`]). The snapshot's file manifest holds one entry,
//! `/image`, with the image's length and BLAKE3, which restores use to give back exactly the
//! image's bytes.

use std::path::Path;
use std::time::Instant;

use crate::image::{Baseline, BlockMap, ImageChanges, ImageSource, sync_image};
use crate::ops::{BackupReport, Probe, ProbeError, R, check_volume_name, lock_volume};
use crate::server;
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
        check_volume_name(volume)?;
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
        let (vol, created) = self.image_volume(volume, src.len, size)?;
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

        let (rec, export) = self.export_for_backup(&name, &vol.id)?;
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
        let manifest_error = self.record_image_manifest(&snap, &entry);
        if changes.changed_during_backup {
            tracing::warn!(source = %src_path.display(), "the source changed while it was read");
        }
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

    /// The volume an image of `bytes` is backed up into: made, or grown to hold it (and to
    /// `size` if that is larger), in whole MiB. An image that grew grows its volume: the
    /// backup never fails for want of room that the pool has.
    pub(crate) fn image_volume(
        &self,
        volume: &str,
        bytes: u64,
        size: Option<u64>,
    ) -> R<(maas_api::Volume, bool)> {
        let want = size.unwrap_or(0).max(bytes).div_ceil(1 << 20) * (1 << 20);
        Ok(match server::volume_by_name(&self.client, volume)? {
            Some(v) if v.size < want => (server::grow_volume(&self.client, &v.id, want)?, false),
            Some(v) => (v, false),
            None => (server::create_volume(&self.client, volume, want)?, true),
        })
    }

    /// Records an image snapshot's one-entry manifest: it carries the image's length
    /// (restores give back exactly it), worth a few tries; the error if it could not be.
    pub(crate) fn record_image_manifest(
        &self,
        snap: &str,
        entry: &maas_api::ManifestEntry,
    ) -> Option<String> {
        let text = crate::manifest::to_ndjson(std::slice::from_ref(entry));
        let mut error = None;
        for attempt in 0..5 {
            match server::put_manifest(&self.client, snap, &text) {
                Ok(_) => return None,
                Err(e) => {
                    error = Some(e.to_string());
                    std::thread::sleep(std::time::Duration::from_millis(500 << attempt));
                }
            }
        }
        if let Some(e) = &error {
            tracing::warn!(snapshot = %snap, error = %e, "the manifest was not recorded");
        }
        error
    }
}

/// The report of an image (or NBD) backup.
#[allow(clippy::too_many_arguments)] // the report's own fields
pub(crate) fn image_report(
    volume: &str,
    volume_id: String,
    snapshot: String,
    created: bool,
    changes: ImageChanges,
    manifest_error: Option<String>,
    written: u64,
    read: u64,
    t0: Instant,
) -> BackupReport {
    BackupReport {
        volume: volume.to_string(),
        volume_id,
        snapshot,
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
    }
}
