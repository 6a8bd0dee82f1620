//! The NVMe/TCP transport (NVMe/TCP transport specification 1.0): [`pdu`] (framing and
//! digests), [`queue`] (the target side of one connection), [`host`] (the host side), the
//! tokio drivers [`server`] and [`client`]. The codec and the host side live in `maas-proto`,
//! shared with the client probe; they are re-exported here under their old paths.

pub use maas_proto::nvme::tcp::{client, host, pdu};
pub mod queue;
pub mod server;

pub use queue::QueueConfig;
pub use server::NvmeTcpServer;
