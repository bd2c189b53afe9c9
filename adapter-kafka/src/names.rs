//! Topic and group names: what Kafka accepts, and the names `bus` derives.

use bus_core::{Error, Result};

/// The longest topic name Kafka accepts.
pub(crate) const MAX_TOPIC_LEN: usize = 249;

/// Suffix of the retry topic of a topic or queue (see the crate docs).
pub(crate) const RETRY_SUFFIX: &str = ".retry";

/// Checks that `name` is a legal Kafka topic name, taken literally: letters, digits, `.`, `_`
/// and `-`, at most 249 bytes (minus room for the `.retry` and `.dlq` suffixes), not `.` or
/// `..`. Anything else (wildcards, spaces, slashes) is refused rather than rewritten, so two
/// names can never be mapped onto one topic.
pub(crate) fn check_topic(name: &str) -> Result<()> {
    let room = MAX_TOPIC_LEN - RETRY_SUFFIX.len() - ".dlq".len();
    if name.is_empty() || name == "." || name == ".." {
        return Err(Error::config(format!(
            "`{name}` is not a valid Kafka topic name"
        )));
    }
    if name.len() > room {
        return Err(Error::config(format!(
            "topic name `{name}` is {} bytes; Kafka allows {MAX_TOPIC_LEN}, and bus keeps \
             room for its `.retry` and `.dlq` suffixes ({room} at most)",
            name.len()
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::config(format!(
            "topic name `{name}` contains `{bad}`; Kafka topic names are made of letters, \
             digits, `.`, `_` and `-`"
        )));
    }
    Ok(())
}

/// The retry topic of `topic` (where nacked messages wait for their redelivery).
pub(crate) fn retry_topic(topic: &str) -> String {
    format!("{topic}{RETRY_SUFFIX}")
}

/// The consumer group that consumes queue `queue`.
pub(crate) fn queue_group(queue: &str) -> String {
    format!("bus.queue.{queue}")
}

/// The default responder group of request topic `topic`.
pub(crate) fn responder_group(topic: &str) -> String {
    format!("bus.responders.{topic}")
}

/// A fresh group for a subscription without a group.
pub(crate) fn private_group() -> String {
    format!("bus.private.{}", uuid::Uuid::now_v7())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legal_names_pass_literally_and_others_are_refused() {
        for ok in ["orders", "a.b_c-d", "conf.tx.0193", "A9"] {
            check_topic(ok).unwrap();
        }
        for bad in ["", ".", "..", "a*", "a.>", "a#", "a b", "a/b", "ü"] {
            assert!(check_topic(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_topic(&"x".repeat(240)).is_err());
        check_topic(&"x".repeat(240 - RETRY_SUFFIX.len() - 4)).unwrap();
    }
}
