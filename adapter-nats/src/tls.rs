//! TLS files read into what rustls needs: the configured CA as the only roots, the client
//! certificate and key for mutual TLS, and the name the server's certificate must carry when it
//! is not the URL's host. Every file is read when connecting, so a wrong path or a file that
//! holds no certificate is a [`ErrorKind::Config`] naming the file, before any network traffic.

use std::path::Path;
use std::sync::Arc;

use async_nats::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use async_nats::rustls::client::WebPkiServerVerifier;
use async_nats::rustls::crypto::CryptoProvider;
use async_nats::rustls::pki_types::pem::PemObject;
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use async_nats::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use bus_core::{Error, ErrorKind, Result};

/// The certificates in the PEM file at `path` (`what` names it in errors).
///
/// The files are a few KiB, read once per connect: a blocking read is cheaper than a thread.
pub(crate) fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read(path, what)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("the {what} {} is not valid PEM", path.display()),
                e,
            )
        })?;
    if certificates.is_empty() {
        return Err(Error::config(format!(
            "the {what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certificates)
}

/// The private key in the PEM file at `path`.
pub(crate) fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let bytes = read(path, "client key")?;
    // The parser's error is left out: it may quote a line of the file.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
        Error::config(format!(
            "the client key {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        ))
    })
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("reading the {what} {}", path.display()),
            e,
        )
    })
}

/// Makes sure rustls has a process-wide crypto provider, installing `ring` (the one the
/// adapter is built with) when none was installed.
///
/// async-nats builds its own rustls configuration where the adapter does not give one (TLS
/// with the system's roots), and rustls picks the provider from its crate features. When the
/// application's other dependencies enable a second provider as well (`aws-lc-rs`, as the
/// AWS SDK and others do), rustls cannot choose and panics on the first TLS connection. A
/// provider the application installed itself is kept.
pub(crate) fn ensure_provider() {
    if CryptoProvider::get_default().is_none() {
        // Losing the race to another thread that installed one is fine: one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A rustls configuration that trusts only the certificates in `ca`, presents `identity`
/// (certificate chain file, key file) when given, and checks the server's certificate against
/// `server_name` instead of the URL's host when given.
pub(crate) fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    server_name: Option<&str>,
) -> Result<ClientConfig> {
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let mut roots = RootCertStore::empty();
    for certificate in certificates(ca, "CA file")? {
        roots.add(certificate).map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!(
                    "the CA file {} holds a certificate that cannot be a root",
                    ca.display()
                ),
                e,
            )
        })?;
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("the CA file {} cannot verify servers", ca.display()),
                e,
            )
        })?;
    let verifier: Arc<dyn ServerCertVerifier> = match server_name {
        None => webpki,
        Some(name) => Arc::new(ExpectedName {
            name: ServerName::try_from(name.to_owned()).map_err(|e| {
                Error::with_source(
                    ErrorKind::Config,
                    format!("tls_server_name `{name}` is not a DNS name or IP address"),
                    e,
                )
            })?,
            inner: webpki,
        }),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::with_source(ErrorKind::Config, "the TLS provider", e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => builder
            .with_client_auth_cert(certificates(cert, "client certificate")?, private_key(key)?)
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Config,
                    format!(
                        "the client certificate {} and key {} cannot be used together",
                        cert.display(),
                        key.display()
                    ),
                    e,
                )
            }),
    }
}

/// WebPKI verification against a configured name rather than the host the client dialled
/// (`async-nats` always passes the URL's host, and rustls has no override of its own).
#[derive(Debug)]
struct ExpectedName {
    name: ServerName<'static>,
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ExpectedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
