//! `bus`: one command-line tool for every broker the `bus` library speaks.
//!
//! `bus publish`, `bus tail`, `bus dlq list|show|redrive`, `bus lag`, `bus check` and `bus bench` over
//! the broker named by `--url` or `BUS_URL`, through the `bus` facade (every adapter
//! compiled in). Errors are one line on standard error and exit status 1; URLs are printed
//! only through `bus_core::secrets::redact_url`. `bus --help` says the rest.

mod cli;
mod commands;
mod output;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, DlqCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

/// Prints `message` as the one line of a failure.
fn fail(message: &str) -> ExitCode {
    // One line, whatever the error's text holds.
    let line = message.replace(['\n', '\r'], " ");
    eprintln!("bus: error: {line}");
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> Result<(), String> {
    let url = cli.url.clone().unwrap_or_else(|| "memory://".to_owned());
    let connect_with = match &cli.command {
        Command::Dlq(_) => commands::for_dead_letters(&url),
        _ => url.clone(),
    };
    let bus = commands::connect(&connect_with, cli.connect_timeout).await?;
    let result = match &cli.command {
        Command::Publish(args) => commands::publish::run(&bus, args, cli.json).await,
        Command::Tail(args) => commands::tail::run(&bus, args, cli.json).await,
        Command::Dlq(args) => match &args.command {
            DlqCommand::List(args) => commands::dlq::list(&bus, args, cli.json).await,
            DlqCommand::Show(args) => commands::dlq::show(&bus, args, cli.json).await,
            DlqCommand::Redrive(args) => commands::dlq::redrive(&bus, args, cli.json).await,
        },
        Command::Check(args) => commands::check::run(&bus, &url, args, cli.json).await,
        Command::Bench(args) => commands::bench::run(&bus, args, cli.json).await,
        Command::Lag(args) => commands::lag::run(&bus, args, cli.json).await,
    };
    // The command's own error is the one worth reporting; a failed close comes second.
    let closed = bus.close().await;
    result?;
    closed.map_err(|e| format!("closing the connection: {e}"))
}
