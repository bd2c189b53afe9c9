//! The CI gate's items for the Kafka wire format (issue 14; not a stable API): see
//! `bus_core::cost` and `benches/cost.rs`.
//!
//! The record headers live in librdkafka (`rd_kafka_headers_t`), which allocates with C's
//! `malloc`: its instructions are counted, its allocations are not (only Rust's are).

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use bus_core::cost::{measured, wire_envelope, Item};
use bus_core::Envelope;
use rdkafka::message::OwnedMessage;
use rdkafka::Timestamp;

use crate::wire;

/// The record Kafka would deliver for `envelope`. An `OwnedMessage`: the consumer's
/// `BorrowedMessage` needs a broker, and both read their headers from an `rd_kafka_headers_t`.
fn delivered(envelope: &Envelope) -> OwnedMessage {
    OwnedMessage::new(
        Some(envelope.payload.to_vec()),
        wire::record_key(envelope).map(Cow::into_owned),
        "orders".to_owned(),
        Timestamp::CreateTime(1_700_000_000_000),
        2,
        17,
        Some(wire::encode(envelope, "orders-service", &[])),
    )
}

/// `kafka.encode`: an envelope into the record headers it is published with; `kafka.decode`: a
/// received record read as the subscriber reads it (`Record::of`) and decoded into an envelope.
/// The receive time is fixed, so the count does not depend on the clock.
#[must_use]
pub fn items() -> Vec<Item> {
    let sent = wire_envelope();
    let received = delivered(&sent);
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_001);
    vec![
        Item::new("kafka.encode", move |n| {
            for _ in 0..n {
                measured(|| {
                    drop(std::hint::black_box(wire::encode(
                        &sent,
                        "orders-service",
                        &[],
                    )))
                });
            }
        }),
        Item::new("kafka.decode", move |n| {
            for _ in 0..n {
                measured(|| {
                    drop(std::hint::black_box(wire::decode(
                        &wire::Record::of(&received),
                        at,
                    )))
                });
            }
        }),
    ]
}
