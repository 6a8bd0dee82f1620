#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]
//! Third-party iSCSI clients for the tests: libiscsi's tools, QEMU 7.2's iSCSI driver and
//! fio's libiscsi engine, as prepared by `scripts/iscsi-peers.sh`.

pub use maas_tests::maasd::{clone_snapshot, export, seal, volume};
pub use maas_tests::peers::{qemu_img, run_with_timeout, text, tool};
use serde_json::Value;

/// Initiator names libiscsi's test tool uses by default.
pub const TEST_CU_INITIATOR: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test";
pub const TEST_CU_INITIATOR_2: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2";
/// QEMU's default initiator name.
pub const QEMU_INITIATOR: &str = "iqn.2008-11.org.linux-kvm";

/// `iscsi://[user%secret@]portal/target/lun` for an export.
pub fn url(e: &Value, creds: Option<(&str, &str)>) -> String {
    let auth = creds.map(|(u, s)| format!("{u}%{s}@")).unwrap_or_default();
    format!(
        "iscsi://{auth}{}/{}/{}",
        e["portal"].as_str().unwrap(),
        e["target"].as_str().unwrap(),
        e["lun"].as_u64().unwrap()
    )
}

/// QEMU `--image-opts` for an export with a chosen initiator name.
pub fn qemu_opts(e: &Value, initiator: &str) -> String {
    format!(
        "driver=iscsi,transport=tcp,portal={},target={},lun={},initiator-name={}",
        e["portal"].as_str().unwrap(),
        e["target"].as_str().unwrap(),
        e["lun"].as_u64().unwrap(),
        initiator
    )
}
