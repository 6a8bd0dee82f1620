//! A small tokio NVMe/TCP host over [`HostQueue`]: connects a queue (ICReq, Fabrics Connect),
//! runs commands one at a time or keeps many in flight. For load generation and tests.

use std::sync::Arc;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use super::host::{HostCompletion, HostError, HostQueue};
use super::pdu::{Decoded, Pdu, PduError};
use crate::nvme::auth::{HostAuth, SECP_DHCHAP, msg, reason};
use crate::nvme::spec::{Sqe, Status, admin, fctype, prop, put_str, put16};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("bad PDU from the controller: {0}")]
    Pdu(#[from] PduError),
    #[error("command failed: {0:?}")]
    Status(Status),
    #[error("connection closed by the controller")]
    Closed,
    #[error("DH-HMAC-CHAP authentication failed: {}", reason::describe(*.0))]
    Auth(u8),
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub header_digest: bool,
    pub data_digest: bool,
    pub kato_ms: u32,
    /// Queue size (0-based) asked for in Connect.
    pub sqsize: u16,
    pub disable_sq_flow_control: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000maas".into(),
            hostid: [0x4d; 16],
            header_digest: false,
            data_digest: false,
            kato_ms: 0,
            sqsize: 127,
            disable_sq_flow_control: false,
        }
    }
}

/// One connected queue.
pub struct Client {
    stream: TcpStream,
    q: HostQueue,
    inbuf: Vec<u8>,
    /// Bytes of `inbuf` already decoded (compacted once per read, not once per PDU).
    consumed: usize,
    outbuf: Vec<u8>,
    pub cntlid: u16,
    pub qid: u16,
    /// The Connect response asked for in-band authentication (AUTHREQ.ATR).
    pub auth_required: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("cntlid", &self.cntlid)
            .field("qid", &self.qid)
            .finish()
    }
}

impl Client {
    /// Connects queue `qid` of controller `cntlid` (0xFFFF for a new one on the admin queue).
    pub async fn connect(
        addr: &str,
        subnqn: &str,
        qid: u16,
        cntlid: u16,
        opts: &ClientOptions,
    ) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let admin_icd = 8192;
        let mut c = Client {
            stream,
            q: HostQueue::new(admin_icd, 4 << 20),
            inbuf: Vec::with_capacity(1 << 20),
            consumed: 0,
            outbuf: Vec::new(),
            cntlid,
            qid,
            auth_required: false,
        };
        let req = HostQueue::ic_req(opts.header_digest, opts.data_digest);
        c.q.framer().encode(&req, &mut c.outbuf);
        c.flush_out().await?;
        match c.read_pdu().await? {
            Pdu::IcResp(r) => c.q.on_ic_resp(&req, &r)?,
            other => {
                return Err(HostError::Protocol(format!("expected ICResp, got {other:?}")).into());
            }
        }
        let mut sqe = Sqe::new(admin::FABRICS, 0, 0);
        sqe.0[4] = fctype::CONNECT;
        sqe.set_cdw(10, u32::from(qid) << 16);
        let sqsize = if qid == 0 {
            opts.sqsize.min(31)
        } else {
            opts.sqsize
        };
        let cattr = if opts.disable_sq_flow_control {
            0x04
        } else {
            0
        };
        sqe.set_cdw(11, u32::from(sqsize) | (cattr << 16));
        sqe.set_cdw(12, if qid == 0 { opts.kato_ms } else { 0 });
        let mut data = vec![0u8; 1024];
        data[..16].copy_from_slice(&opts.hostid);
        put16(&mut data, 16, cntlid);
        put_str(&mut data, 256, 256, subnqn, 0);
        put_str(&mut data, 512, 256, &opts.hostnqn, 0);
        let done = c.exec(sqe, Some(Arc::new(data)), 0).await?;
        c.cntlid = done.cqe.dw0 as u16;
        c.auth_required = done.cqe.dw0 & (1 << 17) != 0;
        Ok(c)
    }

    /// Authentication Send of one DH-HMAC-CHAP message (SECP E9h, SPSP 0101h).
    pub async fn auth_send(&mut self, msg: Vec<u8>) -> Result<HostCompletion, ClientError> {
        let mut sqe = Sqe::new(admin::FABRICS, 0, 0);
        sqe.0[4] = fctype::AUTH_SEND;
        sqe.set_cdw(10, (u32::from(SECP_DHCHAP) << 24) | (1 << 16) | (1 << 8));
        sqe.set_cdw(11, msg.len() as u32);
        self.exec_status(sqe, Some(Arc::new(msg)), 0).await
    }

    /// Authentication Receive with an allocation length of `al` bytes.
    pub async fn auth_receive(&mut self, al: usize) -> Result<HostCompletion, ClientError> {
        let mut sqe = Sqe::new(admin::FABRICS, 0, 0);
        sqe.0[4] = fctype::AUTH_RECEIVE;
        sqe.set_cdw(10, (u32::from(SECP_DHCHAP) << 24) | (1 << 16) | (1 << 8));
        sqe.set_cdw(11, al as u32);
        self.exec_status(sqe, None, al).await
    }

    /// A whole DH-HMAC-CHAP transaction on this queue, as Linux runs it. Err(Auth(reason))
    /// when either side refused.
    pub async fn authenticate(&mut self, host: &mut HostAuth) -> Result<(), ClientError> {
        let ok = |d: HostCompletion| {
            if d.cqe.status.is_success() {
                Ok(d)
            } else {
                Err(ClientError::Status(d.cqe.status))
            }
        };
        ok(self.auth_send(host.negotiate()).await?)?;
        let challenge = ok(self.auth_receive(4096).await?)?;
        let reply = match host.on_challenge(&challenge.data) {
            Ok(r) => r,
            Err(why) => {
                if challenge.data.get(1) != Some(&msg::FAILURE1) {
                    let _ = self.auth_send(host.failure2(why)).await;
                }
                return Err(ClientError::Auth(why));
            }
        };
        ok(self.auth_send(reply).await?)?;
        let success1 = ok(self.auth_receive(4096).await?)?;
        match host.on_success1(&success1.data) {
            Ok(Some(success2)) => ok(self.auth_send(success2).await?).map(|_| ()),
            Ok(None) => Ok(()),
            Err(why) => {
                if success1.data.get(1) != Some(&msg::FAILURE1) {
                    let _ = self.auth_send(host.failure2(why)).await;
                }
                Err(ClientError::Auth(why))
            }
        }
    }

    /// After Identify: the I/O queue's in-capsule data size.
    pub fn set_in_capsule(&mut self, bytes: usize) {
        self.q.set_in_capsule(bytes);
    }

    pub fn outstanding(&self) -> usize {
        self.q.outstanding()
    }

    async fn flush_out(&mut self) -> Result<(), ClientError> {
        if !self.outbuf.is_empty() {
            self.stream.write_all(&self.outbuf).await?;
            self.outbuf.clear();
        }
        Ok(())
    }

    /// Reads one PDU, writing queued output meanwhile (so neither side can block the other).
    async fn read_pdu(&mut self) -> Result<Pdu, ClientError> {
        let mut sent = 0;
        loop {
            match self.q.framer().decode(&self.inbuf[self.consumed..])? {
                Decoded::Pdu(p, n) => {
                    self.consumed += n;
                    if sent > 0 {
                        self.outbuf.drain(..sent);
                    }
                    return Ok(p);
                }
                Decoded::NeedMore(n) => {
                    self.inbuf.drain(..self.consumed);
                    self.consumed = 0;
                    self.inbuf.reserve(n.saturating_sub(self.inbuf.len()));
                }
            }
            let interest = if sent < self.outbuf.len() {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let ready = self.stream.ready(interest).await?;
            if ready.is_writable() && sent < self.outbuf.len() {
                match self.stream.try_write(&self.outbuf[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if ready.is_readable() {
                if self.inbuf.capacity() - self.inbuf.len() < 64 * 1024 {
                    self.inbuf.reserve(256 * 1024);
                }
                match self.stream.try_read_buf(&mut self.inbuf) {
                    Ok(0) => return Err(ClientError::Closed),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    /// Sends a command without waiting for it; returns its command id.
    pub async fn submit(
        &mut self,
        sqe: Sqe,
        data_out: Option<Arc<Vec<u8>>>,
        data_in: usize,
    ) -> Result<u16, ClientError> {
        let cid = self.q.submit(sqe, data_out, data_in, &mut self.outbuf);
        self.flush_out().await?;
        Ok(cid)
    }

    /// Waits for the next command to complete (answering R2Ts meanwhile).
    pub async fn next(&mut self) -> Result<HostCompletion, ClientError> {
        loop {
            let pdu = self.read_pdu().await?;
            let mut out = std::mem::take(&mut self.outbuf);
            let r = self.q.on_pdu(pdu, &mut out);
            self.outbuf = out;
            if let Some(done) = r? {
                self.flush_out().await?;
                return Ok(done);
            }
        }
    }

    /// Runs one command to completion; a failed status is an error.
    pub async fn exec(
        &mut self,
        sqe: Sqe,
        data_out: Option<Arc<Vec<u8>>>,
        data_in: usize,
    ) -> Result<HostCompletion, ClientError> {
        let done = self.exec_status(sqe, data_out, data_in).await?;
        if !done.cqe.status.is_success() {
            return Err(ClientError::Status(done.cqe.status));
        }
        Ok(done)
    }

    /// Runs one command to completion, whatever its status.
    pub async fn exec_status(
        &mut self,
        sqe: Sqe,
        data_out: Option<Arc<Vec<u8>>>,
        data_in: usize,
    ) -> Result<HostCompletion, ClientError> {
        let cid = self.submit(sqe, data_out, data_in).await?;
        let done = self.next().await?;
        if done.cqe.cid != cid {
            return Err(HostError::Protocol(format!(
                "completion for {} while waiting for {cid}",
                done.cqe.cid
            ))
            .into());
        }
        Ok(done)
    }

    pub async fn property_get(&mut self, ofst: u32, eight: bool) -> Result<u64, ClientError> {
        let mut sqe = Sqe::new(admin::FABRICS, 0, 0);
        sqe.0[4] = fctype::PROPERTY_GET;
        sqe.set_cdw(10, u32::from(eight));
        sqe.set_cdw(11, ofst);
        let d = self.exec(sqe, None, 0).await?;
        Ok(u64::from(d.cqe.dw0) | (u64::from(d.cqe.dw1) << 32))
    }

    pub async fn property_set(&mut self, ofst: u32, value: u32) -> Result<(), ClientError> {
        let mut sqe = Sqe::new(admin::FABRICS, 0, 0);
        sqe.0[4] = fctype::PROPERTY_SET;
        sqe.set_cdw(11, ofst);
        sqe.set_cdw(12, value);
        self.exec(sqe, None, 0).await.map(|_| ())
    }

    /// CC.EN with 64-byte SQEs and 16-byte CQEs, then waits for CSTS.RDY.
    pub async fn enable(&mut self) -> Result<(), ClientError> {
        self.property_set(prop::CC, 1 | (6 << 16) | (4 << 20))
            .await?;
        for _ in 0..100 {
            if self.property_get(prop::CSTS, false).await? & 1 == 1 {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Err(HostError::Protocol("controller never became ready".into()).into())
    }

    pub async fn identify(&mut self, cns: u8, nsid: u32) -> Result<Vec<u8>, ClientError> {
        let mut sqe = Sqe::new(admin::IDENTIFY, 0, nsid);
        sqe.set_cdw(10, u32::from(cns));
        Ok(self.exec(sqe, None, 4096).await?.data)
    }
}
