-- The file manifest a backup recorded with its snapshot (path, kind, size, mode, owner, mtime,
-- BLAKE3 of content): one row per snapshot, the entries as zstd-compressed JSON lines.
CREATE TABLE snapshot_manifests (
    snapshot TEXT PRIMARY KEY NOT NULL,
    entries BIGINT NOT NULL,
    file_bytes BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    data BYTEA NOT NULL
);
