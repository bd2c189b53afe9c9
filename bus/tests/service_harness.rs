//! The test harness (`bus::service::testing`) as a user's test would use it.
#![cfg(feature = "memory")]

use std::time::Duration;

use bus::service::testing::{Consumed, TestHarness};
use bus::{Context, Error, ErrorKind, Message, Service, Settlement};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    total_cents: u64,
}
impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PaymentRequested {
    order_id: String,
    amount_cents: u64,
}
impl Message for PaymentRequested {
    const KIND: &'static str = "payment.requested";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ReceiptEmail {
    order_id: String,
}
impl Message for ReceiptEmail {
    const KIND: &'static str = "email.receipt";
}

fn order(id: &str, total_cents: u64) -> OrderPlaced {
    OrderPlaced {
        order_id: id.into(),
        total_cents,
    }
}

/// Billing: an order above zero asks for a payment and queues a receipt email; a free order
/// is refused for good; an order `flaky` fails its first attempt.
fn billing(harness: &TestHarness) -> Service {
    Service::new("billing", harness.bus()).on(
        "orders",
        |order: OrderPlaced, ctx: Context| async move {
            if order.total_cents == 0 {
                return Err(Error::new(ErrorKind::Rejected, "nothing to charge"));
            }
            if order.order_id == "flaky" && ctx.attempt() == 1 {
                return Err(Error::new(ErrorKind::Handler, "database busy"));
            }
            let payment = PaymentRequested {
                order_id: order.order_id.clone(),
                amount_cents: order.total_cents,
            };
            ctx.publish("payments", &payment).await?;
            ctx.send(
                "emails",
                &ReceiptEmail {
                    order_id: order.order_id,
                },
            )
            .await?;
            Ok(())
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_service_consumed_published_and_sent_can_be_awaited_by_type() {
    let harness = TestHarness::new();
    let service = billing(&harness).start().await.unwrap();

    let id = harness
        .publish("orders", &order("o-1", 4_200))
        .await
        .unwrap();

    let consumed = harness.acked::<OrderPlaced>().await;
    assert_eq!(consumed.message, order("o-1", 4_200));
    assert_eq!(consumed.envelope.id, id);
    assert_eq!(consumed.source, "orders");
    assert_eq!(consumed.group.as_deref(), Some("billing"));
    assert!(consumed.is_acked());

    let payment = harness.published::<PaymentRequested>().await;
    assert_eq!(payment.destination, "payments");
    assert_eq!(
        payment.message,
        PaymentRequested {
            order_id: "o-1".into(),
            amount_cents: 4_200
        }
    );
    assert_eq!(payment.envelope.causation_id.as_ref(), Some(&id));

    let email = harness.sent::<ReceiptEmail>().await;
    assert_eq!(
        (email.destination.as_str(), email.message.order_id.as_str()),
        ("emails", "o-1")
    );
    assert_eq!(email.envelope.causation_id.as_ref(), Some(&id));

    // A second order: its payment is found by its contents.
    harness.publish("orders", &order("o-2", 10)).await.unwrap();
    let second = harness
        .published_where(|p: &PaymentRequested| p.order_id == "o-2")
        .await;
    assert_eq!(second.message.amount_cents, 10);

    // What the test published itself is recorded too; nothing else was. Counted after the
    // service stopped: its graceful stop lets the second order's handler finish (it sends the
    // email after publishing the payment awaited above).
    service.stop().await;
    assert_eq!(harness.published_all::<OrderPlaced>().len(), 2);
    assert_eq!(harness.published_all::<PaymentRequested>().len(), 2);
    assert_eq!(harness.sent_all::<ReceiptEmail>().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_and_a_retry_are_visible_with_their_settlement() {
    let harness = TestHarness::new();
    let service = billing(&harness).start().await.unwrap();

    harness.publish("orders", &order("free", 0)).await.unwrap();
    let refused = harness.dead_lettered::<OrderPlaced>().await;
    assert_eq!(refused.message.order_id, "free");
    assert_eq!(
        refused.dead_letter_reason(),
        Some("rejected: nothing to charge")
    );

    harness
        .publish("orders", &order("flaky", 100))
        .await
        .unwrap();
    let payment = harness.published::<PaymentRequested>().await;
    assert_eq!(payment.message.order_id, "flaky");
    let acked = harness
        .consumed_where(|c: &Consumed<OrderPlaced>| c.message.order_id == "flaky" && c.is_acked())
        .await;
    assert_eq!(acked.source, "orders");
    let flaky: Vec<_> = harness
        .consumed_all::<OrderPlaced>()
        .into_iter()
        .filter(|c| c.message.order_id == "flaky")
        .map(|c| c.settlement)
        .collect();
    assert_eq!(flaky.len(), 2, "{flaky:?}");
    assert!(matches!(flaky[0], Settlement::Nack(_)), "{flaky:?}");
    assert_eq!(flaky[1], Settlement::Ack);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_never_comes_fails_the_test_saying_what_came_instead() {
    let harness = TestHarness::new().with_timeout(Duration::from_millis(200));
    let service = billing(&harness).start().await.unwrap();
    harness.publish("orders", &order("free", 0)).await.unwrap();
    harness.dead_lettered::<OrderPlaced>().await;

    let waiting = tokio::spawn({
        let harness = harness.clone();
        async move { harness.published::<PaymentRequested>().await }
    });
    let panic = waiting.await.unwrap_err().into_panic();
    let message = panic
        .downcast_ref::<String>()
        .expect("a formatted panic message");
    assert!(
        message.starts_with("no `payment.requested` message (service_harness::PaymentRequested) was published within 200ms"),
        "{message}"
    );
    assert!(message.contains("`order.placed` to orders x1"), "{message}");
    assert!(
        message
            .contains("`order.placed` from orders: dead-lettered (rejected: nothing to charge) x1"),
        "{message}"
    );
    service.stop().await;
}

#[tokio::test]
async fn harness_types_and_futures_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    fn assert_send<T: Send>(_: &T) {}
    assert_send_sync::<TestHarness>();
    assert_send_sync::<bus::service::testing::Consumed<OrderPlaced>>();
    assert_send_sync::<bus::service::testing::Recorded<OrderPlaced>>();
    assert_send_sync::<bus::service::HandlerOptions>();
    let harness = TestHarness::new();
    let published = harness.published::<OrderPlaced>();
    assert_send(&published);
    drop(published);
    let acked = harness.acked::<OrderPlaced>();
    assert_send(&acked);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GetQuote {
    sku: String,
}
impl Message for GetQuote {
    const KIND: &'static str = "quote.get";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Quote {
    cents: u64,
}
impl Message for Quote {
    const KIND: &'static str = "quote";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_replies_can_be_awaited_by_type() {
    let harness = TestHarness::new();
    let pricing = Service::new("pricing", harness.bus())
        .on_request("quotes", |_: GetQuote, _: Context| async {
            Ok(Quote { cents: 99 })
        })
        .start()
        .await
        .unwrap();
    let orders = Service::new("orders", harness.bus())
        .on("orders", |order: OrderPlaced, ctx: Context| async move {
            let quote: Quote = ctx
                .request(
                    "quotes",
                    &GetQuote {
                        sku: order.order_id,
                    },
                    Duration::from_secs(5),
                )
                .await?;
            assert_eq!(quote.cents, 99);
            Ok(())
        })
        .start()
        .await
        .unwrap();

    let order = harness.publish("orders", &order("o-1", 1)).await.unwrap();
    let request = harness.requested::<GetQuote>().await;
    assert_eq!(request.destination, "quotes");
    assert_eq!(request.envelope.causation_id.as_ref(), Some(&order));
    let reply = harness.replied::<Quote>().await;
    assert_eq!(reply.destination, "quotes");
    assert_eq!(reply.message, Quote { cents: 99 });
    assert_eq!(
        reply.envelope.causation_id.as_ref(),
        Some(&request.envelope.id)
    );
    harness.acked::<OrderPlaced>().await;

    orders.stop().await;
    pricing.stop().await;
}
