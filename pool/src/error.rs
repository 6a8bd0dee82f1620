//! Typed errors of the pool. Every fallible pool call returns [`PoolError`]; callers above
//! (engine, manager) map the variant to protocol sense codes or REST error codes.

use std::io;

use crate::types::{SnapshotId, VolumeId};

/// Result alias used throughout the pool.
pub type Result<T, E = PoolError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("volume {0} not found")]
    VolumeNotFound(VolumeId),
    #[error("volume named {0:?} not found")]
    VolumeNameNotFound(String),
    #[error("snapshot {0} not found")]
    SnapshotNotFound(SnapshotId),
    #[error("a volume named {0:?} already exists")]
    VolumeExists(String),
    #[error("volume {0} was deleted")]
    VolumeDeleted(VolumeId),
    #[error("snapshot {id} is locked until {until_unix} (unix seconds)")]
    SnapshotLocked { id: SnapshotId, until_unix: i64 },
    #[error(
        "lock of snapshot {id} can only be extended: current {current_unix}, asked {asked_unix}"
    )]
    LockShortened {
        id: SnapshotId,
        current_unix: i64,
        asked_unix: i64,
    },
    #[error("I/O out of range: offset {offset} + length {len} exceeds volume size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("I/O misaligned: offset {offset} and length {len} must be multiples of {block_size}")]
    Misaligned {
        offset: u64,
        len: u64,
        block_size: u32,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An atomic write larger than the pool can apply all-or-nothing (see
    /// [`crate::BlockDevice::atomic_write_max`]).
    #[error("atomic write of {len} bytes exceeds the atomic write limit of {max} bytes")]
    AtomicWriteTooLarge { len: u64, max: u64 },
    /// The block device does not implement the operation (e.g. atomic writes).
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("volume cannot shrink from {current} to {asked} bytes")]
    ShrinkRefused { current: u64, asked: u64 },
    #[error("pool is out of space: {0}")]
    NoSpace(String),
    #[error("checksum mismatch in {what}: stored data is damaged")]
    Checksum { what: String },
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("unsupported format of {what}: {detail}")]
    UnsupportedFormat { what: String, detail: String },
    #[error("pool at {path} already exists")]
    PoolExists { path: String },
    #[error("no pool at {path}")]
    PoolNotFound { path: String },
    #[error("pool is closed")]
    Closed,
    #[error("I/O error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("metadata store error: {0}")]
    Meta(String),
    /// Data that lives only in an archive target could not be fetched (unreachable, not
    /// connected): nothing is known to be damaged; the read may succeed later.
    #[error("{what} cannot be read now: {detail}")]
    Remote { what: String, detail: String },
}

impl PoolError {
    /// Wraps an I/O error with what was being accessed; ENOSPC becomes [`PoolError::NoSpace`]
    /// so that a full host filesystem under a sparse device file is reported like a full pool.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        let what = what.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return PoolError::NoSpace(format!("{what}: {source}"));
        }
        PoolError::Io { what, source }
    }

    pub fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        PoolError::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// True for errors that mean stored data failed an integrity check.
    pub fn is_integrity(&self) -> bool {
        matches!(self, PoolError::Checksum { .. } | PoolError::Corrupt { .. })
    }
}

macro_rules! meta_from {
    ($($t:ty),*) => {$(
        impl From<$t> for PoolError {
            fn from(e: $t) -> Self { PoolError::Meta(e.to_string()) }
        }
    )*};
}
meta_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
