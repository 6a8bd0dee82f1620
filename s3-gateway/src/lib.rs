//! maas-s3: the archive tier (snapshots pushed to and served from S3 buckets) and an
//! S3-compatible endpoint over the pool. Arrives with its issue.
