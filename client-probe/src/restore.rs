//! `maas-probe restore`: files and folders out of a snapshot (`--path P --to DIR`), or the whole
//! image onto a device or file (`--image`). Both read a clone of the snapshot, exported
//! read-only to this host only and deleted afterwards; the snapshot itself is never attached.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::attach::{self, Record};
use crate::nvme_disk::NvmeDisk;
use crate::ops::{Probe, ProbeError, R};
use crate::server;
use crate::sys;

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub snapshot: String,
    /// Files restored (`--path`) or bytes of the image (`--image`).
    pub restored: String,
    pub to: PathBuf,
    pub bytes: u64,
    pub seconds: f64,
}

/// A clone of a snapshot exported read-only to this host, recorded so a killed restore is
/// cleaned up like any attachment; dropped with [`Probe::drop_clone`].
pub(crate) struct HostClone {
    pub rec: Record,
    pub export: maas_api::Export,
}

impl Probe {
    pub(crate) fn clone_for_host(&self, snapshot: &str, purpose: &str) -> R<HostClone> {
        let snap = server::snapshot(&self.client, snapshot)?;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("{purpose}-{}", &suffix[..12]);
        let mut rec = Record {
            name: name.clone(),
            pid: std::process::id(),
            pid_start: crate::sys::start_time(std::process::id()).unwrap_or(0),
            fuse_dir: self.state.join("run").join(&name).join("fuse"),
            snapshot: Some(snap.id.clone()),
            read_only: true,
            ..Record::default()
        };
        rec.save(&self.state)?;
        let made = (|| -> R<maas_api::Export> {
            let clone_name: String = format!("{}-{name}", snap.volume_name)
                .chars()
                .take(128)
                .collect();
            let clone = server::clone_snapshot(&self.client, &snap.id, &clone_name)?;
            rec.clone_volume = Some(clone.clone());
            rec.save(&self.state)?;
            let export = server::export_to_host(&self.client, &clone, &self.id.hostnqn, true)?;
            rec.export = Some(export.id.clone());
            rec.save(&self.state)?;
            Ok(export)
        })();
        match made {
            Ok(export) => Ok(HostClone { rec, export }),
            Err(e) => {
                self.drop_clone(&rec);
                Err(e)
            }
        }
    }

    /// Removes what an attachment left, here (mount, loop device, FUSE mount) and on the
    /// server (its export and clone); the record goes once the server side is gone too.
    pub(crate) fn drop_clone(&self, rec: &Record) {
        attach::clean_host(rec);
        let mut ok = true;
        if let Some(e) = &rec.export
            && let Err(err) = server::delete_export(&self.client, e)
        {
            tracing::warn!(export = %e, error = %err, "cannot delete the export yet");
            ok = false;
        }
        if let Some(v) = &rec.clone_volume
            && let Err(err) = server::delete_volume(&self.client, v)
        {
            tracing::warn!(volume = %v, error = %err, "cannot delete the clone yet");
            ok = false;
        }
        if ok {
            rec.remove(&self.state);
        }
        let _ = std::fs::remove_dir_all(self.state.join("run").join(&rec.name));
    }

    /// Copies `path` (a file or a folder, relative to the snapshot's root) into `to`, keeping
    /// owners, modes, times, xattrs, ACLs, hard links and holes.
    pub fn restore_files(&self, snapshot: &str, path: &str, to: &Path) -> R<RestoreReport> {
        let t0 = Instant::now();
        let rel = safe_relative(path)?;
        self.clean_stale();
        std::fs::create_dir_all(to)?;
        let mut hc = self.clone_for_host(snapshot, "restore")?;
        let r = (|| -> R<u64> {
            let disk = self.connect(&hc.export)?;
            let att = attach::attach(self.rt.handle(), disk, &hc.rec.fuse_dir, true)?;
            hc.rec.loop_dev = Some(att.loop_dev.clone());
            hc.rec.save(&self.state)?;
            let mnt = self.state.join("run").join(&hc.rec.name).join("fs");
            let copied = (|| -> R<u64> {
                std::fs::create_dir_all(&mnt)?;
                let l = att.loop_dev.to_string_lossy().into_owned();
                let m = mnt.to_string_lossy().into_owned();
                sys::run("mount", &["-t", "ext4", "-o", "ro,noload", &l, &m])?;
                hc.rec.mount_dir = Some(mnt.clone());
                hc.rec.save(&self.state)?;
                let from = mnt.join(&rel);
                let res = (|| -> R<u64> {
                    let meta = std::fs::symlink_metadata(&from).map_err(|_| {
                        ProbeError::Usage(format!("{path} is not in snapshot {snapshot}"))
                    })?;
                    // A symbolic link inside the snapshot on the way (`a -> /`) must not lead
                    // the copy out of it to this host's files.
                    let root = std::fs::canonicalize(&mnt)?;
                    let inside = match from.parent() {
                        Some(parent) if !rel.as_os_str().is_empty() => {
                            std::fs::canonicalize(parent)?.starts_with(&root)
                        }
                        _ => true,
                    };
                    if !inside {
                        return Err(ProbeError::Usage(format!(
                            "{path} leads out of the snapshot through a symbolic link"
                        )));
                    }
                    // A folder is restored as a folder of that name inside `to`; a file as a
                    // file inside `to`.
                    // The whole snapshot: its contents (not a folder named after the mount
                    // point), without the filesystem's own lost+found.
                    let whole = rel.as_os_str().is_empty();
                    let src = if whole {
                        format!("{}/", from.display())
                    } else {
                        from.to_string_lossy().into_owned()
                    };
                    let dst = format!("{}/", to.display());
                    let mut args = vec!["-aHAXS", "--numeric-ids", "--inplace"];
                    if whole {
                        args.push("--exclude=/lost+found");
                    }
                    args.push(&src);
                    args.push(&dst);
                    sys::run("rsync", &args)?;
                    Ok(if meta.is_dir() {
                        crate::ops::du(&from)
                    } else {
                        meta.len()
                    })
                })();
                let un = sys::unmount(&mnt);
                let bytes = res?;
                un?;
                Ok(bytes)
            })();
            att.detach(self.rt.handle())?;
            copied
        })();
        self.drop_clone(&hc.rec);
        let bytes = r?;
        Ok(RestoreReport {
            snapshot: snapshot.to_string(),
            restored: path.to_string(),
            to: to.to_path_buf(),
            bytes,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// Writes the snapshot's whole image to a block device or a file (made if missing; holes
    /// where the snapshot is zero), then syncs it.
    /// A restore as the CLI and host jobs ask for it: files (`path` into folder `to`) or the
    /// whole image (into `image`, a device or a file).
    pub fn restore(
        &self,
        snapshot: &str,
        path: Option<&str>,
        to: Option<&Path>,
        image: Option<&Path>,
    ) -> R<RestoreReport> {
        match (path, to, image) {
            (Some(p), Some(t), None) => self.restore_files(snapshot, p, t),
            (None, None, Some(i)) => self.restore_image(snapshot, i),
            _ => Err(ProbeError::Usage(
                "a restore takes --path P --to DIR, or --image DEVICE_OR_FILE".into(),
            )),
        }
    }

    pub fn restore_image(&self, snapshot: &str, to: &Path) -> R<RestoreReport> {
        let t0 = Instant::now();
        self.clean_stale();
        let hc = self.clone_for_host(snapshot, "restore")?;
        let r = (|| -> R<u64> {
            // An image backup's snapshot restores to exactly the image's length (its volume
            // is rounded up); any other gives back the whole volume.
            let image = match server::manifest(&self.client, snapshot)? {
                Some(m) if m.len() == 1 && m[0].path == crate::image_backup::IMAGE_PATH => {
                    Some((m[0].size, m[0].blake3.clone()))
                }
                _ => None,
            };
            let disk = self.connect(&hc.export)?;
            let (bytes, hash) = copy_image(self, &disk, to, image.as_ref().map(|i| i.0))?;
            // The image's BLAKE3, recorded at backup, proves the restore end to end.
            if let Some((_, Some(want))) = &image
                && *want != hash
            {
                return Err(ProbeError::Usage(format!(
                    "the restored image's BLAKE3 is {hash}, the backup recorded {want}: {} \
                     does not hold the backed-up image",
                    to.display()
                )));
            }
            Ok(bytes)
        })();
        self.drop_clone(&hc.rec);
        let bytes = r?;
        Ok(RestoreReport {
            snapshot: snapshot.to_string(),
            restored: "image".into(),
            to: to.to_path_buf(),
            bytes,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

/// Reads the whole disk (or its first `limit` bytes) with several commands in flight and
/// writes it out in order; the bytes written and their BLAKE3.
fn copy_image(p: &Probe, disk: &Arc<NvmeDisk>, to: &Path, limit: Option<u64>) -> R<(u64, String)> {
    let mut hasher = blake3::Hasher::new();
    let is_dev = std::fs::metadata(to)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(!is_dev)
        .truncate(false)
        .open(to)
        .map_err(|e| ProbeError::Usage(format!("{}: {e}", to.display())))?;
    let size = limit.map_or(disk.size(), |l| l.min(disk.size()));
    if is_dev {
        let dev_size = f.seek(SeekFrom::End(0))?;
        if dev_size < size {
            return Err(ProbeError::Usage(format!(
                "{} holds {dev_size} bytes; the snapshot is {size}",
                to.display()
            )));
        }
    } else {
        // Emptied first: the zero ranges skipped below must read as zero, not as whatever the
        // file held before.
        f.set_len(0)?;
        f.set_len(size)?;
    }
    let step = disk.max_transfer() as u64;
    const IN_FLIGHT: u64 = 16;
    let mut at = 0u64;
    while at < size {
        let batch_end = (at + step * IN_FLIGHT).min(size);
        let mut reads = Vec::new();
        let mut o = at;
        while o < batch_end {
            let n = (batch_end - o).min(step) as usize;
            // The volume is read in whole blocks; an image's last partial block is cut below.
            let io = n.div_ceil(4096) * 4096;
            let d = disk.clone();
            reads.push((o, n, p.rt.spawn(async move { d.read(o, io).await })));
            o += n as u64;
        }
        for (off, n, h) in reads {
            let mut buf =
                p.rt.block_on(h)
                    .map_err(|e| ProbeError::Usage(format!("read task: {e}")))??;
            buf.truncate(n);
            hasher.update(&buf);
            // A file keeps holes where the image is zero; a device gets every byte.
            if is_dev || buf.iter().any(|&b| b != 0) {
                f.seek(SeekFrom::Start(off))?;
                f.write_all(&buf)?;
            }
        }
        at = batch_end;
    }
    f.sync_all()?;
    Ok((size, hasher.finalize().to_hex().to_string()))
}

/// `path` as a path inside the snapshot: relative, without `..`.
fn safe_relative(path: &str) -> R<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(x) => out.push(x),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(ProbeError::Usage(format!(
                    "--path {path:?}: use a path inside the snapshot, without '..'"
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_paths_stay_inside_the_snapshot() {
        assert_eq!(safe_relative("/a/b").expect("ok"), PathBuf::from("a/b"));
        assert_eq!(safe_relative("a/./b/").expect("ok"), PathBuf::from("a/b"));
        assert!(safe_relative("../etc").is_err());
        assert!(safe_relative("/a/../../etc").is_err());
        assert_eq!(safe_relative("/").expect("ok"), PathBuf::new());
    }
}
