//! From `bus` names (topics, queues, groups) to NATS subjects, stream and consumer names.
//!
//! A `bus` name may hold any character; NATS gives `.` (token separator), `*` and `>`
//! (wildcards) and whitespace a meaning, and stream and consumer names cannot contain `.` at
//! all. So every name is encoded into one subject token: letters, digits and `-` stay as they
//! are, every other byte (including `_` and `.`) becomes `_XX` (two upper-case hex digits).
//! The encoding is injective, so two names never share a subject or a stream.

/// Encodes `name` into a NATS subject token / stream-name fragment (see the module docs).
#[must_use]
pub fn encode(name: &str) -> String {
    if name.is_empty() {
        // `_` alone is never the output of a non-empty name (escapes are `_XX`).
        return "_".to_owned();
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            out.push(char::from(byte));
        } else {
            // `_XX`, written in place: names are encoded per request.
            out.push('_');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0F)]));
        }
    }
    out
}

/// Subjects and stream names under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    prefix: String,
}

impl Names {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The subject a topic's messages are published on.
    pub(crate) fn topic_subject(&self, topic: &str) -> String {
        format!("{}.t.{}", self.prefix, encode(topic))
    }

    /// The stream holding a topic's messages.
    pub(crate) fn topic_stream(&self, topic: &str) -> String {
        format!("{}-t-{}", self.prefix, encode(topic))
    }

    /// The subject a queue's messages are sent on.
    pub(crate) fn queue_subject(&self, queue: &str) -> String {
        format!("{}.q.{}", self.prefix, encode(queue))
    }

    /// The work-queue stream holding a queue's messages.
    pub(crate) fn queue_stream(&self, queue: &str) -> String {
        format!("{}-q-{}", self.prefix, encode(queue))
    }

    /// The subject where copies of a core NATS topic's messages come back to group `group`
    /// when one of its members nacked them (`durable=false`). One token more than the topic's
    /// subject, so no topic's subscription sees them.
    pub(crate) fn core_group_retry_subject(&self, topic: &str, group: &str) -> String {
        format!("{}.g.{}", self.topic_subject(topic), encode(group))
    }

    /// The same for a subscription without a group, named by `unique`.
    pub(crate) fn core_private_retry_subject(&self, topic: &str, unique: &str) -> String {
        format!("{}.p.{}", self.topic_subject(topic), encode(unique))
    }

    /// The stream holding every delayed message under this prefix until it is due (module
    /// `delayed`).
    pub(crate) fn delayed_stream(&self) -> String {
        format!("{}-delayed", self.prefix)
    }

    /// The subjects of [`delayed_stream`](Self::delayed_stream).
    pub(crate) fn delayed_subjects(&self) -> String {
        format!("{}.d.>", self.prefix)
    }

    /// Where a message delayed for `subject` (a topic's or a queue's, under this prefix)
    /// waits: `<prefix>.d.` and the subject without the prefix, so the target can be read
    /// back from it.
    pub(crate) fn delayed_subject(&self, subject: &str) -> String {
        let rest = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or(subject);
        format!("{}.d.{rest}", self.prefix)
    }

    /// The topic or queue subject a delayed message waiting on `subject` goes to once due;
    /// `None` for a subject outside the delayed stream's, or one naming neither a topic nor a
    /// queue (published there by someone else).
    pub(crate) fn delayed_target(&self, subject: &str) -> Option<String> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".d.")?;
        let (kind, name) = rest.split_once('.')?;
        let single_token = !name.is_empty() && !name.contains(['.', '*', '>']);
        (matches!(kind, "t" | "q") && single_token).then(|| format!("{}.{rest}", self.prefix))
    }

    /// The subject requests to `topic` are sent on.
    pub(crate) fn request_subject(&self, topic: &str) -> String {
        format!("{}.r.{}", self.prefix, encode(topic))
    }
}

/// The durable consumer of a named group.
pub(crate) fn group_consumer(group: &str) -> String {
    format!("g-{}", encode(group))
}

/// The one durable consumer every consumer of a queue shares.
pub(crate) const QUEUE_CONSUMER: &str = "workers";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_differ_stay_different() {
        let names = [
            "orders",
            "orders.a",
            "orders-a",
            "orders_a",
            "orders.a.b",
            "orders.ab",
            "orders.*",
            "orders.>",
            "orders a",
            "orders_2E",
            "",
            "_",
        ];
        let encoded: std::collections::HashSet<String> = names.iter().map(|n| encode(n)).collect();
        assert_eq!(encoded.len(), names.len(), "{encoded:?}");
        for e in &encoded {
            assert!(
                e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{e}"
            );
        }
        assert_eq!(encode("orders.placed"), "orders_2Eplaced");
        assert_eq!(encode("a>b*"), "a_3Eb_2A");
        assert_eq!(encode("é\u{7f}"), "_C3_A9_7F");
    }

    #[test]
    fn subjects_are_single_safe_tokens() {
        let names = Names::new("bus");
        assert_eq!(names.topic_subject("orders.eu"), "bus.t.orders_2Eeu");
        assert_eq!(names.topic_stream("orders.eu"), "bus-t-orders_2Eeu");
        assert_eq!(names.queue_subject("jobs"), "bus.q.jobs");
        assert_eq!(names.request_subject("rpc.add"), "bus.r.rpc_2Eadd");
        assert_eq!(
            names.core_group_retry_subject("orders.eu", "billing.x"),
            "bus.t.orders_2Eeu.g.billing_2Ex"
        );
        assert_eq!(
            names.core_private_retry_subject("orders", "0a-b"),
            "bus.t.orders.p.0a-b"
        );
    }

    #[test]
    fn delayed_subjects_lead_back_to_their_topic_or_queue() {
        let names = Names::new("bus");
        for subject in [
            names.topic_subject("orders.eu"),
            names.queue_subject("jobs"),
        ] {
            let delayed = names.delayed_subject(&subject);
            assert!(delayed.starts_with("bus.d."), "{delayed}");
            assert_eq!(names.delayed_target(&delayed), Some(subject));
        }
        assert_eq!(names.delayed_stream(), "bus-delayed");
        // What a foreign client may publish under the stream's subjects leads nowhere.
        for foreign in [
            "bus.d.x.orders",
            "bus.d.t",
            "bus.d.t.a.b",
            "other.d.t.a",
            "bus.d.t.",
        ] {
            assert_eq!(names.delayed_target(foreign), None, "{foreign}");
        }
    }
}
