//! Core NATS subscriptions (`BUS_TEST_NATS_URL`): topics with `durable=false` and request
//! responders. Core NATS keeps nothing, so a message reaches a subscriber only if the server
//! already has its subscription: once `subscribe` or `serve` has returned, what another
//! connection sends must arrive.

use std::time::Duration;

use adapter_nats::NatsBroker;
use bus_core::conformance::broker_url;
use bus_core::{Responder, ServeOptions, SubscribeOptions, Subscriber};
use bytes::Bytes;

/// Subscriptions made one after another, each racing a publish from another connection.
const ROUNDS: usize = 20;

async fn connect() -> Option<(NatsBroker, async_nats::Client)> {
    let url = broker_url("BUS_TEST_NATS_URL")?;
    let separator = if url.contains('?') { '&' } else { '?' };
    let bus = NatsBroker::connect(&format!("{url}{separator}durable=false"))
        .await
        .expect("connect");
    let other = async_nats::connect(url.as_str())
        .await
        .expect("connect another client");
    Some((bus, other))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_subscription_is_on_the_server_when_subscribe_returns() {
    let Some((bus, other)) = connect().await else {
        return;
    };
    for round in 0..ROUNDS {
        let topic = format!("core.subscribed.{}", bus_core::MessageId::new());
        let options = if round % 2 == 0 {
            SubscribeOptions::group("g")
        } else {
            SubscribeOptions::default()
        };
        let mut subscription = bus.subscribe(&topic, options).await.expect("subscribe");
        other
            .publish(
                bus.topic_subject(&topic),
                Bytes::from_static(b"right after"),
            )
            .await
            .expect("publish");
        other.flush().await.expect("flush");
        let delivery = tokio::time::timeout(Duration::from_secs(5), subscription.next())
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: published after subscribe returned, never received")
            })
            .expect("open")
            .expect("no error");
        assert_eq!(delivery.envelope().payload.as_ref(), b"right after");
        delivery.ack().await.expect("ack");
        subscription.close().await.expect("close");
    }
    let _ = bus_core::Broker::close(&bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_is_on_the_server_when_serve_returns() {
    let Some((bus, other)) = connect().await else {
        return;
    };
    for round in 0..ROUNDS {
        let topic = format!("core.served.{}", bus_core::MessageId::new());
        let mut requests = bus
            .serve(&topic, ServeOptions::default())
            .await
            .expect("serve");
        let answered = tokio::spawn(async move {
            let request = requests.next().await.expect("open").expect("no error");
            let response = bus_core::Envelope::new("pong", "pong");
            request.reply(response).await.expect("reply");
            requests
        });
        let reply = other
            .request(bus.request_subject(&topic), Bytes::from_static(b"ping"))
            .await
            .unwrap_or_else(|e| panic!("round {round}: requested after serve returned: {e}"));
        assert_eq!(reply.payload.as_ref(), b"pong");
        let mut requests = answered.await.expect("the responder");
        requests.close().await.expect("close");
    }
    let _ = bus_core::Broker::close(&bus).await;
}
