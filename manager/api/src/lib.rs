//! maas-api: the REST API's types, shared by the manager, `maasctl` and the client probe so
//! the probe never depends on server crates.

/// Path prefix of the REST API.
pub const API_PREFIX: &str = "/api/v1";
