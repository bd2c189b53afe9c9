//! Request-reply latency of the RabbitMQ adapter against raw lapin, on the same broker in one
//! run.
//!
//! The same exchange both ways, one request at a time: `BUS_BENCH_MESSAGES` requests (default
//! 2,000) of 256 bytes, each answered with 256 bytes, the time from sending a request to
//! holding its reply recorded per request. Requester and responder each have their own
//! connection, as two services would. Both sides use what bus uses: the request is published
//! persistent and mandatory (so that nobody serving is known at once) on a channel in confirm
//! mode consuming direct reply-to (`amq.rabbitmq.reply-to`, no ack); the responder consumes an
//! auto-deleted queue bound to the request exchange (prefetch as bus's default), acks each
//! request as it takes it, and publishes the reply to the request's `reply_to` through the
//! default exchange on a channel in confirm mode, waiting for the confirm. The raw client sends
//! the CloudEvents header table bus writes (specversion, id, type, source, time, correlation
//! id, and on a reply the causation id) with the same AMQP properties, built per message, and
//! matches a reply to its request by correlation id. `BUS_BENCH_ROUNDS` rounds (default 5)
//! alternate which client goes first; each round starts with a warm-up of 100 requests that
//! is not recorded. The broker is `BUS_TEST_RABBITMQ_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! ```text
//! BUS_BENCH_MESSAGES=2000 BUS_BENCH_ROUNDS=5 cargo bench -p adapter-rabbitmq --bench request_reply
//! ```
//!
//! Prints a table of p50 and p99 per client (median and range across rounds), with the CPU time
//! the whole process spent per request and how often its threads went to sleep per request
//! (Linux), the range of the per-round ratios, then `latency p50 ratio=<bus/raw>` and, last,
//! `latency p99 ratio=<bus/raw>` (medians of the per-round ratios; above 1 means bus was
//! slower). On this noisy machine the sleeps per request are the steadiest figure: each is a
//! thread that went to sleep and had to be woken, which under load is where latency goes.

use std::time::{Duration, Instant, SystemTime};

use adapter_rabbitmq::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use adapter_rabbitmq::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use adapter_rabbitmq::lapin::{BasicProperties, Connection, ConnectionProperties};
use adapter_rabbitmq::{RabbitMqBroker, CLOUDEVENTS_PREFIX};
use bus_core::conformance::bench::{env_number, percentile_us, print_latency_ratios, spread};
use bus_core::{headers, Broker, Envelope, MessageId, Requester, Responder, ServeOptions};
use futures::StreamExt;

const SIZE: usize = 256;
const WARM_UP: usize = 100;
const TIMEOUT: Duration = Duration::from_secs(10);
/// bus's default prefetch, which its responders consume with.
const PREFETCH: u16 = 100;
const REQUEST_EXCHANGE: &str = "bus.requests";
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The p50 and p99 of one round, in microseconds, and per request the CPU time the process
/// spent (µs) and the times its threads went to sleep.
#[derive(Debug, Clone, Copy)]
struct Row {
    p50: f64,
    p99: f64,
    cpu: Option<f64>,
    sleeps: Option<f64>,
}

/// CPU time and voluntary context switches of the process.
#[derive(Debug, Clone, Copy)]
struct Usage {
    cpu: Duration,
    sleeps: u64,
}

/// What every thread of this process has used so far: CPU time (the first field of each
/// thread's `/proc/self/task/<id>/schedstat`) and voluntary context switches (each a thread
/// going to sleep to wait, to be woken again); `None` where there is no such file (not Linux).
/// Requester, responder, lapin's I/O threads and tokio's workers all count; the threads live
/// through a round.
fn usage() -> Option<Usage> {
    let mut cpu = 0;
    let mut sleeps = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let schedstat = std::fs::read_to_string(path.join("schedstat")).ok()?;
        cpu += schedstat.split_whitespace().next()?.parse::<u64>().ok()?;
        let status = std::fs::read_to_string(path.join("status")).ok()?;
        let switches = status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))?;
        sleeps += switches.trim().parse::<u64>().ok()?;
    }
    Some(Usage {
        cpu: Duration::from_nanos(cpu),
        sleeps,
    })
}

/// The nearest-rank percentile `p` (0–100) of sorted `times`, in microseconds.
fn row(mut times: Vec<Duration>, before: Option<Usage>) -> Row {
    let used = usage().zip(before).map(|(after, before)| Usage {
        cpu: after.cpu - before.cpu,
        sleeps: after.sleeps - before.sleeps,
    });
    let n = times.len() as f64;
    times.sort_unstable();
    Row {
        p50: percentile_us(&times, 50),
        p99: percentile_us(&times, 99),
        cpu: used.map(|u| u.cpu.as_secs_f64() * 1e6 / n),
        sleeps: used.map(|u| u.sleeps as f64 / n),
    }
}

async fn through_bus(url: &str, n: usize, tag: &str) -> Row {
    let topic = format!("bench.rr.{tag}.bus");
    let responder = RabbitMqBroker::connect(url).await.expect("connect");
    let requester = RabbitMqBroker::connect(url).await.expect("connect");
    let mut requests = responder
        .serve(&topic, ServeOptions::default())
        .await
        .expect("serve");
    let serving = tokio::spawn(async move {
        let payload = vec![b'y'; SIZE];
        // Ends when the responder's connection closes.
        while let Some(Ok(request)) = requests.next().await {
            request
                .reply(Envelope::new("bench.reply", payload.clone()))
                .await
                .expect("reply");
        }
    });
    let payload = vec![b'x'; SIZE];
    let mut times = Vec::with_capacity(n);
    let mut before = None;
    for i in 0..WARM_UP + n {
        if i == WARM_UP {
            before = usage();
        }
        let started = Instant::now();
        let reply = requester
            .request(
                &topic,
                Envelope::new("bench.request", payload.clone()),
                TIMEOUT,
            )
            .await
            .expect("request");
        let elapsed = started.elapsed();
        assert_eq!(reply.payload.len(), SIZE);
        if i >= WARM_UP {
            times.push(elapsed);
        }
    }
    let row = row(times, before);
    requester.close().await.expect("close");
    responder.close().await.expect("close");
    serving.await.expect("responder task");
    row
}

async fn connect_raw(url: &str) -> Connection {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    Connection::connect(url, props).await.expect("connect")
}

/// What bus writes for a message: the CloudEvents attributes as headers and the id, type,
/// correlation id and time as properties, built per message as a service would.
fn raw_properties(kind: &str, source: &str, causation: Option<&str>) -> BasicProperties {
    let id = MessageId::new().to_string();
    let correlation = causation.unwrap_or(&id).to_owned();
    let now = SystemTime::now();
    let seconds = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut table = FieldTable::default();
    let mut put = |name: &str, value: &str| {
        table.insert(
            ShortString::from(format!("{CLOUDEVENTS_PREFIX}{name}")),
            AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
        );
    };
    put("specversion", "1.0");
    put("id", &id);
    put("type", kind);
    put("source", &format!("/bus/{source}"));
    put("time", &headers::format_time(now));
    put("correlationid", &correlation);
    if let Some(causation) = causation {
        put("causationid", causation);
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(seconds)
        .with_message_id(ShortString::from(id))
        .with_correlation_id(ShortString::from(correlation))
        .with_type(ShortString::from(kind))
        .with_headers(table)
}

/// The raw responder: consumes `queue` with manual acks, acks each request as it takes it and
/// publishes the reply to its `reply_to`, confirmed.
async fn raw_responder(
    connection: &Connection,
    queue: &str,
    key: &str,
) -> tokio::task::JoinHandle<()> {
    let consuming = connection.create_channel().await.expect("channel");
    consuming
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("qos");
    consuming
        .queue_declare(
            queue,
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    consuming
        .queue_bind(
            queue,
            REQUEST_EXCHANGE,
            key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let mut requests = consuming
        .basic_consume(
            queue,
            "bench-responder",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let replying = connection.create_channel().await.expect("channel");
    replying
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    tokio::spawn(async move {
        let payload = vec![b'y'; SIZE];
        while let Some(Ok(request)) = requests.next().await {
            consuming
                .basic_ack(request.delivery_tag, BasicAckOptions::default())
                .await
                .expect("ack");
            let Some(reply_to) = request.properties.reply_to().as_ref() else {
                continue;
            };
            let Some(id) = request.properties.message_id().as_ref() else {
                continue;
            };
            let props = raw_properties("bench.reply", reply_to.as_str(), Some(id.as_str()));
            let confirm = replying
                .basic_publish(
                    "",
                    reply_to.as_str(),
                    BasicPublishOptions::default(),
                    &payload,
                    props,
                )
                .await
                .expect("reply");
            assert!(confirm.await.expect("confirm").is_ack());
        }
    })
}

async fn through_lapin(url: &str, n: usize, tag: &str) -> Row {
    let key = format!("bench.rr.{tag}.raw");
    let queue = format!("bench.rr.{tag}.raw@default");
    let serving = connect_raw(url).await;
    let responder = raw_responder(&serving, &queue, &key).await;

    let connection = connect_raw(url).await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut replies = channel
        .basic_consume(
            REPLY_TO,
            "bench-requester",
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume direct reply-to");
    let payload = vec![b'x'; SIZE];
    let mut times = Vec::with_capacity(n);
    let mut before = None;
    for i in 0..WARM_UP + n {
        if i == WARM_UP {
            before = usage();
        }
        let started = Instant::now();
        let props =
            raw_properties("bench.request", &key, None).with_reply_to(ShortString::from(REPLY_TO));
        let id = props.message_id().clone().expect("id");
        let confirm = channel
            .basic_publish(
                REQUEST_EXCHANGE,
                &key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &payload,
                props,
            )
            .await
            .expect("publish");
        let confirmation = confirm.await.expect("confirm");
        assert!(confirmation.is_ack() && confirmation.take_message().is_none());
        let reply = loop {
            let reply = tokio::time::timeout(TIMEOUT, replies.next())
                .await
                .expect("reply in time")
                .expect("open")
                .expect("reply");
            // A reply to an earlier request that gave up is skipped, as bus drops it.
            if reply.properties.correlation_id().as_ref() == Some(&id) {
                break reply;
            }
        };
        let elapsed = started.elapsed();
        assert_eq!(reply.data.len(), SIZE);
        if i >= WARM_UP {
            times.push(elapsed);
        }
    }
    let row = row(times, before);
    let _ = connection.close(200, "done").await;
    let _ = serving.close(200, "done").await;
    let _ = responder.await;
    row
}

#[tokio::main]
async fn main() {
    let url = std::env::var("BUS_TEST_RABBITMQ_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let n = env_number("BUS_BENCH_MESSAGES", 2_000);
    let rounds = env_number("BUS_BENCH_ROUNDS", 5);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // The request exchange exists once a bus connection declared it.
    let declare = RabbitMqBroker::connect(&url).await.expect("connect");
    let _ = declare.close().await;

    let mut bus_rows = Vec::new();
    let mut raw_rows = Vec::new();
    for round in 0..rounds {
        let tag = format!("{}.{round}", std::process::id());
        if round % 2 == 0 {
            raw_rows.push(through_lapin(&url, n, &tag).await);
            bus_rows.push(through_bus(&url, n, &tag).await);
        } else {
            bus_rows.push(through_bus(&url, n, &tag).await);
            raw_rows.push(through_lapin(&url, n, &tag).await);
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }

    println!();
    println!(
        "RabbitMQ request-reply latency: {n} requests one at a time, {SIZE} B each way, direct \
         reply-to, confirmed mandatory requests, confirmed replies; {rounds} rounds, median \
         [min–max] of the rounds' figures, in µs"
    );
    println!("machine: {cores} cores (nproc), a shared 2-core box; broker on loopback");
    println!();
    println!(
        "| {:<10} | {:>20} | {:>20} | {:>20} | {:>20} |",
        "client", "p50 µs", "p99 µs", "CPU µs / request", "sleeps / request"
    );
    println!(
        "|{:-<12}|{:->22}|{:->22}|{:->22}|{:->22}|",
        "", "", "", "", ""
    );
    for (name, rows) in [("bus", &bus_rows), ("raw lapin", &raw_rows)] {
        println!(
            "| {:<10} | {:>20} | {:>20} | {:>20} | {:>20} |",
            name,
            spread(rows.iter().map(|r| r.p50).collect(), 0),
            spread(rows.iter().map(|r| r.p99).collect(), 0),
            spread(rows.iter().filter_map(|r| r.cpu).collect(), 0),
            spread(rows.iter().filter_map(|r| r.sleeps).collect(), 1),
        );
    }
    println!(
        "(CPU and sleeps, Linux only: every thread of this process, requester and responder \
         together, over the measured requests; a sleep is a thread waiting to be woken)"
    );
    let ratios = |pick: fn(&Row) -> Option<f64>| -> Vec<f64> {
        bus_rows
            .iter()
            .zip(&raw_rows)
            .filter_map(|(bus, raw)| Some(pick(bus)? / pick(raw)?))
            .collect()
    };
    println!();
    print_latency_ratios(
        &ratios(|r| Some(r.p50)),
        &ratios(|r| Some(r.p99)),
        &[("CPU", ratios(|r| r.cpu)), ("sleeps", ratios(|r| r.sleeps))],
    );
}
