-- Protected hosts: each probe registers with its name and initiator identities (IQN, host
-- NQN) and heartbeats; jobs can be queued for a host, which its probe claims and reports on.
CREATE TABLE hosts (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    hostnqn TEXT NOT NULL,
    iqn TEXT NOT NULL,
    version TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    last_heartbeat_ms BIGINT
);
-- A job run by a host's probe names the host and what to do (JSON); such jobs outlive maasd
-- restarts (the probe does the work, not maasd).
ALTER TABLE jobs ADD COLUMN host TEXT;
ALTER TABLE jobs ADD COLUMN params TEXT;
CREATE INDEX jobs_host_state ON jobs (host, state);
