//! The capability table of docs/ARCHITECTURE.md (section 7) says what every adapter's
//! `Broker::capabilities()` returns: this test connects to each configured broker (in each
//! configuration the table has a column for) and compares, cell by cell.
//!
//! The memory broker always runs. Each other broker runs when its `BUS_TEST_<BROKER>_URL` is
//! set (scripts/test.sh sets them); with `BUS_REQUIRE_BROKERS=1` a missing URL fails the test.

use bus_core::conformance::broker_url;
use std::collections::BTreeMap;

use bus::{Capabilities, Support};

const ARCHITECTURE: &str = include_str!("../../docs/ARCHITECTURE.md");
const START: &str = "<!-- capabilities table: checked by tests/tests/capabilities.rs -->";
const END: &str = "<!-- end of capabilities table -->";

/// The columns of the table: a heading, the broker's URL variable (none: memory) and what the
/// configuration adds to its URL's query.
const COLUMNS: &[(&str, Option<&str>, &str)] = &[
    ("memory", None, ""),
    ("NATS", Some("BUS_TEST_NATS_URL"), ""),
    (
        "NATS `durable=false`",
        Some("BUS_TEST_NATS_URL"),
        "durable=false",
    ),
    ("RabbitMQ", Some("BUS_TEST_RABBITMQ_URL"), ""),
    (
        "RabbitMQ `quorum_queues=true`",
        Some("BUS_TEST_RABBITMQ_URL"),
        "quorum_queues=true",
    ),
    ("Kafka", Some("BUS_TEST_KAFKA_URL"), ""),
    ("SQS", Some("BUS_TEST_SQS_URL"), ""),
    ("SQS `fifo=true`", Some("BUS_TEST_SQS_URL"), "fifo=true"),
    (
        "SQS `max_receive_count=5`",
        Some("BUS_TEST_SQS_URL"),
        "max_receive_count=5",
    ),
];

/// Each row of the table: its first cell (the `Capabilities` field) and how to read it.
fn rows(caps: &Capabilities) -> Vec<(&'static str, String)> {
    let flag = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let support = |s: Support| match s {
        Support::Native => "native".to_owned(),
        Support::Emulated => "emulated".to_owned(),
        _ => "unsupported".to_owned(),
    };
    vec![
        ("`durable`", flag(caps.durable)),
        ("`consumer_groups`", flag(caps.consumer_groups)),
        ("`per_key_order`", flag(caps.per_key_order)),
        (
            "`per_key_order_across_members`",
            flag(caps.per_key_order_across_members),
        ),
        (
            "`key_order_across_retries`",
            support(caps.key_order_across_retries),
        ),
        ("`request_reply`", support(caps.request_reply)),
        (
            "`no_responders_detection`",
            flag(caps.no_responders_detection),
        ),
        ("`delayed_redelivery`", support(caps.delayed_redelivery)),
        ("`dead_letter`", support(caps.dead_letter)),
        (
            "`prompt_redelivery_of_dropped`",
            flag(caps.prompt_redelivery_of_dropped),
        ),
        ("`delivery_count`", support(caps.delivery_count)),
        ("`delayed_publish`", support(caps.delayed_publish)),
        (
            "`max_delay`",
            caps.max_delay.map_or("none".to_owned(), |max| {
                format!("{:.1} days", max.as_secs_f64() / 86_400.0)
            }),
        ),
        ("`backlog`", support(caps.backlog)),
    ]
}

/// The table between the markers, as (row, column) → cell.
fn documented() -> BTreeMap<(String, String), String> {
    let start = ARCHITECTURE.find(START).expect("the table's start marker") + START.len();
    let end = ARCHITECTURE[start..]
        .find(END)
        .expect("the table's end marker")
        + start;
    let cells = |line: &str| -> Vec<String> {
        line.trim()
            .trim_matches('|')
            .split('|')
            .map(|cell| cell.trim().to_owned())
            .collect()
    };
    let mut lines = ARCHITECTURE[start..end]
        .lines()
        .filter(|line| line.trim_start().starts_with('|'));
    let header = cells(lines.next().expect("a header row"));
    lines.next().expect("the separator row");
    let mut table = BTreeMap::new();
    for line in lines {
        let row = cells(line);
        assert_eq!(
            row.len(),
            header.len(),
            "a row of {} cells: {line}",
            row.len()
        );
        for (column, cell) in header.iter().zip(&row).skip(1) {
            table.insert((row[0].clone(), column.clone()), cell.clone());
        }
    }
    table
}

fn with_query(url: &str, query: &str) -> String {
    if query.is_empty() {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&{query}")
    } else {
        format!("{url}?{query}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_capabilities_are_the_adapters() {
    let table = documented();
    let mut differences = Vec::new();
    let mut checked = 0;
    for (column, var, query) in COLUMNS {
        let url = match var {
            None => "memory://".to_owned(),
            Some(var) => match broker_url(var) {
                Some(url) => with_query(&url, query),
                None => continue,
            },
        };
        let bus = bus::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connecting for the column `{column}`: {e}"));
        for (row, actual) in rows(&bus.capabilities()) {
            let key = (row.to_owned(), (*column).to_owned());
            match table.get(&key) {
                Some(cell) if *cell == actual => checked += 1,
                Some(cell) => differences.push(format!(
                    "{row} for {column}: the docs say `{cell}`, the adapter `{actual}`"
                )),
                None => differences.push(format!("{row} for {column}: not in the table")),
            }
        }
        bus.close().await.expect("close");
    }
    assert!(
        differences.is_empty(),
        "docs/ARCHITECTURE.md's capability table disagrees with the adapters:\n{}",
        differences.join("\n")
    );
    println!("capabilities: {checked} cells of the documented table checked");
}
