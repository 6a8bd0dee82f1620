ALTER TABLE tokens DROP COLUMN last_used_ms;
ALTER TABLE tokens DROP COLUMN expires_ms;
