//! API tokens: `Authorization: Bearer <secret>`. Secrets are stored only as BLAKE3 hashes.
//! Roles: `admin` (everything, including tokens), `operator` (everything but tokens),
//! `viewer` (read only).

use std::future::{Ready, ready};

use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, dev::Payload, web};

use crate::error::ApiError;
use crate::state::AppState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

pub fn hash_secret(secret: &str) -> String {
    blake3::derive_key("maas api token v1", secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn new_secret() -> String {
    let mut b = [0u8; 24];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b[..]);
    format!("maas_{}", hex::encode(b))
}

/// The authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub role: Role,
    /// The token is refused from this time on (ms since the epoch); None: never.
    pub expires_ms: Option<i64>,
}

/// The error of a request made with an expired token: 401, code `TOKEN_EXPIRED`.
pub fn expired(name: &str, expires_ms: i64) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "TOKEN_EXPIRED",
        format!(
            "token {name:?} expired at {}; an admin can create a new one \
             (maasctl token create NAME --expires-in 30d)",
            crate::state::rfc3339(expires_ms)
        ),
    )
}

impl Caller {
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                format!(
                    "this needs the {} role; the token has {}",
                    role.as_str(),
                    self.role.as_str()
                ),
            ))
        }
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let unauth = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", m);
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return ready(Err(ApiError::internal("no state")));
        };
        let Some(h) = req.headers().get("authorization") else {
            return ready(Err(unauth("missing Authorization: Bearer <token>")));
        };
        let Some(secret) = h.to_str().ok().and_then(|s| s.strip_prefix("Bearer ")) else {
            return ready(Err(unauth("Authorization must be: Bearer <token>")));
        };
        let hash = hash_secret(secret.trim());
        let caller = state.tokens.read().ok().and_then(|t| t.get(&hash).cloned());
        let Some(caller) = caller else {
            return ready(Err(unauth("unknown or revoked token")));
        };
        let now = crate::state::now_ms();
        if let Some(exp) = caller.expires_ms
            && now >= exp
        {
            return ready(Err(expired(&caller.name, exp)));
        }
        state.note_token_use(&caller.token_id, now);
        ready(Ok(caller))
    }
}
