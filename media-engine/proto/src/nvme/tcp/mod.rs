//! The NVMe/TCP transport (NVMe/TCP transport specification 1.0), host-and-target parts:
//! [`pdu`] (framing and digests), [`host`] (the sans-IO host side of one queue) and its tokio
//! driver [`client`].

pub mod client;
pub mod host;
pub mod pdu;
