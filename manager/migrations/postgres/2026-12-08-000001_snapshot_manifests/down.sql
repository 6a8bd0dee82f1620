DROP TABLE snapshot_manifests;
