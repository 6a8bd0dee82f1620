//! SANITIZE (SBC-4 5.30): OVERWRITE, BLOCK ERASE and EXIT FAILURE MODE; CRYPTOGRAPHIC ERASE
//! is not supported (the pool has no per-volume key whose destruction would erase a volume).
//!
//! A sanitize operation runs on its own thread, so that it carries on whatever happens to the
//! command or the session that started it (abort, reset, logout) as SBC-4 requires: with IMMED
//! the command completes once its fields are checked, without it the command waits for the
//! operation's end. While it runs, every command other than INQUIRY, REPORT LUNS and REQUEST
//! SENSE ends in NOT READY, SANITIZE IN PROGRESS (with progress indication); after a failure the
//! medium stays inaccessible (MEDIUM ERROR, SANITIZE COMMAND FAILED) until a sanitize operation
//! succeeds or, when the failed one allowed it (AUSE), EXIT FAILURE MODE.
//!
//! The state lives in memory: a sanitize interrupted by a restart of the engine is not resumed
//! (its effects so far stay, the rest of the medium is untouched).
//!
//! What is sanitized is the logical unit: afterwards no command can read the old data. The
//! pool is copy-on-write, so the old bytes stay on its devices until the normal fold and
//! reclaim free their space (freed space is not scrubbed), and sealed snapshots of the volume,
//! which are backups in their own right, keep theirs.

use std::sync::Arc;
use std::sync::mpsc;

use maas_pool::{BlockDevice, PoolError};
use parking_lot::Mutex;

use super::cdb::{be16, bit, sa, u8_at};
use super::limits::OPTIMAL_TRANSFER_BYTES;
use super::lu::LogicalUnit;
use super::opcodes::CommandInfo;
use super::sense::{Asc, Sense, SenseKey};
use super::{Command, Response};

/// IMMED and AUSE bits of CDB byte 1.
const IMMED: u8 = 7;
const AUSE: u8 = 5;

/// Where the logical unit stands with respect to sanitize operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SanitizeStatus {
    Idle,
    /// An operation runs; `progress` of 65536 is done.
    Running {
        progress: u16,
        ause: bool,
    },
    /// The last operation failed; `ause` says whether EXIT FAILURE MODE may end this state.
    Failed {
        ause: bool,
    },
}

/// The sanitize state of one logical unit, shared with the thread running an operation.
#[derive(Debug)]
pub(super) struct SanitizeTracker {
    status: Mutex<SanitizeStatus>,
}

impl Default for SanitizeTracker {
    fn default() -> Self {
        SanitizeTracker {
            status: Mutex::new(SanitizeStatus::Idle),
        }
    }
}

/// Sense data for commands refused while an operation runs.
pub(super) fn in_progress(progress: u16) -> Sense {
    Sense::new(SenseKey::NotReady, Asc::SANITIZE_IN_PROGRESS).with_progress(progress)
}

/// Sense data for medium access after a failed operation (and for the failed command itself).
pub(super) fn failed() -> Sense {
    Sense::new(SenseKey::MediumError, Asc::SANITIZE_COMMAND_FAILED)
}

impl SanitizeTracker {
    pub fn status(&self) -> SanitizeStatus {
        *self.status.lock()
    }

    /// Err unless the medium may be written now: no operation running or failed.
    pub fn check_medium_access(&self) -> Result<(), Sense> {
        match self.status() {
            SanitizeStatus::Idle => Ok(()),
            SanitizeStatus::Running { progress, .. } => Err(in_progress(progress)),
            SanitizeStatus::Failed { .. } => Err(failed()),
        }
    }

    /// Marks an operation as started; returns the status it replaces.
    fn begin(&self, ause: bool) -> Result<SanitizeStatus, Sense> {
        let mut st = self.status.lock();
        let previous = *st;
        match previous {
            SanitizeStatus::Running { progress, .. } => return Err(in_progress(progress)),
            // Restricted completion mode: after a failure with AUSE = 0, only an operation
            // that also has AUSE = 0 may try again (SBC-4 4.11.3).
            SanitizeStatus::Failed { ause: false } if ause => {
                return Err(Sense::invalid_cdb_field(1, Some(AUSE)));
            }
            _ => {}
        }
        *st = SanitizeStatus::Running { progress: 0, ause };
        Ok(previous)
    }

    fn set_progress(&self, done: u16) {
        if let SanitizeStatus::Running { progress, .. } = &mut *self.status.lock() {
            *progress = done;
        }
    }

    fn finish(&self, ok: bool) {
        let mut st = self.status.lock();
        let ause = matches!(*st, SanitizeStatus::Running { ause: true, .. });
        *st = if ok {
            SanitizeStatus::Idle
        } else {
            SanitizeStatus::Failed { ause }
        };
    }

    /// EXIT FAILURE MODE: leaves the failed state if the failed operation allowed it (AUSE).
    /// Outside a failure there is nothing to exit, which is not an error.
    fn exit_failure_mode(&self) -> Result<(), Sense> {
        let mut st = self.status.lock();
        match *st {
            SanitizeStatus::Failed { ause: true } => {
                *st = SanitizeStatus::Idle;
                Ok(())
            }
            SanitizeStatus::Failed { ause: false } => Err(Sense::invalid_cdb_field(1, Some(4))),
            SanitizeStatus::Running { progress, .. } => Err(in_progress(progress)),
            SanitizeStatus::Idle => Ok(()),
        }
    }
}

/// What an operation does to the medium.
enum Method {
    /// Deallocate every block (they read back as zeroes).
    BlockErase,
    /// Write this logical block to every block (an all-zero one deallocates instead).
    Overwrite(Vec<u8>),
}

impl Method {
    /// For the log: the pattern itself is of no interest there.
    fn describe(&self) -> &'static str {
        match self {
            Method::BlockErase => "block erase",
            Method::Overwrite(b) if b.iter().all(|&x| x == 0) => "overwrite with zeroes",
            Method::Overwrite(_) => "overwrite",
        }
    }
}

/// Marks the operation failed if its thread ends without saying how it went.
struct FinishGuard(Option<Arc<SanitizeTracker>>);

impl Drop for FinishGuard {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.finish(false);
        }
    }
}

impl LogicalUnit {
    /// SANITIZE (SBC-4 5.30).
    pub(super) fn sanitize(
        &self,
        info: &CommandInfo,
        cmd: &Command<'_>,
    ) -> Result<Response, Sense> {
        let cdb = cmd.cdb;
        let param_len = usize::from(be16(cdb, 7));
        let method = match info.sa {
            Some(sa::SANITIZE_EXIT_FAILURE_MODE) => {
                if param_len != 0 {
                    return Err(Sense::invalid_cdb_field(7, None));
                }
                return self.sanitize.exit_failure_mode().map(|()| Response::good());
            }
            Some(sa::SANITIZE_BLOCK_ERASE) => {
                if param_len != 0 {
                    return Err(Sense::invalid_cdb_field(7, None));
                }
                Method::BlockErase
            }
            Some(sa::SANITIZE_OVERWRITE) => {
                let block_size = self.limits.block_size as usize;
                if param_len < 5 || param_len > block_size + 4 {
                    return Err(Sense::invalid_cdb_field(7, None));
                }
                Method::Overwrite(overwrite_block(cmd.data_out, param_len, block_size)?)
            }
            _ => return Err(Sense::invalid_cdb_field(1, Some(4))),
        };
        self.check_writable()?;
        let ause = bit(cdb, 1, AUSE);
        let previous = self.sanitize.begin(ause)?;
        // Writes that were admitted before the operation began finish now, before it touches
        // the medium; any later one sees the operation running and is refused (see
        // LogicalUnit::write_shared), so none lands behind the sanitize.
        drop(self.write_order.write());
        let (tx, rx) = mpsc::channel();
        let dev = self.dev.clone();
        let tracker = self.sanitize.clone();
        let block_size = u64::from(self.limits.block_size);
        let serial = self.ident.serial.clone();
        let spawned = std::thread::Builder::new()
            .name("scsi-sanitize".into())
            .spawn(move || {
                let mut guard = FinishGuard(Some(tracker.clone()));
                tracing::info!(serial = %serial, method = method.describe(), "sanitize started");
                let outcome = run(&*dev, &method, block_size, |p| tracker.set_progress(p));
                match &outcome {
                    Ok(()) => tracing::info!(serial = %serial, "sanitize completed"),
                    Err(e) => tracing::warn!(serial = %serial, error = %e, "sanitize failed"),
                }
                guard.0 = None;
                tracker.finish(outcome.is_ok());
                // Nobody listens with IMMED: the send then fails, which is fine.
                let _ = tx.send(outcome.is_ok());
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a sanitize thread");
            *self.sanitize.status.lock() = previous;
            return Err(Sense::new(
                SenseKey::HardwareError,
                Asc::INTERNAL_TARGET_FAILURE,
            ));
        }
        if bit(cdb, 1, IMMED) {
            return Ok(Response::good());
        }
        match rx.recv() {
            Ok(true) => Ok(Response::good()),
            // The thread ended without reporting (it cannot panic, but if it did it failed).
            Ok(false) | Err(_) => Err(failed()),
        }
    }
}

/// Checks the OVERWRITE parameter list and returns the logical block every block is to hold.
///
/// Only the last overwrite pass is carried out. SBC-4 makes the last pass write the
/// initialization pattern itself whatever OVERWRITE COUNT and INVERT say (with INVERT an odd
/// count starts with the pattern, an even one with its inversion, and passes alternate). On
/// this log-structured pool a pass never lands on the space an earlier pass (or the old data)
/// occupies, it is appended to new log space; so extra passes would destroy nothing the last
/// one does not, they would only multiply the I/O. COUNT is checked (0 is reserved), INVERT
/// accepted, and the medium ends as every pass sequence leaves it.
fn overwrite_block(data: &[u8], param_len: usize, block_size: usize) -> Result<Vec<u8>, Sense> {
    let Some(list) = data.get(..param_len) else {
        return Err(Sense::param_list_length_error());
    };
    let flags = u8_at(list, 0);
    if (flags >> 5) & 0x03 != 0 {
        // TEST modes are vendor specific; none is implemented.
        return Err(Sense::invalid_param_field(0, Some(6)));
    }
    if flags & 0x1F == 0 {
        // OVERWRITE COUNT 0 is reserved.
        return Err(Sense::invalid_param_field(0, Some(4)));
    }
    if u8_at(list, 1) != 0 {
        return Err(Sense::invalid_param_field(1, None));
    }
    let pattern_len = usize::from(be16(list, 2));
    if pattern_len == 0 || pattern_len > block_size {
        return Err(Sense::invalid_param_field(2, None));
    }
    // The pattern must be in the list the CDB announced.
    let Some(pattern) = list.get(4..4 + pattern_len) else {
        return Err(Sense::invalid_param_field(2, None));
    };
    // Each block starts with the first byte of the pattern, repeated as needed.
    Ok(pattern.iter().copied().cycle().take(block_size).collect())
}

/// Carries out an operation over the whole medium, then makes it durable.
fn run(
    dev: &dyn BlockDevice,
    method: &Method,
    block_size: u64,
    progress: impl Fn(u16),
) -> Result<(), PoolError> {
    let capacity = dev.capacity() / block_size * block_size;
    match method {
        Method::Overwrite(block) if block.iter().any(|&b| b != 0) => {
            // A thin logical unit must store every block: write it a bounded chunk at a time.
            let per_chunk = (u64::from(OPTIMAL_TRANSFER_BYTES) / block_size).max(1);
            let chunk = block.repeat(per_chunk as usize);
            let mut offset = 0u64;
            while offset < capacity {
                let n = (capacity - offset).min(chunk.len() as u64);
                dev.write(offset, &chunk[..n as usize], false)?;
                offset += n;
                let done = u128::from(offset) * 65536 / u128::from(capacity);
                progress(done.min(65535) as u16);
            }
        }
        // Block erase, or an all-zero pattern: deallocated blocks read back as zeroes (LBPRZ),
        // so deallocating the medium is both erasing and writing zeroes to it.
        _ => dev.discard(0, capacity)?,
    }
    dev.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overwrite_parameter_list() {
        let list = |flags: u8, ipl: u16, pattern: &[u8]| {
            let mut d = vec![flags, 0];
            d.extend_from_slice(&ipl.to_be_bytes());
            d.extend_from_slice(pattern);
            d
        };
        let d = list(0x01, 3, &[1, 2, 3]);
        let block = overwrite_block(&d, d.len(), 8).unwrap();
        assert_eq!(block, vec![1, 2, 3, 1, 2, 3, 1, 2]);
        // INVERT with any count leaves the pattern itself.
        let d = list(0x80 | 0x02, 1, &[0xAA]);
        assert_eq!(overwrite_block(&d, d.len(), 4).unwrap(), vec![0xAA; 4]);
        let field = |d: &[u8], len: usize| overwrite_block(d, len, 8).unwrap_err();
        let d = list(0x00, 1, &[1]);
        assert_eq!(field(&d, 5).key_specific, Some([0x80 | 0x08 | 4, 0, 0]));
        let d = list(0x21, 1, &[1]);
        assert_eq!(field(&d, 5).key_specific, Some([0x80 | 0x08 | 6, 0, 0]));
        let d = list(0x01, 0, &[1]);
        assert_eq!(field(&d, 5).asc, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
        let d = list(0x01, 9, &[1; 9]);
        assert_eq!(field(&d, 13).key_specific, Some([0x80, 0, 2]));
        // Pattern longer than the announced list; list longer than the Data-Out.
        let d = list(0x01, 4, &[1; 4]);
        assert_eq!(field(&d, 6).key_specific, Some([0x80, 0, 2]));
        assert_eq!(field(&d, 9).asc, Asc::PARAMETER_LIST_LENGTH_ERROR);
        let mut d = list(0x01, 1, &[1]);
        d[1] = 1;
        assert_eq!(field(&d, 5).key_specific, Some([0x80, 0, 1]));
    }

    #[test]
    fn tracker_states() {
        let t = SanitizeTracker::default();
        assert_eq!(t.begin(false).unwrap(), SanitizeStatus::Idle);
        assert_eq!(t.begin(false).unwrap_err().asc, Asc::SANITIZE_IN_PROGRESS);
        t.set_progress(100);
        assert_eq!(
            t.check_medium_access().unwrap_err().key_specific,
            Some([0x80, 0, 100])
        );
        t.finish(false);
        assert_eq!(t.status(), SanitizeStatus::Failed { ause: false });
        // Restricted: no AUSE retry, no exit; a retry without AUSE that succeeds clears it.
        assert!(t.begin(true).is_err());
        assert!(t.exit_failure_mode().is_err());
        t.begin(false).unwrap();
        t.finish(true);
        assert_eq!(t.status(), SanitizeStatus::Idle);
        // Unrestricted: EXIT FAILURE MODE clears it.
        t.begin(true).unwrap();
        t.finish(false);
        assert_eq!(t.status(), SanitizeStatus::Failed { ause: true });
        assert_eq!(t.check_medium_access().unwrap_err(), failed());
        t.exit_failure_mode().unwrap();
        assert_eq!(t.status(), SanitizeStatus::Idle);
        t.exit_failure_mode().unwrap();
    }
}
