ALTER TABLE snapshots DROP COLUMN location;
ALTER TABLE jobs DROP COLUMN progress_detail;
DROP TABLE snapshot_archives;
DROP TABLE archive_targets;
