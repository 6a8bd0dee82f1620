//! maas-proto: the block-protocol code that both ends of a connection need, so the media engine
//! (targets) and the client probe (initiators) share one implementation without the probe
//! importing the engine: NVMe command and completion layouts ([`nvme::spec`]), NVMe in-band
//! authentication (DH-HMAC-CHAP, [`nvme::auth`], both roles), the NVMe/TCP PDU codec
//! ([`nvme::tcp::pdu`]), the sans-IO host queue ([`nvme::tcp::host`]) with its thin tokio driver
//! ([`nvme::tcp::client`]), and the zero-copy output queue and buffer pool the codecs write into.
//! The NBD client side ([`nbd`]) reads VM disks from hypervisors. Nothing here knows the pool,
//! SQL or HTTP.

pub mod bufpool;
pub mod nbd;
pub mod nvme;
pub mod outq;
