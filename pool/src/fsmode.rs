//! File modes of what MaaS keeps on disk: private to its user, whatever the umask.
//!
//! New directories get [`PRIVATE_DIR`] and new files [`PRIVATE_FILE`], set explicitly (a
//! permissive umask such as 0000 cannot widen them); existing ones that are more open than that
//! are tightened when opened, with a log line naming the path and both modes. Only permission
//! bits are ever cleared, never added. Block and character devices are left alone: their nodes
//! belong to the system (udev rules, the `disk` group).
//!
//! maasd uses the same helpers for its data directory, catalog and key files.

use std::fs::{File, Permissions};
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

/// Mode of every directory MaaS creates for its state.
pub const PRIVATE_DIR: u32 = 0o700;
/// Mode of every file MaaS creates for its state.
pub const PRIVATE_FILE: u32 = 0o600;

/// Clears the bits of `current` that `allowed` does not grant; `None` if none are set.
fn narrowed(current: u32, allowed: u32) -> Option<u32> {
    let cur = current & 0o7777;
    let new = cur & allowed;
    (new != cur).then_some(new)
}

fn log_tightened(path: &Path, from: u32, to: u32) {
    tracing::warn!(
        path = %path.display(),
        "tightened permissions of {} from {from:04o} to {to:04o} (was readable or writable by others)",
        path.display()
    );
}

/// Makes the open file `f` (named `path` in logs) no more open than `allowed`. Returns whether
/// it changed anything. Devices are left alone.
pub fn restrict_file(f: &File, path: &Path, allowed: u32) -> io::Result<bool> {
    let meta = f.metadata()?;
    let ft = meta.file_type();
    if ft.is_block_device() || ft.is_char_device() {
        return Ok(false);
    }
    match narrowed(meta.permissions().mode(), allowed) {
        Some(new) => {
            f.set_permissions(Permissions::from_mode(new))?;
            log_tightened(path, meta.permissions().mode() & 0o7777, new);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Makes `path` (a file or directory, followed if a symlink) no more open than `allowed`.
/// Returns whether it changed anything; a missing path changes nothing.
pub fn restrict_path(path: &Path, allowed: u32) -> io::Result<bool> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let ft = meta.file_type();
    if ft.is_block_device() || ft.is_char_device() {
        return Ok(false);
    }
    match narrowed(meta.permissions().mode(), allowed) {
        Some(new) => {
            std::fs::set_permissions(path, Permissions::from_mode(new))?;
            log_tightened(path, meta.permissions().mode() & 0o7777, new);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Creates `dir` (and any missing parent) and makes it [`PRIVATE_DIR`]: set explicitly when
/// this call created it, tightened (and logged) when it existed more open than that.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::set_permissions(dir, Permissions::from_mode(PRIVATE_DIR)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            restrict_path(dir, PRIVATE_DIR).map(|_| ())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Parents are ordinary directories (the umask decides); only `dir` is ours.
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent)?;
            }
            match std::fs::create_dir(dir) {
                Ok(()) => std::fs::set_permissions(dir, Permissions::from_mode(PRIVATE_DIR)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    restrict_path(dir, PRIVATE_DIR).map(|_| ())
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clears_bits() {
        assert_eq!(narrowed(0o644, 0o600), Some(0o600));
        assert_eq!(narrowed(0o600, 0o600), None);
        assert_eq!(narrowed(0o400, 0o600), None, "never widened");
        assert_eq!(narrowed(0o4755, 0o700), Some(0o700), "setuid cleared too");
        assert_eq!(
            narrowed(0o100644, 0o600),
            Some(0o600),
            "file type bits ignored"
        );
    }

    #[test]
    fn private_dir_creates_tightens_and_leaves_narrower_alone() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        private_dir(&d).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, Permissions::from_mode(0o755)).unwrap();
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, Permissions::from_mode(0o500)).unwrap();
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o500);
        std::fs::set_permissions(&d, Permissions::from_mode(0o700)).unwrap();
        let f = d.join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o666)).unwrap();
        assert!(restrict_path(&f, PRIVATE_FILE).unwrap());
        assert_eq!(mode(&f), 0o600);
        assert!(!restrict_path(&f, PRIVATE_FILE).unwrap());
        assert!(!restrict_path(&d.join("missing"), PRIVATE_FILE).unwrap());
    }
}
