//! `bus check`: connect, round-trip one message on a private topic, show the capabilities.

use std::time::Duration;

use bus::secrets::redact_url;
use bus::{Bus, Capabilities, Envelope, SubscribeOptions, Support};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::failed;
use crate::cli::CheckArgs;
use crate::output::{print_json, table};

/// Runs `bus check`.
pub(crate) async fn run(bus: &Bus, url: &str, args: &CheckArgs, json: bool) -> Result<(), String> {
    let capabilities = bus.capabilities();
    let round_trip = round_trip(bus, args.timeout).await?;
    let rows = rows(&capabilities);
    if json {
        let capabilities: serde_json::Map<String, Value> = rows
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.clone()))
            .collect();
        print_json(&json!({
            "url": redact_url(url),
            "adapter": capabilities_name(bus),
            "round_trip_ms": round_trip.as_secs_f64() * 1e3,
            "capabilities": capabilities,
        }));
    } else {
        println!(
            "connected to {} ({})",
            redact_url(url),
            capabilities_name(bus)
        );
        println!(
            "round trip on a private topic: ok in {:.1} ms",
            round_trip.as_secs_f64() * 1e3
        );
        let mut shown = table(&["capability", "value"]);
        for (name, value) in &rows {
            let value = match value {
                Value::String(text) => text.clone(),
                Value::Null => "no limit known".to_owned(),
                other => other.to_string(),
            };
            shown.add_row(vec![(*name).to_owned(), value]);
        }
        println!("{shown}");
    }
    Ok(())
}

fn capabilities_name(bus: &Bus) -> &'static str {
    bus.capabilities().name
}

/// Publishes one message to a topic of its own and waits for it in a private group.
async fn round_trip(bus: &Bus, timeout: Duration) -> Result<Duration, String> {
    let topic = format!("bus-check.{}", uuid::Uuid::now_v7().simple());
    let started = Instant::now();
    let deadline = started + timeout;
    let mut subscription = bus
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .map_err(|e| failed(&format!("subscribing to `{topic}`"), e))?;
    let ping = Envelope::new("bus.check", "ping");
    let id = ping.id.clone();
    let published = bus.publish(&topic, ping).await;
    let outcome = match published {
        Err(e) => Err(failed(&format!("publishing to `{topic}`"), e)),
        Ok(()) => loop {
            match tokio::time::timeout_at(deadline, subscription.next()).await {
                Err(_) => {
                    break Err(format!(
                        "the message published to `{topic}` did not come back within {}",
                        humantime::format_duration(timeout)
                    ))
                }
                Ok(None) => break Err(format!("the subscription to `{topic}` closed")),
                Ok(Some(Err(e))) => break Err(failed(&format!("receiving from `{topic}`"), e)),
                Ok(Some(Ok(delivery))) => {
                    let ours = delivery.envelope().id == id;
                    delivery
                        .ack()
                        .await
                        .map_err(|e| failed("acknowledging", e.error()))?;
                    if ours {
                        break Ok(started.elapsed());
                    }
                }
            }
        },
    };
    let _ = subscription.close().await;
    outcome
}

/// Every capability as a JSON value: `Support` as `native`, `emulated` or `unsupported
/// (reason)`, flags as booleans, limits as numbers (null when none is known).
fn rows(c: &Capabilities) -> Vec<(&'static str, Value)> {
    let support = |s: Support| json!(s.to_string());
    vec![
        ("name", json!(c.name)),
        ("durable", json!(c.durable)),
        ("consumer_groups", json!(c.consumer_groups)),
        ("per_key_order", json!(c.per_key_order)),
        (
            "per_key_order_across_members",
            json!(c.per_key_order_across_members),
        ),
        (
            "key_order_across_retries",
            support(c.key_order_across_retries),
        ),
        ("request_reply", support(c.request_reply)),
        ("no_responders_detection", json!(c.no_responders_detection)),
        ("delayed_redelivery", support(c.delayed_redelivery)),
        ("dead_letter", support(c.dead_letter)),
        (
            "prompt_redelivery_of_dropped",
            json!(c.prompt_redelivery_of_dropped),
        ),
        ("delivery_count", support(c.delivery_count)),
        ("delayed_publish", support(c.delayed_publish)),
        (
            "max_delay",
            json!(c
                .max_delay
                .map(|d| humantime::format_duration(d).to_string())),
        ),
        ("backlog", support(c.backlog)),
        ("max_payload_bytes", json!(c.max_payload_bytes)),
        ("max_headers", json!(c.max_headers)),
    ]
}
