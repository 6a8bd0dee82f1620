//! The catalog: what users asked for (volumes, snapshots, exports, jobs, tokens), in SQL via
//! diesel. SQLite (WAL mode) by default; PostgreSQL when the URL is `postgres://...`. One
//! query layer serves both through diesel's `MultiConnection`; each backend has its own
//! embedded migrations.

use std::sync::Mutex;

use diesel::prelude::*;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
pub const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

pub mod schema {
    diesel::table! {
        volumes (id) {
            id -> Text,
            name -> Text,
            pool -> Text,
            size -> BigInt,
            block_size -> BigInt,
            labels -> Text,
            origin_snapshot -> Nullable<Text>,
            state -> Text,
            created_ms -> BigInt,
        }
    }
    diesel::table! {
        snapshots (id) {
            id -> Text,
            volume -> Text,
            volume_name -> Text,
            pool -> Text,
            pool_snapshot -> BigInt,
            size -> BigInt,
            block_size -> BigInt,
            starred -> BigInt,
            locked_until_ms -> Nullable<BigInt>,
            state -> Text,
            created_ms -> BigInt,
            location -> Text,
        }
    }
    diesel::table! {
        exports (id) {
            id -> Text,
            volume -> Text,
            protocol -> Text,
            initiators -> Text,
            chap -> Nullable<Text>,
            target -> Text,
            created_ms -> BigInt,
            read_only -> BigInt,
        }
    }
    diesel::table! {
        jobs (id) {
            id -> Text,
            kind -> Text,
            state -> Text,
            progress_milli -> BigInt,
            target -> Nullable<Text>,
            error -> Nullable<Text>,
            result -> Nullable<Text>,
            created_ms -> BigInt,
            updated_ms -> BigInt,
            progress_detail -> Nullable<Text>,
            host -> Nullable<Text>,
            params -> Nullable<Text>,
        }
    }
    diesel::table! {
        hosts (id) {
            id -> Text,
            name -> Text,
            hostnqn -> Text,
            iqn -> Text,
            version -> Text,
            created_ms -> BigInt,
            last_heartbeat_ms -> Nullable<BigInt>,
        }
    }
    diesel::table! {
        archive_targets (id) {
            id -> Text,
            name -> Text,
            endpoint -> Text,
            region -> Text,
            bucket -> Text,
            prefix -> Text,
            access_key_id -> Text,
            secret -> Text,
            path_style -> BigInt,
            storage_class -> Nullable<Text>,
            object_lock_mode -> Nullable<Text>,
            object_lock_days -> Nullable<BigInt>,
            encryption -> Text,
            created_ms -> BigInt,
            archive_key -> Nullable<Text>,
            key_id -> Nullable<Text>,
        }
    }
    diesel::table! {
        snapshot_archives (snapshot, target) {
            snapshot -> Text,
            target -> Text,
            state -> Text,
            job -> Nullable<Text>,
            archived_ms -> Nullable<BigInt>,
            bytes -> BigInt,
            objects -> BigInt,
            updated_ms -> BigInt,
        }
    }
    diesel::table! {
        snapshot_manifests (snapshot) {
            snapshot -> Text,
            entries -> BigInt,
            file_bytes -> BigInt,
            created_ms -> BigInt,
            data -> Binary,
        }
    }
    diesel::table! {
        tokens (id) {
            id -> Text,
            name -> Text,
            role -> Text,
            secret_hash -> Text,
            created_ms -> BigInt,
            expires_ms -> Nullable<BigInt>,
            last_used_ms -> Nullable<BigInt>,
        }
    }
}

use schema::*;

#[allow(missing_debug_implementations)] // diesel connections are not Debug
#[derive(diesel::MultiConnection)]
pub enum AnyConnection {
    Postgresql(diesel::PgConnection),
    Sqlite(diesel::SqliteConnection),
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("cannot open catalog {url}: {detail}")]
    Open { url: String, detail: String },
    #[error("catalog migration failed: {0}")]
    Migrate(String),
}

pub type CResult<T> = Result<T, CatalogError>;

#[derive(Clone, Debug, Queryable, Selectable, Insertable, AsChangeset, PartialEq)]
#[diesel(table_name = volumes)]
pub struct VolumeRow {
    pub id: String,
    pub name: String,
    pub pool: String,
    pub size: i64,
    pub block_size: i64,
    pub labels: String,
    pub origin_snapshot: Option<String>,
    pub state: String,
    pub created_ms: i64,
}

#[derive(Clone, Debug, Queryable, Selectable, Insertable, AsChangeset, PartialEq)]
#[diesel(table_name = snapshots)]
pub struct SnapshotRow {
    pub id: String,
    pub volume: String,
    pub volume_name: String,
    pub pool: String,
    pub pool_snapshot: i64,
    pub size: i64,
    pub block_size: i64,
    pub starred: i64,
    pub locked_until_ms: Option<i64>,
    pub state: String,
    pub created_ms: i64,
    /// `local` or `archive` (see the migration).
    pub location: String,
}

/// A snapshot's file manifest: `data` is zstd-compressed JSON lines.
#[derive(Clone, Queryable, Selectable, Insertable, AsChangeset, PartialEq)]
#[diesel(table_name = snapshot_manifests)]
pub struct ManifestRow {
    pub snapshot: String,
    pub entries: i64,
    pub file_bytes: i64,
    pub created_ms: i64,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for ManifestRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestRow")
            .field("snapshot", &self.snapshot)
            .field("entries", &self.entries)
            .field("data_len", &self.data.len())
            .finish()
    }
}

#[derive(Clone, Queryable, Selectable, Insertable, PartialEq)]
#[diesel(table_name = exports)]
pub struct ExportRow {
    pub id: String,
    pub volume: String,
    pub protocol: String,
    pub initiators: String,
    pub chap: Option<String>,
    pub target: String,
    pub created_ms: i64,
    /// 1: the export refuses writes (the LU reports write protection).
    pub read_only: i64,
}

#[derive(Clone, Debug, Queryable, Selectable, Insertable, AsChangeset, PartialEq)]
#[diesel(table_name = jobs, treat_none_as_null = true)]
pub struct JobRow {
    pub id: String,
    pub kind: String,
    pub state: String,
    pub progress_milli: i64,
    pub target: Option<String>,
    pub error: Option<String>,
    pub result: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub progress_detail: Option<String>,
    /// The host whose probe runs the job (None: maasd runs it).
    pub host: Option<String>,
    /// What the probe is asked to do (JSON of `maas_api::HostTask`).
    pub params: Option<String>,
}

#[derive(Clone, Debug, Queryable, Selectable, Insertable, AsChangeset, PartialEq)]
#[diesel(table_name = hosts, treat_none_as_null = true)]
pub struct HostRow {
    pub id: String,
    pub name: String,
    pub hostnqn: String,
    pub iqn: String,
    pub version: String,
    pub created_ms: i64,
    pub last_heartbeat_ms: Option<i64>,
}

#[derive(Clone, Queryable, Selectable, Insertable, PartialEq)]
#[diesel(table_name = archive_targets)]
pub struct ArchiveTargetRow {
    pub id: String,
    pub name: String,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub access_key_id: String,
    /// The secret access key, sealed by the vault.
    pub secret: String,
    pub path_style: i64,
    pub storage_class: Option<String>,
    pub object_lock_mode: Option<String>,
    pub object_lock_days: Option<i64>,
    pub encryption: String,
    pub created_ms: i64,
    /// The archive key of an encrypted target, sealed by the vault.
    pub archive_key: Option<String>,
    pub key_id: Option<String>,
}

/// The sealed secret stays out of logs.
impl std::fmt::Debug for ArchiveTargetRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveTargetRow")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Queryable, Selectable, Insertable, AsChangeset, PartialEq)]
#[diesel(table_name = snapshot_archives, treat_none_as_null = true)]
pub struct SnapshotArchiveRow {
    pub snapshot: String,
    pub target: String,
    pub state: String,
    pub job: Option<String>,
    pub archived_ms: Option<i64>,
    pub bytes: i64,
    pub objects: i64,
    pub updated_ms: i64,
}

#[derive(Clone, Queryable, Selectable, Insertable, PartialEq)]
#[diesel(table_name = tokens)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub role: String,
    pub secret_hash: String,
    pub created_ms: i64,
    /// After this the token is refused (None: never expires).
    pub expires_ms: Option<i64>,
    /// The latest use flushed to the catalog (see `AppState::flush_token_use`).
    pub last_used_ms: Option<i64>,
}

/// The CHAP column holds secrets (encrypted, or plaintext from before encryption): never shown.
impl std::fmt::Debug for ExportRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportRow")
            .field("id", &self.id)
            .field("volume", &self.volume)
            .field("protocol", &self.protocol)
            .field("initiators", &self.initiators)
            .field("chap", &maas_api::redacted(&self.chap))
            .field("target", &self.target)
            .field("created_ms", &self.created_ms)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// A token's hash does not log anyone in, but has no business in logs either: never shown.
impl std::fmt::Debug for TokenRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRow")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("role", &self.role)
            .field("secret_hash", &format_args!("{}", maas_api::REDACTED))
            .field("created_ms", &self.created_ms)
            .field("expires_ms", &self.expires_ms)
            .field("last_used_ms", &self.last_used_ms)
            .finish()
    }
}

/// The catalog connection. Calls block: run them off the async threads.
pub struct Catalog {
    conn: Mutex<AnyConnection>,
    pub url: String,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Catalog({})", redact(&self.url))
    }
}

/// A catalog URL with any password removed, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// An SQLite catalog holds CHAP secrets and token hashes: its file is created 0600 before
/// SQLite opens it (SQLite gives its -wal and -shm files the database file's mode), and an
/// existing one, with its -wal/-shm/-journal, is tightened to 0600 (logged) if more open.
fn private_sqlite_files(path: &str) -> std::io::Result<()> {
    use maas_pool::fsmode::{PRIVATE_FILE, restrict_file, restrict_path};
    use std::os::unix::fs::OpenOptionsExt;
    if path.is_empty() || path == ":memory:" || path.starts_with("file:") {
        return Ok(());
    }
    let db = std::path::Path::new(path);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(PRIVATE_FILE)
        .open(db)?;
    restrict_file(&f, db, PRIVATE_FILE)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        restrict_path(std::path::Path::new(&p), PRIVATE_FILE)?;
    }
    Ok(())
}

impl Catalog {
    /// Opens `postgres://...` / `postgresql://...` URLs with PostgreSQL, anything else as an
    /// SQLite path (`sqlite://` prefix allowed), and runs pending migrations.
    pub fn open(url: &str) -> CResult<Catalog> {
        let err = |d: String| CatalogError::Open {
            url: redact(url),
            detail: d,
        };
        let mut conn = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut c = diesel::PgConnection::establish(url).map_err(|e| err(e.to_string()))?;
            c.run_pending_migrations(POSTGRES_MIGRATIONS)
                .map_err(|e| CatalogError::Migrate(e.to_string()))?;
            AnyConnection::Postgresql(c)
        } else {
            let path = url.strip_prefix("sqlite://").unwrap_or(url);
            private_sqlite_files(path).map_err(|e| err(e.to_string()))?;
            let mut c =
                diesel::SqliteConnection::establish(path).map_err(|e| err(e.to_string()))?;
            diesel::sql_query("PRAGMA journal_mode = WAL")
                .execute(&mut c)
                .map_err(|e| err(e.to_string()))?;
            diesel::sql_query("PRAGMA synchronous = FULL")
                .execute(&mut c)
                .map_err(|e| err(e.to_string()))?;
            // Deleted and overwritten content (e.g. CHAP secrets once kept in clear) is zeroed,
            // not left in free pages.
            diesel::sql_query("PRAGMA secure_delete = ON")
                .execute(&mut c)
                .map_err(|e| err(e.to_string()))?;
            diesel::sql_query("PRAGMA busy_timeout = 5000")
                .execute(&mut c)
                .map_err(|e| err(e.to_string()))?;
            c.run_pending_migrations(SQLITE_MIGRATIONS)
                .map_err(|e| CatalogError::Migrate(e.to_string()))?;
            AnyConnection::Sqlite(c)
        };
        // A cheap round trip proves the connection works before we serve anything.
        volumes::table.count().get_result::<i64>(&mut conn)?;
        Ok(Catalog {
            conn: Mutex::new(conn),
            url: url.to_string(),
        })
    }

    pub fn backend(&self) -> &'static str {
        if self.url.starts_with("postgres") {
            "postgresql"
        } else {
            "sqlite"
        }
    }

    /// Runs `f` with the connection (inside a transaction when `tx`).
    pub fn with<T>(&self, f: impl FnOnce(&mut AnyConnection) -> CResult<T>) -> CResult<T> {
        let mut c = match self.conn.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        f(&mut c)
    }

    pub fn tx<T>(&self, f: impl FnOnce(&mut AnyConnection) -> CResult<T>) -> CResult<T> {
        self.with(|c| c.transaction(|c| f(c)))
    }

    // ---- volumes ----
    pub fn insert_volume(&self, r: &VolumeRow) -> CResult<()> {
        self.with(|c| {
            Ok(diesel::insert_into(volumes::table)
                .values(r)
                .execute(c)
                .map(|_| ())?)
        })
    }
    pub fn update_volume(&self, r: &VolumeRow) -> CResult<()> {
        self.with(|c| {
            Ok(diesel::update(volumes::table.find(&r.id))
                .set(r)
                .execute(c)
                .map(|_| ())?)
        })
    }
    pub fn delete_volume_row(&self, id: &str) -> CResult<()> {
        self.tx(|c| {
            diesel::delete(exports::table.filter(exports::volume.eq(id))).execute(c)?;
            diesel::delete(volumes::table.find(id)).execute(c)?;
            Ok(())
        })
    }
    pub fn volume(&self, id: &str) -> CResult<Option<VolumeRow>> {
        self.with(|c| {
            Ok(volumes::table
                .find(id)
                .select(VolumeRow::as_select())
                .first(c)
                .optional()?)
        })
    }
    pub fn volume_by_name(&self, name: &str) -> CResult<Option<VolumeRow>> {
        self.with(|c| {
            Ok(volumes::table
                .filter(volumes::name.eq(name))
                .select(VolumeRow::as_select())
                .first(c)
                .optional()?)
        })
    }
    /// Ready volumes by id, after `after` (filtered here, so that pages are exact).
    pub fn volumes(&self, after: Option<&str>, limit: i64) -> CResult<Vec<VolumeRow>> {
        self.with(|c| {
            let mut q = volumes::table
                .filter(volumes::state.eq("ready"))
                .select(VolumeRow::as_select())
                .order(volumes::id.asc())
                .limit(limit)
                .into_boxed();
            if let Some(a) = after {
                q = q.filter(volumes::id.gt(a.to_string()));
            }
            Ok(q.load(c)?)
        })
    }
    pub fn all_volumes(&self) -> CResult<Vec<VolumeRow>> {
        self.with(|c| Ok(volumes::table.select(VolumeRow::as_select()).load(c)?))
    }

    // ---- snapshots ----
    pub fn insert_snapshot(&self, r: &SnapshotRow) -> CResult<()> {
        self.with(|c| {
            Ok(diesel::insert_into(snapshots::table)
                .values(r)
                .execute(c)
                .map(|_| ())?)
        })
    }
    pub fn update_snapshot(&self, r: &SnapshotRow) -> CResult<()> {
        self.with(|c| {
            Ok(diesel::update(snapshots::table.find(&r.id))
                .set(r)
                .execute(c)
                .map(|_| ())?)
        })
    }
    /// Deletes a snapshot's row and what belongs to it (its file manifest).
    pub fn delete_snapshot_row(&self, id: &str) -> CResult<()> {
        self.tx(|c| {
            diesel::delete(snapshot_manifests::table.find(id)).execute(c)?;
            Ok(diesel::delete(snapshots::table.find(id))
                .execute(c)
                .map(|_| ())?)
        })
    }

    // ---- file manifests ----
    /// Stores (or replaces) a snapshot's manifest; false (nothing stored) if the snapshot is
    /// gone — checked in the same transaction, so no manifest outlives its snapshot.
    pub fn put_manifest(&self, r: &ManifestRow) -> CResult<bool> {
        self.tx(|c| {
            let live: i64 = snapshots::table.find(&r.snapshot).count().get_result(c)?;
            if live == 0 {
                return Ok(false);
            }
            diesel::delete(snapshot_manifests::table.find(&r.snapshot)).execute(c)?;
            diesel::insert_into(snapshot_manifests::table)
                .values(r)
                .execute(c)?;
            Ok(true)
        })
    }
    pub fn manifest(&self, snapshot: &str) -> CResult<Option<ManifestRow>> {
        self.with(|c| {
            Ok(snapshot_manifests::table
                .find(snapshot)
                .select(ManifestRow::as_select())
                .first(c)
                .optional()?)
        })
    }
    pub fn snapshot(&self, id: &str) -> CResult<Option<SnapshotRow>> {
        self.with(|c| {
            Ok(snapshots::table
                .find(id)
                .select(SnapshotRow::as_select())
                .first(c)
                .optional()?)
        })
    }
    /// The newest ready snapshot of `volume` (by creation time), if any.
    pub fn newest_snapshot_of(&self, volume: &str) -> CResult<Option<SnapshotRow>> {
        self.with(|c| {
            Ok(snapshots::table
                .filter(snapshots::volume.eq(volume.to_string()))
                .filter(snapshots::state.eq("ready"))
                .select(SnapshotRow::as_select())
                .order((snapshots::created_ms.desc(), snapshots::id.desc()))
                .first(c)
                .optional()?)
        })
    }
    /// Ready snapshots of `volume` by id, after `after` (filtered here: exact pages).
    pub fn snapshots_of(
        &self,
        volume: &str,
        after: Option<&str>,
        limit: i64,
    ) -> CResult<Vec<SnapshotRow>> {
        self.with(|c| {
            let mut q = snapshots::table
                .filter(snapshots::volume.eq(volume.to_string()))
                .filter(snapshots::state.eq("ready"))
                .select(SnapshotRow::as_select())
                .order(snapshots::id.asc())
                .limit(limit)
                .into_boxed();
            if let Some(a) = after {
                q = q.filter(snapshots::id.gt(a.to_string()));
            }
            Ok(q.load(c)?)
        })
    }
    /// Ready snapshots of every volume (or of `volume`, or at `location`), by id after `after`.
    pub fn snapshots_filtered(
        &self,
        volume: Option<&str>,
        location: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> CResult<Vec<SnapshotRow>> {
        self.with(|c| {
            let mut q = snapshots::table
                .filter(snapshots::state.eq("ready"))
                .select(SnapshotRow::as_select())
                .order(snapshots::id.asc())
                .limit(limit)
                .into_boxed();
            if let Some(v) = volume {
                q = q.filter(snapshots::volume.eq(v.to_string()));
            }
            if let Some(l) = location {
                q = q.filter(snapshots::location.eq(l.to_string()));
            }
            if let Some(a) = after {
                q = q.filter(snapshots::id.gt(a.to_string()));
            }
            Ok(q.load(c)?)
        })
    }
    pub fn all_snapshots(&self) -> CResult<Vec<SnapshotRow>> {
        self.with(|c| Ok(snapshots::table.select(SnapshotRow::as_select()).load(c)?))
    }

    // ---- archive targets ----
    pub fn insert_archive_target(&self, r: &ArchiveTargetRow) -> CResult<()> {
        self.with(|c| {
            Ok(diesel::insert_into(archive_targets::table)
                .values(r)
                .execute(c)
                .map(|_| ())?)
        })
    }
    pub fn archive_target(&self, id: &str) -> CResult<Option<ArchiveTargetRow>> {
        self.with(|c| {
            Ok(archive_targets::table
                .find(id)
                .select(ArchiveTargetRow::as_select())
                .first(c)
                .optional()?)
        })
    }
    pub fn archive_target_by_name(&self, name: &str) -> CResult<Option<ArchiveTargetRow>> {
        self.with(|c| {
            Ok(archive_targets::table
                .filter(archive_targets::name.eq(name))
                .select(ArchiveTargetRow::as_select())
                .first(c)
                .optional()?)
        })
    }
    pub fn archive_targets(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> CResult<Vec<ArchiveTargetRow>> {
        self.with(|c| {
            let mut q = archive_targets::table
                .select(ArchiveTargetRow::as_select())
                .order(archive_targets::id.asc())
                .limit(limit)
                .into_boxed();
            if let Some(a) = after {
                q = q.filter(archive_targets::id.gt(a.to_string()));
            }
            Ok(q.load(c)?)
        })
    }
    /// Deletes a target that no snapshot copy refers to; false if one does (nothing deleted).
    pub fn delete_archive_target(&self, id: &str) -> CResult<bool> {
        self.tx(|c| {
            let used: i64 = snapshot_archives::table
                .filter(snapshot_archives::target.eq(id))
                .count()
                .get_result(c)?;
            if used > 0 {
                return Ok(false);
            }
            diesel::delete(archive_targets::table.find(id)).execute(c)?;
            Ok(true)
        })
    }

    // ---- snapshot copies in archive targets ----
    pub fn upsert_snapshot_archive(&self, r: &SnapshotArchiveRow) -> CResult<()> {
        self.tx(|c| {
            let n = diesel::update(
                snapshot_archives::table.find((r.snapshot.clone(), r.target.clone())),
            )
            .set(r)
            .execute(c)?;
            if n == 0 {
                diesel::insert_into(snapshot_archives::table)
                    .values(r)
                    .execute(c)?;
            }
            Ok(())
        })
    }
    pub fn snapshot_archive(
        &self,
        snapshot: &str,
        target: &str,
    ) -> CResult<Option<SnapshotArchiveRow>> {
        self.with(|c| {
            Ok(snapshot_archives::table
                .find((snapshot.to_string(), target.to_string()))
                .select(SnapshotArchiveRow::as_select())
                .first(c)
                .optional()?)
        })
    }
    pub fn archives_of(&self, snapshot: &str) -> CResult<Vec<SnapshotArchiveRow>> {
        self.with(|c| {
            Ok(snapshot_archives::table
                .filter(snapshot_archives::snapshot.eq(snapshot))
                .select(SnapshotArchiveRow::as_select())
                .order(snapshot_archives::target.asc())
                .load(c)?)
        })
    }
    pub fn delete_snapshot_archive(&self, snapshot: &str, target: &str) -> CResult<()> {
        self.with(|c| {
            diesel::delete(
                snapshot_archives::table.find((snapshot.to_string(), target.to_string())),
            )
            .execute(c)?;
            Ok(())
        })
    }
    pub fn archives_of_target(&self, target: &str) -> CResult<Vec<SnapshotArchiveRow>> {
        self.with(|c| {
            Ok(snapshot_archives::table
                .filter(snapshot_archives::target.eq(target))
                .select(SnapshotArchiveRow::as_select())
                .load(c)?)
        })
    }
    /// Forgets the copy records of a deleted snapshot (failed pushes: nothing was published).
    pub fn delete_archives_of(&self, snapshot: &str) -> CResult<()> {
        self.with(|c| {
            diesel::delete(
                snapshot_archives::table.filter(snapshot_archives::snapshot.eq(snapshot)),
            )
            .execute(c)?;
            Ok(())
        })
    }
    /// Copies whose push was interrupted (maasd stopped during it): resumed at start-up.
    pub fn pushing_archives(&self) -> CResult<Vec<SnapshotArchiveRow>> {
        self.with(|c| {
            Ok(snapshot_archives::table
                .filter(snapshot_archives::state.eq("pushing"))
                .select(SnapshotArchiveRow::as_select())
                .load(c)?)
        })
    }

    // ---- exports ----
    pub fn insert_export(&self, r: &ExportRow) -> CResult<()> {
        self.with(|c| {
            Ok(diesel::insert_into(exports::table)
                .values(r)
                .execute(c)
                .map(|_| ())?)
        })
    }
    pub fn export(&self, id: &str) -> CResult<Option<ExportRow>> {
        self.with(|c| {
            Ok(exports::table
                .find(id)
                .select(ExportRow::as_select())
                .first(c)
                .optional()?)
        })
    }
    pub fn exports_of(
        &self,
        volume: &str,
        after: Option<&str>,
        limit: i64,
    ) -> CResult<Vec<ExportRow>> {
        self.with(|c| {
            let mut q = exports::table
                .filter(exports::volume.eq(volume.to_string()))
                .select(ExportRow::as_select())
                .order(exports::id.asc())
                .limit(limit)
                .into_boxed();
            if let Some(a) = after {
                q = q.filter(exports::id.gt(a.to_string()));
            }
            Ok(q.load(c)?)
        })
    }
    pub fn all_exports(&self) -> CResult<Vec<ExportRow>> {
        self.with(|c| {
            Ok(exports::table
                .select(ExportRow::as_select())
                .order(exports::id.asc())
                .load(c)?)
        })
    }
    /// Replaces an export's CHAP column (sealing secrets kept in clear by older builds).
    pub fn set_export_chap(&self, id: &str, chap: &str) -> CResult<()> {
        self.with(|c| {
            diesel::update(exports::table.find(id))
                .set(exports::chap.eq(chap))
                .execute(c)?;
            Ok(())
        })
    }

    /// SQLite: copies the write-ahead log into the database and empties it, so that
    /// overwritten rows (secrets that were in clear) leave no old copy in the -wal file.
    /// Nothing to do on PostgreSQL.
    pub fn checkpoint(&self) -> CResult<()> {
        self.with(|c| {
            if let AnyConnection::Sqlite(s) = c {
                diesel::sql_query("PRAGMA wal_checkpoint(TRUNCATE)").execute(s)?;
            }
            Ok(())
        })
    }

    pub fn delete_export(&self, id: &str) -> CResult<()> {
        self.with(|c| {
            Ok(diesel::delete(exports::table.find(id))
                .execute(c)
                .map(|_| ())?)
        })
    }

    // ---- jobs ----
    pub fn insert_job(&self, r: &JobRow) -> CResult<()> {
        self.with(|c| {
            Ok(diesel::insert_into(jobs::table)
                .values(r)
                .execute(c)
                .map(|_| ())?)
        })
    }
    pub fn update_job(&self, r: &JobRow) -> CResult<()> {
        self.with(|c| {
            Ok(diesel::update(jobs::table.find(&r.id))
                .set(r)
                .execute(c)
                .map(|_| ())?)
        })
    }
    pub fn job(&self, id: &str) -> CResult<Option<JobRow>> {
        self.with(|c| {
            Ok(jobs::table
                .find(id)
                .select(JobRow::as_select())
                .first(c)
                .optional()?)
        })
    }
    pub fn jobs(&self, after: Option<&str>, limit: i64) -> CResult<Vec<JobRow>> {
        self.with(|c| {
            let mut q = jobs::table
                .select(JobRow::as_select())
                .order(jobs::id.asc())
                .limit(limit)
                .into_boxed();
            if let Some(a) = after {
                q = q.filter(jobs::id.gt(a.to_string()));
            }
            Ok(q.load(c)?)
        })
    }
    /// Unfinished jobs maasd itself runs (jobs of hosts are the probes' and outlive maasd).
    pub fn unfinished_jobs(&self) -> CResult<Vec<JobRow>> {
        self.with(|c| {
            Ok(jobs::table
                .filter(jobs::state.eq("queued").or(jobs::state.eq("running")))
                .filter(jobs::host.is_null())
                .select(JobRow::as_select())
                .load(c)?)
        })
    }

    /// Jobs of `host` in `state`, oldest first.
    pub fn host_jobs(&self, host: &str, state: &str, limit: i64) -> CResult<Vec<JobRow>> {
        self.with(|c| {
            Ok(jobs::table
                .filter(jobs::host.eq(host))
                .filter(jobs::state.eq(state))
                .order((jobs::created_ms.asc(), jobs::id.asc()))
                .limit(limit)
                .select(JobRow::as_select())
                .load(c)?)
        })
    }

    /// How many jobs of `host` are in `state`.
    pub fn count_host_jobs(&self, host: &str, state: &str) -> CResult<i64> {
        self.with(|c| {
            Ok(jobs::table
                .filter(jobs::host.eq(host))
                .filter(jobs::state.eq(state))
                .count()
                .get_result(c)?)
        })
    }

    /// Writes a job's new state only if it is still running (a report racing another, or one
    /// arriving after the job ended, changes nothing); whether it did.
    pub fn update_running_job(&self, r: &JobRow) -> CResult<bool> {
        self.with(|c| {
            Ok(diesel::update(
                jobs::table
                    .filter(jobs::id.eq(&r.id))
                    .filter(jobs::state.eq("running")),
            )
            .set(r)
            .execute(c)?
                == 1)
        })
    }

    /// Records a sign of life of `host` (and its probe's version), touching nothing else of
    /// its row; false if there is no such host.
    pub fn touch_host(&self, id: &str, now: i64, version: Option<&str>) -> CResult<bool> {
        self.with(|c| {
            let n = match version {
                Some(v) => diesel::update(hosts::table.find(id))
                    .set((hosts::last_heartbeat_ms.eq(Some(now)), hosts::version.eq(v)))
                    .execute(c)?,
                None => diesel::update(hosts::table.find(id))
                    .set(hosts::last_heartbeat_ms.eq(Some(now)))
                    .execute(c)?,
            };
            Ok(n == 1)
        })
    }

    /// Hands work to `host`'s probe: a job already running for it first (its claim's answer
    /// may have been lost, or the probe restarted without knowing it: it runs it again, so
    /// host jobs run at least once and never stay "running" for a probe that forgot them),
    /// else the oldest queued job, marked running atomically (a conditional update, so two
    /// claimers, even on two managers, never both get it).
    pub fn claim_host_job(&self, host: &str, now: i64) -> CResult<Option<JobRow>> {
        if let Some(j) = self.host_jobs(host, "running", 1)?.into_iter().next() {
            return Ok(Some(j));
        }
        for _ in 0..8 {
            let Some(mut j) = self.host_jobs(host, "queued", 1)?.into_iter().next() else {
                return Ok(None);
            };
            let n = self.with(|c| {
                Ok(diesel::update(
                    jobs::table
                        .filter(jobs::id.eq(&j.id))
                        .filter(jobs::state.eq("queued")),
                )
                .set((jobs::state.eq("running"), jobs::updated_ms.eq(now)))
                .execute(c)?)
            })?;
            if n == 1 {
                j.state = "running".into();
                j.updated_ms = now;
                return Ok(Some(j));
            }
        }
        Ok(None)
    }

    // ---- hosts ----
    pub fn insert_host(&self, r: &HostRow) -> CResult<()> {
        self.with(|c| {
            Ok(diesel::insert_into(hosts::table)
                .values(r)
                .execute(c)
                .map(|_| ())?)
        })
    }
    pub fn update_host(&self, r: &HostRow) -> CResult<()> {
        self.with(|c| {
            Ok(diesel::update(hosts::table.find(&r.id))
                .set(r)
                .execute(c)
                .map(|_| ())?)
        })
    }
    pub fn host(&self, id: &str) -> CResult<Option<HostRow>> {
        self.with(|c| {
            Ok(hosts::table
                .find(id)
                .select(HostRow::as_select())
                .first(c)
                .optional()?)
        })
    }
    pub fn host_by_name(&self, name: &str) -> CResult<Option<HostRow>> {
        self.with(|c| {
            Ok(hosts::table
                .filter(hosts::name.eq(name))
                .select(HostRow::as_select())
                .first(c)
                .optional()?)
        })
    }
    pub fn hosts(&self, after: Option<&str>, limit: i64) -> CResult<Vec<HostRow>> {
        self.with(|c| {
            let mut q = hosts::table
                .select(HostRow::as_select())
                .order(hosts::id.asc())
                .limit(limit)
                .into_boxed();
            if let Some(a) = after {
                q = q.filter(hosts::id.gt(a.to_string()));
            }
            Ok(q.load(c)?)
        })
    }
    /// Deletes a host; its queued jobs fail (nobody will run them).
    pub fn delete_host(&self, id: &str, failed_error: &str, now: i64) -> CResult<()> {
        self.tx(|c| {
            diesel::update(
                jobs::table
                    .filter(jobs::host.eq(id))
                    .filter(jobs::state.eq("queued")),
            )
            .set((
                jobs::state.eq("failed"),
                jobs::error.eq(failed_error),
                jobs::updated_ms.eq(now),
            ))
            .execute(c)?;
            diesel::delete(hosts::table.find(id)).execute(c)?;
            Ok(())
        })
    }

    // ---- tokens ----
    pub fn insert_token(&self, r: &TokenRow) -> CResult<()> {
        self.with(|c| {
            Ok(diesel::insert_into(tokens::table)
                .values(r)
                .execute(c)
                .map(|_| ())?)
        })
    }
    pub fn tokens(&self) -> CResult<Vec<TokenRow>> {
        self.with(|c| {
            Ok(tokens::table
                .select(TokenRow::as_select())
                .order(tokens::id.asc())
                .load(c)?)
        })
    }
    pub fn token_by_hash(&self, hash: &str) -> CResult<Option<TokenRow>> {
        self.with(|c| {
            Ok(tokens::table
                .filter(tokens::secret_hash.eq(hash))
                .select(TokenRow::as_select())
                .first(c)
                .optional()?)
        })
    }
    /// Records the latest uses of tokens (id, ms) in one transaction; a recorded time never
    /// goes back, and tokens deleted meanwhile are skipped.
    pub fn record_token_use(&self, uses: &[(String, i64)]) -> CResult<()> {
        self.tx(|c| {
            for (id, ms) in uses {
                diesel::update(
                    tokens::table.find(id).filter(
                        tokens::last_used_ms
                            .is_null()
                            .or(tokens::last_used_ms.lt(*ms)),
                    ),
                )
                .set(tokens::last_used_ms.eq(*ms))
                .execute(c)?;
            }
            Ok(())
        })
    }
    pub fn delete_token(&self, id: &str) -> CResult<bool> {
        self.with(|c| Ok(diesel::delete(tokens::table.find(id)).execute(c)? > 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_secrets() {
        let e = ExportRow {
            id: "exp-1".into(),
            volume: "vol-1".into(),
            protocol: "iscsi".into(),
            initiators: "[]".into(),
            chap: Some(r#"{"user":"u","secret":"one-way-s3cret"}"#.into()),
            target: "iqn.2026-11.io.maas:exp-1".into(),
            created_ms: 1,
            read_only: 0,
        };
        let text = format!("{e:?}");
        assert!(!text.contains("one-way-s3cret"), "{text}");
        assert!(
            text.contains("chap: Some(<redacted>)") && text.contains("exp-1"),
            "{text}"
        );
        let none = ExportRow { chap: None, ..e };
        assert!(format!("{none:?}").contains("chap: None"));
        let t = TokenRow {
            id: "tok-1".into(),
            name: "ci".into(),
            role: "admin".into(),
            secret_hash: "deadbeefcafe".into(),
            created_ms: 1,
            expires_ms: None,
            last_used_ms: None,
        };
        let text = format!("{t:?}");
        assert!(!text.contains("deadbeefcafe"), "{text}");
        assert!(
            text.contains("secret_hash: <redacted>") && text.contains("tok-1"),
            "{text}"
        );
    }
}
