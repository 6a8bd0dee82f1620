ALTER TABLE archive_targets DROP COLUMN key_id;
ALTER TABLE archive_targets DROP COLUMN archive_key;
