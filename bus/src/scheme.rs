//! From a parsed URL to an adapter: one function per scheme, each behind its cargo feature.
//! Every adapter reads its own URL (`<Adapter>Config::apply_url(self, &Url)`, over the
//! `BusConfig` section or the defaults); this module only maps a scheme to an adapter.

use url::Url;

use bus_core::{Error, Result};

use crate::{Bus, BusConfig};

/// The URL schemes `bus` knows, whether or not their adapter is compiled in.
pub(crate) const KNOWN_SCHEMES: &[&str] = &["memory", "nats", "amqp", "amqps", "kafka", "sqs"];

/// Connects to the adapter that serves `url`'s scheme.
pub(crate) async fn connect(url: &Url, config: &BusConfig) -> Result<Bus> {
    match url.scheme() {
        "memory" => memory(url, config),
        "nats" => nats(url, config).await,
        "amqp" | "amqps" => rabbitmq(url, config).await,
        "kafka" => kafka(url, config).await,
        "sqs" => sqs(url, config).await,
        other => Err(Error::config(format!(
            "unknown URL scheme `{other}://`; known schemes: {}",
            KNOWN_SCHEMES
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The error for a scheme whose adapter's cargo feature is off.
#[cfg_attr(
    all(
        feature = "memory",
        feature = "nats",
        feature = "rabbitmq",
        feature = "kafka",
        feature = "sqs"
    ),
    allow(dead_code)
)]
pub(crate) fn feature_off(scheme: &str, feature: &str) -> Error {
    Error::config(format!(
        "`{scheme}://` URLs need the {feature} adapter, which is not compiled in: \
         enable the \"{feature}\" feature of bus (e.g. `bus = {{ version = \"…\", features = \
         [\"{feature}\"] }}`)"
    ))
}

#[cfg(feature = "memory")]
fn memory(url: &Url, config: &BusConfig) -> Result<Bus> {
    let memory_config = config.memory.clone().unwrap_or_default().apply_url(url)?;
    Ok(Bus::new(adapter_memory::MemoryBroker::with_config(
        memory_config,
    )))
}

#[cfg(not(feature = "memory"))]
fn memory(_url: &Url, _config: &BusConfig) -> Result<Bus> {
    Err(feature_off("memory", "memory"))
}

#[cfg(feature = "nats")]
async fn nats(url: &Url, config: &BusConfig) -> Result<Bus> {
    let nats_config = config.nats.clone().unwrap_or_default().apply_url(url)?;
    Ok(Bus::new(
        adapter_nats::NatsBroker::connect_with(nats_config).await?,
    ))
}

#[cfg(not(feature = "nats"))]
async fn nats(url: &Url, _config: &BusConfig) -> Result<Bus> {
    Err(feature_off(url.scheme(), "nats"))
}

#[cfg(feature = "rabbitmq")]
async fn rabbitmq(url: &Url, config: &BusConfig) -> Result<Bus> {
    let rabbitmq_config = config.rabbitmq.clone().unwrap_or_default().apply_url(url)?;
    Ok(Bus::new(
        adapter_rabbitmq::RabbitMqBroker::with_config(rabbitmq_config).await?,
    ))
}

#[cfg(not(feature = "rabbitmq"))]
async fn rabbitmq(url: &Url, _config: &BusConfig) -> Result<Bus> {
    Err(feature_off(url.scheme(), "rabbitmq"))
}

#[cfg(feature = "kafka")]
async fn kafka(url: &Url, config: &BusConfig) -> Result<Bus> {
    let kafka_config = config.kafka.clone().unwrap_or_default().apply_url(url)?;
    Ok(Bus::new(
        adapter_kafka::KafkaBroker::connect(kafka_config).await?,
    ))
}

#[cfg(not(feature = "kafka"))]
async fn kafka(url: &Url, _config: &BusConfig) -> Result<Bus> {
    Err(feature_off(url.scheme(), "kafka"))
}

#[cfg(feature = "sqs")]
async fn sqs(url: &Url, config: &BusConfig) -> Result<Bus> {
    let sqs_config = config.sqs.clone().unwrap_or_default().apply_url(url)?;
    Ok(Bus::new(
        adapter_sqs::SqsBroker::connect_with(sqs_config).await?,
    ))
}

#[cfg(not(feature = "sqs"))]
async fn sqs(url: &Url, _config: &BusConfig) -> Result<Bus> {
    Err(feature_off(url.scheme(), "sqs"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_core::ErrorKind;

    async fn connect_err(url: &str) -> Error {
        crate::connect(url)
            .await
            .expect_err("this URL must not connect")
    }

    #[tokio::test]
    async fn unknown_scheme_lists_the_known_ones() {
        let err = connect_err("mqtt://127.0.0.1:1883").await;
        assert_eq!(err.kind(), ErrorKind::Config);
        let text = err.to_string();
        assert!(text.contains("unknown URL scheme `mqtt://`"), "{text}");
        for scheme in KNOWN_SCHEMES {
            assert!(text.contains(&format!("{scheme}://")), "{text}");
        }
    }

    #[test]
    fn feature_off_error_names_the_feature() {
        let err = feature_off("kafka", "kafka");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(
            err.to_string()
                .contains(r#"enable the "kafka" feature of bus"#),
            "{err}"
        );
    }

    /// Checks that a scheme whose adapter's feature is off names the feature.
    #[cfg_attr(
        all(
            feature = "nats",
            feature = "rabbitmq",
            feature = "kafka",
            feature = "sqs"
        ),
        allow(dead_code)
    )]
    async fn check_feature_off(url: &str, feature: &str) {
        let err = connect_err(url).await;
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("enable the \"{feature}\" feature of bus")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn adapter_schemes_without_their_feature_name_it() {
        // With its feature on, a URL connects or fails as a connection would (the adapters'
        // own tests, and rabbitmq_query_params_are_checked below).
        #[cfg(not(feature = "nats"))]
        check_feature_off("nats://127.0.0.1:4222", "nats").await;
        #[cfg(not(feature = "rabbitmq"))]
        {
            check_feature_off("amqp://guest:guest@127.0.0.1:5672/%2f", "rabbitmq").await;
            check_feature_off("amqps://127.0.0.1:5671", "rabbitmq").await;
        }
        #[cfg(not(feature = "kafka"))]
        check_feature_off("kafka://127.0.0.1:9092", "kafka").await;
        #[cfg(not(feature = "sqs"))]
        check_feature_off("sqs://127.0.0.1:4566?region=us-east-1", "sqs").await;
    }

    #[cfg(feature = "rabbitmq")]
    #[tokio::test]
    async fn rabbitmq_query_params_are_checked() {
        let err = connect_err("amqp://guest:guest@127.0.0.1:5672/%2f?colour=blue").await;
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.to_string().contains("`colour`"), "{err}");
        // Nothing listens on port 1: a connection error, never a Config one, and no password.
        let err = connect_err("amqp://guest:hunter2@127.0.0.1:1/%2f?prefetch=5").await;
        assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
    }

    #[cfg(not(feature = "memory"))]
    #[tokio::test]
    async fn memory_scheme_without_its_feature_names_it() {
        let err = connect_err("memory://").await;
        assert!(
            err.to_string()
                .contains(r#"enable the "memory" feature of bus"#),
            "{err}"
        );
    }
}
