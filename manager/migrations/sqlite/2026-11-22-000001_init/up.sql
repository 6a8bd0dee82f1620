CREATE TABLE volumes (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    pool TEXT NOT NULL,
    size BIGINT NOT NULL,
    block_size BIGINT NOT NULL,
    labels TEXT NOT NULL,
    origin_snapshot TEXT,
    state TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY NOT NULL,
    volume TEXT NOT NULL,
    volume_name TEXT NOT NULL,
    pool TEXT NOT NULL,
    pool_snapshot BIGINT NOT NULL,
    size BIGINT NOT NULL,
    block_size BIGINT NOT NULL,
    starred BIGINT NOT NULL,
    locked_until_ms BIGINT,
    state TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX snapshots_by_volume ON snapshots (volume);
CREATE TABLE exports (
    id TEXT PRIMARY KEY NOT NULL,
    volume TEXT NOT NULL,
    protocol TEXT NOT NULL,
    initiators TEXT NOT NULL,
    chap TEXT,
    target TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX exports_by_volume ON exports (volume);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    progress_milli BIGINT NOT NULL,
    target TEXT,
    error TEXT,
    result TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL
);
