//! The `lb-agent` command line.
use std::path::PathBuf;

use clap::Parser;

/// The node agent of the eBPF service load balancer: loads the datapath,
/// attaches it to the given interfaces and keeps its maps equal to the
/// service description. Send SIGHUP to reload the description.
#[derive(Debug, Parser)]
#[command(name = "lb-agent", version)]
pub struct AgentArgs {
    /// The service description (JSON: services with clusterIP, ports and
    /// endpoints; see docs/architecture.md).
    #[arg(long, value_name = "FILE")]
    pub services: PathBuf,

    /// Attach the tc (tcx) ingress program to this interface. Repeatable.
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,

    /// Attach the XDP program to this interface instead (for NICs whose
    /// packets carry complete checksums). Repeatable.
    #[arg(long = "xdp-iface", value_name = "NAME")]
    pub xdp_ifaces: Vec<String>,

    /// Directory on a bpf filesystem where the maps are pinned; distinct per
    /// agent when several run on one machine.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/lb")]
    pub bpffs_dir: PathBuf,

    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}

impl AgentArgs {
    /// Checks the combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.ifaces.is_empty() && self.xdp_ifaces.is_empty() {
            return Err("no interface to attach to: give at least one --iface NAME (or --xdp-iface NAME)".into());
        }
        if let Some(both) = self.ifaces.iter().find(|i| self.xdp_ifaces.contains(i)) {
            return Err(format!("{both} is given to both --iface and --xdp-iface; a packet would be translated twice"));
        }
        Ok(())
    }
}
