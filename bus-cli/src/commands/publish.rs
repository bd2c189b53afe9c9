//! `bus publish`: one message, or `--count` copies, to a topic or a queue.

use std::io::{IsTerminal as _, Read as _};

use bus::headers::format_time;
use bus::{Bus, Delay, Envelope};
use bytes::Bytes;
use serde_json::json;

use super::failed;
use crate::cli::{Destination, PublishArgs};
use crate::output::{print_json, progress};

/// Copies published per `publish_batch` with `--count`.
const BATCH: u64 = 100;

/// Runs `bus publish`.
pub(crate) async fn run(bus: &Bus, args: &PublishArgs, json: bool) -> Result<(), String> {
    let payload = payload(args)?;
    let destination = args.target.destination();
    let bar = if args.count > 1 {
        progress(args.count, "publish", json)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut ids = Vec::new();
    let mut sent = 0;
    while sent < args.count {
        let n = BATCH.min(args.count - sent);
        let batch: Vec<Envelope> = (0..n).map(|_| envelope(args, payload.clone())).collect();
        ids.extend(batch.iter().map(|e| e.id.to_string()));
        let delay = args
            .delay
            .map(Delay::For)
            .or(args.not_before.map(Delay::Until));
        let result = match (&destination, delay) {
            (Destination::Topic(topic), None) => bus.publish_batch(topic, batch).await,
            (Destination::Queue(queue), None) => send_all(bus, queue, batch).await,
            (_, Some(delay)) => send_delayed(bus, &destination, batch, delay).await,
        };
        result.map_err(|e| {
            failed(
                &format!(
                    "publishing to {} `{}` (after {sent} of {})",
                    destination.noun(),
                    destination.name(),
                    args.count
                ),
                e,
            )
        })?;
        sent += n;
        bar.inc(n);
    }
    bar.finish_and_clear();
    if json {
        print_json(&json!({
            destination.noun(): destination.name(),
            "published": sent,
            "delay_ms": args.delay.map(|d| d.as_millis()),
            "not_before": args.not_before.map(format_time),
            "ids": ids,
        }));
    } else {
        let due = match (args.delay, args.not_before) {
            (Some(d), _) => format!(", delivered after {}", humantime::format_duration(d)),
            (None, Some(at)) => format!(", delivered not before {}", format_time(at)),
            (None, None) => String::new(),
        };
        match ids.as_slice() {
            [id] => println!(
                "published 1 message to {} `{}`{due}: id {id}",
                destination.noun(),
                destination.name()
            ),
            _ => println!(
                "published {sent} messages to {} `{}`{due} (ids {} … {})",
                destination.noun(),
                destination.name(),
                ids.first().map_or("", String::as_str),
                ids.last().map_or("", String::as_str),
            ),
        }
    }
    Ok(())
}

async fn send_all(bus: &Bus, queue: &str, batch: Vec<Envelope>) -> bus::Result<()> {
    for envelope in batch {
        bus.send(queue, envelope).await?;
    }
    Ok(())
}

/// Publishes or sends each message of `batch` with `delay`.
async fn send_delayed(
    bus: &Bus,
    destination: &Destination,
    batch: Vec<Envelope>,
    delay: Delay,
) -> bus::Result<()> {
    for envelope in batch {
        match destination {
            Destination::Topic(topic) => {
                bus.broker().publish_delayed(topic, envelope, delay).await?
            }
            Destination::Queue(queue) => bus.broker().send_delayed(queue, envelope, delay).await?,
        }
    }
    Ok(())
}

/// One message as the arguments describe it, with a fresh id.
fn envelope(args: &PublishArgs, payload: Bytes) -> Envelope {
    let mut envelope = Envelope::new(args.kind.clone(), payload);
    if let Some(key) = &args.key {
        envelope = envelope.with_key(key.clone());
    }
    if let Some(correlation) = &args.correlation {
        envelope = envelope.with_correlation_id(correlation.as_str());
    }
    if let Some(content_type) = &args.content_type {
        envelope = envelope.with_content_type(content_type.clone());
    }
    for (name, value) in &args.headers {
        envelope = envelope.with_header(name.clone(), value.clone());
    }
    envelope
}

/// The payload: `--message`, `--file` (`-` is standard input), or standard input.
fn payload(args: &PublishArgs) -> Result<Bytes, String> {
    if let Some(text) = &args.message {
        return Ok(Bytes::from(text.clone()));
    }
    match &args.file {
        Some(path) if path.as_os_str() != "-" => std::fs::read(path)
            .map(Bytes::from)
            .map_err(|e| failed(&format!("reading the payload from {}", path.display()), e)),
        Some(_) => stdin(),
        None if std::io::stdin().is_terminal() => Err(
            "no payload: give --message TEXT or --file PATH, or pipe it on standard input"
                .to_owned(),
        ),
        None => stdin(),
    }
}

fn stdin() -> Result<Bytes, String> {
    let mut buffer = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buffer)
        .map_err(|e| failed("reading the payload from standard input", e))?;
    Ok(Bytes::from(buffer))
}
