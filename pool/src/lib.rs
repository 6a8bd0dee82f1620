//! maas-pool: the bytes of MaaS.
//!
//! A pool spans one or more devices (files or block devices, each tagged with a tier). Live
//! volumes take writes into a write-ahead log (durable on flush/FUA, group-committed) and an
//! in-memory overlay; sealing folds the overlay into content-addressed, compressed,
//! deduplicated chunks and a new index in O(changed data), producing a snapshot that is a
//! complete image. A clone is a new live volume over any snapshot's index, in O(1). Space is
//! reclaimed by reference counting in the transactional metadata store.
//!
//! The pool knows nothing above it: no networking, SQL or HTTP.

pub mod aio;
pub mod alloc;
pub mod archive;
mod cache;
pub mod config;
pub mod device;
pub mod error;
mod fold;
pub mod fsmode;
pub mod import;
pub mod index;
pub mod io;
pub mod meta;
pub mod object;
pub mod overlay;
mod pool;
pub mod powerloss;
pub mod ramtier;
mod refs;
pub mod remote;
pub mod replay;
mod shared;
mod snapread;
mod stats;
pub mod types;
mod volio;
pub mod wal;
pub mod walfmt;

pub use config::{CreateOptions, DeviceSpec, OpenOptions};
pub use error::{PoolError, Result};
pub use pool::{Pool, SnapshotInfo, VolumeInfo};
pub use ramtier::{AutoParts, AutoRamTier, RamPolicy, RamTierStats};
pub use snapread::SnapshotReader;
pub use stats::{AsyncReadStats, DamagedBlock, DamagedObject, ImageStats, PoolStats, VerifyReport};
pub use types::{SnapshotId, Tier, VolumeId};
pub use volio::{AsyncRead, BlockDevice, ProvisioningRun, Volume};
