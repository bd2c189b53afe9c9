//! No secret in any error, `Debug` or log line: each broker is connected through the facade
//! with a distinctive secret in its URL (a password or an AWS secret key), everything `bus`
//! and the client libraries log is captured at TRACE level (`tracing` events and `log`
//! records, as librdkafka's are), and the secret is looked for in the logs, in the error chain
//! of a failed connect or publish, and in the `Debug` and serde output of the configuration.
//!
//! Runs against the brokers of `scripts/brokers.sh`; without a broker's URL that broker is
//! skipped (with `BUS_REQUIRE_BROKERS=1`, a missing one fails).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bus::{BusConfig, Envelope};

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

fn assert_no_secret(broker: &str, seen: &[String]) {
    for (i, text) in seen.iter().enumerate() {
        assert!(
            !text.contains(SECRET),
            "{broker}: output {i} holds the secret: {text}"
        );
    }
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    let leaks: Vec<&str> = logs
        .lines()
        .filter(|line| {
            line.contains(SECRET) && !KNOWN_UPSTREAM_LEAKS.iter().any(|k| line.contains(k))
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
        assert_no_secret("rabbitmq", &seen);
        ran += 1;
    }
    if let Some(url) = broker_url("BUS_TEST_NATS_URL", "nats") {
        // The local server has no users: a password and a token are sent and ignored.
        let with_password = url.replacen("nats://", &format!("nats://svc:{SECRET}@"), 1);
        let with_token = url.replacen("nats://", &format!("nats://{SECRET}@"), 1);
        for url in [with_password, with_token] {
            assert!(url.contains(SECRET), "{url}");
            let seen = exercise(&url).await;
            assert_no_secret("nats", &seen);
        }
        ran += 1;
    }
    if let Some(url) = broker_url("BUS_TEST_SQS_URL", "sqs") {
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}access_key_id=AKIDCANARY&secret_access_key={SECRET}");
        let seen = exercise(&url).await;
        assert_no_secret("sqs", &seen);
        ran += 1;
    }
    if let Some(url) = broker_url("BUS_TEST_KAFKA_URL", "kafka") {
        // tansu speaks no SASL: the login cannot succeed.
        let url = url.replacen("kafka://", &format!("kafka://svc:{SECRET}@"), 1);
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}sasl_mechanism=PLAIN");
        let seen = exercise(&url).await;
        assert_no_secret("kafka", &seen);
        ran += 1;
    }
    println!("brokers checked: {ran}");
}
