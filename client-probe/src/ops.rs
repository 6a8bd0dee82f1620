//! The probe's commands: `backup` (attach, bring the source up to date, flush, detach, seal),
//! `mount` (clone a snapshot, export it read-only to this host, attach, mount) and `umount`
//! (all of it undone, clone included), and the clean-up of what a killed probe left behind.
//!
//! Threads: the commands run on the caller's thread and call the host's tools from it; the
//! tokio runtime only carries NVMe/TCP and the FUSE requests, so a tool that writes to the
//! loop device (mkfs, rsync, umount's flush) never waits on a thread it is blocking.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use maas_api::client::{Client, ClientError};
use serde::Serialize;
use tokio::runtime::Runtime;

use crate::attach::{self, AttachError, Record};
use crate::identity::Identity;
use crate::nvme_disk::{DiskError, NvmeDisk, Target};
use crate::server;
use crate::sys::{self, SysError};
use crate::tree::{self, Changes, TreeError};

/// What a command failed with; each kind has its own exit code (see `exit_code`).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("maasd: {0}")]
    Server(#[from] ClientError),
    #[error("volume: {0}")]
    Disk(#[from] DiskError),
    #[error("attach: {0}")]
    Attach(#[from] AttachError),
    #[error("{0}")]
    Tree(#[from] TreeError),
    #[error("{0}")]
    Sys(#[from] SysError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ProbeError {
    /// Exit codes scripts can act on: 2 usage, 3 maasd unreachable or refused, 4 source or
    /// space problem, 5 attach or volume I/O, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            ProbeError::Usage(_) => 2,
            ProbeError::Server(_) => 3,
            ProbeError::Tree(TreeError::NoSource(_) | TreeError::NoSpace) => 4,
            ProbeError::Disk(_) | ProbeError::Attach(_) => 5,
            _ => 1,
        }
    }
}

pub type R<T> = Result<T, ProbeError>;

/// Work done on the mounted volume after a file-tree copy, before the seal (see
/// [`Probe::backup_tree_with`]).
pub type AfterCopy<'a> = &'a mut dyn FnMut(&Path) -> R<()>;

/// Everything a command needs: where the probe keeps its state, who this host is, maasd.
#[derive(Debug)]
pub struct Probe {
    pub state: PathBuf,
    pub id: Identity,
    pub client: Client,
    pub rt: Runtime,
}

/// What to back up (the fields of `maas-probe backup` and of a host job's backup).
#[derive(Debug, Default)]
pub struct BackupRequest<'a> {
    pub volume: &'a str,
    /// A directory, a block device or image file, or an NBD URI.
    pub source: Option<&'a str>,
    /// A libpq connection string of a PostgreSQL cluster on this host.
    pub postgres: Option<&'a str>,
    /// With an NBD source: QEMU's dirty bitmap.
    pub bitmap: Option<&'a str>,
    pub size: Option<u64>,
    pub exclude: &'a [String],
    pub pre: Option<&'a str>,
    pub post: Option<&'a str>,
}

/// A backup's outcome, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct BackupReport {
    pub volume: String,
    pub volume_id: String,
    pub snapshot: String,
    pub created_volume: bool,
    pub made_filesystem: bool,
    /// What a file-tree backup changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<Changes>,
    /// What an image backup changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::image::ImageChanges>,
    /// The file manifest recorded with the snapshot.
    pub manifest: crate::manifest::ManifestStats,
    /// Why the manifest could not be recorded (the snapshot is good; browsing by manifest
    /// will not know it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest_error: Option<String>,
    /// What a PostgreSQL backup did (data directory, start and stop LSN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<crate::postgres::PgReport>,
    /// Why the `--post` command failed (the backup itself succeeded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_hook_error: Option<String>,
    /// Bytes the probe wrote to and read from the volume over NVMe/TCP.
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct MountReport {
    pub snapshot: String,
    pub dir: PathBuf,
    pub clone_volume: String,
    pub loop_device: PathBuf,
    pub seconds: f64,
}

type Manifested = Result<(Vec<maas_api::ManifestEntry>, crate::manifest::ManifestStats), String>;

/// What a backup did while the volume was attached.
struct Attached {
    changes: Changes,
    made_fs: bool,
    manifest: Manifested,
    written: u64,
    read: u64,
}

/// How big a new volume is made when `--size` is not given: twice the source, at least 1 GiB,
/// so a year of growth fits before it must be grown.
fn default_size(src: &Path) -> u64 {
    let used = du(src);
    (used.saturating_mul(2)).max(1 << 30).div_ceil(1 << 20) * (1 << 20)
}

pub(crate) fn du(p: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// Refuses a volume name maasd would refuse, before anything is made.
pub(crate) fn check_volume_name(volume: &str) -> R<()> {
    if name_ok(volume) {
        Ok(())
    } else {
        Err(ProbeError::Usage(format!(
            "volume name {volume:?}: use 1-128 of A-Z a-z 0-9 . _ -"
        )))
    }
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Probe {
    /// Removes what earlier, killed runs of the probe left: for each attachment record whose
    /// process is gone, the mount, loop device and FUSE mount, then the export and any clone.
    pub fn clean_stale(&self) -> Vec<String> {
        let mut cleaned = Vec::new();
        for r in Record::all(&self.state) {
            if sys::alive_as(r.pid, r.pid_start) {
                continue;
            }
            tracing::warn!(attachment = %r.name, "removing what a stopped probe left attached");
            self.drop_clone(&r);
            cleaned.push(r.name.clone());
        }
        cleaned
    }

    /// A read-write export of volume `vol_id` to this host for backup attachment `name`,
    /// recorded (before the export is made and after) so that a killed probe's leftovers are
    /// found and removed by the next command.
    pub(crate) fn export_for_backup(
        &self,
        name: &str,
        vol_id: &str,
    ) -> R<(Record, maas_api::Export)> {
        let mut rec = Record {
            name: name.to_string(),
            pid: std::process::id(),
            pid_start: sys::start_time(std::process::id()).unwrap_or(0),
            ..Record::default()
        };
        rec.save(&self.state)?;
        let export = server::export_to_host(&self.client, vol_id, &self.id.hostnqn, false)?;
        rec.export = Some(export.id.clone());
        rec.save(&self.state)?;
        Ok((rec, export))
    }

    /// A backup as the CLI and host jobs ask for it: the source decides the kind (PostgreSQL,
    /// an NBD URI, a block device or image file, else a directory), between the hooks.
    pub fn backup(&self, req: &BackupRequest<'_>, progress: &dyn Fn(&str, u64)) -> R<BackupReport> {
        let volume = req.volume;
        crate::hooks::around(req.pre, req.post, volume, || {
            match (req.source, req.postgres) {
                (None, Some(pg)) => {
                    self.backup_postgres(volume, pg, req.size, req.exclude, progress)
                }
                (Some(src), None) if crate::nbd_source::is_nbd(src) => {
                    self.backup_nbd(volume, src, req.bitmap, req.size, progress)
                }
                (Some(src), None) if crate::image::is_image(Path::new(src)) => {
                    if !req.exclude.is_empty() {
                        return Err(ProbeError::Usage(
                            "--exclude applies to directories, not to a device or image file"
                                .into(),
                        ));
                    }
                    self.backup_image(volume, Path::new(src), req.size, progress)
                }
                (Some(src), None) => {
                    self.backup_tree(volume, Path::new(src), req.size, req.exclude, progress)
                }
                _ => Err(ProbeError::Usage(
                    "a backup takes a source or a PostgreSQL connection, one of them".into(),
                )),
            }
        })
    }

    fn run_dir(&self, name: &str) -> PathBuf {
        self.state.join("run").join(name)
    }

    pub(crate) fn connect(&self, export: &maas_api::Export) -> R<Arc<NvmeDisk>> {
        let t = server::target_of(
            &self.client,
            export,
            &self.id.hostnqn,
            self.id.hostid_bytes(),
        )?;
        connect_target(&self.rt, &t)
    }

    /// `maas-probe backup --volume NAME --source DIR`.
    pub fn backup_tree(
        &self,
        volume: &str,
        src: &Path,
        size: Option<u64>,
        excludes: &[String],
        progress: &dyn Fn(&str, u64),
    ) -> R<BackupReport> {
        self.backup_tree_with(volume, src, size, excludes, progress, None)
    }

    /// As [`Probe::backup_tree`]; `after_copy` runs on the mounted volume once the tree is
    /// copied, before the manifest, the unmount and the seal (a database source finishes its
    /// backup there). Its failure fails the backup: nothing is sealed.
    pub fn backup_tree_with(
        &self,
        volume: &str,
        src: &Path,
        size: Option<u64>,
        excludes: &[String],
        progress: &dyn Fn(&str, u64),
        after_copy: Option<AfterCopy<'_>>,
    ) -> R<BackupReport> {
        let t0 = Instant::now();
        check_volume_name(volume)?;
        if !src.is_dir() {
            return Err(TreeError::NoSource(src.display().to_string()).into());
        }
        // One backup of a volume at a time on this host (two would write one filesystem).
        let _lock = lock_volume(&self.state, volume)?;
        self.clean_stale();
        progress("volume", 0);
        let (vol, created) = match server::volume_by_name(&self.client, volume)? {
            Some(v) => {
                if let Some(s) = size
                    && s > v.size
                {
                    (server::grow_volume(&self.client, &v.id, s)?, false)
                } else {
                    (v, false)
                }
            }
            None => {
                let s = size.unwrap_or_else(|| default_size(src));
                let s = s.div_ceil(1 << 20) * (1 << 20);
                (server::create_volume(&self.client, volume, s)?, true)
            }
        };
        let name = format!("backup-{volume}");
        let (mut rec, export) = self.export_for_backup(&name, &vol.id)?;
        rec.fuse_dir = self.run_dir(&name).join("fuse");
        rec.save(&self.state)?;
        let result = self.backup_attached(
            &mut rec, &export, created, src, excludes, progress, after_copy,
        );
        // Whatever happened, what is attached goes, here and the export at maasd (the next
        // backup makes a new one); if maasd cannot be told now, the record stays for the
        // next command to finish the job.
        self.drop_clone(&rec);
        let done = result?;
        progress("seal", done.written);
        let snap = server::seal(&self.client, &vol.id, &|_| {})?;
        let (manifest, manifest_error) = match done.manifest {
            Ok((entries, stats)) => match self.record_manifest(&name, &snap, &entries) {
                Ok(()) => (stats, None),
                Err(e) => (stats, Some(e)),
            },
            Err(e) => (Default::default(), Some(e)),
        };
        if let Some(e) = &manifest_error {
            tracing::warn!(snapshot = %snap, error = %e, "the file manifest was not recorded");
        }
        Ok(BackupReport {
            volume: volume.to_string(),
            volume_id: vol.id,
            snapshot: snap,
            created_volume: created,
            made_filesystem: done.made_fs,
            changes: Some(done.changes),
            image: None,
            postgres: None,
            post_hook_error: None,
            manifest,
            manifest_error,
            bytes_written: done.written,
            bytes_read: done.read,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    #[allow(clippy::too_many_arguments)] // one call site; the arguments are the backup's
    fn backup_attached(
        &self,
        rec: &mut Record,
        export: &maas_api::Export,
        created: bool,
        src: &Path,
        excludes: &[String],
        progress: &dyn Fn(&str, u64),
        mut after_copy: Option<AfterCopy<'_>>,
    ) -> R<Attached> {
        progress("attach", 0);
        let disk = self.connect(export)?;
        let att = attach::attach(self.rt.handle(), disk.clone(), &rec.fuse_dir, false)?;
        rec.loop_dev = Some(att.loop_dev.clone());
        rec.save(&self.state)?;
        let mnt = self.run_dir(&rec.name).join("fs");
        let previous = std::fs::read(self.manifest_cache(&rec.name))
            .map(|t| crate::manifest::from_ndjson(&t))
            .unwrap_or_default();
        let mut inner = || -> R<(Changes, bool, Manifested)> {
            let mut made = false;
            if !tree::has_ext4(&att.loop_dev) {
                if !created {
                    // An existing volume without a filesystem was not made by the probe (or was
                    // wiped): refuse rather than format someone's data.
                    let probe = self.volume_is_blank(&disk)?;
                    if !probe {
                        return Err(ProbeError::Usage(
                            "the volume holds data but no ext4 filesystem; the probe will not \
                             format it (back up into a new volume name)"
                                .into(),
                        ));
                    }
                }
                progress("mkfs", 0);
                tree::make_filesystem(&att.loop_dev, "maas")?;
                made = true;
            } else {
                tree::check_filesystem(&att.loop_dev)?;
                // A volume grown since the last backup (--size): the filesystem grows with it
                // (offline, after a full check, as resize2fs requires).
                tree::grow_filesystem(&att.loop_dev, disk.size())?;
            }
            std::fs::create_dir_all(&mnt)?;
            sys::run(
                "mount",
                &[
                    "-t",
                    "ext4",
                    "-o",
                    "noatime",
                    &att.loop_dev.to_string_lossy(),
                    &mnt.to_string_lossy(),
                ],
            )?;
            rec.mount_dir = Some(mnt.clone());
            rec.save(&self.state)?;
            progress("copy", 0);
            let synced: R<Changes> = tree::sync_tree(src, &mnt, excludes)
                .map_err(ProbeError::from)
                .and_then(|c| match after_copy.as_mut() {
                    Some(f) => f(&mnt).map(|_| c),
                    None => Ok(c),
                });
            let manifest = match &synced {
                Ok(_) => {
                    progress("manifest", 0);
                    crate::manifest::build(&mnt, src, &previous)
                        .map_err(|e| format!("building the file manifest: {e}"))
                }
                Err(_) => Err(String::new()),
            };
            // The filesystem is unmounted (which writes and flushes it) even when the copy
            // failed, so the volume is consistent for the next backup. Strictly: a mount kept
            // busy by someone is an error, never detached lazily and sealed while writable.
            let unmounted = sys::run("umount", &[&mnt.to_string_lossy()])
                .map(|_| ())
                .map_err(|e| {
                    ProbeError::Usage(format!(
                        "cannot unmount the volume at {} (something uses it?): {e}; the backup \
                         is not sealed",
                        mnt.display()
                    ))
                });
            rec.mount_dir = None;
            rec.save(&self.state)?;
            let changes = synced?;
            unmounted?;
            Ok((changes, made, manifest))
        };
        let r = inner();
        let detached = att.detach(self.rt.handle());
        // When the volume itself failed (the target went away, the pool is full), that is
        // the cause, whatever the tools above it made of it (ENOSPC, EIO, a failed umount).
        if r.is_err()
            && let Some(why) = disk.write_failure()
        {
            return Err(ProbeError::Disk(DiskError::Gone(format!(
                "{why}; the backup is not sealed, the previous snapshot is intact"
            ))));
        }
        let (changes, made, manifest) = r?;
        detached?;
        // A write the filesystem met in background writeback fails nothing above it: the
        // disk remembers it, and such a backup is never sealed.
        if let Some(why) = disk.write_failure() {
            return Err(ProbeError::Usage(format!(
                "writing to the volume failed ({why}); the backup is not sealed (is the pool \
                 full?)"
            )));
        }
        let _ = std::fs::remove_dir(&mnt);
        let _ = std::fs::remove_dir(self.run_dir(&rec.name));
        Ok(Attached {
            changes,
            made_fs: made,
            manifest,
            written: disk.bytes_written.load(Ordering::Relaxed),
            read: disk.bytes_read.load(Ordering::Relaxed),
        })
    }

    /// The last manifest recorded for a volume's backups (reused for unchanged files).
    fn manifest_cache(&self, attachment: &str) -> PathBuf {
        self.state
            .join("manifests")
            .join(format!("{attachment}.ndjson"))
    }

    /// Records the manifest with the snapshot, then keeps it for the next backup.
    fn record_manifest(
        &self,
        attachment: &str,
        snapshot: &str,
        entries: &[maas_api::ManifestEntry],
    ) -> Result<(), String> {
        let text = crate::manifest::to_ndjson(entries);
        server::put_manifest(&self.client, snapshot, &text).map_err(|e| e.to_string())?;
        let path = self.manifest_cache(attachment);
        let tmp = path.with_extension("ndjson.tmp");
        std::fs::create_dir_all(self.state.join("manifests"))
            .and_then(|_| std::fs::write(&tmp, &text))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("keeping the manifest in {}: {e}", path.display()))
    }

    /// The first MiB of the volume is all zero (never written).
    fn volume_is_blank(&self, disk: &NvmeDisk) -> R<bool> {
        let n = (1 << 20).min(disk.size() as usize).min(disk.max_transfer());
        let b = self.rt.block_on(disk.read(0, n))?;
        Ok(b.iter().all(|&x| x == 0))
    }

    /// `maas-probe mount SNAPSHOT DIR`: the serving half runs in a child process (`exe
    /// serve-attachment`), which outlives this command; this half waits until it is ready and
    /// mounts the filesystem read-only.
    pub fn mount(&self, exe: &Path, snapshot: &str, dir: &Path) -> R<MountReport> {
        let t0 = Instant::now();
        self.clean_stale();
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| ProbeError::Usage(format!("{}: {e}", dir.display())))?;
        if sys::is_mounted(&dir) {
            return Err(ProbeError::Usage(format!(
                "{} is already a mount point",
                dir.display()
            )));
        }
        let hc = self.clone_for_host(snapshot, "mount")?;
        let (mut rec, export) = (hc.rec, hc.export);
        let name = rec.name.clone();
        let snap_id = rec.snapshot.clone().unwrap_or_default();
        let clone = rec.clone_volume.clone().unwrap_or_default();
        let r = (|| -> R<MountReport> {
            let t = server::target_of(
                &self.client,
                &export,
                &self.id.hostnqn,
                self.id.hostid_bytes(),
            )?;
            rec.target = Some(attach::TargetRec {
                addr: t.addr,
                subnqn: t.subnqn,
                nsid: t.nsid,
            });
            rec.save(&self.state)?;
            let run = self.run_dir(&name);
            std::fs::create_dir_all(&run)?;
            let log = std::fs::File::create(run.join("serve.log"))?;
            // Its own process group: a Ctrl-C or a closed terminal of this command must not
            // stop the process that serves the mount.
            use std::os::unix::process::CommandExt as _;
            let mut child = std::process::Command::new(exe)
                .arg("--state-dir")
                .arg(&self.state)
                .arg("serve-attachment")
                .arg(&name)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .process_group(0)
                .spawn()?;
            // Wait for the serving process to report its loop device (or its failure).
            let deadline = Instant::now() + Duration::from_secs(60);
            let loop_dev = loop {
                if let Some(r) = Record::load(&attach::record_path(&self.state, &name)) {
                    if let Some(e) = r.error {
                        return Err(ProbeError::Usage(format!("attach failed: {e}")));
                    }
                    if r.ready
                        && let Some(l) = r.loop_dev.clone()
                    {
                        rec = r;
                        break l;
                    }
                }
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(ProbeError::Usage(format!(
                        "the attachment process exited ({st}) before it was ready"
                    )));
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    return Err(ProbeError::Usage(
                        "the attachment was not ready in 60 s".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let l = loop_dev.to_string_lossy().into_owned();
            let d = dir.to_string_lossy().into_owned();
            // ext4 mounted read-only without replaying its journal (the device is read-only);
            // anything else as the kernel recognises it.
            if sys::run("mount", &["-t", "ext4", "-o", "ro,noload", &l, &d]).is_err() {
                sys::run("mount", &["-o", "ro", &l, &d])?;
            }
            rec.mount_dir = Some(dir.clone());
            rec.save(&self.state)?;
            Ok(MountReport {
                snapshot: snap_id.clone(),
                dir: dir.clone(),
                clone_volume: clone,
                loop_device: loop_dev,
                seconds: t0.elapsed().as_secs_f64(),
            })
        })();
        match r {
            Ok(m) => Ok(m),
            Err(e) => {
                let cur = Record::load(&attach::record_path(&self.state, &name)).unwrap_or(rec);
                if cur.pid != std::process::id() && sys::alive_as(cur.pid, cur.pid_start) {
                    unsafe_kill(cur.pid);
                    wait_gone(cur.pid, Duration::from_secs(10));
                }
                self.drop_clone(&cur);
                Err(e)
            }
        }
    }

    /// `maas-probe umount DIR`.
    pub fn umount(&self, dir: &Path) -> R<String> {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let Some(rec) = Record::all(&self.state)
            .into_iter()
            .find(|r| r.mount_dir.as_deref() == Some(dir.as_path()))
        else {
            return Err(ProbeError::Usage(format!(
                "{} is not a snapshot mounted by maas-probe",
                dir.display()
            )));
        };
        sys::unmount(&dir)?;
        if sys::alive_as(rec.pid, rec.pid_start) {
            unsafe_kill(rec.pid);
            if !wait_gone(rec.pid, Duration::from_secs(30)) {
                tracing::warn!(
                    pid = rec.pid,
                    "the attachment process did not stop; cleaning up"
                );
            }
        }
        attach::clean_host(&rec);
        if let Some(e) = &rec.export {
            server::delete_export(&self.client, e)?;
        }
        if let Some(v) = &rec.clone_volume {
            server::delete_volume(&self.client, v)?;
        }
        rec.remove(&self.state);
        let _ = std::fs::remove_dir_all(self.run_dir(&rec.name));
        Ok(rec.name)
    }
}

/// The serving half of `mount` (`maas-probe serve-attachment NAME`): connects to the target
/// the record names, serves the FUSE file, sets up the loop device, reports ready, and on
/// SIGTERM or SIGINT tears its half down. It needs no REST access.
pub fn serve_attachment(state: &Path, id: &Identity, rt: &Runtime, name: &str) -> R<()> {
    let path = attach::record_path(state, name);
    let mut rec = Record::load(&path)
        .ok_or_else(|| ProbeError::Usage(format!("no attachment record {name}")))?;
    rec.pid = std::process::id();
    rec.pid_start = sys::start_time(rec.pid).unwrap_or(0);
    rec.save(state)?;
    let fail = |rec: &mut Record, e: &ProbeError| {
        rec.error = Some(e.to_string());
        let _ = rec.save(state);
    };
    let Some(t) = rec.target.clone() else {
        let e = ProbeError::Usage("the attachment record names no target".into());
        fail(&mut rec, &e);
        return Err(e);
    };
    let target = Target {
        addr: t.addr,
        subnqn: t.subnqn,
        nsid: t.nsid,
        hostnqn: id.hostnqn.clone(),
        hostid: id.hostid_bytes(),
    };
    let att = match connect_target(rt, &target).and_then(|disk| {
        attach::attach(rt.handle(), disk, &rec.fuse_dir, rec.read_only).map_err(ProbeError::from)
    }) {
        Ok(a) => a,
        Err(e) => {
            fail(&mut rec, &e);
            return Err(e);
        }
    };
    rec.loop_dev = Some(att.loop_dev.clone());
    rec.ready = true;
    rec.save(state)?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {},
                    _ = i.recv() => {},
                }
            }
            _ => std::future::pending::<()>().await,
        }
    });
    if let Some(m) = Record::load(&path).and_then(|r| r.mount_dir)
        && sys::is_mounted(&m)
    {
        let _ = sys::unmount(&m);
    }
    att.detach(rt.handle())?;
    Ok(())
}

/// Connects to a target; a new export takes a moment to be served, so refusals are retried
/// for a few seconds.
fn connect_target(rt: &Runtime, t: &Target) -> R<Arc<NvmeDisk>> {
    let start = Instant::now();
    loop {
        match rt.block_on(NvmeDisk::connect(t)) {
            Ok(d) => return Ok(Arc::new(d)),
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                tracing::debug!(error = %e, "connect retry");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// An exclusive `flock` on `STATE/locks/VOLUME`, held while the returned file is open.
pub(crate) fn lock_volume(state: &Path, volume: &str) -> R<std::fs::File> {
    use std::os::fd::AsRawFd;
    let dir = state.join("locks");
    std::fs::create_dir_all(&dir)?;
    let f = std::fs::File::create(dir.join(volume))?;
    // SAFETY: flock(2) on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(ProbeError::Usage(format!(
            "another backup of volume {volume} is running on this host"
        )));
    }
    Ok(f)
}

fn unsafe_kill(pid: u32) {
    // SAFETY: kill(2) with a pid we recorded and SIGTERM; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while sys::alive(pid) {
        // Reap it if it is our child (mount's serving process started by this process).
        // SAFETY: waitpid with WNOHANG on a pid; a non-child simply returns an error.
        unsafe {
            libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG);
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}
