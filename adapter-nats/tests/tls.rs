//! TLS and authentication against real nats-server processes that each test starts on a free
//! loopback port, with a throwaway CA and certificates generated here (rcgen): TLS with
//! user/password on JetStream, a password given as an environment variable or file reference
//! (`Secret`), NKeys, mutual TLS, tokens, a server-name override, and a `.creds` file on a
//! server in operator (decentralized JWT) mode whose operator, accounts and user are made here
//! (nkeys); and what a user gets from each wrong setting (a wrong CA, a missing or untrusted
//! client certificate, a wrong password or token, an unset password variable, a creds file of
//! an unknown account or none at all, a server that never answers): a typed error, quickly,
//! that shows no secret.
//!
//! Needs `nats-server` on `PATH` (or `/usr/sbin/nats-server`); without it the tests print
//! "skipped: …", and fail when `BUS_REQUIRE_BROKERS=1`.

use std::error::Error as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use adapter_nats::{Credentials, NatsBroker, NatsConfig};
use base64::Engine as _;
use bus_core::secrets::Secret;
use bus_core::{
    Broker, Envelope, Error, ErrorKind, MessageId, Publisher, SubscribeOptions, Subscriber, Support,
};
use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Connect timeout of the failing cases: each must fail for its own reason well before it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PASSWORD: &str = "pw-Xq7-right";
const WRONG_PASSWORD: &str = "pw-Zk9-wrong-distinctive";
const TOKEN: &str = "tok-Hv3-right";
const WRONG_TOKEN: &str = "tok-Jw5-wrong-distinctive";

// ---- certificates ----------------------------------------------------------------------------

/// A throwaway CA, and certificates it signs, written as PEM files into a directory.
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
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self { key, cert }
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.cert.pem()).expect("write CA");
        path
    }

    /// Issues a certificate for `names` (DNS names or IP addresses) and writes
    /// `<file>.pem` and `<file>-key.pem`.
    fn issue(
        &self,
        dir: &Path,
        file: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signed certificate");
        let cert_path = dir.join(format!("{file}.pem"));
        let key_path = dir.join(format!("{file}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }
}

/// Everything one test needs on disk: the CA the servers trust, a server certificate for
/// `127.0.0.1` and `localhost`, a client certificate, and an unrelated CA with its own client
/// certificate (the wrong ones).
struct Pki {
    dir: TempDir,
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    other_ca: PathBuf,
    other_client: (PathBuf, PathBuf),
    ca_signer: Ca,
}

impl Pki {
    fn new() -> Self {
        let dir = TempDir::new();
        let ca_signer = Ca::new("bus test CA");
        let other = Ca::new("some other CA");
        Self {
            ca: ca_signer.write(dir.path(), "ca"),
            server: ca_signer.issue(
                dir.path(),
                "server",
                &["127.0.0.1", "localhost"],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            client: ca_signer.issue(
                dir.path(),
                "client",
                &["bus-client"],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
            other_ca: other.write(dir.path(), "other-ca"),
            other_client: other.issue(
                dir.path(),
                "other-client",
                &["bus-client"],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
            ca_signer,
            dir,
        }
    }
}

// ---- servers ---------------------------------------------------------------------------------

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "bus-nats-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The nats-server binary, or `None` (skipped) when there is none and brokers are not required.
fn nats_server_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let found = on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin/nats-server")])
        .find(|path| path.is_file());
    if found.is_none() {
        let required =
            std::env::var("BUS_REQUIRE_BROKERS").is_ok_and(|v| matches!(v.trim(), "1" | "true"));
        assert!(
            !required,
            "nats-server is not on PATH, but BUS_REQUIRE_BROKERS=1 requires it (install \
             nats-server: scripts/brokers.sh)"
        );
        println!("skipped: nats-server not found on PATH");
    }
    found
}

/// A nats-server child process on a free loopback port, killed on drop.
struct Server {
    _child: tokio::process::Child,
    port: u16,
    _dir: TempDir,
}

impl Server {
    /// Starts nats-server with `config` (the `listen` line is added) and waits, at most 10 s,
    /// until its port accepts connections.
    async fn start(binary: &Path, config: &str) -> Self {
        let dir = TempDir::new();
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("local address")
            .port();
        let config = format!(
            "listen: \"127.0.0.1:{port}\"\n{}\n",
            config.replace("$DIR", &dir.path().display().to_string())
        );
        let config_path = dir.path().join("server.conf");
        std::fs::write(&config_path, &config).expect("write server config");
        let log_path = dir.path().join("server.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut child = tokio::process::Command::new(binary)
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start nats-server");
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nats-server exited ({status}) with\n{config}\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {port} within 10 s:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            _child: child,
            port,
            _dir: dir,
        }
    }
}

fn tls_block(pki: &Pki, server: &(PathBuf, PathBuf), verify: bool) -> String {
    format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: {verify}\n  \
         timeout: 2\n}}",
        server.0.display(),
        server.1.display(),
        pki.ca.display()
    )
}

// ---- helpers ---------------------------------------------------------------------------------

/// Subscribes, publishes and receives one message, then closes.
async fn round_trip(bus: NatsBroker) {
    let topic = format!("tls.{}", MessageId::new());
    let mut subscription = bus
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .expect("subscribe");
    bus.publish(
        &topic,
        Envelope::new(
            "tls.test",
            Bytes::from_static(b"over an authenticated link"),
        ),
    )
    .await
    .expect("publish");
    let delivery = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("received within 10 s")
        .expect("subscription open")
        .expect("no error");
    assert_eq!(
        delivery.envelope().payload.as_ref(),
        b"over an authenticated link"
    );
    delivery.ack().await.expect("ack");
    subscription.close().await.expect("close");
    Broker::close(&bus).await.expect("close bus");
}

/// Connects with `config`, which must fail: the error, after asserting that it came before the
/// connect timeout (its own reason, not a hang cut short).
async fn connect_fails(config: NatsConfig) -> Error {
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        CONNECT_TIMEOUT * 2,
        NatsBroker::connect_with(config.with_connect_timeout(CONNECT_TIMEOUT)),
    )
    .await
    .expect("connect_with returned (never hangs past its timeout)");
    let error = match outcome {
        Ok(_) => panic!("connected with a wrong setting"),
        Err(error) => error,
    };
    assert!(
        started.elapsed() < CONNECT_TIMEOUT,
        "failed only after {:?}: {error}",
        started.elapsed()
    );
    println!("{:?} error: {error}", error.kind());
    error
}

/// A login the server refused: `Rejected`, not retryable, saying so, with the client's
/// `AuthorizationViolation` kept as the source.
fn assert_login_refused(error: &Error) {
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!error.is_retryable());
    assert!(
        error.to_string().contains("authentication failed"),
        "{error}"
    );
    let cause = error
        .source_ref()
        .and_then(|source| source.downcast_ref::<async_nats::ConnectError>())
        .expect("the client's error kept as the source");
    assert_eq!(
        cause.kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation
    );
}

/// The error's Display, Debug and the Display and Debug of every source below it.
fn everything_shown(error: &Error) -> String {
    let mut shown = format!("{error}\n{error:?}");
    let mut next = error.source();
    while let Some(source) = next {
        shown.push_str(&format!("\n{source}\n{source:?}"));
        next = source.source();
    }
    shown
}

fn url(scheme: &str, userinfo: &str, port: u16, query: &[(&str, &Path)]) -> String {
    let mut url = format!("{scheme}://{userinfo}127.0.0.1:{port}");
    for (i, (name, path)) in query.iter().enumerate() {
        url.push(if i == 0 { '?' } else { '&' });
        url.push_str(&format!("{name}={}", path.display()));
    }
    url
}

// ---- round trips -----------------------------------------------------------------------------

/// The server of the password and NKey cases: TLS (no client certificate asked), a user with
/// a password and an NKey user, JetStream.
async fn password_and_nkey_server(binary: &Path, pki: &Pki, nkey_public: &str) -> Server {
    Server::start(
        binary,
        &format!(
            "{}\nauthorization {{\n  users = [\n    {{ user: \"alice\", password: \"{PASSWORD}\" }}\n    \
             {{ nkey: \"{nkey_public}\" }}\n  ]\n}}\njetstream {{ store_dir: \"$DIR/js\" }}",
            tls_block(pki, &pki.server, false)
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_right_ca_and_a_password_round_trips_on_jetstream() {
    let Some(binary) = nats_server_binary() else {
        return;
    };
    let pki = Pki::new();
    let nkey = nkeys::KeyPair::new_user();
    let server = password_and_nkey_server(&binary, &pki, &nkey.public_key()).await;

    // URL form: tls:// with the CA as a query parameter; topics on JetStream (the default).
    let bus = NatsBroker::connect(&url(
        "tls",
        &format!("alice:{PASSWORD}@"),
        server.port,
        &[("tls_ca", &pki.ca)],
    ))
    .await
    .expect("connect over TLS with user and password");
    assert!(bus.config().durable);
    assert_eq!(
        bus.capabilities().delivery_count,
        Support::Native,
        "JetStream"
    );
    round_trip(bus).await;

    // Builder form, by host name: a nats:// URL with a CA set still requires TLS.
    let config = NatsConfig::from_url(&format!("nats://localhost:{}", server.port))
        .unwrap()
        .with_credentials(Credentials::user_password("alice", PASSWORD))
        .with_tls_ca(&pki.ca);
    round_trip(NatsBroker::connect_with(config).await.expect("connect")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_round_trips() {
    let Some(binary) = nats_server_binary() else {
        return;
    };
    let pki = Pki::new();
    let nkey = nkeys::KeyPair::new_user();
    let seed = nkey.seed().expect("seed");
    let server = password_and_nkey_server(&binary, &pki, &nkey.public_key()).await;

    let config = NatsConfig::from_url(&url("tls", "", server.port, &[("tls_ca", &pki.ca)]))
        .unwrap()
        .with_credentials(Credentials::nkey(seed.as_str()));
    assert!(!format!("{config:?}").contains(&seed));
    round_trip(
        NatsBroker::connect_with(config)
            .await
            .expect("connect with an NKey"),
    )
    .await;

    // The seed as a URL parameter, on core NATS.
    let bus = NatsBroker::connect(&format!(
        "{}&nkey={seed}&durable=false",
        url("tls", "", server.port, &[("tls_ca", &pki.ca)])
    ))
    .await
    .expect("connect with nkey=");
    assert!(!format!("{:?}", bus.config()).contains(&seed));
    round_trip(bus).await;

    // Another user's seed: the server does not know its public key.
    let stranger = nkeys::KeyPair::new_user().seed().expect("seed");
    let error = connect_fails(
        NatsConfig::from_url(&url("tls", "", server.port, &[("tls_ca", &pki.ca)]))
            .unwrap()
            .with_credentials(Credentials::nkey(stranger.as_str())),
    )
    .await;
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!everything_shown(&error).contains(&stranger));

    // Not a seed at all: refused before anything is sent.
    let error = connect_fails(
        NatsConfig::from_url(&url("tls", "", server.port, &[("tls_ca", &pki.ca)]))
            .unwrap()
            .with_credentials(Credentials::nkey("SUNOTASEED")),
    )
    .await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(!everything_shown(&error).contains("SUNOTASEED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_round_trips_and_refuses_a_missing_or_untrusted_client_certificate() {
    let Some(binary) = nats_server_binary() else {
        return;
    };
    let pki = Pki::new();
    let server = Server::start(&binary, &tls_block(&pki, &pki.server, true)).await;

    let bus = NatsBroker::connect(&format!(
        "{}&durable=false",
        url(
            "tls",
            "",
            server.port,
            &[
                ("tls_ca", &pki.ca),
                ("tls_cert", &pki.client.0),
                ("tls_key", &pki.client.1)
            ]
        )
    ))
    .await
    .expect("connect with a client certificate");
    round_trip(bus).await;

    let without = NatsConfig::from_url(&url("tls", "", server.port, &[("tls_ca", &pki.ca)]))
        .unwrap()
        .with_durable(false);
    let error = connect_fails(without.clone()).await;
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!error.is_retryable());
    assert!(
        error.to_string().contains("requires a client certificate"),
        "{error}"
    );

    let untrusted = without.with_client_certificate(&pki.other_client.0, &pki.other_client.1);
    let error = connect_fails(untrusted).await;
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_round_trips_and_a_wrong_token_is_rejected_without_showing_it() {
    let Some(binary) = nats_server_binary() else {
        return;
    };
    let pki = Pki::new();
    let server = Server::start(
        &binary,
        &format!(
            "{}\nauthorization {{ token: \"{TOKEN}\" }}",
            tls_block(&pki, &pki.server, false)
        ),
    )
    .await;

    // As the URL's user part (how NATS URLs carry a token) and as `token=`.
    let ca = [("tls_ca", pki.ca.as_path())];
    let bus = NatsBroker::connect(&format!(
        "{}&durable=false",
        url("tls", &format!("{TOKEN}@"), server.port, &ca)
    ))
    .await
    .expect("connect with token@");
    round_trip(bus).await;
    let bus = NatsBroker::connect(&format!(
        "{}&token={TOKEN}&durable=false",
        url("tls", "", server.port, &ca)
    ))
    .await
    .expect("connect with token=");
    round_trip(bus).await;

    let config = NatsConfig::from_url(&format!(
        "{}&token={WRONG_TOKEN}",
        url("tls", "", server.port, &ca)
    ))
    .unwrap();
    let error = connect_fails(config).await;
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(
        error.to_string().contains("authentication failed"),
        "{error}"
    );
    assert!(!everything_shown(&error).contains(WRONG_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_name_override_checks_the_certificate_against_that_name() {
    let Some(binary) = nats_server_binary() else {
        return;
    };
    let pki = Pki::new();
    // A certificate for a DNS name only, reached by IP address.
    let named = pki.ca_signer.issue(
        pki.dir.path(),
        "named-server",
        &["nats.bus.test"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let server = Server::start(&binary, &tls_block(&pki, &named, false)).await;
    let config = NatsConfig::from_url(&url("nats", "", server.port, &[("tls_ca", &pki.ca)]))
        .unwrap()
        .with_durable(false);

    let error = connect_fails(config.clone()).await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(error.to_string().contains("NotValidForName"), "{error}");

    let error = connect_fails(config.clone().with_tls_server_name("other.bus.test")).await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");

    let bus = NatsBroker::connect(&format!(
        "{}&tls_server_name=nats.bus.test&durable=false",
        url("nats", "", server.port, &[("tls_ca", &pki.ca)])
    ))
    .await
    .expect("connect with tls_server_name");
    round_trip(bus).await;
}

// ---- wrong settings --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_a_config_error_not_a_hang() {
    let Some(binary) = nats_server_binary() else {
        return;
    };
    let pki = Pki::new();
    let server = Server::start(&binary, &tls_block(&pki, &pki.server, false)).await;

    // Another CA named explicitly, and the system's roots (no tls_ca).
    for config in [
        NatsConfig::from_url(&url("tls", "", server.port, &[("tls_ca", &pki.other_ca)])).unwrap(),
        NatsConfig::from_url(&url("tls", "", server.port, &[])).unwrap(),
    ] {
        let error = connect_fails(config).await;
        assert_eq!(error.kind(), ErrorKind::Config, "{error}");
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("UnknownIssuer"), "{error}");
    }

    // A CA file that is not there, or holds no certificate: named, before connecting.
    let missing = pki.dir.path().join("no-such-ca.pem");
    let error = connect_fails(
        NatsConfig::from_url(&url("tls", "", server.port, &[]))
            .unwrap()
            .with_tls_ca(&missing),
    )
    .await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(error.to_string().contains("no-such-ca.pem"), "{error}");
    let error = connect_fails(
        NatsConfig::from_url(&url("tls", "", server.port, &[]))
            .unwrap()
            .with_tls_ca(&pki.client.1),
    )
    .await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(
        error.to_string().contains("holds no PEM certificate"),
        "{error}"
    );
    assert!(!everything_shown(&error).contains("PRIVATE KEY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_rejected_without_showing_it() {
    let Some(binary) = nats_server_binary() else {
        return;
    };
    let pki = Pki::new();
    let nkey = nkeys::KeyPair::new_user();
    let server = password_and_nkey_server(&binary, &pki, &nkey.public_key()).await;

    for config in [
        NatsConfig::from_url(&url(
            "tls",
            &format!("alice:{WRONG_PASSWORD}@"),
            server.port,
            &[("tls_ca", &pki.ca)],
        ))
        .unwrap(),
        NatsConfig::from_url(&url("tls", "", server.port, &[("tls_ca", &pki.ca)]))
            .unwrap()
            .with_credentials(Credentials::user_password("alice", WRONG_PASSWORD)),
        // No credentials at all on a server that wants them.
        NatsConfig::from_url(&url("tls", "", server.port, &[("tls_ca", &pki.ca)])).unwrap(),
    ] {
        let error = connect_fails(config).await;
        assert_login_refused(&error);
        let shown = everything_shown(&error);
        assert!(!shown.contains(WRONG_PASSWORD), "{shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_from_an_env_var_or_a_file_round_trips_and_an_unset_one_is_a_config_error() {
    let Some(binary) = nats_server_binary() else {
        return;
    };
    let pki = Pki::new();
    let nkey = nkeys::KeyPair::new_user();
    let server = password_and_nkey_server(&binary, &pki, &nkey.public_key()).await;
    let with_password = |password: Secret| {
        NatsConfig::from_url(&url("tls", "", server.port, &[("tls_ca", &pki.ca)]))
            .unwrap()
            .with_credentials(Credentials::user_password("alice", password))
    };
    // Unique to this process: tests of other crates may run alongside.
    let variable = format!("BUS_NATS_TEST_PASSWORD_{}", std::process::id());
    std::env::set_var(&variable, PASSWORD);

    round_trip(
        NatsBroker::connect_with(with_password(Secret::env(&variable)))
            .await
            .expect("connect with the password from an environment variable"),
    )
    .await;

    // As a config file gives it; the reference, not the password, is what serializes.
    let config: NatsConfig = serde_json::from_value(serde_json::json!({
        "url": format!("tls://127.0.0.1:{}", server.port),
        "tls_ca": pki.ca,
        "durable": false,
        "credentials": { "user_password": { "user": "alice", "password": { "env": variable } } },
    }))
    .expect("config");
    let json = serde_json::to_string(&config).unwrap();
    assert!(
        json.contains(&variable) && !json.contains(PASSWORD),
        "{json}"
    );
    round_trip(
        NatsBroker::connect_with(config)
            .await
            .expect("connect with a deserialized env reference"),
    )
    .await;

    // A file with a trailing newline, as `echo` and secret mounts write it.
    let file = pki.dir.path().join("nats-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).expect("write password file");
    round_trip(
        NatsBroker::connect_with(with_password(Secret::file(&file)))
            .await
            .expect("connect with the password from a file"),
    )
    .await;

    // A wrong password in the file: refused by the server, not shown.
    std::fs::write(&file, WRONG_PASSWORD).expect("write password file");
    let error = connect_fails(with_password(Secret::file(&file))).await;
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!everything_shown(&error).contains(WRONG_PASSWORD));

    // Unset variable, missing file: named, before anything is sent.
    let unset = format!("BUS_NATS_TEST_UNSET_{}", std::process::id());
    std::env::remove_var(&unset);
    let error = connect_fails(with_password(Secret::env(&unset))).await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(!error.is_retryable());
    assert!(error.to_string().contains(&unset), "{error}");
    assert!(
        error.to_string().contains("user_password.password"),
        "{error}"
    );
    let missing = pki.dir.path().join("no-such-password");
    let error = connect_fails(with_password(Secret::file(&missing))).await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(error.to_string().contains("no-such-password"), "{error}");
    std::env::remove_var(&variable);
}

// ---- decentralized authentication: a .creds file -------------------------------------------

/// A JWT as `nsc` writes it: `claims` (`jti`, `iat`, `iss`, `sub`, `name`, `nats`) signed with
/// `signer`'s ed25519 key over `<header>.<claims>`, base64url without padding.
fn jwt(signer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        // The server does not check the id; nsc writes a hash of the claims here.
        "jti": format!("BUSTEST{}X{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)),
        "iat": SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs(),
        "iss": signer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let signed = format!("{header}.{}", b64.encode(claims.to_string()));
    let signature = signer.sign(signed.as_bytes()).expect("sign JWT");
    format!("{signed}.{}", b64.encode(signature))
}

/// The JWT of an account signed by `operator`, without limits, with JetStream or not (the
/// system account may not have it).
fn account_jwt(
    operator: &nkeys::KeyPair,
    account: &nkeys::KeyPair,
    name: &str,
    jetstream: bool,
) -> String {
    // A limit left out reads as 0: without `conn` the server refuses every connection
    // ("maximum account active connections exceeded"); without storage limits the account
    // has no JetStream.
    let mut limits = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        for limit in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[limit] = serde_json::json!(-1);
        }
    }
    jwt(
        operator,
        &account.public_key(),
        name,
        serde_json::json!({
            "type": "account",
            "version": 2,
            "limits": limits,
            "default_permissions": { "pub": {}, "sub": {} },
        }),
    )
}

/// A `.creds` file for a new user of `account` (signed by the account's identity key, so no
/// `issuer_account`): the user's JWT and seed, as `nsc generate creds` writes them. Returns
/// the path and the JWT and seed (which no error may show).
fn creds_file(dir: &Path, file: &str, account: &nkeys::KeyPair) -> (PathBuf, String, String) {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("user seed");
    let user_jwt = jwt(
        account,
        &user.public_key(),
        file,
        serde_json::json!({
            "type": "user",
            "version": 2,
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        }),
    );
    let path = dir.join(format!("{file}.creds"));
    std::fs::write(
        &path,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        ),
    )
    .expect("write creds file");
    (path, user_jwt, seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_round_trips_and_one_of_an_unknown_account_is_rejected() {
    let Some(binary) = nats_server_binary() else {
        return;
    };
    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    // nats-server 2.9 starts JetStream in operator mode only with a system account.
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "bus-test-operator",
        serde_json::json!({
            "type": "operator",
            "version": 2,
            "system_account": system.public_key(),
        }),
    );
    // Operator mode: the server trusts the operator and knows the accounts it signed from
    // memory (`resolver: MEMORY`, the accounts' JWTs given in the config).
    let server = Server::start(
        &binary,
        &format!(
            "operator: \"{operator_jwt}\"\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{}\"\n  \
             {}: \"{}\"\n}}\njetstream {{ store_dir: \"$DIR/js\" }}",
            system.public_key(),
            account_jwt(&operator, &system, "SYS", false),
            account.public_key(),
            account_jwt(&operator, &account, "bus-test-account", true),
        ),
    )
    .await;
    let dir = TempDir::new();
    let nats_url = format!("nats://127.0.0.1:{}", server.port);

    // On JetStream (the default), by the builder; on core NATS, by the URL's `creds=`.
    let (right, _, _) = creds_file(dir.path(), "right", &account);
    let bus = NatsBroker::connect_with(
        NatsConfig::from_url(&nats_url)
            .unwrap()
            .with_credentials(Credentials::creds_file(&right)),
    )
    .await
    .expect("connect with a creds file");
    assert_eq!(
        bus.capabilities().delivery_count,
        Support::Native,
        "JetStream"
    );
    round_trip(bus).await;
    let bus = NatsBroker::connect(&format!(
        "{nats_url}?creds={}&durable=false",
        right.display()
    ))
    .await
    .expect("connect with creds=");
    round_trip(bus).await;

    // A user of an account the operator never signed (the server does not know it).
    let stranger = nkeys::KeyPair::new_account();
    let (unknown, user_jwt, seed) = creds_file(dir.path(), "unknown-account", &stranger);
    let error = connect_fails(
        NatsConfig::from_url(&nats_url)
            .unwrap()
            .with_credentials(Credentials::creds_file(&unknown)),
    )
    .await;
    assert_login_refused(&error);
    let shown = everything_shown(&error);
    assert!(
        !shown.contains(&seed) && !shown.contains(&user_jwt),
        "{shown}"
    );

    // No creds at all on a server in operator mode.
    let error = connect_fails(NatsConfig::from_url(&nats_url).unwrap()).await;
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");

    // A file that is not there, or not a creds file: named, before connecting.
    let missing = dir.path().join("no-such.creds");
    let error = connect_fails(
        NatsConfig::from_url(&nats_url)
            .unwrap()
            .with_credentials(Credentials::creds_file(&missing)),
    )
    .await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(
        error.to_string().contains("no-such.creds cannot be read"),
        "{error}"
    );
    let garbled = dir.path().join("garbled.creds");
    std::fs::write(&garbled, format!("user {user_jwt}\nseed {seed}\n")).expect("write");
    let error = connect_fails(
        NatsConfig::from_url(&nats_url)
            .unwrap()
            .with_credentials(Credentials::creds_file(&garbled)),
    )
    .await;
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    let shown = everything_shown(&error);
    assert!(
        !shown.contains(&seed) && !shown.contains(&user_jwt),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_a_timeout_within_the_connect_timeout() {
    // A listener that accepts (the kernel completes the handshake) but never sends INFO.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("address").port();
    let timeout = Duration::from_millis(500);
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        NatsBroker::connect(&format!(
            "nats://127.0.0.1:{port}?connect_timeout_ms={}",
            timeout.as_millis()
        )),
    )
    .await
    .expect("connect returned");
    let Err(error) = outcome else {
        panic!("connected to a server that never answered");
    };
    let elapsed = started.elapsed();
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_secs(2),
        "gave up after {elapsed:?}"
    );
    drop(silent);
}
