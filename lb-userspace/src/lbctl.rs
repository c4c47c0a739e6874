//! lbctl: inspects a running lb-agent through its pinned maps.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    explain::{self, Probe},
    inspect::{self, PinnedMaps},
};
use serde::Serialize;

/// Inspect a running lb-agent: its services, tracked flows and counters,
/// read from the maps it pins (read-only).
#[derive(Parser)]
#[command(name = "lbctl", version)]
struct Args {
    /// The agent's --bpffs-dir.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/lb", global = true)]
    bpffs_dir: PathBuf,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Service ports with their frontends, backends and counters.
    Services,
    /// Tracked flows (two entries each: forward and reply).
    Conntrack {
        /// Only entries whose addresses or service name contain this text.
        #[arg(long, value_name = "TEXT")]
        filter: Option<String>,
    },
    /// Packets per verdict reason.
    Counters,
    /// The kernel features newer than the floor (Linux 5.10) the agent
    /// uses, and what it does instead where the kernel lacks one.
    Kernel,
    /// What the datapath would do with a packet (a TCP SYN or a UDP
    /// datagram) from SOURCE to DESTINATION: the real program is run on a
    /// copy of the live maps, which stay untouched. Needs root.
    Explain {
        /// ip or ip:port of the sender, IPv4 or IPv6 ([ip]:port; port
        /// 40000 when left out).
        #[arg(value_parser = explain::parse_source)]
        source: std::net::SocketAddr,
        /// ip:port the packet is sent to ([ip]:port for IPv6), of the
        /// sender's family.
        destination: std::net::SocketAddr,
        /// tcp or udp.
        #[arg(value_parser = explain::parse_protocol)]
        protocol: u8,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let maps = PinnedMaps::open(&args.bpffs_dir)?;
    match &args.command {
        Command::Services => {
            let services = inspect::services(&maps)?;
            print(args.output, &services, || {
                let rows = services.iter().map(|s| {
                    let backends = if s.backends.is_empty() { "<none>".to_owned() } else { s.backends.join(",") };
                    vec![s.name.clone(), s.frontends.join(","), backends, s.new_connections.to_string(), s.rejected.to_string()]
                });
                table(&["SERVICE", "FRONTENDS", "ENDPOINTS", "CONNECTIONS", "REJECTED"], rows)
            })
        }
        Command::Conntrack { filter } => {
            let flows = inspect::conntrack(&maps, filter.as_deref())?;
            print(args.output, &flows, || {
                let rows = flows.iter().map(|f| {
                    vec![
                        f.service.clone(),
                        f.protocol.to_owned(),
                        f.direction.to_owned(),
                        f.source.clone(),
                        f.destination.clone(),
                        f.translated_source.clone(),
                        f.translated_destination.clone(),
                        f.state.to_owned(),
                        format!("{}s", f.expires_in_seconds),
                    ]
                });
                table(&["SERVICE", "PROTO", "DIRECTION", "SOURCE", "DESTINATION", "TRANSLATED SOURCE", "TRANSLATED DESTINATION", "STATE", "EXPIRES IN"], rows)
            })
        }
        Command::Explain { source, destination, protocol } => {
            let answer = explain::explain(&maps, &Probe { source: *source, destination: *destination, proto: *protocol })?;
            print(args.output, &answer, || {
                let mut rows = vec![
                    vec!["verdict".to_owned(), answer.verdict.to_owned()],
                    vec!["action".to_owned(), answer.action.to_owned()],
                ];
                rows.extend(answer.service.iter().map(|s| vec!["service".to_owned(), s.clone()]));
                rows.extend(answer.backend.iter().map(|b| vec!["backend".to_owned(), b.clone()]));
                rows.push(vec!["why".to_owned(), answer.why.clone()]);
                table(&["PACKET", format!("{source} -> {destination}").as_str()], rows.into_iter())
            })
        }
        Command::Kernel => {
            let features = inspect::kernel_features(&maps)?;
            print(args.output, &features, || {
                let rows = features.iter().map(|f| {
                    let state = if f.in_use { "in use".to_owned() } else { format!("fallback: {}", f.fallback.unwrap_or_default()) };
                    vec![f.feature.to_owned(), f.since.to_owned(), state]
                });
                table(&["FEATURE", "SINCE LINUX", "STATE"], rows)
            })
        }
        Command::Counters => {
            let verdicts = inspect::verdicts(&maps)?;
            let as_map: std::collections::BTreeMap<_, _> = verdicts.iter().copied().collect();
            print(args.output, &as_map, || table(&["VERDICT", "PACKETS"], verdicts.iter().map(|(r, n)| vec![r.to_string(), n.to_string()])))
        }
    }
}

fn print<T: Serialize>(output: Output, value: &T, table: impl FnOnce() -> String) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Table => print!("{}", table()),
    }
    Ok(())
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect()).chain(rows).collect();
    let widths: Vec<usize> = (0..header.len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
