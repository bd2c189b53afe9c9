//! HTTPS to the endpoint with the CA and server name the configuration gives: the AWS SDK's
//! own HTTP client (hyper and rustls, with aws-lc), built with another trust store.
//!
//! Without `tls_ca` or `tls_server_name` the SDK's default client is used unchanged: it
//! verifies the endpoint's certificate against the system's roots and the endpoint's host.

use aws_sdk_sqs::config::SharedHttpClient;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};
use aws_smithy_http_client::Builder;
use bus_core::{Error, ErrorKind, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::config::SqsConfig;

/// The HTTP client for the configured TLS settings; `None` when there are none (the SDK's
/// default client, with the system's roots).
///
/// # Errors
/// [`ErrorKind::Config`] for a CA file that cannot be read, PEM without a certificate or with
/// one that does not parse, and a server name that is not a DNS name or IP address.
pub(crate) fn http_client(config: &SqsConfig) -> Result<Option<SharedHttpClient>> {
    if config.tls_ca.is_none() && config.tls_server_name.is_none() {
        return Ok(None);
    }
    let trust = match &config.tls_ca {
        Some(ca) => TrustStore::empty()
            .with_native_roots(false)
            .with_pem_certificate(ca_pem(ca)?),
        None => TrustStore::default(),
    };
    let mut context = TlsContext::builder().with_trust_store(trust);
    if let Some(name) = &config.tls_server_name {
        let name = tls::ServerName::try_from(name.as_str()).map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("SQS: `tls_server_name` `{name}` is not a DNS name or IP address"),
                e,
            )
        })?;
        context = context.with_additional_server_names(vec![name]);
    }
    let context = context
        .build()
        .map_err(|e| Error::with_source(ErrorKind::Config, "SQS: the TLS settings", e))?;
    Ok(Some(
        Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
            .tls_context(context)
            .build_https(),
    ))
}

/// The PEM of `tls_ca` (PEM text, or the path of a PEM file), checked: the SDK panics on PEM
/// it cannot parse, so nothing unparsable may reach it.
fn ca_pem(ca: &str) -> Result<Vec<u8>> {
    let (pem, what) = if ca.contains("-----BEGIN") {
        (
            ca.as_bytes().to_vec(),
            "the PEM text of `tls_ca`".to_owned(),
        )
    } else {
        let pem = std::fs::read(ca).map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("SQS: cannot read the `tls_ca` file `{ca}`"),
                e,
            )
        })?;
        (pem, format!("the `tls_ca` file `{ca}`"))
    };
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("SQS: {what} is not valid PEM"),
                e,
            )
        })?;
    if certificates.is_empty() {
        return Err(Error::config(format!(
            "SQS: {what} holds no certificate (`-----BEGIN CERTIFICATE-----`)"
        )));
    }
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates {
        roots.add(certificate).map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("SQS: a certificate in {what} cannot be used as a root"),
                e,
            )
        })?;
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SDK panics on PEM it cannot parse; the adapter refuses it with a `Config` error.
    #[test]
    fn bad_ca_is_a_config_error_not_a_panic() {
        for ca in [
            "/nonexistent/ca.pem",
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            let config = SqsConfig::default().with_tls_ca(ca);
            let err = http_client(&config).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{ca}: {err}");
            assert!(err.to_string().contains("tls_ca"), "{err}");
        }
        let config = SqsConfig::default().with_tls_server_name("not a name");
        let err = http_client(&config).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(http_client(&SqsConfig::default()).unwrap().is_none());
    }
}
