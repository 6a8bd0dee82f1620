//! Running the host's tools (losetup, mount, mkfs, rsync...) with errors that say which command
//! failed and what it printed, and reading the host's mount table.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("cannot run {cmd}: {source} (is it installed?)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        code: Option<i32>,
        stderr: String,
    },
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, SysError> {
    let out = output(program, args)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(failed(program, args, &out))
    }
}

/// Runs a command and returns its output whatever its exit status.
pub fn output(program: &str, args: &[&str]) -> Result<Output, SysError> {
    Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| SysError::Spawn {
            cmd: program.to_string(),
            source,
        })
}

pub fn failed(program: &str, args: &[&str], out: &Output) -> SysError {
    SysError::Failed {
        cmd: format!("{program} {}", args.join(" ")),
        status: out.status.to_string(),
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

/// Mount points of this host (unescaped from /proc/self/mountinfo), with their source.
pub fn mounts() -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            let mp = unescape(f.get(4)?);
            let source = f.get(dash + 2).map(|s| unescape(s)).unwrap_or_default();
            Some((PathBuf::from(mp), source))
        })
        .collect()
}

pub fn is_mounted(p: &Path) -> bool {
    mounts().iter().any(|(m, _)| m == p)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts `p`; if busy or its daemon is gone, detaches it lazily (it goes once unused).
pub fn unmount(p: &Path) -> Result<(), SysError> {
    let ps = p.to_string_lossy();
    match run("umount", &[&ps]) {
        Ok(_) => Ok(()),
        Err(e) => {
            if !is_mounted(p) {
                return Ok(());
            }
            tracing::warn!(path = %ps, error = %e, "unmount failed; detaching it lazily");
            run("umount", &["-l", &ps]).map(|_| ())
        }
    }
}

/// Whether a process is alive.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// When a process started (clock ticks after boot, /proc/PID/stat field 22): with its pid,
/// what names one process across pid reuse and reboots.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process that was `pid`, started at `start` (0: unknown), still runs.
pub fn alive_as(pid: u32, start: u64) -> bool {
    if pid == 0 {
        return false;
    }
    match start {
        0 => alive(pid),
        s => start_time(pid) == Some(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_named_by_pid_and_start_time() {
        let me = std::process::id();
        let t = start_time(me).expect("own start time");
        assert!(alive_as(me, t));
        assert!(!alive_as(me, t + 1));
        assert!(!alive_as(0, 0));
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\"), "/end\\");
    }
}
