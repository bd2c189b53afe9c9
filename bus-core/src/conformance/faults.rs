//! A TCP proxy on loopback that puts network faults between an adapter and its broker.
//!
//! The fault cases ([`cases::connection_reset_mid_stream_loses_nothing`] and the others next to
//! it) connect the adapter under test to a [`FaultProxy`] instead of the broker, through the
//! hook an adapter gives [`Harness::with_fault_proxy`], and then cut every connection, stop
//! every byte for a while, or slow every byte down, as a network between a service and its
//! broker does.
//!
//! What the proxy does to the bytes:
//! - [`reset`](FaultProxy::reset) aborts every open connection on both sides with a TCP reset
//!   (`SO_LINGER` 0), so the adapter and the broker see the connection fail at once, and any
//!   bytes in flight are lost. New connections are accepted as before.
//! - [`stall`](FaultProxy::stall) stops forwarding in both directions until
//!   [`resume`](FaultProxy::resume); connections stay open and new ones are accepted but not
//!   connected onwards, as a black-holed route does. Nothing is lost: what was held is sent
//!   on resume, unless a side gave up on the connection in the meantime.
//! - [`set_latency`](FaultProxy::set_latency) delays every chunk of bytes by that much.
//!
//! Dropping the last handle aborts every connection and stops listening.
//!
//! [`cases::connection_reset_mid_stream_loses_nothing`]: super::cases::connection_reset_mid_stream_loses_nothing
//! [`Harness::with_fault_proxy`]: super::Harness::with_fault_proxy

use std::any::Any;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Size of the buffer each direction of a proxied connection reads into.
const CHUNK: usize = 16 * 1024;

/// A TCP proxy on `127.0.0.1` that forwards to one upstream address and injects faults on
/// command. Cheap to clone; every clone controls the same proxy.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use bus_core::conformance::FaultProxy;
///
/// let proxy = FaultProxy::start().await?;
/// proxy.forward_to("127.0.0.1:4222".parse().unwrap());
/// // connect the adapter to `proxy.addr()` instead of the broker, then:
/// proxy.reset(); // every connection fails at once
/// proxy.stall(); // no byte moves …
/// proxy.resume(); // … until now
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct FaultProxy {
    shared: Arc<Shared>,
}

/// What the handles hold; its drop (with the last handle) closes the control channels, which
/// ends the accept loop and every connection.
struct Shared {
    addr: SocketAddr,
    control: Control,
    upstream: watch::Sender<Option<SocketAddr>>,
    stalled: watch::Sender<bool>,
    latency: watch::Sender<Duration>,
    generation: watch::Sender<u64>,
    kept: Mutex<Vec<Box<dyn Any + Send>>>,
}

/// What the accept loop and each connection task watch.
#[derive(Clone)]
struct Control {
    upstream: watch::Receiver<Option<SocketAddr>>,
    stalled: watch::Receiver<bool>,
    latency: watch::Receiver<Duration>,
    generation: watch::Receiver<u64>,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    accepted: AtomicU64,
    open: AtomicU64,
    aborted: AtomicU64,
}

impl FaultProxy {
    /// Starts a proxy listening on an ephemeral port of `127.0.0.1`, not yet forwarding
    /// anywhere: connections accepted before [`forward_to`](Self::forward_to) wait for it.
    ///
    /// Must be called within a tokio runtime; the proxy's tasks run on it.
    ///
    /// # Errors
    /// When the listening socket cannot be bound.
    pub async fn start() -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (upstream, upstream_rx) = watch::channel(None);
        let (stalled, stalled_rx) = watch::channel(false);
        let (latency, latency_rx) = watch::channel(Duration::ZERO);
        let (generation, generation_rx) = watch::channel(0);
        let control = Control {
            upstream: upstream_rx,
            stalled: stalled_rx,
            latency: latency_rx,
            generation: generation_rx,
            counts: Arc::new(Counts::default()),
        };
        tokio::spawn(accept_loop(listener, control.clone()));
        Ok(Self {
            shared: Arc::new(Shared {
                addr,
                control,
                upstream,
                stalled,
                latency,
                generation,
                kept: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The address to connect the adapter to (`127.0.0.1:<port>`).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Forwards new connections to `upstream` (the real broker). Connections open already keep
    /// their upstream.
    pub fn forward_to(&self, upstream: SocketAddr) {
        self.shared.upstream.send_replace(Some(upstream));
    }

    /// Aborts every open connection with a TCP reset on both sides. Returns at once; the
    /// connection tasks abort within moments. New connections are accepted as before.
    pub fn reset(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Stops forwarding bytes in both directions, and connecting new connections onwards,
    /// until [`resume`](Self::resume).
    pub fn stall(&self) {
        self.shared.stalled.send_replace(true);
    }

    /// Forwards again what [`stall`](Self::stall) held, and everything after it.
    pub fn resume(&self) {
        self.shared.stalled.send_replace(false);
    }

    /// Delays every chunk of bytes forwarded from now on by `latency` (zero turns it off).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.latency.send_replace(latency);
    }

    /// Connections accepted so far.
    #[must_use]
    pub fn accepted(&self) -> u64 {
        self.shared.control.counts.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    #[must_use]
    pub fn open(&self) -> u64 {
        self.shared.control.counts.open.load(Ordering::Relaxed)
    }

    /// Connections aborted by [`reset`](Self::reset) so far.
    #[must_use]
    pub fn aborted(&self) -> u64 {
        self.shared.control.counts.aborted.load(Ordering::Relaxed)
    }

    /// Keeps `value` alive as long as the proxy: say the child process of a broker started for
    /// it, killed on drop.
    pub fn keep(&self, value: impl Any + Send) {
        self.shared
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::new(value));
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.shared.addr)
            .field("upstream", &*self.shared.upstream.borrow())
            .field("stalled", &*self.shared.stalled.borrow())
            .field("latency", &*self.shared.latency.borrow())
            .field("accepted", &self.accepted())
            .field("open", &self.open())
            .field("aborted", &self.aborted())
            .finish_non_exhaustive()
    }
}

async fn accept_loop(listener: TcpListener, mut control: Control) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    control.counts.accepted.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(serve(client, control.clone()));
                }
                // Out of descriptors or the like: try again shortly rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // The last handle is gone.
            changed = control.generation.changed() => if changed.is_err() { return },
        }
    }
}

/// Proxies one connection until either side closes it, the proxy resets it, or the proxy is
/// dropped.
async fn serve(mut client: TcpStream, mut control: Control) {
    control.counts.open.fetch_add(1, Ordering::Relaxed);
    let generation = *control.generation.borrow_and_update();
    let mut server = None;
    let aborted = {
        let run = proxy_connection(&mut client, &mut server, control.clone());
        let mut reset = control.generation.clone();
        tokio::select! {
            () = run => false,
            () = until_reset(&mut reset, generation) => true,
        }
    };
    if aborted {
        control.counts.aborted.fetch_add(1, Ordering::Relaxed);
        // A reset, not a close: the peer must see the connection fail, not end.
        let _ = client.set_zero_linger();
        if let Some(server) = &server {
            let _ = server.set_zero_linger();
        }
    }
    control.counts.open.fetch_sub(1, Ordering::Relaxed);
}

async fn proxy_connection(
    client: &mut TcpStream,
    server_slot: &mut Option<TcpStream>,
    mut control: Control,
) {
    if !unstalled(&mut control.stalled).await {
        return;
    }
    let upstream = loop {
        if let Some(upstream) = *control.upstream.borrow_and_update() {
            break upstream;
        }
        if control.upstream.changed().await.is_err() {
            return;
        }
    };
    let Ok(server) = TcpStream::connect(upstream).await else {
        // The broker is down: the client sees its connection refused, as without a proxy.
        let _ = client.set_zero_linger();
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let server = server_slot.insert(server);
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    tokio::join!(
        pump(client_read, server_write, control.clone()),
        pump(server_read, client_write, control),
    );
}

/// Copies bytes from `from` to `to`, holding them while stalled and delaying them by the
/// latency; on end of stream, shuts `to` down for writing.
async fn pump(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, control: Control) {
    let Control {
        mut stalled,
        latency,
        ..
    } = control;
    let mut buf = vec![0; CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !unstalled(&mut stalled).await {
            return;
        }
        let delay = *latency.borrow();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// Waits until the proxy is not stalled; `false` if the proxy was dropped meanwhile.
async fn unstalled(stalled: &mut watch::Receiver<bool>) -> bool {
    loop {
        if !*stalled.borrow_and_update() {
            return true;
        }
        if stalled.changed().await.is_err() {
            return false;
        }
    }
}

/// Completes once a reset after `generation` was asked for, or the proxy was dropped.
async fn until_reset(reset: &mut watch::Receiver<u64>, generation: u64) {
    loop {
        if *reset.borrow_and_update() != generation {
            return;
        }
        if reset.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<Vec<u8>> {
        stream.write_all(bytes).await?;
        let mut back = vec![0; bytes.len()];
        stream.read_exact(&mut back).await?;
        Ok(back)
    }

    #[tokio::test]
    async fn forwards_resets_and_stalls() {
        let proxy = FaultProxy::start().await.unwrap();
        proxy.forward_to(echo_server().await);
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut a, b"hello").await.unwrap(), b"hello");

        proxy.reset();
        let after = round_trip(&mut a, b"again").await;
        let kind = after.expect_err("a reset connection must fail").kind();
        assert!(
            matches!(
                kind,
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            "{kind:?}"
        );
        assert_eq!(proxy.aborted(), 1);

        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut b, b"new").await.unwrap(), b"new");

        proxy.stall();
        b.write_all(b"held").await.unwrap();
        let mut buf = [0; 4];
        let held = tokio::time::timeout(Duration::from_millis(200), b.read_exact(&mut buf)).await;
        assert!(held.is_err(), "bytes moved through a stalled proxy");
        proxy.resume();
        tokio::time::timeout(Duration::from_secs(5), b.read_exact(&mut buf))
            .await
            .expect("held bytes forwarded on resume")
            .unwrap();
        assert_eq!(&buf, b"held");
        assert_eq!(proxy.accepted(), 2);
    }

    #[tokio::test]
    async fn dropping_the_proxy_aborts_its_connections() {
        let proxy = FaultProxy::start().await.unwrap();
        proxy.forward_to(echo_server().await);
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut a, b"x").await.unwrap(), b"x");
        drop(proxy);
        let mut buf = [0; 1];
        let end = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
            .await
            .expect("the connection ends when the proxy is dropped");
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    }
}
