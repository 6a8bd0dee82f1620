//! maas-engine: the block front-ends (iSCSI, NVMe/TCP, NBD) that export pool volumes.
//!
//! Every front-end speaks to the pool through one interface, [`maas_pool::BlockDevice`].
//! The protocol layers arrive with their issues (iSCSI target, NVMe/TCP target).

pub use maas_pool::BlockDevice;
