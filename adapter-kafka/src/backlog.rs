//! Backlog counts: per partition of the topic, the end offset less the group's committed one.

use std::sync::Arc;
use std::time::Duration;

use bus_core::{Backlog, BacklogOf, Error, ErrorKind, PartitionBacklog, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::broker::Shared;
use crate::oauth::Auth;
use crate::{error, names};

/// How long each of the broker's answers (metadata, committed offsets, watermarks) may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The backlog of `of`: the lag of the group (a queue's group, `bus.queue.<queue>`) on every
/// partition of the topic, from the watermarks and the group's committed offsets, read by a
/// short-lived client of the group that joins nothing.
pub(crate) async fn backlog(shared: &Arc<Shared>, of: &BacklogOf) -> Result<Backlog> {
    shared.check_open()?;
    let (topic, group, is_queue) = match of {
        BacklogOf::Group { topic, group } => (topic.clone(), group.clone(), false),
        BacklogOf::Queue(name) => (name.clone(), names::queue_group(name), true),
        other => {
            return Err(Error::unsupported(format!(
                "cannot count the backlog of {other}"
            )))
        }
    };
    names::check_topic(topic.trim_end_matches(".dlq"))?;
    let config = shared.config.consumer_config(&group)?;
    let auth = Auth::new(shared.config.token_provider());
    let shown = of.to_string();
    let partitions = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer<Auth> = config
            .create_with_context(auth.clone())
            .map_err(|e| error::map(e, "creating a Kafka client to count the backlog"))?;
        auth.prime(ANSWER_TIMEOUT, || {
            let _ = consumer.poll(Duration::from_millis(50));
        });
        count(&consumer, &topic)
    })
    .await
    .map_err(|e| Error::with_source(ErrorKind::Other, "backlog task", e))??;
    // A group that never subscribed has committed nothing (its first assignment commits
    // where it starts); a queue is read from its beginning, committed or not.
    if !is_queue && partitions.iter().all(|p| p.committed.is_none()) {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "{shown}: the group has committed no offset on the topic (it never subscribed)"
            ),
        ));
    }
    let mut backlog = Backlog::default();
    backlog.waiting = partitions.iter().map(|p| p.lag).sum();
    backlog.partitions = partitions;
    Ok(backlog)
}

/// Every partition of `topic` with its watermarks and the consumer's group's committed offset.
fn count(consumer: &BaseConsumer<Auth>, topic: &str) -> Result<Vec<PartitionBacklog>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), ANSWER_TIMEOUT)
        .map_err(|e| error::map(e, format!("looking up Kafka topic `{topic}`")))?;
    let ids: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if ids.is_empty() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("Kafka topic `{topic}` does not exist"),
        ));
    }
    let mut tpl = TopicPartitionList::new();
    for &id in &ids {
        tpl.add_partition(topic, id);
    }
    let committed = consumer
        .committed_offsets(tpl, ANSWER_TIMEOUT)
        .map_err(|e| error::map(e, format!("fetching the committed offsets on `{topic}`")))?;
    let mut partitions = Vec::with_capacity(ids.len());
    for id in ids {
        let (low, high) = consumer
            .fetch_watermarks(topic, id, ANSWER_TIMEOUT)
            .map_err(|e| error::map(e, format!("fetching the offsets of `{topic}` [{id}]")))?;
        let committed = committed
            .find_partition(topic, id)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            });
        partitions.push(PartitionBacklog::new(id, low, high, committed));
    }
    partitions.sort_by_key(|p| p.partition);
    Ok(partitions)
}
