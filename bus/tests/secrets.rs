//! No secret in any error, `Debug` or log line: each broker is connected through the facade
//! with a distinctive secret in its URL (a password or an AWS secret key), everything `bus`
//! and the client libraries log is captured at TRACE level (`tracing` events and `log`
//! records, as librdkafka's are), and the secret is looked for in the logs, in the error chain
//! of a failed connect or publish, and in the `Debug` and serde output of the configuration.
//!
//! A second test keeps a connection that logged in with a secret going through a cut: the
//! brokers are reached through a fault proxy that resets every connection and holds new ones
//! for a while, so each client logs its reconnect attempts (failed and successful) with the
//! secret in its settings; RabbitMQ over TLS (its password), NATS (password and token) and SQS
//! (the secret key signing every call). Kafka is not in it: librdkafka connects to the
//! advertised listener after bootstrap, which a proxy in front of the bootstrap address does
//! not cut.
//!
//! Runs against the brokers of `scripts/brokers.sh`; without a broker's URL that broker is
//! skipped (with `BUS_REQUIRE_BROKERS=1`, a missing one fails).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bus::{BusConfig, Envelope};
use bus_core::conformance::FaultProxy;

/// The secret fed in; it must never come out.
const SECRET: &str = "Zq9LeakCanary7";

/// Log lines of client libraries that print the secret themselves, at a level no production
/// service runs them at; docs/SECURITY.md names them and how to keep them off. Any other line
/// holding the secret fails the test.
/// - async-nats 0.46 writes the whole `CONNECT` frame, password and token included, at TRACE
///   under `async_nats::connection`.
const KNOWN_UPSTREAM_LEAKS: &[&str] = &["TRACE async_nats::connection: write operation: CONNECT"];

/// Everything logged by the process, from when `capture` was first called.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let logs = logs.clone();
            move || Sink(logs.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(writer)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        log::set_boxed_logger(Box::new(LogSink(logs.clone()))).expect("one logger");
        log::set_max_level(log::LevelFilter::Trace);
        logs
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `log` records (librdkafka's, through rdkafka) into the same buffer.
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl log::Log for LogSink {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = format!(
            "{} {}: {}\n",
            record.level(),
            record.target(),
            record.args()
        );
        self.0.lock().unwrap().extend_from_slice(line.as_bytes());
    }
    fn flush(&self) {}
}

fn broker_url(var: &str, broker: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("BUS_REQUIRE_BROKERS").as_deref() == Ok("1") => {
            panic!("{var} is not set and BUS_REQUIRE_BROKERS=1")
        }
        _ => {
            println!("skipped: {broker}: {var} is not set");
            None
        }
    }
}

/// Connects to `url`, publishes one message if that worked, and returns what the caller can
/// see: the error chain of whatever failed and the configuration's `Debug` and JSON.
async fn exercise(url: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let config: BusConfig = serde_json::from_value(serde_json::json!({ "url": url })).unwrap();
    seen.push(format!("{config:?}"));
    seen.push(serde_json::to_string(&config).unwrap());
    let connected = tokio::time::timeout(Duration::from_secs(30), config.connect()).await;
    match connected {
        Err(_) => seen.push("connect timed out".into()),
        Ok(Err(error)) => seen.push(chain(&error)),
        Ok(Ok(bus)) => {
            seen.push(format!("{bus:?}"));
            let published = tokio::time::timeout(
                Duration::from_secs(30),
                bus.publish("secrets.canary", Envelope::new("canary", "hello")),
            )
            .await;
            if let Ok(Err(error)) = published {
                seen.push(chain(&error));
            }
            let _ = bus.close().await;
        }
    }
    seen
}

/// An error and all its sources, `Display` and `Debug`.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("{error} / {error:?}");
    let mut source = error.source();
    while let Some(next) = source {
        text.push_str(&format!(" / {next} / {next:?}"));
        source = next.source();
    }
    text
}

fn assert_secret_absent(broker: &str, secret: &str, seen: &[String]) {
    for (i, text) in seen.iter().enumerate() {
        assert!(
            !text.contains(secret),
            "{broker}: output {i} holds the secret: {text}"
        );
    }
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    let leaks: Vec<&str> = logs
        .lines()
        .filter(|line| {
            line.contains(secret) && !KNOWN_UPSTREAM_LEAKS.iter().any(|k| line.contains(k))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "{broker}: log lines hold the secret: {leaks:#?}"
    );
    println!(
        "{broker}: secret absent from {} outputs and {} bytes of TRACE logs",
        seen.len(),
        logs.len()
    );
}

/// One test, so that the brokers' logs do not mix with another test's secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_errors_debug_serde_or_logs() {
    logs();
    let mut ran = 0;
    if let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL", "rabbitmq") {
        // The right user with a wrong password: the login is refused.
        let url = url.replacen("guest:guest@", &format!("guest:{SECRET}@"), 1);
        assert!(url.contains(SECRET), "{url}");
        let seen = exercise(&url).await;
        assert!(
            seen.iter()
                .any(|s| s.contains("ACCESS_REFUSED") || s.contains("auth")),
            "rabbitmq: the wrong password was not refused: {seen:?}"
        );
        assert_secret_absent("rabbitmq", SECRET, &seen);
        ran += 1;
    }
    if let Some(url) = broker_url("BUS_TEST_NATS_URL", "nats") {
        // The local server has no users: a password and a token are sent and ignored.
        let with_password = url.replacen("nats://", &format!("nats://svc:{SECRET}@"), 1);
        let with_token = url.replacen("nats://", &format!("nats://{SECRET}@"), 1);
        for url in [with_password, with_token] {
            assert!(url.contains(SECRET), "{url}");
            let seen = exercise(&url).await;
            assert_secret_absent("nats", SECRET, &seen);
        }
        ran += 1;
    }
    if let Some(url) = broker_url("BUS_TEST_SQS_URL", "sqs") {
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}access_key_id=AKIDCANARY&secret_access_key={SECRET}");
        let seen = exercise(&url).await;
        assert_secret_absent("sqs", SECRET, &seen);
        ran += 1;
    }
    if let Some(url) = broker_url("BUS_TEST_KAFKA_URL", "kafka") {
        // tansu speaks no SASL: the login cannot succeed.
        let url = url.replacen("kafka://", &format!("kafka://svc:{SECRET}@"), 1);
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}sasl_mechanism=PLAIN");
        let seen = exercise(&url).await;
        assert_secret_absent("kafka", SECRET, &seen);
        ran += 1;
    }
    println!("brokers checked: {ran}");
}

/// The secret of the reconnect test: another one than [`SECRET`], so the two tests' logs,
/// captured together, are told apart.
const RECONNECT_SECRET: &str = "Zq9ReconnectCanary4";

/// Connects to `url` (which points at `proxy`), publishes, then cuts every connection and
/// holds new ones for `hold` (so the client's reconnect attempts fail and are logged), lets
/// them through, and publishes again until it works. Returns what the caller sees, as
/// [`exercise`] does; fails the test when the client never reconnected.
async fn through_a_cut(broker: &str, url: &str, proxy: &FaultProxy) -> Vec<String> {
    let mut seen = Vec::new();
    let config: BusConfig = serde_json::from_value(serde_json::json!({ "url": url })).unwrap();
    seen.push(format!("{config:?}"));
    seen.push(serde_json::to_string(&config).unwrap());
    let bus = tokio::time::timeout(Duration::from_secs(30), config.connect())
        .await
        .unwrap_or_else(|_| panic!("{broker}: connect timed out"))
        .unwrap_or_else(|e| panic!("{broker}: connect: {}", chain(&e)));
    seen.push(format!("{bus:?}"));
    let topic = format!("secrets.reconnect.{}", bus_core::MessageId::new());
    bus.publish(&topic, Envelope::new("canary", "before"))
        .await
        .unwrap_or_else(|e| panic!("{broker}: publish before the cut: {}", chain(&e)));
    let before = proxy.accepted();
    proxy.stall();
    proxy.reset();
    // While held, a publish fails or waits: its error is output too.
    let held = tokio::time::timeout(
        Duration::from_secs(3),
        bus.publish(&topic, Envelope::new("canary", "held")),
    )
    .await;
    if let Ok(Err(error)) = held {
        seen.push(chain(&error));
    }
    proxy.resume();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match bus.publish(&topic, Envelope::new("canary", "after")).await {
            Ok(()) => break,
            Err(error) => {
                seen.push(chain(&error));
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{broker}: no publish within 60 s of the cut: {}",
                    chain(&error)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert!(
        proxy.accepted() > before,
        "{broker}: the client did not reconnect after the cut"
    );
    let _ = bus.close().await;
    seen
}

/// A proxy in front of the `host:port` of `url`, and `url` pointed at the proxy.
async fn proxied(url: &str) -> (FaultProxy, String) {
    let parsed = url::Url::parse(url).expect("a broker URL");
    let upstream = tokio::net::lookup_host((
        parsed.host_str().expect("a host"),
        parsed.port().expect("a port"),
    ))
    .await
    .expect("the broker's address")
    .next()
    .expect("an address");
    let proxy = FaultProxy::start().await.expect("a fault proxy");
    proxy.forward_to(upstream);
    let mut via = parsed;
    via.set_port(Some(proxy.addr().port())).unwrap();
    (proxy, via.into())
}

/// Logged-in connections cut and re-made: nothing the clients log while reconnecting, and no
/// error met meanwhile, holds the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_across_reconnects() {
    logs();
    let mut ran = 0;
    if let Some(url) = broker_url("BUS_TEST_RABBITMQ_TLS_URL", "rabbitmq-tls") {
        let dir = std::env::var("BUS_TEST_TLS_DIR").expect("BUS_TEST_TLS_DIR beside the TLS URL");
        let mut login = url::Url::parse(&url).unwrap();
        // The test user's password is a fixed one the broker knows: it is the secret here.
        let password = login.password().expect("a password").to_owned();
        login.set_password(None).unwrap();
        let (proxy, via) = proxied(login.as_str()).await;
        let mut via = url::Url::parse(&via).unwrap();
        via.set_password(Some(&password)).unwrap();
        via.query_pairs_mut()
            .append_pair("tls_ca", &format!("{dir}/ca.pem"))
            .append_pair("tls_server_name", "localhost")
            .append_pair("connect_timeout_ms", "500");
        let seen = through_a_cut("rabbitmq-tls", via.as_str(), &proxy).await;
        assert_secret_absent("rabbitmq-tls", &password, &seen);
        ran += 1;
    }
    if let Some(url) = broker_url("BUS_TEST_NATS_URL", "nats") {
        let (proxy, via) = proxied(&url).await;
        let with_password = via.replacen("nats://", &format!("nats://svc:{RECONNECT_SECRET}@"), 1);
        let with_token = via.replacen("nats://", &format!("nats://{RECONNECT_SECRET}@"), 1);
        for url in [with_password, with_token] {
            let seen = through_a_cut("nats", &url, &proxy).await;
            assert_secret_absent("nats", RECONNECT_SECRET, &seen);
        }
        ran += 1;
    }
    if let Some(url) = broker_url("BUS_TEST_SQS_URL", "sqs") {
        let (proxy, via) = proxied(&url.replacen("sqs://", "http://", 1)).await;
        let via = via.replacen("http://", "sqs://", 1);
        let separator = if via.contains('?') { '&' } else { '?' };
        let url = format!(
            "{via}{separator}access_key_id=AKIDCANARY&secret_access_key={RECONNECT_SECRET}&connect_timeout_ms=1000"
        );
        let seen = through_a_cut("sqs", &url, &proxy).await;
        assert_secret_absent("sqs", RECONNECT_SECRET, &seen);
        ran += 1;
    }
    println!("brokers cut and reconnected: {ran}");
}
