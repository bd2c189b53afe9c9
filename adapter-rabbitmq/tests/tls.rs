//! TLS and authentication against the real broker's TLS listener (`BUS_TEST_RABBITMQ_TLS_URL`,
//! a password user, and `BUS_TEST_TLS_DIR`, the throwaway CA and certificates that
//! `scripts/brokers.sh` made and configured RabbitMQ with):
//!
//! - password login over TLS with the test CA, and mutual TLS with EXTERNAL login (the client
//!   certificate's CN names the user), each round-tripping a message, with what the broker saw
//!   of the connection (TLS, user, mechanism) checked through `rabbitmqctl`;
//! - a wrong CA, a server name the certificate does not hold, a client certificate the broker
//!   does not trust (self-signed, made with `openssl` by the test), EXTERNAL without a client
//!   certificate, and a wrong password each fail fast with a typed error, and no output of
//!   the error shows the password;
//! - a server that accepts the connection and never answers the TLS handshake (a listener of
//!   the test's own) fails the connect with a retryable error once the connect timeout ends.
//!
//! Needs `rabbitmqctl` on the `PATH` with the right to run it (root, as on the test machines).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use adapter_rabbitmq::{AuthMechanism, Pem, RabbitMqBroker, RabbitMqConfig};
use bus_core::conformance::{broker_url, REQUIRE_BROKERS_VAR};
use bus_core::secrets::Secret;
use bus_core::{
    Broker, Envelope, Error, ErrorKind, MessageId, Publisher, SubscribeOptions, Subscriber,
};

/// Far above a handshake on loopback, far below "hangs".
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// What the test waits at most for any connection attempt to end, whatever it gives.
const NO_HANG: Duration = Duration::from_secs(20);

struct Setup {
    /// `amqps://bus-tls-user:…@127.0.0.1:5671/%2f`
    url: String,
    dir: PathBuf,
}

impl Setup {
    fn from_env() -> Option<Self> {
        let url = broker_url("BUS_TEST_RABBITMQ_TLS_URL")?;
        let dir = match std::env::var("BUS_TEST_TLS_DIR") {
            Ok(dir) if !dir.trim().is_empty() => PathBuf::from(dir),
            _ => {
                let required = std::env::var(REQUIRE_BROKERS_VAR)
                    .is_ok_and(|v| matches!(v.trim(), "1" | "true"));
                assert!(
                    !required,
                    "BUS_TEST_TLS_DIR is not set, but {REQUIRE_BROKERS_VAR}=1 requires the TLS \
                     setup: run scripts/brokers.sh start rabbitmq and its env lines"
                );
                println!("skipped: set BUS_TEST_TLS_DIR (scripts/brokers.sh env) to run");
                return None;
            }
        };
        for file in ["ca.pem", "client.pem", "client.key", "other-ca.pem"] {
            assert!(
                dir.join(file).is_file(),
                "{} is missing: run scripts/brokers.sh start rabbitmq",
                dir.join(file).display()
            );
        }
        Some(Self { url, dir })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The TLS URL with its user and password removed.
    fn url_without_login(&self) -> String {
        let mut url = url::Url::parse(&self.url).expect("BUS_TEST_RABBITMQ_TLS_URL parses");
        url.set_username("").unwrap();
        url.set_password(None).unwrap();
        url.into()
    }

    /// The password of the TLS URL.
    fn password(&self) -> String {
        url::Url::parse(&self.url)
            .unwrap()
            .password()
            .expect("BUS_TEST_RABBITMQ_TLS_URL has a password")
            .to_owned()
    }
}

/// Connects, failing the test if that takes longer than [`NO_HANG`].
async fn connect(config: RabbitMqConfig) -> bus_core::Result<RabbitMqBroker> {
    let config = config.with_connect_timeout(CONNECT_TIMEOUT);
    tokio::time::timeout(NO_HANG, RabbitMqBroker::with_config(config))
        .await
        .unwrap_or_else(|_| panic!("connecting did not end within {NO_HANG:?}"))
}

/// Connects expecting a failure, which must come before the connect timeout (the broker or
/// the TLS handshake said no; nothing waited for a timer).
async fn refused(config: RabbitMqConfig) -> Error {
    let started = Instant::now();
    let err = connect(config)
        .await
        .expect_err("the connection should be refused");
    let took = started.elapsed();
    assert!(
        took < CONNECT_TIMEOUT,
        "refusal took {took:?}, as long as the connect timeout: {err}"
    );
    assert_ne!(err.kind(), ErrorKind::Timeout, "{err}");
    println!("refused in {took:?}: {err}");
    err
}

/// Everything a user could print of `err`: Display, Debug and the source chain.
fn every_output(err: &Error) -> Vec<String> {
    let mut out = vec![err.to_string(), format!("{err:?}")];
    let mut source: Option<&(dyn std::error::Error + 'static)> = err
        .source_ref()
        .map(|s| s as &(dyn std::error::Error + 'static));
    while let Some(s) = source {
        out.push(s.to_string());
        out.push(format!("{s:?}"));
        source = s.source();
    }
    out
}

async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ssl`, `user` and `auth_mechanism` of the connection named `name`, as the broker lists it.
async fn seen_by_broker(name: &str) -> Vec<String> {
    let listing = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "ssl",
        "user",
        "auth_mechanism",
        "client_properties",
    ])
    .await;
    let needle = format!("\"{name}\"");
    let line = listing
        .lines()
        .find(|line| line.contains(&needle))
        .unwrap_or_else(|| panic!("no connection named {name} in:\n{listing}"));
    line.split('\t').take(3).map(str::to_owned).collect()
}

/// Publishes one message to a fresh topic and receives it on a private subscription.
async fn round_trip(broker: &RabbitMqBroker) {
    let topic = format!("tls.{}", MessageId::new());
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .expect("subscribe over TLS");
    let sent = Envelope::new("tls.ping", "over TLS");
    broker
        .publish(&topic, sent.clone())
        .await
        .expect("publish over TLS");
    let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the subscription is open")
        .expect("a delivery");
    assert_eq!(delivery.envelope().id, sent.id);
    assert_eq!(&delivery.envelope().payload[..], b"over TLS");
    delivery.ack().await.expect("ack over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_login_over_tls_with_the_test_ca_round_trips() {
    let Some(setup) = Setup::from_env() else {
        return;
    };
    let name = format!("bus-tls-password-{}", MessageId::new());
    // The CA and the server name as URL parameters; the URL's host is 127.0.0.1, the name
    // checked and sent as SNI `localhost` (the certificate holds both).
    let url = format!(
        "{}?tls_ca={}&tls_server_name=localhost",
        setup.url,
        setup.file("ca.pem").display()
    );
    let broker = connect(RabbitMqConfig::new(url).with_connection_name(&name))
        .await
        .expect("connect over TLS with the test CA");
    round_trip(&broker).await;
    assert_eq!(
        seen_by_broker(&name).await,
        ["true", "bus-tls-user", "PLAIN"]
    );
    broker.close().await.expect("close");
}

/// The password given apart from the URL, by reference as a config file names it: read
/// from an environment variable and from a file, each logs in and round-trips; the
/// serialized config holds the reference, not the password. An unset variable is a `Config`
/// error naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_by_reference_logs_in() {
    let Some(setup) = Setup::from_env() else {
        return;
    };
    let mut url = url::Url::parse(&setup.url).unwrap();
    url.set_password(None).unwrap();
    let variable = format!("BUS_TEST_RABBITMQ_PASSWORD_{}", std::process::id());
    std::env::set_var(&variable, setup.password());
    let file = std::env::temp_dir().join(format!("bus-rabbitmq-password-{}", std::process::id()));
    std::fs::write(&file, format!("{}\n", setup.password())).unwrap();
    for password in [Secret::env(&variable), Secret::file(&file)] {
        let config = RabbitMqConfig::new(url.as_str())
            .with_tls_ca(Pem::file(setup.file("ca.pem")))
            .with_password(password);
        let json = serde_json::to_string(&config).unwrap();
        assert!(!json.contains(&setup.password()), "{json}");
        let config: RabbitMqConfig = serde_json::from_str(&json).unwrap();
        let broker = connect(config)
            .await
            .expect("log in with the referenced password");
        round_trip(&broker).await;
        broker.close().await.expect("close");
    }
    std::fs::remove_file(&file).unwrap();

    let err = refused(
        RabbitMqConfig::new(url.as_str())
            .with_tls_ca(Pem::file(setup.file("ca.pem")))
            .with_password(Secret::env("BUS_TEST_RABBITMQ_PASSWORD_UNSET")),
    )
    .await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(
        err.message().contains("BUS_TEST_RABBITMQ_PASSWORD_UNSET"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_external_login_round_trips() {
    let Some(setup) = Setup::from_env() else {
        return;
    };
    let name = format!("bus-tls-external-{}", MessageId::new());
    // The certificate and key as PEM text, the CA as a file; no user or password.
    let cert = std::fs::read_to_string(setup.file("client.pem")).unwrap();
    let key = std::fs::read_to_string(setup.file("client.key")).unwrap();
    let config = RabbitMqConfig::new(setup.url_without_login())
        .with_tls_ca(Pem::file(setup.file("ca.pem")))
        .with_tls_client_cert(Pem::text(cert), Pem::text(key.clone()))
        .with_auth_mechanism(AuthMechanism::External)
        .with_connection_name(&name);
    let debug = format!("{config:?}");
    assert!(!debug.contains(key.trim()), "{debug}");
    let broker = connect(config)
        .await
        .expect("connect with a client certificate and EXTERNAL");
    round_trip(&broker).await;
    // The user is the certificate's CN; the URL named none.
    assert_eq!(
        seen_by_broker(&name).await,
        ["true", "bus-tls-client", "EXTERNAL"]
    );
    broker.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_server_name_is_a_config_error_not_a_hang() {
    let Some(setup) = Setup::from_env() else {
        return;
    };
    // A CA that signed nothing the broker presents.
    let err =
        refused(RabbitMqConfig::new(&setup.url).with_tls_ca(Pem::file(setup.file("other-ca.pem"))))
            .await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.message().contains("certificate"), "{err}");
    assert!(err.message().contains("UnknownIssuer"), "{err}");
    assert!(!err.is_retryable());
    // The system's roots (no tls_ca) do not hold the test CA either.
    let err = refused(RabbitMqConfig::new(&setup.url)).await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    // The right CA, but a name the server's certificate is not valid for.
    let err = refused(
        RabbitMqConfig::new(&setup.url)
            .with_tls_ca(Pem::file(setup.file("ca.pem")))
            .with_tls_server_name("mq.example.com"),
    )
    .await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.message().contains("NotValidForName"), "{err}");
    // The typed cause stays reachable.
    assert!(err
        .source_ref()
        .and_then(|s| s.downcast_ref::<adapter_rabbitmq::lapin::Error>())
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_login_without_a_client_certificate_is_refused() {
    let Some(setup) = Setup::from_env() else {
        return;
    };
    let err = refused(
        RabbitMqConfig::new(setup.url_without_login())
            .with_tls_ca(Pem::file(setup.file("ca.pem")))
            .with_auth_mechanism(AuthMechanism::External),
    )
    .await;
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    assert!(err.message().contains("authentication failed"), "{err}");
    assert!(err.message().contains("EXTERNAL"), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_and_never_shown() {
    let Some(setup) = Setup::from_env() else {
        return;
    };
    let wrong = "Wr0ng-pa55word-7f3a";
    let mut url = url::Url::parse(&setup.url).unwrap();
    url.set_password(Some(wrong)).unwrap();
    let err = refused(
        RabbitMqConfig::new(String::from(url)).with_tls_ca(Pem::file(setup.file("ca.pem"))),
    )
    .await;
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    assert!(err.message().contains("authentication failed"), "{err}");
    assert!(err.message().contains("bus-tls-user"), "{err}");
    assert!(!err.is_retryable());
    let right = setup.password();
    for out in every_output(&err) {
        assert!(!out.contains(wrong), "the password shows in: {out}");
        assert!(!out.contains(&right), "the right password shows in: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_fails_the_connect_at_the_timeout() {
    let Some(setup) = Setup::from_env() else {
        return;
    };
    // Accepts connections and never writes a byte (holding them open until the test ends).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let timeout = Duration::from_millis(1500);
    let started = Instant::now();
    let err = tokio::time::timeout(
        NO_HANG,
        RabbitMqBroker::with_config(
            RabbitMqConfig::new(format!("amqps://u:p@127.0.0.1:{port}/%2f"))
                .with_tls_ca(Pem::file(setup.file("ca.pem")))
                .with_connect_timeout(timeout),
        ),
    )
    .await
    .expect("the connect timeout bounds the attempt")
    .expect_err("nothing answers");
    let took = started.elapsed();
    println!("silent server: {took:?}: {err}");
    assert!(err.is_retryable(), "{err}");
    assert!(
        took >= timeout && took < timeout * 3,
        "failed after {took:?}, the connect timeout is {timeout:?}: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_the_broker_does_not_trust_is_refused() {
    let Some(setup) = Setup::from_env() else {
        return;
    };
    // Self-signed, with the CN of the EXTERNAL user: only the broker's CA check stops it.
    let dir = std::env::temp_dir().join(format!("bus-tls-untrusted-{}", MessageId::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("client.pem"), dir.join("client.key"));
    let out = tokio::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=bus-tls-client",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .await
        .expect("run openssl (scripts/brokers.sh installs it)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = connect(
        RabbitMqConfig::new(setup.url_without_login())
            .with_tls_ca(Pem::file(setup.file("ca.pem")))
            .with_tls_client_cert(Pem::file(&cert), Pem::file(&key))
            .with_auth_mechanism(AuthMechanism::External),
    )
    .await;
    std::fs::remove_dir_all(&dir).unwrap();
    let err = result.expect_err("the broker should refuse an untrusted client certificate");
    println!("untrusted client certificate: {err}");
    // Under TLS 1.3 the broker checks the certificate after the client's side of the
    // handshake is done: the client reads its alert (`Rejected`, as on every adapter), or, if
    // it first writes to the closed socket, gets the closed connection (`Connection`); both
    // name the certificate.
    match err.kind() {
        ErrorKind::Rejected => assert!(err.message().contains("alert BadCertificate"), "{err}"),
        ErrorKind::Connection => assert!(
            err.message()
                .contains("does not accept the client certificate"),
            "{err}"
        ),
        _ => panic!("neither the alert nor the closed connection: {err}"),
    }
}
