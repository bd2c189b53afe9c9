//! A tansu of a test's own, on SQLite storage (which survives a restart), on its own port, in
//! a fresh directory: the shared test broker keeps its data in memory, and restarting it
//! would lose what it had confirmed, which proves nothing about the adapter.
#![allow(dead_code)] // each test binary uses part of it

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The `tansu` binary: on `PATH` or in `~/.cargo/bin`.
pub(crate) fn binary() -> Option<PathBuf> {
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

/// The tansu binary if the Kafka tests are on (`BUS_TEST_KAFKA_URL`); `None` (the test is
/// skipped) when it is not installed, unless `BUS_REQUIRE_BROKERS=1`, which fails.
pub(crate) fn required_binary() -> Option<PathBuf> {
    bus_core::conformance::broker_url("BUS_TEST_KAFKA_URL")?;
    let found = binary();
    if found.is_none() {
        let required = std::env::var("BUS_REQUIRE_BROKERS").is_ok_and(|v| v.trim() == "1");
        assert!(
            !required,
            "tansu is not installed (scripts/brokers.sh install kafka)"
        );
        println!("skipped: tansu is not installed");
    }
    found
}

/// A running tansu of the test's own.
pub(crate) struct Tansu {
    binary: PathBuf,
    port: u16,
    advertised_port: u16,
    authentication: bool,
    dir: PathBuf,
    child: Option<Child>,
}

impl Tansu {
    /// Starts tansu on `127.0.0.1:port` with SQLite storage in a fresh directory.
    pub(crate) async fn start(binary: PathBuf, port: u16) -> Self {
        Self::start_advertising(binary, port, port).await
    }

    /// Starts tansu on `127.0.0.1:port`, telling clients (in metadata) to connect to
    /// `localhost:advertised_port`: where a TLS terminator in front of it listens.
    pub(crate) async fn start_advertising(
        binary: PathBuf,
        port: u16,
        advertised_port: u16,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("bus-kafka-tansu-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut tansu = Self {
            binary,
            port,
            advertised_port,
            authentication: false,
            dir,
            child: None,
        };
        tansu.up().await;
        tansu
    }

    /// `host:port` for `KafkaConfig::new`.
    pub(crate) fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (no clean shutdown) and waits until its port is closed.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("stop tansu");
        }
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("tansu still listens on {} after it was killed", self.port);
    }

    /// Freezes the broker (SIGSTOP): connections stay open, requests go unanswered.
    pub(crate) fn freeze(&self) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("tansu is running");
        let status = std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -STOP {pid}");
    }

    /// Starts the broker again on the same storage and waits until it listens.
    pub(crate) async fn up(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .expect("log file");
        let child = Command::new(&self.binary)
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://localhost:{}", self.advertised_port))
            .args(self.authentication.then_some("--authentication"))
            .arg("--storage-engine")
            .arg(format!("sqlite://{}/tansu.db", self.dir.display()))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            // tansu reads the path of a sqlite:// URL relative to its working directory.
            .current_dir("/")
            .kill_on_drop(true)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "tansu did not listen on {} within 10 s (log: {})",
            self.port,
            self.dir.display()
        );
    }

    /// Kills the broker, then starts it again requiring SASL authentication (`--authentication`;
    /// tansu checks SCRAM passwords against its storage, and accepts any PLAIN password).
    pub(crate) async fn restart_with_authentication(&mut self) {
        self.authentication = true;
        self.restart().await;
    }

    /// Kills the broker, then starts it again.
    pub(crate) async fn restart(&mut self) {
        self.kill().await;
        self.up().await;
    }

    /// Where its storage and log are.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        // A failed test keeps the storage and the log.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
