//! The NATS adapter of `bus`, over `async-nats`: topics and queues on JetStream (or topics on
//! core NATS when durability is not wanted), native request-reply.
//!
//! Connect with [`NatsBroker::connect`] (`nats://host:4222?…`, see [`NatsConfig::from_url`])
//! or, through the facade, `bus::connect("nats://127.0.0.1:4222")`.
//!
#![doc = include_str!("../README.md")]

mod backlog;
mod broker;
mod config;
#[doc(hidden)]
pub mod cost;
mod dead_letters;
mod delayed;
mod error;
pub mod names;
mod poison;
mod publisher;
mod pulling;
mod request;
mod subscriber;
mod tls;
mod wire;

pub use broker::NatsBroker;
pub use config::{Credentials, NatsConfig, Storage};

/// The names of the headers carrying the envelope's CloudEvents attributes on NATS.
pub mod header_names {
    pub use crate::delayed::DUE;
    pub use crate::wire::{
        CE_CAUSATIONID, CE_CORRELATIONID, CE_DATACONTENTTYPE, CE_ID, CE_PARTITIONKEY, CE_SOURCE,
        CE_SPECVERSION, CE_TIME, CE_TYPE, CONTENT_TYPE, NATS_MSG_ID, ORIGINAL_PREFIX,
    };
}
