//! maas-manager: intent. The REST API, the catalog (diesel: SQLite or PostgreSQL), jobs,
//! auth, and the binaries `maasd` (manager + engine + pool in one process) and `maasctl`.
//! The manager never touches backup data on the data path: it asks the pool and the engine.

pub mod api;
pub mod archive;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod engine;
pub mod error;
pub mod files;
pub mod hosts;
pub mod identity;
pub mod jobs;
pub mod manifest;
pub mod reconcile;
pub mod secrets;
pub mod server;
pub mod state;
pub mod tls;
