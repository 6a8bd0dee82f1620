//! REST errors: a stable code, an HTTP status, a message and (for validation) the field, sent
//! as `{"code", "message", "request_id", "field"}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use maas_api::ErrorBody;
use maas_pool::PoolError;

use crate::catalog::CatalogError;

tokio::task_local! {
    /// The id of the request being served (set by the request-id middleware).
    pub static REQUEST_ID: String;
}

pub fn current_request_id() -> String {
    REQUEST_ID
        .try_with(|id| id.clone())
        .unwrap_or_else(|_| "-".into())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "INVALID_FIELD",
            message: message.into(),
            field: Some(field.into()),
        }
    }
    pub fn not_found(code: &'static str, what: &str, id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            code,
            format!("{what} {id:?} does not exist"),
        )
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", message)
    }
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code.to_string(),
            message: self.message.clone(),
            request_id: current_request_id(),
            field: self.field.clone(),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        HttpResponse::build(self.status).json(self.body())
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        if let CatalogError::Query(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation,
            _,
        )) = &e
        {
            return ApiError::conflict(
                "ALREADY_EXISTS",
                "a resource with that name already exists",
            );
        }
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "CATALOG_UNAVAILABLE",
            e.to_string(),
        )
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        use StatusCode as S;
        let (status, code) = match &e {
            PoolError::VolumeNotFound(_)
            | PoolError::VolumeNameNotFound(_)
            | PoolError::VolumeDeleted(_) => (S::NOT_FOUND, "VOLUME_NOT_FOUND"),
            PoolError::SnapshotNotFound(_) => (S::NOT_FOUND, "SNAPSHOT_NOT_FOUND"),
            PoolError::VolumeExists(_) => (S::CONFLICT, "VOLUME_EXISTS"),
            PoolError::SnapshotLocked { .. } => (S::CONFLICT, "SNAPSHOT_LOCKED"),
            PoolError::LockShortened { .. } => (S::CONFLICT, "LOCK_SHORTENED"),
            PoolError::ShrinkRefused { .. } => (S::CONFLICT, "SHRINK_REFUSED"),
            PoolError::OutOfRange { .. }
            | PoolError::Misaligned { .. }
            | PoolError::InvalidArgument(_) => (S::BAD_REQUEST, "INVALID_ARGUMENT"),
            PoolError::NoSpace(_) => (S::INSUFFICIENT_STORAGE, "POOL_FULL"),
            PoolError::Checksum { .. } | PoolError::Corrupt { .. } => {
                (S::INTERNAL_SERVER_ERROR, "DATA_DAMAGED")
            }
            PoolError::Closed => (S::SERVICE_UNAVAILABLE, "SHUTTING_DOWN"),
            PoolError::Remote { .. } => (S::SERVICE_UNAVAILABLE, "ARCHIVE_UNREACHABLE"),
            _ => (S::INTERNAL_SERVER_ERROR, "POOL_ERROR"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<maas_s3::ArchiveError> for ApiError {
    fn from(e: maas_s3::ArchiveError) -> Self {
        use maas_s3::ArchiveError as A;
        let status = match &e {
            A::Pool(_) => {
                let A::Pool(p) = e else {
                    return ApiError::internal("unreachable");
                };
                return p.into();
            }
            A::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // What the bucket holds is not what MaaS recorded: the request cannot be served.
            A::Missing { .. } | A::Damaged { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            // The target's configuration or the bucket's state: the user can fix it.
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
