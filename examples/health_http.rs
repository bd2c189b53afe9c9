//! A service's health behind an HTTP endpoint, with axum: `GET /health` answers the
//! `ServiceHealth` of `ServiceHandle::health_watch()` as JSON, `200 OK` while the service is
//! ready or degraded (it still works; `bus` retries) and `503 Service Unavailable` once it is
//! down (a readiness probe takes it out of rotation).
//!
//! ```text
//! cargo run -p examples --example health_http                # serves on 127.0.0.1:8080 until Ctrl-C
//! curl -i http://127.0.0.1:8080/health
//! cargo run -p examples --example health_http -- --once      # asks itself once, prints, exits
//! ```
//!
//! `--once` (what scripts/test.sh runs) serves on a free port, sends one `GET /health` over a
//! plain TCP connection, prints the answer, checks it says `ready`, then stops the service, so
//! the server answers `503` and `down`, checks that too and exits (non-zero if either answer
//! was not the expected one). `BUS_URL` picks the broker (`memory://` when unset).
//! `HealthWatch` outlives the service's handle, so the server keeps answering after the
//! service stopped.

use std::error::Error;
use std::net::SocketAddr;
use std::process::ExitCode;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use bus::service::{Health, HealthWatch, ServiceHealth};
use bus::{BusConfig, Context, Message, Service};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
}

impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
}

async fn bill(order: OrderPlaced, _ctx: Context) -> bus::Result<()> {
    println!("billing {}", order.order_id);
    Ok(())
}

/// `GET /health`: the service's health as JSON; 503 when it is down.
async fn health(State(watch): State<HealthWatch>) -> (StatusCode, Json<Value>) {
    let health = watch.current();
    let status = if health.status == Health::Down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(to_json(&health)))
}

fn to_json(health: &ServiceHealth) -> Value {
    json!({
        "service": health.service,
        "status": health.status.as_str(),
        "broker": { "status": health.broker.status.as_str(), "reason": health.broker.reason },
        "subscriptions": health.subscriptions.iter().map(|s| json!({
            "channel": s.channel.to_string(),
            "name": s.name,
            "group": s.group,
            "status": s.status.as_str(),
            "reason": s.reason,
        })).collect::<Vec<_>>(),
        "summary": health.to_string(),
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("health_http failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn Error + Send + Sync>> {
    let once = std::env::args().any(|arg| arg == "--once");
    let bus = BusConfig::from_env()?.connect().await?;
    let billing = Service::new("billing", bus.clone())
        .on("orders", bill)
        .start()
        .await?;

    let app = Router::new()
        .route("/health", get(health))
        .with_state(billing.health_watch());
    let listener = TcpListener::bind(if once {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:8080"
    })
    .await?;
    let addr = listener.local_addr()?;
    println!("serving http://{addr}/health");
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = server_stopped.await;
            })
            .await
    });

    if once {
        let (status, body) = get_health(addr).await?;
        println!("GET /health while running: {status}\n{body}");
        if status != 200 || !body.contains(r#""status":"ready""#) {
            return Err(format!("expected 200 and ready, got {status}: {body}").into());
        }
        billing.stop().await;
        let (status, body) = get_health(addr).await?;
        println!("GET /health after the service stopped: {status}\n{body}");
        if status != 503 || !body.contains(r#""status":"down""#) {
            return Err(format!("expected 503 and down, got {status}: {body}").into());
        }
    } else {
        bus::shutdown_signal()?.await;
        billing.stop().await;
    }
    let _ = stop_server.send(());
    server.await??;
    bus.close().await?;
    Ok(())
}

/// One `GET /health` over a plain TCP connection: the status code and the body.
async fn get_health(addr: SocketAddr) -> Result<(u16, String), Box<dyn Error + Send + Sync>> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("no end of headers in the response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or("no status code in the response")?;
    Ok((status, body.to_owned()))
}
