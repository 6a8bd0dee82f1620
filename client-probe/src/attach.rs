//! Userspace attach: an exported volume becomes a block device of this host without any kernel
//! initiator — NVMe/TCP in this process ([`crate::nvme_disk`]), the volume as a FUSE file
//! ([`crate::fuse_disk`]), a loop device over that file.
//!
//! Every attachment is written down (`STATE/attachments/NAME.json`) before anything is set up,
//! and removed only once everything is torn down, so a probe killed at any point leaves a
//! record that the next start uses to remove what is left: a filesystem mounted on the loop
//! device, the loop device, the FUSE mount (whose daemon is gone), and the export and clone on
//! the server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::fuse_disk::{DISK_FILE, DiskFs};
use crate::nvme_disk::NvmeDisk;
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("FUSE mount at {dir}: {source}")]
    Fuse {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AttachError + '_ {
    move |source| AttachError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What an attachment set up, kept on disk until it is torn down.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// The process serving the FUSE file, and when it started (so a reused pid is not it).
    pub pid: u32,
    #[serde(default)]
    pub pid_start: u64,
    pub fuse_dir: PathBuf,
    #[serde(default)]
    pub loop_dev: Option<PathBuf>,
    /// Where the volume's filesystem is mounted, if it is.
    #[serde(default)]
    pub mount_dir: Option<PathBuf>,
    /// Server-side resources to delete when the attachment goes.
    #[serde(default)]
    pub export: Option<String>,
    /// A clone made for this attachment (`maas-probe mount`), deleted with it.
    #[serde(default)]
    pub clone_volume: Option<String>,
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Where the serving process connects (for a mount, served by a separate process).
    #[serde(default)]
    pub target: Option<TargetRec>,
    #[serde(default)]
    pub read_only: bool,
    /// Set by the serving process once the loop device is there.
    #[serde(default)]
    pub ready: bool,
    /// Set by the serving process when it could not attach.
    #[serde(default)]
    pub error: Option<String>,
}

/// An NVMe/TCP target as a record keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetRec {
    pub addr: String,
    pub subnqn: String,
    pub nsid: u32,
}

pub fn records_dir(state: &Path) -> PathBuf {
    state.join("attachments")
}

pub fn record_path(state: &Path, name: &str) -> PathBuf {
    records_dir(state).join(format!("{name}.json"))
}

impl Record {
    /// Written whole to a temporary file and renamed, so a crash never leaves half a record.
    pub fn save(&self, state: &Path) -> Result<(), AttachError> {
        let dir = records_dir(state);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = record_path(state, &self.name);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).unwrap_or_default();
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    pub fn load(path: &Path) -> Option<Record> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    pub fn remove(&self, state: &Path) {
        let _ = std::fs::remove_file(record_path(state, &self.name));
    }

    /// Every record on this host.
    pub fn all(state: &Path) -> Vec<Record> {
        let Ok(rd) = std::fs::read_dir(records_dir(state)) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| Record::load(&e.path()))
            .collect()
    }
}

/// A volume attached through FUSE and a loop device, served by this process.
#[derive(Debug)]
pub struct Attachment {
    pub disk: Arc<NvmeDisk>,
    pub loop_dev: PathBuf,
    pub fuse_dir: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

/// Serves `disk` as `FUSE_DIR/disk` and puts a loop device on it (read-only if asked).
pub fn attach(
    rt: &Handle,
    disk: Arc<NvmeDisk>,
    fuse_dir: &Path,
    read_only: bool,
) -> Result<Attachment, AttachError> {
    std::fs::create_dir_all(fuse_dir).map_err(io_err(fuse_dir))?;
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName("maas-probe".into()),
        fuser::MountOption::Subtype("maas".into()),
        fuser::MountOption::NoExec,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
    ];
    if read_only {
        cfg.mount_options.push(fuser::MountOption::RO);
    }
    cfg.n_threads = Some(2);
    let fs = DiskFs::new(disk.clone(), rt.clone(), read_only);
    let session = fuser::spawn_mount2(fs, fuse_dir, &cfg).map_err(|source| AttachError::Fuse {
        dir: fuse_dir.to_path_buf(),
        source,
    })?;
    let file = fuse_dir.join(DISK_FILE);
    let file_s = file.to_string_lossy().into_owned();
    let bs = disk.block_size().to_string();
    let mut args = vec!["--find", "--show", "--sector-size", &bs];
    if read_only {
        args.push("--read-only");
    }
    // Direct I/O: the loop device passes requests straight to the FUSE file instead of through
    // a second page cache; kernels or files that refuse it get the buffered loop device.
    let mut dio = args.clone();
    dio.push("--direct-io=on");
    dio.push(&file_s);
    let loop_dev = match sys::run("losetup", &dio) {
        Ok(out) => out,
        Err(e) => {
            tracing::info!(error = %e, "loop device without direct I/O");
            args.push(&file_s);
            match sys::run("losetup", &args) {
                Ok(out) => out,
                Err(e) => {
                    let _ = session.umount_and_join();
                    return Err(e.into());
                }
            }
        }
    };
    let loop_dev = loop_dev.trim().to_string();
    // Read-ahead of 4 MiB (the kernel's default is 128 KiB): sequential reads of a mounted
    // snapshot (restores, copies) become 1 MiB NVMe reads, several in flight, instead of
    // round trips of 128 KiB.
    if let Err(e) = sys::run("blockdev", &["--setra", "8192", &loop_dev]) {
        tracing::info!(error = %e, "loop device read-ahead left at the kernel's default");
    }
    Ok(Attachment {
        disk,
        loop_dev: PathBuf::from(loop_dev),
        fuse_dir: fuse_dir.to_path_buf(),
        session: Some(session),
    })
}

impl Attachment {
    /// Removes the loop device, makes every write durable (NVMe Flush) and unmounts the FUSE
    /// file. The caller has unmounted any filesystem on the loop device. Called from a thread
    /// that is not one of the runtime's: the runtime serves the FUSE requests this causes.
    pub fn detach(mut self, rt: &Handle) -> Result<(), AttachError> {
        detach_loop(&self.loop_dev, &self.fuse_dir)?;
        let flushed = rt.block_on(self.disk.flush());
        if let Some(s) = self.session.take()
            && let Err(e) = s.umount_and_join()
        {
            tracing::warn!(error = %e, "FUSE unmount failed; detaching it lazily");
            let _ = sys::unmount(&self.fuse_dir);
        }
        let _ = std::fs::remove_dir(&self.fuse_dir);
        flushed.map_err(|e| AttachError::Io {
            path: self.loop_dev.clone(),
            source: std::io::Error::other(format!("final flush of the volume failed: {e}")),
        })
    }
}

/// The loop device's backing file, if it has one.
fn backing_file(loop_dev: &Path) -> Option<PathBuf> {
    let name = loop_dev.file_name()?.to_str()?;
    let t = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(t.trim()))
}

/// Detaches `loop_dev` if it is still backed by our FUSE file (a loop device number is reused
/// by the next `losetup`, so the backing file is checked, never assumed).
pub fn detach_loop(loop_dev: &Path, fuse_dir: &Path) -> Result<(), AttachError> {
    let ours = fuse_dir.join(DISK_FILE);
    match backing_file(loop_dev) {
        Some(b) if b == ours => {
            sys::run("losetup", &["-d", &loop_dev.to_string_lossy()])?;
            // losetup -d only marks it for removal while in use; wait until it lets go.
            for _ in 0..250 {
                if backing_file(loop_dev).as_deref() != Some(ours.as_path()) {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(AttachError::Io {
                path: loop_dev.to_path_buf(),
                source: std::io::Error::other("the loop device is still in use after 5 s"),
            })
        }
        _ => Ok(()),
    }
}

/// Removes what a dead probe left on this host for `r`: the filesystem on its loop device, the
/// loop device, the FUSE mount. Server-side resources are the caller's (it has the client).
pub fn clean_host(r: &Record) {
    // Only a mount of our own loop device is ours to remove (after a reboot the directory may
    // hold someone else's mount).
    let ours = |m: &Path| {
        let Some(l) = &r.loop_dev else { return false };
        sys::mounts()
            .iter()
            .any(|(mp, src)| mp == m && Path::new(src) == l.as_path())
            && backing_file(l).as_deref() == Some(r.fuse_dir.join(DISK_FILE).as_path())
    };
    if let Some(m) = &r.mount_dir
        && ours(m)
    {
        if let Err(e) = sys::unmount(m) {
            tracing::warn!(path = %m.display(), error = %e, "cannot unmount a stale mount");
        }
    }
    if let Some(l) = &r.loop_dev
        && let Err(e) = detach_loop(l, &r.fuse_dir)
    {
        tracing::warn!(loop_dev = %l.display(), error = %e, "cannot detach a stale loop device");
    }
    let fuse_ours = sys::mounts()
        .iter()
        .any(|(mp, src)| mp == &r.fuse_dir && src == "maas-probe");
    if fuse_ours && let Err(e) = sys::unmount(&r.fuse_dir) {
        tracing::warn!(path = %r.fuse_dir.display(), error = %e, "cannot unmount a stale FUSE mount");
    }
    // A loop device set up after the record was last written (crash between losetup and the
    // record) is found by its backing file.
    if let Ok(out) = sys::run(
        "losetup",
        &["--list", "--noheadings", "--output", "NAME,BACK-FILE"],
    ) {
        let ours = r.fuse_dir.join(DISK_FILE);
        for line in out.lines() {
            let mut it = line.split_whitespace();
            if let (Some(dev), Some(back)) = (it.next(), it.next())
                && Path::new(back) == ours
            {
                let _ = sys::run("losetup", &["-d", dev]);
            }
        }
    }
    let _ = std::fs::remove_dir(&r.fuse_dir);
}
