DROP TABLE tokens;
DROP TABLE jobs;
DROP TABLE exports;
DROP TABLE snapshots;
DROP TABLE volumes;
