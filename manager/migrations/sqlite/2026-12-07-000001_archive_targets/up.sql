-- Archive targets: S3-compatible buckets snapshots are pushed to. The secret access key is
-- sealed by the vault (secrets.rs) and never returned by the API.
CREATE TABLE archive_targets (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    region TEXT NOT NULL,
    bucket TEXT NOT NULL,
    prefix TEXT NOT NULL,
    access_key_id TEXT NOT NULL,
    secret TEXT NOT NULL,
    path_style BIGINT NOT NULL,
    storage_class TEXT,
    object_lock_mode TEXT,
    object_lock_days BIGINT,
    encryption TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
-- Copies of snapshots in archive targets. state: pushing (a job is on it, or one was
-- interrupted by a restart and is resumed at start-up), archived, failed.
CREATE TABLE snapshot_archives (
    snapshot TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    job TEXT,
    archived_ms BIGINT,
    bytes BIGINT NOT NULL,
    objects BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (snapshot, target)
);
CREATE INDEX snapshot_archives_by_target ON snapshot_archives (target);
-- What a job has done so far, as JSON (bytes and objects sent by an archive job...).
ALTER TABLE jobs ADD COLUMN progress_detail TEXT;
-- Where a snapshot's data is: local (in the pool, pool_snapshot) or archive (only in archive
-- targets: evicted, or imported from a bucket; pool_snapshot then names the pool snapshot
-- an interrupted eviction still has to delete, or -1).
ALTER TABLE snapshots ADD COLUMN location TEXT NOT NULL DEFAULT 'local';
