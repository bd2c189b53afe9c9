//! The `bus` binary, run as a user runs it, against the memory broker and every real broker
//! whose `BUS_TEST_<BROKER>_URL` is set (scripts/test.sh sets them; with
//! `BUS_REQUIRE_BROKERS=1` a missing one fails instead of being skipped).
//!
//! - memory (a broker inside the process, so only commands that publish and read in one run):
//!   `check` and `bench`;
//! - every real broker: `publish` → `tail` sees it; two messages rejected into the dead-letter
//!   queue (by a consumer written with the library) → `dlq list` shows them with their reasons,
//!   twice (listing loses nothing) → `dlq show` → `dlq redrive --dry-run` moves nothing →
//!   `dlq redrive --id` moves one → the group's consumer gets it → `dlq redrive` moves the
//!   other → `dlq list` is empty; a work queue's dead letter is sent back to the queue;
//!   `check` round-trips; `lag` counts what a group and a queue hold, then 0 once consumed;
//!   `publish --delay` and `--not-before` arrive no sooner than asked (where the adapter's
//!   `Capabilities` say it has backlog counts and delayed publish; elsewhere the command
//!   must fail with one line saying it is unsupported);
//! - a wrong URL and an unreachable broker: one line on standard error, exit status 1, the
//!   password never shown.

use std::io::{BufRead as _, BufReader};
use std::process::{Command as StdCommand, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use assert_cmd::cargo::{cargo_bin, cargo_bin_cmd};
use assert_cmd::Command;
use bus::{headers, Bus, ConsumeOptions, Envelope, SubscribeOptions, Subscription};
use bus_core::conformance::broker_url;
use predicates::prelude::*;
use serde_json::Value;

/// How long a step may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

fn bus_cmd(url: &str) -> Command {
    let mut command = cargo_bin_cmd!("bus");
    command.env_remove("BUS_URL").arg("--url").arg(url);
    command.timeout(DEADLINE * 2);
    command
}

/// Runs `bus --json <args>` and returns its output as JSON; fails the test on failure.
fn run_json(url: &str, args: &[&str]) -> Value {
    let output = bus_cmd(url).arg("--json").args(args).output().expect("run");
    assert!(
        output.status.success(),
        "bus {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "bus {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn unique(tag: &str) -> String {
    format!("cli.{tag}.{}", uuid::Uuid::now_v7().simple())
}

#[test]
fn check_round_trips_on_memory_and_lists_the_capabilities() {
    bus_cmd("memory://")
        .arg("check")
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "round trip on a private topic: ok",
        ))
        .stdout(predicate::str::contains("dead_letter"))
        .stdout(predicate::str::contains("native"));
    let report = run_json("memory://", &["check"]);
    assert_eq!(report["adapter"], "memory");
    assert_eq!(report["capabilities"]["durable"], false);
    assert_eq!(report["capabilities"]["dead_letter"], "native");
    assert!(report["round_trip_ms"].as_f64().unwrap() >= 0.0);
}

#[test]
fn bench_on_memory_reports_both_rates() {
    let report = run_json(
        "memory://",
        &[
            "bench",
            "--messages",
            "500",
            "--rounds",
            "2",
            "--batch",
            "100",
        ],
    );
    assert_eq!(report["adapter"], "memory");
    assert_eq!(report["messages"], 500);
    for figure in ["publish_per_sec", "consume_per_sec"] {
        let rates = report[figure].as_array().expect(figure);
        assert_eq!(rates.len(), 2, "{report}");
        assert!(rates.iter().all(|r| r.as_f64().unwrap() > 0.0), "{report}");
    }
    bus_cmd("memory://")
        .args(["bench", "--messages", "100"])
        .assert()
        .success()
        .stdout(predicate::str::contains("consume + ack"));
}

#[test]
fn the_url_comes_from_bus_url_too() {
    cargo_bin_cmd!("bus")
        .env("BUS_URL", "memory://")
        .args(["--json", "check"])
        .timeout(DEADLINE)
        .assert()
        .success()
        .stdout(predicate::str::contains(r#""adapter":"memory""#));
}

/// The one line a failure prints, checked for what must and must not be in it.
fn assert_one_line_error(output: &std::process::Output, expected: &str) -> String {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("bus: error: "), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
    for leak in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!stderr.contains(leak), "{stderr}");
    }
    assert!(output.stdout.is_empty(), "{output:?}");
    stderr
}

#[test]
fn a_wrong_url_is_one_clear_line() {
    let output = bus_cmd("carrier-pigeon://coop")
        .arg("check")
        .output()
        .unwrap();
    assert_one_line_error(&output, "cannot connect to carrier-pigeon://coop");
    let output = bus_cmd("not a url").arg("check").output().unwrap();
    assert_one_line_error(&output, "cannot connect");
}

#[test]
fn an_unreachable_broker_is_one_clear_line_without_the_password() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    for url in [
        "amqp://guest:Zq9SECRETx@127.0.0.1:1/%2f",
        "nats://Zq9SECRETx@127.0.0.1:1",
    ] {
        let output = bus_cmd(url)
            .args(["--connect-timeout", "10s", "check"])
            .output()
            .unwrap();
        let stderr = assert_one_line_error(&output, "cannot connect to ");
        assert!(!stderr.contains("Zq9SECRETx"), "{stderr}");
        assert!(stderr.contains("***@127.0.0.1:1"), "{stderr}");
    }
}

#[test]
fn tailing_a_queue_needs_consent_to_consume() {
    let output = bus_cmd("memory://")
        .args(["tail", "--queue", "jobs", "--timeout", "1s"])
        .output()
        .unwrap();
    assert_one_line_error(&output, "add --consume");
}

#[test]
fn publish_needs_a_payload_and_a_destination() {
    bus_cmd("memory://")
        .args(["publish"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--queue"));
    // From standard input, and from a file.
    bus_cmd("memory://")
        .args(["publish", "orders"])
        .write_stdin("from stdin")
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "published 1 message to topic `orders`",
        ));
    let file = std::env::temp_dir().join(format!("bus-cli-{}.json", uuid::Uuid::now_v7()));
    std::fs::write(&file, b"{}").unwrap();
    let report = run_json(
        "memory://",
        &[
            "publish",
            "--queue",
            "jobs",
            "--file",
            file.to_str().unwrap(),
            "--count",
            "3",
        ],
    );
    std::fs::remove_file(&file).unwrap();
    assert_eq!(report["queue"], "jobs");
    assert_eq!(report["published"], 3);
    assert_eq!(report["ids"].as_array().unwrap().len(), 3);
}

/// A running `bus tail`, ready once it said it follows its topic.
struct Tail {
    child: std::process::Child,
}

impl Tail {
    fn start(url: &str, args: &[&str]) -> Tail {
        let mut child = StdCommand::new(cargo_bin!("bus"))
            .env_remove("BUS_URL")
            .args(["--url", url, "--json", "tail"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bus tail");
        let stderr = child.stderr.take().unwrap();
        let (ready, wait) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = ready.send(line);
            }
        });
        match wait.recv_timeout(DEADLINE) {
            Ok(line) if line.starts_with("following topic") => Tail { child },
            other => {
                let _ = child.kill();
                panic!("bus tail did not start: {other:?}");
            }
        }
    }

    /// The JSON lines it printed, once it ended by itself.
    fn lines(self) -> Vec<Value> {
        let output = self.child.wait_with_output().expect("bus tail");
        assert!(output.status.success(), "bus tail: {output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

fn publish_then_tail(url: &str) {
    let topic = unique("tail");
    let tail = Tail::start(
        url,
        &[
            &topic,
            "--kind",
            "order.placed",
            "--correlation",
            "conv-1",
            "--count",
            "1",
            "--timeout",
            "30s",
        ],
    );
    // Filtered out by --kind, by --correlation, then the one it waits for.
    bus_cmd(url)
        .args(["publish", &topic, "-m", "skip me", "--kind", "order.other"])
        .args(["--correlation", "conv-1"])
        .assert()
        .success();
    bus_cmd(url)
        .args(["publish", &topic, "-m", "skip me", "--kind", "order.placed"])
        .args(["--correlation", "conv-2"])
        .assert()
        .success();
    let published = run_json(
        url,
        &[
            "publish",
            &topic,
            "--message",
            r#"{"order":42}"#,
            "--kind",
            "order.placed",
            "--key",
            "o-42",
            "--header",
            "tenant=acme",
            "--correlation",
            "conv-1",
        ],
    );
    let id = published["ids"][0].as_str().unwrap().to_owned();
    let lines = tail.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let seen = &lines[0];
    assert_eq!(seen["id"], id.as_str());
    assert_eq!(seen["kind"], "order.placed");
    assert_eq!(seen["payload"], r#"{"order":42}"#);
    assert_eq!(seen["key"], "o-42");
    assert_eq!(seen["correlation_id"], "conv-1");
    assert_eq!(seen["headers"]["tenant"], "acme");
}

/// Publishes `envelope` to `topic` and rejects it from the group `workers` with `reason`.
async fn dead_letter(bus: &Bus, workers: &mut Subscription, topic: &str, envelope: Envelope) {
    let id = envelope.id.clone();
    bus.publish(topic, envelope).await.expect("publish");
    let delivery = tokio::time::timeout(DEADLINE, workers.next())
        .await
        .expect("the message reaches the workers")
        .expect("open")
        .expect("delivery");
    assert_eq!(delivery.envelope().id, id);
    let reason = format!("cannot handle {}", delivery.envelope().kind);
    delivery.reject(reason).await.expect("reject");
}

async fn next_for(workers: &mut Subscription) -> Envelope {
    let delivery = tokio::time::timeout(DEADLINE, workers.next())
        .await
        .expect("the redriven message reaches the workers")
        .expect("open")
        .expect("delivery");
    let envelope = delivery.envelope().clone();
    delivery.ack().await.expect("ack");
    envelope
}

fn count(list: &Value) -> u64 {
    list["count"].as_u64().expect("count")
}

async fn dead_letters_round_trip(url: &str) {
    let bus = bus::connect(url).await.expect("connect");
    let topic = unique("dlq");
    let mut workers = bus
        .subscribe(&topic, SubscribeOptions::group("workers"))
        .await
        .expect("subscribe");
    let bad = Envelope::new("order.bad", "bad").with_key("k");
    let odd = Envelope::new("order.odd", "odd").with_key("k");
    let (bad_id, odd_id) = (bad.id.to_string(), odd.id.to_string());
    dead_letter(&bus, &mut workers, &topic, bad).await;
    dead_letter(&bus, &mut workers, &topic, odd).await;

    let read = ["--idle", "1s", "--wait", "15s"];
    let list = run_json(url, &[&["dlq", "list", &topic][..], &read].concat());
    assert_eq!(count(&list), 2, "{list}");
    assert_eq!(list["dlq"], headers::dead_letter_queue(&topic));
    let reasons: Vec<(&str, u64)> = list["by_reason"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["reason"].as_str().unwrap(), r["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("cannot handle order.bad", 1),
            ("cannot handle order.odd", 1)
        ]
    );
    let first = list["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == bad_id.as_str())
        .expect("listed");
    assert_eq!(first["original_topic"], topic.as_str());
    assert_eq!(first["group"], "workers");
    assert_eq!(first["payload"], "bad");

    // Listing took nothing away: a second listing sees both again, once each.
    let again = run_json(url, &[&["dlq", "list", &topic][..], &read].concat());
    assert_eq!(count(&again), 2, "{again}");
    bus_cmd(url)
        .args(["dlq", "list", &topic])
        .args(read)
        .assert()
        .success()
        .stdout(predicate::str::contains("cannot handle order.odd"))
        .stdout(predicate::str::contains("2 dead letters in"));

    let shown = run_json(
        url,
        &[&["dlq", "show", &topic, &odd_id][..], &read].concat(),
    );
    assert_eq!(shown["id"], odd_id.as_str());
    assert_eq!(shown["reason"], "cannot handle order.odd");
    assert_eq!(
        shown["headers"][headers::DLQ_REASON],
        "cannot handle order.odd"
    );

    let dry = run_json(
        url,
        &[&["dlq", "redrive", &topic, "--dry-run"][..], &read].concat(),
    );
    assert_eq!(
        (dry["selected"].as_u64(), dry["moved"].as_u64()),
        (Some(2), Some(0))
    );

    let one = run_json(
        url,
        &[&["dlq", "redrive", &topic, "--id", &bad_id][..], &read].concat(),
    );
    assert_eq!(
        (one["moved"].as_u64(), one["left"].as_u64()),
        (Some(1), Some(1)),
        "{one}"
    );
    let back = next_for(&mut workers).await;
    assert_eq!(back.id.as_str(), bad_id);
    assert_eq!(back.payload.as_ref(), b"bad");
    assert!(
        back.header(headers::DLQ_REASON).is_none(),
        "{:?}",
        back.headers
    );

    let rest = run_json(url, &[&["dlq", "redrive", &topic][..], &read].concat());
    assert_eq!(rest["moved"].as_u64(), Some(1), "{rest}");
    assert_eq!(next_for(&mut workers).await.id.as_str(), odd_id);

    let empty = run_json(
        url,
        &["dlq", "list", &topic, "--idle", "1s", "--wait", "3s"],
    );
    assert_eq!(count(&empty), 0, "{empty}");
    workers.close().await.expect("close");
    bus.close().await.expect("close");
}

/// A dead letter of a work queue goes back to the queue (sent, not published).
async fn queue_dead_letter_is_sent_back(url: &str) {
    let bus = bus::connect(url).await.expect("connect");
    let queue = unique("dlqq");
    let mut jobs = bus
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let job = Envelope::new("job.run", "job");
    let id = job.id.to_string();
    bus.send(&queue, job).await.expect("send");
    let delivery = tokio::time::timeout(DEADLINE, jobs.next())
        .await
        .expect("the job arrives")
        .expect("open")
        .expect("delivery");
    delivery.reject("no worker for it").await.expect("reject");
    let moved = run_json(
        url,
        &[
            "dlq", "redrive", &queue, "--queue", "--idle", "1s", "--wait", "15s",
        ],
    );
    assert_eq!(moved["queue"], queue.as_str());
    assert_eq!(moved["moved"].as_u64(), Some(1), "{moved}");
    let back = receive(&mut jobs).await;
    assert_eq!(back.id.as_str(), id);
    assert!(
        back.header(headers::DLQ_REASON).is_none(),
        "{:?}",
        back.headers
    );
    jobs.close().await.expect("close");
    bus.close().await.expect("close");
}

/// Runs `bus --json lag <args>` until the totals are `expected` (in the order of the
/// targets), failing after the deadline with the last measurement.
fn wait_for_totals(url: &str, args: &[&str], expected: &[u64]) {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let measured = run_json(url, &[&["lag"][..], args].concat());
        let totals: Vec<u64> = measured["backlogs"]
            .as_array()
            .expect("backlogs")
            .iter()
            .map(|b| b["total"].as_u64().expect("total"))
            .collect();
        if totals == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lag {args:?}: expected {expected:?}, measured {measured}"
        );
    }
}

async fn receive(subscription: &mut Subscription) -> Envelope {
    let delivery = tokio::time::timeout(DEADLINE, subscription.next())
        .await
        .expect("a message in time")
        .expect("open")
        .expect("delivery");
    let envelope = delivery.envelope().clone();
    delivery.ack().await.expect("ack");
    envelope
}

async fn lag_counts_then_drains(url: &str) {
    let bus = bus::connect(url).await.expect("connect");
    let capabilities = bus.capabilities();
    let (topic, queue) = (unique("lag"), unique("lagq"));
    if let Some(reason) = capabilities.backlog.unsupported_reason() {
        let output = bus_cmd(url)
            .args(["lag", "--queue", &queue])
            .output()
            .unwrap();
        assert_one_line_error(&output, "unsupported");
        println!("skipped: lag counts on {}: {reason}", capabilities.name);
        return;
    }
    // The group exists once it subscribed; closed, it has no consumer holding messages
    // (RabbitMQ cannot count what a consumer holds unacknowledged apart).
    let mut billing = bus
        .subscribe(&topic, SubscribeOptions::group("billing"))
        .await
        .expect("subscribe");
    billing.close().await.expect("close");
    for i in 0..3 {
        let message = Envelope::new("lag.test", format!("m{i}"));
        bus.publish(&topic, message.clone()).await.expect("publish");
        bus.send(&queue, message).await.expect("send");
    }
    let args = &[
        topic.as_str(),
        "--group",
        "billing",
        "--queue",
        queue.as_str(),
    ];
    wait_for_totals(url, args, &[3, 3]);
    bus_cmd(url)
        .args([&["lag"][..], args].concat())
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "topic {topic} group billing"
        )));
    let mut billing = bus
        .subscribe(&topic, SubscribeOptions::group("billing"))
        .await
        .expect("subscribe again");
    let mut jobs = bus
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    for _ in 0..3 {
        receive(&mut billing).await;
        receive(&mut jobs).await;
    }
    wait_for_totals(url, args, &[0, 0]);
    billing.close().await.expect("close");
    jobs.close().await.expect("close");
    bus.close().await.expect("close");
}

async fn delayed_publish_arrives_after_the_delay(url: &str) {
    let bus = bus::connect(url).await.expect("connect");
    let capabilities = bus.capabilities();
    let (topic, queue) = (unique("delay"), unique("delayq"));
    if let Some(reason) = capabilities.delayed_publish.unsupported_reason() {
        let output = bus_cmd(url)
            .args(["publish", "--queue", &queue, "-m", "later", "--delay", "1s"])
            .output()
            .unwrap();
        assert_one_line_error(&output, "unsupported");
        println!(
            "skipped: delayed publish on {}: {reason}",
            capabilities.name
        );
        return;
    }
    let mut group = bus
        .subscribe(&topic, SubscribeOptions::group("later"))
        .await
        .expect("subscribe");
    let mut jobs = bus
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let delay = Duration::from_secs(2);
    let started = tokio::time::Instant::now();
    let sent = run_json(
        url,
        &["publish", "--queue", &queue, "-m", "job", "--delay", "2s"],
    );
    assert_eq!(sent["delay_ms"], 2000);
    run_json(url, &["publish", &topic, "-m", "event", "--delay", "2s"]);
    let job = receive(&mut jobs).await;
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    assert_eq!(job.payload.as_ref(), b"job");
    let event = receive(&mut group).await;
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    assert_eq!(event.payload.as_ref(), b"event");

    let at = std::time::SystemTime::now() + delay;
    let at_text = headers::format_time(at);
    let sent = run_json(
        url,
        &[
            "publish",
            "--queue",
            &queue,
            "-m",
            "at",
            "--not-before",
            &at_text,
        ],
    );
    assert_eq!(sent["not_before"], at_text.as_str());
    let job = receive(&mut jobs).await;
    // Milliseconds are what the time carries.
    assert!(
        std::time::SystemTime::now() + Duration::from_millis(1) >= at,
        "arrived before {at_text}"
    );
    assert_eq!(job.payload.as_ref(), b"at");
    group.close().await.expect("close");
    jobs.close().await.expect("close");
    bus.close().await.expect("close");
}

fn check(url: &str) {
    bus_cmd(url)
        .arg("check")
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "round trip on a private topic: ok",
        ));
}

macro_rules! on_every_real_broker {
    ($($module:ident: $var:literal;)*) => {$(
        mod $module {
            use super::*;

            #[test]
            fn publish_then_tail_sees_it() {
                if let Some(url) = broker_url($var) {
                    publish_then_tail(&url);
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dead_letters_are_listed_shown_and_redriven() {
                if let Some(url) = broker_url($var) {
                    dead_letters_round_trip(&url).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_queue_dead_letter_is_sent_back_to_the_queue() {
                if let Some(url) = broker_url($var) {
                    queue_dead_letter_is_sent_back(&url).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lag_counts_what_waits_then_zero() {
                if let Some(url) = broker_url($var) {
                    lag_counts_then_drains(&url).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn publish_with_a_delay_arrives_after_it() {
                if let Some(url) = broker_url($var) {
                    delayed_publish_arrives_after_the_delay(&url).await;
                }
            }

            #[test]
            fn check_round_trips() {
                if let Some(url) = broker_url($var) {
                    check(&url);
                }
            }
        }
    )*};
}

on_every_real_broker! {
    nats: "BUS_TEST_NATS_URL";
    rabbitmq: "BUS_TEST_RABBITMQ_URL";
    kafka: "BUS_TEST_KAFKA_URL";
    sqs: "BUS_TEST_SQS_URL";
}
