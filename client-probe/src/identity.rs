//! This host as MaaS knows it: a name, an NVMe host NQN and host id, an iSCSI initiator name,
//! made once and kept in `STATE/identity.json`, so every export the probe asks for allows this
//! host and no other, and the same host is recognised across restarts.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    pub hostnqn: String,
    /// 32 hex digits.
    pub hostid: String,
    pub iqn: String,
}

impl Identity {
    pub fn hostid_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        if let Ok(v) = hex_decode(&self.hostid)
            && v.len() == 16
        {
            out.copy_from_slice(&v);
        }
        out
    }

    /// Loads the host's identity, making it on first use (named `name`, else the host name).
    pub fn load_or_create(state: &Path, name: Option<&str>) -> std::io::Result<Identity> {
        let path = state.join("identity.json");
        if let Ok(bytes) = std::fs::read(&path) {
            let id: Identity = serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::other(format!("{} is damaged: {e}", path.display()))
            })?;
            return Ok(id);
        }
        std::fs::create_dir_all(state)?;
        let uuid = uuid::Uuid::new_v4();
        let name = name
            .map(str::to_string)
            .or_else(hostname)
            .unwrap_or_else(|| format!("host-{}", &uuid.simple().to_string()[..8]));
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let id = Identity {
            name,
            hostnqn: format!("nqn.2014-08.org.nvmexpress:uuid:{uuid}"),
            hostid: uuid.simple().to_string(),
            iqn: format!("iqn.2026-12.io.maas.probe:{safe}"),
        };
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&id).unwrap_or_default())?;
        std::fs::rename(&tmp, &path)?;
        Ok(id)
    }
}

fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.to_string())
}

fn hex_decode(s: &str) -> Result<Vec<u8>, ()> {
    if s.len() % 2 != 0 {
        return Err(());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).ok_or(())?, 16).map_err(|_| ()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_made_once_and_kept() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = Identity::load_or_create(d.path(), Some("Web 01")).expect("create");
        let b = Identity::load_or_create(d.path(), Some("other")).expect("load");
        assert_eq!(a.hostnqn, b.hostnqn);
        assert_eq!(b.name, "Web 01");
        assert_eq!(a.iqn, "iqn.2026-12.io.maas.probe:web-01");
        assert_eq!(a.hostid_bytes().len(), 16);
        assert_ne!(a.hostid_bytes(), [0u8; 16]);
    }
}
