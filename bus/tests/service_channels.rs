//! Queue consumers and request responders in a service, and requests from a handler's
//! context, on the in-process broker.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bus::service::{decode_reply, Channel, ServiceReport, ERROR_REPLY_KIND};
use bus::{headers, Bus, Context, Envelope, Error, ErrorKind, Message, Service};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// How long a test waits for something that should happen at once.
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ResizeImage {
    url: String,
}
impl Message for ResizeImage {
    const KIND: &'static str = "image.resize";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CropImage {
    url: String,
}
impl Message for CropImage {
    const KIND: &'static str = "image.crop";
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
    sku: String,
    cents: u64,
}
impl Message for Quote {
    const KIND: &'static str = "quote";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    sku: String,
}
impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
}

async fn memory() -> Bus {
    bus::connect("memory://").await.expect("memory broker")
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for a handler")
        .expect("every sender dropped")
}

fn counts(report: &ServiceReport, channel: Channel, name: &str) -> bus::runtime::ConsumerReport {
    let found = match channel {
        Channel::Queue => report.queue(name),
        Channel::Requests => report.responder(name),
        _ => report.subscription(name),
    };
    *found
        .unwrap_or_else(|| panic!("no {channel} {name} in {report:?}"))
        .consumer
        .as_ref()
        .expect("consumer stopped cleanly")
}

/// A worker service consuming the queue `images`: resize and crop jobs, each handed to `tx`.
fn worker(bus: &Bus, tx: &mpsc::UnboundedSender<(String, String)>) -> Service {
    let (resize_tx, crop_tx) = (tx.clone(), tx.clone());
    Service::new("thumbnails", bus.clone())
        .on_queue("images", move |job: ResizeImage, ctx: Context| {
            let tx = resize_tx.clone();
            async move {
                assert_eq!((ctx.source(), ctx.group()), ("images", None));
                tx.send(("resize".into(), job.url)).unwrap();
                Ok(())
            }
        })
        .on_queue("images", move |job: CropImage, _: Context| {
            let tx = crop_tx.clone();
            async move {
                tx.send(("crop".into(), job.url)).unwrap();
                Ok(())
            }
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_consumers_share_the_jobs_and_each_job_runs_once() {
    let bus = memory().await;
    let (tx, mut done) = mpsc::unbounded_channel();
    let first = worker(&bus, &tx).start().await.unwrap();
    let second = worker(&bus, &tx).start().await.unwrap();

    let mut expected = BTreeSet::new();
    for n in 0..20 {
        let url = format!("https://img/{n}");
        if n % 2 == 0 {
            bus.send_message("images", &ResizeImage { url: url.clone() })
                .await
                .unwrap();
            expected.insert(("resize".to_owned(), url));
        } else {
            bus.send_message("images", &CropImage { url: url.clone() })
                .await
                .unwrap();
            expected.insert(("crop".to_owned(), url));
        }
    }
    let mut handled = BTreeSet::new();
    for _ in 0..20 {
        assert!(handled.insert(recv(&mut done).await), "a job ran twice");
    }
    assert_eq!(handled, expected);

    let (a, b) = (first.stop().await, second.stop().await);
    let (a_counts, b_counts) = (
        counts(&a, Channel::Queue, "images"),
        counts(&b, Channel::Queue, "images"),
    );
    assert_eq!(a_counts.acked + b_counts.acked, 20, "{a:?} {b:?}");
    let queue = a.queue("images").unwrap();
    assert_eq!(queue.group, None, "queues have no groups");
    assert_eq!(queue.kinds, ["image.crop", "image.resize"]);
    assert!(a.subscription("images").is_none(), "a queue is not a topic");
    assert!(done.try_recv().is_err(), "nothing ran twice");
}

/// A pricing service answering `GetQuote` on `quotes`: `gold` costs 10,000 cents, `boom`
/// panics, an unknown sku is an error.
fn pricing(bus: &Bus) -> Service {
    Service::new("pricing", bus.clone()).on_request(
        "quotes",
        |request: GetQuote, _: Context| async move {
            match request.sku.as_str() {
                "gold" => Ok(Quote {
                    sku: request.sku,
                    cents: 10_000,
                }),
                "boom" => panic!("the price list is on fire"),
                other => Err(Error::new(
                    ErrorKind::NotFound,
                    format!("no price for `{other}`"),
                )),
            }
        },
    )
}

async fn ask(bus: &Bus, request: Envelope) -> Envelope {
    bus.request("quotes", request, WAIT)
        .await
        .expect("a reply, not a timeout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_replies_and_its_failures_come_back_as_typed_errors() {
    let bus = memory().await;
    let service = pricing(&bus).start().await.unwrap();

    // The reply: typed, and caused by the request.
    let request = Envelope::encode(&GetQuote { sku: "gold".into() }).unwrap();
    let reply = ask(&bus, request.clone()).await;
    assert_eq!(reply.causation_id.as_ref(), Some(&request.id));
    assert_eq!(reply.correlation_id, request.correlation_id);
    assert_eq!(
        decode_reply::<Quote>(&reply).unwrap(),
        Quote {
            sku: "gold".into(),
            cents: 10_000
        }
    );

    // The handler's error, with its kind and message.
    let reply = ask(
        &bus,
        Envelope::encode(&GetQuote { sku: "tin".into() }).unwrap(),
    )
    .await;
    assert_eq!(reply.kind, ERROR_REPLY_KIND);
    let err = decode_reply::<Quote>(&reply).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("no price for `tin`"), "{err}");

    // A request that is not a `GetQuote`: a serialization error naming the type.
    let reply = ask(&bus, Envelope::new(GetQuote::KIND, r#"{"item":"gold"}"#)).await;
    let err = decode_reply::<Quote>(&reply).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Serialization, "{err}");
    assert!(err.to_string().contains("GetQuote"), "{err}");

    // A kind nobody here answers: not found, at once rather than at the requester's timeout.
    let reply = ask(&bus, Envelope::new("quote.haggle", "{}")).await;
    let err = decode_reply::<Quote>(&reply).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("`quote.haggle`"), "{err}");

    // A panicking handler: an error reply, and the responder carries on.
    let reply = ask(
        &bus,
        Envelope::encode(&GetQuote { sku: "boom".into() }).unwrap(),
    )
    .await;
    assert_eq!(
        decode_reply::<Quote>(&reply).unwrap_err().kind(),
        ErrorKind::Handler
    );
    let reply = ask(
        &bus,
        Envelope::encode(&GetQuote { sku: "gold".into() }).unwrap(),
    )
    .await;
    assert_eq!(decode_reply::<Quote>(&reply).unwrap().cents, 10_000);

    // Bus::request_message reads error replies as decode_reply does.
    let quote: Quote = bus
        .request_message("quotes", &GetQuote { sku: "gold".into() }, WAIT)
        .await
        .unwrap();
    assert_eq!(quote.cents, 10_000);
    let err = bus
        .request_message::<_, Quote>("quotes", &GetQuote { sku: "tin".into() }, WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("no price for `tin`"), "{err}");

    let report = service.stop().await;
    let responder = report.responder("quotes").unwrap();
    assert_eq!(responder.group.as_deref(), Some("pricing"));
    assert_eq!((responder.unknown_kinds, responder.undecodable), (1, 1));
    let counts = counts(&report, Channel::Requests, "quotes");
    assert_eq!(counts.received, 8, "{counts:?}");
    assert_eq!(counts.acked, 3, "the three gold quotes: {counts:?}");
    assert_eq!(counts.panicked, 1, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_from_a_handler_carries_correlation_causation_and_trace_context() {
    let bus = memory().await;

    // The responder hands every request it sees to the test.
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let pricing = Service::new("pricing", bus.clone())
        .on_request("quotes", move |request: GetQuote, ctx: Context| {
            let seen_tx = seen_tx.clone();
            async move {
                seen_tx.send(ctx.envelope().clone()).unwrap();
                Ok(Quote {
                    sku: request.sku,
                    cents: 250,
                })
            }
        })
        .start()
        .await
        .unwrap();

    // The order service asks for a quote while handling an order.
    let (quoted_tx, mut quoted) = mpsc::unbounded_channel();
    let orders = Service::new("orders", bus.clone())
        .on("orders", move |order: OrderPlaced, ctx: Context| {
            let quoted_tx = quoted_tx.clone();
            async move {
                let quote: Quote = ctx
                    .request("quotes", &GetQuote { sku: order.sku }, WAIT)
                    .await?;
                quoted_tx.send(quote).unwrap();
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let order = Envelope::encode(&OrderPlaced {
        order_id: "o-1".into(),
        sku: "pen".into(),
    })
    .unwrap()
    .with_correlation_id("checkout-7")
    .with_header(headers::TRACEPARENT, traceparent);
    bus.publish("orders", order.clone()).await.unwrap();

    let request = timeout(WAIT, seen.recv()).await.unwrap().unwrap();
    assert_eq!(request.kind, GetQuote::KIND);
    assert_eq!(request.correlation_id.as_str(), "checkout-7");
    assert_eq!(request.causation_id.as_ref(), Some(&order.id));
    assert_eq!(request.header(headers::TRACEPARENT), Some(traceparent));
    assert_eq!(
        recv(&mut quoted).await,
        Quote {
            sku: "pen".into(),
            cents: 250
        }
    );

    let report = orders.stop().await;
    assert_eq!(counts(&report, Channel::Topic, "orders").acked, 1);
    let report = pricing.stop().await;
    assert_eq!(counts(&report, Channel::Requests, "quotes").acked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_nobody_serves_fails_with_no_responders() {
    let bus = memory().await;
    let (tx, mut errors) = mpsc::unbounded_channel();
    let service = Service::new("orders", bus.clone())
        .on("orders", move |order: OrderPlaced, ctx: Context| {
            let tx = tx.clone();
            async move {
                let asked = ctx
                    .request::<_, Quote>("quotes", &GetQuote { sku: order.sku }, WAIT)
                    .await;
                tx.send(asked.unwrap_err().kind()).unwrap();
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    bus.publish_message(
        "orders",
        &OrderPlaced {
            order_id: "o-1".into(),
            sku: "pen".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(recv(&mut errors).await, ErrorKind::NoResponders);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_responder_lets_the_request_in_flight_get_its_reply() {
    let bus = memory().await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let permits = release.clone();
    let service = Service::new("pricing", bus.clone())
        .with_shutdown_timeout(WAIT)
        .on_request("quotes", move |request: GetQuote, _: Context| {
            let (started_tx, permits) = (started_tx.clone(), permits.clone());
            async move {
                started_tx.send(request.sku.clone()).unwrap();
                permits.acquire().await.unwrap().forget();
                Ok(Quote {
                    sku: request.sku,
                    cents: 1,
                })
            }
        })
        .start()
        .await
        .unwrap();

    let requester = bus.clone();
    let in_flight = tokio::spawn(async move {
        let request = Envelope::encode(&GetQuote { sku: "pen".into() }).unwrap();
        let reply = requester.request("quotes", request, WAIT).await?;
        decode_reply::<Quote>(&reply)
    });
    assert_eq!(recv(&mut started).await, "pen");
    let stopping = tokio::spawn(service.stop());
    release.add_permits(1);
    let quote = timeout(WAIT, in_flight).await.unwrap().unwrap().unwrap();
    assert_eq!(quote.sku, "pen");
    let report = timeout(WAIT, stopping).await.unwrap().unwrap();
    let counts = counts(&report, Channel::Requests, "quotes");
    assert_eq!((counts.received, counts.acked, counts.abandoned), (1, 1, 0));

    // Stopped: nobody serves the channel any more.
    let request = Envelope::encode(&GetQuote { sku: "ink".into() }).unwrap();
    let err = bus.request("quotes", request, WAIT).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoResponders, "{err}");
}
