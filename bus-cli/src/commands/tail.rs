//! `bus tail`: follow a topic in a private group, or consume a queue, printing what arrives.

use bus::{Bus, ConsumeOptions, Delivery, SubscribeOptions};
use tokio::time::Instant;

use super::failed;
use crate::cli::{Destination, TailArgs};
use crate::output::{delivery_json, envelope_pretty, print_json};

/// Runs `bus tail`.
pub(crate) async fn run(bus: &Bus, args: &TailArgs, json: bool) -> Result<(), String> {
    let destination = args.target.destination();
    let mut subscription = match &destination {
        // A private group (`group: None`): it gets every message of the topic from now on and
        // takes none from the topic's other groups.
        Destination::Topic(topic) => bus
            .subscribe(topic, SubscribeOptions::default())
            .await
            .map_err(|e| failed(&format!("subscribing to topic `{topic}`"), e))?,
        Destination::Queue(queue) if !args.consume => {
            return Err(format!(
                "a queue's consumers compete: tailing queue `{queue}` takes its messages from \
                 every other consumer and acknowledges them; add --consume to do that"
            ))
        }
        Destination::Queue(queue) => bus
            .consume(queue, ConsumeOptions::default())
            .await
            .map_err(|e| failed(&format!("consuming queue `{queue}`"), e))?,
    };
    // Tests and scripts wait for this line before they publish.
    match &destination {
        Destination::Topic(topic) => {
            eprintln!("following topic `{topic}` in a private group (Ctrl-C to stop)");
        }
        Destination::Queue(queue) => eprintln!(
            "consuming queue `{queue}`: messages read here are acknowledged and gone for its \
             other consumers (Ctrl-C to stop)"
        ),
    }
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let mut printed = 0_u64;
    let outcome = loop {
        if args.count.is_some_and(|count| printed >= count) {
            break Ok(());
        }
        let next = tokio::select! {
            next = subscription.next() => next,
            _ = tokio::signal::ctrl_c() => break Ok(()),
            () = sleep_until(deadline) => break timed_out(args, printed),
        };
        let delivery = match next {
            None => break Err(format!("the {} was closed", destination.noun())),
            Some(Err(e)) => {
                eprintln!("bus: warning: receiving: {e}");
                continue;
            }
            Some(Ok(delivery)) => delivery,
        };
        if selected(args, &delivery) {
            show(&delivery, json);
            printed += 1;
        }
        if let Err(e) = delivery.ack().await {
            eprintln!("bus: warning: acknowledging: {}", e.error());
        }
    };
    let _ = subscription.close().await;
    outcome
}

fn selected(args: &TailArgs, delivery: &Delivery) -> bool {
    let envelope = delivery.envelope();
    args.kind.as_ref().is_none_or(|kind| envelope.kind == *kind)
        && args
            .correlation
            .as_ref()
            .is_none_or(|c| envelope.correlation_id.as_str() == c)
}

fn show(delivery: &Delivery, json: bool) {
    if json {
        print_json(&delivery_json(delivery));
        return;
    }
    let mut text = envelope_pretty(delivery.envelope());
    if delivery.attempt() > 1 {
        text.push_str(&format!("  attempt: {}\n", delivery.attempt()));
    }
    if let Some(reason) = delivery.undecodable() {
        text.push_str(&format!("  undecodable: {reason}\n"));
    }
    println!("{text}");
}

/// Waits until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The end of a `--timeout`: a failure only when `--count` asked for more.
fn timed_out(args: &TailArgs, printed: u64) -> Result<(), String> {
    match args.count {
        Some(count) if printed < count => Err(format!(
            "timed out after {}: {printed} of {count} messages",
            humantime::format_duration(args.timeout.unwrap_or_default())
        )),
        _ => Ok(()),
    }
}
