//! Shared helpers for the end-to-end tests under `tests/tests/` (and the manager's tests): the
//! real `maasd` ([`maasd`]), Linux guests with real initiators ([`guest`]), the third-party
//! tools of `scripts/iscsi-peers.sh` ([`peers`]) and a TCP relay that can cut a connection
//! without closing it ([`relay`]).

pub mod bench;
pub mod dmlog;
pub mod guest;
pub mod maasd;
pub mod peers;
pub mod relay;
pub mod s3;

use std::path::Path;

/// A temporary directory for a test, removed when dropped — unless the test is failing
/// (the thread is panicking) and `MAAS_KEEP_TEST_DIRS=1`: then it stays for inspection (guest
/// logs, maasd's log and data) and its path is printed.
#[derive(Debug)]
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    pub fn new(prefix: &str) -> TestDir {
        TestDir(Some(
            tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .unwrap_or_else(|e| panic!("creating a temporary directory: {e}")),
        ))
    }

    pub fn path(&self) -> &Path {
        match &self.0 {
            Some(d) => d.path(),
            None => Path::new("/nonexistent"),
        }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && std::env::var_os("MAAS_KEEP_TEST_DIRS").is_some_and(|v| v == "1")
            && let Some(d) = self.0.take()
        {
            eprintln!("kept for inspection: {}", d.keep().display());
        }
    }
}
