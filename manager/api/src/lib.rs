//! maas-api: the REST API's types (`/api/v1`), shared by the manager, `maasctl` and the client
//! probe so the probe never depends on server crates. Sizes are bytes, times RFC 3339, ids
//! opaque strings. Field names here are the API's contract.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[cfg(feature = "client")]
pub mod client;

/// Path prefix of the REST API.
pub const API_PREFIX: &str = "/api/v1";

/// Every error the API returns.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ErrorBody {
    /// Stable, machine-readable code, e.g. `VOLUME_NOT_FOUND`.
    pub code: String,
    pub message: String,
    pub request_id: String,
    /// For validation errors: the offending field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A page of a list.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct List<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    /// Catalog backend: `sqlite` or `postgresql`.
    pub catalog: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Device {
    pub index: u16,
    pub path: String,
    /// `ssd` or `hdd`.
    pub tier: String,
    pub size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddDevice {
    /// A block device, or a file to create (relative paths go in the pool's directory).
    pub path: String,
    /// `ssd` or `hdd`.
    #[schema(pattern = "^(ssd|hdd)$")]
    pub tier: String,
    /// Size of a file device in bytes (ignored for block devices).
    #[serde(default)]
    pub size: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Pool {
    pub id: String,
    pub name: String,
    pub devices: Vec<Device>,
    /// Tiers present, fastest first (`ram` is the cache).
    pub tiers: Vec<String>,
    pub chunk_size: u64,
    pub capacity: u64,
    pub used: u64,
    pub free: u64,
    pub wal_bytes: u64,
    pub logical_bytes: u64,
    pub unique_bytes: u64,
    pub stored_bytes: u64,
    pub dedup_ratio: f64,
    pub compression_ratio: f64,
    pub volumes: u64,
    pub snapshots: u64,
    /// The RAM tier (decompressed chunks, log cache, write buffer): targets and usage now.
    #[serde(default)]
    pub ram_tier: RamTier,
    /// How the targets' reads that missed memory waited, since maasd started.
    #[serde(default)]
    pub reads: PoolReads,
}

/// The targets' reads (iSCSI, NVMe/TCP) that memory could not answer at once, by how they
/// waited, since maasd started (reads answered from the RAM tier at once are not counted).
/// What tells whether reads that miss RAM wait for the device asynchronously, as they should,
/// or hold a blocking thread each (compressed frames, chunks whose frame table is not in RAM).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct PoolReads {
    /// In memory after all by the time they started (written meanwhile).
    pub from_memory: u64,
    /// Waited for the device on the shared io_uring, no thread held.
    pub device_async: u64,
    /// Read on a blocking thread.
    pub blocking: u64,
}

/// The RAM tier's targets and usage. Parts configured `"auto"` size themselves from the
/// machine's memory and give it back under memory pressure; the others keep a fixed size.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct RamTier {
    /// Whether any part sizes itself.
    pub auto: bool,
    /// Total target of the auto parts now, and its maximum on this machine.
    pub target_bytes: u64,
    pub max_bytes: u64,
    pub chunk_cache_limit: u64,
    pub chunk_cache_bytes: u64,
    pub log_cache_limit: u64,
    pub log_cache_bytes: u64,
    pub write_buffer_limit: u64,
    pub write_buffer_bytes: u64,
    /// Times the tier gave memory back under memory pressure.
    pub shrinks: u64,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    /// The snapshot this volume is a clone of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_snapshot: Option<String>,
    pub created_at: String,
    /// The volume's newest snapshot, when the volume holds exactly its content: nothing was
    /// written to it since that seal (given by `GET /volumes/{id}` only). A backup tool may
    /// then trust what it recorded of that snapshot instead of reading the volume back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unchanged_since: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    #[schema(pattern = "^[A-Za-z0-9._-]{1,128}$")]
    pub name: String,
    /// Bytes, a multiple of 4096.
    #[schema(minimum = 4096, multiple_of = 4096)]
    pub size: u64,
    /// 512 or 4096 (default 512, what most initiators expect).
    #[serde(default)]
    pub block_size: Option<u32>,
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVolume {
    /// Grow to this size (shrinking is refused).
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub volume: String,
    pub volume_name: String,
    pub size: u64,
    pub block_size: u32,
    pub created_at: String,
    pub starred: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<String>,
    /// Where the snapshot's data is: `local` (in the pool) or `archive` (only in archive
    /// targets: evicted, or imported from a bucket; rehydrate to bring it back).
    #[serde(default = "local")]
    pub location: String,
    /// Copies of the snapshot in archive targets.
    #[serde(default)]
    pub archives: Vec<SnapshotArchive>,
}

fn local() -> String {
    "local".into()
}

/// A snapshot's copy in an archive target.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct SnapshotArchive {
    /// Archive target id.
    pub target: String,
    /// `pushing`, `archived`, `failed` (the push did not finish) or `damaged` (a verify found
    /// an object missing or damaged; evict and rehydrate do not use it).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_at: Option<String>,
    /// Bytes of the snapshot's data as stored in the bucket (compressed; shared with other
    /// snapshots where they hold the same data).
    pub bytes: u64,
    /// Bucket objects the snapshot's copy uses (packs and its manifest).
    pub objects: u64,
    /// The job that last pushed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// An S3-compatible bucket (and prefix) that snapshots are archived to.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ArchiveTarget {
    pub id: String,
    pub name: String,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    /// The key id (the secret key is never returned).
    pub access_key_id: String,
    pub path_style: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<ObjectLock>,
    /// `none`: objects are stored as the pool stores them (compressed, not encrypted);
    /// `xchacha20-poly1305`: client-side encryption, the bucket holds only ciphertext.
    pub encryption: String,
    /// Names the archive key of an encrypted target (reveals nothing of the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The archive key, written down by the user: only in the response that created an
    /// encrypted target with a new key, never again. Without it an import on another
    /// installation cannot read the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_key: Option<RecoveryKey>,
    pub created_at: String,
}

/// An archive target's recovery key (`maasrk1-` and 72 hex digits). Never shown by `Debug`.
#[derive(Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(transparent)]
#[schema(value_type = String)]
pub struct RecoveryKey(pub String);

impl std::fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoveryKey(<redacted>)")
    }
}

/// S3 Object Lock retention applied to every object MaaS writes to the target.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ObjectLock {
    /// `GOVERNANCE` or `COMPLIANCE`.
    pub mode: String,
    /// Retention from the time each object is written, 1..36500.
    pub days: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateArchiveTarget {
    pub name: String,
    /// `https://s3.eu-west-1.amazonaws.com`, `http://10.0.0.5:7480`...
    pub endpoint: String,
    /// Default `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    pub bucket: String,
    /// Lets several MaaS installations share a bucket. Default: none.
    #[serde(default)]
    pub prefix: Option<String>,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Path-style addressing; default true for endpoints that are IP addresses or localhost.
    #[serde(default)]
    pub path_style: Option<bool>,
    /// Storage class of the objects written, e.g. `STANDARD_IA`.
    #[serde(default)]
    pub storage_class: Option<String>,
    #[serde(default)]
    pub object_lock: Option<ObjectLock>,
    /// `none` (the default) or `xchacha20-poly1305` (client-side encryption: every object,
    /// index and manifest is sealed before it leaves maasd). A new key is made and returned
    /// once as `recovery_key` unless one is given.
    #[serde(default)]
    pub encryption: Option<String>,
    /// The recovery key of an encrypted archive already in the bucket (a re-import after a
    /// disaster, another installation sharing the prefix); implies encryption.
    #[serde(default)]
    pub recovery_key: Option<RecoveryKey>,
}

/// What a check of an archive target does beyond reading (`POST
/// /archive-targets/{id}/check`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckArchiveTarget {
    /// Forget packs the bucket lost (a later push of a damaged snapshot sends them again)
    /// and delete orphan packs older than the grace period. Default false: report only.
    #[serde(default)]
    pub repair: bool,
    /// Orphan packs younger than this are left alone (a push may still be under way, here
    /// or on another installation sharing the prefix). Default 24.
    #[serde(default)]
    pub orphan_grace_hours: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSnapshot {
    /// Archive target id.
    pub target: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSnapshot {
    #[serde(default)]
    pub starred: Option<bool>,
    /// RFC 3339; a lock can be extended, never shortened.
    #[serde(default)]
    pub locked_until: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClone {
    #[schema(pattern = "^[A-Za-z0-9._-]{1,128}$")]
    pub name: String,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// What `Debug` prints instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// `Some(<redacted>)` or `None`, for `Debug` impls of optional secrets.
pub fn redacted<T>(o: &Option<T>) -> Option<std::fmt::Arguments<'static>> {
    o.as_ref().map(|_| format_args!("<redacted>"))
}

#[derive(Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_secret: Option<String>,
}

/// Secrets never reach logs or panic messages.
impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("secret", &format_args!("{REDACTED}"))
            .field("mutual_user", &self.mutual_user)
            .field("mutual_secret", &redacted(&self.mutual_secret))
            .finish()
    }
}

/// NVMe in-band authentication (DH-HMAC-CHAP) of an `nvme-tcp` export: secrets in the form
/// `nvme gen-dhchap-key` prints and `nvme connect --dhchap-secret/--dhchap-ctrl-secret` takes
/// (`DHHC-1:xx:<base64>:`). Every queue of every host must authenticate with the host secret;
/// a host that also gives the controller secret authenticates the target in turn.
#[derive(Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DhChap {
    pub host_secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctrl_secret: Option<String>,
    /// Only this hash (`sha256`, `sha384`, `sha512`); default: whichever the host offers,
    /// SHA-256 first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Only this Diffie-Hellman group (`null`, `ffdhe2048` ... `ffdhe8192`); default: whichever
    /// the host offers, ffdhe2048 first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhgroup: Option<String>,
}

impl std::fmt::Debug for DhChap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhChap")
            .field("host_secret", &"<redacted>")
            .field(
                "ctrl_secret",
                &self.ctrl_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("hash", &self.hash)
            .field("dhgroup", &self.dhgroup)
            .finish()
    }
}

/// DH-HMAC-CHAP as shown back: secrets are never returned.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct DhChapInfo {
    /// A controller secret is set: hosts can authenticate the target too.
    pub ctrl_secret: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhgroup: Option<String>,
}

/// CHAP as shown back: secrets are never returned.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ChapInfo {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_user: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Export {
    pub id: String,
    pub volume: String,
    /// `iscsi`, `nvme-tcp` (later `nbd`, `nvme-rdma`).
    pub protocol: String,
    /// Allowed initiator IQNs / host NQNs; empty refuses everyone.
    pub initiators: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap: Option<ChapInfo>,
    /// NVMe/TCP: DH-HMAC-CHAP in-band authentication required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap: Option<DhChapInfo>,
    /// host:port a client connects to.
    pub portal: String,
    /// Target IQN (iSCSI) or subsystem NQN (NVMe).
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lun: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nsid: Option<u32>,
    /// Writes are refused (the disk reports write protection).
    #[serde(default)]
    pub read_only: bool,
    pub created_at: String,
    /// `live`: served; `failed`: the server could not bring it up (see `error`), so no host
    /// can log in to it until it is deleted and created again.
    #[serde(default = "live")]
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ExportError>,
}

fn live() -> String {
    "live".into()
}

/// Why an export is not served.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ExportError {
    /// Stable, machine-readable code, e.g. `CHAP_SECRET_UNREADABLE`.
    pub code: String,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateExport {
    pub protocol: String,
    #[serde(default)]
    pub initiators: Vec<String>,
    #[serde(default)]
    pub chap: Option<Chap>,
    /// NVMe/TCP only: DH-HMAC-CHAP secrets every host must authenticate with.
    #[serde(default)]
    pub dhchap: Option<DhChap>,
    /// Export read-only: hosts can mount and read (e.g. a restore from a snapshot clone) but
    /// every write fails with DATA PROTECT / WRITE PROTECTED.
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Job {
    pub id: String,
    /// `seal`, `clone`, `delete-volume`, `delete-snapshot`, `verify`.
    pub kind: String,
    /// `queued`, `running`, `succeeded`, `failed`.
    pub state: String,
    /// 0..1
    pub progress: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// What the job made, e.g. `{"snapshot": "snap-..."}` or `{"volume": "vol-..."}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The resource the job works on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// What the job has done so far, by kind; `archive`: `objects_total`, `objects_to_send`,
    /// `objects_sent`, `bytes_to_send`, `bytes_sent`, `packs_sent`, `bytes_per_second`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_detail: Option<serde_json::Value>,
    pub created_at: String,
    pub updated_at: String,
    /// The host whose probe runs the job (jobs queued with `POST /hosts/{id}/jobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// What the probe was asked to do (a [`HostTask`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Value>,
}

impl Job {
    pub fn is_done(&self) -> bool {
        self.state == "succeeded" || self.state == "failed"
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub name: String,
    /// `admin`, `operator` or `viewer`.
    pub role: String,
    pub created_at: String,
    /// RFC 3339; from then on the token is refused (401 `TOKEN_EXPIRED`). null: never.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// RFC 3339: the latest request made with the token (null: never used). maasd writes
    /// it to the catalog at most once a minute; the API shows the latest it knows.
    #[serde(default)]
    pub last_used_at: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    #[schema(pattern = "^[A-Za-z0-9._-]{1,128}$")]
    pub name: String,
    /// `admin`, `operator` or `viewer`.
    #[schema(pattern = "^(admin|operator|viewer)$")]
    pub role: String,
    /// RFC 3339 time, in the future, after which the token is refused. Absent: never expires.
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// Returned once, at creation: the secret is not stored, only its hash.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub token: Token,
    pub secret: String,
}

impl std::fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedToken")
            .field("token", &self.token)
            .field("secret", &format_args!("{REDACTED}"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_secrets() {
        let chap = Chap {
            user: "backup".into(),
            secret: "one-way-s3cret".into(),
            mutual_user: Some("maas".into()),
            mutual_secret: Some("mutual-s3cret".into()),
        };
        let export = CreateExport {
            protocol: "iscsi".into(),
            initiators: vec!["iqn.2026-11.test:h".into()],
            chap: Some(chap.clone()),
            dhchap: Some(DhChap {
                host_secret: "DHHC-1:00:ZGhjaGFwLWhvc3QtczNjcmV0:".into(),
                ctrl_secret: Some("DHHC-1:00:ZGhjaGFwLWN0cmwtczNjcmV0:".into()),
                hash: None,
                dhgroup: None,
            }),
            read_only: false,
        };
        let token = CreatedToken {
            token: Token {
                id: "tok-1".into(),
                name: "ci".into(),
                role: "viewer".into(),
                created_at: "2026-11-22T00:00:00Z".into(),
                expires_at: None,
                last_used_at: None,
            },
            secret: "maas_0123456789abcdef".into(),
        };
        for text in [
            format!("{chap:?}"),
            format!("{chap:#?}"),
            format!("{export:?}"),
            format!("{token:?}"),
        ] {
            for secret in [
                "one-way-s3cret",
                "mutual-s3cret",
                "maas_0123456789abcdef",
                "ZGhjaGFw",
            ] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
            assert!(text.contains("<redacted>"), "{text}");
        }
        let text = format!("{chap:?}");
        assert!(
            text.contains("secret: <redacted>")
                && text.contains("mutual_secret: Some(<redacted>)")
                && text.contains("user: \"backup\"")
                && text.contains("mutual_user: Some(\"maas\")"),
            "names stay visible: {text}"
        );
        let one_way = Chap {
            mutual_user: None,
            mutual_secret: None,
            ..chap
        };
        assert!(format!("{one_way:?}").contains("mutual_secret: None"));
        assert!(format!("{token:?}").contains("tok-1"));
    }
}

/// One entry of a snapshot's file manifest (`GET /snapshots/{id}/manifest`, one JSON object per
/// line): what a file-tree backup put in the snapshot, for browsing, drills and audit.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Absolute within the backed-up tree (`/` is its root).
    pub path: String,
    /// `file`, `dir`, `symlink`, `fifo`, `socket`, `char` or `block`.
    pub kind: String,
    pub size: u64,
    /// Permission and special bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// BLAKE3 of the content, 64 hex digits (regular files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// Symbolic links: where they point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl ManifestEntry {
    /// The kinds an entry may have.
    pub const KINDS: [&'static str; 7] =
        ["file", "dir", "symlink", "fifo", "socket", "char", "block"];
}

/// What `PUT /snapshots/{id}/manifest` stored.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ManifestInfo {
    pub snapshot: String,
    pub entries: u64,
    /// Bytes of the regular files it lists.
    pub file_bytes: u64,
    pub created_at: String,
}

/// One entry of a snapshot's directory, read from the filesystem inside the snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct SnapshotFileEntry {
    /// The name; bytes that are not UTF-8 are replaced (then `name_is_utf8` is false and the
    /// entry cannot be addressed by path through the API).
    pub name: String,
    pub name_is_utf8: bool,
    /// `file`, `dir`, `symlink`, `fifo`, `socket`, `char` or `block`.
    pub kind: String,
    pub size: u64,
    /// Permission bits (e.g. 420 = 0644).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Where a symlink points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// `GET /snapshots/{id}/files?path=`: a page of one directory, sorted by name.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct SnapshotFileListing {
    pub snapshot: String,
    pub path: String,
    pub entries: Vec<SnapshotFileEntry>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// A protected host, as its probe registered it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Host {
    pub id: String,
    pub name: String,
    /// The host's NVMe Qualified Name: exports for its probe name it.
    pub hostnqn: String,
    /// The host's iSCSI initiator name.
    pub iqn: String,
    /// The probe's version.
    pub version: String,
    /// `online` (a heartbeat in the last minute), `offline`, or `registered` (never seen).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    /// Jobs waiting for the host's probe, and running on it.
    pub jobs_queued: u64,
    pub jobs_running: u64,
    pub created_at: String,
}

/// `POST /hosts`: a probe registers its host (again, after a reinstall: same name and NQN).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisterHost {
    pub name: String,
    pub hostnqn: String,
    pub iqn: String,
    #[serde(default)]
    pub version: String,
}

/// `POST /hosts/{id}/heartbeat`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[serde(default)]
    pub version: String,
}

/// What a host's probe is asked to do (`POST /hosts/{id}/jobs`), as its one-shot commands
/// take it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum HostTask {
    /// `maas-probe backup`: `source` (a directory, device or image file), or `postgres` (a
    /// libpq connection string of a cluster on the host); `pre`/`post` commands around it.
    Backup {
        volume: String,
        #[serde(default)]
        source: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        postgres: Option<String>,
        /// With an NBD `source`: the QEMU dirty bitmap of changes since the last backup.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bitmap: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pre: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        post: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        exclude: Vec<String>,
    },
    /// `maas-probe restore`: files (`path` and `to`) or the whole image (`image`).
    Restore {
        snapshot: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<String>,
    },
    /// `maas-probe mount`.
    Mount { snapshot: String, dir: String },
    /// `maas-probe umount`.
    Umount { dir: String },
}

impl HostTask {
    pub fn kind(&self) -> &'static str {
        match self {
            HostTask::Backup { .. } => "host-backup",
            HostTask::Restore { .. } => "host-restore",
            HostTask::Mount { .. } => "host-mount",
            HostTask::Umount { .. } => "host-umount",
        }
    }
}

/// `POST /jobs/{id}/report`: a probe reports on a job of its host. `state` `running` with
/// `progress` (and `progress_detail`) while it works; `succeeded` with `result`, or `failed`
/// with `error`, once.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobReport {
    pub state: String,
    #[serde(default)]
    pub progress: Option<f64>,
    #[serde(default)]
    pub progress_detail: Option<serde_json::Value>,
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    #[serde(default)]
    pub error: Option<JobReportError>,
}

/// Why a probe's job failed.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JobReportError {
    pub code: String,
    pub message: String,
}
