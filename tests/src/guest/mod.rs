//! Linux guests for end-to-end tests: Debian's kernel in QEMU (TCG), with the host's own
//! userland (open-iscsi, nvme-cli, e2fsprogs, fio...) borrowed read-only over 9p, as built by
//! `scripts/guest-build.sh`.
//!
//! ```no_run
//! use std::time::Duration;
//! use maas_tests::guest::Guest;
//!
//! let g = Guest::new("backup-host").timeout(Duration::from_secs(120));
//! // g.initiator_name() goes into the export's allow-list; the guest reaches the host at
//! // 10.0.2.2 (MAAS_HOST in the script).
//! let out = g.run("echo hello from $(hostname); exit 0");
//! out.assert_success();
//! assert!(out.output.contains("hello from backup-host"));
//! ```
//!
//! Inside the guest the script runs under bash as root, in a chroot whose root is the host's
//! `/` under a tmpfs overlay (writes stay in the guest; `/tmp` shows the host's `/tmp`), with:
//! - `/xchg`: the exchange directory, writable and shared with the host (by default a fresh
//!   temporary directory; [`Guest::exchange`] shares one between guests, e.g. for checksum
//!   lists). Files the host creates there after the guest booted may be missed by the guest
//!   (9p caches negative lookups): hand files over before boot, or through the network.
//! - environment: `MAAS_GUEST_NAME`, `MAAS_INITIATOR_NAME` (also in
//!   `/etc/iscsi/initiatorname.iscsi`), `MAAS_HOST_NQN` (also in `/etc/nvme/hostnqn`),
//!   `MAAS_HOST_ID` (also in `/etc/nvme/hostid`), `MAAS_HOST=10.0.2.2`, `MAAS_XCHG=/xchg`,
//!   `MAAS_RUN` (this run's directory under `/xchg`:
//!   daemons can log there, see [`GuestRun::file`]) and those of [`Guest::env`].
//! - shell functions: `mark NAME` (prints `@@MAAS-MARK NAME`, which the host waits for with
//!   [`RunningGuest::wait_for_mark`]), `fail MESSAGE` (prints it, exits 1), and those of the
//!   libraries added with [`Guest::lib`] ([`ISCSI_SH`], [`NVME_SH`], [`TREE_SH`]).
//!
//! [`workflow`] is the backup-and-restore scenario the guest tests run over each protocol.
//!
//! The script's stdout and stderr are captured (and mirrored onto the serial console); the
//! serial console (kernel messages included) goes to a log file whose tail failure messages
//! include. A guest has a hard timeout; QEMU runs in its own process group, which is killed
//! (SIGKILL) when the [`RunningGuest`] is dropped — on success, failure or panic — and when the
//! thread that started it dies (`PR_SET_PDEATHSIG`).

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::TestDir;
use crate::maasd::die_with_parent;

pub mod workflow;

/// Shell helpers for the host's open-iscsi in a guest (`iscsi_start`, `iscsi_discover`,
/// `iscsi_login`, `iscsi_disk`, `iscsi_chap`, `iscsi_logout`...); see the file for details.
pub const ISCSI_SH: &str = include_str!("iscsi.sh");

/// Shell helpers for the host's nvme-cli in a guest (`nvme_start`, `nvme_discovered`,
/// `nvme_connect`, `nvme_ns`, `nvme_disconnect`, `nvme_refused`...), the checks every NVMe/TCP
/// target must pass (`nvme_target_checks`, which also needs [`TREE_SH`]) and Linux nvmet as a
/// reference target in the guest (`nvmet_reference`); see the file for details.
pub const NVME_SH: &str = include_str!("nvme.sh");

/// File-tree shell helpers for guests and the host: `manifest DIR` (MD5 of every file),
/// `listing DIR` (every entry), `apply_step3 ROOT DELTA` (the [`workflow`]'s incremental).
pub const TREE_SH: &str = include_str!("tree.sh");

/// The host's loopback as a guest sees it (QEMU user networking).
pub const HOST: &str = crate::maasd::GUEST_HOST;

/// Where the guest pieces are: QEMU, the kernel and the initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImage {
    /// From `MAAS_QEMU_SYSTEM`, `MAAS_GUEST_KERNEL` and `MAAS_GUEST_INITRD`, else from what
    /// `scripts/guest-build.sh` left in `${MAAS_CACHE:-$HOME/.cache/maas}/guest/env.sh`.
    /// Anything missing is a failure that says how to build it.
    pub fn locate() -> GuestImage {
        let cache = std::env::var_os("MAAS_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/maas")))
            .unwrap_or_else(|| PathBuf::from("/nonexistent"));
        let env_file = cache.join("guest/env.sh");
        let from_file: BTreeMap<String, String> = std::fs::read_to_string(&env_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (k, v) = l.strip_prefix("export ")?.split_once('=')?;
                Some((k.to_string(), v.trim_matches('\'').to_string()))
            })
            .collect();
        let get = |var: &str| -> PathBuf {
            let p = std::env::var_os(var)
                .map(PathBuf::from)
                .or_else(|| from_file.get(var).map(PathBuf::from))
                .unwrap_or_else(|| {
                    panic!(
                        "{var} is not set and {} does not name it: run `eval \"$(scripts/guest-build.sh)\"` \
                         (the README's test command does)",
                        env_file.display()
                    )
                });
            assert!(
                p.is_file(),
                "{var}={} is missing: run scripts/guest-build.sh (the README's test command does)",
                p.display()
            );
            p
        };
        GuestImage {
            qemu: get("MAAS_QEMU_SYSTEM"),
            kernel: get("MAAS_GUEST_KERNEL"),
            initrd: get("MAAS_GUEST_INITRD"),
        }
    }
}

/// A guest to boot: identity, resources, exchange directory, environment, shell libraries.
/// Each [`Guest::run`] or [`Guest::spawn`] boots a fresh VM with the same identity (as one
/// machine rebooted).
#[derive(Debug, Clone)]
pub struct Guest {
    name: String,
    initiator_name: String,
    host_nqn: String,
    host_id: String,
    memory_mib: u32,
    cpus: u32,
    cpu_model: String,
    timeout: Duration,
    exchange: Option<PathBuf>,
    env: Vec<(String, String)>,
    libs: Vec<&'static str>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn next_seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

impl Guest {
    /// A guest named `name` (its host name; letters, digits and dashes), with an initiator
    /// name and host NQN unique to this guest in this test process:
    /// `iqn.2026-11.io.maas.test:<name>.<pid>.<n>` and `nqn.2026-11.io.maas.test:<name>.<pid>.<n>`,
    /// and an NVMe host identifier (a UUID) of its own.
    /// 2 vCPUs (`qemu64`), 2 GiB, a 5-minute timeout.
    pub fn new(name: &str) -> Guest {
        assert!(
            !name.is_empty()
                && name.len() <= 40
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "guest name {name:?}: 1-40 letters, digits or dashes"
        );
        let (pid, seq) = (std::process::id(), next_seq());
        let id = format!("{name}.{pid}.{seq}");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        Guest {
            name: name.to_string(),
            initiator_name: format!("iqn.2026-11.io.maas.test:{id}"),
            host_nqn: format!("nqn.2026-11.io.maas.test:{id}"),
            // A version-4 UUID from the process, the sequence number and the clock.
            host_id: format!(
                "{pid:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                seq & 0xffff,
                (nanos >> 48) & 0xfff,
                (nanos >> 36) & 0xfff,
                nanos & 0xffff_ffff_ffff
            ),
            memory_mib: 2048,
            cpus: 2,
            cpu_model: "qemu64".into(),
            timeout: Duration::from_secs(300),
            exchange: None,
            env: Vec::new(),
            libs: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The iSCSI initiator name the guest's open-iscsi uses.
    pub fn initiator_name(&self) -> &str {
        &self.initiator_name
    }

    /// The NVMe host NQN the guest's nvme-cli uses.
    pub fn host_nqn(&self) -> &str {
        &self.host_nqn
    }

    /// The NVMe host identifier (a UUID) the guest's nvme-cli uses.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// Overrides the iSCSI initiator name.
    pub fn with_initiator_name(mut self, iqn: &str) -> Self {
        self.initiator_name = iqn.to_string();
        self
    }

    /// Hard limit for one run, boot to power-off; the VM is killed after it.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// QEMU's `-cpu` model. Default `qemu64`: under TCG a plain model runs the guest about
    /// twice as fast as `max` (measured here: iSCSI writes, md5sum), and spectre/meltdown
    /// mitigations are off in the guest (`mitigations=off`) for the same reason. Host programs
    /// built for newer instruction sets (`-C target-cpu=native`) need `max`.
    pub fn cpu_model(mut self, model: &str) -> Self {
        self.cpu_model = model.to_string();
        self
    }

    /// Shares this host directory (created if missing) as `/xchg`, writable, instead of a
    /// fresh temporary one.
    pub fn exchange(mut self, dir: &Path) -> Self {
        self.exchange = Some(dir.to_path_buf());
        self
    }

    /// An environment variable for the script.
    pub fn env(mut self, key: &str, value: impl fmt::Display) -> Self {
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "environment variable name {key:?}"
        );
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// A shell library sourced before the script (e.g. [`ISCSI_SH`]).
    pub fn lib(mut self, lib: &'static str) -> Self {
        self.libs.push(lib);
        self
    }

    /// Boots the guest, runs `script` and waits for the power-off (or the timeout); booted
    /// once more if it dies before its script starts (see [`Guest::spawn`]).
    pub fn run(&self, script: &str) -> GuestRun {
        self.spawn(script).wait()
    }

    /// Boots the guest with `script` and returns once the script has started. A guest that
    /// died before its script started (TCG occasionally oopses while patching the kernel's
    /// text at boot) is booted once more: that is the emulator failing, not the test.
    pub fn spawn(&self, script: &str) -> RunningGuest {
        let mut first = self.spawn_once(script);
        let Some(st) = first.died_before_starting() else {
            return first;
        };
        let run = first.finish(Some(st), false);
        eprintln!(
            "guest {}: died before its script started (console tail below); booting it again\n{}",
            self.name,
            tail(&run.console, 15)
        );
        self.spawn_once(script)
    }

    fn spawn_once(&self, script: &str) -> RunningGuest {
        let image = GuestImage::locate();
        let private = match &self.exchange {
            Some(_) => None,
            None => Some(TestDir::new("maas-guest-")),
        };
        let exchange = match (&self.exchange, &private) {
            (Some(d), _) => d.clone(),
            (None, Some(t)) => t.path().to_path_buf(),
            (None, None) => unreachable!(),
        };
        let run_rel = format!(".maas/{}-{}-{}", self.name, std::process::id(), next_seq());
        let run_dir = exchange.join(&run_rel);
        std::fs::create_dir_all(&run_dir)
            .unwrap_or_else(|e| panic!("creating {}: {e}", run_dir.display()));
        let write = |name: &str, text: &str| {
            std::fs::write(run_dir.join(name), text)
                .unwrap_or_else(|e| panic!("writing {name} in {}: {e}", run_dir.display()));
        };
        write("script.sh", script);
        write("lib.sh", &self.libs.concat());
        write("run.sh", &self.run_sh(&run_rel));

        let console = run_dir.join("console.log");
        let qemu_log = std::fs::File::create(run_dir.join("qemu.log"))
            .unwrap_or_else(|e| panic!("creating qemu.log: {e}"));
        let qemu_log2 = qemu_log
            .try_clone()
            .unwrap_or_else(|e| panic!("qemu.log: {e}"));
        let mut cmd = Command::new(&image.qemu);
        cmd.args(["-name", &format!("maas-guest-{}", self.name)])
            .args(["-accel", "tcg,thread=multi", "-cpu", &self.cpu_model])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args([
                "-append",
                &format!(
                    "console=ttyS0 quiet panic=-1 mitigations=off maas.run={run_rel} maas.name={}",
                    self.name
                ),
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-netdev", "user,id=n0"])
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
            .args(["-device", "virtio-rng-pci"])
            .args([
                "-virtfs",
                "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            ])
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=xchg,security_model=none,multidevs=remap",
                exchange.display()
            ))
            .stdin(Stdio::null())
            .stdout(qemu_log)
            .stderr(qemu_log2)
            .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", image.qemu.display()));
        RunningGuest {
            name: self.name.clone(),
            child: Some(child),
            run_dir,
            console,
            started: Instant::now(),
            timeout: self.timeout,
            _private: private,
        }
    }

    fn run_sh(&self, run_rel: &str) -> String {
        let mut s = String::from(
            "# Generated by the maas-tests guest harness (tests/src/guest/mod.rs).\n\
             export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
             export HOME=/root LC_ALL=C TERM=dumb\n",
        );
        let vars = [
            ("MAAS_GUEST_NAME", self.name.as_str()),
            ("MAAS_INITIATOR_NAME", &self.initiator_name),
            ("MAAS_HOST_NQN", &self.host_nqn),
            ("MAAS_HOST_ID", &self.host_id),
            ("MAAS_HOST", HOST),
            ("MAAS_XCHG", "/xchg"),
            ("MAAS_RUN", &format!("/xchg/{run_rel}")),
        ];
        for (k, v) in vars
            .iter()
            .map(|(k, v)| (*k, *v))
            .chain(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            s.push_str(&format!("export {k}={}\n", shell_quote(v)));
        }
        s.push_str(
            "[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd\n\
             mkdir -p /etc/iscsi /etc/nvme\n\
             printf 'InitiatorName=%s\\n' \"$MAAS_INITIATOR_NAME\" >/etc/iscsi/initiatorname.iscsi\n\
             printf '%s\\n' \"$MAAS_HOST_NQN\" >/etc/nvme/hostnqn\n\
             printf '%s\\n' \"$MAAS_HOST_ID\" >/etc/nvme/hostid\n\
             : >\"$MAAS_RUN/started\"\n\
             mark() { echo \"@@MAAS-MARK $*\"; }\n\
             fail() { echo \"FAIL: $*\" >&2; exit 1; }\n\
             cd /xchg\n\
             . \"$MAAS_RUN/lib.sh\"\n\
             . \"$MAAS_RUN/script.sh\"\n",
        );
        s
    }
}

/// Quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A booted guest. Dropping it kills the VM.
#[derive(Debug)]
pub struct RunningGuest {
    name: String,
    child: Option<Child>,
    run_dir: PathBuf,
    console: PathBuf,
    started: Instant,
    timeout: Duration,
    _private: Option<TestDir>,
}

impl RunningGuest {
    /// The script's output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.run_dir.join("output")).unwrap_or_default()
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// This run's directory on the host (`$MAAS_RUN` in the guest).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// QEMU's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until the script has started; QEMU's exit status if the guest ended before it did
    /// (None once it started, or once the run's timeout passed: the caller's wait reports that).
    fn died_before_starting(&mut self) -> Option<ExitStatus> {
        loop {
            if self.run_dir.join("started").exists() || self.started.elapsed() > self.timeout {
                return None;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                // It may have started just before it ended.
                return (!self.run_dir.join("started").exists()).then_some(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the script printed `@@MAAS-MARK <mark>` (with the `mark` shell function).
    /// Panics, with the tails of the output and console, if the guest powers off first or
    /// `timeout` passes (the guest is then killed).
    pub fn wait_for_mark(&mut self, mark: &str, timeout: Duration) {
        let line = format!("@@MAAS-MARK {mark}");
        let t = Instant::now();
        loop {
            if self.output().lines().any(|l| l.trim_end() == line) {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                let run = self.finish(Some(st), false);
                panic!("guest {} ended before mark {mark:?}\n{run}", self.name);
            }
            if t.elapsed() > timeout || self.started.elapsed() > self.timeout {
                let run = self.finish(None, true);
                panic!(
                    "guest {}: no mark {mark:?} after {:?}\n{run}",
                    self.name,
                    t.elapsed()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the power-off; after the guest's timeout the VM is killed and the run
    /// reports `timed_out`.
    pub fn wait(mut self) -> GuestRun {
        loop {
            match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(st))) => return self.finish(Some(st), false),
                Some(Ok(None)) => {}
                Some(Err(e)) => panic!("waiting for guest {}: {e}", self.name),
                None => return self.finish(None, false),
            }
            if self.started.elapsed() > self.timeout {
                return self.finish(None, true);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the VM now (SIGKILL to its process group) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the process group QEMU leads (process_group(0) at spawn).
            unsafe { libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn finish(&mut self, qemu_status: Option<ExitStatus>, timed_out: bool) -> GuestRun {
        self.kill();
        let read = |n: &str| std::fs::read_to_string(self.run_dir.join(n)).unwrap_or_default();
        let status = read("exit").trim().parse::<i32>().ok();
        GuestRun {
            name: self.name.clone(),
            status,
            timed_out,
            qemu_status,
            elapsed: self.started.elapsed(),
            output: read("output"),
            console: read("console.log"),
            qemu_log: read("qemu.log"),
            run_dir: self.run_dir.clone(),
            _private: self._private.take().map(Arc::new),
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The outcome of a guest run.
#[derive(Debug, Clone)]
pub struct GuestRun {
    pub name: String,
    /// The script's exit status (None: it did not finish — timeout, crash, kernel panic).
    pub status: Option<i32>,
    /// Killed at the guest's timeout.
    pub timed_out: bool,
    /// QEMU's own exit status (None if it was killed).
    pub qemu_status: Option<ExitStatus>,
    pub elapsed: Duration,
    /// The script's stdout and stderr.
    pub output: String,
    /// The serial console (kernel messages, the script's output mirrored, exit marker).
    pub console: String,
    /// QEMU's stdout and stderr.
    pub qemu_log: String,
    /// This run's directory on the host (in the exchange directory).
    pub run_dir: PathBuf,
    /// The private exchange directory, if any: it lives as long as the run's outcome.
    _private: Option<Arc<TestDir>>,
}

impl GuestRun {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// The guest went down (a kernel panic while booting, a failed mount in its init) before
    /// its script started.
    pub fn died_before_the_script(&self) -> bool {
        self.status.is_none() && !self.timed_out && !self.run_dir.join("started").exists()
    }

    /// Panics with the tails of the output and console unless the script exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "guest script failed\n{self}");
        self
    }

    /// A file the guest wrote in its run directory (`$MAAS_RUN/<name>`), e.g. a daemon's log.
    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.run_dir.join(name)).unwrap_or_default()
    }

    /// Lines of the output that are marks, in order.
    pub fn marks(&self) -> Vec<&str> {
        self.output
            .lines()
            .filter_map(|l| l.strip_prefix("@@MAAS-MARK "))
            .collect()
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

impl fmt::Display for GuestRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (self.status, self.timed_out) {
            (Some(s), _) => format!("exit status {s}"),
            (None, true) => "killed at its timeout".to_string(),
            (None, false) => format!(
                "no exit status (QEMU {})",
                self.qemu_status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "killed".into())
            ),
        };
        writeln!(
            f,
            "guest {}: {status} after {:.1} s (logs in {}; MAAS_KEEP_TEST_DIRS=1 keeps them)",
            self.name,
            self.elapsed.as_secs_f64(),
            self.run_dir.display()
        )?;
        writeln!(f, "--- output (last 60 lines)\n{}", tail(&self.output, 60))?;
        writeln!(
            f,
            "--- console (last 40 lines)\n{}",
            tail(&self.console, 40)
        )?;
        if !self.qemu_log.trim().is_empty() {
            writeln!(f, "--- qemu\n{}", tail(&self.qemu_log, 20))?;
        }
        Ok(())
    }
}
