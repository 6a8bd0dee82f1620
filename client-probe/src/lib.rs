//! maas-probe: runs on the protected host; talks to maasd's REST API and to the media engine's
//! block protocols only (never to the pool or to server crates).
//!
//! [`ops`] holds the commands; [`attach`] turns an export into a block device of this host
//! through the userspace NVMe/TCP initiator ([`nvme_disk`]), FUSE ([`fuse_disk`]) and a loop
//! device; [`tree`] is the file-tree source; [`server`] what the probe asks of maasd.

pub mod attach;
pub mod fuse_disk;
pub mod identity;
pub mod manifest;
pub mod nvme_disk;
pub mod ops;
pub mod restore;
pub mod server;
pub mod sys;
pub mod tree;
