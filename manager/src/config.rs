//! maasd's settings: embedded defaults, then a TOML file (`--config`), then environment
//! variables `MAAS_<SECTION>_<KEY>` (e.g. `MAAS_API_LISTEN`), then command-line flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub data: DataConfig,
    pub api: ApiConfig,
    pub catalog: CatalogConfig,
    pub pool: PoolConfig,
    pub iscsi: IscsiConfig,
    pub nvme_tcp: NvmeTcpConfig,
    pub engine: EngineConfig,
    pub log: LogConfig,
}

/// How the block targets (iSCSI, NVMe/TCP) run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Threads serving the block targets' connections, each a single-threaded runtime with
    /// its own io_uring; 0 = one per core.
    pub io_threads: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub dir: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: String,
    pub workers: u64,
    /// Serve HTTPS (true) or plain HTTP.
    pub tls: bool,
    /// PEM certificate chain (end-entity first); empty = the generated self-signed one.
    pub tls_cert_file: PathBuf,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: PathBuf,
}

#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogConfig {
    pub url: String,
    pub secret_key_file: PathBuf,
}

/// A PostgreSQL URL may carry a password: shown without it.
impl std::fmt::Debug for CatalogConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogConfig")
            .field("url", &crate::catalog::redact(&self.url))
            .field("secret_key_file", &self.secret_key_file)
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    pub chunk_size: u64,
    pub device_size: u64,
    pub cache_bytes: RamSize,
    pub log_cache_bytes: RamSize,
    pub write_buffer_bytes: RamSize,
    pub write_back_delay_ms: u64,
    pub wal_segment_bytes: u64,
    pub wal_fold_threshold: u64,
}

/// The size of a part of the RAM tier: `"auto"` (sized from the machine's memory, and given
/// back under memory pressure: see `maas_pool::ramtier`) or a fixed number of bytes (0 = off).
/// In TOML and in `MAAS_POOL_*` variables: `"auto"` or an integer (a string of digits too).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RamSize {
    #[default]
    Auto,
    Bytes(u64),
}

impl RamSize {
    /// The fixed size, if one was set.
    pub fn fixed(self) -> Option<u64> {
        match self {
            RamSize::Auto => None,
            RamSize::Bytes(b) => Some(b),
        }
    }
}

impl Serialize for RamSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RamSize::Auto => s.serialize_str("auto"),
            RamSize::Bytes(b) => s.serialize_u64(*b),
        }
    }
}

impl<'de> Deserialize<'de> for RamSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RamSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"auto\" or a size in bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RamSize, E> {
                Ok(RamSize::Bytes(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RamSize, E> {
                u64::try_from(v)
                    .map(RamSize::Bytes)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RamSize, E> {
                let v = v.trim();
                if v.eq_ignore_ascii_case("auto") {
                    return Ok(RamSize::Auto);
                }
                v.parse().map(RamSize::Bytes).map_err(|_| {
                    E::custom(format!("{v:?} is neither \"auto\" nor a size in bytes"))
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Where a block target listens and what address it gives clients.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PortalConfig {
    pub listen: String,
    pub advertise: String,
}

macro_rules! portal_section {
    ($name:ident, $listen:expr, $per_source:expr, $handshake:ident, $handshake_ms:expr) => {
        #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            pub listen: String,
            pub advertise: String,
            pub max_connections: u64,
            pub max_connections_per_source: u64,
            pub $handshake: u64,
            pub in_flight_bytes: u64,
            pub write_stall_timeout_ms: u64,
        }
        impl Default for $name {
            fn default() -> Self {
                $name {
                    listen: $listen.into(),
                    advertise: String::new(),
                    max_connections: 1024,
                    max_connections_per_source: $per_source,
                    $handshake: $handshake_ms,
                    in_flight_bytes: maas_engine::flow::Budget::DEFAULT_BYTES as u64,
                    write_stall_timeout_ms: maas_engine::flow::Budget::DEFAULT_WRITE_STALL
                        .as_millis() as u64,
                }
            }
        }
        impl $name {
            pub fn portal(&self) -> PortalConfig {
                PortalConfig {
                    listen: self.listen.clone(),
                    advertise: self.advertise.clone(),
                }
            }

            /// What the target's listener admits and each connection may hold.
            pub fn limits(&self) -> maas_engine::listener::Limits {
                maas_engine::listener::Limits {
                    max_connections: self.max_connections as usize,
                    max_connections_per_source: self.max_connections_per_source as usize,
                    handshake_timeout: std::time::Duration::from_millis(self.$handshake),
                    in_flight_bytes: self.in_flight_bytes as usize,
                    write_stall_timeout: std::time::Duration::from_millis(
                        self.write_stall_timeout_ms,
                    ),
                }
            }

            /// (key, value) of the limits, for validation.
            fn limit_settings(&self) -> [(&'static str, u64, u64); 5] {
                [
                    ("max_connections", self.max_connections, 1),
                    (
                        "max_connections_per_source",
                        self.max_connections_per_source,
                        1,
                    ),
                    (stringify!($handshake), self.$handshake, 100),
                    ("in_flight_bytes", self.in_flight_bytes, 64 << 10),
                    ("write_stall_timeout_ms", self.write_stall_timeout_ms, 1000),
                ]
            }
        }
    };
}
// An iSCSI host opens one connection per session (per export it logs into); an NVMe/TCP host
// one per queue (an admin queue and up to 64 I/O queues per controller, one controller per
// export).
portal_section!(IscsiConfig, "0.0.0.0:3260", 64, login_timeout_ms, 15_000);
portal_section!(NvmeTcpConfig, "0.0.0.0:4420", 256, icreq_timeout_ms, 10_000);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: String,
    pub level: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dir: PathBuf::from("./maas-data"),
        }
    }
}
impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8080".into(),
            workers: 0,
            tls: true,
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
        }
    }
}
impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            chunk_size: 1 << 20,
            device_size: 0,
            cache_bytes: RamSize::Auto,
            log_cache_bytes: RamSize::Auto,
            write_buffer_bytes: RamSize::Auto,
            write_back_delay_ms: 5000,
            wal_segment_bytes: 64 << 20,
            wal_fold_threshold: 2 << 30,
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "human".into(),
            level: "info".into(),
        }
    }
}

/// One line of documentation per setting, printed by `--print-default-config`.
pub const DOCS: &[(&str, &str, &str)] = &[
    ("data", "", "Where maasd keeps its state."),
    (
        "data",
        "dir",
        "Data directory: pool, catalog (SQLite), admin.token.",
    ),
    ("api", "", "The REST API (/api/v1) and web console."),
    ("api", "listen", "host:port of the REST API."),
    ("api", "workers", "HTTP worker threads; 0 = one per core."),
    (
        "api",
        "tls",
        "Serve the API over HTTPS (rustls). With no certificate configured, maasd generates a \
         self-signed one at its first start (DATA_DIR/tls/api-cert.pem and its key api-key.pem, \
         both 0600; names: localhost, 127.0.0.1, ::1, the host name and the listen IP), reuses it \
         and logs its SHA-256 fingerprint at every start: clients trust it with \
         `maasctl --ca-cert DATA_DIR/tls/api-cert.pem` (or `curl --cacert`) or pin it with \
         `maasctl --fingerprint`. Delete DATA_DIR/tls to make a new one. false = plain HTTP, \
         for a TLS-terminating proxy in front on loopback; beyond loopback maasd then logs a \
         warning at every start.",
    ),
    (
        "api",
        "tls_cert_file",
        "PEM certificate chain to serve (end-entity first), e.g. from your CA or ACME client; \
         empty = the generated self-signed certificate. Needs tls_key_file.",
    ),
    (
        "api",
        "tls_key_file",
        "PEM private key (PKCS#8, PKCS#1 or SEC1) of tls_cert_file; keep it mode 0600.",
    ),
    (
        "catalog",
        "",
        "The catalog of volumes, snapshots, exports, jobs and tokens.",
    ),
    (
        "catalog",
        "url",
        "Empty = SQLite at DATA_DIR/catalog.sqlite; or postgres://user:pass@host/db.",
    ),
    (
        "catalog",
        "secret_key_file",
        "Key that encrypts the CHAP secrets in the catalog (created, mode 0600, if missing; \
         keep it with catalog backups; every manager of one catalog needs the same). \
         Empty = DATA_DIR/catalog.key.",
    ),
    (
        "pool",
        "",
        "The storage pool, created under DATA_DIR/pool on first start. The catalog records its \
         UUID: a later start without that pool (a disk not mounted) or with another one is \
         refused; `maasd --create-pool` (a flag, never a setting) starts over with a new pool.",
    ),
    (
        "pool",
        "chunk_size",
        "Chunk size in bytes for a new pool (power of two, 64 KiB..4 MiB).",
    ),
    (
        "pool",
        "device_size",
        "Size of the pool's data file on first start; 0 = the filesystem's free space (sparse).",
    ),
    (
        "pool",
        "cache_bytes",
        "RAM tier: decompressed chunk cache, in bytes (0 = off), or \"auto\". The RAM tier \
         sizes itself like the page cache: its \"auto\" parts share up to half of the \
         machine's memory (at least 64 MiB, at most 64 GiB; chunk cache 5, log cache 2, write \
         buffer 1 share, the write buffer at most 1 GiB), never more at start than is \
         available above 20% of it. Every second maasd reads /proc/meminfo and \
         /proc/pressure/memory: below 10% of memory available (or PSI some avg10 above 10) \
         the RAM tier gives memory back at once (caches evict; the write buffer goes to the \
         device, never dropped), and above 20% it grows back by 1/32 of its maximum a second. \
         Under a cgroup memory limit (a container, systemd MemoryMax=) the limit counts as \
         the machine's memory and what the cgroup has left as available. A number fixes a \
         part's size: it is never shrunk.",
    ),
    (
        "pool",
        "log_cache_bytes",
        "RAM tier: recently written blocks kept in memory for reads, in bytes (0 = off), or \
         \"auto\" (see cache_bytes).",
    ),
    (
        "pool",
        "write_buffer_bytes",
        "RAM tier: written blocks held in memory before they go to the write-ahead log's \
         device; rewrites replace them in place. A flush (SYNCHRONIZE CACHE, NVMe Flush, FUA) \
         writes them at once. In bytes (0 = write every batch as it closes), or \"auto\" (see \
         cache_bytes).",
    ),
    (
        "pool",
        "write_back_delay_ms",
        "Longest a written block waits in the write buffer before it goes to the device.",
    ),
    (
        "pool",
        "wal_segment_bytes",
        "Size of one write-ahead-log segment.",
    ),
    (
        "pool",
        "wal_fold_threshold",
        "Fold live data into sealed chunks once the WAL holds this much (not counting segments whose blocks were all overwritten: the cleaner frees those without a fold). As much freed log space stays written on a file device for the next segments (given back if the filesystem fills).",
    ),
    ("iscsi", "", "The iSCSI target."),
    ("iscsi", "listen", "host:port the iSCSI target listens on."),
    (
        "iscsi",
        "advertise",
        "Portal given to clients (exports, SendTargets); empty = listen, with 0.0.0.0 as 127.0.0.1.",
    ),
    (
        "iscsi",
        "max_connections",
        "Connections the iSCSI target holds at once; more are closed at accept (logged at \
         warn, at most every 10 s). Keep below the open files limit (maasd raises its soft \
         limit to the hard one).",
    ),
    (
        "iscsi",
        "max_connections_per_source",
        "Connections the iSCSI target holds at once from one address (IPv6: one /64).",
    ),
    (
        "iscsi",
        "login_timeout_ms",
        "A connection whose login is not complete this long after accept is closed.",
    ),
    (
        "iscsi",
        "in_flight_bytes",
        "Bytes one connection may have in flight: output waiting for the initiator plus the \
         data of its running commands. Over it, the target stops reading the connection's \
         commands until the initiator reads.",
    ),
    (
        "iscsi",
        "write_stall_timeout_ms",
        "A connection whose initiator reads none of the output waiting for it this long is \
         closed (in_flight_bytes bounds what it holds meanwhile).",
    ),
    ("nvme_tcp", "", "The NVMe/TCP target."),
    (
        "nvme_tcp",
        "listen",
        "host:port the NVMe/TCP target listens on.",
    ),
    (
        "nvme_tcp",
        "advertise",
        "Address given to hosts; empty = listen, with 0.0.0.0 as 127.0.0.1.",
    ),
    (
        "nvme_tcp",
        "max_connections",
        "Connections (queues) the NVMe/TCP target holds at once; more are closed at accept \
         (logged at warn, at most every 10 s). Keep below the open files limit.",
    ),
    (
        "nvme_tcp",
        "max_connections_per_source",
        "Connections the NVMe/TCP target holds at once from one address (IPv6: one /64); a \
         host opens one per queue: an admin queue and up to 64 I/O queues per controller.",
    ),
    (
        "nvme_tcp",
        "icreq_timeout_ms",
        "A connection that has not sent its ICReq this long after accept is closed.",
    ),
    (
        "nvme_tcp",
        "in_flight_bytes",
        "Bytes one connection may have in flight: output waiting for the host plus the data \
         of its running commands. Over it, the target stops reading the queue's commands \
         until the host reads.",
    ),
    (
        "nvme_tcp",
        "write_stall_timeout_ms",
        "A connection whose host reads none of the output waiting for it this long is closed \
         (in_flight_bytes bounds what it holds meanwhile).",
    ),
    (
        "engine",
        "",
        "The block targets' threads: each runs the connections dealt to it (in turn, as they \
         connect) and their device reads on its own io_uring, so a command never waits for \
         another core.",
    ),
    (
        "engine",
        "io_threads",
        "Threads serving iSCSI and NVMe/TCP connections; 0 = one per core. One connection \
         (an iSCSI session, an NVMe/TCP queue) runs on one thread.",
    ),
    ("log", "", "Logging."),
    ("log", "format", "human or json."),
    (
        "log",
        "level",
        "error, warn, info, debug, trace (or a tracing filter such as maas_pool=debug).",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {detail}")]
    Parse { path: String, detail: String },
    #[error("environment variable {var}: {detail}")]
    Env { var: String, detail: String },
    #[error("invalid setting {key}: {detail}")]
    Invalid { key: String, detail: String },
}

impl Config {
    /// Defaults, overridden by the file (if any), then by `MAAS_<SECTION>_<KEY>` variables.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut cfg = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.display().to_string(),
                    source: e,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: p.display().to_string(),
                    detail: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        cfg.apply_env(env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let mut v = toml::Value::try_from(&*self).map_err(|e| ConfigError::Invalid {
            key: "*".into(),
            detail: e.to_string(),
        })?;
        let Some(root) = v.as_table_mut() else {
            return Ok(());
        };
        for (section, table) in root.iter_mut() {
            let Some(table) = table.as_table_mut() else {
                continue;
            };
            for (key, val) in table.iter_mut() {
                let var = format!("MAAS_{}_{}", section.to_uppercase(), key.to_uppercase());
                let Some(s) = env(&var) else { continue };
                *val = match val {
                    // A RAM tier size set to a number in the file can be "auto" again here.
                    toml::Value::Integer(_) if s.trim().eq_ignore_ascii_case("auto") => {
                        toml::Value::String(s)
                    }
                    // A RAM tier size that is "auto" here: "auto" or a number.
                    toml::Value::String(cur) if cur == "auto" => {
                        if s.trim().eq_ignore_ascii_case("auto") {
                            toml::Value::String("auto".into())
                        } else {
                            toml::Value::Integer(s.trim().parse().map_err(|_| {
                                ConfigError::Env {
                                    var: var.clone(),
                                    detail: format!(
                                        "{s:?} is neither \"auto\" nor a size in bytes"
                                    ),
                                }
                            })?)
                        }
                    }
                    toml::Value::Integer(_) => {
                        toml::Value::Integer(s.trim().parse().map_err(|_| ConfigError::Env {
                            var: var.clone(),
                            detail: format!("{s:?} is not an integer"),
                        })?)
                    }
                    toml::Value::Boolean(_) => {
                        toml::Value::Boolean(s.trim().parse().map_err(|_| ConfigError::Env {
                            var: var.clone(),
                            detail: format!("{s:?} is not true/false"),
                        })?)
                    }
                    _ => toml::Value::String(s),
                };
            }
        }
        *self = v
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid {
                key: "*".into(),
                detail: e.to_string(),
            })?;
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |k: &str, d: &str| {
            Err(ConfigError::Invalid {
                key: k.into(),
                detail: d.into(),
            })
        };
        if self.api.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "api.listen",
                "must be host:port with a numeric host, e.g. 127.0.0.1:8080",
            );
        }
        let (cert, key) = (
            self.api.tls_cert_file.as_os_str().is_empty(),
            self.api.tls_key_file.as_os_str().is_empty(),
        );
        if cert != key {
            return bad(
                "api.tls_cert_file",
                "api.tls_cert_file and api.tls_key_file go together: set both, or neither for \
                 the generated self-signed certificate",
            );
        }
        if !self.api.tls && !cert {
            return bad(
                "api.tls",
                "is false (plain HTTP) but api.tls_cert_file is set: set api.tls = true to serve \
                 that certificate, or remove the certificate settings",
            );
        }
        for (key, listen) in [
            ("iscsi.listen", &self.iscsi.listen),
            ("nvme_tcp.listen", &self.nvme_tcp.listen),
        ] {
            if !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err() {
                return bad(
                    key,
                    "must be empty (disabled) or host:port with a numeric host",
                );
            }
        }
        for (section, settings) in [
            ("iscsi", self.iscsi.limit_settings()),
            ("nvme_tcp", self.nvme_tcp.limit_settings()),
        ] {
            for (key, value, min) in settings {
                if value < min {
                    return bad(
                        &format!("{section}.{key}"),
                        &format!("must be at least {min}"),
                    );
                }
            }
        }
        if self.engine.io_threads > 1024 {
            return bad(
                "engine.io_threads",
                "must be at most 1024 (0 = one per core)",
            );
        }
        if !matches!(self.log.format.as_str(), "human" | "json") {
            return bad("log.format", "must be human or json");
        }
        let cs = self.pool.chunk_size;
        if !cs.is_power_of_two() || !(64 << 10..=4 << 20).contains(&cs) {
            return bad(
                "pool.chunk_size",
                "must be a power of two from 65536 to 4194304",
            );
        }
        Ok(())
    }

    pub fn catalog_url(&self) -> String {
        if self.catalog.url.is_empty() {
            self.data.dir.join("catalog.sqlite").display().to_string()
        } else {
            self.catalog.url.clone()
        }
    }

    /// The key file that seals the catalog's secrets.
    pub fn catalog_key_file(&self) -> PathBuf {
        if self.catalog.secret_key_file.as_os_str().is_empty() {
            self.data.dir.join(crate::secrets::KEY_FILE)
        } else {
            self.catalog.secret_key_file.clone()
        }
    }

    /// The annotated defaults, as TOML.
    pub fn annotated_defaults() -> String {
        let v = toml::Value::try_from(Config::default()).unwrap_or(toml::Value::Boolean(false));
        let mut out = String::from(
            "# maasd configuration. Every key can also be set with MAAS_<SECTION>_<KEY>\n# (e.g. MAAS_API_LISTEN=127.0.0.1:18080); flags override both.\n",
        );
        let Some(root) = v.as_table() else { return out };
        for (section, table) in root {
            out.push('\n');
            if let Some((_, _, d)) = DOCS.iter().find(|(s, k, _)| s == section && k.is_empty()) {
                out.push_str(&format!("# {d}\n"));
            }
            out.push_str(&format!("[{section}]\n"));
            if let Some(t) = table.as_table() {
                for (k, val) in t {
                    if let Some((_, _, d)) = DOCS.iter().find(|(s, kk, _)| s == section && kk == k)
                    {
                        out.push_str(&format!("# {d}\n"));
                    }
                    out.push_str(&format!("{k} = {val}\n"));
                }
            }
        }
        out
    }
}

/// `listen` with an unspecified host replaced by loopback (what a local client can reach).
pub fn advertised(p: &PortalConfig) -> String {
    if !p.advertise.is_empty() {
        return p.advertise.clone();
    }
    p.listen
        .replace("0.0.0.0", "127.0.0.1")
        .replace("[::]", "[::1]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_is_documented_and_defaults_roundtrip() {
        let text = Config::annotated_defaults();
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed, Config::default());
        let v = toml::Value::try_from(Config::default()).unwrap();
        for (s, t) in v.as_table().unwrap() {
            for k in t.as_table().unwrap().keys() {
                assert!(
                    DOCS.iter().any(|(ds, dk, _)| ds == s && dk == k),
                    "{s}.{k} undocumented"
                );
            }
        }
    }

    #[test]
    fn debug_output_never_shows_the_catalog_password() {
        let mut c = Config::default();
        c.catalog.url = "postgres://maas:pa55word@db.example/maas".into();
        let text = format!("{c:?}");
        assert!(!text.contains("pa55word"), "{text}");
        assert!(text.contains("db.example/maas"), "{text}");
    }

    #[test]
    fn ram_tier_sizes_are_auto_by_default_and_numbers_fix_them() {
        let d = Config::default();
        assert_eq!(d.pool.cache_bytes, RamSize::Auto);
        assert_eq!(d.pool.log_cache_bytes, RamSize::Auto);
        assert_eq!(d.pool.write_buffer_bytes, RamSize::Auto);
        let text = Config::annotated_defaults();
        assert!(text.contains("cache_bytes = \"auto\""), "{text}");
        assert!(
            text.contains("half of the"),
            "the policy is documented:\n{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[pool]\ncache_bytes = 0\nlog_cache_bytes = \"auto\"\nwrite_buffer_bytes = 1048576\n",
        )
        .unwrap();
        let c = Config::load(Some(&f), |_| None).unwrap();
        // 0 keeps its meaning (off), a number is fixed, "auto" is auto.
        assert_eq!(c.pool.cache_bytes, RamSize::Bytes(0));
        assert_eq!(c.pool.log_cache_bytes, RamSize::Auto);
        assert_eq!(c.pool.write_buffer_bytes, RamSize::Bytes(1 << 20));
        // Variables: a number over "auto", "auto" over a number.
        let c = Config::load(Some(&f), |k| match k {
            "MAAS_POOL_LOG_CACHE_BYTES" => Some("4096".into()),
            "MAAS_POOL_WRITE_BUFFER_BYTES" => Some("auto".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.pool.log_cache_bytes, RamSize::Bytes(4096));
        assert_eq!(c.pool.write_buffer_bytes, RamSize::Auto);
        for bad in ["cache_bytes = \"lots\"", "cache_bytes = -1"] {
            std::fs::write(&f, format!("[pool]\n{bad}\n")).unwrap();
            let e = Config::load(Some(&f), |_| None);
            assert!(matches!(e, Err(ConfigError::Parse { .. })), "{bad}: {e:?}");
        }
        let e = Config::load(None, |k| {
            (k == "MAAS_POOL_CACHE_BYTES").then(|| "lots".to_string())
        });
        assert!(
            matches!(&e, Err(ConfigError::Env { var, .. }) if var == "MAAS_POOL_CACHE_BYTES"),
            "{e:?}"
        );
    }

    #[test]
    fn env_overrides_file_and_types_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[api]\nlisten = \"127.0.0.1:9000\"\n[pool]\ncache_bytes = 1\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "MAAS_API_LISTEN" => Some("127.0.0.1:18080".to_string()),
            "MAAS_ISCSI_LISTEN" => Some("127.0.0.1:3261".to_string()),
            "MAAS_POOL_CHUNK_SIZE" => Some("262144".to_string()),
            _ => None,
        };
        let c = Config::load(Some(&f), env).unwrap();
        assert_eq!(c.api.listen, "127.0.0.1:18080");
        assert_eq!(c.iscsi.listen, "127.0.0.1:3261");
        assert_eq!(c.pool.chunk_size, 262144);
        assert_eq!(c.pool.cache_bytes, RamSize::Bytes(1));
        assert_eq!(c.pool.log_cache_bytes, RamSize::Auto);
        let limited = Config::load(None, |k| match k {
            "MAAS_ISCSI_MAX_CONNECTIONS" => Some("10".to_string()),
            "MAAS_NVME_TCP_ICREQ_TIMEOUT_MS" => Some("2500".to_string()),
            _ => None,
        })
        .unwrap();
        assert_eq!(limited.iscsi.limits().max_connections, 10);
        assert_eq!(
            limited.nvme_tcp.limits().handshake_timeout,
            std::time::Duration::from_millis(2500)
        );
        let zero = Config::load(None, |k| {
            (k == "MAAS_NVME_TCP_MAX_CONNECTIONS_PER_SOURCE").then(|| "0".to_string())
        });
        assert!(
            matches!(&zero, Err(ConfigError::Invalid { key, .. }) if key == "nvme_tcp.max_connections_per_source"),
            "{zero:?}"
        );
        let bad = Config::load(None, |k| {
            (k == "MAAS_POOL_CACHE_BYTES").then(|| "lots".to_string())
        });
        assert!(matches!(bad, Err(ConfigError::Env { .. })));
        std::fs::write(&f, "[api]\nlisen = \"x\"\n").unwrap();
        assert!(matches!(
            Config::load(Some(&f), |_| None),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn tls_is_on_by_default_and_its_settings_are_checked() {
        let d = Config::load(None, |_| None).unwrap();
        assert!(d.api.tls, "HTTPS by default");
        let plain = Config::load(None, |k| (k == "MAAS_API_TLS").then(|| "false".to_string()));
        assert!(!plain.unwrap().api.tls);
        let half = Config::load(None, |k| {
            (k == "MAAS_API_TLS_CERT_FILE").then(|| "/etc/maas/api.pem".to_string())
        });
        assert!(
            matches!(&half, Err(ConfigError::Invalid { key, .. }) if key == "api.tls_cert_file"),
            "{half:?}"
        );
        let contradictory = Config::load(None, |k| match k {
            "MAAS_API_TLS" => Some("false".to_string()),
            "MAAS_API_TLS_CERT_FILE" => Some("/etc/maas/api.pem".to_string()),
            "MAAS_API_TLS_KEY_FILE" => Some("/etc/maas/api.key".to_string()),
            _ => None,
        });
        assert!(
            matches!(&contradictory, Err(ConfigError::Invalid { key, .. }) if key == "api.tls"),
            "{contradictory:?}"
        );
    }

    #[test]
    fn the_deploy_example_is_a_valid_configuration() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/maasd.toml");
        let c = Config::load(Some(&p), |_| None).unwrap();
        assert!(c.api.tls && !c.api.tls_cert_file.as_os_str().is_empty());
    }
}
