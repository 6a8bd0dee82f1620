-- Client-side encryption of archive targets: the archive key sealed by the catalog's vault
-- (bound to the target id) and the key's id (which reveals nothing of it). NULL: the target
-- does not encrypt.
ALTER TABLE archive_targets ADD COLUMN archive_key TEXT;
ALTER TABLE archive_targets ADD COLUMN key_id TEXT;
