//! Start-up reconciliation of catalog and pool, so that after a crash at any point there are no
//! orphaned and no phantom volumes or snapshots. The pool is the truth about bytes; the catalog
//! about intent. Pool volumes are named by their catalog id.
//!
//! Reconciliation drops catalog rows, so it runs only against the pool the catalog is bound to
//! ([`crate::identity`]): given any other pool it changes nothing and fails, and it never
//! touches rows of another catalog pool id.

use std::collections::{HashMap, HashSet};

use maas_pool::{Pool, SnapshotId};

use actix_web::http::StatusCode;

use crate::catalog::{Catalog, SnapshotRow, VolumeRow};
use crate::error::{ApiError, ApiResult};
use crate::identity::PoolBinding;
use crate::state::{new_id, now_ms};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub volumes_completed: usize,
    pub volumes_dropped: usize,
    pub volumes_adopted: usize,
    pub volumes_deleted: usize,
    pub snapshots_dropped: usize,
    pub snapshots_adopted: usize,
    pub snapshots_deleted: usize,
    /// Archived snapshots whose return to the pool was interrupted after the pool's commit.
    pub snapshots_restored: usize,
}

/// Refuses (POOL_MISMATCH) unless `pool` is the pool `expected` names and the catalog still
/// records that binding.
fn check_identity(cat: &Catalog, pool: &Pool, expected: &PoolBinding) -> ApiResult<()> {
    let mismatch = |m: String| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "POOL_MISMATCH",
            format!("{m}; nothing reconciled"),
        )
    };
    if pool.pool_id().to_string() != expected.uuid {
        return Err(mismatch(format!(
            "expected pool {}, got pool {}",
            expected.uuid,
            pool.pool_id()
        )));
    }
    match cat.pool_binding(&expected.id)? {
        Some(b) if b.uuid == expected.uuid => Ok(()),
        Some(b) => Err(mismatch(format!(
            "the catalog now records pool {} for {:?}, not {}",
            b.uuid, expected.id, expected.uuid
        ))),
        None => Err(mismatch(format!(
            "the catalog records no pool for {:?}",
            expected.id
        ))),
    }
}

pub fn reconcile(cat: &Catalog, pool: &Pool, expected: &PoolBinding) -> ApiResult<Report> {
    check_identity(cat, pool, expected)?;
    let pool_id = expected.id.as_str();
    let mut rep = Report::default();
    let pool_vols: HashMap<String, maas_pool::VolumeInfo> = pool
        .volumes()
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect();
    let mut known: HashSet<String> = HashSet::new();
    // Rows of other catalog pools: never dropped, never adopted over.
    let mut elsewhere: HashSet<String> = HashSet::new();
    for mut row in cat.all_volumes()? {
        if row.pool != pool_id {
            elsewhere.insert(row.id);
            continue;
        }
        let in_pool = pool_vols.get(&row.id);
        match (row.state.as_str(), in_pool) {
            ("deleting", Some(v)) => {
                pool.delete_volume(v.id)?;
                cat.delete_volume_row(&row.id)?;
                rep.volumes_deleted += 1;
                tracing::warn!(volume = %row.id, "reconcile: finished an interrupted delete");
            }
            ("deleting", None) => {
                cat.delete_volume_row(&row.id)?;
                rep.volumes_deleted += 1;
            }
            ("creating", Some(_)) => {
                row.state = "ready".into();
                cat.update_volume(&row)?;
                known.insert(row.id.clone());
                rep.volumes_completed += 1;
                tracing::warn!(volume = %row.id, "reconcile: completed an interrupted create");
            }
            (_, None) => {
                cat.delete_volume_row(&row.id)?;
                rep.volumes_dropped += 1;
                tracing::warn!(volume = %row.id, name = %row.name, "reconcile: dropped a catalog volume the pool does not have");
            }
            (_, Some(_)) => {
                known.insert(row.id.clone());
            }
        }
    }
    for (pname, v) in &pool_vols {
        if known.contains(pname) {
            continue;
        }
        if elsewhere.contains(pname) {
            tracing::warn!(volume = %pname, "reconcile: a pool volume's id belongs to another pool's catalog row; not adopted");
            continue;
        }
        let mut name = pname.clone();
        if cat.volume_by_name(&name)?.is_some() {
            name = format!("{pname}-adopted-{}", v.id.0);
        }
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("maas.adopted".to_string(), "true".to_string());
        cat.insert_volume(&VolumeRow {
            id: pname.clone(),
            name,
            pool: pool_id.into(),
            size: v.size as i64,
            block_size: v.block_size as i64,
            labels: serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into()),
            origin_snapshot: None,
            state: "ready".into(),
            created_ms: v.created_unix * 1000,
        })?;
        rep.volumes_adopted += 1;
        tracing::warn!(volume = %pname, pool_volume = %v.id, "reconcile: adopted a pool volume the catalog did not know");
    }

    let pool_snaps: HashMap<u64, maas_pool::SnapshotInfo> =
        pool.snapshots()?.into_iter().map(|s| (s.id.0, s)).collect();
    let mut known_snaps = HashSet::new();
    // Pool snapshots deleted below (interrupted evictions and deletes finished): gone, so
    // neither adopted nor named by a row.
    let mut deleted_snaps: HashSet<u64> = HashSet::new();
    for row in cat.all_snapshots()? {
        if row.pool != pool_id {
            continue;
        }
        let ps = row.pool_snapshot as u64;
        if row.location == "archive" {
            // Only in archive targets. An eviction interrupted after the catalog moved the
            // snapshot there may have left the pool's copy: finish it.
            if row.pool_snapshot >= 0 && pool_snaps.contains_key(&ps) {
                match pool.delete_snapshot(SnapshotId(ps)) {
                    Ok(()) => {
                        deleted_snaps.insert(ps);
                        tracing::warn!(snapshot = %row.id, "reconcile: finished an interrupted eviction")
                    }
                    Err(e) => {
                        known_snaps.insert(ps);
                        tracing::warn!(snapshot = %row.id, error = %e, "reconcile: an interrupted eviction cannot finish; the local copy stays");
                    }
                }
            }
            if row.state == "deleting" {
                // A delete of its archive copies was interrupted: listed again, to retry.
                let mut r = row.clone();
                r.state = "ready".into();
                cat.update_snapshot(&r)?;
            }
            continue;
        }
        match (row.state.as_str(), pool_snaps.contains_key(&ps)) {
            ("deleting", true) => match pool.delete_snapshot(SnapshotId(ps)) {
                Ok(()) => {
                    deleted_snaps.insert(ps);
                    cat.delete_snapshot_row(&row.id)?;
                    rep.snapshots_deleted += 1;
                }
                Err(e) => {
                    let mut r = row.clone();
                    r.state = "ready".into();
                    cat.update_snapshot(&r)?;
                    known_snaps.insert(ps);
                    tracing::warn!(snapshot = %row.id, error = %e, "reconcile: interrupted delete cannot finish; snapshot kept");
                }
            },
            (_, false) => {
                cat.delete_snapshot_row(&row.id)?;
                rep.snapshots_dropped += 1;
                tracing::warn!(snapshot = %row.id, "reconcile: dropped a catalog snapshot the pool does not have");
            }
            (_, true) => {
                known_snaps.insert(ps);
            }
        }
    }
    for (ps, s) in &pool_snaps {
        if known_snaps.contains(ps) || deleted_snaps.contains(ps) {
            continue;
        }
        // An archived snapshot brought back (rehydrated, or mounted from the archive) whose
        // catalog row was not updated before a crash: finish that, do not adopt a stranger.
        if let Some(origin) = &s.origin
            && let Some(mut row) = cat.snapshot(origin)?
            && row.pool == pool_id
            && row.location == "archive"
            && row.state == "ready"
        {
            row.location = "local".into();
            row.pool_snapshot = *ps as i64;
            cat.update_snapshot(&row)?;
            rep.snapshots_restored += 1;
            tracing::warn!(snapshot = %row.id, pool_snapshot = ps, "reconcile: finished an interrupted rehydrate or mount from the archive");
            continue;
        }
        let vname = cat
            .volume(&s.volume_name)?
            .map(|v| v.name)
            .unwrap_or_else(|| s.volume_name.clone());
        let row = SnapshotRow {
            id: new_id("snap"),
            volume: s.volume_name.clone(),
            volume_name: vname,
            pool: pool_id.into(),
            pool_snapshot: *ps as i64,
            size: s.size as i64,
            block_size: s.block_size as i64,
            starred: 0,
            locked_until_ms: s.locked_until_unix.map(|u| u * 1000),
            state: "ready".into(),
            created_ms: if s.created_unix > 0 {
                s.created_unix * 1000
            } else {
                now_ms()
            },
            location: "local".into(),
        };
        cat.insert_snapshot(&row)?;
        rep.snapshots_adopted += 1;
        tracing::warn!(snapshot = %row.id, pool_snapshot = ps, "reconcile: adopted a pool snapshot the catalog did not know");
    }
    if rep != Report::default() {
        tracing::warn!(?rep, "catalog and pool reconciled");
    } else {
        tracing::info!("catalog and pool agree");
    }
    Ok(rep)
}
