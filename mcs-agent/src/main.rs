//! The `mcs-agent` binary: parse the command line, set up logging, hand the
//! subcommand to the library, and turn its errors into exit codes (1 for an
//! error, with its causes on stderr).

use std::io::Write as _;

use anyhow::{Context as _, Result};
use clap::Parser as _;
use mcs_agent::{
    agent,
    cli::{Cli, Command},
    commands::{self, Remains},
};
use tokio::signal::unix::{SignalKind, signal};

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match cli.command {
        Command::Run(args) => {
            let config = args.config()?;
            runtime()?.block_on(agent::run::run(config))?;
        }
        Command::Check { manifests, locality } => {
            commands::check(&manifests, &locality.policy(), &mut std::io::stdout(), &mut std::io::stderr())?;
        }
        Command::Uninstall { bpffs, check: true, .. } => match commands::uninstall_check(&bpffs) {
            Remains::Nothing => println!("nothing of mcs-agent is left on this node"),
            Remains::Left(left) => {
                for what in &left {
                    println!("left: {what}");
                }
                std::process::exit(1);
            }
        },
        Command::Uninstall { bpffs, stay, check: false } => {
            commands::uninstall(&bpffs, &mut std::io::stdout())?;
            if stay {
                // In a DaemonSet the pod stays Ready to show that its node is clean.
                runtime()?.block_on(until_stopped())?;
            }
        }
        Command::Inspect(args) => {
            let text = commands::inspect(&args)?;
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(text.as_bytes())?;
            stdout.flush()?;
        }
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")
}

/// Until SIGTERM or SIGINT.
async fn until_stopped() -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
