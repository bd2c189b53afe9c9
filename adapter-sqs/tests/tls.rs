//! HTTPS to the SQS and SNS endpoint: moto serving https itself (`moto_server --ssl-cert
//! --ssl-key`) with a certificate for `127.0.0.1` and `localhost` from a throwaway CA made
//! here (rcgen), started by this test binary on a free port.
//!
//! Cases: the right CA (`tls_ca`, as a file or as PEM text) round-trips a message through SNS
//! and SQS; a wrong CA, and no CA (the system's roots, which do not hold the throwaway CA),
//! fail `connect` with a `Config` error naming `tls_ca` within a bound, not a hang; a
//! certificate for another name fails the same way and `tls_server_name` accepts it; a
//! server that accepts the connection and never answers fails with `Timeout` at
//! `connect_timeout_ms`.
//!
//! Runs when `BUS_TEST_SQS_URL` is set and `moto_server` is installed; with
//! `BUS_REQUIRE_BROKERS=1` a missing `moto_server` fails.

mod support;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use adapter_sqs::{SqsBroker, SqsConfig};
use bus_core::ErrorKind;
use support::{moto_available, round_trip, temp_dir, Ca, Moto};

/// How long a connect with a bad TLS setting may take to fail (the SDK retries a refused
/// handshake twice, with backoff).
const FAIL_WITHIN: Duration = Duration::from_secs(15);

/// The https servers of this binary and the files the cases use.
struct Servers {
    /// Certificate for `127.0.0.1` and `localhost`, signed by `ca`.
    moto: Moto,
    /// Certificate for `sqs.bus.test` only, signed by `ca`.
    other_name: Moto,
    ca: PathBuf,
    ca_pem: String,
    wrong_ca: PathBuf,
}

fn servers() -> Option<&'static Servers> {
    static SERVERS: OnceLock<Option<Servers>> = OnceLock::new();
    SERVERS
        .get_or_init(|| {
            if !moto_available() {
                return None;
            }
            let dir = temp_dir("tls");
            let ca = Ca::new("bus sqs test CA");
            let (cert, key) = ca.server(&dir, "server", &["localhost", "127.0.0.1"]);
            let (other_cert, other_key) = ca.server(&dir, "other", &["sqs.bus.test"]);
            Some(Servers {
                moto: Moto::start(Some((&cert, &key)), &dir.join("moto.log")),
                other_name: Moto::start(
                    Some((&other_cert, &other_key)),
                    &dir.join("moto-other.log"),
                ),
                ca: ca.write(&dir, "ca"),
                ca_pem: ca.pem(),
                wrong_ca: Ca::new("a CA nobody uses").write(&dir, "wrong-ca"),
            })
        })
        .as_ref()
}

fn url(moto: &Moto, extra: &str) -> SqsConfig {
    SqsConfig::from_url(&format!("{}&tls=true{extra}", moto.url())).expect("an sqs:// URL")
}

/// Connects with `config`, expecting a `Config` error within the bound that names `tls_ca`.
async fn refused(config: SqsConfig) -> bus_core::Error {
    let started = Instant::now();
    let result = tokio::time::timeout(FAIL_WITHIN * 2, SqsBroker::connect_with(config))
        .await
        .expect("connect gives up instead of hanging");
    let err = result.expect_err("the certificate must be refused");
    assert!(
        started.elapsed() < FAIL_WITHIN,
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("tls_ca"), "{err}");
    println!("refused in {:?}: {err}", started.elapsed());
    err
}

/// Before `tls_ca`, the adapter had no way to trust another CA than the system's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_ca_round_trips() {
    let Some(servers) = servers() else { return };
    let ca = servers.ca.display().to_string();
    let config = url(&servers.moto, &format!("&tls_ca={ca}"));
    assert_eq!(
        config.endpoint.as_deref(),
        Some(&*servers.moto.endpoint()),
        "the endpoint is https"
    );
    round_trip(config).await.expect("round trip over https");
    // PEM text instead of a path, and a URL without `tls=true`: `tls_ca` implies https.
    let config = SqsConfig::from_url(&servers.moto.url())
        .expect("an sqs:// URL")
        .with_endpoint(servers.moto.endpoint())
        .with_tls_ca(servers.ca_pem.clone());
    round_trip(config)
        .await
        .expect("round trip, CA as PEM text");
    let config = SqsConfig::from_url(&format!("{}&tls_ca={ca}", servers.moto.url())).unwrap();
    assert!(config.endpoint.unwrap().starts_with("https://"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_is_a_config_error_not_a_hang() {
    let Some(servers) = servers() else { return };
    let wrong = servers.wrong_ca.display().to_string();
    let err = refused(url(&servers.moto, &format!("&tls_ca={wrong}"))).await;
    assert!(err.to_string().contains("certificate"), "{err}");
}

/// Without `tls_ca` the system's roots are used, and they do not hold the throwaway CA: the
/// default verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_roots_do_not_trust_the_throwaway_ca() {
    let Some(servers) = servers() else { return };
    refused(url(&servers.moto, "")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_needs_tls_server_name() {
    let Some(servers) = servers() else { return };
    let ca = servers.ca.display().to_string();
    let err = refused(url(&servers.other_name, &format!("&tls_ca={ca}"))).await;
    assert!(err.to_string().contains("tls_server_name"), "{err}");
    let config = url(
        &servers.other_name,
        &format!("&tls_ca={ca}&tls_server_name=sqs.bus.test"),
    );
    round_trip(config)
        .await
        .expect("round trip with the certificate's name accepted");
}

/// A TLS setting with an `http` endpoint is refused, not ignored.
#[tokio::test]
async fn tls_settings_with_plain_http_are_refused() {
    let config = SqsConfig::default()
        .with_endpoint("http://127.0.0.1:1")
        .with_tls_ca("/some/ca.pem");
    let err = SqsBroker::connect_with(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("not https"), "{err}");
}

/// A server that takes the connection and never says a word: `Timeout` at the connect
/// timeout (the TLS handshake waits for the server's hello).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_a_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let config = SqsConfig::from_url(&format!(
        "sqs://127.0.0.1:{port}?region=us-east-1&tls=true&connect_timeout_ms=2000"
    ))
    .unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), SqsBroker::connect_with(config))
        .await
        .expect("connect gives up")
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    silent.abort();
}
