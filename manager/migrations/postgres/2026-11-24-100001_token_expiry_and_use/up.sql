-- Tokens may expire (NULL: never); a token used after expires_ms is refused (TOKEN_EXPIRED).
-- last_used_ms: the latest request made with the token, as maasd last flushed it (it records
-- uses in memory and writes them at most once a minute, and at a clean stop).
ALTER TABLE tokens ADD COLUMN expires_ms BIGINT;
ALTER TABLE tokens ADD COLUMN last_used_ms BIGINT;
