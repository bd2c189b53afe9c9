//! Network faults between the adapter and its broker, injected by a
//! [`FaultProxy`](crate::conformance::FaultProxy): connections reset mid-stream, a route that
//! black-holes every byte for a while, and a reconnect right after acks.
//!
//! Each case connects a broker of its own through the proxy with the hook of
//! [`Harness::with_fault_proxy`]; without one it is skipped (an in-process broker has no
//! connection to cut). Each prints one line of what it saw, for the adapter's notes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conformance::support::{skip, unique};
use crate::conformance::{report, FaultProxy, Harness};
use crate::{Broker, Envelope, MessageId, SubscribeOptions, Subscription};

/// Publishers running at once in the reset case, and messages each publishes.
const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 50;
/// Pause between two publishes of one publisher, so the stream spans the resets.
const PACE: Duration = Duration::from_millis(10);
/// How long the stall case black-holes the route.
const STALL: Duration = Duration::from_secs(5);
/// Messages acked before the reset in the reconnect case.
const ACKED: usize = 20;
/// The longest the reconnect case watches for redeliveries of what was acked.
const LONGEST_WATCH: Duration = Duration::from_secs(20);

/// Connects through a fault proxy, or skips `case` (returning `None`) without a hook.
async fn through_proxy(h: &Harness, case: &str) -> Option<(FaultProxy, Arc<dyn Broker>)> {
    let connected = h.connect_through_proxy().await;
    if connected.is_none() {
        skip(
            case,
            format!(
                "{}: the harness gives no fault proxy (Harness::with_fault_proxy): an \
                 in-process broker has no connection to cut",
                h.capabilities().name
            ),
        );
    }
    connected
}

/// Closes the proxied connection, best effort: how it closes is not what these cases test.
async fn close(broker: &Arc<dyn Broker>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), broker.close()).await;
}

/// A group subscription on a new topic, through `broker`.
async fn subscribe(broker: &Arc<dyn Broker>, tag: &str, case: &str) -> (String, Subscription) {
    let topic = unique(tag);
    let sub = broker
        .subscribe(&topic, SubscribeOptions::group(format!("{topic}.g1")))
        .await
        .unwrap_or_else(|e| panic!("{case}: subscribe to `{topic}` through the proxy: {e}"));
    (topic, sub)
}

/// Receives and acks everything on `sub`, sending each id it gets, until `stop` is set or the
/// subscription ends. Receive errors are transient by contract and waited through; an ack
/// that fails is counted (the broker will redeliver).
fn collect(
    mut sub: Subscription,
    case: &'static str,
) -> (
    JoinHandle<usize>,
    mpsc::UnboundedReceiver<MessageId>,
    watch::Sender<bool>,
) {
    let (ids, received) = mpsc::unbounded_channel();
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut failed_acks = 0;
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                item = sub.next() => match item {
                    Some(Ok(delivery)) => {
                        let _ = ids.send(delivery.envelope().id.clone());
                        if let Err(e) = delivery.ack().await {
                            println!("note: {case}: ack failed (the broker redelivers): {e}");
                            failed_acks += 1;
                        }
                    }
                    Some(Err(e)) => {
                        println!("note: {case}: receive error, waiting on: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    None => break,
                },
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), sub.close()).await;
        failed_acks
    });
    (task, received, stop)
}

/// Takes ids from `received` into `counts` until every id of `wanted` is in it, waiting up to
/// `wait` for each new one. Returns the ids still missing when it gave up.
async fn receive_until(
    received: &mut mpsc::UnboundedReceiver<MessageId>,
    counts: &mut HashMap<MessageId, usize>,
    wanted: &HashSet<MessageId>,
    wait: Duration,
) -> Vec<MessageId> {
    loop {
        let missing: Vec<MessageId> = wanted
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .cloned()
            .collect();
        if missing.is_empty() {
            return missing;
        }
        match tokio::time::timeout(wait, received.recv()).await {
            Ok(Some(id)) => *counts.entry(id).or_default() += 1,
            _ => return missing,
        }
    }
}

/// Takes whatever arrives within `watch` into `counts`.
async fn drain_for(
    received: &mut mpsc::UnboundedReceiver<MessageId>,
    counts: &mut HashMap<MessageId, usize>,
    watch: Duration,
) {
    let deadline = Instant::now() + watch;
    while let Ok(Some(id)) = tokio::time::timeout_at(deadline, received.recv()).await {
        *counts.entry(id).or_default() += 1;
    }
}

/// Publishes `envelope` until the broker confirms it, retrying every 100 ms for up to `limit`.
/// Returns the number of attempts; fails the case if none succeeded.
async fn publish_until_confirmed(
    broker: &Arc<dyn Broker>,
    topic: &str,
    envelope: &Envelope,
    limit: Duration,
    what: &str,
) -> usize {
    let deadline = Instant::now() + limit;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let error = match tokio::time::timeout(left, broker.publish(topic, envelope.clone())).await
        {
            Ok(Ok(())) => return attempts,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_owned(),
        };
        assert!(
            Instant::now() + Duration::from_millis(100) < deadline,
            "{what}: the bus did not recover: {attempts} publishes within {limit:?} after the \
             fault all failed, the last with: {error}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishers and a consumer group run through the proxy while it resets every connection
/// twice (at a third and at two thirds of the stream). Every publish that returned `Ok` is
/// received; duplicates are counted and reported, not failed. Publishes may fail while the
/// adapter reconnects, but none may hang longer than the receive timeout, and a publish after
/// the stream is confirmed within twice the receive timeout: the adapter reconnects by itself.
pub async fn connection_reset_mid_stream_loses_nothing(h: Harness) {
    const CASE: &str = "connection_reset_mid_stream_loses_nothing";
    let Some((proxy, broker)) = through_proxy(&h, CASE).await else {
        return;
    };
    let (topic, sub) = subscribe(&broker, "reset", CASE).await;
    let (collector, mut received, stop) = collect(sub, CASE);

    let total = PUBLISHERS * PER_PUBLISHER;
    let started = Arc::new(AtomicUsize::new(0));
    let limit = h.receive_timeout;
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (broker, topic, proxy, started) = (
                broker.clone(),
                topic.clone(),
                proxy.clone(),
                started.clone(),
            );
            tokio::spawn(async move {
                let mut confirmed = Vec::new();
                let mut failed = Vec::new();
                for i in 0..PER_PUBLISHER {
                    let n = started.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == total / 3 || n == 2 * total / 3 {
                        proxy.reset();
                    }
                    let envelope = Envelope::new("conf.reset", format!("{p}.{i}"));
                    let id = envelope.id.clone();
                    match tokio::time::timeout(limit, broker.publish(&topic, envelope)).await {
                        Ok(Ok(())) => confirmed.push(id),
                        Ok(Err(e)) => failed.push((id, e.to_string())),
                        Err(_) => panic!(
                            "{CASE}: a publish neither returned nor failed within {limit:?} \
                             (publisher {p}, message {i})"
                        ),
                    }
                    tokio::time::sleep(PACE).await;
                }
                (confirmed, failed)
            })
        })
        .collect();
    let mut confirmed = HashSet::new();
    let mut failed = Vec::new();
    for publisher in publishers {
        let (ok, err) = publisher
            .await
            .unwrap_or_else(|e| panic!("{CASE}: a publisher task failed: {e}"));
        confirmed.extend(ok);
        failed.extend(err);
    }
    let after = Envelope::new("conf.reset.after", "after the resets");
    let attempts = publish_until_confirmed(&broker, &topic, &after, limit * 2, CASE).await;
    confirmed.insert(after.id.clone());

    let mut counts = HashMap::new();
    let missing = receive_until(&mut received, &mut counts, &confirmed, limit).await;
    drain_for(&mut received, &mut counts, h.quiet_period).await;
    let _ = stop.send(true);
    let failed_acks = collector.await.unwrap_or(0);
    close(&broker).await;

    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    let received_failed = failed
        .iter()
        .filter(|(id, _)| counts.contains_key(id))
        .count();
    report(&format!(
        "{CASE}: {}: published={} confirmed={} failed={} (of which received={received_failed}) \
         received={} lost={} duplicates={duplicates} resets_cut={} connections={} \
         failed_acks={failed_acks} publishes_to_recover={attempts}",
        h.capabilities().name,
        total + 1,
        confirmed.len(),
        failed.len(),
        counts.len(),
        missing.len(),
        proxy.aborted(),
        proxy.accepted(),
    ));
    if let Some((_, error)) = failed.first() {
        println!("note: {CASE}: a failed publish said: {error}");
    }
    assert!(
        proxy.accepted() > 0,
        "{CASE}: no connection came through the proxy: the hook connects the adapter elsewhere"
    );
    assert!(
        missing.is_empty(),
        "{CASE}: {} of {} confirmed messages never arrived (waited {limit:?} after the last \
         arrival): {:?}",
        missing.len(),
        confirmed.len(),
        &missing[..missing.len().min(10)]
    );
}

/// The proxy black-holes every byte for five seconds while a group subscription is open and a
/// publish is in flight. The publish in flight returns (`Ok` or an error) at the latest a
/// receive timeout after the stall ends, and if it returned `Ok` its message arrives; after the
/// stall, a publish is confirmed within twice the receive timeout and arrives on the same
/// subscription: the bus resumes by itself, without the user reopening anything.
pub async fn stall_then_recover(h: Harness) {
    const CASE: &str = "stall_then_recover";
    let Some((proxy, broker)) = through_proxy(&h, CASE).await else {
        return;
    };
    let (topic, sub) = subscribe(&broker, "stall", CASE).await;
    let (collector, mut received, stop) = collect(sub, CASE);
    let limit = h.receive_timeout;
    let mut counts = HashMap::new();

    let before = Envelope::new("conf.stall.before", "before the stall");
    publish_until_confirmed(&broker, &topic, &before, limit, CASE).await;
    let wanted = std::iter::once(before.id.clone()).collect();
    let missing = receive_until(&mut received, &mut counts, &wanted, limit).await;
    assert!(
        missing.is_empty(),
        "{CASE}: the message before the stall never arrived"
    );

    proxy.stall();
    let during = Envelope::new("conf.stall.during", "published into the stall");
    let in_flight = tokio::spawn({
        let (broker, topic, during) = (broker.clone(), topic.clone(), during.clone());
        async move {
            let started = Instant::now();
            let result = tokio::time::timeout(STALL + limit, broker.publish(&topic, during)).await;
            (result, started.elapsed())
        }
    });
    // The length of the fault, not a wait for something to happen.
    tokio::time::sleep(STALL).await;
    proxy.resume();
    let (result, took) = in_flight
        .await
        .unwrap_or_else(|e| panic!("{CASE}: the publishing task failed: {e}"));
    let mut wanted = HashSet::new();
    let during_outcome = match result {
        Ok(Ok(())) => {
            wanted.insert(during.id.clone());
            format!("confirmed after {took:.1?}")
        }
        Ok(Err(e)) => format!("failed after {took:.1?}: {e}"),
        Err(_) => panic!(
            "{CASE}: a publish made during a {STALL:?} stall neither returned nor failed \
             within {limit:?} after the stall ended"
        ),
    };

    let after = Envelope::new("conf.stall.after", "after the stall");
    let attempts = publish_until_confirmed(&broker, &topic, &after, limit * 2, CASE).await;
    wanted.insert(after.id.clone());
    let missing = receive_until(&mut received, &mut counts, &wanted, limit).await;
    let _ = stop.send(true);
    let _ = collector.await;
    close(&broker).await;
    report(&format!(
        "{CASE}: {}: stall={STALL:?} publish_during={during_outcome} \
         publishes_to_recover={attempts} connections={}",
        h.capabilities().name,
        proxy.accepted()
    ));
    assert!(
        missing.is_empty(),
        "{CASE}: after the stall, confirmed messages never reached the subscription opened \
         before it (waited {limit:?}): {missing:?}"
    );
}

/// A group consumes and acks twenty messages through the proxy; then every connection is
/// reset. After the adapter reconnects (a publish is confirmed and received on the same
/// subscription), none of the twenty is delivered again, watching for the subscription's
/// lease (up to 20 s), or the quiet period where there is none.
///
/// The reset comes one quiet period after the last ack: acks that a broker does not confirm
/// (a NATS ack, an AMQP `basic.ack`, a Kafka commit made in the background) reach it within
/// that on loopback. An adapter fails this case when it settles on a connection that died, or
/// when it sends the broker a copy of what the broker already requeued. An adapter that opens
/// a connection per request (SQS over HTTP, without long polling) may have none open at the
/// reset; the line it prints says how many the reset cut.
pub async fn reconnect_does_not_duplicate_acked(h: Harness) {
    const CASE: &str = "reconnect_does_not_duplicate_acked";
    let Some((proxy, broker)) = through_proxy(&h, CASE).await else {
        return;
    };
    let (topic, sub) = subscribe(&broker, "acked", CASE).await;
    let watch_for = sub
        .lease()
        .map_or(h.quiet_period, |lease| lease + h.quiet_period)
        .min(LONGEST_WATCH)
        .max(h.quiet_period);
    let (collector, mut received, stop) = collect(sub, CASE);
    let limit = h.receive_timeout;

    let sent: Vec<Envelope> = (0..ACKED)
        .map(|i| Envelope::new("conf.acked", format!("acked {i}")))
        .collect();
    for envelope in &sent {
        broker
            .publish(&topic, envelope.clone())
            .await
            .unwrap_or_else(|e| panic!("{CASE}: publish before the reset: {e}"));
    }
    let acked: HashSet<MessageId> = sent.iter().map(|e| e.id.clone()).collect();
    let mut counts = HashMap::new();
    let missing = receive_until(&mut received, &mut counts, &acked, limit).await;
    assert!(
        missing.is_empty(),
        "{CASE}: {} of {ACKED} messages never arrived before the reset",
        missing.len()
    );
    // Copies that arrive before the reset are the broker's at-least-once, not the point.
    drain_for(&mut received, &mut counts, h.quiet_period).await;
    let before_reset = counts.clone();

    proxy.reset();
    let marker = Envelope::new("conf.acked.marker", "after the reset");
    let attempts = publish_until_confirmed(&broker, &topic, &marker, limit * 2, CASE).await;
    let wanted = std::iter::once(marker.id.clone()).collect();
    let mut after = HashMap::new();
    let missing = receive_until(&mut received, &mut after, &wanted, limit).await;
    drain_for(&mut received, &mut after, watch_for).await;
    let _ = stop.send(true);
    let failed_acks = collector.await.unwrap_or(0);
    close(&broker).await;

    let again: Vec<&MessageId> = after.keys().filter(|id| acked.contains(*id)).collect();
    report(&format!(
        "{CASE}: {}: acked={ACKED} copies_before_reset={} redelivered_after_reset={} \
         failed_acks={failed_acks} resets_cut={} publishes_to_recover={attempts} \
         watched={watch_for:?}",
        h.capabilities().name,
        before_reset.values().map(|n| n - 1).sum::<usize>(),
        again.len(),
        proxy.aborted(),
    ));
    assert!(
        proxy.accepted() > 0,
        "{CASE}: no connection came through the proxy: the hook connects the adapter elsewhere"
    );
    assert!(
        missing.is_empty(),
        "{CASE}: the message published after the reconnect never arrived on the subscription \
         opened before it (waited {limit:?})"
    );
    assert!(
        again.is_empty(),
        "{CASE}: {} of {ACKED} messages acked before the reset were delivered again after it: \
         {again:?}",
        again.len()
    );
}
