//! The NVMe/TCP transport (NVMe/TCP transport specification 1.0): [`pdu`] (framing and
//! digests), [`queue`] (the target side of one connection), [`host`] (the host side), the
//! tokio drivers [`server`] and [`client`].

pub mod client;
pub mod host;
pub mod pdu;
pub mod queue;
pub mod server;

pub use queue::QueueConfig;
pub use server::NvmeTcpServer;
