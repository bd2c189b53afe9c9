//! One module per command, and the connection they share.

pub(crate) mod bench;
pub(crate) mod check;
pub(crate) mod dlq;
pub(crate) mod lag;
pub(crate) mod publish;
pub(crate) mod tail;

use std::time::Duration;

use bus::secrets::redact_url;
use bus::Bus;

/// Connects to `url`, giving up after `timeout`; the error names the URL redacted.
pub(crate) async fn connect(url: &str, timeout: Duration) -> Result<Bus, String> {
    let shown = redact_url(url);
    match tokio::time::timeout(timeout, bus::connect(url)).await {
        Ok(Ok(bus)) => Ok(bus),
        Ok(Err(e)) => Err(format!("cannot connect to {shown}: {e}")),
        Err(_) => Err(format!(
            "cannot connect to {shown}: no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

/// The URL the `dlq` commands connect with: on SQS, short polling unless the URL chooses.
///
/// The dead-letter commands release what they read once their consumer is closed. A long
/// poll the SQS adapter still has in flight then receives those messages and hands them back
/// only through a task this short-lived process may not outlive, leaving them invisible for
/// the visibility timeout; a short poll is over in one round trip.
pub(crate) fn for_dead_letters(url: &str) -> String {
    if !url.trim_start().starts_with("sqs://") || url.contains("wait_time_secs") {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}wait_time_secs=0")
}

/// `error` as the line a command fails with: what it was doing, then the error.
pub(crate) fn failed(doing: &str, error: impl std::fmt::Display) -> String {
    format!("{doing}: {error}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_are_read_with_short_polls_on_sqs_only() {
        assert_eq!(
            for_dead_letters("sqs://127.0.0.1:4566?region=x"),
            "sqs://127.0.0.1:4566?region=x&wait_time_secs=0"
        );
        assert_eq!(for_dead_letters("sqs://"), "sqs://?wait_time_secs=0");
        assert_eq!(
            for_dead_letters("sqs://h?wait_time_secs=5"),
            "sqs://h?wait_time_secs=5"
        );
        assert_eq!(for_dead_letters("nats://h"), "nats://h");
    }
}
