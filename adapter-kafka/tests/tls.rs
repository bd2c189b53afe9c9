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
//! with a certificate from the CA, also with the key encrypted (its password inline, from a
//! file, wrong, missing); SCRAM-SHA-256 and -512 over TLS with the right and a wrong password,
//! and the password from an environment variable and a file (`Secret`); SASL OAUTHBEARER with
//! tokens from an `OAuthTokenProvider` (see `oauthbearer_tokens_from_the_provider` for what
//! tansu can and cannot check).
//!
//! Runs when `BUS_TEST_KAFKA_URL` is set and `tansu` is installed; with
//! `BUS_REQUIRE_BROKERS=1` a missing `tansu` fails.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapter_kafka::{KafkaBroker, KafkaConfig, OAuthToken, OAuthTokenProvider};
use bus_core::secrets::Secret;
use bus_core::{Broker, Envelope, ErrorKind, Publisher, SubscribeOptions, Subscriber};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    let with_cert = KafkaBroker::connect(
        config(mutual.port, &ca).with_ssl_client_certificate(cert.clone(), key.clone()),
    )
    .await
    .expect("connect with a client certificate");
    assert!(mutual.handshakes() > 0);
    with_cert.close().await.expect("close");

    // The same key encrypted (PKCS#8, AES-256-CBC): its password inline and from a file
    // round-trip a message; a wrong or missing password fails at once, typed.
    let encrypted = encrypt_key(&key, KEY_PASSWORD);
    let with_key = |password: Option<Secret>| {
        let config =
            config(mutual.port, &ca).with_ssl_client_certificate(cert.clone(), encrypted.clone());
        match password {
            Some(password) => config.with_ssl_key_password(password),
            None => config,
        }
    };
    let password_file = setup.dir.join("key-password");
    std::fs::write(&password_file, format!("{KEY_PASSWORD}\n")).expect("write password file");
    for password in [Secret::from(KEY_PASSWORD), Secret::file(&password_file)] {
        let before = mutual.handshakes();
        let broker = KafkaBroker::connect(with_key(Some(password.clone())))
            .await
            .unwrap_or_else(|e| panic!("connect with an encrypted key ({password:?}): {e}"));
        round_trip(&broker).await;
        assert!(mutual.handshakes() > before, "{password:?}");
        broker.close().await.expect("close");
    }
    for password in [Some(Secret::from("Wrong9KeyPassword")), None] {
        let before = mutual.handshakes();
        let error = refused(with_key(password.clone())).await;
        assert_eq!(error.kind(), ErrorKind::Config, "{password:?}: {error}");
        let hint = if password.is_some() {
            "is ssl_key_password the key's password?"
        } else {
            "an encrypted key needs ssl_key_password"
        };
        assert!(
            error.to_string().contains("ssl.key.location") && error.to_string().contains(hint),
            "{password:?}: {error}"
        );
        let shown = format!("{error} {error:?}");
        assert!(
            !shown.contains("Wrong9") && !shown.contains(KEY_PASSWORD),
            "{shown}"
        );
        assert_eq!(mutual.handshakes(), before, "{password:?}");
    }
}

const KEY_PASSWORD: &str = "Key9Password";

/// `key` (PEM) encrypted with `password` by `openssl pkcs8 -topk8 -v2 aes-256-cbc`, written
/// beside it; its path.
fn encrypt_key(key: &str, password: &str) -> String {
    let encrypted = format!("{}.enc.pem", key.trim_end_matches(".pem"));
    let output = std::process::Command::new("openssl")
        .args(["pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", key, "-out"])
        .arg(&encrypted)
        .arg("-passout")
        .arg(format!("pass:{password}"))
        .output()
        .expect("run openssl (the tests need the openssl command)");
    assert!(output.status.success(), "openssl pkcs8: {output:?}");
    let pem = std::fs::read_to_string(&encrypted).expect("read the encrypted key");
    assert!(pem.contains("BEGIN ENCRYPTED PRIVATE KEY"), "{pem}");
    encrypted
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

    // The password by reference, from an environment variable and from a file: read when the
    // clients are created, so a message round-trips; a wrong value in the file is refused by
    // the broker (so the file is what was sent); an unset variable fails at once, naming it.
    const VARIABLE: &str = "BUS_TEST_KAFKA_SCRAM_PASSWORD";
    std::env::set_var(VARIABLE, PASSWORD);
    let file = dir.join("scram-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).expect("write password file");
    let scram = |password: Secret| {
        config(terminator.port, &ca).with_sasl("SCRAM-SHA-256", "bus-user", password)
    };
    for password in [Secret::env(VARIABLE), Secret::file(&file)] {
        let broker = KafkaBroker::connect(scram(password.clone()))
            .await
            .unwrap_or_else(|e| panic!("connect with the password from {password:?}: {e}"));
        round_trip(&broker).await;
        broker.close().await.expect("close");
    }
    std::fs::write(&file, WRONG).expect("write password file");
    let error = refused(scram(Secret::file(&file))).await;
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!format!("{error} {error:?}").contains(WRONG), "{error}");

    let unset = "BUS_TEST_KAFKA_UNSET_PASSWORD";
    std::env::remove_var(unset);
    let started = Instant::now();
    let error = KafkaBroker::connect(scram(Secret::env(unset)))
        .await
        .expect_err("connect with an unset password variable");
    println!("unset variable, after {:?}: {error}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(2), "{error}");
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(error.to_string().contains(unset), "{error}");
}

/// What a [`Front`] does with the connections it accepts.
#[derive(Clone)]
enum Mode {
    /// Forwards everything, keeping every byte the clients sent.
    Record,
    /// Answers the SASL requests itself, as a broker with an OAUTHBEARER validator would:
    /// the mechanism must be OAUTHBEARER and the token `token`, or the login is refused.
    /// Before that only ApiVersions is forwarded; then everything is.
    OAuth { token: String },
}

/// A TCP front of tansu's plain port (which it advertises), in one of two [`Mode`]s.
struct Front {
    port: u16,
    /// What the clients sent (`Record`).
    sent: Arc<std::sync::Mutex<Vec<u8>>>,
    /// The tokens the clients presented (`OAuth`), and how many logins were accepted.
    tokens: Arc<std::sync::Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Front {
    fn start(listener: TcpListener, backend: u16, mode: Mode) -> Self {
        let port = listener.local_addr().expect("local addr").port();
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (s, t, a) = (sent.clone(), tokens.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (mode, s, t, a) = (mode.clone(), s.clone(), t.clone(), a.clone());
                tokio::spawn(async move {
                    let Ok(broker) = TcpStream::connect(("127.0.0.1", backend)).await else {
                        return;
                    };
                    match mode {
                        Mode::Record => record(client, broker, &s).await,
                        Mode::OAuth { token } => {
                            let _ = oauth_front(client, broker, &token, &t, &a).await;
                        }
                    }
                });
            }
        });
        Self {
            port,
            sent,
            tokens,
            accepted,
            task,
        }
    }

    fn saw(&self, needle: &str) -> bool {
        let sent = self.sent.lock().unwrap();
        sent.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    fn tokens(&self) -> Vec<String> {
        self.tokens.lock().unwrap().clone()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(client: TcpStream, broker: TcpStream, sent: &std::sync::Mutex<Vec<u8>>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut broker_read, mut broker_write) = broker.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buf).await {
            sent.lock().unwrap().extend_from_slice(&buf[..n]);
            if broker_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = broker_write.shutdown().await;
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut broker_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

/// One Kafka frame (size-prefixed), without its size.
async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let size = stream.read_u32().await?;
    let mut frame = vec![0; size as usize];
    stream.read_exact(&mut frame).await?;
    Ok(frame)
}

async fn write_frame(stream: &mut TcpStream, frame: &[u8]) -> std::io::Result<()> {
    stream
        .write_u32(u32::try_from(frame.len()).expect("frame size"))
        .await?;
    stream.write_all(frame).await
}

/// Kafka's SaslHandshake (17) and SaslAuthenticate (36) answered here, as KIP-43/KIP-152 and
/// RFC 7628 say (request header v1, response header v0: librdkafka uses versions 0–1 of
/// both); ApiVersions (18) forwarded before the login, anything else refused by closing.
async fn oauth_front(
    mut client: TcpStream,
    mut broker: TcpStream,
    expected: &str,
    tokens: &std::sync::Mutex<Vec<String>>,
    accepted: &AtomicUsize,
) -> std::io::Result<()> {
    const API_VERSIONS: i16 = 18;
    const SASL_HANDSHAKE: i16 = 17;
    const SASL_AUTHENTICATE: i16 = 36;
    const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
    const SASL_AUTHENTICATION_FAILED: i16 = 58;
    loop {
        let request = read_frame(&mut client).await?;
        let api_key = i16::from_be_bytes([request[0], request[1]]);
        let api_version = i16::from_be_bytes([request[2], request[3]]);
        let correlation = &request[4..8];
        let client_id_len = i16::from_be_bytes([request[8], request[9]]).max(0) as usize;
        let body = &request[10 + client_id_len..];
        let mut response = correlation.to_vec();
        match api_key {
            API_VERSIONS => {
                write_frame(&mut broker, &request).await?;
                let answer = read_frame(&mut broker).await?;
                write_frame(&mut client, &answer).await?;
            }
            SASL_HANDSHAKE => {
                let len = i16::from_be_bytes([body[0], body[1]]) as usize;
                let mechanism = &body[2..2 + len];
                let code = if mechanism == b"OAUTHBEARER" {
                    0
                } else {
                    UNSUPPORTED_SASL_MECHANISM
                };
                response.extend_from_slice(&code.to_be_bytes());
                response.extend_from_slice(&1i32.to_be_bytes());
                response.extend_from_slice(&11i16.to_be_bytes());
                response.extend_from_slice(b"OAUTHBEARER");
                write_frame(&mut client, &response).await?;
            }
            SASL_AUTHENTICATE => {
                let len = i32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
                // RFC 7628: "n,,\x01auth=Bearer <token>\x01\x01".
                let message = String::from_utf8_lossy(&body[4..4 + len]).into_owned();
                let token = message
                    .split('\x01')
                    .find_map(|kv| kv.strip_prefix("auth=Bearer "))
                    .unwrap_or_default()
                    .to_owned();
                let good = token == expected;
                tokens.lock().unwrap().push(token);
                if good {
                    response.extend_from_slice(&0i16.to_be_bytes());
                    response.extend_from_slice(&(-1i16).to_be_bytes());
                } else {
                    let why = b"invalid token";
                    response.extend_from_slice(&SASL_AUTHENTICATION_FAILED.to_be_bytes());
                    response.extend_from_slice(&(why.len() as i16).to_be_bytes());
                    response.extend_from_slice(why);
                }
                response.extend_from_slice(&0i32.to_be_bytes());
                if api_version >= 1 {
                    response.extend_from_slice(&0i64.to_be_bytes());
                }
                write_frame(&mut client, &response).await?;
                if !good {
                    return Ok(());
                }
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::io::copy_bidirectional(&mut client, &mut broker).await?;
                return Ok(());
            }
            // Not logged in: nothing else gets through.
            _ => return Ok(()),
        }
    }
}

/// Gives `token` (or fails with `failure`) and counts the calls.
struct Provider {
    token: String,
    failure: Option<ErrorKind>,
    calls: AtomicUsize,
}

impl Provider {
    fn giving(token: &str) -> Arc<Self> {
        Arc::new(Self {
            token: token.into(),
            failure: None,
            calls: AtomicUsize::new(0),
        })
    }

    fn failing(kind: ErrorKind) -> Arc<Self> {
        Arc::new(Self {
            token: String::new(),
            failure: Some(kind),
            calls: AtomicUsize::new(0),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl OAuthTokenProvider for Provider {
    fn token(&self, _config: Option<&str>) -> bus_core::Result<OAuthToken> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(kind) = self.failure {
            return Err(bus_core::Error::new(
                kind,
                "the identity provider refused bus-test",
            ));
        }
        let expires = std::time::SystemTime::now() + Duration::from_secs(3600);
        Ok(OAuthToken::new(
            self.token.clone(),
            "bus-oauth-user",
            expires,
        ))
    }
}

fn oauth_config(port: u16) -> KafkaConfig {
    KafkaConfig::new(format!("127.0.0.1:{port}"))
        .with_client_id("bus-oauth-test")
        .with_partitions(1)
        .with_security_protocol("sasl_plaintext")
        .with_sasl_mechanism("OAUTHBEARER")
}

/// Creates `topic` with tansu's own client, as an operator would: a connection using a token
/// provider creates none.
async fn create_topic(binary: &Path, port: u16, topic: &str) {
    let created = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(binary)
            .args(["topic", "create", "--partitions", "1", "--broker"])
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg(topic)
            .output(),
    )
    .await
    .expect("tansu topic create within 30 s")
    .expect("run tansu topic create");
    assert!(created.status.success(), "tansu topic create: {created:?}");
}

/// SASL OAUTHBEARER with tokens from an [`OAuthTokenProvider`].
///
/// tansu 0.6 names OAUTHBEARER in its SASL handshake (its SASL library is built with it) but
/// refuses every OAUTHBEARER login: its validator knows PLAIN and SCRAM only. So the round trip
/// goes through a front that checks the token itself ([`oauth_front`]) and forwards everything
/// after the login to a tansu without authentication: librdkafka's own OAUTHBEARER client on
/// the producer, the connection check and the subscription's consumer, but no broker's
/// OAUTHBEARER validation. Then tansu with `--authentication` itself: the provider's token is
/// what goes on the wire, and tansu's refusal is `Rejected`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauthbearer_tokens_from_the_provider() {
    const TOKEN: &str = "bus-oauth-token-Zq9x";
    const PORT: u16 = 19097;
    let Some(binary) = support::required_binary() else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().unwrap().port();
    let mut tansu = support::Tansu::start_advertising(binary.clone(), PORT, port).await;
    let front = Front::start(
        listener,
        PORT,
        Mode::OAuth {
            token: TOKEN.into(),
        },
    );

    // The right token: every client logs in with it, and a message round-trips on topics
    // created beforehand.
    let topic = format!("oauth.{}", uuid::Uuid::now_v7().simple());
    for name in [topic.clone(), format!("{topic}.retry")] {
        create_topic(&binary, PORT, &name).await;
    }
    let provider = Provider::giving(TOKEN);
    let broker =
        KafkaBroker::connect(oauth_config(front.port).with_oauth_token_provider(provider.clone()))
            .await
            .expect("connect with OAUTHBEARER");
    // The producer and the connection check, one token each.
    assert_eq!(provider.calls(), 2);
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(format!("{topic}.g")))
        .await
        .expect("subscribe with OAUTHBEARER");
    let sent = Envelope::new("oauth.test", "with a token");
    broker
        .publish(&topic, sent.clone())
        .await
        .expect("publish with OAUTHBEARER");
    let delivery = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("a delivery within 30 s")
        .expect("subscription open")
        .expect("a delivery");
    assert_eq!(delivery.envelope().id, sent.id);
    // And the consumer's own.
    assert_eq!(provider.calls(), 3);
    // Acked after its subscription closed: committed by a short-lived consumer, which must get
    // a token of its own before it can commit (nothing else polls it).
    sub.close().await.expect("close the subscription");
    let accepted = front.accepted();
    tokio::time::timeout(Duration::from_secs(30), delivery.ack())
        .await
        .expect("an ack after close within 30 s")
        .expect("ack after close");
    assert_eq!(provider.calls(), 4);
    assert!(front.accepted() > accepted);
    let tokens = front.tokens();
    assert!(tokens.iter().all(|t| t == TOKEN), "{tokens:?}");
    // That commit landed: the group goes on with the next message, not the acked one.
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(format!("{topic}.g")))
        .await
        .expect("subscribe again");
    let next = Envelope::new("oauth.test", "the next one");
    broker.publish(&topic, next.clone()).await.expect("publish");
    let delivery = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("a delivery within 30 s")
        .expect("subscription open")
        .expect("a delivery");
    assert_eq!(
        delivery.envelope().id,
        next.id,
        "the acked message came again"
    );
    delivery.ack().await.expect("ack");

    // Without an admin client, a topic nobody created is NotFound, saying why.
    let error = broker
        .publish(
            &format!("{topic}.missing"),
            Envelope::new("oauth.test", "x"),
        )
        .await
        .expect_err("publish to a topic that does not exist");
    assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
    assert!(error.to_string().contains("OAUTHBEARER"), "{error}");
    drop(sub);
    broker.close().await.expect("close");

    // A token the broker refuses: Rejected, the token never in the error.
    let wrong = Provider::giving("bus-oauth-wrong-Zq9y");
    let error = refused(oauth_config(front.port).with_oauth_token_provider(wrong.clone())).await;
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!format!("{error} {error:?}").contains("Zq9y"), "{error}");
    assert!(front.tokens().iter().any(|t| t == "bus-oauth-wrong-Zq9y"));

    // A provider that fails: its error, of its kind, as soon as a client asked (the wait
    // for the brokers is 10 s), and no login attempted.
    let logins = front.tokens().len();
    for kind in [ErrorKind::Rejected, ErrorKind::Connection] {
        let failing = Provider::failing(kind);
        let started = Instant::now();
        let error =
            refused(oauth_config(front.port).with_oauth_token_provider(failing.clone())).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(error.kind(), kind, "{error}");
        assert!(
            error.to_string().contains("identity provider refused"),
            "{error}"
        );
        assert!(
            error
                .source_ref()
                .is_some_and(|s| s.is::<bus_core::Error>()),
            "{error:?}"
        );
        assert!(failing.calls() >= 1);
    }
    // No provider, or a token librdkafka cannot send: Config, as soon.
    let started = Instant::now();
    let error = refused(oauth_config(front.port)).await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(error.to_string().contains("no token provider"), "{error}");
    let bad = Provider::giving("bus-oauth\u{7}Zq9z");
    let error = refused(oauth_config(front.port).with_oauth_token_provider(bad)).await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(!format!("{error} {error:?}").contains("Zq9z"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        front.tokens().len(),
        logins,
        "a login without a usable token"
    );

    // tansu itself, requiring authentication: the provider's token is what librdkafka sends
    // (RFC 7628 client message), and tansu refuses it.
    tansu.restart_with_authentication().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let recorder = Front::start(listener, PORT, Mode::Record);
    let provider = Provider::giving(TOKEN);
    let error =
        refused(oauth_config(recorder.port).with_oauth_token_provider(provider.clone())).await;
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(error.to_string().contains("SASL authentication"), "{error}");
    assert!(recorder.saw(&format!("auth=Bearer {TOKEN}\u{1}\u{1}")));
    assert!(!format!("{error} {error:?}").contains(TOKEN), "{error}");
    assert_eq!(provider.calls(), 2);
}
