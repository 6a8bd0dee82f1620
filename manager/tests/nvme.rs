#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The NVMe/TCP target of the real `maasd`, through its REST exports: a subsystem per export,
//! the host NQN allow-list, discovery, data that survives a restart, growth announced by an
//! asynchronous event, and unexport ending the connections. (The Linux kernel's host runs
//! against it in `tests/tests/guest_nvme_tcp.rs`.)

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{MAASD, Maasd, free_port};
use maas_engine::nvme::spec::{DISCOVERY_NQN, Sqe, Status, admin, feature, io, log};
use maas_engine::nvme::tcp::client::{Client, ClientError, ClientOptions};
use serde_json::json;

const MIB: u64 = 1 << 20;
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0a0b0c0d-0000-4000-8000-000000000001";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn start(dir: &std::path::Path, port: u16) -> Maasd {
    Maasd::builder(MAASD, dir)
        .env("MAAS_NVME_TCP_LISTEN", &format!("127.0.0.1:{port}"))
        .start()
}

fn opts(hostnqn: &str) -> ClientOptions {
    ClientOptions {
        hostnqn: hostnqn.into(),
        kato_ms: 5000,
        ..ClientOptions::default()
    }
}

async fn io_queue(portal: &str, nqn: &str) -> (Client, Client) {
    let mut a = Client::connect(portal, nqn, 0, 0xffff, &opts(HOST))
        .await
        .unwrap();
    a.enable().await.unwrap();
    let q = Client::connect(portal, nqn, 1, a.cntlid, &opts(HOST))
        .await
        .unwrap();
    (a, q)
}

fn rw(op: u8, slba: u64, blocks: u32) -> Sqe {
    Sqe::block_io(op, 0, 1, slba, blocks)
}

#[test]
fn rest_exports_become_nvme_subsystems_that_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut m = start(dir.path(), port);
    let vol = m.ok(
        "POST",
        "/volumes",
        Some(json!({"name": "nv1", "size": 64 * MIB, "block_size": 4096})),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Host NQNs must look like NQNs; CHAP is iSCSI's.
    let (st, _) = m.call(
        "POST",
        &format!("/volumes/{vol}/exports"),
        Some(json!({"protocol": "nvme-tcp", "initiators": ["iqn.2026-01.x:y"]})),
    );
    assert_eq!(st, 400);
    let e = m.ok(
        "POST",
        &format!("/volumes/{vol}/exports"),
        Some(json!({"protocol": "nvme-tcp", "initiators": [HOST]})),
    );
    let nqn = e["target"].as_str().unwrap().to_string();
    assert!(nqn.starts_with("nqn.2026-11.io.maas:exp-"), "{e}");
    assert_eq!(e["nsid"], 1);
    let portal = e["portal"].as_str().unwrap().to_string();
    assert_eq!(portal, format!("127.0.0.1:{port}"));
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let rt = runtime();
    rt.block_on(async {
        // Discovery shows the subsystem to its host only.
        let mut d = Client::connect(&portal, DISCOVERY_NQN, 0, 0xffff, &opts(HOST))
            .await
            .unwrap();
        d.enable().await.unwrap();
        let mut lp = Sqe::new(admin::GET_LOG_PAGE, 0, 0);
        lp.set_cdw(10, u32::from(log::DISCOVERY) | (511 << 16));
        let page = d.exec(lp, None, 2048).await.unwrap().data;
        assert_eq!(u64::from_le_bytes(page[8..16].try_into().unwrap()), 1);
        assert!(String::from_utf8_lossy(&page[1024 + 256..1024 + 512]).starts_with(&nqn));
        let mut other = Client::connect(&portal, DISCOVERY_NQN, 0, 0xffff, &opts("nqn.x:other"))
            .await
            .unwrap();
        other.enable().await.unwrap();
        let mut lp = Sqe::new(admin::GET_LOG_PAGE, 0, 0);
        lp.set_cdw(10, u32::from(log::DISCOVERY) | (255 << 16));
        let head = other.exec(lp, None, 1024).await.unwrap().data;
        assert_eq!(u64::from_le_bytes(head[8..16].try_into().unwrap()), 0);
        // An unlisted host cannot connect.
        let err = Client::connect(&portal, &nqn, 0, 0xffff, &opts("nqn.x:other"))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Status(s) if s == Status::CONNECT_INVALID_HOST));
        // Write, flush.
        let (mut a, mut q) = io_queue(&portal, &nqn).await;
        let id = a.identify(0, 1).await.unwrap();
        assert_eq!(
            u64::from_le_bytes(id[..8].try_into().unwrap()),
            64 * MIB / 4096
        );
        assert_eq!(id[130], 12, "4 KiB blocks");
        q.exec(rw(io::WRITE, 10, 64), Some(Arc::new(data.clone())), 0)
            .await
            .unwrap();
        q.exec(Sqe::new(io::FLUSH, 0, 1), None, 0).await.unwrap();
    });
    m.restart();
    rt.block_on(async {
        let (mut a, mut q) = io_queue(&portal, &nqn).await;
        let r = q
            .exec(rw(io::READ, 10, 64), None, data.len())
            .await
            .unwrap();
        assert!(r.data == data, "data after restart");
        // Growth: the host hears of it by an asynchronous event, and Identify shows it.
        let mut aec = Sqe::new(admin::SET_FEATURES, 0, 0);
        aec.set_cdw(10, u32::from(feature::ASYNC_EVENT_CONFIG));
        aec.set_cdw(11, 1 << 8);
        a.exec(aec, None, 0).await.unwrap();
        a.submit(Sqe::new(admin::ASYNC_EVENT_REQUEST, 0, 0), None, 0)
            .await
            .unwrap();
        let body = json!({"size": 128 * MIB});
        // (A blocking call on the test's single-threaded runtime: nothing else runs meanwhile.)
        let (st, v) = m.call("PATCH", &format!("/volumes/{vol}"), Some(body));
        assert_eq!(st, 200, "{v}");
        let ev = tokio::time::timeout(Duration::from_secs(10), a.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev.cqe.dw0, 0x0004_0002);
        let id = a.identify(0, 1).await.unwrap();
        assert_eq!(
            u64::from_le_bytes(id[..8].try_into().unwrap()),
            128 * MIB / 4096
        );
        // Unexport ends the connections.
        let eid = e["id"].as_str().unwrap();
        let (st, _) = m.call("DELETE", &format!("/exports/{eid}"), None);
        assert_eq!(st, 204);
        let err = q.exec(rw(io::READ, 0, 1), None, 4096).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Closed | ClientError::Io(_)),
            "{err}"
        );
    });
    m.stop();
}

/// DH-HMAC-CHAP through REST: secrets go in, never come out, and gate the subsystem's queues in
/// the real maasd, across a restart (the secrets are kept in the catalog with the export).
#[test]
fn rest_dhchap_secrets_gate_the_subsystem_across_restarts() {
    use maas_engine::nvme::auth::{HashId, HostAuth, Secret};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut m = start(dir.path(), port);
    let vol = m.ok(
        "POST",
        "/volumes",
        Some(json!({"name": "auth1", "size": 64 * MIB, "block_size": 512})),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let hk = Secret::generate(Some(HashId::Sha256));
    let ck = Secret::generate(None);
    let url = format!("/volumes/{vol}/exports");
    // DH-HMAC-CHAP is NVMe's; secrets must be DHHC-1 secrets.
    for (protocol, dhchap) in [
        ("iscsi", json!({"host_secret": hk.encode().as_str()})),
        ("nvme-tcp", json!({"host_secret": "not-a-secret"})),
        (
            "nvme-tcp",
            json!({"host_secret": hk.encode().as_str(), "hash": "md5"}),
        ),
    ] {
        let (st, r) = m.call(
            "POST",
            &url,
            Some(json!({"protocol": protocol, "initiators": [HOST], "dhchap": dhchap})),
        );
        assert_eq!(st, 400, "{r}");
    }
    let e = m.ok(
        "POST",
        &url,
        Some(json!({"protocol": "nvme-tcp", "initiators": [HOST],
            "dhchap": {"host_secret": hk.encode().as_str(), "ctrl_secret": ck.encode().as_str()}})),
    );
    let nqn = e["target"].as_str().unwrap().to_string();
    let portal = format!("127.0.0.1:{port}");
    let listed = m.ok("GET", &url, None).to_string();
    for shown in [e.to_string(), listed] {
        assert!(
            shown.contains("\"dhchap\":{\"ctrl_secret\":true}"),
            "{shown}"
        );
        assert!(!shown.contains(&hk.encode()[10..40]) && !shown.contains(&ck.encode()[10..40]));
    }
    let rt = runtime();
    let check = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let mut a = Client::connect(&portal, &nqn, 0, 0xffff, &opts(HOST))
                .await
                .unwrap();
            assert!(a.auth_required);
            let e = a.identify(1, 0).await.unwrap_err();
            assert!(
                matches!(e, ClientError::Status(s) if s == Status::AUTH_REQUIRED),
                "{e}"
            );
            let mut h = HostAuth::new(hk.clone(), Some(ck.clone()), HOST, &nqn, 1);
            a.authenticate(&mut h).await.unwrap();
            a.enable().await.unwrap();
            let mut q = Client::connect(&portal, &nqn, 1, a.cntlid, &opts(HOST))
                .await
                .unwrap();
            let mut h = HostAuth::new(hk.clone(), None, HOST, &nqn, 2);
            q.authenticate(&mut h).await.unwrap();
            q.exec(rw(io::WRITE, 0, 1), Some(Arc::new(vec![7; 512])), 0)
                .await
                .unwrap();
            // Another host secret gets nowhere.
            let mut b = Client::connect(&portal, &nqn, 0, 0xffff, &opts(HOST))
                .await
                .unwrap();
            let mut h = HostAuth::new(Secret::generate(None), None, HOST, &nqn, 1);
            assert!(matches!(
                b.authenticate(&mut h).await,
                Err(ClientError::Auth(_))
            ));
        })
    };
    check(&rt);
    m.restart();
    check(&rt);
    assert!(m.log().contains("NVMe host authenticated (DH-HMAC-CHAP)"));
    assert!(m.log().contains("NVMe authentication failed"));
}
