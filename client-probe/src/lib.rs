//! maas-probe: runs on the protected host; talks to maasd's REST API and to the media engine's
//! block protocols only (never to the pool or to server crates).
//!
//! [`ops`] holds the commands; [`attach`] turns an export into a block device of this host
//! through the userspace NVMe/TCP initiator ([`nvme_disk`]), FUSE ([`fuse_disk`]) and a loop
//! device; [`tree`] is the file-tree source, [`image`] the block-device/image source
//! ([`image_backup`] runs it); [`agent`] is `register`/`run` (the probe as the host's agent);
//! [`server`] what the probe asks of maasd.

pub mod agent;
pub mod attach;
pub mod fuse_disk;
pub mod hooks;
pub mod identity;
pub mod image;
pub mod image_backup;
pub mod manifest;
pub mod nbd_source;
pub mod nvme_disk;
pub mod ops;
pub mod postgres;
pub mod restore;
pub mod server;
pub mod sys;
pub mod tree;
