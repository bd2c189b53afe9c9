//! The command line: what each command takes (clap derive).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};

/// The long help's closing note, shown by `bus --help`.
const AFTER_HELP: &str = "\
The broker is named by --url or the BUS_URL environment variable: memory://, nats://…, \
amqp://…, kafka://…, sqs://… (the schemes and query parameters of bus::connect). URLs are \
shown with their passwords, tokens and secret parameters replaced by ***.

memory:// is a broker inside this process: it starts empty and ends with the command, so \
only commands that both publish and read in one run (check, bench) make sense on it.

Exit status: 0 on success, 1 when the command failed (broker unreachable, wrong URL, a \
message not found, a timeout before --count was reached), 2 for a command line error.";

/// One command-line tool for every broker `bus` speaks.
#[derive(Debug, Parser)]
#[command(name = "bus", version, about, after_help = AFTER_HELP)]
pub(crate) struct Cli {
    /// The broker's URL.
    #[arg(long, env = "BUS_URL", global = true, hide_env_values = true)]
    pub(crate) url: Option<String>,

    /// Machine-readable output: JSON (one object, or one per line for `tail`).
    #[arg(long, global = true)]
    pub(crate) json: bool,

    /// How long to wait for the broker to accept the connection.
    #[arg(long, global = true, default_value = "10s", value_parser = duration)]
    pub(crate) connect_timeout: Duration,

    /// The command.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Publish a message to a topic (or send it to a queue with --queue).
    Publish(PublishArgs),
    /// Follow a topic in a private group (it takes no message from other groups) and print
    /// what arrives.
    Tail(TailArgs),
    /// Inspect and redrive the dead-letter queue (`<name>.dlq`) of a topic or queue.
    Dlq(DlqArgs),
    /// Connect, round-trip one message on a private topic, print the broker's capabilities.
    Check(CheckArgs),
    /// Publish and consume throughput: messages per second, with progress bars.
    Bench(BenchArgs),
    /// How many messages wait for a consumer group on a topic, or in a queue.
    Lag(LagArgs),
}

/// A topic, or a queue with `--queue`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Target {
    /// The topic.
    pub(crate) topic: Option<String>,
    /// A work queue instead of a topic.
    #[arg(long, value_name = "QUEUE")]
    pub(crate) queue: Option<String>,
}

/// Where a topic's or queue's messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Destination {
    /// Published: every group of the topic receives it.
    Topic(String),
    /// Sent: one consumer of the queue receives it.
    Queue(String),
}

impl Destination {
    /// The topic's or queue's name.
    pub(crate) fn name(&self) -> &str {
        match self {
            Destination::Topic(name) | Destination::Queue(name) => name,
        }
    }

    /// `topic` or `queue`.
    pub(crate) fn noun(&self) -> &'static str {
        match self {
            Destination::Topic(_) => "topic",
            Destination::Queue(_) => "queue",
        }
    }
}

impl Target {
    /// The topic or the queue given.
    pub(crate) fn destination(&self) -> Destination {
        match (&self.topic, &self.queue) {
            (_, Some(queue)) => Destination::Queue(queue.clone()),
            (Some(topic), None) => Destination::Topic(topic.clone()),
            // clap's group makes one of the two required.
            (None, None) => unreachable!("clap requires a topic or --queue"),
        }
    }
}

/// `bus publish`.
#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// Where to publish.
    #[command(flatten)]
    pub(crate) target: Target,
    /// The payload; without it (and without --file) the payload is read from standard input.
    #[arg(long, short = 'm', value_name = "TEXT", conflicts_with = "file")]
    pub(crate) message: Option<String>,
    /// Read the payload from this file (`-` for standard input).
    #[arg(long, short = 'f', value_name = "PATH")]
    pub(crate) file: Option<PathBuf>,
    /// The message's kind (CloudEvents type), e.g. `order.placed`.
    #[arg(long, default_value = "bus.cli.message")]
    pub(crate) kind: String,
    /// The ordering / partition key.
    #[arg(long)]
    pub(crate) key: Option<String>,
    /// A header, `name=value`; repeat for more.
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE", value_parser = header)]
    pub(crate) headers: Vec<(String, String)>,
    /// The correlation id (the message's own id when not given).
    #[arg(long)]
    pub(crate) correlation: Option<String>,
    /// The payload's media type, e.g. `application/json`.
    #[arg(long)]
    pub(crate) content_type: Option<String>,
    /// Publish this many copies, each with its own id (a progress bar shows when above 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) count: u64,
    /// Deliver it only after this long (`30s`, `5m`, `1h 30m`): the broker's delayed publish,
    /// native or emulated as `bus check` shows (`delayed_publish`, `max_delay`).
    #[arg(long, value_parser = duration)]
    pub(crate) delay: Option<Duration>,
    /// Deliver it not before this time (RFC 3339, e.g. `2026-12-24T18:00:00Z`); a time past
    /// is at once.
    #[arg(long, value_name = "TIME", value_parser = time, conflicts_with = "delay")]
    pub(crate) not_before: Option<SystemTime>,
}

/// `bus lag`.
#[derive(Debug, Args)]
pub(crate) struct LagArgs {
    /// The topic whose consumer groups (--group) to measure.
    #[arg(requires = "groups")]
    pub(crate) topic: Option<String>,
    /// A consumer group of TOPIC; repeat for more. The group must have subscribed once.
    #[arg(long = "group", value_name = "GROUP", requires = "topic")]
    pub(crate) groups: Vec<String>,
    /// A queue (also a dead-letter queue such as `orders.dlq`); repeat for more.
    #[arg(
        long = "queue",
        value_name = "QUEUE",
        required_unless_present = "topic"
    )]
    pub(crate) queues: Vec<String>,
    /// Measure again every INTERVAL (2s when no interval is given) until Ctrl-C.
    #[arg(
        long,
        value_name = "INTERVAL",
        num_args = 0..=1,
        default_missing_value = "2s",
        value_parser = duration
    )]
    pub(crate) watch: Option<Duration>,
}

/// `bus tail`.
#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// What to follow.
    #[command(flatten)]
    pub(crate) target: Target,
    /// Required with --queue: reading a queue consumes its messages (they are acknowledged and
    /// gone for the queue's other consumers).
    #[arg(long)]
    pub(crate) consume: bool,
    /// Print only messages of this kind.
    #[arg(long)]
    pub(crate) kind: Option<String>,
    /// Print only messages with this correlation id.
    #[arg(long)]
    pub(crate) correlation: Option<String>,
    /// Stop after this many printed messages.
    #[arg(long)]
    pub(crate) count: Option<u64>,
    /// Stop after this long (an error if --count was given and not reached).
    #[arg(long, value_parser = duration)]
    pub(crate) timeout: Option<Duration>,
}

/// `bus dlq`.
#[derive(Debug, Args)]
pub(crate) struct DlqArgs {
    /// What to do with the dead letters.
    #[command(subcommand)]
    pub(crate) command: DlqCommand,
}

/// The `bus dlq` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List the dead letters, with counts by reason. They stay in the dead-letter queue.
    List(DlqListArgs),
    /// Show one dead letter whole: headers and payload. It stays in the dead-letter queue.
    Show(DlqShowArgs),
    /// Move dead letters back to their topic or queue (all, or those selected by --id and
    /// --kind), acknowledging each only after it was sent back.
    Redrive(DlqRedriveArgs),
}

/// How a dead-letter queue is read: its owner's name and how long to wait.
#[derive(Debug, Args)]
pub(crate) struct DlqRead {
    /// The topic (or, with --queue, the queue) whose dead letters to read.
    pub(crate) name: String,
    /// NAME is a work queue: redriven messages are sent to it rather than published.
    #[arg(long)]
    pub(crate) queue: bool,
    /// Reading ends once no dead letter arrived for this long.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub(crate) idle: Duration,
    /// How long to wait for the first dead letter (attaching a consumer takes a while on
    /// some brokers, Kafka's group join above all).
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub(crate) wait: Duration,
    /// Read at most this many dead letters (they are all held unsettled until the end, so
    /// each is seen once).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) limit: u64,
}

/// `bus dlq list`.
#[derive(Debug, Args)]
pub(crate) struct DlqListArgs {
    /// Which dead-letter queue, and how to read it.
    #[command(flatten)]
    pub(crate) read: DlqRead,
}

/// `bus dlq show`.
#[derive(Debug, Args)]
pub(crate) struct DlqShowArgs {
    /// Which dead-letter queue, and how to read it.
    #[command(flatten)]
    pub(crate) read: DlqRead,
    /// The dead letter's message id.
    pub(crate) id: String,
}

/// `bus dlq redrive`.
#[derive(Debug, Args)]
pub(crate) struct DlqRedriveArgs {
    /// Which dead-letter queue, and how to read it.
    #[command(flatten)]
    pub(crate) read: DlqRead,
    /// Redrive only the message with this id; repeat for more.
    #[arg(long = "id", value_name = "ID")]
    pub(crate) ids: Vec<String>,
    /// Redrive only messages of this kind.
    #[arg(long)]
    pub(crate) kind: Option<String>,
    /// Print what would move, and move nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

/// `bus check`.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// How long to wait for the round-trip message.
    #[arg(long, default_value = "20s", value_parser = duration)]
    pub(crate) timeout: Duration,
}

/// `bus bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Messages per round. On memory:// more than the broker's capacity (10,000 unless the
    /// URL sets `capacity`) fails with Backpressure: all are published before any is consumed.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    pub(crate) size: usize,
    /// Rounds (the table shows the median and the range).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) rounds: u64,
    /// Unsettled deliveries the consumer may hold (the adapter benches use 256).
    #[arg(long, default_value_t = 256)]
    pub(crate) prefetch: usize,
    /// Messages per `publish_batch` (the adapter benches' window: 1,000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) batch: u64,
}

/// A humantime duration: `500ms`, `2s`, `1m 30s`.
fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration: {e}"))
}

/// An RFC 3339 time.
fn time(text: &str) -> Result<SystemTime, String> {
    bus::headers::parse_time(text).map_err(|e| e.message().to_owned())
}

/// A `name=value` header.
fn header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!("`{text}` is not name=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn headers_and_durations_parse() {
        assert_eq!(header("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(header("novalue").is_err());
        assert!(header("=x").is_err());
        assert_eq!(duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert!(duration("soon").is_err());
        assert!(time("2026-12-24T18:00:00Z").is_ok());
        assert!(time("tomorrow").is_err());
    }
}
