//! The manager's side of the media engine: turns catalog export rows into live targets.
//!
//! The manager never moves backup bytes itself; it only tells the engine what to export.
//! One logical unit per volume is shared by all of the volume's exports, so SCSI reservations
//! are consistent whichever target an initiator comes through.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

use maas_api as api;
use maas_engine::iscsi::{ChapSecrets, Registry, TargetConfig};
use maas_engine::nvme;
use maas_engine::scsi::{LogicalUnit, LuIdentity};

use crate::catalog::{Catalog, ExportRow};
use crate::error::{ApiError, ApiResult};
use crate::secrets::{self, Vault};

#[derive(Debug)]
pub struct Engine {
    pub iscsi: Arc<Registry>,
    pub nvme: Arc<nvme::Registry>,
    /// (volume id, read-only) -> its logical unit.
    lus: Mutex<HashMap<(String, bool), Weak<LogicalUnit>>>,
    /// Exports of the catalog that could not be brought up, with why (shown by the API).
    failed: Mutex<HashMap<String, api::ExportError>>,
}

/// Error code of an export whose CHAP secrets cannot be read from the catalog.
pub const CHAP_SECRET_UNREADABLE: &str = "CHAP_SECRET_UNREADABLE";
/// Error code of an export whose catalog row cannot be read.
pub const EXPORT_ROW_UNREADABLE: &str = "EXPORT_ROW_UNREADABLE";

impl Engine {
    pub fn new(iscsi_advertise: Option<String>, nvme_advertise: Option<String>) -> Engine {
        Engine {
            iscsi: Arc::new(Registry::new(iscsi_advertise)),
            nvme: Arc::new(nvme::Registry::new(nvme_advertise)),
            lus: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// Brings up every export of the catalog (at start). CHAP secrets still in clear in the
    /// catalog (rows from before encryption) are sealed on the way. An export that cannot come
    /// up stays down, is logged with its id and why, and shows `state: failed` in the API; the
    /// others come up regardless.
    pub fn restore(&self, pool: &maas_pool::Pool, catalog: &Catalog, vault: &Vault) {
        let rows = match catalog.all_exports() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("exports could not be read from the catalog: {e}");
                return;
            }
        };
        let mut sealed_any = false;
        for row in rows {
            if let Some(col) = &row.chap
                && row.protocol != "nvme-tcp"
                && let Ok(opened) = secrets::open_chap(vault, &row.id, col)
                && opened.legacy
            {
                match secrets::seal_chap(vault, &row.id, &opened.chap)
                    .map_err(|e| e.to_string())
                    .and_then(|sealed| {
                        catalog
                            .set_export_chap(&row.id, &sealed)
                            .map_err(|e| e.to_string())
                    }) {
                    Ok(()) => {
                        sealed_any = true;
                        tracing::info!(export = %row.id, key_id = vault.id(), "CHAP secrets of the export encrypted in the catalog (they were in clear)")
                    }
                    Err(e) => {
                        tracing::error!(export = %row.id, "CHAP secrets of the export could not be encrypted in the catalog: {e}")
                    }
                }
            }
            if let Err(e) = self.export(pool, &row, vault) {
                tracing::error!(export = %row.id, volume = %row.volume, code = e.code, "export could not be restored: {}", e.message);
                if let Ok(mut f) = self.failed.lock() {
                    f.insert(
                        row.id.clone(),
                        api::ExportError {
                            code: e.code.to_string(),
                            message: e.message,
                        },
                    );
                }
            }
        }
        if sealed_any && let Err(e) = catalog.checkpoint() {
            tracing::warn!("catalog checkpoint after encrypting CHAP secrets failed: {e}");
        }
    }

    /// Why an export of the catalog is not served, if it is not.
    pub fn failure(&self, export_id: &str) -> Option<api::ExportError> {
        self.failed.lock().ok()?.get(export_id).cloned()
    }

    /// The logical unit of a catalog volume (opened in the pool on first use).
    fn logical_unit(
        &self,
        pool: &maas_pool::Pool,
        volume: &str,
        read_only: bool,
    ) -> ApiResult<Arc<LogicalUnit>> {
        let mut lus = self
            .lus
            .lock()
            .map_err(|_| ApiError::internal("engine lock poisoned"))?;
        let key = (volume.to_string(), read_only);
        if let Some(lu) = lus.get(&key).and_then(Weak::upgrade) {
            return Ok(lu);
        }
        let info = pool.volume_by_name(volume)?;
        let vol = pool.open_volume(info.id)?;
        let mut ident = LuIdentity::from_volume_id(volume);
        ident.read_only = read_only;
        let lu = Arc::new(LogicalUnit::new(Arc::new(vol), ident));
        lus.retain(|_, w| w.strong_count() > 0);
        lus.insert(key, Arc::downgrade(&lu));
        Ok(lu)
    }

    /// Makes an export live. A row whose CHAP secrets or allow-list cannot be read is an
    /// error: the export is never served without them.
    pub fn export(&self, pool: &maas_pool::Pool, row: &ExportRow, vault: &Vault) -> ApiResult<()> {
        let unreadable = |code: &'static str, what: &str, e: &dyn std::fmt::Display| {
            ApiError::new(
                actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
                code,
                format!("export {}: {what} {e}", row.id),
            )
        };
        let initiators: Vec<String> = serde_json::from_str(&row.initiators)
            .map_err(|e| unreadable(EXPORT_ROW_UNREADABLE, "initiator list unreadable:", &e))?;
        match row.protocol.as_str() {
            "iscsi" => {
                let chap = match row.chap.as_deref() {
                    None => None,
                    Some(col) => {
                        let c = secrets::open_chap(vault, &row.id, col)
                            .map_err(|e| unreadable(CHAP_SECRET_UNREADABLE, "CHAP secrets", &e))?
                            .chap;
                        Some(ChapSecrets {
                            user: c.user,
                            secret: c.secret,
                            mutual: c.mutual_user.zip(c.mutual_secret),
                        })
                    }
                };
                let lu = self.logical_unit(pool, &row.volume, row.read_only != 0)?;
                let mut luns = BTreeMap::new();
                luns.insert(0, lu);
                self.iscsi.add(TargetConfig {
                    name: row.target.clone(),
                    alias: Some(format!("maas {}", row.volume)),
                    initiators,
                    chap,
                    luns,
                });
                tracing::info!(export = %row.id, target = %row.target, volume = %row.volume, "iSCSI target live");
                Ok(())
            }
            "nvme-tcp" => {
                let info = pool.volume_by_name(&row.volume)?;
                let vol = pool.open_volume(info.id)?;
                let ns = nvme::Namespace::new(
                    Arc::new(vol),
                    row.read_only != 0,
                    nvme::NamespaceIdentity::from_volume_id(&row.volume),
                );
                let mut namespaces = BTreeMap::new();
                namespaces.insert(1, Arc::new(ns));
                // Fail closed: secrets that no longer parse keep the export down rather than
                // open.
                let dhchap = match row.chap.as_deref() {
                    None => None,
                    Some(c) => {
                        let d = secrets::open_dhchap(vault, &row.id, c).map_err(|e| {
                            unreadable(CHAP_SECRET_UNREADABLE, "DH-HMAC-CHAP secrets", &e)
                        })?;
                        let cfg = dhchap_config(&d).map_err(|(_, why)| {
                            ApiError::internal(format!("the export's DH-HMAC-CHAP settings: {why}"))
                        })?;
                        Some(Arc::new(cfg))
                    }
                };
                self.nvme.add(nvme::SubsystemConfig {
                    nqn: row.target.clone(),
                    hosts: initiators,
                    namespaces,
                    serial: nvme_serial(&row.id),
                    model: "MaaS mosaic volume".to_string(),
                    dhchap,
                });
                tracing::info!(export = %row.id, subnqn = %row.target, volume = %row.volume, "NVMe/TCP subsystem live");
                Ok(())
            }
            // Refused at creation (validate_export); a row from a newer build is kept as is.
            _ => Ok(()),
        }
    }

    /// A volume under an export grew.
    pub fn volume_resized(&self, row: &ExportRow) {
        if row.protocol == "nvme-tcp" {
            self.nvme.namespace_changed(&row.target, 1);
        }
    }

    /// Ends an export: its sessions are asked to log out, then dropped.
    pub fn unexport(&self, row: &ExportRow) {
        if let Ok(mut f) = self.failed.lock() {
            f.remove(&row.id);
        }
        if row.protocol == "iscsi" && self.iscsi.remove(&row.target) {
            tracing::info!(export = %row.id, target = %row.target, "iSCSI target removed");
        }
        if row.protocol == "nvme-tcp" && self.nvme.remove(&row.target) {
            tracing::info!(export = %row.id, subnqn = %row.target, "NVMe/TCP subsystem removed");
        }
    }
}

/// The engine's DH-HMAC-CHAP settings from the API's; Err((field, why)) for what is invalid.
pub fn dhchap_config(d: &api::DhChap) -> Result<nvme::auth::DhchapConfig, (&'static str, String)> {
    use nvme::auth::{DhGroup, DhchapConfig, HashId, Secret};
    let host = Secret::parse(&d.host_secret).map_err(|e| {
        (
            "dhchap.host_secret",
            format!("{e} (make one with nvme gen-dhchap-key)"),
        )
    })?;
    let ctrl = match &d.ctrl_secret {
        None => None,
        Some(s) => {
            let c = Secret::parse(s).map_err(|e| ("dhchap.ctrl_secret", e.to_string()))?;
            if c == host {
                return Err((
                    "dhchap.ctrl_secret",
                    "the controller secret must differ from the host secret".into(),
                ));
            }
            Some(c)
        }
    };
    let mut cfg = DhchapConfig::new(host, ctrl);
    if let Some(h) = &d.hash {
        cfg.hashes =
            vec![HashId::parse(h).ok_or(("dhchap.hash", "sha256, sha384 or sha512".to_string()))?];
    }
    if let Some(g) = &d.dhgroup {
        cfg.dhgroups = vec![DhGroup::parse(g).ok_or((
            "dhchap.dhgroup",
            "null, ffdhe2048, ffdhe3072, ffdhe4096, ffdhe6144 or ffdhe8192".to_string(),
        ))?];
    }
    Ok(cfg)
}

/// Identify Controller serial number of an export's subsystem: the export id, which is unique,
/// as long as it fits the 20 characters, else its tail.
fn nvme_serial(export_id: &str) -> String {
    let n = export_id.len();
    export_id[n.saturating_sub(20)..].to_string()
}
