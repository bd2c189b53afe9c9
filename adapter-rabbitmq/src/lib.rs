//! The RabbitMQ adapter of `bus`, over `lapin`.
//!
//! **Not built yet.** This crate is an empty placeholder so the workspace has its final shape;
//! issue #5 fills it. Until then `bus::connect` answers a `rabbitmq` URL with a clear
//! `ErrorKind::Config` error, and nothing here pretends to work.

/// Whether this adapter is implemented. The facade reads it to refuse the URL scheme clearly.
pub const IMPLEMENTED: bool = false;

/// The issue that builds this adapter.
pub const TRACKING_ISSUE: u32 = 5;
