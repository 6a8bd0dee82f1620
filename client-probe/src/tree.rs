//! The file-tree source: the volume holds an ext4 filesystem (made on first use), and each
//! backup brings it up to date with the source tree the way rsync does — files whose size or
//! modification time changed are compared and copied, owners, modes, times, extended
//! attributes, ACLs, hard links, symbolic links and holes are kept, and what was deleted from
//! the source is deleted from the volume. The copy itself is rsync's (`-aHAXS --delete
//! --numeric-ids`), the tool every Linux host has and whose semantics users know.

use std::path::Path;

use serde::Serialize;

use crate::sys::{self, SysError};

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("the source {0} does not exist or is not a directory")]
    NoSource(String),
    #[error(
        "the volume is too small for the source (no space left on it): grow it with --size \
         (the backup was not sealed; the previous snapshot is intact)"
    )]
    NoSpace,
    #[error("the volume's filesystem is damaged and e2fsck could not repair it: {0}")]
    Fsck(String),
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// What a backup changed on the volume.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Changes {
    pub files: u64,
    pub files_transferred: u64,
    pub files_created: u64,
    pub files_deleted: u64,
    /// Bytes of the source's regular files.
    pub total_file_bytes: u64,
    /// Bytes of the files rsync copied (whole size of each changed file).
    pub transferred_file_bytes: u64,
    /// Files that vanished from the source while it was read (a live source).
    pub vanished: u64,
}

/// True if the block device holds an ext2/3/4 superblock (magic 0xEF53 at byte 1080).
pub fn has_ext4(dev: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(dev) else {
        return false;
    };
    let mut b = [0u8; 2];
    f.seek(SeekFrom::Start(1080)).is_ok() && f.read_exact(&mut b).is_ok() && b == [0x53, 0xEF]
}

/// Makes the filesystem on a new volume.
pub fn make_filesystem(dev: &Path, label: &str) -> Result<(), TreeError> {
    let d = dev.to_string_lossy();
    // No reserved blocks (nothing of root's runs on it); no discard (a new volume is all zero);
    // inode tables zeroed now rather than by a kernel thread while backups run.
    sys::run(
        "mkfs.ext4",
        &[
            "-F",
            "-q",
            "-m",
            "0",
            "-L",
            label,
            "-E",
            "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            &d,
        ],
    )?;
    Ok(())
}

/// Repairs what an interrupted backup may have left (journal replay, preen). Exit codes 0-2
/// mean clean or repaired; 4 and above mean damage e2fsck would not fix on its own.
pub fn check_filesystem(dev: &Path) -> Result<(), TreeError> {
    let d = dev.to_string_lossy();
    let out = sys::output("e2fsck", &["-p", &d])?;
    match out.status.code() {
        Some(0..=2) => Ok(()),
        _ => Err(TreeError::Fsck(
            String::from_utf8_lossy(&out.stdout).trim().to_string()
                + " "
                + String::from_utf8_lossy(&out.stderr).trim(),
        )),
    }
}

/// The filesystem's size in bytes (block count times block size, from its superblock).
pub fn filesystem_size(dev: &Path) -> Result<u64, TreeError> {
    let out = sys::run("dumpe2fs", &["-h", &dev.to_string_lossy()])?;
    let field = |k: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(field("Block count:") * field("Block size:"))
}

/// Grows the (unmounted) filesystem to fill a device that was grown; nothing if it fills it.
pub fn grow_filesystem(dev: &Path, device_size: u64) -> Result<(), TreeError> {
    let fs = filesystem_size(dev)?;
    if fs == 0 || fs + (4 << 20) >= device_size {
        return Ok(());
    }
    let d = dev.to_string_lossy();
    let out = sys::output("e2fsck", &["-f", "-p", &d])?;
    if !matches!(out.status.code(), Some(0..=2)) {
        return Err(TreeError::Fsck(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ));
    }
    sys::run("resize2fs", &[&d])?;
    Ok(())
}

/// Brings `dst` (the mounted volume) up to date with `src`. Exclusions are rsync patterns
/// (globs; a leading `/` anchors at the source's root).
pub fn sync_tree(src: &Path, dst: &Path, excludes: &[String]) -> Result<Changes, TreeError> {
    if !src.is_dir() {
        return Err(TreeError::NoSource(src.display().to_string()));
    }
    let s = format!("{}/", src.display());
    let d = format!("{}/", dst.display());
    let mut args: Vec<String> = [
        "-aHAXS",
        "--delete",
        // What an exclusion added later leaves out is removed from the volume too: the volume
        // mirrors the source as the backup selects it.
        "--delete-excluded",
        "--numeric-ids",
        "--stats",
        // Changed files are rewritten where they are: unchanged parts land on the same blocks,
        // so the seal stores only the chunks that really changed.
        "--inplace",
        // Never copy the volume's own lost+found away or into the tree.
        "--filter=P /lost+found",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    for e in excludes {
        args.push(format!("--exclude={e}"));
    }
    args.push(s);
    args.push(d);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = sys::output("rsync", &argv)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    if stderr.contains("No space left on device") {
        return Err(TreeError::NoSpace);
    }
    // 24: some source files vanished while they were read — the tree was live; the rest is
    // complete and consistent file by file.
    if !(code == Some(0) || code == Some(24)) {
        return Err(sys::failed("rsync", &argv, &out).into());
    }
    restore_times(src, dst, true).map_err(|e| {
        TreeError::Sys(SysError::Failed {
            cmd: "setting directory times".into(),
            status: String::new(),
            code: None,
            stderr: e.to_string(),
        })
    })?;
    let mut c = parse_stats(&stdout);
    c.vanished = stderr
        .lines()
        .filter(|l| l.starts_with("file has vanished"))
        .count() as u64;
    Ok(c)
}

/// Sets every directory, symbolic link and special file of `dst` that the source has to the
/// source's times.
/// rsync sets a directory's itself, but on a slow target its receiver can still be creating
/// entries (hard links, FIFOs) in it after its generator set the time, leaving the copy's mtime
/// newer than the source's; and it leaves the times of links and special files alone. This pass, after rsync
/// exited, makes both exact.
pub fn restore_times(
    src: &Path,
    dst: &Path,
    excludes_root_lost_found: bool,
) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut stack = vec![std::path::PathBuf::new()];
    let mut dirs = Vec::new();
    let mut links = Vec::new();
    while let Some(rel) = stack.pop() {
        let s = src.join(&rel);
        let Ok(rd) = std::fs::read_dir(&s) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(t) = e.file_type() else { continue };
            let child = rel.join(e.file_name());
            if t.is_dir() {
                if excludes_root_lost_found && child.as_os_str() == "lost+found" {
                    continue;
                }
                stack.push(child);
            } else if !t.is_file() {
                // Symbolic links, FIFOs, sockets, devices.
                links.push(child);
            }
        }
        dirs.push(rel);
    }
    dirs.splice(0..0, links);
    // Deepest first, so setting a child never disturbs a parent already set (it does not
    // anyway: setting times changes no entry).
    for rel in dirs.iter().rev() {
        let Ok(m) = std::fs::symlink_metadata(src.join(rel)) else {
            continue;
        };
        let target = dst.join(rel);
        let same_kind = std::fs::symlink_metadata(&target)
            .is_ok_and(|t| (t.mode() & libc::S_IFMT) == (m.mode() & libc::S_IFMT));
        if !same_kind {
            continue;
        }
        let c = std::ffi::CString::new(target.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("path with a NUL byte"))?;
        let times = [
            libc::timespec {
                tv_sec: m.atime(),
                tv_nsec: m.atime_nsec(),
            },
            libc::timespec {
                tv_sec: m.mtime(),
                tv_nsec: m.mtime_nsec(),
            },
        ];
        // SAFETY: a valid NUL-terminated path and two timespecs, as utimensat(2) takes them.
        let r = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn stat_number(stats: &str, key: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(|rest| {
            rest.trim_start_matches(':')
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == ',')
                .filter(|c| c.is_ascii_digit())
                .collect::<String>()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn parse_stats(s: &str) -> Changes {
    Changes {
        files: stat_number(s, "Number of files"),
        files_transferred: stat_number(s, "Number of regular files transferred"),
        files_created: stat_number(s, "Number of created files"),
        files_deleted: stat_number(s, "Number of deleted files"),
        total_file_bytes: stat_number(s, "Total file size"),
        transferred_file_bytes: stat_number(s, "Total transferred file size"),
        vanished: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsync_stats_are_read() {
        let s = "\nNumber of files: 1,234 (reg: 1,000, dir: 234)\nNumber of created files: 12 (reg: 10, dir: 2)\nNumber of deleted files: 3\nNumber of regular files transferred: 15\nTotal file size: 2,097,152 bytes\nTotal transferred file size: 65,536 bytes\n";
        let c = parse_stats(s);
        assert_eq!(c.files, 1234);
        assert_eq!(c.files_created, 12);
        assert_eq!(c.files_deleted, 3);
        assert_eq!(c.files_transferred, 15);
        assert_eq!(c.total_file_bytes, 2_097_152);
        assert_eq!(c.transferred_file_bytes, 65_536);
    }
}
