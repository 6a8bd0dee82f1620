//! NVMe over Fabrics, the parts both a host and a target need.

pub mod auth;
pub mod spec;
pub mod tcp;
