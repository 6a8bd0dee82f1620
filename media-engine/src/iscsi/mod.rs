//! iSCSI target (RFC 7143), ERL 0, one connection per session.
//!
//! Sans-IO layers: [`pdu`] (framing and digests), [`text`] (key=value), [`chap`], [`login`]
//! (stages, authentication, negotiation), [`session`] (full feature phase) and [`inbound`]
//! (what a connection received, PDU by PDU, into its session). [`server`] is the thin tokio
//! driver; [`target`] holds what is exported and who is logged in.

pub mod chap;
pub mod inbound;
pub mod login;
pub mod params;
pub mod pdu;
pub mod server;
pub mod session;
pub mod target;
pub mod text;

pub use server::IscsiServer;
pub use target::{ChapSecrets, Registry, TargetConfig};
