//! `bus` names (topics, queues, groups: any text) onto SQS and SNS names.
//!
//! SQS queue names allow `[A-Za-z0-9_-]`, at most 80 characters (`.fifo` included for FIFO
//! queues); SNS topic names the same, at most 256. [`encode`] keeps letters, digits and `-`,
//! writes `.` as `_-`, `_` as `__`, and any other byte as `_` and two lower-case hex digits:
//! a prefix-free escape, so two names never encode alike. Derived names join encoded parts
//! with `_` and a letter that no escape produces (`_g` group, `_p` private, `_r` replies, `_q`
//! requests), so they cannot collide with a plain name either. A name too long for the
//! limit keeps a readable prefix and ends in `-` and 16 hex digits of a stable hash of the
//! whole name.

use std::fmt::Write;

/// SQS's limit on queue names.
const QUEUE_LIMIT: usize = 80;
/// SNS's limit on topic names.
const TOPIC_LIMIT: usize = 256;
const FIFO_SUFFIX: &str = ".fifo";

/// How `bus` names map onto SQS queue and SNS topic names.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    prefix: String,
    fifo: bool,
}

impl Names {
    pub(crate) fn new(prefix: &str, fifo: bool) -> Self {
        Self {
            prefix: encode(prefix),
            fifo,
        }
    }

    /// The SQS queue behind the work queue `queue`.
    pub(crate) fn queue(&self, queue: &str) -> String {
        self.finish(&encode(queue), QUEUE_LIMIT)
    }

    /// The SNS topic behind `topic`.
    pub(crate) fn topic(&self, topic: &str) -> String {
        self.finish(&encode(topic), TOPIC_LIMIT)
    }

    /// The SQS queue of consumer group `group` on `topic`.
    pub(crate) fn group_queue(&self, topic: &str, group: &str) -> String {
        self.finish(
            &format!("{}_g{}", encode(topic), encode(group)),
            QUEUE_LIMIT,
        )
    }

    /// A private queue on `topic`, unique by `unique`.
    pub(crate) fn private_queue(&self, topic: &str, unique: &str) -> String {
        self.finish(&format!("{}_p{unique}", encode(topic)), QUEUE_LIMIT)
    }

    /// The request queue of `topic`.
    pub(crate) fn request_queue(&self, topic: &str) -> String {
        self.finish(&format!("{}_q", encode(topic)), QUEUE_LIMIT)
    }

    /// The reply queue of one requester.
    pub(crate) fn reply_queue(&self, unique: &str) -> String {
        self.finish(&format!("_r{unique}"), QUEUE_LIMIT)
    }

    /// Whether `name` is a reply queue this naming makes ([`reply_queue`](Self::reply_queue)
    /// of a UUID in simple form): the only queues responders reply into.
    pub(crate) fn is_reply_queue(&self, name: &str) -> bool {
        let suffix = if self.fifo { FIFO_SUFFIX } else { "" };
        name.strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix("_r"))
            .and_then(|rest| rest.strip_suffix(suffix))
            .is_some_and(|unique| {
                unique.len() == 32
                    && unique.bytes().all(|b| b.is_ascii_hexdigit())
                    && self.reply_queue(unique) == name
            })
    }

    fn finish(&self, encoded: &str, limit: usize) -> String {
        let suffix = if self.fifo { FIFO_SUFFIX } else { "" };
        let full = format!("{}{encoded}", self.prefix);
        let room = limit - suffix.len();
        let name = if full.len() <= room {
            full
        } else {
            // Only ASCII here, so any byte index is a char boundary.
            let keep = room - 17;
            format!("{}-{:016x}", &full[..keep], fnv1a(full.as_bytes()))
        };
        name + suffix
    }
}

/// The escape described in the module docs.
pub(crate) fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => out.push(char::from(b)),
            b'.' => out.push_str("_-"),
            b'_' => out.push_str("__"),
            other => {
                let _ = write!(out, "_{other:02x}");
            }
        }
    }
    out
}

/// 64-bit FNV-1a: stable across Rust versions and machines, unlike `DefaultHasher`.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_injective_and_valid() {
        let names = ["a.b", "a_-b", "a_b", "a__b", "a-b", "a/b", "a_2fb", "é"];
        let encoded: std::collections::HashSet<String> = names.iter().map(|n| encode(n)).collect();
        assert_eq!(encoded.len(), names.len());
        for e in &encoded {
            assert!(e
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
        assert_eq!(encode("orders.eu"), "orders_-eu");
    }

    #[test]
    fn long_names_fit_with_a_hash_and_room_for_fifo() {
        let names = Names::new("", true);
        let topic = format!("conf.share.{}", "0190f3e2-aaaa-7bbb-8ccc-123456789abc");
        let a = names.group_queue(&topic, &format!("{topic}.g1"));
        let b = names.group_queue(&topic, &format!("{topic}.g2"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 80);
        assert!(a.ends_with(".fifo"));
        assert_eq!(Names::new("", false).queue("orders"), "orders");
        assert_ne!(
            names.group_queue("a_gb", "c"),
            names.group_queue("a", "b_gc")
        );
    }
}
