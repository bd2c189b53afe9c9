//! The CI gate's items for the NATS wire format (issue 14; not a stable API): see
//! `bus_core::cost` and `benches/cost.rs`.

use std::time::{Duration, SystemTime};

use bus_core::cost::{measured, wire_envelope, Item};

use crate::wire;

/// What the subscriber hands the decoder besides the message, for a JetStream message.
fn defaults() -> wire::Defaults<'static> {
    wire::Defaults {
        stored: Some(wire::Stored {
            stream: "ORDERS",
            sequence: "42",
        }),
        kind: "orders",
        time: SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(1_700_000_000)),
    }
}

/// `nats.encode`: an envelope into the NATS headers it is published with; `nats.decode`: the
/// received headers and payload back into an envelope. Not counted: the parsing of the header
/// block into a `HeaderMap` (the client's), the payload handed over (an owned `Bytes`, as the
/// client hands it) and the subscriber's defaults (stream and sequence, source name).
///
/// Each decode gets its own `HeaderMap`, as each received message has: the map iterates in
/// the order of its random hash seed, and the decoder's sort costs more or less with that
/// order, so one map for every operation would make the count depend on the run's seed (14%
/// apart from one run to the next); over a map per operation it averages out.
#[must_use]
pub fn items() -> Vec<Item> {
    let sent = wire_envelope();
    let received = sent.clone();
    vec![
        Item::new("nats.encode", move |n| {
            for _ in 0..n {
                measured(|| drop(std::hint::black_box(wire::encode(&sent, "orders-service"))));
            }
        }),
        Item::new("nats.decode", move |n| {
            for _ in 0..n {
                let headers = wire::encode(&received, "orders-service").expect("encodes");
                let payload = received.payload.clone();
                let defaults = defaults();
                measured(|| {
                    drop(std::hint::black_box(wire::decode(
                        Some(&headers),
                        None,
                        payload,
                        defaults,
                    )))
                });
            }
        }),
    ]
}
