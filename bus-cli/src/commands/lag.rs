//! `bus lag`: the backlog of consumer groups and queues (`Broker::backlog`), once or
//! refreshed with `--watch`.

use std::time::Duration;

use bus::{Backlog, BacklogOf, Bus};
use comfy_table::Table;
use serde_json::{json, Value};

use super::failed;
use crate::cli::LagArgs;
use crate::output::{print_json, table};

/// Runs `bus lag`.
pub(crate) async fn run(bus: &Bus, args: &LagArgs, json: bool) -> Result<(), String> {
    let targets = targets(args);
    loop {
        let mut measured = Vec::new();
        for of in &targets {
            let backlog = bus
                .broker()
                .backlog(of)
                .await
                .map_err(|e| failed(&format!("measuring the backlog of {of}"), e))?;
            measured.push((of, backlog));
        }
        if json {
            // One line per measurement, so that `--watch --json` is a stream of JSON lines.
            print_json(&json!({
                "at": bus::headers::format_time(std::time::SystemTime::now()),
                "backlogs": measured.iter().map(|(of, b)| backlog_json(of, b)).collect::<Vec<_>>(),
            }));
        } else {
            print_tables(&measured, args.watch.is_some());
        }
        let Some(interval) = args.watch else {
            return Ok(());
        };
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn targets(args: &LagArgs) -> Vec<BacklogOf> {
    let groups = args.topic.iter().flat_map(|topic| {
        args.groups
            .iter()
            .map(move |group| BacklogOf::group(topic.clone(), group.clone()))
    });
    groups
        .chain(args.queues.iter().map(|q| BacklogOf::queue(q.clone())))
        .collect()
}

fn print_tables(measured: &[(&BacklogOf, Backlog)], watching: bool) {
    if watching {
        println!(
            "{}",
            bus::headers::format_time(std::time::SystemTime::now())
        );
    }
    let mut shown = table(&[
        "of",
        "waiting",
        "in flight",
        "delayed",
        "total",
        "oldest waiting",
    ]);
    let mut approximate = false;
    for (of, backlog) in measured {
        approximate |= backlog.approximate;
        shown.add_row(vec![
            of.to_string(),
            backlog.waiting.to_string(),
            known(backlog.in_flight),
            known(backlog.delayed),
            backlog.total().to_string(),
            backlog.oldest_age.map_or("-".to_owned(), age),
        ]);
    }
    println!("{shown}");
    for (of, backlog) in measured {
        if !backlog.partitions.is_empty() {
            println!("{of}, per partition:\n{}", partitions(backlog));
        }
    }
    if approximate {
        println!("counts are the broker's approximation");
    }
}

fn partitions(backlog: &Backlog) -> Table {
    let mut shown = table(&["partition", "end offset", "committed", "lag"]);
    for p in &backlog.partitions {
        shown.add_row(vec![
            p.partition.to_string(),
            p.end_offset.to_string(),
            p.committed.map_or("none".to_owned(), |c| c.to_string()),
            p.lag.to_string(),
        ]);
    }
    shown
}

/// A count the broker may not report: `-` when it does not.
fn known(count: Option<u64>) -> String {
    count.map_or("-".to_owned(), |n| n.to_string())
}

/// An age to the second (to the millisecond below one second).
fn age(age: Duration) -> String {
    let rounded = if age < Duration::from_secs(1) {
        Duration::from_millis(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))
    } else {
        Duration::from_secs(age.as_secs())
    };
    humantime::format_duration(rounded).to_string()
}

fn backlog_json(of: &BacklogOf, backlog: &Backlog) -> Value {
    let mut value = match of {
        BacklogOf::Group { topic, group } => json!({ "topic": topic, "group": group }),
        BacklogOf::Queue(queue) => json!({ "queue": queue }),
        other => json!({ "of": other.to_string() }),
    };
    if let Value::Object(object) = &mut value {
        object.insert("waiting".into(), json!(backlog.waiting));
        object.insert("in_flight".into(), json!(backlog.in_flight));
        object.insert("delayed".into(), json!(backlog.delayed));
        object.insert("total".into(), json!(backlog.total()));
        object.insert(
            "oldest_age_ms".into(),
            json!(backlog.oldest_age.map(|a| a.as_millis())),
        );
        object.insert("approximate".into(), json!(backlog.approximate));
        let partitions: Vec<Value> = backlog
            .partitions
            .iter()
            .map(|p| {
                json!({
                    "partition": p.partition,
                    "end_offset": p.end_offset,
                    "committed": p.committed,
                    "lag": p.lag,
                })
            })
            .collect();
        object.insert("partitions".into(), json!(partitions));
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_rounded_for_reading() {
        assert_eq!(age(Duration::from_millis(1_750)), "1s");
        assert_eq!(age(Duration::from_micros(2_500)), "2ms");
        assert_eq!(known(None), "-");
    }
}
