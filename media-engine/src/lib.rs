//! maas-engine: the block front-ends (iSCSI, NVMe/TCP, NBD) that export pool volumes.
//!
//! Every front-end speaks to the pool through one interface, [`maas_pool::BlockDevice`].
//! Protocols are split in two: a sans-IO layer (codecs, negotiation, state machines; unit-tested
//! and fuzzed without sockets) and a thin tokio driver that moves bytes.

pub use maas_pool::BlockDevice;

pub use maas_proto::bufpool;
pub mod flow;
pub mod io_runtimes;
pub mod iscsi;
pub mod listener;
pub mod nvme;
pub use maas_proto::outq;
pub mod read_completions;
pub mod scsi;
pub mod snapfs;
