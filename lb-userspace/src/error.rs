//! The agent's one error type.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("attaching to interface {iface:?}: {source} (does the interface exist in this network namespace?)")]
    Attach { iface: String, source: aya::programs::ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("the eBPF object has no map or program named {0}")]
    Missing(&'static str),
    #[error("pinning maps under {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("watching {path}: {reason}")]
    Watch { path: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// A request that cannot be answered as asked, saying why.
    #[error("{0}")]
    Usage(String),
    #[error("out of {what}: at most {limit} can be programmed")]
    Capacity { what: &'static str, limit: u32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
