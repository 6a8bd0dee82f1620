//! Typed errors of the archive tier. Each says what a user must fix, and has a stable code the
//! REST API passes on.

use maas_pool::PoolError;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("invalid archive target: {0}")]
    Invalid(String),
    #[error("cannot reach the archive endpoint {endpoint}: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error(
        "the archive endpoint refused the credentials ({detail}): check the access key id and secret"
    )]
    Credentials { detail: String },
    #[error(
        "access to bucket {bucket:?} was denied ({detail}): the key needs read, write and delete on it"
    )]
    AccessDenied { bucket: String, detail: String },
    #[error("bucket {bucket:?} does not exist at {endpoint}")]
    NoSuchBucket { bucket: String, endpoint: String },
    #[error(
        "object lock was asked for, but bucket {bucket:?} does not have it enabled (it can only be enabled when the bucket is created)"
    )]
    ObjectLockUnavailable { bucket: String },
    #[error("object {key} is missing from the bucket")]
    Missing { key: String },
    #[error("object {key} in the bucket is damaged: {detail}")]
    Damaged { key: String, detail: String },
    #[error("the bucket holds {what} of an unsupported format: {detail}")]
    Unsupported { what: String, detail: String },
    #[error(
        "the bucket no longer holds this archive ({key} is gone): it was deleted or emptied outside MaaS, so the copies recorded in it are lost; delete those snapshots' copies (or the snapshots) and the target, then create it again"
    )]
    PrefixLost { key: String },
    #[error("the archive is encrypted and needs its key: {detail}")]
    KeyRequired { detail: String },
    #[error("the recovery key is not the archive's key: {detail}")]
    KeyMismatch { detail: String },
    #[error("{detail}")]
    EncryptionMismatch { detail: String },
    #[error("the archive endpoint failed the request ({detail})")]
    Service { detail: String, transient: bool },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("archive worker failed: {0}")]
    Internal(String),
}

impl ArchiveError {
    /// Stable error code (REST).
    pub fn code(&self) -> &'static str {
        match self {
            ArchiveError::Invalid(_) => "INVALID_ARCHIVE_TARGET",
            ArchiveError::Unreachable { .. } => "ARCHIVE_UNREACHABLE",
            ArchiveError::Credentials { .. } => "ARCHIVE_CREDENTIALS_REJECTED",
            ArchiveError::AccessDenied { .. } => "ARCHIVE_ACCESS_DENIED",
            ArchiveError::NoSuchBucket { .. } => "ARCHIVE_BUCKET_NOT_FOUND",
            ArchiveError::ObjectLockUnavailable { .. } => "ARCHIVE_OBJECT_LOCK_UNAVAILABLE",
            ArchiveError::Missing { .. } => "ARCHIVE_OBJECT_MISSING",
            ArchiveError::Damaged { .. } => "ARCHIVE_OBJECT_DAMAGED",
            ArchiveError::Unsupported { .. } => "ARCHIVE_FORMAT_UNSUPPORTED",
            ArchiveError::PrefixLost { .. } => "ARCHIVE_PREFIX_LOST",
            ArchiveError::KeyRequired { .. } => "ARCHIVE_KEY_REQUIRED",
            ArchiveError::KeyMismatch { .. } => "ARCHIVE_KEY_MISMATCH",
            ArchiveError::EncryptionMismatch { .. } => "ARCHIVE_ENCRYPTION_MISMATCH",
            ArchiveError::Service { .. } => "ARCHIVE_REQUEST_FAILED",
            ArchiveError::Pool(_) => "POOL_ERROR",
            ArchiveError::Internal(_) => "INTERNAL",
        }
    }

    /// Worth retrying: the endpoint may come back.
    pub fn is_transient(&self) -> bool {
        match self {
            ArchiveError::Unreachable { .. } => true,
            ArchiveError::Service { transient, .. } => *transient,
            _ => false,
        }
    }

    /// The fault is the target's configuration or the bucket's state, not MaaS's: a request
    /// that created the target is answered 4xx.
    pub fn is_target_fault(&self) -> bool {
        !matches!(self, ArchiveError::Pool(_) | ArchiveError::Internal(_))
    }
}

pub type Result<T, E = ArchiveError> = std::result::Result<T, E>;
