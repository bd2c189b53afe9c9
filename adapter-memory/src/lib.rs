//! The in-process broker of `bus`: the embedded default, and the reference semantics every
//! other adapter is measured against by the conformance suite.
//!
//! It needs no setup, keeps everything in the process, and behaves as the design says a broker
//! should: consumer groups with fan-out and competition, queues, per-key order, nack with
//! delay, redelivery of dropped deliveries, a dead-letter queue, native request-reply, and
//! bounded memory with backpressure. Limits of other brokers (payload size, header count) can
//! be imitated through [`MemoryConfig`], so a service can be tested against them without the
//! real broker.
//!
//! Start with [`MemoryBroker`]; through the facade it is `bus::connect("memory://")`.

mod broker;
mod buffer;
mod chaos;
mod config;
mod reply;

pub use broker::MemoryBroker;
pub use config::{Chaos, MemoryConfig};
