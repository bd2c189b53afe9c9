//! Dead letters: stored in the `<source>.dlq` queue, cut until the server accepts them.

use async_nats::HeaderMap;
use bus_core::middleware::dead_letter;
use bus_core::{headers, Envelope, MessageId, Result};
use bytes::Bytes;

use crate::broker::{Inner, Kind, MAX_STORED_HEADER_LEN};
use crate::wire;

/// An attribute over this many bytes is shortened to it first; a protected header value over
/// it is shortened to it as a last resort.
const MAX_ATTRIBUTE_LEN: usize = 1024;
/// What everything is shortened to when even that does not fit (a tiny `max_payload`).
const LAST_RESORT_LEN: usize = 64;
/// The `bus-truncated` note names dropped headers up to about this length, then counts them.
const MAX_NOTE_LEN: usize = 4096;
/// Room kept for the note's `payload:` item when the payload is cut.
const PAYLOAD_NOTE_ROOM: usize = 96;

/// Sends the dead letter of `envelope` to the queue named by `headers::dead_letter_queue`.
///
/// Never refused for its content (a message that can be neither handled nor dead-lettered
/// would come back for ever): attributes NATS cannot carry are written as it can
/// (`wire::encode_lossy`), and a dead letter over the server's `max_payload` or with more
/// headers than JetStream stores is cut until it fits ([`fit`]). `msg_id` becomes its
/// `Nats-Msg-Id`: JetStream drops a second copy stored within its duplicate window.
pub(crate) async fn send(
    inner: &Inner,
    envelope: &Envelope,
    source: &str,
    group: Option<&str>,
    attempts: u32,
    reason: &str,
    msg_id: Option<&str>,
) -> Result<()> {
    let dead = dead_letter::mark(
        envelope.clone(),
        &dead_letter::DeadLetterInfo {
            reason: &headers::shorten(reason, 4096),
            source,
            group,
            attempts,
            first_failure: None,
        },
    );
    let (map, payload) = fit(dead, &inner.config.source, inner.max_payload(), msg_id);
    inner
        .publish_encoded(
            Kind::Queue,
            &headers::dead_letter_queue(source),
            map,
            payload,
        )
        .await
}

/// The headers a dead letter keeps whatever it costs: those `dead_letter::mark` writes, the
/// trace context, and the notes that say how to read the rest. Shortened only as a last
/// resort.
fn protected(name: &str) -> bool {
    headers::KEPT_WHEN_CUT.contains(&name) || name == headers::TRUNCATED
}

/// What was cut, as `headers::TRUNCATED` lists it: after the items of a note the message
/// already carried, `header:<name>` for each dropped header while the note stays under
/// [`MAX_NOTE_LEN`], then `headers-unlisted:<count>` for the rest.
#[derive(Debug, Default)]
struct Note {
    items: Vec<String>,
    len: usize,
    unlisted: usize,
}

impl Note {
    fn push(&mut self, item: String) {
        self.len += item.len() + 1;
        self.items.push(item);
    }

    fn dropped(&mut self, name: &str) {
        // `%` and `,` escaped as in `bus-binary-headers`, so that any name can be listed.
        let item = format!("header:{}", name.replace('%', "%25").replace(',', "%2C"));
        if self.len + item.len() < MAX_NOTE_LEN {
            self.push(item);
        } else {
            self.unlisted += 1;
        }
    }

    fn text(&self) -> Option<String> {
        let mut items = self.items.clone();
        if self.unlisted > 0 {
            items.push(format!("headers-unlisted:{}", self.unlisted));
        }
        (!items.is_empty()).then(|| items.join(","))
    }
}

/// Encodes a dead letter within `max` bytes (0: no limit) and the 64 KiB of headers JetStream
/// stores, `msg_id` (its `Nats-Msg-Id`) included. What does not fit is cut, in this order:
/// attributes over 1 KiB are shortened; the largest droppable headers are left out; protected
/// header values over 1 KiB are shortened; then, for a tiny `max_payload`, everything down to
/// 64 bytes; and last the end of the payload. `headers::TRUNCATED` lists what was cut.
pub(crate) fn fit(
    mut dead: Envelope,
    source: &str,
    max: usize,
    msg_id: Option<&str>,
) -> (HeaderMap, Bytes) {
    let max = if max == 0 { usize::MAX } else { max };
    let header_budget = MAX_STORED_HEADER_LEN.min(max);
    let mut note = Note::default();
    // A copy of a copy keeps the note of what earlier copies cut.
    if let Some(earlier) = dead.headers.remove(headers::TRUNCATED) {
        note.push(headers::shorten(&earlier, MAX_NOTE_LEN).into_owned());
    }
    let mut source = source.to_owned();
    let mut stage = 0;
    // Each round cuts something or moves to the next stage; the bound is a safety net.
    for _ in 0..64 {
        let map = encode(&dead, &source, &note, msg_id);
        let header_len = wire::header_len(&map);
        if header_len <= header_budget {
            let room = max - header_len;
            if dead.payload.len() <= room {
                return (map, dead.payload);
            }
            let keep = room.saturating_sub(PAYLOAD_NOTE_ROOM);
            note.push(format!("payload:{}->{keep}", dead.payload.len()));
            dead.payload = dead.payload.slice(..keep);
            continue;
        }
        let over = header_len - header_budget;
        match stage {
            0 => {
                shorten_attributes(&mut dead, &mut note, MAX_ATTRIBUTE_LEN);
                stage = 1;
            }
            1 => {
                if !drop_largest(&mut dead, &mut note, over) {
                    stage = 2;
                }
            }
            2 => {
                shorten_protected(&mut dead, &mut note, MAX_ATTRIBUTE_LEN);
                stage = 3;
            }
            _ => {
                shorten_attributes(&mut dead, &mut note, LAST_RESORT_LEN);
                shorten_protected(&mut dead, &mut note, LAST_RESORT_LEN);
                source = headers::shorten(&source, LAST_RESORT_LEN).into_owned();
                note.items = vec![headers::shorten(&note.items.join(","), 256).into_owned()];
                note.unlisted = 0;
            }
        }
    }
    // Only with a `max_payload` too small for the dead-letter headers themselves.
    let map = encode(&dead, &source, &note, msg_id);
    dead.payload = Bytes::new();
    (map, dead.payload)
}

fn encode(dead: &Envelope, source: &str, note: &Note, msg_id: Option<&str>) -> HeaderMap {
    let mut dead = dead.clone();
    if let Some(text) = note.text() {
        dead.headers.insert(headers::TRUNCATED.to_owned(), text);
    }
    let mut map = wire::encode_lossy(&dead, source);
    if let Some(id) = msg_id {
        map.insert(wire::NATS_MSG_ID, id);
    }
    map
}

/// Shortens the attributes over `max` bytes, noting each.
fn shorten_attributes(dead: &mut Envelope, note: &mut Note, max: usize) {
    let mut cut = |value: &str, item: &str| -> Option<String> {
        (value.len() > max).then(|| {
            note.push(item.to_owned());
            headers::shorten(value, max).into_owned()
        })
    };
    if let Some(id) = cut(dead.id.as_str(), "id") {
        dead.id = MessageId::from(id);
    }
    if let Some(kind) = cut(&dead.kind, "kind") {
        dead.kind = kind;
    }
    if let Some(key) = dead.key.as_deref().and_then(|k| cut(k, "key")) {
        dead.key = Some(key);
    }
    let item = format!("value:{}", wire::CE_CORRELATIONID);
    if let Some(id) = cut(dead.correlation_id.as_str(), &item) {
        dead.correlation_id = MessageId::from(id);
    }
    let item = format!("value:{}", wire::CE_CAUSATIONID);
    if let Some(id) = dead
        .causation_id
        .as_ref()
        .and_then(|c| cut(c.as_str(), &item))
    {
        dead.causation_id = Some(MessageId::from(id));
    }
    let item = format!("value:{}", wire::CONTENT_TYPE);
    if let Some(content_type) = dead.content_type.as_deref().and_then(|c| cut(c, &item)) {
        dead.content_type = Some(content_type);
    }
}

/// Shortens protected header values over `max` bytes, noting each.
fn shorten_protected(dead: &mut Envelope, note: &mut Note, max: usize) {
    for (name, value) in &mut dead.headers {
        if protected(name) && value.len() > max {
            *value = headers::shorten(value, max).into_owned();
            note.push(format!("value:{name}"));
        }
    }
}

/// Drops the largest droppable headers until about `over` bytes are gone; `false` when none
/// is left to drop.
fn drop_largest(dead: &mut Envelope, note: &mut Note, over: usize) -> bool {
    let mut droppable: Vec<(String, usize)> = dead
        .headers
        .iter()
        .filter(|(name, _)| !protected(name))
        .map(|(name, value)| (name.clone(), wire::user_header_len(name, value)))
        .collect();
    if droppable.is_empty() {
        return false;
    }
    droppable.sort_by_key(|(_, len)| std::cmp::Reverse(*len));
    let mut left = over;
    for (name, len) in droppable {
        if left == 0 {
            break;
        }
        dead.headers.remove(&name);
        note.dropped(&name);
        // The note grows with each name it lists.
        left = left.saturating_sub(len.saturating_sub(name.len() + 8));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_core::conformance::arbitrary;
    use proptest::prelude::*;

    fn marked(envelope: Envelope) -> Envelope {
        dead_letter::mark(
            envelope,
            &dead_letter::DeadLetterInfo {
                reason: "why",
                source: "orders",
                group: Some("billing"),
                attempts: 3,
                first_failure: None,
            },
        )
    }

    const MSG_ID: &str = "bus-poison:a-stream-name:a-consumer-name:18446744073709551615";

    /// What a dead letter carries, read back.
    fn read(map: &HeaderMap, payload: Bytes) -> Envelope {
        wire::decode(
            Some(map),
            None,
            payload,
            wire::Defaults {
                stored: None,
                kind: "orders",
                time: None,
            },
        )
        .envelope
    }

    #[test]
    fn property_dead_letters_always_fit() {
        let big = |n: usize| "v".repeat(n);
        let name = prop_oneof![
            Just("bus-dlq-x".to_owned()),
            Just("bus-dlq-reason".to_owned()),
            Just("bus-dlq-original-topic".to_owned()),
            Just("bus-nats-original-ce-type".to_owned()),
            Just(headers::TRACEPARENT.to_owned()),
            Just(headers::TRACESTATE.to_owned()),
            Just(headers::RAW_TIME.to_owned()),
            Just(headers::BINARY_HEADERS.to_owned()),
            Just(headers::TRUNCATED.to_owned()),
            "x-[a-z]{1,8}",
        ];
        let extra = proptest::collection::vec((name, 0usize..70_000), 0..6);
        let attributes = proptest::collection::vec(0usize..70_000, 3);
        let max = prop_oneof![Just(1_048_576usize), 8_192usize..200_000];
        arbitrary::check(
            "nats dead letters always fit",
            64,
            (arbitrary::envelope(), extra, attributes, max),
            |(mut envelope, extra, attributes, max)| {
                for (name, len) in extra {
                    envelope.headers.insert(name, big(len));
                }
                if attributes[0] > 1024 {
                    envelope.id = MessageId::from(big(attributes[0]));
                }
                if attributes[1] > 1024 {
                    envelope.kind = format!(" {}\n", big(attributes[1]));
                }
                if attributes[2] > 1024 {
                    envelope.key = Some(big(attributes[2]));
                }
                let traceparent = envelope.headers.get(headers::TRACEPARENT).cloned();
                let (map, payload) = fit(marked(envelope), "test", max, Some(MSG_ID));
                let header_len = wire::header_len(&map);
                prop_assert!(header_len <= MAX_STORED_HEADER_LEN, "{header_len}");
                prop_assert!(header_len + payload.len() <= max);
                prop_assert_eq!(
                    map.get(wire::NATS_MSG_ID).map(|v| v.as_str().to_owned()),
                    Some(MSG_ID.to_owned())
                );
                let got = read(&map, payload);
                prop_assert_eq!(got.header(headers::DLQ_REASON), Some("why"));
                prop_assert_eq!(got.header(headers::DLQ_ATTEMPTS), Some("3"));
                let roomy = max >= MAX_STORED_HEADER_LEN;
                if let Some(traceparent) = traceparent.filter(|t| roomy && t.len() <= 1024) {
                    prop_assert_eq!(got.header(headers::TRACEPARENT), Some(traceparent.as_str()));
                }
                Ok(())
            },
        );
    }

    #[test]
    fn cuts_are_noted_in_bus_truncated_in_order() {
        let mut envelope = Envelope::new("k".repeat(2000), vec![b'p'; 990_000])
            .with_header("x-small", "1")
            .with_header("x-big", "b".repeat(30_000))
            .with_header("bus-dlq-foreign", "f".repeat(50_000))
            .with_header(headers::TRACEPARENT, "00-abc-def-01")
            .with_header(headers::RAW_TIME, "r".repeat(2000));
        envelope
            .headers
            .insert(headers::TRUNCATED.into(), "id".into());
        let (map, payload) = fit(marked(envelope), "test", 1_000_000, Some(MSG_ID));
        let got = read(&map, payload.clone());
        let note = got.header(headers::TRUNCATED).expect("a note");
        let items: Vec<&str> = note.split(',').collect();
        // The earlier note first, then the attribute, the largest headers, the payload.
        assert_eq!(items[0], "id");
        assert_eq!(items[1], "kind");
        // A foreign header that merely starts with `bus-dlq-` is droppable.
        assert_eq!(items[2], "header:bus-dlq-foreign");
        assert!(
            items.last().unwrap().starts_with("payload:990000->"),
            "{note}"
        );
        assert_eq!(items.len(), 4, "{note}");
        assert_eq!(got.header("x-small"), Some("1"), "small headers stay");
        assert_eq!(got.header("x-big").map(str::len), Some(30_000));
        assert_eq!(got.header(headers::TRACEPARENT), Some("00-abc-def-01"));
        assert_eq!(got.header(headers::RAW_TIME).map(str::len), Some(2000));
        assert!(got.kind.len() < 1100);
        assert!(wire::header_len(&map) + payload.len() <= 1_000_000);
    }

    #[test]
    fn many_dropped_headers_are_counted_past_the_note_limit() {
        let mut envelope = Envelope::new("k", "");
        for i in 0..6000 {
            envelope
                .headers
                .insert(format!("x-h-{i:05}"), "0123456789".into());
        }
        let (map, _) = fit(marked(envelope), "test", 0, None);
        assert!(wire::header_len(&map) <= MAX_STORED_HEADER_LEN);
        let got = read(&map, Bytes::new());
        let note = got.header(headers::TRUNCATED).expect("a note");
        assert!(note.len() <= MAX_NOTE_LEN + 32, "{}", note.len());
        assert!(note.contains("headers-unlisted:"), "{note}");
    }
}
