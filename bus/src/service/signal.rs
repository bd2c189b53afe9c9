//! [`shutdown_signal`]: the future a service runs until.

use std::future::Future;

use bus_core::{Error, ErrorKind, Result};

/// A future that completes when the process receives SIGINT (Ctrl-C) or SIGTERM (what
/// container runtimes and systemd send to stop a service); on other platforms, Ctrl-C.
/// Give it to [`Service::run`](super::Service::run).
///
/// The signal handlers are installed when this is called, not when the future is first
/// polled, so a signal that arrives in between is not missed. Once installed they stay for
/// the life of the process: those signals no longer end it by themselves.
///
/// # Errors
/// [`ErrorKind::Other`] when the signal handlers cannot be installed.
///
/// # Panics
/// When called outside a tokio runtime.
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static> {
    shutdown_signal_impl()
}

#[cfg(unix)]
fn shutdown_signal_impl() -> Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind: SignalKind, name: &'static str| {
        signal(kind).map_err(|error| {
            Error::with_source(ErrorKind::Other, format!("cannot listen for {name}"), error)
        })
    };
    let mut interrupt = listen(SignalKind::interrupt(), "SIGINT")?;
    let mut terminate = listen(SignalKind::terminate(), "SIGTERM")?;
    Ok(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "shutdown signal received");
    })
}

#[cfg(not(unix))]
fn shutdown_signal_impl() -> Result<impl Future<Output = ()> + Send + 'static> {
    Ok(async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            // Without a way to hear Ctrl-C, never ask for a shutdown rather than at once.
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    })
}
