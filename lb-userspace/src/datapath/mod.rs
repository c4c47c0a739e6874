//! The loaded datapath: the `Datapath` type and its public API.
//!
//! `load` loads the eBPF object, `attach` attaches its programs, `pins`
//! keeps their attachments across restarts, and `host` sets up the node
//! around them (bpffs, sysctls, the cgroup root).
mod attach;
mod host;
mod load;
mod pins;

use std::{collections::HashMap, path::PathBuf};

use aya::{
    Ebpf,
    programs::{SchedClassifier, Xdp, cgroup_sock_addr::CgroupSockAddrLinkId},
};
use aya_log::EbpfLogger;
use lb_common::{PROG_SOCK_CONNECT4, PROG_SOCK_GETPEERNAME4, PROG_SOCK_RECVMSG4, PROG_SOCK_SENDMSG4, PROG_TC_INGRESS, PROG_XDP};

pub use host::{accept_local_sources, cgroup2_root, ensure_bpffs, loosen_reverse_path_filter, mount_bpffs};
pub use pins::remove_pinned;

use crate::{
    error::{Error, Result},
    features::KernelFeatures,
    maps::DatapathMaps,
};
use attach::Attachment;

/// The socket-level programs, attached to a cgroup for the node's own
/// processes.
const SOCK_PROGRAMS: [&str; 4] = [PROG_SOCK_CONNECT4, PROG_SOCK_SENDMSG4, PROG_SOCK_RECVMSG4, PROG_SOCK_GETPEERNAME4];

/// The loaded datapath: its programs (attached or not) and its maps.
/// Dropping it detaches every program it attached, except those handed to
/// bpffs by `keep_attached`.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: DatapathMaps,
    /// Where attachments are pinned to outlive the agent (pinned datapath).
    links_dir: Option<PathBuf>,
    attached: HashMap<String, Attachment>,
    /// The socket programs' cgroup links, by program.
    sock_links: Vec<(&'static str, CgroupSockAddrLinkId)>,
    /// The kernel features in use, and the fallbacks.
    features: KernelFeatures,
}

/// How an interface came to run this agent's program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new attachment.
    Fresh,
    /// A previous agent's attachment, switched to this agent's program in
    /// one atomic link update: no packet went unprocessed.
    TakenOver,
}

impl Datapath {
    /// The kernel features in use, and the fallbacks.
    pub const fn features(&self) -> KernelFeatures {
        self.features
    }

    /// The reader of the programs' log records, which it passes to the
    /// `log` crate (and so to `tracing`) when flushed.
    pub fn take_logger(&mut self) -> Result<EbpfLogger<&'static dyn log::Log>> {
        EbpfLogger::init(&mut self.ebpf).map_err(|e| Error::Io { what: "the eBPF log".into(), source: std::io::Error::other(e) })
    }

    pub fn tc_program(&self) -> Result<&SchedClassifier> {
        program(&self.ebpf, PROG_TC_INGRESS)
    }

    pub fn xdp_program(&self) -> Result<&Xdp> {
        program(&self.ebpf, PROG_XDP)
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(Error::Missing(name))?;
    program.try_into().map_err(|source| Error::Program { name, source })
}

fn program<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a T>
where
    &'a T: TryFrom<&'a aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program(name).ok_or(Error::Missing(name))?;
    program.try_into().map_err(|source| Error::Program { name, source })
}

fn pin_err(path: &std::path::Path, e: impl std::fmt::Display) -> Error {
    Error::Pin { path: path.into(), reason: e.to_string() }
}
