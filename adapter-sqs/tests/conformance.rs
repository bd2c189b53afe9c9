//! The shared conformance suite against a server speaking the SQS and SNS APIs
//! (`BUS_TEST_SQS_URL`, e.g. `sqs://127.0.0.1:4566?region=us-east-1` for moto started by
//! `scripts/brokers.sh start sqs`).
//!
//! The suite runs twice: on standard queues, and on FIFO queues and topics (`fifo::*`).
//!
//! No restart hook: moto keeps its state in memory, so restarting it loses every queue and
//! message, which proves nothing about SQS, whose durability is AWS's. The restart case is
//! skipped for that reason (see docs/adapters/sqs.md). The fault cases connect through a fault
//! proxy in front of the same server.

use std::sync::Arc;
use std::time::Duration;

use adapter_sqs::aws_sdk_sqs::types::MessageAttributeValue;
use adapter_sqs::{attributes, SqsBroker, SqsConfig};
use base64::Engine as _;
use bus_core::conformance::{broker_url, FaultProxy, Harness, RawMessage};
use bus_core::Broker;
use url::Url;

async fn harness() -> Option<Harness> {
    connect(false).await
}

/// FIFO topics and queues: per-key order, also across the members of a group.
async fn fifo_harness() -> Option<Harness> {
    connect(true).await
}

async fn connect(fifo: bool) -> Option<Harness> {
    let url = broker_url("BUS_TEST_SQS_URL")?;
    let broker = SqsBroker::connect_with(config(&url, fifo))
        .await
        .expect("connect to the test SQS server");
    let raw = broker.clone();
    Some(
        Harness::new(Arc::new(broker))
            .with_raw_publish(move |message| raw_publish(raw.clone(), message))
            .with_fault_proxy(move |proxy| through_proxy(url.clone(), fifo, proxy))
            .with_receive_timeout(Duration::from_secs(30))
            .with_quiet_period(Duration::from_secs(2))
            .with_case_timeout(Duration::from_secs(300)),
    )
}

/// The adapter's configuration for the cases, connecting to `url`.
fn config(url: &str, fifo: bool) -> SqsConfig {
    SqsConfig::from_url(url)
        .expect("BUS_TEST_SQS_URL is a valid sqs:// URL")
        // Short waits keep closing quick; moto answers at once when messages wait. On FIFO no
        // long polling at all: moto 5.2 checks a receive's message groups against the ones in
        // flight when the call starts, so a long poll can take a group another member holds
        // (real SQS does not).
        .with_wait_time(Duration::from_secs(if fifo { 0 } else { 1 }))
        .with_fifo(fifo)
        // The suite publishes the same envelope again on purpose and expects every copy
        // delivered (idempotency_under_injected_duplicates); deduplication by envelope id, the
        // default, would drop them: tests/wire.rs covers it.
        .with_fifo_dedup_by_id(false)
        // A visibility timeout short enough for long_handler_is_not_redelivered (a handler
        // three leases long) to run, long enough that messages waiting in the adapter's
        // prefetch buffer (where no consumer extends them yet) are not redelivered under load.
        .with_visibility_timeout(Duration::from_secs(15))
        // One receive loop per subscription: moto 5.2's ReceiveMessage takes no lock, so two
        // loops receiving from one queue at once can both take the same message, the later
        // with ApproximateReceiveCount 2 although nothing expired; the cases that check a
        // first delivery is attempt 1 then fail about once in 25 runs (round_trip_many,
        // fan_out_two_groups). Real SQS has no such race; docs/adapters/sqs.md, moto quirks.
        .with_pollers(1)
}

/// The same configuration, its endpoint a fault proxy in front of the server of `url`.
async fn through_proxy(url: String, fifo: bool, proxy: FaultProxy) -> Arc<dyn Broker> {
    let mut proxied = Url::parse(&url).expect("BUS_TEST_SQS_URL is a URL");
    let server = proxied
        .socket_addrs(|| None)
        .expect("the SQS server's address")[0];
    proxy.forward_to(server);
    proxied.set_ip_host(proxy.addr().ip()).expect("an IP host");
    proxied.set_port(Some(proxy.addr().port())).expect("a port");
    let broker = SqsBroker::connect_with(config(proxied.as_str(), fifo))
        .await
        .expect("connect to the test SQS server through the fault proxy");
    Arc::new(broker)
}

/// Sends `message` with the plain SQS client, as a service in another language would: the
/// CloudEvents attributes under their SQS binding names (`ce-id`, …; bare names for the
/// extensions `bus` reads, `content-type` for `datacontenttype`), the payload as the body.
/// SQS bodies are text of XML characters, so a payload that is not is sent as bus's own binding
/// writes one: base64 with `bus-body-encoding: base64`.
async fn raw_publish(broker: SqsBroker, message: RawMessage) {
    let sqs = broker.sqs_client();
    let url = sqs
        .get_queue_url()
        .queue_name(broker.queue_name(&message.queue))
        .send()
        .await
        .expect("the case consumed from the queue, so it exists")
        .queue_url()
        .expect("a queue URL")
        .to_owned();
    let text = |value: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(value)
            .build()
            .expect("a string attribute")
    };
    let mut send = sqs.send_message().queue_url(url);
    for (name, value) in &message.cloudevents {
        let name = match name.as_str() {
            "datacontenttype" => attributes::CONTENT_TYPE.to_owned(),
            other => format!("ce-{other}"),
        };
        send = send.message_attributes(name, text(value));
    }
    let body = match std::str::from_utf8(&message.payload) {
        Ok(body) if !body.is_empty() && !body.contains(|c: char| c.is_control()) => body.to_owned(),
        _ if message.payload.is_empty() => {
            send = send.message_attributes(attributes::BODY_ENCODING, text("empty"));
            "(empty)".to_owned()
        }
        _ => {
            send = send.message_attributes(attributes::BODY_ENCODING, text("base64"));
            base64::engine::general_purpose::STANDARD.encode(&message.payload)
        }
    };
    if broker.config().fifo {
        send = send
            .message_group_id("raw-client")
            .message_deduplication_id(uuid::Uuid::now_v7().simple().to_string());
    }
    send.message_body(body)
        .send()
        .await
        .expect("the raw client sends the message");
}

bus_core::conformance_suite!(harness);

mod fifo {
    bus_core::conformance_suite!(super::fifo_harness);
}
