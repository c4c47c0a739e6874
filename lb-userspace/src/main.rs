//! lb-agent: loads and attaches the datapath, programs the services from
//! the description, and reprograms on SIGHUP until SIGINT/SIGTERM.
use std::{process::ExitCode, time::Instant};

use anyhow::Context;
use clap::Parser;
use lb_userspace::{cli::AgentArgs, datapath::Datapath, source, sync::Syncer};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = AgentArgs::parse();
    if let Err(msg) = args.validate() {
        eprintln!("error: {msg}");
        return ExitCode::from(2);
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level);
    let Ok(filter) = filter else {
        eprintln!("error: --log-level {:?} is not a level (error, warn, info, debug, trace) or a tracing filter", args.log_level);
        return ExitCode::from(2);
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &AgentArgs) -> anyhow::Result<()> {
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let mut datapath = Datapath::load(Some(&args.bpffs_dir))?;
    let result = serve(args, &mut datapath, &mut hangup, &mut terminate, &mut interrupt).await;
    for name in lb_userspace::maps::ALL_MAPS {
        let pin = args.bpffs_dir.join(name);
        if let Err(e) = std::fs::remove_file(&pin) {
            warn!("removing pin {}: {e}", pin.display());
        }
    }
    result
}

async fn serve(
    args: &AgentArgs,
    datapath: &mut Datapath,
    hangup: &mut tokio::signal::unix::Signal,
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let mut syncer = Syncer::new();
    sync_from_file(args, datapath, &mut syncer, 1)?;
    for iface in &args.ifaces {
        datapath.attach_tc(iface)?;
        info!(iface, "attached tc ingress");
    }
    for iface in &args.xdp_ifaces {
        datapath.attach_xdp(iface)?;
        info!(iface, "attached xdp");
    }
    info!(pinned = %args.bpffs_dir.display(), "ready");
    let mut generation = 1;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                generation += 1;
                if let Err(e) = sync_from_file(args, datapath, &mut syncer, generation) {
                    error!("reload failed, keeping the programmed state: {e:#}");
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    info!("shutting down: detaching programs and removing pins");
    Ok(())
}

fn sync_from_file(args: &AgentArgs, datapath: &mut Datapath, syncer: &mut Syncer, generation: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let loaded = source::load(&args.services)?;
    for skipped in &loaded.skipped {
        warn!("{skipped}");
    }
    let report = syncer.apply(&loaded.state, &mut datapath.maps)?;
    info!(
        generation,
        services = loaded.state.services.len(),
        endpoints = loaded.state.endpoint_count(),
        added = report.added,
        updated = report.updated,
        removed = report.removed,
        micros = started.elapsed().as_micros() as u64,
        "synced"
    );
    Ok(())
}
