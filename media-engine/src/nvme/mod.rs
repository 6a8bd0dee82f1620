//! NVMe over Fabrics target (NVMe Base 1.4, NVMe-oF 1.1), with the TCP transport.
//!
//! The command layer is transport-independent so the RDMA transport can reuse it: [`spec`]
//! (command and completion layouts), [`subsystem`] (exports, hosts, Fabrics Connect),
//! [`controller`] (properties, features, admin commands, events, keep-alive), [`identify`]
//! (Identify data and log pages) and [`io`] (the NVM command set on pool volumes). [`tcp`] is
//! the NVMe/TCP transport: a sans-IO codec and queue state machine, and thin tokio drivers.

pub use maas_proto::nvme::auth;
pub mod controller;
pub mod identify;
pub mod io;
pub use maas_proto::nvme::spec;
pub mod subsystem;
pub mod tcp;
#[cfg(test)]
mod testdisk;

pub use subsystem::{Namespace, NamespaceIdentity, Registry, SubsystemConfig};
pub use tcp::{NvmeTcpServer, QueueConfig};

/// Largest transfer of one command (Identify MDTS, in 4 KiB pages as a power of two).
pub const MDTS: u8 = 8;
pub const MAX_TRANSFER: usize = 4096 << MDTS;
/// Data a command capsule on an I/O queue may carry (IOCCSZ): writes up to this size go with
/// their command, without waiting for an R2T.
pub const IN_CAPSULE_DATA: usize = 64 << 10;
