//! The CI gate's items for the RabbitMQ wire format (issue 14; not a stable API): see
//! `bus_core::cost` and `benches/cost.rs`.

use bus_core::cost::{measured, wire_envelope, Item};

use crate::wire;

/// `rabbitmq.encode`: an envelope into the AMQP properties it is published with;
/// `rabbitmq.decode`: received properties and body back into an envelope. The body handed to
/// the decoder is copied outside what is counted: lapin hands the adapter an owned `Vec`.
#[must_use]
pub fn items() -> Vec<Item> {
    let sent = wire_envelope();
    let properties = wire::properties(&sent, "bus", 1).expect("encodes");
    let body = sent.payload.to_vec();
    vec![
        Item::new("rabbitmq.encode", move |n| {
            for _ in 0..n {
                measured(|| drop(std::hint::black_box(wire::properties(&sent, "bus", 1))));
            }
        }),
        Item::new("rabbitmq.decode", move |n| {
            for _ in 0..n {
                let body = body.clone();
                measured(|| drop(std::hint::black_box(wire::envelope(&properties, body))));
            }
        }),
    ]
}
