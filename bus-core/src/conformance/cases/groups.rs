//! Who gets what: private subscriptions, groups, competing members and consumers, per-key
//! order, and groups outliving their subscriptions.

use std::collections::HashSet;
use std::time::Duration;

use crate::conformance::support::{
    ack, assert_all_intact, assert_nothing_else, assert_per_key_order, assert_quiet,
    assert_work_is_shared, consume, ids, next_within, no_groups, no_per_key_order, publish,
    receive_all, recv, send, skip, subscribe, unique, Members, Next, SEQ,
};
use crate::conformance::Harness;
use crate::{ConsumeOptions, Delivery, Envelope, MessageId, SubscribeOptions};

fn numbered(kind: &str, count: usize) -> Vec<Envelope> {
    (0..count)
        .map(|i| {
            Envelope::new(kind, format!("{kind} {i}")).with_header("x-conf-index", i.to_string())
        })
        .collect()
}

/// Two subscriptions without a group each get every message.
pub async fn private_subscriptions_each_get_all(h: Harness) {
    const CASE: &str = "private_subscriptions_each_get_all";
    let topic = unique("priv");
    let mut first = subscribe(&h, &topic, SubscribeOptions::default(), CASE).await;
    let mut second = subscribe(&h, &topic, SubscribeOptions::default(), CASE).await;
    let sent = numbered("conf.private", 20);
    for envelope in &sent {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }
    let expected = ids(&sent);
    let what_first = format!("{CASE}: first subscription");
    let what_second = format!("{CASE}: second subscription");
    let (a, b) = futures::future::join(
        receive_all(&mut first, &expected, h.receive_timeout, &what_first),
        receive_all(&mut second, &expected, h.receive_timeout, &what_second),
    )
    .await;
    assert_all_intact(&sent, &a, &what_first);
    assert_all_intact(&sent, &b, &what_second);
}

/// Two groups on one topic each get every message (fan-out).
pub async fn fan_out_two_groups(h: Harness) {
    const CASE: &str = "fan_out_two_groups";
    if no_groups(CASE, &h.capabilities()) {
        return;
    }
    let topic = unique("fan");
    let mut first = subscribe(
        &h,
        &topic,
        SubscribeOptions::group(format!("{topic}.g1")),
        CASE,
    )
    .await;
    let mut second = subscribe(
        &h,
        &topic,
        SubscribeOptions::group(format!("{topic}.g2")),
        CASE,
    )
    .await;
    let sent = numbered("conf.fan_out", 20);
    for envelope in &sent {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }
    let expected = ids(&sent);
    let what_first = format!("{CASE}: group g1");
    let what_second = format!("{CASE}: group g2");
    let (a, b) = futures::future::join(
        receive_all(&mut first, &expected, h.receive_timeout, &what_first),
        receive_all(&mut second, &expected, h.receive_timeout, &what_second),
    )
    .await;
    assert_all_intact(&sent, &a, &what_first);
    assert_all_intact(&sent, &b, &what_second);
}

/// Two members of one group split the messages: none lost, both do part of the work, and
/// duplicates stay within the at-least-once allowance.
pub async fn group_members_share_work(h: Harness) {
    const CASE: &str = "group_members_share_work";
    if no_groups(CASE, &h.capabilities()) {
        return;
    }
    let topic = unique("share");
    let group = format!("{topic}.g1");
    let mut members = Vec::new();
    for _ in 0..2 {
        let options = SubscribeOptions::group(&group).with_prefetch(4);
        members.push(subscribe(&h, &topic, options, CASE).await);
    }
    let (hh, t) = (h.clone(), topic.clone());
    assert_work_is_shared(
        &h,
        members,
        move |wave| {
            let (h, topic) = (hh.clone(), t.clone());
            async move {
                for envelope in wave {
                    publish(&h, &topic, envelope, CASE).await;
                }
            }
        },
        CASE,
    )
    .await;
}

/// Two consumers of one queue split its messages: none lost, both do part of the work, and
/// duplicates stay within the at-least-once allowance.
pub async fn queue_competing_consumers(h: Harness) {
    const CASE: &str = "queue_competing_consumers";
    let queue = unique("compete");
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let options = ConsumeOptions::default().with_prefetch(4);
        consumers.push(consume(&h, &queue, options, CASE).await);
    }
    let (hh, q) = (h.clone(), queue.clone());
    assert_work_is_shared(
        &h,
        consumers,
        move |wave| {
            let (h, queue) = (hh.clone(), q.clone());
            async move {
                for envelope in wave {
                    send(&h, &queue, envelope, CASE).await;
                }
            }
        },
        CASE,
    )
    .await;
}

/// Messages sent to a queue before anyone consumes it wait there, and all arrive intact once a
/// consumer comes; nothing more arrives after they are acked.
pub async fn queue_keeps_messages_until_consumed(h: Harness) {
    const CASE: &str = "queue_keeps_messages_until_consumed";
    let queue = unique("keep");
    let sent = numbered("conf.kept", 20);
    for envelope in &sent {
        send(&h, &queue, envelope.clone(), CASE).await;
    }
    let mut consumer = consume(&h, &queue, ConsumeOptions::default(), CASE).await;
    let arrivals = receive_all(&mut consumer, &ids(&sent), h.receive_timeout, CASE).await;
    assert_all_intact(&sent, &arrivals, CASE);
    for r in &arrivals {
        assert_eq!(r.source, queue, "{CASE}: Delivery::source");
    }
    assert_nothing_else(&mut consumer, h.quiet_period, &ids(&sent), CASE).await;
}

/// One subscriber gets each key's messages in publish order, with four keys interleaved, while
/// it settles them in batches in reverse order (so an adapter committing offsets must commit
/// only what is contiguous).
pub async fn per_key_order_single_subscriber(h: Harness) {
    const CASE: &str = "per_key_order_single_subscriber";
    const KEYS: usize = 4;
    const PER_KEY: u32 = 15;
    const BATCH: usize = 10;
    if no_per_key_order(CASE, &h.capabilities()) {
        return;
    }
    let topic = unique("order");
    let options = SubscribeOptions::group(format!("{topic}.g1")).with_prefetch(32);
    let mut sub = subscribe(&h, &topic, options, CASE).await;
    let mut sent = Vec::new();
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            sent.push(
                Envelope::new("conf.ordered", format!("key {key} seq {seq}"))
                    .with_key(format!("key-{key}"))
                    .with_header(SEQ, seq.to_string()),
            );
        }
    }
    for envelope in &sent {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }
    let expected = ids(&sent);
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    // Short enough to keep the case quick where the broker hands out one message per key at a
    // time (then a batch is whatever is in flight).
    let flush = (h.quiet_period / 10).max(Duration::from_millis(20));
    while seen.len() < expected.len() {
        let mut batch: Vec<Delivery> = vec![recv(&mut sub, h.receive_timeout, CASE).await];
        while batch.len() < BATCH {
            match next_within(&mut sub, flush, CASE).await {
                Next::Delivery(d) => batch.push(*d),
                Next::Ended | Next::TimedOut => break,
            }
        }
        for d in &batch {
            let env = d.envelope();
            assert!(
                expected.contains(&env.id),
                "{CASE}: received {}, which was not sent here",
                env.id
            );
            seen.insert(env.id.clone());
            let seq = env
                .header(SEQ)
                .and_then(|s| s.parse().ok())
                .expect("sequence header");
            order.push((env.key.clone().expect("key"), seq));
        }
        for d in batch.into_iter().rev() {
            ack(d, CASE).await;
        }
    }
    assert_per_key_order(order, KEYS, PER_KEY, CASE);
    assert_nothing_else(&mut sub, h.quiet_period, &expected, CASE).await;
}

/// Two members of one group, each processing one message at a time with varying work, settle
/// each key's messages in publish order: a key is never in flight at two members at once.
/// Keys are published in runs of consecutive messages, so both members have the chance.
pub async fn per_key_order_across_members(h: Harness) {
    const CASE: &str = "per_key_order_across_members";
    const KEYS: usize = 5;
    const PER_KEY: u32 = 12;
    const RUN: u32 = 4;
    let caps = h.capabilities();
    if !caps.per_key_order_across_members {
        skip(
            CASE,
            format!(
                "{} does not keep per-key order across members \
                 (Capabilities::per_key_order_across_members is false)",
                caps.name
            ),
        );
        return;
    }
    let topic = unique("korder");
    let group = format!("{topic}.g1");
    let mut subs = Vec::new();
    for _ in 0..2 {
        subs.push(
            subscribe(
                &h,
                &topic,
                SubscribeOptions::group(&group).with_prefetch(8),
                CASE,
            )
            .await,
        );
    }
    // Runs of one key, published before the members start, so that both members could take
    // the same key at once; even messages take longer, so that if the broker let them, the odd
    // one after would finish first.
    let mut sent = Vec::new();
    for run in 0..PER_KEY / RUN {
        for key in 0..KEYS {
            for seq in run * RUN..(run + 1) * RUN {
                sent.push(
                    Envelope::new("conf.ordered", format!("key {key} seq {seq}"))
                        .with_key(format!("key-{key}"))
                        .with_header(SEQ, seq.to_string()),
                );
            }
        }
    }
    for envelope in &sent {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }
    let mut members = Members::start(
        subs,
        |_, seq| Duration::from_millis(if seq % 2 == 0 { 3 } else { 0 }),
        CASE,
    );
    let expected = ids(&sent);
    let mut seen: HashSet<MessageId> = HashSet::new();
    let mut order = Vec::new();
    while seen.len() < expected.len() {
        let count = seen.len();
        let progress = || format!("{count} of {} messages arrived", expected.len());
        let (_, done) = members.next(h.receive_timeout, progress, CASE).await;
        assert!(
            expected.contains(&done.id),
            "{CASE}: received {}, which was not sent here",
            done.id
        );
        order.push((done.key.expect("key"), done.seq.expect("sequence header")));
        seen.insert(done.id);
    }
    members.stop(CASE).await;
    assert_per_key_order(order, KEYS, PER_KEY, CASE);
}

/// Closing a group's only subscription and opening a new one loses nothing: deliveries held
/// unacked when it closed come back, and messages published while nobody was subscribed
/// arrive; the ones acked before do not.
pub async fn resubscribe_in_same_group_loses_nothing(h: Harness) {
    const CASE: &str = "resubscribe_in_same_group_loses_nothing";
    if no_groups(CASE, &h.capabilities()) {
        return;
    }
    let topic = unique("resub");
    let group = format!("{topic}.g1");
    let options = SubscribeOptions::group(&group).with_prefetch(20);
    let mut first = subscribe(&h, &topic, options, CASE).await;
    let before = numbered("conf.before_close", 10);
    for envelope in &before {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }
    let expected = ids(&before);
    let mut held = Vec::new();
    let mut acked = HashSet::new();
    let mut seen = HashSet::new();
    while seen.len() < expected.len() {
        let d = recv(&mut first, h.receive_timeout, CASE).await;
        let id = d.envelope().id.clone();
        assert!(
            expected.contains(&id),
            "{CASE}: received {id}, which was not sent here"
        );
        if !seen.insert(id.clone()) {
            ack(d, CASE).await;
        } else if seen.len() % 2 == 0 {
            ack(d, CASE).await;
            acked.insert(id);
        } else {
            held.push(d);
        }
    }
    first
        .close()
        .await
        .unwrap_or_else(|e| panic!("{CASE}: closing the subscription failed: {e}"));
    // Dropped unsettled after the close: these must go back to the group.
    let unacked: HashSet<MessageId> = held.iter().map(|d| d.envelope().id.clone()).collect();
    drop(held);
    let during = numbered("conf.while_away", 10);
    for envelope in &during {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }
    let mut second = subscribe(&h, &topic, SubscribeOptions::group(&group), CASE).await;
    let mut wanted: HashSet<MessageId> = unacked.clone();
    wanted.extend(ids(&during));
    let mut got = HashSet::new();
    while got.len() < wanted.len() {
        let d = match next_within(&mut second, h.receive_timeout, CASE).await {
            Next::Delivery(d) => *d,
            _ => {
                let missing_unacked = unacked.difference(&got).count();
                let missing_new = wanted.len() - got.len() - missing_unacked;
                panic!(
                    "{CASE}: after resubscribing, {missing_unacked} message(s) left unacked at \
                     close and {missing_new} published while away did not arrive within {:?}",
                    h.receive_timeout
                );
            }
        };
        let id = d.envelope().id.clone();
        assert!(
            !acked.contains(&id),
            "{CASE}: {id} was acked before the close, yet came again"
        );
        assert!(
            wanted.contains(&id),
            "{CASE}: received {id}, which was not sent here"
        );
        got.insert(id);
        ack(d, CASE).await;
    }
}

/// Messages acked before a subscription closes do not come to the next subscription of the
/// same group.
pub async fn acked_messages_not_redelivered_after_resubscribe(h: Harness) {
    const CASE: &str = "acked_messages_not_redelivered_after_resubscribe";
    if no_groups(CASE, &h.capabilities()) {
        return;
    }
    let topic = unique("acked");
    let group = format!("{topic}.g1");
    let mut first = subscribe(&h, &topic, SubscribeOptions::group(&group), CASE).await;
    let sent = numbered("conf.acked", 10);
    for envelope in &sent {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }
    receive_all(&mut first, &ids(&sent), h.receive_timeout, CASE).await;
    first
        .close()
        .await
        .unwrap_or_else(|e| panic!("{CASE}: closing the subscription failed: {e}"));
    let mut second = subscribe(&h, &topic, SubscribeOptions::group(&group), CASE).await;
    // A marker shows the new subscription is live before watching for strays.
    let marker = Envelope::new("conf.marker", "marker");
    publish(&h, &topic, marker.clone(), CASE).await;
    let d = recv(&mut second, h.receive_timeout, CASE).await;
    assert_eq!(
        d.envelope().id,
        marker.id,
        "{CASE}: expected only the marker, got {} (kind `{}`, attempt {}): acked before the close",
        d.envelope().id,
        d.envelope().kind,
        d.attempt()
    );
    ack(d, CASE).await;
    assert_quiet(&mut second, h.quiet_period, CASE).await;
}

/// Many tasks subscribing to and closing (or dropping) members of a group, and private
/// subscriptions, while messages are published, neither panic nor take messages away from the
/// member that stays.
pub async fn concurrent_subscribe_close(h: Harness) {
    const CASE: &str = "concurrent_subscribe_close";
    const TASKS: usize = 6;
    const ROUNDS: usize = 3;
    let topic = unique("churn");
    let group = format!("{topic}.g1");
    let grouped = h.capabilities().consumer_groups;
    let stay_options = if grouped {
        SubscribeOptions::group(&group)
    } else {
        SubscribeOptions::default()
    };
    let mut stay = subscribe(&h, &topic, stay_options, CASE).await;
    let churn: Vec<_> = (0..TASKS)
        .map(|task| {
            let (h, topic, group) = (h.clone(), topic.clone(), group.clone());
            tokio::spawn(async move {
                for round in 0..ROUNDS {
                    // Members of the stayer's group only where groups exist; private ones always.
                    let options = if grouped && task % 3 != 2 {
                        SubscribeOptions::group(&group)
                    } else {
                        SubscribeOptions::default()
                    };
                    let mut sub = h
                        .broker
                        .subscribe(&topic, options)
                        .await
                        .unwrap_or_else(|e| panic!("{CASE}: task {task}: subscribe failed: {e}"));
                    tokio::task::yield_now().await;
                    if (task + round) % 2 == 0 {
                        sub.close()
                            .await
                            .unwrap_or_else(|e| panic!("{CASE}: task {task}: close failed: {e}"));
                        assert!(
                            sub.next().await.is_none(),
                            "{CASE}: a closed subscription yielded"
                        );
                    } else {
                        drop(sub);
                    }
                }
            })
        })
        .collect();
    let sent = numbered("conf.churn", 60);
    let publisher = {
        let (h, topic, sent) = (h.clone(), topic.clone(), sent.clone());
        tokio::spawn(async move {
            for envelope in sent {
                publish(&h, &topic, envelope, CASE).await;
                tokio::task::yield_now().await;
            }
        })
    };
    let arrivals = receive_all(&mut stay, &ids(&sent), h.receive_timeout, CASE).await;
    assert_all_intact(&sent, &arrivals, CASE);
    publisher.await.expect("publisher task");
    for task in churn {
        task.await
            .unwrap_or_else(|e| panic!("{CASE}: a subscribe/close task failed: {e}"));
    }
}
