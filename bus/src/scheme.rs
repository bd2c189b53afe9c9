//! From a parsed URL to an adapter: one function per scheme, each behind its cargo feature.

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

/// The error for an adapter that is compiled in but not built yet: it only exports its status.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn not_built(scheme: &str, adapter: &str, tracking_issue: u32) -> Error {
    Error::config(format!(
        "`{scheme}://` URLs need the {adapter} adapter, which is not built yet \
         (tracking issue #{tracking_issue}); use `memory://` meanwhile"
    ))
}

#[cfg(feature = "memory")]
fn memory(url: &Url, config: &BusConfig) -> Result<Bus> {
    let base = config.memory.clone().unwrap_or_default();
    let memory_config = crate::config::memory_from_url(url, base)?;
    Ok(Bus::new(adapter_memory::MemoryBroker::with_config(
        memory_config,
    )))
}

#[cfg(not(feature = "memory"))]
fn memory(_url: &Url, _config: &BusConfig) -> Result<Bus> {
    Err(feature_off("memory", "memory"))
}

// Each adapter below exports only `IMPLEMENTED` and `TRACKING_ISSUE` until its issue lands;
// that issue replaces the body with the adapter's constructor (and adds its `BusConfig`
// section). Flipping `IMPLEMENTED` without doing so stops the build here, rather than leaving
// `bus::connect` refusing an adapter that works.

#[cfg(feature = "nats")]
async fn nats(url: &Url, config: &BusConfig) -> Result<Bus> {
    let base = config.nats.clone().unwrap_or_default();
    let nats_config = base.apply_url(url)?;
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
    let base = config.rabbitmq.clone().unwrap_or_default();
    let rabbitmq_config = crate::config::rabbitmq_from_url(url, base)?;
    let broker = adapter_rabbitmq::RabbitMqBroker::with_config(rabbitmq_config).await?;
    Ok(Bus::new(broker))
}

#[cfg(not(feature = "rabbitmq"))]
async fn rabbitmq(url: &Url, _config: &BusConfig) -> Result<Bus> {
    Err(feature_off(url.scheme(), "rabbitmq"))
}

#[cfg(feature = "kafka")]
async fn kafka(url: &Url, config: &BusConfig) -> Result<Bus> {
    let base = config.kafka.clone().unwrap_or_default();
    let kafka_config = base.merge_url(url.as_str())?;
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
    let base = config.sqs.clone().unwrap_or_default();
    let sqs_config = base.apply_url(url)?;
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

    #[test]
    fn not_built_error_names_the_issue() {
        let err = not_built("nats", "NATS", 4);
        assert_eq!(err.kind(), ErrorKind::Config);
        let text = err.to_string();
        assert!(text.contains("not built yet"), "{text}");
        assert!(text.contains("#4"), "{text}");
    }

    /// Checks each adapter scheme answers as its feature and status say.
    #[cfg_attr(
        all(
            feature = "nats",
            feature = "rabbitmq",
            feature = "kafka",
            feature = "sqs"
        ),
        allow(dead_code)
    )]
    async fn check_adapter(url: &str, feature: &str, compiled_in: bool, issue: Option<u32>) {
        let err = connect_err(url).await;
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        let text = err.to_string();
        if compiled_in {
            let issue = issue.expect("a compiled-in adapter has a tracking issue");
            assert!(text.contains("not built yet"), "{text}");
            assert!(text.contains(&format!("#{issue}")), "{text}");
        } else {
            assert!(
                text.contains(&format!("enable the \"{feature}\" feature of bus")),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn adapter_schemes_answer_by_feature_and_status() {
        // NATS is built: with its feature on, a URL connects (or fails as a connection would).
        #[cfg(not(feature = "nats"))]
        check_adapter("nats://127.0.0.1:4222", "nats", false, None).await;

        // RabbitMQ is built: with its feature on, a URL either connects or fails as a
        // connection would (rabbitmq_query_params_are_checked covers that side).
        #[cfg(not(feature = "rabbitmq"))]
        {
            check_adapter(
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "rabbitmq",
                false,
                None,
            )
            .await;
            check_adapter("amqps://127.0.0.1:5671", "rabbitmq", false, None).await;
        }

        // Kafka is built: with its feature on, a URL connects or fails as a connection would.
        #[cfg(not(feature = "kafka"))]
        check_adapter("kafka://127.0.0.1:9092", "kafka", false, None).await;

        // SQS is built: with its feature on, a URL connects (or fails as a connection would).
        #[cfg(not(feature = "sqs"))]
        check_adapter("sqs://127.0.0.1:4566?region=us-east-1", "sqs", false, None).await;
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
