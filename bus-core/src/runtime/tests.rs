//! Consumer runtime tests over a channel-driven fake subscription that records settlements.

use std::collections::{HashMap, HashSet};
use std::future::pending;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tower_layer::Layer;

use crate::middleware::{CatchPanicLayer, Panicked, TimeoutLayer};
use crate::runtime::{
    handler_fn, Consumer, ConsumerHandle, ConsumerReport, DeliveryInfo, Handler, HandlerBuilder,
    KeyOrder, Outcome,
};
use crate::{
    Delivery, DeliverySource, Envelope, Error, ErrorKind, Redeliver, Result, Settle, Settlement,
    Subscription,
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Start(String),
    Settle(String, Settlement),
    SettleFailed(String),
    Abandon(String),
    Progress(String),
}

/// The broker side of the fake: what happened, in order.
#[derive(Debug)]
struct FakeBroker {
    log: Mutex<Vec<Event>>,
    /// Settling the named message fails this many more times with this kind.
    failing: Mutex<HashMap<String, (u32, ErrorKind)>>,
    /// Settling these messages panics (an adapter bug).
    panicking: Mutex<HashSet<String>>,
    /// Extending the lease of these messages never returns (a broker call that hangs).
    hanging: Mutex<HashSet<String>>,
    closed: AtomicBool,
    received: watch::Sender<usize>,
    settled: watch::Sender<usize>,
}

impl FakeBroker {
    fn push(&self, event: Event) {
        self.log.lock().unwrap().push(event);
    }

    fn events(&self) -> Vec<Event> {
        self.log.lock().unwrap().clone()
    }

    fn settlements(&self) -> HashMap<String, Settlement> {
        let mut map = HashMap::new();
        for event in self.events() {
            if let Event::Settle(name, settlement) = event {
                assert!(map.insert(name, settlement).is_none(), "settled twice");
            }
        }
        map
    }

    /// How many times the lease of `name` was extended.
    fn progress(&self, name: &str) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Progress(n) if n == name))
            .count()
    }

    fn abandoned(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Abandon(name) => Some(name),
                _ => None,
            })
            .collect();
        names.sort();
        names
    }
}

#[derive(Debug)]
struct FakeSettle {
    name: String,
    broker: Arc<FakeBroker>,
}

#[async_trait]
impl Settle for FakeSettle {
    async fn settle(&self, settlement: Settlement) -> Result<()> {
        assert!(
            !self.broker.panicking.lock().unwrap().contains(&self.name),
            "settling {} panics",
            self.name
        );
        if let Some((left, kind)) = self.broker.failing.lock().unwrap().get_mut(&self.name) {
            if *left > 0 {
                *left -= 1;
                self.broker.push(Event::SettleFailed(self.name.clone()));
                return Err(Error::new(*kind, "settlement failed"));
            }
        }
        self.broker
            .push(Event::Settle(self.name.clone(), settlement));
        self.broker.settled.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn in_progress(&self) -> Result<()> {
        self.broker.push(Event::Progress(self.name.clone()));
        if self.broker.hanging.lock().unwrap().contains(&self.name) {
            pending::<()>().await;
        }
        Ok(())
    }

    fn abandon(&self) {
        self.broker.push(Event::Abandon(self.name.clone()));
    }
}

#[derive(Debug)]
struct FakeSource {
    rx: mpsc::UnboundedReceiver<Result<Delivery>>,
    broker: Arc<FakeBroker>,
    lease: Option<Duration>,
    keeps_key_order: bool,
    /// Whether `try_next` hands out what was fed; if not, everything comes through `next`,
    /// as from the adapters that keep the default.
    ready: bool,
}

#[async_trait]
impl DeliverySource for FakeSource {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let item = self.rx.recv().await;
        if let Some(Ok(_)) = &item {
            self.broker.received.send_modify(|n| *n += 1);
        }
        item
    }

    /// What the test has fed already comes without waiting, as from a broker's buffer, so
    /// that every test here also runs the consumer's taking of ready deliveries.
    fn try_next(&mut self) -> Option<Result<Delivery>> {
        if !self.ready {
            return None;
        }
        let item = self.rx.try_recv().ok()?;
        if item.is_ok() {
            self.broker.received.send_modify(|n| *n += 1);
        }
        Some(item)
    }

    async fn close(&mut self) -> Result<()> {
        self.broker.closed.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn lease(&self) -> Option<Duration> {
        self.lease
    }

    fn keeps_key_order(&self) -> bool {
        self.keeps_key_order
    }
}

/// The test's end of the fake subscription.
struct Feed {
    tx: Option<mpsc::UnboundedSender<Result<Delivery>>>,
    broker: Arc<FakeBroker>,
}

fn fake() -> (Feed, Subscription) {
    fake_source(None, false)
}

/// A fake subscription whose broker redelivers what is held longer than `lease`.
fn fake_with_lease(lease: Option<Duration>) -> (Feed, Subscription) {
    fake_source(lease, false)
}

/// A fake subscription that declares per-key order, so the consumer retries in place.
fn fake_ordered(lease: Option<Duration>) -> (Feed, Subscription) {
    fake_source(lease, true)
}

/// A fake subscription whose deliveries all come through `next` (the default `try_next`).
fn fake_without_ready() -> (Feed, Subscription) {
    fake_source_with(None, false, false)
}

fn fake_source(lease: Option<Duration>, keeps_key_order: bool) -> (Feed, Subscription) {
    fake_source_with(lease, keeps_key_order, true)
}

fn fake_source_with(
    lease: Option<Duration>,
    keeps_key_order: bool,
    ready: bool,
) -> (Feed, Subscription) {
    let (tx, rx) = mpsc::unbounded_channel();
    let broker = Arc::new(FakeBroker {
        log: Mutex::default(),
        failing: Mutex::default(),
        panicking: Mutex::default(),
        hanging: Mutex::default(),
        closed: AtomicBool::new(false),
        received: watch::channel(0).0,
        settled: watch::channel(0).0,
    });
    let source = FakeSource {
        rx,
        broker: broker.clone(),
        lease,
        keeps_key_order,
        ready,
    };
    (
        Feed {
            tx: Some(tx),
            broker,
        },
        Subscription::new(Box::new(source)),
    )
}

impl Feed {
    /// Sends a message whose payload is `name`, with `key`.
    fn send(&self, name: &str, key: Option<&str>) {
        let delivery = self.delivery(name, key);
        self.tx.as_ref().unwrap().send(Ok(delivery)).unwrap();
    }

    /// Sends a message the adapter could not decode, for `reason`.
    fn send_undecodable(&self, name: &str, key: Option<&str>, reason: &str) {
        let delivery = self.delivery(name, key).with_undecodable(reason);
        self.tx.as_ref().unwrap().send(Ok(delivery)).unwrap();
    }

    fn delivery(&self, name: &str, key: Option<&str>) -> Delivery {
        let mut envelope = Envelope::new("test", name.to_owned());
        envelope.key = key.map(str::to_owned);
        let settle = FakeSettle {
            name: name.to_owned(),
            broker: self.broker.clone(),
        };
        Delivery::new(envelope, 1, "topic", None, Box::new(settle))
    }

    fn send_error(&self) {
        let error = Error::new(ErrorKind::Connection, "connection lost");
        self.tx.as_ref().unwrap().send(Err(error)).unwrap();
    }

    /// Ends the subscription once everything sent has been received.
    fn end(&mut self) {
        self.tx = None;
    }

    fn fail_settle(&self, name: &str, times: u32, kind: ErrorKind) {
        self.broker
            .failing
            .lock()
            .unwrap()
            .insert(name.to_owned(), (times, kind));
    }

    async fn wait_received(&self, n: usize) {
        self.broker
            .received
            .subscribe()
            .wait_for(|r| *r >= n)
            .await
            .unwrap();
    }

    async fn wait_settled(&self, n: usize) {
        self.broker
            .settled
            .subscribe()
            .wait_for(|s| *s >= n)
            .await
            .unwrap();
    }

    fn closed(&self) -> bool {
        self.broker.closed.load(Ordering::SeqCst)
    }
}

fn name_of(envelope: &Envelope) -> String {
    String::from_utf8(envelope.payload.to_vec()).unwrap()
}

fn total(report: &ConsumerReport) -> u64 {
    report.acked + report.retried + report.rejected + report.abandoned + report.unsettled
}

/// A small deterministic generator for handler delays.
struct XorShift(u64);

impl XorShift {
    fn next_below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[tokio::test]
async fn settles_each_delivery_from_its_outcome() {
    let (mut feed, subscription) = fake();
    for name in [
        "ack",
        "unit",
        "ok",
        "retry",
        "retry-later",
        "err-retryable",
        "reject",
        "err-fatal",
    ] {
        feed.send(name, None);
    }
    feed.end();

    let handler = handler_fn(|envelope: Envelope, info: DeliveryInfo| async move {
        assert_eq!(
            (info.attempt(), info.source(), info.group()),
            (1, "topic", None)
        );
        let error = || Error::new(ErrorKind::Handler, "failed");
        match name_of(&envelope).as_str() {
            "ack" => Outcome::Ack,
            "unit" => ().into(),
            "ok" => Ok(()).into(),
            "retry" => Outcome::retry(error()),
            "retry-later" => Outcome::retry_after(Duration::from_secs(7), error()),
            "err-retryable" => Err(Error::timeout("slow database")).into(),
            "reject" => Outcome::reject(Error::new(ErrorKind::Serialization, "not JSON")),
            "err-fatal" => Err(Error::new(ErrorKind::NotFound, "no such order")).into(),
            other => panic!("unexpected {other}"),
        }
    });
    let report = Consumer::new(subscription, handler)
        .run(pending())
        .await
        .unwrap();

    assert_eq!(
        (
            report.received,
            report.acked,
            report.retried,
            report.rejected
        ),
        (8, 3, 3, 2)
    );
    assert_eq!(total(&report), report.received);
    let settled = feed.broker.settlements();
    let nack_now = Settlement::Nack(Redeliver::Now);
    assert_eq!(settled["ack"], Settlement::Ack);
    assert_eq!(settled["unit"], Settlement::Ack);
    assert_eq!(settled["ok"], Settlement::Ack);
    assert_eq!(settled["retry"], nack_now);
    assert_eq!(settled["err-retryable"], nack_now);
    assert_eq!(
        settled["retry-later"],
        Settlement::Nack(Redeliver::After(Duration::from_secs(7)))
    );
    assert_eq!(
        settled["reject"],
        Settlement::Reject {
            reason: "serialization: not JSON".into(),
            attempts: 1
        }
    );
    assert_eq!(
        settled["err-fatal"],
        Settlement::Reject {
            reason: "not_found: no such order".into(),
            attempts: 1
        }
    );
    assert!(feed.broker.abandoned().is_empty());
    assert!(feed.closed(), "the subscription is closed at the end");
}

/// Tracks which keys are being handled at the moment.
#[derive(Default)]
struct Running {
    keys: Mutex<HashSet<String>>,
    max_distinct_keys: Mutex<usize>,
    /// A key entered while already running (asserted at the end, not inside the handler,
    /// where a panic would only become a retry).
    twice_at_once: Mutex<Vec<String>>,
}

impl Running {
    fn enter(&self, key: &str) {
        let mut keys = self.keys.lock().unwrap();
        if !keys.insert(key.to_owned()) {
            self.twice_at_once.lock().unwrap().push(key.to_owned());
        }
        let mut max = self.max_distinct_keys.lock().unwrap();
        *max = (*max).max(keys.len());
    }

    fn leave(&self, key: &str) {
        self.keys.lock().unwrap().remove(key);
    }

    fn check(&self) -> usize {
        assert_eq!(*self.twice_at_once.lock().unwrap(), Vec::<String>::new());
        *self.max_distinct_keys.lock().unwrap()
    }
}

async fn per_key_order(max_delay: Duration, task_per_delivery: bool) {
    const KEYS: usize = 6;
    const PER_KEY: usize = 20;
    let (mut feed, subscription) = fake();
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..PER_KEY {
        for k in 0..KEYS {
            let (key, name) = (format!("key{k}"), format!("key{k}/{i}"));
            feed.send(&name, Some(&key));
            sent.entry(key).or_default().push(name);
        }
        feed.send(&format!("none/{i}"), None);
    }
    feed.end();

    let broker = feed.broker.clone();
    let running = Arc::new(Running::default());
    let seen = running.clone();
    let rng = Arc::new(Mutex::new(XorShift(0x9E37_79B9_7F4A_7C15)));
    let handler = handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
        let (broker, running, rng) = (broker.clone(), running.clone(), rng.clone());
        async move {
            let name = name_of(&envelope);
            broker.push(Event::Start(name.clone()));
            let micros = u64::try_from(max_delay.as_micros()).unwrap();
            let delay = Duration::from_micros(rng.lock().unwrap().next_below(micros));
            if let Some(key) = &envelope.key {
                running.enter(key);
            }
            tokio::time::sleep(delay).await;
            if let Some(key) = &envelope.key {
                running.leave(key);
            }
            Outcome::Ack
        }
    });
    let report = Consumer::new(subscription, handler)
        .with_concurrency(16)
        .with_task_per_delivery(task_per_delivery)
        .run(pending())
        .await
        .unwrap();

    let total_sent = (KEYS + 1) * PER_KEY;
    assert_eq!(report.received, total_sent as u64);
    assert_eq!(report.acked, total_sent as u64);

    let events = feed.broker.events();
    for (key, names) in &sent {
        // Handled in the order sent, each only after the previous one was settled.
        let of_key: Vec<&Event> = events
            .iter()
            .filter(|e| match e {
                Event::Start(n) | Event::Settle(n, _) => n.starts_with(&format!("{key}/")),
                _ => false,
            })
            .collect();
        let expected: Vec<Event> = names
            .iter()
            .flat_map(|n| {
                [
                    Event::Start(n.clone()),
                    Event::Settle(n.clone(), Settlement::Ack),
                ]
            })
            .collect();
        assert_eq!(of_key.into_iter().cloned().collect::<Vec<_>>(), expected);
    }
    let overlap = seen.check();
    assert!(overlap > 1, "different keys never ran at the same time");
}

#[tokio::test(start_paused = true)]
async fn keeps_order_per_key_and_runs_keys_in_parallel() {
    per_key_order(Duration::from_millis(20), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keeps_order_per_key_on_a_multi_threaded_runtime() {
    per_key_order(Duration::from_millis(2), false).await;
}

#[tokio::test(start_paused = true)]
async fn keeps_order_per_key_with_a_task_per_delivery() {
    per_key_order(Duration::from_millis(20), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keeps_order_per_key_with_a_task_per_delivery_on_a_multi_threaded_runtime() {
    per_key_order(Duration::from_millis(2), true).await;
}

/// By default handlers run inside the consumer's task; with a task per delivery, each in a
/// task of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_run_in_the_consumer_task_unless_asked_for_a_task_each() {
    for task_per_delivery in [false, true] {
        let (mut feed, subscription) = fake();
        for i in 0..8 {
            feed.send(&format!("m{i}"), None);
        }
        feed.end();
        let tasks = Arc::new(Mutex::new(HashSet::new()));
        let handler = {
            let tasks = tasks.clone();
            handler_fn(move |_: Envelope, _: DeliveryInfo| {
                tasks.lock().unwrap().insert(tokio::task::id());
                async {}
            })
        };
        let consumer = tokio::spawn(
            Consumer::new(subscription, handler)
                .with_task_per_delivery(task_per_delivery)
                .run(pending()),
        );
        let consumer_task = consumer.id();
        let report = consumer.await.unwrap().unwrap();
        assert_eq!(report.acked, 8);
        let tasks = tasks.lock().unwrap();
        if task_per_delivery {
            assert_eq!(tasks.len(), 8, "one task per delivery");
            assert!(!tasks.contains(&consumer_task));
        } else {
            assert_eq!(*tasks, HashSet::from([consumer_task]));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn different_keys_overlap() {
    let (mut feed, subscription) = fake();
    for i in 0..10 {
        for k in 0..4 {
            feed.send(&format!("k{k}/{i}"), Some(&format!("k{k}")));
        }
    }
    feed.end();
    let running = Arc::new(Running::default());
    let seen = running.clone();
    let handler = handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
        let running = running.clone();
        async move {
            let key = envelope.key.clone().unwrap();
            running.enter(&key);
            tokio::time::sleep(Duration::from_millis(10)).await;
            running.leave(&key);
        }
    });
    let report = Consumer::new(subscription, handler)
        .with_concurrency(16)
        .run(pending())
        .await
        .unwrap();
    assert_eq!(report.acked, 40);
    assert_eq!(seen.check(), 4, "all keys ran at once");
}

#[tokio::test(start_paused = true)]
async fn bounds_running_handlers_and_waiting_deliveries() {
    bounds_running_handlers_and_waiting(fake()).await;
}

#[tokio::test(start_paused = true)]
async fn bounds_running_handlers_and_waiting_deliveries_received_one_at_a_time() {
    bounds_running_handlers_and_waiting(fake_without_ready()).await;
}

async fn bounds_running_handlers_and_waiting((mut feed, subscription): (Feed, Subscription)) {
    for i in 0..30 {
        feed.send(&format!("m{i}"), None);
    }
    let (now_running, mut running_rx) = watch::channel(0_usize);
    let max_running = Arc::new(Mutex::new(0_usize));
    let gate = Arc::new(Semaphore::new(0));
    let handler = {
        let (max_running, gate) = (max_running.clone(), gate.clone());
        handler_fn(move |_: Envelope, _: DeliveryInfo| {
            let (now_running, max_running, gate) =
                (now_running.clone(), max_running.clone(), gate.clone());
            async move {
                now_running.send_modify(|n| *n += 1);
                {
                    let mut max = max_running.lock().unwrap();
                    *max = (*max).max(*now_running.borrow());
                }
                gate.acquire().await.unwrap().forget();
                now_running.send_modify(|n| *n -= 1);
            }
        })
    };
    let consumer = Consumer::new(subscription, handler)
        .with_concurrency(4)
        .with_max_pending(3)
        .spawn();

    running_rx.wait_for(|n| *n == 4).await.unwrap();
    // With time paused, this sleep returns only once every other task is idle: the consumer
    // has received all it will while the handlers are blocked.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(*feed.broker.received.borrow(), 4 + 3);

    gate.add_permits(30);
    feed.end();
    let report = consumer.join().await.unwrap();
    assert_eq!((report.received, report.acked), (30, 30));
    assert_eq!(*max_running.lock().unwrap(), 4);
}

#[tokio::test]
async fn a_panicking_handler_is_retried_and_the_consumer_goes_on() {
    a_panicking_handler(false).await;
}

#[tokio::test]
async fn a_panicking_handler_in_its_own_task_is_retried_and_the_consumer_goes_on() {
    a_panicking_handler(true).await;
}

async fn a_panicking_handler(task_per_delivery: bool) {
    let (mut feed, subscription) = fake();
    for name in ["before", "boom", "after"] {
        feed.send(name, Some("same-key"));
    }
    feed.send("other", None);
    feed.end();
    let handler = handler_fn(|envelope: Envelope, _: DeliveryInfo| async move {
        if name_of(&envelope) == "boom" {
            panic!("handler bug");
        }
    });
    let report = Consumer::new(subscription, handler)
        .with_task_per_delivery(task_per_delivery)
        .run(pending())
        .await
        .unwrap();

    assert_eq!(
        (
            report.received,
            report.acked,
            report.retried,
            report.panicked
        ),
        (4, 3, 1, 1)
    );
    let settled = feed.broker.settlements();
    assert_eq!(settled["boom"], Settlement::Nack(Redeliver::Now));
    assert_eq!(settled["after"], Settlement::Ack);
    assert_eq!(settled["other"], Settlement::Ack);
}

#[tokio::test]
async fn a_panicking_settlement_releases_its_key() {
    let (mut feed, subscription) = fake();
    feed.broker
        .panicking
        .lock()
        .unwrap()
        .insert("first".to_owned());
    for name in ["first", "second", "third"] {
        feed.send(name, Some("same-key"));
    }
    feed.end();
    let handler = handler_fn(|_: Envelope, _: DeliveryInfo| async {});
    // One slot and one waiting place: a key left blocked would wedge the whole consumer.
    let run = Consumer::new(subscription, handler)
        .with_concurrency(1)
        .with_max_pending(1)
        .run(pending());
    let report = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the consumer is wedged behind the key whose settlement panicked")
        .unwrap();

    assert_eq!((report.received, report.acked, report.unsettled), (3, 2, 1));
    assert_eq!(feed.broker.abandoned(), vec!["first".to_owned()]);
    let settled = feed.broker.settlements();
    assert_eq!(settled["second"], Settlement::Ack);
    assert_eq!(settled["third"], Settlement::Ack);
}

#[tokio::test]
async fn undecodable_deliveries_are_dead_lettered_without_the_handler() {
    let (mut feed, subscription) = fake();
    feed.send("before", Some("k"));
    feed.send_undecodable("garbled", Some("k"), "bad bytes");
    feed.send("after", Some("k"));
    feed.end();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = handler_fn({
        let seen = seen.clone();
        move |envelope: Envelope, _: DeliveryInfo| {
            seen.lock().unwrap().push(name_of(&envelope));
            async {}
        }
    });
    let report = Consumer::new(subscription, handler)
        .run(pending())
        .await
        .unwrap();

    assert_eq!(*seen.lock().unwrap(), vec!["before", "after"]);
    assert_eq!(
        (
            report.received,
            report.acked,
            report.rejected,
            report.undecodable
        ),
        (3, 2, 1, 1)
    );
    assert_eq!(
        feed.broker.settlements()["garbled"],
        Settlement::Reject {
            reason: "undecodable: bad bytes".to_owned(),
            attempts: 1
        }
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_in_flight_and_abandons_the_rest() {
    let (feed, subscription) = fake();
    for i in 0..6 {
        feed.send(&format!("m{i}"), None);
    }
    let gate = Arc::new(Semaphore::new(0));
    let handler = {
        let gate = gate.clone();
        let broker = feed.broker.clone();
        handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
            let (gate, broker) = (gate.clone(), broker.clone());
            async move {
                broker.push(Event::Start(name_of(&envelope)));
                gate.acquire().await.unwrap().forget();
            }
        })
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(
        Consumer::new(subscription, handler)
            .with_concurrency(2)
            .with_max_pending(2)
            .run(async {
                stopped.await.unwrap();
            }),
    );
    // Two running, two waiting: the consumer takes no more.
    feed.wait_received(4).await;
    stop.send(()).unwrap();
    gate.add_permits(10);
    let report = run.await.unwrap().unwrap();

    assert_eq!((report.received, report.acked, report.abandoned), (4, 2, 2));
    assert_eq!(total(&report), report.received);
    let settled = feed.broker.settlements();
    assert_eq!(settled.len(), 2);
    assert_eq!(settled["m0"], Settlement::Ack);
    assert_eq!(settled["m1"], Settlement::Ack);
    // m2 and m3 were received but not started; m4 and m5 were never received and went back
    // with the fake subscription when the consumer dropped it.
    assert_eq!(*feed.broker.received.borrow(), 4);
    assert_eq!(feed.broker.abandoned(), ["m2", "m3", "m4", "m5"]);
    let started: Vec<Event> = feed
        .broker
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Start(_)))
        .collect();
    assert_eq!(started.len(), 2, "nothing started after shutdown");
    assert!(feed.closed());
}

#[tokio::test(start_paused = true)]
async fn shutdown_timeout_abandons_handlers_that_do_not_finish() {
    shutdown_timeout_abandons(false).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_timeout_aborts_handler_tasks_that_do_not_finish() {
    shutdown_timeout_abandons(true).await;
}

async fn shutdown_timeout_abandons(task_per_delivery: bool) {
    let (feed, subscription) = fake();
    feed.send("stuck", None);
    feed.send("quick", None);
    let handler = handler_fn(|envelope: Envelope, _: DeliveryInfo| async move {
        if name_of(&envelope) == "stuck" {
            pending::<()>().await;
        }
    });
    let consumer = Consumer::new(subscription, handler)
        .with_shutdown_timeout(Duration::from_secs(5))
        .with_task_per_delivery(task_per_delivery)
        .spawn();
    feed.wait_settled(1).await;
    let started = tokio::time::Instant::now();
    let report = consumer.stop().await.unwrap();

    assert!(started.elapsed() >= Duration::from_secs(5));
    assert_eq!((report.received, report.acked, report.abandoned), (2, 1, 1));
    assert_eq!(feed.broker.abandoned(), ["stuck"]);
    assert!(feed.closed());
}

#[tokio::test(start_paused = true)]
async fn timeout_layer_fails_slow_attempts_as_retryable() {
    let slow = handler_fn(|envelope: Envelope, _: DeliveryInfo| async move {
        if name_of(&envelope) == "slow" {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
    let handler = TimeoutLayer::new(Duration::from_secs(1)).layer(slow);

    let (mut feed, subscription) = fake();
    feed.send("slow", None);
    feed.send("fast", None);
    feed.end();
    let started = tokio::time::Instant::now();
    let report = Consumer::new(subscription, handler)
        .run(pending())
        .await
        .unwrap();

    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!((report.acked, report.retried), (1, 1));
    let settled = feed.broker.settlements();
    assert_eq!(settled["slow"], Settlement::Nack(Redeliver::Now));
    assert_eq!(settled["fast"], Settlement::Ack);
}

#[tokio::test(start_paused = true)]
async fn timeout_layer_outcome_is_a_timeout_error() {
    let handler = TimeoutLayer::new(Duration::from_millis(10)).layer(handler_fn(
        |_: Envelope, _: DeliveryInfo| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
    ));
    let (feed, _subscription) = fake();
    feed.send("slow", None);
    let delivery = {
        let mut sub = _subscription;
        sub.next().await.unwrap().unwrap()
    };
    let outcome = handler.handle(&delivery).await;
    let Outcome::Retry { after: None, error } = &outcome else {
        panic!("expected a retry, got {outcome:?}");
    };
    assert!(error.is_timeout());
    assert!(error.is_retryable());
}

#[tokio::test]
async fn catch_panic_layer_makes_the_panic_an_outcome() {
    let handler = CatchPanicLayer::new().layer(handler_fn(|_: Envelope, _: DeliveryInfo| async {
        let fail = true;
        if fail {
            panic!("no {}", "way");
        }
    }));
    let (feed, mut subscription) = fake();
    feed.send("x", None);
    let delivery = subscription.next().await.unwrap().unwrap();
    let outcome = handler.handle(&delivery).await;
    let error = outcome.error().expect("a failed attempt");
    assert!(outcome.is_retry());
    assert_eq!(error.kind(), ErrorKind::Handler);
    let panic = error
        .source_ref()
        .unwrap()
        .downcast_ref::<Panicked>()
        .unwrap();
    assert_eq!(panic.message(), "no way");
}

#[tokio::test(start_paused = true)]
async fn failed_settlements_are_retried_then_given_up() {
    let (mut feed, subscription) = fake();
    feed.send("flaky", Some("k"));
    feed.send("next-of-key", Some("k"));
    feed.send("doomed", None);
    feed.send("closed", None);
    feed.fail_settle("flaky", 2, ErrorKind::Connection);
    feed.fail_settle("doomed", 100, ErrorKind::Connection);
    feed.fail_settle("closed", 100, ErrorKind::Closed);
    feed.end();
    let handler = handler_fn(|_: Envelope, _: DeliveryInfo| async {});
    let report = Consumer::new(subscription, handler)
        .with_settle_attempts(3)
        .run(pending())
        .await
        .unwrap();

    assert_eq!((report.acked, report.unsettled), (2, 2));
    let events = feed.broker.events();
    let failures = |name: &str| {
        events
            .iter()
            .filter(|e| **e == Event::SettleFailed(name.into()))
            .count()
    };
    assert_eq!(failures("flaky"), 2);
    assert_eq!(failures("doomed"), 3);
    assert_eq!(
        failures("closed"),
        1,
        "a non-retryable error is not retried"
    );
    assert_eq!(feed.broker.abandoned(), ["closed", "doomed"]);
    let settled = feed.broker.settlements();
    assert_eq!(settled["flaky"], Settlement::Ack);
    // The next message of the key waited for the flaky settlement.
    let pos = |e: Event| events.iter().position(|x| *x == e).unwrap();
    assert!(
        pos(Event::Settle("flaky".into(), Settlement::Ack))
            < pos(Event::Settle("next-of-key".into(), Settlement::Ack))
    );
}

#[tokio::test(start_paused = true)]
async fn receive_errors_are_logged_and_receiving_goes_on() {
    let (mut feed, subscription) = fake();
    // Errors first (from `next`), and after a delivery (the second from `try_next`, taking
    // what is ready after the first).
    feed.send_error();
    feed.send("a", None);
    feed.send_error();
    feed.send_error();
    feed.send("b", None);
    feed.end();
    let report = Consumer::new(
        subscription,
        handler_fn(|_: Envelope, _: DeliveryInfo| async {}),
    )
    .run(pending())
    .await
    .unwrap();
    assert_eq!(
        (report.receive_errors, report.received, report.acked),
        (3, 2, 2)
    );
}

#[tokio::test]
async fn a_spawned_consumer_stops_on_request() {
    let (feed, subscription) = fake();
    let handle: ConsumerHandle = Consumer::new(
        subscription,
        handler_fn(|_: Envelope, _: DeliveryInfo| async {}),
    )
    .spawn();
    feed.send("a", None);
    feed.wait_settled(1).await;
    assert!(!handle.is_finished());
    handle.shutdown();
    handle.shutdown();
    let report = handle.join().await.unwrap();
    assert_eq!((report.received, report.acked), (1, 1));
    assert!(feed.closed());
}

/// A layer that records its name when the handler it wraps is called.
struct Tag(&'static str, Arc<Mutex<Vec<&'static str>>>);

struct Tagged<H>(&'static str, Arc<Mutex<Vec<&'static str>>>, H);

impl<H> Layer<H> for Tag {
    type Service = Tagged<H>;
    fn layer(&self, inner: H) -> Tagged<H> {
        Tagged(self.0, self.1.clone(), inner)
    }
}

#[async_trait]
impl<H: Handler> Handler for Tagged<H> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        self.1.lock().unwrap().push(self.0);
        self.2.handle(delivery).await
    }
}

#[tokio::test]
async fn handler_builder_puts_the_first_layer_outermost() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let inner_calls = calls.clone();
    let handler = HandlerBuilder::new()
        .layer(Tag("outer", calls.clone()))
        .layer(Tag("inner", calls.clone()))
        .handler(handler_fn(move |_: Envelope, _: DeliveryInfo| {
            inner_calls.lock().unwrap().push("handler");
            async {}
        }));
    // Boxed and shared handlers are handlers too.
    let handler: Arc<Box<dyn Handler>> = Arc::new(Box::new(handler));
    let (feed, mut subscription) = fake();
    feed.send("x", None);
    let delivery = subscription.next().await.unwrap().unwrap();
    assert!(handler.handle(&delivery).await.is_ack());
    assert_eq!(*calls.lock().unwrap(), ["outer", "inner", "handler"]);
}

#[test]
fn public_types_are_send_and_sync() {
    fn send<T: Send>(_: &T) {}
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Outcome>();
    send_sync::<ConsumerHandle>();
    send_sync::<ConsumerReport>();
    send_sync::<DeliveryInfo>();
    send_sync::<TimeoutLayer>();
    send_sync::<CatchPanicLayer>();
    send_sync::<Box<dyn Handler>>();

    let (_feed, subscription) = fake();
    let consumer = Consumer::new(
        subscription,
        handler_fn(|_: Envelope, _: DeliveryInfo| async {}),
    );
    send(&consumer);
    let run = consumer.run(async {});
    send(&run);
}

#[tokio::test(start_paused = true)]
async fn leases_are_extended_while_running_and_while_waiting() {
    // A lease of 3 s: the consumer extends every delivery it holds every second.
    let (mut feed, subscription) = fake_with_lease(Some(Duration::from_secs(3)));
    feed.send("slow", Some("k"));
    feed.send("behind", Some("k"));
    feed.send("quick", Some("other"));
    feed.end();
    let handler = handler_fn(|envelope: Envelope, _: DeliveryInfo| async move {
        if name_of(&envelope) == "slow" {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
    let report = Consumer::new(subscription, handler)
        .run(pending())
        .await
        .unwrap();

    assert_eq!(report.acked, 3);
    let broker = &feed.broker;
    // Ten seconds of handling: nine or ten extensions, none after the ack.
    assert!(
        (9..=10).contains(&broker.progress("slow")),
        "{:?}",
        broker.events()
    );
    // Waiting behind it for those ten seconds: extended about as often.
    assert!(
        (8..=10).contains(&broker.progress("behind")),
        "{:?}",
        broker.events()
    );
    assert_eq!(
        broker.progress("quick"),
        0,
        "settled at once, never extended"
    );
    let events = broker.events();
    let acked = events
        .iter()
        .position(|e| matches!(e, Event::Settle(n, _) if n == "slow"))
        .unwrap();
    assert!(
        !events[acked..].contains(&Event::Progress("slow".to_owned())),
        "extended after settlement: {events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn no_lease_means_no_extensions_unless_asked() {
    let (mut feed, subscription) = fake();
    feed.send("slow", None);
    feed.end();
    let handler = handler_fn(|_: Envelope, _: DeliveryInfo| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    Consumer::new(subscription, handler)
        .run(pending())
        .await
        .unwrap();
    assert_eq!(feed.broker.progress("slow"), 0);

    let (mut feed, subscription) = fake();
    feed.send("slow", None);
    feed.end();
    let handler = handler_fn(|_: Envelope, _: DeliveryInfo| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    Consumer::new(subscription, handler)
        .with_lease_heartbeat(Duration::from_secs(2))
        .run(pending())
        .await
        .unwrap();
    assert_eq!(feed.broker.progress("slow"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_lease_extension_that_hangs_does_not_stall_the_consumer() {
    let (mut feed, subscription) = fake_with_lease(Some(Duration::from_secs(3)));
    feed.broker
        .hanging
        .lock()
        .unwrap()
        .extend(["slow".to_owned(), "behind".to_owned()]);
    feed.send("slow", Some("k"));
    feed.send("behind", Some("k"));
    feed.end();
    let handler = handler_fn(|envelope: Envelope, _: DeliveryInfo| async move {
        if name_of(&envelope) == "slow" {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
    let run = Consumer::new(subscription, handler).run(pending());
    let report = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the consumer stalled on a lease extension that never returns")
        .unwrap();
    assert_eq!(report.acked, 2);
    // Tried again at every heartbeat, each bounded by it.
    assert!(
        feed.broker.progress("slow") >= 4,
        "{:?}",
        feed.broker.events()
    );
    assert!(
        feed.broker.progress("behind") >= 4,
        "{:?}",
        feed.broker.events()
    );
}

/// Runs handled by the ordered-retry tests: (message, attempt, at), in order of completion.
type Runs = Arc<Mutex<Vec<(String, u32, tokio::time::Instant)>>>;

/// A handler that records every run and fails the runs `fails` says (by message name, the
/// attempts that fail), asking for a retry after `after`.
fn failing_on(fails: HashMap<&'static str, Vec<u32>>, after: Duration) -> (Runs, impl Handler) {
    let runs: Runs = Arc::default();
    let handler = handler_fn({
        let runs = runs.clone();
        move |envelope: Envelope, info: DeliveryInfo| {
            let name = name_of(&envelope);
            let fail = fails
                .get(name.as_str())
                .is_some_and(|attempts| attempts.contains(&info.attempt()));
            runs.lock()
                .unwrap()
                .push((name, info.attempt(), tokio::time::Instant::now()));
            async move {
                if fail {
                    Outcome::retry_after(after, Error::new(ErrorKind::Handler, "not yet"))
                } else {
                    Outcome::Ack
                }
            }
        }
    });
    (runs, handler)
}

#[tokio::test(start_paused = true)]
async fn ordered_retries_keep_the_key_waiting_and_let_other_keys_flow() {
    let (mut feed, subscription) = fake_ordered(None);
    for i in 1..=5 {
        feed.send(&format!("a{i}"), Some("A"));
    }
    for i in 1..=20 {
        feed.send(&format!("b{i}"), Some(&format!("B{}", i % 4)));
    }
    feed.end();
    let (runs, handler) = failing_on(HashMap::from([("a2", vec![1, 2])]), Duration::from_secs(5));
    let report = Consumer::new(subscription, handler)
        .with_concurrency(4)
        .run(pending())
        .await
        .unwrap();

    let runs = runs.lock().unwrap().clone();
    let a: Vec<(&str, u32)> = runs
        .iter()
        .filter(|(name, ..)| name.starts_with('a'))
        .map(|(name, attempt, _)| (name.as_str(), *attempt))
        .collect();
    assert_eq!(
        a,
        [
            ("a1", 1),
            ("a2", 1),
            ("a2", 2),
            ("a2", 3),
            ("a3", 1),
            ("a4", 1),
            ("a5", 1)
        ],
        "key A in order, its second message retried in place"
    );
    let a2_done = runs
        .iter()
        .find(|(n, at, _)| n == "a2" && *at == 3)
        .unwrap()
        .2;
    let last_b = runs
        .iter()
        .filter(|(n, ..)| n.starts_with('b'))
        .map(|r| r.2)
        .max()
        .unwrap();
    assert!(
        last_b < a2_done,
        "the other keys finished while A was parked"
    );
    assert!(
        feed.broker
            .settlements()
            .values()
            .all(|s| *s == Settlement::Ack),
        "nothing went back to the broker: {:?}",
        feed.broker.settlements()
    );
    assert_eq!(
        (
            report.received,
            report.acked,
            report.retried,
            report.retried_in_place
        ),
        (25, 25, 0, 2)
    );
    assert_eq!(
        (report.peak_parked_keys, report.peak_parked_deliveries),
        (1, 4)
    );
    assert_eq!(total(&report), report.received);
}

#[tokio::test(start_paused = true)]
async fn an_ordered_key_dead_letters_after_the_policy_and_moves_on() {
    use crate::middleware::{RetryLayer, RetryPolicy};
    let (mut feed, subscription) = fake_ordered(None);
    for i in 1..=4 {
        feed.send(&format!("a{i}"), Some("A"));
    }
    feed.end();
    let (runs, handler) = failing_on(
        HashMap::from([("a2", (1..=10).collect())]),
        Duration::from_secs(1),
    );
    let policy = RetryPolicy::new()
        .with_immediate_retries(0, Duration::ZERO)
        .with_max_deliveries(3)
        .with_backoff(Duration::from_millis(100), 2.0, Duration::from_secs(1));
    let handler = RetryLayer::new(policy).layer(handler);
    let report = Consumer::new(subscription, handler)
        .run(pending())
        .await
        .unwrap();

    let order: Vec<(String, u32)> = runs
        .lock()
        .unwrap()
        .iter()
        .map(|(name, attempt, _)| (name.clone(), *attempt))
        .collect();
    let expected: Vec<(String, u32)> = [
        ("a1", 1),
        ("a2", 1),
        ("a2", 2),
        ("a2", 3),
        ("a3", 1),
        ("a4", 1),
    ]
    .iter()
    .map(|(n, a)| ((*n).to_owned(), *a))
    .collect();
    assert_eq!(order, expected);
    let settled = feed.broker.settlements();
    match &settled["a2"] {
        Settlement::Reject { reason, attempts } => {
            assert_eq!(*attempts, 3, "every attempt in place is counted");
            assert!(reason.contains("gave up after 3 deliveries"), "{reason}");
        }
        other => panic!("a2 settled as {other:?}"),
    }
    assert_eq!(settled["a3"], Settlement::Ack);
    assert_eq!(
        (
            report.acked,
            report.rejected,
            report.retried,
            report.retried_in_place
        ),
        (3, 1, 0, 2)
    );
}

#[tokio::test(start_paused = true)]
async fn unordered_and_keyless_retries_go_back_to_the_broker() {
    for (ordered_source, order, key) in [
        (true, Some(KeyOrder::Unordered), Some("A")),
        (true, None, None),
        (false, None, Some("A")),
    ] {
        let (mut feed, subscription) = fake_source(None, ordered_source);
        feed.send("a1", key);
        feed.end();
        let (_runs, handler) = failing_on(HashMap::from([("a1", vec![1])]), Duration::from_secs(3));
        let mut consumer = Consumer::new(subscription, handler);
        if let Some(order) = order {
            consumer = consumer.with_key_order(order);
        }
        let report = consumer.run(pending()).await.unwrap();
        assert_eq!(
            feed.broker.settlements()["a1"],
            Settlement::Nack(Redeliver::After(Duration::from_secs(3))),
            "source ordered: {ordered_source}, order {order:?}, key {key:?}"
        );
        assert_eq!((report.retried, report.retried_in_place), (1, 0));
    }
}

#[tokio::test(start_paused = true)]
async fn parked_keys_hold_at_most_max_parked_then_receiving_pauses() {
    let (feed, subscription) = fake_ordered(None);
    for i in 1..=6 {
        feed.send(&format!("a{i}"), Some("A"));
    }
    feed.send("b1", Some("B"));
    let (runs, handler) = failing_on(HashMap::from([("a1", vec![1])]), Duration::from_secs(10));
    let consumer = Consumer::new(subscription, handler)
        .with_max_pending(1)
        .with_max_parked(3)
        .spawn();
    // a1 parks; a2 and a3 wait behind it: 3 held, the bound. a4.. stay with the broker, and
    // so does b1, behind them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(*feed.broker.received.borrow(), 3);
    let names = || -> Vec<String> {
        runs.lock()
            .unwrap()
            .iter()
            .map(|(n, ..)| n.clone())
            .collect()
    };
    assert_eq!(names(), ["a1"]);
    // After the retry, A moves on and receiving resumes.
    feed.wait_settled(7).await;
    let report = consumer.stop().await.unwrap();
    assert_eq!(names(), ["a1", "a1", "a2", "a3", "a4", "a5", "a6", "b1"]);
    assert_eq!(
        (
            report.paused_at_parked_bound,
            report.peak_parked_deliveries,
            report.acked
        ),
        (1, 3, 7)
    );
}

#[tokio::test(start_paused = true)]
async fn parked_deliveries_keep_their_lease_and_are_abandoned_at_shutdown() {
    let lease = Duration::from_secs(3);
    let (feed, subscription) = fake_ordered(Some(lease));
    feed.send("a1", Some("A"));
    feed.send("a2", Some("A"));
    let (runs, handler) = failing_on(HashMap::from([("a1", vec![1])]), Duration::from_secs(60));
    let consumer = Consumer::new(subscription, handler).spawn();
    feed.wait_received(2).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        feed.broker.progress("a1") >= 5 && feed.broker.progress("a2") >= 5,
        "leases of the parked delivery and the one behind it: {} and {}",
        feed.broker.progress("a1"),
        feed.broker.progress("a2")
    );
    let report = consumer.stop().await.unwrap();
    assert_eq!(runs.lock().unwrap().len(), 1, "a2 never ran before a1");
    assert_eq!(feed.broker.abandoned(), ["a1", "a2"]);
    assert!(feed.broker.settlements().is_empty());
    assert_eq!((report.abandoned, report.retried_in_place), (2, 1));
    assert_eq!(total(&report), report.received);
}

#[tokio::test(start_paused = true)]
async fn handlers_run_on_while_waiting_deliveries_are_kept_alive() {
    // A lease of 3 s: the waiting delivery is kept alive every second, and its extension hangs
    // (each attempt bounded by that second). The handler in flight must finish meanwhile.
    let (mut feed, subscription) = fake_with_lease(Some(Duration::from_secs(3)));
    feed.broker
        .hanging
        .lock()
        .unwrap()
        .insert("behind".to_owned());
    feed.send("slow", Some("k"));
    feed.send("behind", Some("k"));
    let release = Arc::new(tokio::sync::Notify::new());
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let handler = handler_fn({
        let release = release.clone();
        move |envelope: Envelope, _: DeliveryInfo| {
            let (release, done_tx) = (release.clone(), done_tx.clone());
            async move {
                let name = name_of(&envelope);
                if name == "slow" {
                    release.notified().await;
                }
                let _ = done_tx.send(name);
            }
        }
    });
    let run = tokio::spawn(Consumer::new(subscription, handler).run(pending()));
    // Until the heartbeat is inside the extension that hangs.
    while feed.broker.progress("behind") == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    release.notify_one();
    let done = tokio::time::timeout(Duration::from_millis(500), done_rx.recv()).await;
    assert_eq!(
        done.ok().flatten().as_deref(),
        Some("slow"),
        "the handler in flight was not polled while the consumer kept waiting deliveries alive"
    );
    feed.end();
    let report = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the consumer finishes")
        .unwrap()
        .unwrap();
    assert_eq!(report.acked, 2);
}
