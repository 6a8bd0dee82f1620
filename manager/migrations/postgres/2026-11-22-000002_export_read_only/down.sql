ALTER TABLE exports DROP COLUMN read_only;
