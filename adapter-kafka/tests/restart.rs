//! Broker restart mid-stream: every publish that returned `Ok` is received, before, during and
//! after the restart (duplicates allowed, losses not).
//!
//! The shared test broker keeps its data in memory, and a restart of it would lose what it had
//! confirmed: that would prove nothing about the adapter. So this test starts a tansu of its
//! own on 127.0.0.1:19092 with SQLite storage (`sqlite://…`, which survives the restart), in a
//! fresh directory, and kills and restarts it while a publisher and a subscriber are running.
//! SQLite storage is slow (about 170 msg/s consumed), so the count stays small (100).
//!
//! What it proves: rdkafka reconnects by itself, a publish in flight during the outage either
//! fails or is delivered (never `Ok` and lost), and the group resumes from its committed
//! offsets. What it cannot prove: replication or fsync behaviour of a real Kafka cluster.
//!
//! Runs when `BUS_TEST_KAFKA_URL` is set (the Kafka tests are on) and `tansu` is on `PATH` (or
//! in `~/.cargo/bin`); with `BUS_REQUIRE_BROKERS=1` a missing `tansu` fails.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::conformance::broker_url;
use bus_core::{Broker, Envelope, MessageId, Publisher, SubscribeOptions, Subscriber};
use tokio::process::{Child, Command};

const PORT: u16 = 19092;
const COUNT: usize = 100;

fn tansu_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("tansu"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = PathBuf::from(home).join(".cargo/bin/tansu");
        p.is_file().then_some(p)
    })
}

async fn start(tansu: &PathBuf, dir: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("tansu.log"))
        .expect("log file");
    let child = Command::new(tansu)
        .arg("broker")
        .arg("--listener-url")
        .arg(format!("tcp://127.0.0.1:{PORT}"))
        .arg("--advertised-listener-url")
        .arg(format!("tcp://localhost:{PORT}"))
        .arg("--storage-engine")
        .arg(format!("sqlite://{}/tansu.db", dir.display()))
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        // tansu reads the path of a sqlite:// URL relative to its working directory.
        .current_dir("/")
        .kill_on_drop(true)
        .spawn()
        .expect("start tansu");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", PORT)).is_ok() {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "tansu did not listen on {PORT} within 10 s (log: {})",
        dir.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_no_confirmed_message() {
    if broker_url("BUS_TEST_KAFKA_URL").is_none() {
        return;
    }
    let Some(tansu) = tansu_binary() else {
        let required = std::env::var("BUS_REQUIRE_BROKERS").is_ok_and(|v| v.trim() == "1");
        assert!(
            !required,
            "tansu is not installed (scripts/brokers.sh install kafka)"
        );
        println!("skipped: tansu is not installed");
        return;
    };
    let dir = std::env::temp_dir().join(format!("bus-kafka-restart-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = start(&tansu, &dir).await;

    let config = KafkaConfig::new(format!("127.0.0.1:{PORT}"))
        .with_client_id("bus-restart-test")
        .with_partitions(1);
    let broker = Arc::new(KafkaBroker::connect(config).await.expect("connect"));
    let topic = format!("restart.{}", uuid::Uuid::now_v7().simple());
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(format!("{topic}.g")))
        .await
        .expect("subscribe");

    let confirmed = Arc::new(Mutex::new(HashSet::<MessageId>::new()));
    let publisher = {
        let (broker, topic, confirmed) = (broker.clone(), topic.clone(), confirmed.clone());
        tokio::spawn(async move {
            let mut failed = 0;
            for i in 0..COUNT {
                let envelope = Envelope::new("restart.item", format!("{i}")).with_key("one");
                let id = envelope.id.clone();
                match broker.publish(&topic, envelope).await {
                    Ok(()) => {
                        confirmed.lock().unwrap().insert(id);
                    }
                    Err(e) => {
                        failed += 1;
                        println!("note: publish {i} failed during the restart: {e}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            failed
        })
    };

    let mut received = HashSet::new();
    let mut restarted = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        if !restarted && confirmed.lock().unwrap().len() >= COUNT / 3 {
            server.kill().await.expect("stop tansu");
            tokio::time::sleep(Duration::from_secs(1)).await;
            server = start(&tansu, &dir).await;
            restarted = true;
        }
        let done = publisher.is_finished();
        if done && confirmed.lock().unwrap().is_subset(&received) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} confirmed messages never arrived",
            confirmed.lock().unwrap().difference(&received).count()
        );
        if let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
            match item {
                Ok(d) => {
                    received.insert(d.envelope().id.clone());
                    let _ = d.ack().await;
                }
                Err(e) => println!("note: receive error: {e}"),
            }
        }
    }
    let failed = publisher.await.unwrap();
    let confirmed = confirmed.lock().unwrap().len();
    println!(
        "restart: {confirmed} confirmed, {failed} failed, {} received",
        received.len()
    );
    assert!(restarted, "the broker was restarted");
    assert!(
        confirmed > COUNT / 3,
        "publishing went on after the restart"
    );
    let _ = sub.close().await;
    let _ = broker.close().await;
    let _ = server.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}
