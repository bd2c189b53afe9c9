//! Where and how a connection is made: the URL's host and port, TLS (rustls with the
//! configured CA, client certificate and server name), the SASL mechanism, and the bound on
//! each attempt. Resolved from the configuration before every attempt, so a certificate file
//! replaced on disk is read again at the next reconnection.

use std::io;
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::{Error, Result};
use lapin::tcp::{HandshakeError, HandshakeResult, RustlsConnector, TcpStream};
use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use url::{Host, Url};

use crate::config::{redact, AuthMechanism, Pem};
use crate::RabbitMqConfig;

/// The URL query parameters this adapter reads itself and takes out of the URL before lapin
/// parses it (see [`RabbitMqConfig::url`]); a facade passes them through as they are.
pub const URL_PARAMETERS: &[&str] = &[
    "tls_ca",
    "tls_cert",
    "tls_key",
    "tls_server_name",
    "connect_timeout_ms",
];

/// A resolved connection target.
pub(crate) struct Endpoint {
    /// lapin's reading of the URL (credentials, vhost, its own parameters), with the
    /// configured SASL mechanism.
    pub(crate) uri: AMQPUri,
    /// The host as written in the URL: lapin's parser takes an IP address for `localhost`.
    host: String,
    port: u16,
    tls: Option<Tls>,
    /// Whether a client certificate is configured.
    client_cert: bool,
    /// The bound on one whole attempt (TCP, TLS, login, declarations).
    pub(crate) timeout: Duration,
    /// The URL, safe to print.
    pub(crate) shown: String,
}

#[derive(Clone)]
struct Tls {
    config: Arc<ClientConfig>,
    server_name: String,
}

fn config_error(message: String) -> Error {
    Error::config(message)
}

impl Endpoint {
    /// Reads `config`: its URL, the TLS settings (URL parameters over fields), the SASL
    /// mechanism and the connect timeout.
    ///
    /// # Errors
    /// `Config` for a URL that does not parse, TLS settings on `amqp://`, a certificate or key
    /// that cannot be read or parsed, a certificate without its key (or the reverse), an
    /// invalid server name, a [`password`](RabbitMqConfig::password) reference that cannot
    /// be read. No message holds the password or key material.
    pub(crate) fn resolve(config: &RabbitMqConfig) -> Result<Self> {
        let shown = redact(&config.url);
        let mut url = Url::parse(config.url.trim()).map_err(|e| {
            Error::with_source(
                bus_core::ErrorKind::Config,
                format!("`{shown}` is not a valid URL: {e}"),
                e,
            )
        })?;
        let tls_wanted = match url.scheme() {
            "amqp" => false,
            "amqps" => true,
            other => {
                return Err(config_error(format!(
                    "`{shown}`: the scheme `{other}` is not amqp:// or amqps://"
                )))
            }
        };
        let mut ca = config.tls_ca.clone();
        let mut cert = config.tls_cert.clone();
        let mut key = config.tls_key.clone();
        let mut server_name = config.tls_server_name.clone();
        let mut timeout = config.connect_timeout();
        let mut kept = Vec::new();
        for (name, value) in url.query_pairs() {
            match &*name {
                "tls_ca" => ca = Some(Pem::file(&*value)),
                "tls_cert" => cert = Some(Pem::file(&*value)),
                "tls_key" => key = Some(Pem::file(&*value)),
                "tls_server_name" => server_name = Some(value.into_owned()),
                "connect_timeout_ms" => {
                    let ms = value.parse::<u64>().map_err(|e| {
                        Error::with_source(
                            bus_core::ErrorKind::Config,
                            format!(
                                "`{shown}`: `connect_timeout_ms` must be a positive number of \
                                 milliseconds, got `{value}`"
                            ),
                            e,
                        )
                    })?;
                    timeout = Duration::from_millis(ms.max(1));
                }
                _ => kept.push((name.into_owned(), value.into_owned())),
            }
        }
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
        let host = match url.host() {
            Some(Host::Domain(domain)) => domain.to_owned(),
            Some(Host::Ipv4(ip)) => ip.to_string(),
            Some(Host::Ipv6(ip)) => ip.to_string(),
            None => "localhost".to_owned(),
        };
        let port = url.port().unwrap_or(if tls_wanted { 5671 } else { 5672 });
        let mut uri: AMQPUri = url.as_str().parse().map_err(|e: String| {
            // lapin's message can quote the URL, password included.
            let e = e.replace(url.as_str(), &shown);
            config_error(format!("`{shown}` is not a valid AMQP URL: {e}"))
        })?;
        if let Some(password) = &config.password {
            uri.authority.userinfo.password = password.resolve()?;
        }
        if let Some(mechanism) = config.auth_mechanism {
            uri.query.auth_mechanism = Some(match mechanism {
                AuthMechanism::Plain => SASLMechanism::Plain,
                AuthMechanism::AmqPlain => SASLMechanism::AMQPlain,
                AuthMechanism::External => SASLMechanism::External,
            });
        }
        let tls = if tls_wanted {
            let config = client_config(ca.as_ref(), cert.as_ref(), key.as_ref())?;
            let server_name = server_name.unwrap_or_else(|| host.clone());
            ServerName::try_from(server_name.clone()).map_err(|e| {
                Error::with_source(
                    bus_core::ErrorKind::Config,
                    format!("`{shown}`: `{server_name}` is not a valid TLS server name"),
                    e,
                )
            })?;
            Some(Tls {
                config,
                server_name,
            })
        } else {
            let named: Vec<&str> = [
                ("tls_ca", ca.is_some()),
                ("tls_cert", cert.is_some()),
                ("tls_key", key.is_some()),
                ("tls_server_name", server_name.is_some()),
            ]
            .into_iter()
            .filter_map(|(name, set)| set.then_some(name))
            .collect();
            if !named.is_empty() {
                return Err(config_error(format!(
                    "`{shown}`: {} set, but the URL is not amqps://: TLS settings need TLS",
                    named.join(", ")
                )));
            }
            None
        };
        debug_assert_eq!(uri.scheme == AMQPScheme::AMQPS, tls.is_some());
        Ok(Self {
            uri,
            host,
            port,
            tls,
            client_cert: cert.is_some(),
            timeout,
            shown,
        })
    }

    /// Whether the TLS handshake presents a client certificate.
    pub(crate) fn sends_client_cert(&self) -> bool {
        self.tls.is_some() && self.client_cert
    }

    /// The user the connection logs in as, or the mechanism that names it.
    pub(crate) fn login(&self) -> String {
        match self.uri.query.auth_mechanism {
            Some(SASLMechanism::External) if self.client_cert => {
                "with EXTERNAL (the client certificate's CN must be a RabbitMQ user)".to_owned()
            }
            Some(SASLMechanism::External) => "with EXTERNAL, but no client certificate was \
                configured (tls_cert and tls_key name the user)"
                .to_owned(),
            mechanism => format!(
                "as `{}` with {}",
                self.uri.authority.userinfo.username,
                mechanism.unwrap_or_default()
            ),
        }
    }

    /// What lapin runs, on a blocking thread, to open the socket: TCP to the URL's host, then
    /// the TLS handshake. Reads and writes are bounded by the timeout until the handshake is
    /// done, so a server that never answers does not hold the thread.
    // `HandshakeResult` is lapin's type, large error and all.
    #[allow(clippy::result_large_err)]
    pub(crate) fn connector(&self) -> Box<dyn FnOnce(&AMQPUri) -> HandshakeResult + Send + Sync> {
        let host = self.host.clone();
        let port = self.port;
        let timeout = self.timeout;
        let tls = self.tls.clone();
        Box::new(move |_: &AMQPUri| {
            let mut last = None;
            let mut socket = None;
            for addr in (host.as_str(), port).to_socket_addrs()? {
                match std::net::TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => {
                        socket = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let socket = socket.ok_or_else(|| {
                last.unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::AddrNotAvailable,
                        format!("{host} resolves to no address"),
                    )
                })
            })?;
            socket.set_nodelay(true)?;
            let stream = match tls {
                None => TcpStream::from_std(socket)?,
                Some(tls) => {
                    socket.set_read_timeout(Some(timeout))?;
                    socket.set_write_timeout(Some(timeout))?;
                    let same_socket = socket.try_clone()?;
                    let connector = RustlsConnector::from(tls.config);
                    let deadline = Instant::now() + timeout;
                    let mut handshake =
                        TcpStream::from_std(socket)?.into_rustls(&connector, &tls.server_name);
                    let stream = loop {
                        match handshake {
                            Ok(stream) => break stream,
                            // A read that timed out comes back as WouldBlock: give up at the
                            // deadline instead of waiting on this thread for ever.
                            Err(HandshakeError::WouldBlock(_)) if Instant::now() >= deadline => {
                                return Err(HandshakeError::Failure(io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    format!("the TLS handshake did not end within {timeout:?}"),
                                )))
                            }
                            Err(HandshakeError::WouldBlock(mid)) => handshake = mid.handshake(),
                            Err(failure) => return Err(failure),
                        }
                    };
                    same_socket.set_read_timeout(None)?;
                    same_socket.set_write_timeout(None)?;
                    stream
                }
            };
            stream.set_nonblocking(true)?;
            Ok(stream)
        })
    }
}

/// The rustls client configuration: the CA (else the system's roots) and the client
/// certificate, on the `ring` provider (the one lapin's rustls is built with).
fn client_config(
    ca: Option<&Pem>,
    cert: Option<&Pem>,
    key: Option<&Pem>,
) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(ca) => {
            let certs = certificates("tls_ca", ca)?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(config_error(format!(
                    "tls_ca ({}) holds no usable CA certificate",
                    describe(ca)
                )));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs().map_err(|e| {
                Error::with_source(
                    bus_core::ErrorKind::Config,
                    "could not load the system's root certificates (set tls_ca)",
                    e,
                )
            })?;
            roots.add_parsable_certificates(native);
        }
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| {
                Error::with_source(
                    bus_core::ErrorKind::Config,
                    "rustls refused its defaults",
                    e,
                )
            })?
            .with_root_certificates(roots);
    let config = match (cert, key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = certificates("tls_cert", cert)?;
            let private = private_key(key)?;
            builder.with_client_auth_cert(chain, private).map_err(|e| {
                Error::with_source(
                    bus_core::ErrorKind::Config,
                    format!(
                        "the client certificate ({}) and key ({}) cannot be used together",
                        describe(cert),
                        describe(key)
                    ),
                    e,
                )
            })?
        }
        (Some(_), None) => {
            return Err(config_error(
                "tls_cert is set without tls_key: a client certificate needs its private key"
                    .to_owned(),
            ))
        }
        (None, Some(_)) => {
            return Err(config_error(
                "tls_key is set without tls_cert: a private key needs its certificate".to_owned(),
            ))
        }
    };
    Ok(Arc::new(config))
}

/// Says where PEM data comes from, without its content.
fn describe(pem: &Pem) -> String {
    match pem {
        Pem::File(path) => format!("file `{}`", path.display()),
        Pem::Text(_) => "PEM text".to_owned(),
    }
}

fn pem_bytes(setting: &str, pem: &Pem) -> Result<Vec<u8>> {
    match pem {
        Pem::Text(text) => Ok(text.as_bytes().to_vec()),
        Pem::File(path) => std::fs::read(path).map_err(|e| {
            Error::with_source(
                bus_core::ErrorKind::Config,
                format!("{setting}: cannot read `{}`: {e}", path.display()),
                e,
            )
        }),
    }
}

fn certificates(setting: &str, pem: &Pem) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = pem_bytes(setting, pem)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::with_source(
                bus_core::ErrorKind::Config,
                format!("{setting} ({}) is not PEM: {e}", describe(pem)),
                e,
            )
        })?;
    if certs.is_empty() {
        return Err(config_error(format!(
            "{setting} ({}) holds no PEM certificate",
            describe(pem)
        )));
    }
    Ok(certs)
}

fn private_key(pem: &Pem) -> Result<PrivateKeyDer<'static>> {
    let bytes = pem_bytes("tls_key", pem)?;
    // The parser's error is not kept: its text could quote part of the key.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
        config_error(format!(
            "tls_key ({}) holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            describe(pem)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_leave_the_url_and_need_amqps() {
        let config = RabbitMqConfig::new(
            "amqps://u:p@10.0.0.7:5671/%2f?heartbeat=5&tls_server_name=mq.internal\
             &connect_timeout_ms=1500",
        );
        let endpoint = Endpoint::resolve(&config).unwrap();
        assert_eq!(endpoint.host, "10.0.0.7");
        assert_eq!(endpoint.timeout, Duration::from_millis(1500));
        assert_eq!(endpoint.uri.query.heartbeat, Some(5));
        assert_eq!(endpoint.tls.as_ref().unwrap().server_name, "mq.internal");

        let plain = RabbitMqConfig::new("amqp://u:p@mq/%2f?tls_ca=/etc/ca.pem");
        let err = Endpoint::resolve(&plain).err().unwrap();
        assert_eq!(err.kind(), bus_core::ErrorKind::Config);
        assert!(err.message().contains("amqps://"), "{err}");
    }

    #[test]
    fn unreadable_settings_are_config_errors_without_secrets() {
        let config = RabbitMqConfig::new("amqps://u:hunter2@mq/%2f").with_tls_client_cert(
            Pem::text("not a certificate"),
            Pem::text("-----BEGIN PRIVATE KEY-----\nSECRETSTUFF\n-----END PRIVATE KEY-----\n"),
        );
        let err = Endpoint::resolve(&config).err().unwrap();
        assert_eq!(err.kind(), bus_core::ErrorKind::Config);
        let config = config.with_tls_ca(Pem::file("/nonexistent/ca.pem"));
        let err = Endpoint::resolve(&config).err().unwrap();
        assert!(err.message().contains("/nonexistent/ca.pem"), "{err}");
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(
                !text.contains("hunter2") && !text.contains("SECRETSTUFF"),
                "{text}"
            );
        }
    }
}
