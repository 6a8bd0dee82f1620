#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]
//! The real `maasd` of this package (cargo hands its binary to this package's tests), run by
//! the shared runner of the maas-tests package.

use std::path::Path;

pub use maas_tests::maasd::{Maasd, code, free_port};

pub mod iscsi;

/// This package's `maasd` binary.
pub const MAASD: &str = env!("CARGO_BIN_EXE_maasd");

/// Starting this package's `maasd` the ways its tests need.
pub trait Start {
    /// A server on `dir` with a catalog URL (None: SQLite), advertising `10.0.2.2:3260` in
    /// exports (a configured portal, for the API tests).
    fn start(dir: &Path, catalog_url: Option<String>) -> Maasd;
    /// A server whose iSCSI portal advertises itself (127.0.0.1:port), for host-side clients.
    fn start_local(dir: &Path) -> Maasd;
    /// As [`Start::start_local`], with a pool device of `device_size` bytes (a sparse file).
    fn start_local_with(dir: &Path, device_size: u64) -> Maasd;
}

impl Start for Maasd {
    fn start(dir: &Path, catalog_url: Option<String>) -> Maasd {
        Maasd::builder(MAASD, dir)
            .catalog_url(catalog_url)
            .advertise("10.0.2.2:3260")
            .start()
    }

    fn start_local(dir: &Path) -> Maasd {
        Maasd::builder(MAASD, dir).start()
    }

    fn start_local_with(dir: &Path, device_size: u64) -> Maasd {
        Maasd::builder(MAASD, dir).device_size(device_size).start()
    }
}

/// A PostgreSQL catalog of one test's own: a new schema in the database of
/// `MAAS_TEST_POSTGRES_URL` (set by ./scripts/test-all.sh), as a URL whose `search_path`
/// selects it. A catalog is bound to one pool, so servers with pools of their own never share
/// one (the tests that do share one do so on purpose).
pub fn postgres_catalog() -> String {
    use diesel::{Connection, RunQueryDsl};
    let base = std::env::var("MAAS_TEST_POSTGRES_URL").expect(
        "MAAS_TEST_POSTGRES_URL is not set: ./scripts/test-all.sh starts a local PostgreSQL and sets it",
    );
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut c = diesel::PgConnection::establish(&base).unwrap();
    diesel::sql_query(format!("CREATE SCHEMA {schema}"))
        .execute(&mut c)
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-csearch_path%3D{schema}")
}
