//! The catalog's binding to its pool. The catalog records the UUID of the pool it describes
//! (the `pools` table: catalog pool id -> superblock UUID and the directory it was opened
//! from). At start-up a missing pool or another pool is an error to report, never a reason to
//! create a fresh pool and let reconciliation forget the catalog: a disk that is not mounted
//! must not erase every volume, snapshot and export (with PostgreSQL, for every node).
//!
//! | catalog records | pool directory holds | `--create-pool` | outcome |
//! |---|---|---|---|
//! | nothing, no objects | nothing | either | a new pool, recorded (fresh install) |
//! | nothing, objects | nothing | no | refused: the disk is probably not mounted |
//! | nothing | pool U | no | U opened and recorded (first start after an upgrade, re-import) |
//! | U | pool U | no | U opened |
//! | U | nothing | no | refused, naming U and the path |
//! | U | pool V | either | refused, naming U, V and the path |
//! | U, or objects | nothing | yes | a new pool, recorded in place of U (reconciliation then drops the catalog's objects) |
//! | anything | a pool | yes | refused: the flag never replaces a pool |

use std::fmt;
use std::path::{Path, PathBuf};

use diesel::prelude::*;
use maas_pool::{CreateOptions, OpenOptions, Pool, PoolError};
use uuid::Uuid;

use crate::catalog::schema::{exports, snapshots, volumes};
use crate::catalog::{CResult, Catalog, CatalogError};
use crate::state::now_ms;

pub mod schema {
    diesel::table! {
        /// One row per catalog pool id: the pool (superblock UUID) the catalog describes.
        pools (id) {
            id -> Text,
            uuid -> Text,
            path -> Text,
            bound_ms -> BigInt,
        }
    }
}

use schema::pools;

/// The pool a catalog pool id is bound to.
#[derive(Clone, Debug, Queryable, Selectable, Insertable, PartialEq, Eq)]
#[diesel(table_name = pools)]
pub struct PoolBinding {
    /// The catalog's pool id (the `pool` column of volumes and snapshots).
    pub id: String,
    /// The pool's UUID, from its superblock.
    pub uuid: String,
    /// The pool directory it was last opened from.
    pub path: String,
    pub bound_ms: i64,
}

impl PoolBinding {
    pub fn pool_uuid(&self) -> Result<Uuid, IdentityError> {
        Uuid::parse_str(&self.uuid).map_err(|_| IdentityError::BadRecord {
            id: self.id.clone(),
            value: self.uuid.clone(),
        })
    }
}

/// How many objects the catalog describes (what a fresh pool would make it forget).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectCounts {
    pub volumes: i64,
    pub snapshots: i64,
    pub exports: i64,
}

impl ObjectCounts {
    pub fn is_empty(&self) -> bool {
        self.volumes == 0 && self.snapshots == 0 && self.exports == 0
    }
}

impl fmt::Display for ObjectCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |k: i64, what: &str| format!("{k} {what}{}", if k == 1 { "" } else { "s" });
        write!(
            f,
            "{}, {} and {}",
            n(self.volumes, "volume"),
            n(self.snapshots, "snapshot"),
            n(self.exports, "export")
        )
    }
}

impl Catalog {
    /// The pool `id` is bound to, if any.
    pub fn pool_binding(&self, id: &str) -> CResult<Option<PoolBinding>> {
        self.with(|c| {
            Ok(pools::table
                .find(id)
                .select(PoolBinding::as_select())
                .first(c)
                .optional()?)
        })
    }

    /// Records `new` if the binding of `new.id` is still `current` (None: no binding),
    /// atomically: false when another process changed it first.
    pub fn swap_pool_binding(&self, current: Option<&str>, new: &PoolBinding) -> CResult<bool> {
        use diesel::result::{DatabaseErrorKind, Error};
        self.with(|c| match current {
            None => match diesel::insert_into(pools::table).values(new).execute(c) {
                Ok(n) => Ok(n == 1),
                Err(Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => Ok(false),
                Err(e) => Err(e.into()),
            },
            Some(old) => Ok(diesel::update(
                pools::table
                    .filter(pools::id.eq(&new.id))
                    .filter(pools::uuid.eq(old)),
            )
            .set((
                pools::uuid.eq(&new.uuid),
                pools::path.eq(&new.path),
                pools::bound_ms.eq(new.bound_ms),
            ))
            .execute(c)?
                == 1),
        })
    }

    pub fn object_counts(&self) -> CResult<ObjectCounts> {
        self.with(|c| {
            Ok(ObjectCounts {
                volumes: volumes::table.count().get_result(c)?,
                snapshots: snapshots::table.count().get_result(c)?,
                exports: exports::table.count().get_result(c)?,
            })
        })
    }
}

/// What the pool directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// No superblock: no pool (or a disk that is not mounted).
    Nothing,
    Pool(Uuid),
}

/// What start-up does with the pool directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open the pool that is there (recording its UUID if the catalog has none).
    Open,
    /// Create a new pool and bind the catalog to it, in place of `replaces` if any.
    Create { replaces: Option<Uuid> },
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "the catalog expects pool {expected} at {path}{}, but there is no pool there (no {}): \
         is its disk mounted? maasd does not create a new pool in place of the one the catalog \
         names{}. Mount the pool's disk, or start once with --create-pool to start over with a \
         new, empty pool",
        recorded_at(.recorded, .path),
        .path.join(maas_pool::config::SUPERBLOCK_FILE).display(),
        forgetting(.objects),
        path = .path.display()
    )]
    Missing {
        expected: Uuid,
        path: PathBuf,
        recorded: String,
        objects: ObjectCounts,
    },
    #[error(
        "the catalog expects pool {expected} at {path}{}, but {path} holds another pool, \
         {found}: maasd does not serve a catalog over another pool's data. Mount the disk of \
         pool {expected} there (or point data.dir at it)",
        recorded_at(.recorded, .path),
        path = .path.display()
    )]
    Different {
        expected: Uuid,
        found: Uuid,
        path: PathBuf,
        recorded: String,
    },
    #[error(
        "the catalog holds {objects} but no pool is at {path} (no {}): is its disk mounted? \
         maasd does not create a new pool that would make the catalog forget them. Mount the \
         pool's disk, or start once with --create-pool to start over with a new, empty pool",
        .path.join(maas_pool::config::SUPERBLOCK_FILE).display(),
        path = .path.display()
    )]
    MissingUnbound {
        path: PathBuf,
        objects: ObjectCounts,
    },
    #[error(
        "--create-pool was given, but {path} already holds pool {found}: the flag never \
         replaces a pool; start without it",
        path = .path.display()
    )]
    CreateOverExisting { path: PathBuf, found: Uuid },
    #[error("the catalog records pool {id:?} with an invalid UUID {value:?}")]
    BadRecord { id: String, value: String },
    #[error(
        "the pool's binding in the catalog changed while maasd started (another maasd on this catalog?); nothing was changed, start again"
    )]
    Raced,
    #[error("the pool at {} changed while maasd opened it (pool {probed}, then {opened}); start again", .path.display())]
    Replaced {
        path: PathBuf,
        probed: Uuid,
        opened: Uuid,
    },
    #[error("pool {}: {source}", .path.display())]
    Pool { path: PathBuf, source: PoolError },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

fn forgetting(objects: &ObjectCounts) -> String {
    if objects.is_empty() {
        String::new()
    } else {
        format!(", which would forget its {objects}")
    }
}

fn recorded_at(recorded: &str, path: &Path) -> String {
    if recorded.is_empty() || Path::new(recorded) == path {
        String::new()
    } else {
        format!(" (last opened at {recorded})")
    }
}

/// The start-up rule (see the module's table). `bound`: the catalog's binding; `objects`:
/// what the catalog describes; `found`: what `path` holds.
pub fn decide(
    bound: Option<&PoolBinding>,
    objects: ObjectCounts,
    found: Found,
    create_pool: bool,
    path: &Path,
) -> Result<Action, IdentityError> {
    let expected = bound.map(PoolBinding::pool_uuid).transpose()?;
    match (expected, found) {
        (Some(e), Found::Pool(u)) if e != u => Err(IdentityError::Different {
            expected: e,
            found: u,
            path: path.to_path_buf(),
            recorded: bound.map(|b| b.path.clone()).unwrap_or_default(),
        }),
        (_, Found::Pool(u)) if create_pool => Err(IdentityError::CreateOverExisting {
            path: path.to_path_buf(),
            found: u,
        }),
        (_, Found::Pool(_)) => Ok(Action::Open),
        (replaces, Found::Nothing) if create_pool => Ok(Action::Create { replaces }),
        (Some(e), Found::Nothing) => Err(IdentityError::Missing {
            expected: e,
            path: path.to_path_buf(),
            recorded: bound.map(|b| b.path.clone()).unwrap_or_default(),
            objects,
        }),
        (None, Found::Nothing) if !objects.is_empty() => Err(IdentityError::MissingUnbound {
            path: path.to_path_buf(),
            objects,
        }),
        (None, Found::Nothing) => Ok(Action::Create { replaces: None }),
    }
}

/// What `dir` holds, from its superblock alone (the pool is not opened).
pub fn probe(dir: &Path) -> Result<Found, IdentityError> {
    match maas_pool::config::Superblock::load(dir) {
        Ok(sb) => Ok(Found::Pool(sb.pool_id)),
        Err(PoolError::PoolNotFound { .. }) => Ok(Found::Nothing),
        Err(e) => Err(IdentityError::Pool {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// Opens (or, per [`decide`], creates) the pool in `dir` that the catalog's pool `id` is bound
/// to, and records the binding. Returns the pool and its binding.
pub fn open_bound_pool(
    cat: &Catalog,
    id: &str,
    dir: &Path,
    create: CreateOptions,
    opts: OpenOptions,
    create_pool: bool,
) -> Result<(Pool, PoolBinding), IdentityError> {
    let bound = cat.pool_binding(id)?;
    let objects = cat.object_counts()?;
    let found = probe(dir)?;
    let action = decide(bound.as_ref(), objects, found, create_pool, dir)?;
    let pool_err = |e| IdentityError::Pool {
        path: dir.to_path_buf(),
        source: e,
    };
    let pool = match action {
        Action::Open => Pool::open(dir, opts).map_err(pool_err)?,
        Action::Create { replaces } => {
            if let Some(old) = replaces {
                tracing::warn!(old_pool = %old, path = %dir.display(), %objects,
                    "--create-pool: creating a new pool in place of the one the catalog names; reconciliation drops the catalog's objects");
            } else if !objects.is_empty() {
                tracing::warn!(path = %dir.display(), %objects,
                    "--create-pool: creating a new pool; reconciliation drops the catalog's objects");
            }
            Pool::create(dir, create, opts).map_err(pool_err)?
        }
    };
    let uuid = pool.pool_id();
    let give_up = |pool: Pool, e: IdentityError| {
        if let Err(c) = pool.close() {
            tracing::warn!(path = %dir.display(), "closing the pool: {c}");
        }
        Err(e)
    };
    // The superblock read above and the pool opened must be the same one.
    if let Found::Pool(f) = found
        && f != uuid
    {
        let e = IdentityError::Replaced {
            path: dir.to_path_buf(),
            probed: f,
            opened: uuid,
        };
        return give_up(pool, e);
    }
    if let Some(b) = &bound
        && b.uuid == uuid.to_string()
        && b.path == dir.display().to_string()
    {
        return Ok((pool, b.clone()));
    }
    let binding = PoolBinding {
        id: id.to_string(),
        uuid: uuid.to_string(),
        path: dir.display().to_string(),
        bound_ms: now_ms(),
    };
    let swapped = match cat.swap_pool_binding(bound.as_ref().map(|b| b.uuid.as_str()), &binding) {
        Ok(s) => s,
        Err(e) => return give_up(pool, e.into()),
    };
    if !swapped {
        return give_up(pool, IdentityError::Raced);
    }
    match &bound {
        None => tracing::info!(pool = %uuid, path = %dir.display(), "catalog bound to pool"),
        Some(b) if b.uuid != binding.uuid => {
            tracing::warn!(pool = %uuid, old_pool = %b.uuid, path = %dir.display(), "catalog bound to a new pool")
        }
        Some(b) => {
            tracing::info!(pool = %uuid, from = %b.path, to = %dir.display(), "pool opened from a new path")
        }
    }
    Ok((pool, binding))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(u: Uuid) -> PoolBinding {
        PoolBinding {
            id: "default".into(),
            uuid: u.to_string(),
            path: "/data/pool".into(),
            bound_ms: 0,
        }
    }

    #[test]
    fn start_up_rule() {
        let (u, v) = (Uuid::new_v4(), Uuid::new_v4());
        let p = Path::new("/data/pool");
        let none = ObjectCounts::default();
        let some = ObjectCounts {
            volumes: 2,
            snapshots: 1,
            exports: 1,
        };
        let d = |b: Option<&PoolBinding>, o, f, c| decide(b, o, f, c, p);
        // Fresh install, with or without the flag.
        assert_eq!(
            d(None, none, Found::Nothing, false).unwrap(),
            Action::Create { replaces: None }
        );
        assert_eq!(
            d(None, none, Found::Nothing, true).unwrap(),
            Action::Create { replaces: None }
        );
        // Upgrade / re-import: the pool found is adopted.
        assert_eq!(d(None, some, Found::Pool(u), false).unwrap(), Action::Open);
        assert_eq!(
            d(Some(&bound(u)), some, Found::Pool(u), false).unwrap(),
            Action::Open
        );
        // Missing pool: refused, unless deliberately started over.
        let e = d(Some(&bound(u)), some, Found::Nothing, false).unwrap_err();
        assert!(matches!(e, IdentityError::Missing { expected, .. } if expected == u));
        let msg = e.to_string();
        assert!(
            msg.contains(&u.to_string())
                && msg.contains("/data/pool")
                && msg.contains("2 volumes, 1 snapshot and 1 export"),
            "{msg}"
        );
        assert_eq!(
            d(Some(&bound(u)), some, Found::Nothing, true).unwrap(),
            Action::Create { replaces: Some(u) }
        );
        assert!(matches!(
            d(None, some, Found::Nothing, false),
            Err(IdentityError::MissingUnbound { .. })
        ));
        assert_eq!(
            d(None, some, Found::Nothing, true).unwrap(),
            Action::Create { replaces: None }
        );
        // Another pool: refused, flag or not.
        for flag in [false, true] {
            let e = d(Some(&bound(u)), some, Found::Pool(v), flag).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&u.to_string()) && msg.contains(&v.to_string()),
                "{msg}"
            );
        }
        // The flag never replaces a pool, even the expected one.
        assert!(matches!(
            d(Some(&bound(u)), some, Found::Pool(u), true),
            Err(IdentityError::CreateOverExisting { .. })
        ));
        let mut bad = bound(u);
        bad.uuid = "nope".into();
        assert!(matches!(
            d(Some(&bad), some, Found::Pool(u), false),
            Err(IdentityError::BadRecord { .. })
        ));
    }
}
