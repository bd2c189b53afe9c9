//! TLS between the adapter and the broker: librdkafka's OpenSSL client verifying a broker
//! certificate from a throwaway CA generated here (rcgen), with SAN `127.0.0.1` and
//! `localhost`.
//!
//! tansu 0.6 cannot serve TLS: its `--cert` and `--key` options are in one clap group (so they
//! cannot be given together), and the broker builds a `TlsAcceptor` it never uses. So the test
//! starts a tansu of its own on plain TCP (port 19094, SQLite storage, see `support`) that
//! advertises `localhost:<tls port>`, and puts a TLS terminator (tokio-rustls) on that port in
//! front of it. Every connection the client makes, bootstrap and advertised, goes through the
//! terminator, which speaks nothing but TLS: a client that did not do TLS could not get a
//! single answer.
//!
//! Cases: the right CA round-trips a message (publish, subscribe in a group, receive); a wrong
//! CA, and a certificate for another host name, fail `connect` with a typed error within a
//! bound instead of hanging; turning endpoint identification off accepts that certificate; a
//! terminator requiring a client certificate refuses a client without one and accepts one
//! with a certificate from the CA; SCRAM-SHA-256 over TLS with the right and a wrong password.
//!
//! Runs when `BUS_TEST_KAFKA_URL` is set and `tansu` is installed; with
//! `BUS_REQUIRE_BROKERS=1` a missing `tansu` fails.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::{Broker, Envelope, ErrorKind, Publisher, SubscribeOptions, Subscriber};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

const PORT: u16 = 19094;
/// How long a connect with a bad TLS setting may take to fail (the adapter's metadata probe
/// gives up after 10 s).
const FAIL_WITHIN: Duration = Duration::from_secs(20);

/// A throwaway CA.
struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self { key, cert }
    }

    fn write(&self, dir: &Path, name: &str) -> String {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.cert.pem()).expect("write CA");
        path.display().to_string()
    }

    /// A server configuration presenting a certificate for `names`, signed by this CA.
    fn server(&self, names: &[&str]) -> Arc<ServerConfig> {
        self.server_config(names, false)
    }

    /// As [`server`](Ca::server), requiring a client certificate this CA signed.
    fn mutual_server(&self, names: &[&str]) -> Arc<ServerConfig> {
        self.server_config(names, true)
    }

    /// Issues a client certificate and writes `<file>.pem` and `<file>-key.pem`.
    fn client(&self, dir: &Path, file: &str) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, file);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("client certificate");
        let (cert_path, key_path) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (
            cert_path.display().to_string(),
            key_path.display().to_string(),
        )
    }

    fn server_config(&self, names: &[&str], mutual: bool) -> Arc<ServerConfig> {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signed certificate");
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = if mutual {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.cert.der().clone()).expect("CA root");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(builder.with_single_cert(chain, key).expect("server config"))
    }
}

/// A TLS terminator on `listener` forwarding to tansu's plain port; counts the handshakes
/// that succeeded.
struct Terminator {
    port: u16,
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Terminator {
    fn start(listener: TcpListener, config: Arc<ServerConfig>, backend: u16) -> Self {
        let port = listener.local_addr().expect("local addr").port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let acceptor = TlsAcceptor::from(config);
        let counted = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    // A client that refuses the certificate ends here.
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut plain) = TcpStream::connect(("127.0.0.1", backend)).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Self {
            port,
            handshakes,
            task,
        }
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Setup {
    _tansu: support::Tansu,
    dir: PathBuf,
    ca: Ca,
    /// The terminator presenting a certificate for 127.0.0.1 and localhost.
    good: Terminator,
}

/// tansu behind a terminator, or `None` when the Kafka tests are off.
async fn setup() -> Option<Setup> {
    let binary = support::required_binary()?;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().unwrap().port();
    let tansu = support::Tansu::start_advertising(binary, PORT, port).await;
    let dir = tansu.dir().to_path_buf();
    let ca = Ca::new("bus test CA");
    let good = Terminator::start(listener, ca.server(&["127.0.0.1", "localhost"]), PORT);
    Some(Setup {
        _tansu: tansu,
        dir,
        ca,
        good,
    })
}

fn config(port: u16, ca: &str) -> KafkaConfig {
    KafkaConfig::new(format!("127.0.0.1:{port}"))
        .with_client_id("bus-tls-test")
        .with_partitions(1)
        .with_ssl_ca_location(ca)
}

/// Publishes one message and receives it through a group subscription.
async fn round_trip(broker: &KafkaBroker) {
    let topic = format!("tls.{}", uuid::Uuid::now_v7().simple());
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(format!("{topic}.g")))
        .await
        .expect("subscribe over TLS");
    let sent = Envelope::new("tls.test", "over tls");
    broker
        .publish(&topic, sent.clone())
        .await
        .expect("publish over TLS");
    let delivery = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("a delivery within 30 s")
        .expect("subscription open")
        .expect("a delivery");
    assert_eq!(delivery.envelope().id, sent.id);
    assert_eq!(&delivery.envelope().payload[..], b"over tls");
    delivery.ack().await.expect("ack");
}

/// Connects with `config` and expects a typed failure within [`FAIL_WITHIN`].
async fn refused(config: KafkaConfig) -> bus_core::Error {
    let started = Instant::now();
    let outcome = tokio::time::timeout(FAIL_WITHIN, KafkaBroker::connect(config))
        .await
        .expect("connect gives up instead of hanging");
    let Err(error) = outcome else {
        panic!("connect succeeded with a certificate it must refuse")
    };
    println!(
        "refused after {:?}: {error} ({:?})",
        started.elapsed(),
        error.kind()
    );
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_ca_host_name_and_client_certificate() {
    let Some(setup) = setup().await else {
        return;
    };
    let ca = setup.ca.write(&setup.dir, "ca");

    // The right CA: a message round-trips, every connection through the terminator.
    let broker = KafkaBroker::connect(config(setup.good.port, &ca))
        .await
        .expect("connect over TLS");
    round_trip(&broker).await;
    assert!(setup.good.handshakes() > 0);
    broker.close().await.expect("close");

    // A CA that did not sign the broker's certificate.
    let other_ca = Ca::new("some other CA").write(&setup.dir, "other-ca");
    let error = refused(config(setup.good.port, &other_ca)).await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(
        error.to_string().contains("certificate verify failed"),
        "{error}"
    );

    // The right CA, but a certificate for another host: refused by endpoint identification,
    // accepted when it is turned off.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let misnamed = Terminator::start(listener, setup.ca.server(&["elsewhere.example"]), PORT);
    let error = refused(config(misnamed.port, &ca)).await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(
        error.to_string().contains("certificate verify failed"),
        "{error}"
    );
    assert_eq!(misnamed.handshakes(), 0);
    let unchecked =
        KafkaBroker::connect(config(misnamed.port, &ca).with_ssl_endpoint_identification(false))
            .await
            .expect("connect without endpoint identification");
    assert!(misnamed.handshakes() > 0);
    unchecked.close().await.expect("close");

    // Mutual TLS: a terminator that requires a client certificate from the CA.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mutual = Terminator::start(
        listener,
        setup.ca.mutual_server(&["127.0.0.1", "localhost"]),
        PORT,
    );
    let error = refused(config(mutual.port, &ca)).await;
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(
        error.to_string().contains("certificate required"),
        "{error}"
    );
    assert_eq!(mutual.handshakes(), 0, "{error}");
    let (cert, key) = setup.ca.client(&setup.dir, "client");
    let with_cert =
        KafkaBroker::connect(config(mutual.port, &ca).with_ssl_client_certificate(cert, key))
            .await
            .expect("connect with a client certificate");
    assert!(mutual.handshakes() > 0);
    with_cert.close().await.expect("close");
}

#[tokio::test]
async fn a_missing_ca_file_is_a_config_error() {
    let config = KafkaConfig::new("127.0.0.1:1").with_ssl_ca_location("/nonexistent/bus-ca.pem");
    let error = KafkaBroker::connect(config).await.unwrap_err();
    println!("{error}");
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
}

/// SCRAM-SHA-256 and SCRAM-SHA-512 over TLS (`sasl_ssl`, inferred from the CA and the
/// credentials), a user of each: tansu with `--authentication` checks SCRAM passwords against
/// the users in its storage. Its `user
/// create` command cannot log in, so the user is created before authentication is turned on
/// (SQLite storage keeps it across the restart). tansu accepts any PLAIN password, so PLAIN
/// has no wrong-password case here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_over_tls_right_password_round_trips_wrong_one_is_rejected() {
    const PASSWORD: &str = "Scram9RightPassword";
    const WRONG: &str = "Scram9WrongPassword";
    let Some(binary) = support::required_binary() else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().unwrap().port();
    let mut tansu = support::Tansu::start_advertising(binary.clone(), 19095, port).await;
    for (mechanism, user) in [("scram256", "bus-user"), ("scram512", "bus-user-512")] {
        let created = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(&binary)
                .args(["user", "create", "--broker", "tcp://127.0.0.1:19095"])
                .args(["--mechanism", mechanism, user, PASSWORD])
                .output(),
        )
        .await
        .expect("tansu user create within 30 s")
        .expect("run tansu user create");
        assert!(
            created.status.success(),
            "tansu user create {mechanism}: {created:?}"
        );
    }
    tansu.restart_with_authentication().await;
    let dir = tansu.dir().to_path_buf();
    let ca = Ca::new("bus test CA");
    let terminator = Terminator::start(listener, ca.server(&["127.0.0.1", "localhost"]), 19095);
    let ca = ca.write(&dir, "ca");

    for (mechanism, user) in [
        ("SCRAM-SHA-256", "bus-user"),
        ("SCRAM-SHA-512", "bus-user-512"),
    ] {
        let scram =
            |password: &str| config(terminator.port, &ca).with_sasl(mechanism, user, password);
        let broker = KafkaBroker::connect(scram(PASSWORD))
            .await
            .unwrap_or_else(|e| panic!("connect with {mechanism} over TLS: {e}"));
        round_trip(&broker).await;
        broker.close().await.expect("close");

        let error = refused(scram(WRONG)).await;
        assert_eq!(error.kind(), ErrorKind::Rejected, "{mechanism}: {error}");
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains(WRONG), "{mechanism}: {shown}");
    }
}
