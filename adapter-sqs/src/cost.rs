//! The CI gate's items for the SQS wire format (issue 14; not a stable API): see
//! `bus_core::cost` and `benches/cost.rs`.

use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName};
use bus_core::cost::{measured, wire_envelope, Item};
use bus_core::Envelope;

use crate::wire;

/// What the adapter sends for `envelope`: the wire form and the SDK's attribute map.
fn encode(envelope: &Envelope) -> usize {
    let wire = wire::encode(envelope, "orders-service", &[], 262_144).expect("encodes");
    let attributes = crate::broker::sqs_attributes(&wire).expect("attributes");
    wire.body.len() + attributes.len()
}

/// The message SQS would deliver for `envelope`, as the SDK hands it over.
fn delivered(envelope: &Envelope) -> Message {
    let wire = wire::encode(envelope, "orders-service", &[], 262_144).expect("encodes");
    let mut message = Message::builder()
        .message_id("5fea7756-0ea4-451a-a703-a558b933e274")
        .receipt_handle("AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a")
        .body(&wire.body)
        .attributes(MessageSystemAttributeName::SentTimestamp, "1700000000000")
        .attributes(MessageSystemAttributeName::ApproximateReceiveCount, "1");
    for (name, value) in &wire.attributes {
        let value = MessageAttributeValue::builder()
            .data_type(wire::STRING)
            .string_value(value)
            .build()
            .expect("attribute");
        message = message.message_attributes(name, value);
    }
    message.build()
}

/// `sqs.encode`: an envelope into the wire form and the SDK's attribute map; `sqs.decode`: a
/// received SDK message back into an envelope. The shared envelope makes ten attributes with
/// the required ones, so nothing is packed.
#[must_use]
pub fn items() -> Vec<Item> {
    let sent = wire_envelope();
    let received = delivered(&sent);
    vec![
        Item::new("sqs.encode", move |n| {
            for _ in 0..n {
                measured(|| encode(&sent));
            }
        }),
        Item::new("sqs.decode", move |n| {
            for _ in 0..n {
                measured(|| {
                    drop(std::hint::black_box(wire::decode(
                        wire::Received::from_message(&received),
                    )))
                });
            }
        }),
    ]
}
