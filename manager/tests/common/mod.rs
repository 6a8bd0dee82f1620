#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! Starts the real `maasd` binary on a temporary data directory and talks to it over HTTP.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Maasd {
    pub dir: PathBuf,
    pub port: u16,
    /// Size of the pool's file device.
    pub device_size: u64,
    /// The iSCSI target's port on 127.0.0.1.
    pub iscsi_port: u16,
    /// What SendTargets and exports advertise (a guest reaches the host at 10.0.2.2).
    pub iscsi_advertise: String,
    pub catalog_url: Option<String>,
    child: Option<Child>,
    pub token: String,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Maasd {
    pub fn start(dir: &Path, catalog_url: Option<String>) -> Maasd {
        let mut m = Maasd {
            dir: dir.to_path_buf(),
            port: free_port(),
            device_size: 2 << 30,
            iscsi_port: free_port(),
            iscsi_advertise: "10.0.2.2:3260".into(),
            catalog_url,
            child: None,
            token: String::new(),
        };
        m.spawn();
        m
    }

    /// A maasd whose iSCSI portal advertises itself (127.0.0.1:port), for host-side clients.
    pub fn start_local(dir: &Path) -> Maasd {
        Self::start_local_with(dir, 2 << 30)
    }

    /// As [`Maasd::start_local`], with a pool device of `device_size` bytes (a sparse file).
    pub fn start_local_with(dir: &Path, device_size: u64) -> Maasd {
        let mut m = Maasd {
            device_size,
            dir: dir.to_path_buf(),
            port: free_port(),
            iscsi_port: free_port(),
            iscsi_advertise: String::new(),
            catalog_url: None,
            child: None,
            token: String::new(),
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("maasd.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_maasd"));
        cmd.arg("--data-dir")
            .arg(self.dir.join("data"))
            .env("MAAS_API_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("MAAS_POOL_DEVICE_SIZE", self.device_size.to_string())
            .env("MAAS_POOL_CHUNK_SIZE", (256u64 << 10).to_string())
            .env(
                "MAAS_ISCSI_LISTEN",
                format!("127.0.0.1:{}", self.iscsi_port),
            )
            .env("MAAS_ISCSI_ADVERTISE", &self.iscsi_advertise)
            .env("MAAS_NVME_TCP_LISTEN", "")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(u) = &self.catalog_url {
            cmd.env("MAAS_CATALOG_URL", u);
        }
        self.child = Some(cmd.spawn().unwrap());
        let t = Instant::now();
        loop {
            if let Ok(r) = ureq::get(&self.url("/health")).call()
                && r.status() == 200
            {
                break;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("maasd exited at start-up ({st}):\n{}", self.log());
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "maasd did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.token = std::fs::read_to_string(self.dir.join("data/admin.token"))
            .unwrap()
            .trim()
            .to_string();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maasd.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/api/v1{}", self.port, path)
    }

    /// SIGTERM and wait: a graceful stop must exit 0.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            loop {
                if let Some(st) = c.try_wait().unwrap() {
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

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn start_again(&mut self) {
        self.spawn();
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
        let mut req = ureq::request(method, &self.url(path));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let (status, resp) = match res {
            Ok(r) => (r.status(), r),
            Err(ureq::Error::Status(s, r)) => (s, r),
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let text = resp.into_string().unwrap();
        (
            status,
            if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or(json!({ "raw": text }))
            },
        )
    }

    pub fn raw(&self, method: &str, path: &str, content: &str) -> (u16, Value) {
        let req = ureq::request(method, &self.url(path))
            .set("Authorization", &format!("Bearer {}", self.token))
            .set("Content-Type", "application/json");
        let (status, resp) = match req.send_string(content) {
            Ok(r) => (r.status(), r),
            Err(ureq::Error::Status(s, r)) => (s, r),
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let text = resp.into_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(json!({ "raw": text })),
        )
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call(method, path, body);
        assert!((200..300).contains(&s), "{method} {path} -> {s} {v}");
        v
    }

    /// Waits for a job and returns it; panics if it failed.
    pub fn wait_job(&self, job: &Value) -> Value {
        let id = job["id"].as_str().unwrap().to_string();
        let t = Instant::now();
        loop {
            let j = self.ok("GET", &format!("/jobs/{id}"), None);
            match j["state"].as_str() {
                Some("succeeded") => return j,
                Some("failed") => panic!("job failed: {j}"),
                _ => {}
            }
            assert!(t.elapsed() < Duration::from_secs(60), "job stuck: {j}");
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

pub fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("")
}
pub mod iscsi;
