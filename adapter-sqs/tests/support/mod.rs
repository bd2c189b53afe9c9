//! moto servers of a test binary's own (https, or with IAM authentication enforced), a
//! throwaway CA (rcgen), and a round trip through SQS and SNS.
//!
//! The servers run `moto_server` (installed by `scripts/brokers.sh start sqs`, the same that
//! serves `BUS_TEST_SQS_URL`) on a free loopback port, under a shell that kills it when the
//! test binary exits (the shell reads the binary's end of a pipe and ends when it closes).

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use adapter_sqs::{SqsBroker, SqsConfig};
use bus_core::conformance::broker_url;
use bus_core::{Broker, Envelope, Publisher, SubscribeOptions, Subscriber};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// Whether the tests can start moto servers of their own: `BUS_TEST_SQS_URL` is set (moto is
/// installed) and `moto_server` runs. Prints "skipped: …" when not; with
/// `BUS_REQUIRE_BROKERS=1` a missing server fails instead.
pub fn moto_available() -> bool {
    if broker_url("BUS_TEST_SQS_URL").is_none() {
        return false;
    }
    let runs = Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !runs {
        let required = std::env::var("BUS_REQUIRE_BROKERS").is_ok_and(|v| v.trim() == "1");
        assert!(
            !required,
            "moto_server is not on PATH, but BUS_REQUIRE_BROKERS=1 requires it \
             (scripts/brokers.sh start sqs installs it)"
        );
        println!("skipped: moto_server is not on PATH (scripts/brokers.sh start sqs)");
    }
    runs
}

/// A directory of its own under the system's temporary directory.
pub fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bus-sqs-{what}-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}

/// A moto server of this test binary's own.
pub struct Moto {
    pub port: u16,
    pub https: bool,
    /// The shell's stdin: the server lives while this is open.
    _child: Child,
}

impl Moto {
    /// Starts `moto_server` on a free port; `tls` is the certificate and key files to serve
    /// https with. Waits until it accepts connections.
    pub fn start(tls: Option<(&Path, &Path)>, log: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("local address")
            .port();
        let mut args = vec![
            "-H".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            port.to_string(),
        ];
        if let Some((cert, key)) = tls {
            args.extend([
                "--ssl-cert".to_owned(),
                cert.display().to_string(),
                "--ssl-key".to_owned(),
                key.display().to_string(),
            ]);
        }
        let log = std::fs::File::create(log).expect("moto log file");
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"moto_server "$@" & pid=$!; read _ignored; kill $pid"#)
            .arg("sh")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start moto_server");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            port,
            https: tls.is_some(),
            _child: child,
        }
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The `sqs://` URL of this server (without TLS parameters).
    pub fn url(&self) -> String {
        format!("sqs://127.0.0.1:{}?region=us-east-1", self.port)
    }

    /// Calls a query-protocol action (IAM, STS) without signing it, which moto accepts while
    /// it does not enforce authentication; returns the response body.
    pub fn unsigned_call(&self, service: &str, params: &[(&str, &str)]) -> String {
        assert!(!self.https, "unsigned calls go to plain-HTTP servers");
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        let request = format!(
            "POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: \
             application/x-www-form-urlencoded\r\nAuthorization: AWS4-HMAC-SHA256 \
             Credential=AKIDSETUP/20240101/us-east-1/{service}/aws4_request, \
             SignedHeaders=host, Signature=0\r\nContent-Length: {len}\r\nConnection: \
             close\r\n\r\n{body}",
            port = self.port,
            len = body.len(),
        );
        self.raw(&request)
    }

    /// From now on moto checks every call's signature against the access keys it issued and
    /// evaluates IAM policies (`/moto-api/reset-auth`).
    pub fn enforce_authentication(&self) {
        let request = format!(
            "POST /moto-api/reset-auth HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: \
             1\r\nConnection: close\r\n\r\n0",
            self.port
        );
        let answer = self.raw(&request);
        assert!(answer.contains("ok"), "reset-auth: {answer}");
    }

    fn raw(&self, request: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
        stream.write_all(request.as_bytes()).expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        assert!(
            response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"),
            "moto answered {response}"
        );
        response
    }
}

/// The text of the first `<tag>…</tag>` in `xml`.
pub fn xml_value(xml: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
        + open.len();
    let end = xml[start..].find("</").expect("closing tag") + start;
    xml[start..end].to_owned()
}

/// A throwaway CA.
pub struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self { key, cert }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate to `dir/<name>.pem`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.cert.pem()).expect("write CA");
        path
    }

    /// Issues a server certificate for `names` and writes `dir/<file>.pem` and
    /// `dir/<file>-key.pem`.
    pub fn server(&self, dir: &Path, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signed certificate");
        let (cert_path, key_path) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }
}

/// Publishes to a new topic with a consumer group subscribed (SNS and SQS both) and receives
/// and acks the message: what every connection mode must manage. The payload has no space:
/// moto 5.2, checking signatures, computes SNS `Publish`'s differently when the body holds one
/// (`SignatureDoesNotMatch` with the right key).
pub async fn round_trip(config: SqsConfig) -> bus_core::Result<()> {
    let broker = SqsBroker::connect_with(config.with_wait_time(Duration::from_secs(1))).await?;
    let topic = format!("security.{}", uuid::Uuid::now_v7());
    let mut subscription = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await?;
    broker
        .publish(&topic, Envelope::new("t", "over-the-wire"))
        .await?;
    let delivery = tokio::time::timeout(Duration::from_secs(30), subscription.next())
        .await
        .expect("the message arrives within 30 s")
        .expect("the subscription is open")?;
    assert_eq!(&delivery.envelope().payload[..], b"over-the-wire");
    delivery.ack().await?;
    subscription.close().await?;
    broker.close().await
}
