//! Request-reply latency of bus over core NATS against raw async-nats, on the same server in
//! one run.
//!
//! The same exchange both ways, one request at a time: `BUS_BENCH_MESSAGES` requests (default
//! 2,000) of 256 bytes, each answered with 256 bytes, the time from sending a request to
//! holding its reply recorded per request. Requester and responder each have their own
//! connection, as two services would. bus sends with `Requester::request` and answers from
//! `Responder::serve` (a queue group); the raw client does what bus does on the wire:
//! `Client::send_request` with the same timeout to a subject served by a queue subscription in
//! a group, the reply published to the request's reply subject. It sends the CloudEvents
//! headers bus writes (`ce-specversion`, `ce-id`, `ce-type`, `ce-source`, `ce-time`,
//! `ce-correlationid`, and on a reply `ce-causationid`), built per message, and reads the
//! correlation id of what it receives, as a service would to match them.
//! `BUS_BENCH_ROUNDS` rounds (default 5) alternate which client goes first; each round starts
//! with a warm-up of 100 requests that is not recorded.
//!
//! `BUS_TEST_NATS_URL` (default `nats://127.0.0.1:4222`). Run:
//!
//! ```text
//! BUS_BENCH_MESSAGES=2000 BUS_BENCH_ROUNDS=5 cargo bench -p adapter-nats --bench request_reply
//! ```
//!
//! Prints a table of p50 and p99 per client (median and range across rounds), the range of the
//! per-round ratios, then `latency p50 ratio=<bus/raw>` and, last, `latency p99
//! ratio=<bus/raw>` (medians of the per-round ratios; above 1 means bus was slower).

use std::time::{Duration, Instant, SystemTime};

use adapter_nats::header_names::{
    CE_CAUSATIONID, CE_CORRELATIONID, CE_ID, CE_SOURCE, CE_SPECVERSION, CE_TIME, CE_TYPE,
};
use adapter_nats::NatsBroker;
use async_nats::{HeaderMap, HeaderName};
use bus_core::conformance::bench::{env_number, percentile_us, print_latency_ratios, spread};
use bus_core::{headers, Broker, Envelope, MessageId, Requester, Responder, ServeOptions};
use futures::StreamExt;

const SIZE: usize = 256;
const WARM_UP: usize = 100;
const TIMEOUT: Duration = Duration::from_secs(10);
/// The queue group bus's responders join when they name none.
const GROUP: &str = "default";

/// The p50 and p99 of one round, in microseconds.
#[derive(Debug, Clone, Copy)]
struct Row {
    p50: f64,
    p99: f64,
}

/// The nearest-rank percentile `p` (0–100) of sorted `times`, in microseconds.
fn row(mut times: Vec<Duration>) -> Row {
    times.sort_unstable();
    Row {
        p50: percentile_us(&times, 50),
        p99: percentile_us(&times, 99),
    }
}

async fn through_bus(url: &str, n: usize, tag: &str) -> Row {
    let topic = format!("bench.rr.{tag}");
    let responder = NatsBroker::connect(url).await.expect("connect");
    let requester = NatsBroker::connect(url).await.expect("connect");
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
    for i in 0..WARM_UP + n {
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
    requester.close().await.expect("close");
    responder.close().await.expect("close");
    serving.await.expect("responder task");
    row(times)
}

/// The headers bus writes for a message of `kind`, built per message as a service would (the
/// constant names as static `HeaderName`s, as bus writes them); a reply carries its request's
/// correlation id and the request's id as its causation id.
fn raw_headers(kind: &str, cause: Option<(&str, &str)>) -> HeaderMap {
    let id = MessageId::new().to_string();
    let mut map = HeaderMap::new();
    map.insert(HeaderName::from_static(CE_SPECVERSION), "1.0");
    map.insert(HeaderName::from_static(CE_ID), id.as_str());
    map.insert(HeaderName::from_static(CE_TYPE), kind);
    map.insert(HeaderName::from_static(CE_SOURCE), "bus");
    map.insert(
        HeaderName::from_static(CE_TIME),
        headers::format_time(SystemTime::now()).as_str(),
    );
    match cause {
        Some((correlation, causation)) => {
            map.insert(HeaderName::from_static(CE_CORRELATIONID), correlation);
            map.insert(HeaderName::from_static(CE_CAUSATIONID), causation);
        }
        None => map.insert(HeaderName::from_static(CE_CORRELATIONID), id.as_str()),
    }
    map
}

/// A header's value, as a service reads it.
fn header(map: Option<&HeaderMap>, name: &str) -> String {
    map.and_then(|m| m.get(name))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

async fn through_raw(url: &str, n: usize, tag: &str) -> Row {
    let subject = format!("benchraw.rr.{tag}");
    let responder = async_nats::connect(url).await.expect("connect");
    let requester = async_nats::connect(url).await.expect("connect");
    let mut requests = responder
        .queue_subscribe(subject.clone(), GROUP.to_owned())
        .await
        .expect("subscribe");
    // The server has the subscription once it answered a later request (as bus's `serve`
    // makes sure): nobody serves a fresh inbox.
    let _ = responder
        .request(responder.new_inbox(), bytes::Bytes::new())
        .await;
    let serving = {
        let responder = responder.clone();
        tokio::spawn(async move {
            let payload = bytes::Bytes::from(vec![b'y'; SIZE]);
            while let Some(request) = requests.next().await {
                let Some(reply_to) = request.reply else {
                    continue;
                };
                let correlation = header(request.headers.as_ref(), CE_CORRELATIONID);
                let id = header(request.headers.as_ref(), CE_ID);
                let map = raw_headers("bench.reply", Some((&correlation, &id)));
                responder
                    .publish_with_headers(reply_to, map, payload.clone())
                    .await
                    .expect("reply");
            }
        })
    };
    let payload = bytes::Bytes::from(vec![b'x'; SIZE]);
    let mut times = Vec::with_capacity(n);
    for i in 0..WARM_UP + n {
        let started = Instant::now();
        let map = raw_headers("bench.request", None);
        let sent = header(Some(&map), CE_CORRELATIONID);
        let reply = requester
            .send_request(
                subject.clone(),
                async_nats::Request::new()
                    .payload(payload.clone())
                    .headers(map)
                    .timeout(Some(TIMEOUT)),
            )
            .await
            .expect("request");
        let correlation = header(reply.headers.as_ref(), CE_CORRELATIONID);
        let elapsed = started.elapsed();
        assert_eq!(reply.payload.len(), SIZE);
        assert_eq!(correlation, sent);
        if i >= WARM_UP {
            times.push(elapsed);
        }
    }
    drop(requester);
    drop(responder);
    serving.abort();
    let _ = serving.await;
    row(times)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("BUS_TEST_NATS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    let n = env_number("BUS_BENCH_MESSAGES", 2_000);
    let rounds = env_number("BUS_BENCH_ROUNDS", 5);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    let mut bus_rows = Vec::new();
    let mut raw_rows = Vec::new();
    for round in 0..rounds {
        let tag = format!("{}.{round}", MessageId::new().as_str().replace('-', ""));
        if round % 2 == 0 {
            raw_rows.push(through_raw(&url, n, &tag).await);
            bus_rows.push(through_bus(&url, n, &tag).await);
        } else {
            bus_rows.push(through_bus(&url, n, &tag).await);
            raw_rows.push(through_raw(&url, n, &tag).await);
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }

    println!();
    println!(
        "NATS request-reply latency: {n} requests one at a time, {SIZE} B each way, core NATS, \
         queue-group responder; {rounds} rounds, median [min–max] of the rounds' figures, in µs"
    );
    println!("machine: {cores} cores (nproc), a shared 2-core box; server on loopback");
    println!();
    println!("| {:<14} | {:>22} | {:>22} |", "client", "p50 µs", "p99 µs");
    println!("|{:-<16}|{:->24}|{:->24}|", "", "", "");
    for (name, rows) in [("bus", &bus_rows), ("raw async-nats", &raw_rows)] {
        println!(
            "| {:<14} | {:>22} | {:>22} |",
            name,
            spread(rows.iter().map(|r| r.p50).collect(), 0),
            spread(rows.iter().map(|r| r.p99).collect(), 0),
        );
    }
    let ratios = |pick: fn(&Row) -> f64| -> Vec<f64> {
        bus_rows
            .iter()
            .zip(&raw_rows)
            .map(|(bus, raw)| pick(bus) / pick(raw))
            .collect()
    };
    println!();
    print_latency_ratios(&ratios(|r| r.p50), &ratios(|r| r.p99), &[]);
}
