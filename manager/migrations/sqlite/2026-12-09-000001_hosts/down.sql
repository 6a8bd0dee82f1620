DROP INDEX jobs_host_state;
ALTER TABLE jobs DROP COLUMN params;
ALTER TABLE jobs DROP COLUMN host;
DROP TABLE hosts;
