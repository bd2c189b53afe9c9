//! The CI gate's items for the RabbitMQ wire format (issue 14; not a stable API): see
//! `bus_core::cost` and `benches/cost.rs`.

use bus_core::cost::{measured, Item};
use bus_core::Envelope;

use crate::wire;

/// The message both items carry: a 256-byte JSON payload, a key, a causation id, a content
/// type, trace context and two application headers.
#[must_use]
pub fn envelope() -> Envelope {
    let parent = Envelope::new("order.created", "{}");
    let payload = format!(r#"{{"order":42,"note":"{}"}}"#, "x".repeat(233));
    Envelope::new("order.placed", payload)
        .caused_by(&parent)
        .with_key("order-42")
        .with_content_type("application/json")
        .with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with_header("tenant", "acme")
}

/// `rabbitmq.encode`: an envelope into the AMQP properties it is published with;
/// `rabbitmq.decode`: received properties and body back into an envelope. The body handed to
/// the decoder is copied outside what is counted: lapin hands the adapter an owned `Vec`.
#[must_use]
pub fn items() -> Vec<Item> {
    let sent = envelope();
    let properties = wire::properties(&sent, "orders", 1).expect("encodes");
    let body = sent.payload.to_vec();
    vec![
        Item::new("rabbitmq.encode", move |n| {
            for _ in 0..n {
                measured(|| drop(std::hint::black_box(wire::properties(&sent, "orders", 1))));
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
