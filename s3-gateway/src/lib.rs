//! maas-s3: the archive tier — sealed snapshots pushed to S3 buckets as packs of the pool's
//! objects, read back verified — and, later, an S3-compatible endpoint over the pool.
//!
//! Nothing here knows SQL or serves HTTP: the manager keeps targets and jobs in its catalog
//! and calls these functions from its job threads. What a target holds is recorded in the
//! pool's metadata store ([`maas_pool::archive`]), so no hot path lists a bucket.

pub mod bucket;
pub mod check;
pub mod crypt;
pub mod error;
pub mod gc;
pub mod import;
pub mod keys;
pub mod lazy;
pub mod manifest;
pub mod pack;
pub mod push;
pub mod restore;
pub mod target;
pub mod verify;

pub use bucket::{Bucket, TargetConfig};
pub use error::{ArchiveError, Result};

/// The archive tier's own runtime: S3 requests run here, off the manager's workers and the
/// block targets' io threads. Callers on blocking threads wait with [`Archive::block_on`].
#[derive(Debug)]
pub struct Archive {
    rt: Option<tokio::runtime::Runtime>,
}

impl Archive {
    pub fn new(threads: usize) -> Result<Archive> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("maas-s3")
            .enable_all()
            .build()
            .map_err(|e| {
                ArchiveError::Internal(format!("cannot start the archive runtime: {e}"))
            })?;
        Ok(Archive { rt: Some(rt) })
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        match &self.rt {
            Some(rt) => rt.handle(),
            None => unreachable_runtime(),
        }
    }

    /// Runs `f` to completion on the archive runtime; for blocking threads only.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.handle().block_on(f)
    }
}

#[allow(clippy::panic)]
fn unreachable_runtime() -> ! {
    // `rt` is only taken in Drop.
    panic!("archive runtime used after drop")
}

impl Drop for Archive {
    fn drop(&mut self) {
        // Dropping a runtime blocks; maasd may drop its state on an async thread.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
