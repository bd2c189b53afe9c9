//! How messages, tables and progress are shown: pretty for people, JSON for scripts.

use std::time::Duration;

use base64::Engine as _;
use bus::headers::format_time;
use bus::{Delivery, Envelope};
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};

/// `envelope` as a JSON object: every field, the payload as text when it is UTF-8 (`payload`)
/// and base64 otherwise (`payload_base64`).
pub(crate) fn envelope_json(envelope: &Envelope) -> Value {
    let mut object = Map::new();
    object.insert("id".into(), json!(envelope.id.as_str()));
    object.insert("kind".into(), json!(envelope.kind));
    object.insert(
        "correlation_id".into(),
        json!(envelope.correlation_id.as_str()),
    );
    object.insert(
        "causation_id".into(),
        json!(envelope.causation_id.as_ref().map(|id| id.as_str())),
    );
    object.insert("timestamp".into(), json!(format_time(envelope.timestamp)));
    object.insert("key".into(), json!(envelope.key));
    object.insert("content_type".into(), json!(envelope.content_type));
    object.insert("headers".into(), json!(envelope.headers));
    match std::str::from_utf8(&envelope.payload) {
        Ok(text) => object.insert("payload".into(), json!(text)),
        Err(_) => object.insert(
            "payload_base64".into(),
            json!(base64::engine::general_purpose::STANDARD.encode(&envelope.payload)),
        ),
    };
    Value::Object(object)
}

/// A delivery as JSON: its envelope's fields plus `source` and `attempt`.
pub(crate) fn delivery_json(delivery: &Delivery) -> Value {
    let mut value = envelope_json(delivery.envelope());
    if let Value::Object(object) = &mut value {
        object.insert("source".into(), json!(delivery.source()));
        object.insert("attempt".into(), json!(delivery.attempt()));
    }
    value
}

/// A message for people: a heading line (time, kind, id), then its other fields, headers and
/// payload, indented.
pub(crate) fn envelope_pretty(envelope: &Envelope) -> String {
    let mut text = format!(
        "{}  {}  {}\n",
        format_time(envelope.timestamp),
        envelope.kind,
        envelope.id
    );
    let mut field = |name: &str, value: &str| text.push_str(&format!("  {name}: {value}\n"));
    field("correlation", envelope.correlation_id.as_str());
    if let Some(causation) = &envelope.causation_id {
        field("causation", causation.as_str());
    }
    if let Some(key) = &envelope.key {
        field("key", key);
    }
    if let Some(content_type) = &envelope.content_type {
        field("content-type", content_type);
    }
    for (name, value) in &envelope.headers {
        field(&format!("header {name}"), value);
    }
    match std::str::from_utf8(&envelope.payload) {
        Ok(payload) => text.push_str(&format!("  payload: {payload}\n")),
        Err(_) => text.push_str(&format!(
            "  payload: {} bytes, not UTF-8 (base64) {}\n",
            envelope.payload.len(),
            base64::engine::general_purpose::STANDARD.encode(&envelope.payload)
        )),
    }
    text
}

/// A table with a header row, sized to the terminal.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    table
}

/// A progress bar of `len` steps on standard error, hidden when that is not a terminal (and
/// always with `--json`, so scripts see only their JSON).
pub(crate) fn progress(len: u64, what: &str, json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Prints `value` as one line of JSON.
pub(crate) fn print_json(value: &Value) {
    println!("{value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_payloads_are_base64_and_text_stays_text() {
        let text = envelope_json(&Envelope::new("k", "héllo").with_key("k1"));
        assert_eq!(text["payload"], "héllo");
        assert_eq!(text["key"], "k1");
        let binary = envelope_json(&Envelope::new("k", vec![0xff_u8, 0x00]));
        assert_eq!(binary["payload_base64"], "/wA=");
        assert!(binary.get("payload").is_none());
        assert!(envelope_pretty(&Envelope::new("k", vec![0xff_u8])).contains("not UTF-8"));
    }
}
