#![allow(dead_code)]
//! What the archive tier's integration tests share: a target on a test S3 server, and
//! deterministic data.

use maas_s3::TargetConfig;
use maas_tests::s3::{ACCESS_KEY, S3Server, SECRET_KEY};

pub const MIB: usize = 1 << 20;

/// A plain target on `s3`'s `bucket` under `prefix` ("" or ending in '/').
pub fn target_config(s3: &S3Server, bucket: &str, prefix: &str) -> TargetConfig {
    TargetConfig {
        endpoint: s3.endpoint(),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        prefix: prefix.into(),
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: SECRET_KEY.into(),
        path_style: true,
        storage_class: None,
        object_lock: None,
        cipher: None,
    }
}

/// Deterministic data, per MiB in turn: random, repeated text, zeroes.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    for (i, m) in v.chunks_mut(MIB).enumerate() {
        match i % 3 {
            0 => r.fill(m),
            1 => {
                let line = format!("{seed} text {i} lorem ipsum dolor\n");
                for (j, b) in m.iter_mut().enumerate() {
                    *b = line.as_bytes()[j % line.len()];
                }
            }
            _ => {} // zeroes
        }
    }
    v
}
