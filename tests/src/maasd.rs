//! Runs the real `maasd` binary on a temporary data directory and talks to it over HTTPS, as
//! maasd's defaults serve it: the runner trusts the self-signed certificate maasd generates
//! (`data/tls/api-cert.pem`, [`Maasd::ca_cert`]) and nothing else, so every test also checks
//! the default TLS setup; [`MaasdBuilder::plain_http`] asks for plain HTTP on loopback instead.
//!
//! The binary is a parameter ([`Maasd::builder`]): the manager's own tests pass
//! `env!("CARGO_BIN_EXE_maasd")`; tests of other packages use [`maasd_bin`], which builds it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A `maasd` child process. Dropping it kills the process (SIGKILL); it also dies with the
/// thread that started it (`PR_SET_PDEATHSIG`), so a killed test leaves no server behind.
#[derive(Debug)]
pub struct Maasd {
    /// The test's directory: `data/` (the data directory) and `maasd.log` (stderr).
    pub dir: PathBuf,
    /// The REST API's port on 127.0.0.1.
    pub port: u16,
    /// Size of the pool's file device.
    pub device_size: u64,
    /// The pool as maasd makes it unasked (no device size or chunk size given).
    pub pool_defaults: bool,
    /// The iSCSI target's port on 127.0.0.1.
    pub iscsi_port: u16,
    /// What SendTargets and exports advertise (empty: the address the initiator reached).
    pub iscsi_advertise: String,
    /// The NVMe/TCP target's port on 127.0.0.1 (discovery and I/O subsystems), if enabled
    /// ([`MaasdBuilder::nvme_tcp`]).
    pub nvme_port: Option<u16>,
    /// What the NVMe/TCP discovery log page and exports advertise.
    pub nvme_advertise: String,
    pub catalog_url: Option<String>,
    /// The admin token (read from `data/admin.token` at start).
    pub token: String,
    bin: PathBuf,
    env: Vec<(String, String)>,
    /// The umask the server starts with (None: the test's).
    pub umask: Option<u32>,
    /// The API serves HTTPS (the default) rather than plain HTTP.
    pub tls: bool,
    /// The certificate(s) the runner trusts (None: the generated one, [`Maasd::ca_cert`]).
    trust: Option<PathBuf>,
    /// The HTTP client: trusts only [`Maasd::trusted_cert`] when `tls`.
    agent: ureq::Agent,
    child: Option<Child>,
}

/// A start that ended before the server came up ([`Maasd::try_start_again`]).
#[derive(Debug)]
pub struct StartRefused {
    pub status: std::process::ExitStatus,
    /// What the server logged during this start.
    pub log: String,
}

/// How to start a [`Maasd`]; see [`Maasd::builder`].
#[derive(Debug, Clone)]
pub struct MaasdBuilder {
    bin: PathBuf,
    dir: PathBuf,
    device_size: u64,
    pool_defaults: bool,
    catalog_url: Option<String>,
    advertise: Advertise,
    nvme: Option<Advertise>,
    env: Vec<(String, String)>,
    umask: Option<u32>,
    tls: bool,
    trust: Option<PathBuf>,
}

#[derive(Debug, Clone)]
enum Advertise {
    Fixed(String),
    /// `10.0.2.2:<port>`: the host as a QEMU user-networking guest reaches it.
    Guest,
}

/// The address of the host's loopback from a QEMU guest with user networking.
pub const GUEST_HOST: &str = "10.0.2.2";

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
}

/// The API error code of an error body.
pub fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("")
}

/// The `maasd` binary for tests outside the manager package (cargo hands a package's binaries
/// only to that package's own tests): `MAAS_MAASD_BIN` if set, else cargo (`$CARGO`) builds it
/// into the target directory and with the profile of the running test binary — a no-op when it
/// is up to date; cargo's lock serialises concurrent builds — once per process.
pub fn maasd_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("MAAS_MAASD_BIN") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "MAAS_MAASD_BIN={} is not a file", p.display());
            return p;
        }
        build_bin("maas-manager", "maasd")
    })
    .clone()
}

/// The `maas-probe` binary, as [`maasd_bin`] finds maasd (`MAAS_PROBE_BIN` if set).
pub fn probe_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("MAAS_PROBE_BIN") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "MAAS_PROBE_BIN={} is not a file", p.display());
            return p;
        }
        build_bin("maas-probe", "maas-probe")
    })
    .clone()
}

fn build_bin(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    // <target>/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .unwrap_or_else(|| {
            panic!(
                "cannot find the target directory from {} (set MAAS_MAASD_BIN)",
                exe.display()
            )
        });
    let target_dir = profile_dir
        .parent()
        .unwrap_or_else(|| panic!("no target directory above {}", profile_dir.display()));
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("the maas-tests package has no parent directory"));
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace)
        .env("CARGO_TARGET_DIR", target_dir)
        .args(["build", "-q"]);
    // Under nextest (`cargo nextest run --workspace`, the test command) every test binary of the
    // workspace was built at once, with features unified across the workspace and its
    // dev-dependencies: ask for the same build, a no-op, so the maasd the manager's tests are
    // running at the same time is never relinked under them. Under `cargo test`, binaries run
    // one after the other and building just maasd is cheaper.
    if std::env::var_os("NEXTEST_RUN_ID").is_some() {
        cmd.args(["--workspace", "--all-targets"]);
    } else {
        cmd.args(["-p", package, "--bin", name]);
    }
    // The profile tests are built with (`cargo test`: test, `cargo test --release`: bench),
    // whose output directory is that of the profile it inherits from: the binary cargo would
    // hand the manager's own tests, so that a workspace test run builds maasd once.
    cmd.args([
        "--profile",
        match profile {
            "debug" => "test",
            "release" => "bench",
            other => other,
        },
    ]);
    let st = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cargo:?} to build {name}: {e}"));
    assert!(st.success(), "building {name} failed ({st}): {cmd:?}");
    let bin = profile_dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing after the build (set MAAS_MAASD_BIN or MAAS_PROBE_BIN)",
        bin.display()
    );
    bin
}

impl MaasdBuilder {
    /// Size of the pool's file device (a sparse file); default 2 GiB.
    pub fn device_size(mut self, bytes: u64) -> Self {
        self.device_size = bytes;
        self
    }

    /// The pool exactly as the README's first command makes it: no device size (a thin device
    /// sized to the filesystem's free space), the default chunk size, every RAM-tier setting
    /// maasd's own.
    pub fn pool_defaults(mut self) -> Self {
        self.pool_defaults = true;
        self
    }

    /// A catalog URL (PostgreSQL); default the embedded SQLite.
    pub fn catalog_url(mut self, url: Option<String>) -> Self {
        self.catalog_url = url;
        self
    }

    /// What the iSCSI target advertises (empty: the address the initiator reached, for clients
    /// on the host). Default: empty.
    pub fn advertise(mut self, portal: &str) -> Self {
        self.advertise = Advertise::Fixed(portal.to_string());
        self
    }

    /// Advertise the portal a QEMU guest reaches: `10.0.2.2:<iscsi port>`.
    pub fn guest_portal(mut self) -> Self {
        self.advertise = Advertise::Guest;
        self
    }

    /// Enables the NVMe/TCP target on a free port of 127.0.0.1 ([`Maasd::nvme_port`]),
    /// advertising the address a QEMU guest reaches: `10.0.2.2:<nvme port>`.
    pub fn nvme_tcp(mut self) -> Self {
        self.nvme = Some(Advertise::Guest);
        self
    }

    /// Enables the NVMe/TCP target on a free port of 127.0.0.1, advertising `traddr:trsvcid`
    /// instead (e.g. a [`crate::relay::Relay`] in front of it).
    pub fn nvme_tcp_advertise(mut self, addr: &str) -> Self {
        self.nvme = Some(Advertise::Fixed(addr.to_string()));
        self
    }

    /// The server's umask (default: the test's own).
    pub fn umask(mut self, mask: u32) -> Self {
        self.umask = Some(mask);
        self
    }

    /// Plain HTTP on loopback (`MAAS_API_TLS=false`) instead of the default HTTPS.
    pub fn plain_http(mut self) -> Self {
        self.tls = false;
        self
    }

    /// Trust these PEM certificates (a CA, or the configured certificate) instead of the
    /// certificate maasd generates, e.g. with `MAAS_API_TLS_CERT_FILE` set through [`Self::env`].
    pub fn trust(mut self, pem: &Path) -> Self {
        self.trust = Some(pem.to_path_buf());
        self
    }

    /// An extra environment variable for the server.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts the server and waits until `/health` answers.
    pub fn start(self) -> Maasd {
        let mut m = self.prepare();
        m.spawn();
        m
    }

    /// Starts the server with extra command-line `args`; `Err` with its exit status and log if
    /// it exits instead of coming up.
    pub fn try_start(self, args: &[&str]) -> Result<Maasd, StartRefused> {
        let mut m = self.prepare();
        m.try_spawn(args)?;
        Ok(m)
    }

    fn prepare(self) -> Maasd {
        let iscsi_port = free_port();
        let iscsi_advertise = match self.advertise {
            Advertise::Fixed(s) => s,
            Advertise::Guest => format!("{GUEST_HOST}:{iscsi_port}"),
        };
        let nvme_port = self.nvme.as_ref().map(|_| free_port());
        let nvme_advertise = match (self.nvme, nvme_port) {
            (Some(Advertise::Fixed(s)), _) => s,
            (Some(Advertise::Guest), Some(p)) => format!("{GUEST_HOST}:{p}"),
            _ => String::new(),
        };
        Maasd {
            dir: self.dir,
            port: free_port(),
            device_size: self.device_size,
            pool_defaults: self.pool_defaults,
            iscsi_port,
            iscsi_advertise,
            nvme_port,
            nvme_advertise,
            catalog_url: self.catalog_url,
            token: String::new(),
            bin: self.bin,
            env: self.env,
            umask: self.umask,
            tls: self.tls,
            trust: self.trust,
            agent: ureq::AgentBuilder::new().build(),
            child: None,
        }
    }
}

/// A client that trusts only the certificates of the PEM file `pem` (None if the file is
/// missing or holds none, e.g. not yet written).
pub fn agent_trusting(pem: &Path) -> Option<ureq::Agent> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let data = std::fs::read(pem).ok()?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&data) {
        roots.add(c.ok()?).ok()?;
    }
    if roots.is_empty() {
        return None;
    }
    // ring, as maasd (see maas_manager::tls::provider).
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Some(
        ureq::AgentBuilder::new()
            .tls_config(std::sync::Arc::new(cfg))
            .build(),
    )
}

/// SHA-256 of a DER certificate, `AB:CD:...` (as maasd logs and maasctl pins it).
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The SHA-256 fingerprint of the first certificate of a PEM file.
pub fn pem_fingerprint(pem: &Path) -> String {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let c = CertificateDer::from_pem_file(pem)
        .unwrap_or_else(|e| panic!("{}: no certificate: {e}", pem.display()));
    fingerprint(c.as_ref())
}

impl Maasd {
    /// A server from `bin` on `dir` (created if missing), REST and iSCSI on free ports of
    /// 127.0.0.1, NVMe/TCP off (see [`MaasdBuilder::nvme_tcp`]), 256 KiB chunks.
    pub fn builder(bin: impl Into<PathBuf>, dir: &Path) -> MaasdBuilder {
        MaasdBuilder {
            bin: bin.into(),
            dir: dir.to_path_buf(),
            device_size: 2 << 30,
            pool_defaults: false,
            catalog_url: None,
            advertise: Advertise::Fixed(String::new()),
            nvme: None,
            env: Vec::new(),
            umask: None,
            tls: true,
            trust: None,
        }
    }

    fn spawn(&mut self) {
        if let Err(r) = self.try_spawn(&[]) {
            panic!("maasd exited at start-up ({}):\n{}", r.status, self.log());
        }
    }

    /// Starts the server with extra command-line `args`; `Err` if it exits before `/health`
    /// answers.
    fn try_spawn(&mut self, args: &[&str]) -> Result<(), StartRefused> {
        std::fs::create_dir_all(&self.dir)
            .unwrap_or_else(|e| panic!("creating {}: {e}", self.dir.display()));
        let log_start = self.log().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("maasd.log"))
            .unwrap_or_else(|e| panic!("opening maasd.log: {e}"));
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(args)
            .env("MAAS_API_LISTEN", format!("127.0.0.1:{}", self.port))
            .env(
                "MAAS_ISCSI_LISTEN",
                format!("127.0.0.1:{}", self.iscsi_port),
            )
            .env("MAAS_ISCSI_ADVERTISE", &self.iscsi_advertise)
            .env(
                "MAAS_NVME_TCP_LISTEN",
                self.nvme_port
                    .map(|p| format!("127.0.0.1:{p}"))
                    .unwrap_or_default(),
            )
            .env("MAAS_NVME_TCP_ADVERTISE", &self.nvme_advertise)
            .env("MAAS_API_TLS", self.tls.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if !self.pool_defaults {
            cmd.env("MAAS_POOL_DEVICE_SIZE", self.device_size.to_string())
                .env("MAAS_POOL_CHUNK_SIZE", (256u64 << 10).to_string());
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(u) = &self.catalog_url {
            cmd.env("MAAS_CATALOG_URL", u);
        }
        die_with_parent(&mut cmd);
        if let Some(mask) = self.umask {
            // SAFETY: umask(2) is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask as libc::mode_t);
                    Ok(())
                });
            }
        }
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawning {}: {e}", self.bin.display())),
        );
        let t = Instant::now();
        loop {
            // Over HTTPS, the client trusts the certificate once maasd has written it.
            let agent = if self.tls {
                agent_trusting(&self.trusted_cert())
            } else {
                Some(ureq::AgentBuilder::new().build())
            };
            if let Some(agent) = agent
                && let Ok(r) = agent.get(&self.url("/health")).call()
                && r.status() == 200
            {
                self.agent = agent;
                break;
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait().unwrap_or_else(|e| panic!("wait: {e}"))
            {
                self.child = None;
                let log = self.log().get(log_start..).unwrap_or_default().to_string();
                return Err(StartRefused { status, log });
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "maasd did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.token = std::fs::read_to_string(self.dir.join("data/admin.token"))
            .unwrap_or_else(|e| panic!("reading admin.token: {e}"))
            .trim()
            .to_string();
        Ok(())
    }

    /// The server's log (stderr) so far, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maasd.log")).unwrap_or_default()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1{}", self.base_url(), path)
    }

    /// `https://127.0.0.1:<port>` (or `http://` with [`MaasdBuilder::plain_http`]): what
    /// `maasctl --url` takes.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The self-signed certificate maasd generated (`data/tls/api-cert.pem`): what clients
    /// trust (`maasctl --ca-cert`, `curl --cacert`).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("data/tls/api-cert.pem")
    }

    /// What this runner trusts: [`MaasdBuilder::trust`], else [`Maasd::ca_cert`].
    pub fn trusted_cert(&self) -> PathBuf {
        self.trust.clone().unwrap_or_else(|| self.ca_cert())
    }

    /// The client the runner uses (trusting only [`Maasd::trusted_cert`] over HTTPS).
    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    /// The environment `maasctl` needs to reach this server as admin: MAAS_URL, MAAS_CA_CERT
    /// (over HTTPS) and MAAS_TOKEN_FILE.
    pub fn maasctl_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("MAAS_URL".to_string(), self.base_url()),
            (
                "MAAS_TOKEN_FILE".to_string(),
                self.dir.join("data/admin.token").display().to_string(),
            ),
        ];
        if self.tls {
            env.push((
                "MAAS_CA_CERT".to_string(),
                self.trusted_cert().display().to_string(),
            ));
        }
        env
    }

    /// SIGTERM and wait: a graceful stop must exit 0.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            loop {
                if let Some(st) = c.try_wait().unwrap_or_else(|e| panic!("wait: {e}")) {
                    assert!(
                        st.success(),
                        "maasd did not stop cleanly: {st}\n{}",
                        self.log()
                    );
                    return;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "maasd ignored SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap_or_else(|e| panic!("kill: {e}"));
            c.wait().unwrap_or_else(|e| panic!("wait: {e}"));
        }
    }

    /// A graceful stop, then a start on the same directory and ports.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts the server again (after [`Maasd::kill9`] or [`Maasd::stop`]) on the same
    /// directory and ports.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// Starts the server again with extra command-line `args` (for this start only); `Err`
    /// with its exit status and log if it exits instead of coming up.
    pub fn try_start_again(&mut self, args: &[&str]) -> Result<(), StartRefused> {
        self.try_spawn(args)
    }

    /// Calls the API with the admin token; returns (status, body).
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(Some(&self.token.clone()), method, path, body)
    }

    pub fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.agent.request(method, &self.url(path));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        response(method, path, res)
    }

    /// Sends `content` as a JSON body verbatim (for malformed-input tests).
    pub fn raw(&self, method: &str, path: &str, content: &str) -> (u16, Value) {
        let req = self
            .agent
            .request(method, &self.url(path))
            .set("Authorization", &format!("Bearer {}", self.token))
            .set("Content-Type", "application/json");
        response(method, path, req.send_string(content))
    }

    /// Calls the API and asserts a 2xx status; returns the body.
    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call(method, path, body);
        assert!((200..300).contains(&s), "{method} {path} -> {s} {v}");
        v
    }

    /// Waits for a job (as returned by a 202) and returns it; panics if it failed or takes
    /// more than two minutes.
    pub fn wait_job(&self, job: &Value) -> Value {
        let j = self.wait_job_end(job);
        assert_eq!(j["state"], "succeeded", "job failed: {j}");
        j
    }

    /// Waits for a job to end, succeeded or failed, and returns it; panics if it takes more
    /// than two minutes.
    pub fn wait_job_end(&self, job: &Value) -> Value {
        let id = job["id"]
            .as_str()
            .unwrap_or_else(|| panic!("not a job: {job}"))
            .to_string();
        let t = Instant::now();
        loop {
            let j = self.ok("GET", &format!("/jobs/{id}"), None);
            if matches!(j["state"].as_str(), Some("succeeded" | "failed")) {
                return j;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "job stuck: {j}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Maasd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The child gets SIGKILL when the thread that spawned it exits (normally or not), so a test
/// process that is killed leaves no server or VM behind. Spawn long-lived children from the
/// thread that owns them.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl(2) and getppid(2) are async-signal-safe; nothing else runs in the child
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may already be gone (the signal only covers deaths after prctl).
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the parent exited before exec"));
            }
            Ok(())
        });
    }
}

// ------------------------------------------------------------------ REST helpers

/// Creates a volume; returns its id.
pub fn volume(m: &Maasd, name: &str, size: u64, block_size: u32) -> String {
    let (st, v) = m.call(
        "POST",
        "/volumes",
        Some(json!({"name": name, "size": size, "block_size": block_size})),
    );
    assert_eq!(st, 201, "{v}");
    id_of(&v)
}

/// Exports a volume over iSCSI to these initiators (with optional CHAP:
/// `{"user", "secret", "mutual_user", "mutual_secret"}`); returns the export object
/// (`portal`, `target`, `lun`...).
pub fn export(m: &Maasd, vol: &str, initiators: &[&str], chap: Option<Value>) -> Value {
    let mut body = json!({"protocol": "iscsi", "initiators": initiators});
    if let Some(c) = chap {
        body["chap"] = c;
    }
    create_export(m, vol, body)
}

/// Exports a volume over NVMe/TCP to these host NQNs; returns the export object (`portal`,
/// `target`: the subsystem NQN, `nsid`...).
pub fn nvme_export(m: &Maasd, vol: &str, hosts: &[&str]) -> Value {
    create_export(m, vol, json!({"protocol": "nvme-tcp", "initiators": hosts}))
}

/// `POST /volumes/{vol}/exports` with `body`, which must answer 201; returns the export.
pub fn create_export(m: &Maasd, vol: &str, body: Value) -> Value {
    let (st, e) = m.call(
        "POST",
        &format!("/volumes/{vol}/exports"),
        Some(body.clone()),
    );
    assert_eq!(st, 201, "{body} -> {e}");
    e
}

/// Seals a volume; returns the snapshot id.
pub fn seal(m: &Maasd, vol: &str) -> String {
    let (st, job) = m.call("POST", &format!("/volumes/{vol}/snapshots"), None);
    assert_eq!(st, 202, "{job}");
    let j = m.wait_job(&job);
    j["result"]["snapshot"]
        .as_str()
        .unwrap_or_else(|| panic!("no snapshot in {j}"))
        .to_string()
}

/// Clones a snapshot into a new volume; returns its id.
pub fn clone_snapshot(m: &Maasd, snap: &str, name: &str) -> String {
    let (st, job) = m.call(
        "POST",
        &format!("/snapshots/{snap}/clones"),
        Some(json!({"name": name})),
    );
    assert_eq!(st, 202, "{job}");
    let j = m.wait_job(&job);
    j["result"]["volume"]
        .as_str()
        .unwrap_or_else(|| panic!("no volume in {j}"))
        .to_string()
}

/// Re-reads and checks everything in the pool (`POST /pools/{id}/verify`); returns the report.
pub fn verify_pool(m: &Maasd) -> Value {
    let pools = m.ok("GET", "/pools", None);
    let id = pools["items"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no pool in {pools}"))
        .to_string();
    let (st, job) = m.call("POST", &format!("/pools/{id}/verify"), None);
    assert_eq!(st, 202, "{job}");
    m.wait_job(&job)["result"].clone()
}

fn id_of(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {v}"))
        .to_string()
}

/// (status, body) of a finished request: an empty body is `null`, one that is not JSON is
/// `{"raw": text}`. Only a transport failure panics.
fn response(method: &str, path: &str, res: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let (status, resp) = match res {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(s, r)) => (s, r),
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let text = resp
        .into_string()
        .unwrap_or_else(|e| panic!("{method} {path}: reading the body: {e}"));
    (
        status,
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(json!({ "raw": text }))
        },
    )
}
