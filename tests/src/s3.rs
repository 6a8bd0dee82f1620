//! Real S3 servers on 127.0.0.1 for the archive tests, installed by the README's test command:
//! s3s-fs (persistent, checks SigV4: the main path) and moto (object lock, versioning), and
//! aws-cli to look at what a bucket holds as a third party sees it.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "MAASTESTACCESSKEY";
pub const SECRET_KEY: &str = "maas-test-secret-key-0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    S3sFs,
    Moto,
}

/// A running S3 server; killed when dropped.
#[derive(Debug)]
pub struct S3Server {
    pub kind: Kind,
    pub port: u16,
    pub root: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// s3s-fs logs every request (method, URI, headers) when set: for counting them.
    log_requests: bool,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

fn program(kind: Kind) -> PathBuf {
    let (var, name) = match kind {
        Kind::S3sFs => ("MAAS_S3S_FS", "s3s-fs"),
        Kind::Moto => ("MAAS_MOTO_SERVER", "moto_server"),
    };
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let home_bin = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin").join(name))
        .filter(|p| p.exists());
    if let Some(p) = home_bin {
        return p;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} is missing: run ./scripts/test-all.sh (the README's test command installs it)"
        )
    })
}

impl S3Server {
    /// Starts a server with its data under `root` (s3s-fs keeps objects there; moto keeps
    /// them in memory).
    pub fn start(kind: Kind, root: &Path) -> S3Server {
        std::fs::create_dir_all(root).unwrap_or_else(|e| panic!("{}: {e}", root.display()));
        let mut s = S3Server {
            kind,
            port: free_port(),
            root: root.to_path_buf(),
            child: None,
            log: root.with_extension("log"),
            log_requests: false,
        };
        s.spawn();
        s
    }

    /// As [`S3Server::start`], with every request in the log (`<root>.log`; s3s-fs only).
    pub fn start_logging_requests(kind: Kind, root: &Path) -> S3Server {
        std::fs::create_dir_all(root).unwrap_or_else(|e| panic!("{}: {e}", root.display()));
        let mut s = S3Server {
            kind,
            port: free_port(),
            root: root.to_path_buf(),
            child: None,
            log: root.with_extension("log"),
            log_requests: true,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("{}: {e}", self.log.display()));
        let err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("{}: {e}", self.log.display()));
        let mut cmd = Command::new(program(self.kind));
        if self.log_requests {
            cmd.env("RUST_LOG", "s3s::service=debug");
        }
        match self.kind {
            Kind::S3sFs => {
                cmd.args(["--host", "127.0.0.1", "--port"])
                    .arg(self.port.to_string())
                    .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                    .arg(&self.root);
            }
            Kind::Moto => {
                cmd.args(["-H", "127.0.0.1", "-p"])
                    .arg(self.port.to_string());
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", self.kind));
        self.child = Some(child);
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{:?} did not listen on {} within 20 s; log: {}",
                self.kind,
                self.port,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Creates a bucket (with object lock if asked: moto only).
    pub fn create_bucket(&self, name: &str, object_lock: bool) {
        let mut args = vec!["s3api", "create-bucket", "--bucket", name];
        if object_lock {
            args.push("--object-lock-enabled-for-bucket");
        }
        let out = self.aws(&args);
        assert!(
            out.status.success(),
            "create-bucket {name}: {}",
            crate::peers::text(&out)
        );
    }

    /// Runs aws-cli against this server with the test credentials.
    pub fn aws(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(aws_cli());
        cmd.args(args)
            .arg("--endpoint-url")
            .arg(self.endpoint())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE");
        crate::peers::run_with_timeout(&mut cmd, 60)
    }

    /// Every object in a bucket as aws-cli lists it: (key, size).
    pub fn list(&self, bucket: &str) -> Vec<(String, u64)> {
        let out = self.aws(&[
            "s3api",
            "list-objects-v2",
            "--bucket",
            bucket,
            "--output",
            "json",
        ]);
        assert!(
            out.status.success(),
            "list-objects-v2: {}",
            crate::peers::text(&out)
        );
        if out.stdout.is_empty() {
            return Vec::new();
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("aws-cli output: {e}"));
        v["Contents"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|o| {
                        (
                            o["Key"].as_str().unwrap_or("").to_string(),
                            o["Size"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Where s3s-fs keeps an object's bytes (to damage it under the server).
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        assert_eq!(self.kind, Kind::S3sFs, "only s3s-fs keeps objects in files");
        self.root.join(bucket).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn aws_cli() -> PathBuf {
    if let Some(p) = std::env::var_os("MAAS_AWS_CLI") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("aws"))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "aws-cli is missing: run ./scripts/test-all.sh (the README's test command installs it)"
        )
    })
}
