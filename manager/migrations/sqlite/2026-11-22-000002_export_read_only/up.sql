-- Read-only exports: the LU reports write protection (mounting a snapshot clone for restore).
ALTER TABLE exports ADD COLUMN read_only BIGINT NOT NULL DEFAULT 0;
