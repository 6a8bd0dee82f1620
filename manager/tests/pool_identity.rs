#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The catalog is bound to its pool's UUID: the real maasd refuses to start when the pool is
//! missing (a disk not mounted) or another one, and leaves the catalog as it was; a new pool in
//! place of the catalog's needs `--create-pool`; an upgraded catalog adopts the pool it finds.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use maas_manager::catalog::Catalog;
use maas_manager::identity::ObjectCounts;
use maas_tests::maasd::{self as rt, StartRefused};
use serde_json::{Value, json};

/// Volumes, exports (with CHAP), snapshots and a clone.
fn populate(m: &Maasd) {
    let db = rt::volume(m, "db", 1 << 30, 512);
    let files = rt::volume(m, "files", 1 << 30, 4096);
    rt::export(
        m,
        &db,
        &["iqn.2005-03.org.open-iscsi:host1"],
        Some(json!({"user": "host1", "secret": "0123456789abcdef"})),
    );
    rt::export(m, &files, &["iqn.2005-03.org.open-iscsi:host2"], None);
    rt::seal(m, &db);
    let s = rt::seal(m, &db);
    rt::seal(m, &files);
    rt::clone_snapshot(m, &s, "db-restore");
}

/// Everything the API shows of the catalog: volumes, each with its snapshots and exports.
fn everything(m: &Maasd) -> Value {
    let vols = m.ok("GET", "/volumes?limit=1000", None)["items"].clone();
    let mut out = Vec::new();
    for v in vols.as_array().unwrap() {
        let id = v["id"].as_str().unwrap();
        out.push(json!({
            "volume": v,
            "snapshots": m.ok("GET", &format!("/volumes/{id}/snapshots?limit=1000"), None)["items"],
            "exports": m.ok("GET", &format!("/volumes/{id}/exports?limit=1000"), None)["items"],
        }));
    }
    Value::Array(out)
}

fn pool_dir(m: &Maasd) -> PathBuf {
    m.dir.join("data/pool")
}

fn pool_uuid(dir: &Path) -> String {
    maas_pool::config::Superblock::load(dir)
        .unwrap()
        .pool_id
        .to_string()
}

fn sqlite_counts(m: &Maasd) -> ObjectCounts {
    let cat = Catalog::open(&m.dir.join("data/catalog.sqlite").display().to_string()).unwrap();
    cat.object_counts().unwrap()
}

fn refused(m: &mut Maasd, args: &[&str]) -> StartRefused {
    match m.try_start_again(args) {
        Ok(()) => {
            let state = everything(m);
            m.stop();
            panic!("maasd started (args {args:?}); it served {state}");
        }
        Err(r) => {
            assert!(!r.status.success(), "{}", r.log);
            r
        }
    }
}

/// The check of both catalogs: SQLite and PostgreSQL.
fn missing_pool_is_refused(catalog_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start(dir.path(), catalog_url);
    populate(&m);
    let before = everything(&m);
    assert_eq!(before.as_array().unwrap().len(), 3);
    let uuid = pool_uuid(&pool_dir(&m));
    m.stop();

    // The pool's disk is not mounted: its mount point is an empty directory.
    let disk = dir.path().join("disk");
    std::fs::rename(pool_dir(&m), &disk).unwrap();
    std::fs::create_dir(pool_dir(&m)).unwrap();
    let r = refused(&mut m, &[]);
    let path = pool_dir(&m).display().to_string();
    assert!(
        r.log.contains(&format!("expects pool {uuid} at {path}")) && r.log.contains("no pool"),
        "{}",
        r.log
    );
    assert!(
        r.log.contains("3 volumes, 3 snapshots and 2 exports"),
        "{}",
        r.log
    );
    assert_eq!(
        std::fs::read_dir(pool_dir(&m)).unwrap().count(),
        0,
        "nothing was created on the mount point"
    );
    // The directory itself is missing.
    std::fs::remove_dir(pool_dir(&m)).unwrap();
    let r = refused(&mut m, &[]);
    assert!(r.log.contains(&uuid), "{}", r.log);
    assert!(!pool_dir(&m).exists(), "no pool was created");

    // The disk is back: everything is there, as it was, nothing dropped or adopted.
    std::fs::rename(&disk, pool_dir(&m)).unwrap();
    m.start_again();
    assert_eq!(everything(&m), before);
    let p = m.ok("GET", "/pools/default", None);
    assert_eq!(
        (p["volumes"].as_u64(), p["snapshots"].as_u64()),
        (Some(3), Some(3))
    );
    let log = m.log();
    assert!(
        !log.contains("dropped a catalog") && !log.contains("adopted a pool"),
        "{log}"
    );
    m.stop();
}

#[test]
fn a_missing_pool_is_refused_and_the_catalog_kept() {
    missing_pool_is_refused(None);
}

#[test]
fn a_missing_pool_is_refused_and_the_catalog_kept_on_postgresql() {
    missing_pool_is_refused(Some(postgres_catalog()));
}

/// Two nodes on one PostgreSQL catalog: a node started without the catalog's pool (another
/// machine, a disk not mounted) is refused and the first node's catalog stays whole.
#[test]
fn a_node_without_the_pool_cannot_empty_a_shared_catalog() {
    let url = postgres_catalog();
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start(dir.path(), Some(url.clone()));
    populate(&m);
    let before = everything(&m);
    let uuid = pool_uuid(&pool_dir(&m));
    m.stop();
    let other = tempfile::tempdir().unwrap();
    let r = Maasd::builder(MAASD, other.path())
        .catalog_url(Some(url))
        .try_start(&[])
        .unwrap_err();
    assert!(!r.status.success());
    assert!(
        r.log.contains(&format!(
            "expects pool {uuid} at {}",
            other.path().join("data/pool").display()
        )) && r
            .log
            .contains(&format!("last opened at {}", pool_dir(&m).display())),
        "{}",
        r.log
    );
    m.start_again();
    assert_eq!(everything(&m), before);
    m.stop();
}

#[test]
fn another_pool_in_place_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start_local(dir.path());
    populate(&m);
    let before = everything(&m);
    let uuid = pool_uuid(&pool_dir(&m));
    m.stop();
    let ours = dir.path().join("ours");
    std::fs::rename(pool_dir(&m), &ours).unwrap();
    let foreign = maas_pool::Pool::create(
        &pool_dir(&m),
        maas_pool::CreateOptions {
            chunk_size: 256 << 10,
            devices: vec![maas_pool::DeviceSpec {
                path: "data-0.dev".into(),
                tier: maas_pool::Tier::Ssd,
                size: 64 << 20,
            }],
            ..Default::default()
        },
        maas_pool::OpenOptions::default(),
    )
    .unwrap();
    let theirs = foreign.pool_id().to_string();
    foreign.close().unwrap();
    // Refused, and --create-pool never replaces a pool either.
    for args in [&[][..], &["--create-pool"][..]] {
        let r = refused(&mut m, args);
        assert!(
            r.log.contains(&format!("expects pool {uuid}"))
                && r.log.contains(&format!("holds another pool, {theirs}")),
            "{args:?}: {}",
            r.log
        );
        assert_eq!(
            pool_uuid(&pool_dir(&m)),
            theirs,
            "the other pool is untouched"
        );
    }
    assert_eq!(
        sqlite_counts(&m),
        ObjectCounts {
            volumes: 3,
            snapshots: 3,
            exports: 2
        }
    );
    std::fs::remove_dir_all(pool_dir(&m)).unwrap();
    std::fs::rename(&ours, pool_dir(&m)).unwrap();
    m.start_again();
    assert_eq!(everything(&m), before);
    m.stop();
}

#[test]
fn create_pool_flag_starts_over_deliberately_and_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start_local(dir.path());
    populate(&m);
    let old = pool_uuid(&pool_dir(&m));
    m.stop();
    // The pool is lost for good.
    std::fs::remove_dir_all(pool_dir(&m)).unwrap();
    let r = refused(&mut m, &[]);
    assert!(r.log.contains("--create-pool"), "{}", r.log);
    m.try_start_again(&["--create-pool"]).unwrap();
    let new = pool_uuid(&pool_dir(&m));
    assert_ne!(new, old);
    assert_eq!(
        everything(&m),
        json!([]),
        "the lost pool's objects are gone"
    );
    let log = m.log();
    assert!(
        log.contains("creating a new pool in place of the one the catalog names"),
        "{log}"
    );
    // The new pool works and is the catalog's from now on, without the flag.
    let v = rt::volume(&m, "fresh", 1 << 30, 512);
    m.restart();
    assert_eq!(m.ok("GET", &format!("/volumes/{v}"), None)["name"], "fresh");
    m.stop();
    // The flag is for one start: given again, with the pool there, it is refused.
    let r = refused(&mut m, &["--create-pool"]);
    assert!(
        r.log.contains(&format!("already holds pool {new}")),
        "{}",
        r.log
    );
    assert_eq!(pool_uuid(&pool_dir(&m)), new);
    m.start_again();
    assert_eq!(everything(&m).as_array().unwrap().len(), 1);
    m.stop();
}

/// A catalog from before pool identities (its `pools` table empty) with its pool present
/// adopts that pool; without it, the start is refused since the catalog describes objects.
#[test]
fn an_upgraded_catalog_adopts_its_pool_then_holds_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Maasd::start_local(dir.path());
    populate(&m);
    let before = everything(&m);
    let uuid = pool_uuid(&pool_dir(&m));
    m.stop();
    let forget = || {
        use diesel::RunQueryDsl;
        let cat = Catalog::open(&m.dir.join("data/catalog.sqlite").display().to_string()).unwrap();
        cat.with(|c| Ok(diesel::sql_query("DELETE FROM pools").execute(c)?))
            .unwrap();
    };
    forget();
    let disk = dir.path().join("disk");
    std::fs::rename(pool_dir(&m), &disk).unwrap();
    let r = refused(&mut m, &[]);
    assert!(
        r.log
            .contains("the catalog holds 3 volumes, 3 snapshots and 2 exports but no pool"),
        "{}",
        r.log
    );
    assert!(!pool_dir(&m).exists());
    std::fs::rename(&disk, pool_dir(&m)).unwrap();
    m.start_again();
    assert_eq!(everything(&m), before);
    assert!(m.log().contains("catalog bound to pool"), "{}", m.log());
    m.stop();
    let cat = Catalog::open(&m.dir.join("data/catalog.sqlite").display().to_string()).unwrap();
    assert_eq!(cat.pool_binding("default").unwrap().unwrap().uuid, uuid);
    drop(cat);
    // From now on the catalog names its pool.
    std::fs::rename(pool_dir(&m), &disk).unwrap();
    let r = refused(&mut m, &[]);
    assert!(r.log.contains(&format!("expects pool {uuid}")), "{}", r.log);
}

/// Defence in depth: reconciliation given a pool other than the catalog's changes nothing.
#[test]
fn reconcile_refuses_a_pool_that_is_not_the_catalogs() {
    use maas_manager::catalog::VolumeRow;
    use maas_manager::identity::PoolBinding;
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open(&dir.path().join("c.sqlite").display().to_string()).unwrap();
    let create = |name: &str| {
        maas_pool::Pool::create(
            &dir.path().join(name),
            maas_pool::CreateOptions {
                chunk_size: 256 << 10,
                devices: vec![maas_pool::DeviceSpec {
                    path: "data-0.dev".into(),
                    tier: maas_pool::Tier::Ssd,
                    size: 64 << 20,
                }],
                ..Default::default()
            },
            maas_pool::OpenOptions::default(),
        )
        .unwrap()
    };
    let (ours, theirs) = (create("ours"), create("theirs"));
    let binding = |p: &maas_pool::Pool| PoolBinding {
        id: "default".into(),
        uuid: p.pool_id().to_string(),
        path: "x".into(),
        bound_ms: 0,
    };
    assert!(cat.swap_pool_binding(None, &binding(&ours)).unwrap());
    cat.insert_volume(&VolumeRow {
        id: "vol-1".into(),
        name: "v".into(),
        pool: "default".into(),
        size: 1 << 20,
        block_size: 512,
        labels: "{}".into(),
        origin_snapshot: None,
        state: "ready".into(),
        created_ms: 0,
    })
    .unwrap();
    // The pool handed over is not the one expected, or the catalog names another.
    for (pool, expected) in [(&theirs, binding(&ours)), (&theirs, binding(&theirs))] {
        let e = maas_manager::reconcile::reconcile(&cat, pool, &expected).unwrap_err();
        assert_eq!(e.code, "POOL_MISMATCH", "{e}");
        assert_eq!(cat.all_volumes().unwrap().len(), 1, "nothing dropped");
    }
    // The right pool: the phantom volume goes.
    maas_manager::reconcile::reconcile(&cat, &ours, &binding(&ours)).unwrap();
    assert!(cat.all_volumes().unwrap().is_empty());
    ours.close().unwrap();
    theirs.close().unwrap();
}
