//! PostgreSQL as a backup source: a consistent online backup of a running cluster, taken the
//! way PostgreSQL documents for file-system level copies: in one session, a temporary physical
//! replication slot (so the WAL the backup needs is kept, however many checkpoints pass), then
//! `pg_backup_start`, a copy of the data directory (the file-tree backup, which rewrites only
//! changed files), `pg_backup_stop`, whose `backup_label` (and `tablespace_map`) are written
//! into the copy, and last the WAL written meanwhile (`pg_wal/`). Started from the copy,
//! PostgreSQL replays that WAL and holds every transaction committed before the backup ended.
//!
//! The session is a `psql` coprocess (the probe links no database driver): its commands are
//! answered line by line, each answer closed by a marker line the probe echoes after it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use crate::ops::{ProbeError, R};

/// Paths of a data directory left out of the copy (relative, rsync syntax): the server's
/// runtime files and what PostgreSQL's documentation says a base backup may omit; `pg_wal` is
/// copied last, after `pg_backup_stop`.
pub const DATA_DIR_EXCLUDES: [&str; 13] = [
    "/postmaster.pid",
    "/postmaster.opts",
    "/backup_label",
    "/tablespace_map",
    "/pg_wal/*",
    "/pg_replslot/*",
    "/pg_dynshmem/*",
    "/pg_notify/*",
    "/pg_serial/*",
    "/pg_snapshots/*",
    "/pg_stat_tmp/*",
    "/pg_subtrans/*",
    "pgsql_tmp*",
];

const MARK: &str = "__MAAS_PROBE_DONE__";

/// One psql session held open for the length of a backup.
#[derive(Debug)]
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    err_file: PathBuf,
}

fn pg_error(what: impl std::fmt::Display) -> ProbeError {
    ProbeError::Usage(format!("PostgreSQL: {what}"))
}

impl Session {
    /// Connects with libpq's `conninfo` (e.g. `host=/run/postgresql user=postgres`).
    pub fn open(conninfo: &str, err_file: &Path) -> R<Session> {
        let err = std::fs::File::create(err_file)?;
        let mut child = Command::new("psql")
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                conninfo,
            ])
            .env("PGAPPNAME", "maas-probe")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| pg_error(format!("cannot run psql: {e}")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(pg_error("psql has no pipes"));
        };
        let mut s = Session {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            err_file: err_file.to_path_buf(),
        };
        s.query("SELECT 1")?;
        Ok(s)
    }

    /// Runs one statement; the lines it printed (one per row, `|` between columns).
    pub fn query(&mut self, sql: &str) -> R<Vec<String>> {
        let sent = writeln!(self.stdin, "{sql};\n\\echo {MARK}").and_then(|_| self.stdin.flush());
        let mut lines = Vec::new();
        if sent.is_ok() {
            loop {
                let mut l = String::new();
                match self.stdout.read_line(&mut l) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let l = l.trim_end_matches('\n').to_string();
                        if l == MARK {
                            return Ok(lines);
                        }
                        lines.push(l);
                    }
                }
            }
        }
        // psql stopped (ON_ERROR_STOP): what it said is the error.
        let _ = self.child.wait();
        let why = std::fs::read_to_string(&self.err_file).unwrap_or_default();
        Err(pg_error(format!(
            "{}: {}",
            sql.split_whitespace().take(4).collect::<Vec<_>>().join(" "),
            why.trim()
        )))
    }

    fn one(&mut self, sql: &str) -> R<String> {
        self.query(sql)?
            .into_iter()
            .next()
            .ok_or_else(|| pg_error(format!("{sql}: no answer")))
    }

    /// The cluster's data directory, as the server reports it.
    pub fn data_directory(&mut self) -> R<PathBuf> {
        Ok(PathBuf::from(self.one("SHOW data_directory")?))
    }

    /// Reserves WAL from now on for this session (a temporary slot, dropped when it ends), then
    /// starts the backup (with an immediate checkpoint); returns the start LSN.
    pub fn start_backup(&mut self) -> R<String> {
        if self.one("SELECT current_setting('server_version_num')::int >= 150000")? != "t" {
            return Err(pg_error(
                "PostgreSQL 15 or later is needed (pg_backup_start)",
            ));
        }
        self.query(
            "SELECT pg_create_physical_replication_slot('maas_probe_' || pg_backend_pid(), true, true)",
        )?;
        self.one("SELECT pg_backup_start('maas-probe', true)")
    }

    /// Ends the backup; the `backup_label` and `tablespace_map` contents to write into the
    /// copy, and the stop LSN.
    pub fn stop_backup(&mut self) -> R<(Vec<u8>, Vec<u8>, String)> {
        // Hex: the files hold newlines, which psql's unaligned output would not delimit.
        let line = self.one(
            "SELECT lsn, encode(convert_to(labelfile, 'UTF8'), 'hex'), \
             encode(convert_to(coalesce(spcmapfile, ''), 'UTF8'), 'hex') \
             FROM pg_backup_stop(false)",
        )?;
        let mut parts = line.split('|');
        let (Some(lsn), Some(label), Some(map)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(pg_error(format!(
                "unexpected pg_backup_stop answer {line:?}"
            )));
        };
        let label = hex::decode(label).map_err(|e| pg_error(format!("backup_label: {e}")))?;
        let map = hex::decode(map).map_err(|e| pg_error(format!("tablespace_map: {e}")))?;
        Ok((label, map, lsn.to_string()))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Ends the session: an unfinished backup is aborted by the server, the slot dropped.
        let _ = writeln!(self.stdin, "\\q");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// Writes what `pg_backup_stop` returned into the copy's root and brings its `pg_wal` up to
/// date with the server's (the WAL from the backup's start on, kept by the slot).
pub fn finish_copy(data_dir: &Path, copy: &Path, label: &[u8], tablespace_map: &[u8]) -> R<()> {
    std::fs::write(copy.join("backup_label"), label)?;
    if !tablespace_map.is_empty() {
        std::fs::write(copy.join("tablespace_map"), tablespace_map)?;
    }
    let from = format!("{}/pg_wal/", data_dir.display());
    let to = format!("{}/pg_wal/", copy.display());
    // Segments being made (`xlogtemp.*`) or recycled come and go while the server runs:
    // vanished files (rsync's 24) are fine, since every segment the backup needs from its
    // start on is held by the session's slot.
    let args = [
        "-aHS",
        "--delete",
        "--numeric-ids",
        "--inplace",
        "--exclude=xlogtemp.*",
        from.as_str(),
        to.as_str(),
    ];
    let out = crate::sys::output("rsync", &args)?;
    if !matches!(out.status.code(), Some(0 | 24)) {
        return Err(crate::sys::failed("rsync", &args, &out).into());
    }
    Ok(())
}

/// What a PostgreSQL backup adds to its report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PgReport {
    pub data_directory: PathBuf,
    pub start_lsn: String,
    pub stop_lsn: String,
}

impl crate::ops::Probe {
    /// `maas-probe backup --volume NAME --postgres CONNINFO`: an online, consistent backup of
    /// the cluster `conninfo` reaches (see the module's documentation).
    pub fn backup_postgres(
        &self,
        volume: &str,
        conninfo: &str,
        size: Option<u64>,
        excludes: &[String],
        progress: &dyn Fn(&str, u64),
    ) -> R<crate::ops::BackupReport> {
        std::fs::create_dir_all(&self.state)?;
        let mut session = Session::open(conninfo, &self.state.join("psql.err"))?;
        let data_dir = session.data_directory()?;
        if !data_dir.is_dir() {
            return Err(pg_error(format!(
                "the server's data directory {} is not on this host (run the probe where \
                 PostgreSQL runs)",
                data_dir.display()
            )));
        }
        progress("pg_backup_start", 0);
        let start_lsn = session.start_backup()?;
        let mut ex: Vec<String> = DATA_DIR_EXCLUDES.iter().map(|x| x.to_string()).collect();
        ex.extend(excludes.iter().cloned());
        let mut stop_lsn = None;
        let mut finish = |copy: &Path| -> R<()> {
            progress("pg_backup_stop", 0);
            let (label, map, lsn) = session.stop_backup()?;
            finish_copy(&data_dir, copy, &label, &map)?;
            stop_lsn = Some(lsn);
            Ok(())
        };
        let mut rep =
            self.backup_tree_with(volume, &data_dir, size, &ex, progress, Some(&mut finish))?;
        rep.postgres = Some(PgReport {
            data_directory: data_dir.clone(),
            start_lsn,
            stop_lsn: stop_lsn.unwrap_or_default(),
        });
        Ok(rep)
    }
}
