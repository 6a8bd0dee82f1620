//! Shared helpers for the end-to-end tests under `tests/tests/` (and the manager's tests): the
//! real `maasd` ([`maasd`]), Linux guests with real initiators ([`guest`]) and the third-party
//! tools of `scripts/iscsi-peers.sh` ([`peers`]).

pub mod guest;
pub mod maasd;
pub mod peers;
