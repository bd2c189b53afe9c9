//! Dead letters cut to fit in a Kafka record.
//!
//! A dead letter is the received envelope plus the `bus-dlq-*` headers. A record the broker
//! accepted can be too large to produce again (the producer's `message.max.bytes` is lower
//! than the broker's limit, or the dead-letter headers tip it over), and a message that can
//! be neither handled nor dead-lettered would come back for ever. So the dead letter is cut
//! until it fits, in the order every adapter cuts (docs/ARCHITECTURE.md §12): attributes over
//! 1 KiB shortened, then the largest droppable headers dropped, then the payload cut, and as a
//! last resort even the protected values shortened. [`headers::TRUNCATED`] lists what was cut.

use bus_core::{headers, Envelope, MessageId};

use crate::wire;

/// Attributes (and, as a last resort, protected values) longer than this are shortened to it.
const ATTRIBUTE_MAX: usize = 1024;
/// What protected values and attributes are shortened to when nothing else is left to cut.
const LAST_RESORT_MAX: usize = 128;
/// Dropped headers named in the note; the rest are counted (`header:+N more`).
const NAMES_LISTED: usize = 50;
/// How much of each dropped header's name the note shows.
const NAME_SHOWN: usize = 64;
/// Room kept for the note itself (at most [`NAMES_LISTED`] names of [`NAME_SHOWN`] bytes and
/// a few short items).
const NOTE_ROOM: usize = 6 * 1024;
/// A record's own framing (batch header, offsets, lengths), with room to spare.
const RECORD_OVERHEAD: usize = 512;
/// What a header costs besides its name and value (two varint lengths), with room to spare.
const HEADER_OVERHEAD: usize = 10;

/// The smallest budget [`dead_letter`] cuts to: whatever it is given, the result fits in this
/// (unless the connection's `client_id`, which every record carries in `ce_source`, is
/// kilobytes long).
pub(crate) const MIN_BUDGET: usize = 16 * 1024;

/// Headers never dropped, only shortened as a last resort: those
/// [`mark`](bus_core::middleware::dead_letter::mark) writes, the trace context, and those
/// that say how to read the rest. A foreign header that merely starts with `bus-dlq-` can go.
const PROTECTED: [&str; 10] = headers::KEPT_WHEN_CUT;

/// What `envelope` takes in a record produced by [`wire::encode`] with CloudEvents source
/// `source`, as librdkafka counts it against `message.max.bytes` (key, value, each header's
/// name and value), over-estimated a little.
pub(crate) fn record_size(envelope: &Envelope, source: &str) -> usize {
    let attribute = |name: &str, value: &str| name.len() + value.len() + HEADER_OVERHEAD;
    let optional = |name: &str, value: Option<&str>| value.map_or(0, |v| attribute(name, v));
    RECORD_OVERHEAD
        + envelope.payload.len()
        + envelope.key.as_ref().map_or(0, String::len)
        + attribute(wire::CE_SPECVERSION, "1.0")
        + attribute(wire::CE_ID, envelope.id.as_str())
        + attribute(wire::CE_TYPE, &envelope.kind)
        + attribute(wire::CE_SOURCE, source)
        + attribute(wire::CE_TIME, "9999-12-31T23:59:59.999Z")
        + attribute(wire::CE_CORRELATIONID, envelope.correlation_id.as_str())
        + optional(
            wire::CE_CAUSATIONID,
            envelope.causation_id.as_ref().map(MessageId::as_str),
        )
        + optional(wire::CONTENT_TYPE, envelope.content_type.as_deref())
        + envelope
            .headers
            .iter()
            .map(|(name, value)| header_size(name, value))
            .sum::<usize>()
}

fn header_size(name: &str, value: &str) -> usize {
    let escape = if wire::is_reserved(name) {
        wire::ESCAPED.len()
    } else {
        0
    };
    escape + name.len() + value.len() + HEADER_OVERHEAD
}

/// `dead` as it is if it fits in `budget` bytes ([`record_size`]), else a copy cut to fit (in
/// at least [`MIN_BUDGET`]) with [`headers::TRUNCATED`] saying what was cut and, as
/// `original:<origin>`, where the original record is (`<topic>/<partition>@<offset>`).
pub(crate) fn dead_letter(dead: &Envelope, budget: usize, source: &str, origin: &str) -> Envelope {
    if record_size(dead, source) <= budget {
        return dead.clone();
    }
    let budget = budget.max(MIN_BUDGET) - NOTE_ROOM;
    let mut cut = dead.clone();
    // An earlier cut's note, if the message carried one, gives way to this one.
    cut.headers.remove(headers::TRUNCATED);
    let mut note = Note::default();
    shorten_attributes(&mut cut, ATTRIBUTE_MAX, &mut note);
    let mut size = record_size(&cut, source);

    if size > budget {
        let mut droppable: Vec<(usize, String)> = cut
            .headers
            .iter()
            .filter(|(name, _)| !PROTECTED.contains(&name.as_str()))
            .map(|(name, value)| (header_size(name, value), name.clone()))
            .collect();
        // The largest first; of equal sizes the last name first, so the order is fixed.
        droppable.sort_unstable_by(|a, b| b.cmp(a));
        for (cost, name) in droppable {
            if size <= budget {
                break;
            }
            cut.headers.remove(&name);
            size -= cost;
            note.dropped.push(name);
        }
        unlist_dropped_binary_headers(&mut cut);
        size = record_size(&cut, source);
    }

    if size > budget {
        let before = cut.payload.len();
        let after = before.saturating_sub(size - budget);
        cut.payload = cut.payload.slice(..after);
        note.payload = Some((before, after));
        size = record_size(&cut, source);
    }

    for max in [ATTRIBUTE_MAX, LAST_RESORT_MAX] {
        if size <= budget {
            break;
        }
        shorten_attributes(&mut cut, max, &mut note);
        for name in PROTECTED {
            if let Some(value) = cut.headers.get_mut(name) {
                if value.len() > max {
                    *value = headers::shorten(value, max).into_owned();
                    note.item(format!("value:{name}"));
                }
            }
        }
        size = record_size(&cut, source);
    }

    cut.headers
        .insert(headers::TRUNCATED.to_owned(), note.render(origin));
    cut
}

/// Shortens the envelope's attributes longer than `max` bytes.
fn shorten_attributes(envelope: &mut Envelope, max: usize, note: &mut Note) {
    let mut shorten = |text: &mut String, item: &str| {
        if text.len() > max {
            *text = headers::shorten(text, max).into_owned();
            note.item(item.to_owned());
        }
    };
    let mut id = envelope.id.as_str().to_owned();
    shorten(&mut id, "id");
    envelope.id = MessageId::from(id);
    shorten(&mut envelope.kind, "kind");
    if let Some(key) = &mut envelope.key {
        shorten(key, "key");
    }
    let mut correlation = envelope.correlation_id.as_str().to_owned();
    shorten(&mut correlation, "value:ce_correlationid");
    envelope.correlation_id = MessageId::from(correlation);
    if let Some(causation) = &envelope.causation_id {
        let mut causation = causation.as_str().to_owned();
        shorten(&mut causation, "value:ce_causationid");
        envelope.causation_id = Some(MessageId::from(causation));
    }
    if let Some(content_type) = &mut envelope.content_type {
        shorten(content_type, "value:content-type");
    }
}

/// Removes from [`headers::BINARY_HEADERS`] the names of headers no longer there, so that the
/// list stays as short as what is left.
fn unlist_dropped_binary_headers(envelope: &mut Envelope) {
    let listed = headers::binary_header_names(&envelope.headers);
    if listed
        .iter()
        .all(|name| envelope.headers.contains_key(name))
    {
        return;
    }
    let kept: Vec<String> = listed
        .iter()
        .filter(|name| envelope.headers.contains_key(*name))
        .map(|name| escape(name))
        .collect();
    if kept.is_empty() {
        envelope.headers.remove(headers::BINARY_HEADERS);
    } else {
        envelope
            .headers
            .insert(headers::BINARY_HEADERS.to_owned(), kept.join(","));
    }
}

/// A name as the comma-separated lists of `bus` headers carry it (as
/// [`headers::insert_bytes`] escapes it).
fn escape(name: &str) -> String {
    name.replace('%', "%25").replace(',', "%2C")
}

/// What was cut, for [`headers::TRUNCATED`].
#[derive(Debug, Default)]
struct Note {
    /// `id`, `kind`, `key`, `value:<name>`, in the order they were cut.
    items: Vec<String>,
    /// The dropped headers, largest first.
    dropped: Vec<String>,
    /// The payload's length before and after.
    payload: Option<(usize, usize)>,
}

impl Note {
    fn item(&mut self, item: String) {
        if !self.items.contains(&item) {
            self.items.push(item);
        }
    }

    fn render(&self, origin: &str) -> String {
        let mut list = self.items.clone();
        list.extend(
            self.dropped
                .iter()
                .take(NAMES_LISTED)
                .map(|name| format!("header:{}", headers::shorten(&escape(name), NAME_SHOWN))),
        );
        if self.dropped.len() > NAMES_LISTED {
            list.push(format!(
                "header:+{} more",
                self.dropped.len() - NAMES_LISTED
            ));
        }
        if let Some((before, after)) = self.payload {
            list.push(format!("payload:{before}->{after}"));
        }
        list.push(format!("original:{}", headers::shorten(origin, 320)));
        list.join(",")
    }
}

#[cfg(test)]
mod tests {
    use bus_core::conformance::arbitrary;
    use bus_core::middleware::dead_letter::{mark, DeadLetterInfo};
    use proptest::prelude::*;
    use rdkafka::message::Headers as _;

    use super::*;

    const SOURCE: &str = "bus://test";

    fn marked(envelope: Envelope, reason: &str) -> Envelope {
        mark(
            envelope,
            &DeadLetterInfo {
                reason,
                source: "orders",
                group: Some("billing"),
                attempts: 3,
                first_failure: Some(std::time::SystemTime::now()),
            },
        )
    }

    /// The bytes librdkafka counts for the record [`wire::encode`] makes of `envelope`.
    fn encoded_size(envelope: &Envelope) -> usize {
        let hs = wire::encode(envelope, SOURCE, &[]);
        let header_bytes: usize = (0..hs.count())
            .map(|i| {
                let h = hs.get(i);
                h.key.len() + h.value.map_or(0, <[u8]>::len)
            })
            .sum();
        header_bytes + envelope.payload.len() + wire::record_key(envelope).map_or(0, |k| k.len())
    }

    fn items(note: &str) -> Vec<&str> {
        note.split(',').collect()
    }

    #[test]
    fn a_dead_letter_that_fits_is_left_as_it_is() {
        let dead = marked(Envelope::new("k", "x").with_header("a", "b"), "boom");
        assert_eq!(dead_letter(&dead, 1_000_000, SOURCE, "t/0@5"), dead);
    }

    /// Before the fix the note was `bus-dlq-shrunk`, every application header went (a foreign
    /// `bus-dlq-…` header stayed), and the reason could keep the dead letter over the limit.
    #[test]
    fn the_largest_headers_go_first_and_the_note_lists_them() {
        let mut dead = Envelope::new("k", vec![7u8; 10_000])
            .with_header(headers::TRACEPARENT, "00-a-b-01")
            .with_header(headers::TRACESTATE, "v=1")
            .with_header(headers::RAW_TIME, "yesterday")
            .with_header("bus-dlq-from-elsewhere", "x".repeat(5000))
            .with_header("small, but odd%", "s");
        headers::insert_bytes(&mut dead.headers, b"blob", &[0xff; 3000]);
        headers::insert_bytes(&mut dead.headers, b"bin", &[0xff]);
        for i in 0..3000 {
            dead.headers.insert(format!("h{i:04}"), "v".repeat(20));
        }
        let dead = marked(dead, "boom");
        let budget = 60_000;
        let got = dead_letter(&dead, budget, SOURCE, "orders/2@17");
        assert!(record_size(&got, SOURCE) <= budget);
        assert!(encoded_size(&got) <= record_size(&got, SOURCE));
        assert_eq!(got.payload, dead.payload, "the payload is cut last");
        // The binary list is checked below: it loses the names of the dropped headers.
        for name in PROTECTED.iter().filter(|n| **n != headers::BINARY_HEADERS) {
            assert_eq!(got.header(name), dead.header(name), "{name}");
        }
        assert!(got.header("bus-dlq-from-elsewhere").is_none());
        assert!(got.header("blob").is_none());
        assert_eq!(got.header("bin"), Some("/w=="));
        assert_eq!(got.header(headers::BINARY_HEADERS), Some("bin"));
        assert_eq!(
            got.header("small, but odd%"),
            Some("s"),
            "small headers stay"
        );
        let note = got.header(headers::TRUNCATED).unwrap();
        let listed = items(note);
        assert_eq!(listed[0], "header:bus-dlq-from-elsewhere", "{note}");
        assert_eq!(listed[1], "header:blob", "{note}");
        assert_eq!(listed[2], "header:h2999", "{note}");
        let dropped = dead.headers.len() + 1 - got.headers.len();
        assert_eq!(listed.len(), NAMES_LISTED + 2, "{note}");
        assert_eq!(
            listed[NAMES_LISTED],
            format!("header:+{} more", dropped - NAMES_LISTED)
        );
        assert_eq!(listed[NAMES_LISTED + 1], "original:orders/2@17");
    }

    #[test]
    fn oversized_attributes_are_shortened_before_small_headers_go() {
        let dead = marked(
            Envelope::new("kind-".repeat(20_000), "x")
                .with_key("k".repeat(5000))
                .with_correlation_id("c".repeat(5000))
                .with_header("tenant", "acme"),
            "boom",
        );
        let got = dead_letter(&dead, 20_000, SOURCE, "t/0@1");
        assert!(record_size(&got, SOURCE) <= 20_000);
        assert_eq!(got.header("tenant"), Some("acme"));
        assert!(got.kind.len() <= ATTRIBUTE_MAX + 3);
        assert_eq!(got.id, dead.id);
        assert_eq!(
            got.header(headers::TRUNCATED),
            Some("kind,key,value:ce_correlationid,original:t/0@1")
        );
    }

    #[test]
    fn the_payload_is_cut_when_no_header_is_left_to_drop() {
        let dead = marked(Envelope::new("k", vec![1u8; 100_000]), "boom");
        let got = dead_letter(&dead, 50_000, SOURCE, "t/0@1");
        assert!(record_size(&got, SOURCE) <= 50_000);
        let note = got.header(headers::TRUNCATED).unwrap();
        let after = got.payload.len();
        assert!(after > 30_000, "{after}");
        assert_eq!(note, format!("payload:100000->{after},original:t/0@1"));
    }

    #[test]
    fn as_a_last_resort_protected_values_are_shortened_so_it_always_fits() {
        let dead = marked(
            Envelope::new("k", vec![1u8; 100_000])
                .with_header(headers::TRACESTATE, "s".repeat(50_000)),
            &"a very long reason ".repeat(20_000),
        );
        let got = dead_letter(&dead, 0, SOURCE, "t/0@1");
        assert!(record_size(&got, SOURCE) <= MIN_BUDGET);
        assert!(got.payload.is_empty());
        assert!(got
            .header(headers::DLQ_REASON)
            .unwrap()
            .starts_with("a very long reason"));
        let note = got.header(headers::TRUNCATED).unwrap();
        assert_eq!(
            note,
            "value:bus-dlq-reason,value:tracestate,payload:100000->0,original:t/0@1"
        );
    }

    #[test]
    fn property_dead_letters_always_fit() {
        let strategy = (
            arbitrary::envelope(),
            0..200_000usize,
            0..3_000usize,
            0..40_000usize,
            0..40_000usize,
            MIN_BUDGET..200_000,
        );
        arbitrary::check(
            "kafka dead letters always fit",
            64,
            strategy,
            |(envelope, payload, headers_n, kind, reason, budget)| {
                let mut envelope = envelope;
                envelope.payload = vec![b'p'; payload].into();
                envelope.kind.push_str(&"k".repeat(kind));
                for i in 0..headers_n {
                    envelope
                        .headers
                        .insert(format!("ce_x{i}"), "v".repeat(i % 40));
                }
                let dead = marked(envelope, &"r".repeat(reason));
                let got = dead_letter(&dead, budget, SOURCE, "t/0@1");
                prop_assert!(record_size(&got, SOURCE) <= budget);
                prop_assert!(encoded_size(&got) <= record_size(&got, SOURCE));
                prop_assert_eq!(
                    got.header(headers::DLQ_ATTEMPTS),
                    Some("3"),
                    "the dead-letter headers stay"
                );
                Ok(())
            },
        );
    }
}
