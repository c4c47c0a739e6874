//! Attaching the programs (tc ingress by tcx or cls_bpf, XDP, cgroup sockets), and detaching them.
use std::path::Path;

use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
    tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle},
    xdp::{XdpLink, XdpLinkId},
};
use lb_common::{PROG_TC_INGRESS, PROG_XDP};
use tracing::warn;

use super::{Attached, Datapath, SOCK_PROGRAMS, program_mut};
use crate::{
    error::{Error, Result},
    features::Feature,
};

/// Where tc programs go without tcx: the cls_bpf filter at this priority
/// and handle on the clsact qdisc's ingress. Fixed, so that the next agent
/// replaces the filter in place (Cilium does the same), and with a handle
/// no other tool picks ("LB"), so that nobody else's filter is replaced.
const LEGACY_TC_PRIORITY: u16 = 1;
const LEGACY_TC_HANDLE: u32 = 0x4c42;

#[derive(Debug)]
pub(super) enum Attachment {
    /// A tcx link, or without tcx a cls_bpf filter.
    Tc(SchedClassifierLinkId, LinkKind),
    Xdp(XdpLinkId),
}

impl Attachment {
    pub(super) const fn kind(&self) -> LinkKind {
        match self {
            Attachment::Tc(_, kind) => *kind,
            Attachment::Xdp(_) => LinkKind::Xdp,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LinkKind {
    TcIngress,
    /// A cls_bpf filter (no tcx). It is not a bpf object and cannot be
    /// pinned: an empty directory of this name in the links directory, made
    /// when it is attached, says that the interface has one of ours.
    TcIngressLegacy,
    Xdp,
}

impl LinkKind {
    pub(super) const ALL: [LinkKind; 3] = [LinkKind::TcIngress, LinkKind::TcIngressLegacy, LinkKind::Xdp];

    pub(super) const fn prefix(self) -> &'static str {
        match self {
            LinkKind::TcIngress => "tc-ingress@",
            LinkKind::TcIngressLegacy => "tc-legacy@",
            LinkKind::Xdp => "xdp@",
        }
    }
}

impl Datapath {
    /// Attaches the tc program at the ingress of `iface`, taking over the
    /// attachment a previous agent left there if any: with a tcx link where
    /// the kernel has tcx, else with a cls_bpf filter (`attach_tc_legacy`).
    pub fn attach_tc(&mut self, iface: &str) -> Result<Attached> {
        if self.attached.contains_key(iface) {
            return Ok(Attached::Fresh);
        }
        if !self.features.uses(Feature::Tcx) {
            return self.attach_tc_legacy(iface);
        }
        let pinned = self.take_pinned_link(iface, LinkKind::TcIngress);
        let tc: &mut SchedClassifier = program_mut(&mut self.ebpf, PROG_TC_INGRESS)?;
        let taken_over = pinned.map(|pinned| {
            let link = SchedClassifierLink::try_from(pinned?).map_err(|e| e.to_string())?;
            tc.attach_to_link(link).map_err(|e| e.to_string())
        });
        let tcx = TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default());
        let (id, how) = take_over_or(iface, taken_over, || tc.attach_with_options(iface, TcAttachType::Ingress, tcx))?;
        self.attached.insert(iface.into(), Attachment::Tc(id, LinkKind::TcIngress));
        // A previous agent that ran without tcx left a filter: both run
        // until it goes (the first to translate wins, the other then sees a
        // backend, not a service).
        if self.take_legacy_marker(iface)? {
            remove_legacy_filter(iface);
        }
        Ok(how)
    }

    /// Attaches the tc program as a direct-action cls_bpf filter on the
    /// interface's clsact qdisc (created if missing, and left for others'
    /// filters when the agent goes). A previous agent's filter is replaced
    /// in place, one atomic swap of the program, so no packet goes
    /// untranslated.
    fn attach_tc_legacy(&mut self, iface: &str) -> Result<Attached> {
        let attach_err = |source: aya::programs::ProgramError| Error::Attach { iface: iface.into(), source };
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(iface) {
            // EEXIST: the qdisc is there already (ours or another tool's).
            let exists = matches!(&e, aya::programs::tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
            if !exists {
                return Err(attach_err(e.into()));
            }
        }
        let had_marker = self.take_legacy_marker(iface)?;
        let tc: &mut SchedClassifier = program_mut(&mut self.ebpf, PROG_TC_INGRESS)?;
        let handle = TcHandle::from(LEGACY_TC_HANDLE);
        let ours = SchedClassifierLink::attached(iface, TcAttachType::Ingress, LEGACY_TC_PRIORITY, handle, None)
            .map_err(|e| attach_err(aya::programs::tc::TcError::IoError(e).into()))?;
        // Without NLM_F_CREATE this fails (ENOENT) unless our filter is there.
        let (id, how) = match tc.attach_to_link(ours) {
            Ok(id) => (id, Attached::TakenOver),
            Err(e) => {
                if had_marker {
                    warn!(iface, "the previous agent's filter could not be replaced ({e}); attaching afresh");
                }
                let options = NlOptions { priority: LEGACY_TC_PRIORITY, handle, classid: None };
                let id = tc
                    .attach_with_options(iface, TcAttachType::Ingress, TcAttachOptions::Netlink(options))
                    .map_err(attach_err)?;
                (id, Attached::Fresh)
            }
        };
        self.attached.insert(iface.into(), Attachment::Tc(id, LinkKind::TcIngressLegacy));
        // The marker goes in now, not at exit: a filter outlives an agent
        // that crashes, and the next one must find it.
        self.mark_legacy_filter(iface);
        // A previous agent's tcx link (it had tcx, this one was told not to
        // use it) goes now that the filter is in place.
        match self.take_pinned_link(iface, LinkKind::TcIngress) {
            Some(Ok(previous)) => drop(previous),
            Some(Err(e)) => warn!(iface, "the previous agent's tcx link: {e}"),
            None => {}
        }
        Ok(how)
    }

    /// Attaches the XDP program to `iface` (native mode where the driver
    /// supports it), taking over a pinned attachment as `attach_tc` does.
    pub fn attach_xdp(&mut self, iface: &str) -> Result<Attached> {
        if self.attached.contains_key(iface) {
            return Ok(Attached::Fresh);
        }
        let pinned = self.take_pinned_link(iface, LinkKind::Xdp);
        let xdp: &mut Xdp = program_mut(&mut self.ebpf, PROG_XDP)?;
        let taken_over = pinned.map(|pinned| {
            let link = XdpLink::try_from(pinned?).map_err(|e| e.to_string())?;
            xdp.attach_to_link(link).map_err(|e| e.to_string())
        });
        let (id, how) = take_over_or(iface, taken_over, || xdp.attach(iface, XdpMode::Default))?;
        self.attached.insert(iface.into(), Attachment::Xdp(id));
        Ok(how)
    }

    /// Attaches the socket programs to the cgroup (v2) directory `cgroup`,
    /// so the node's own processes in it reach services, then lets go of a
    /// previous agent's (both run meanwhile: the first to translate wins,
    /// the other then sees a backend, not a service).
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<()> {
        let dir = std::fs::File::open(cgroup).map_err(|source| Error::Read { path: cgroup.into(), source })?;
        for name in SOCK_PROGRAMS {
            let sock: &mut CgroupSockAddr = program_mut(&mut self.ebpf, name)?;
            // Cgroup links take no flags and always allow several programs.
            let id = sock
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| Error::Attach { iface: format!("cgroup {}", cgroup.display()), source })?;
            self.sock_links.push((name, id));
        }
        self.release_previous_sock_links()
    }

    /// Lets go of an interface (it may be gone already, and with it the
    /// attachment).
    pub fn detach(&mut self, iface: &str) -> Result<()> {
        match self.attached.remove(iface) {
            Some(Attachment::Tc(id, kind)) => {
                if kind == LinkKind::TcIngressLegacy {
                    self.take_legacy_marker(iface)?;
                }
                let tc: &mut SchedClassifier = program_mut(&mut self.ebpf, PROG_TC_INGRESS)?;
                tc.detach(id).map_err(|source| Error::Program { name: PROG_TC_INGRESS, source })
            }
            Some(Attachment::Xdp(id)) => {
                let xdp: &mut Xdp = program_mut(&mut self.ebpf, PROG_XDP)?;
                xdp.detach(id).map_err(|source| Error::Program { name: PROG_XDP, source })
            }
            None => Ok(()),
        }
    }
}

/// A taken-over attachment, or else (logging why, when there was one to
/// take over) a fresh one from `attach`.
fn take_over_or<Id>(
    iface: &str,
    taken_over: Option<Result<Id, String>>,
    attach: impl FnOnce() -> Result<Id, aya::programs::ProgramError>,
) -> Result<(Id, Attached)> {
    if let Some(taken_over) = taken_over {
        match taken_over {
            Ok(id) => return Ok((id, Attached::TakenOver)),
            Err(reason) => {
                warn!(iface, "the previous agent's attachment could not be taken over ({reason}); attaching afresh")
            }
        }
    }
    let id = attach().map_err(|source| Error::Attach { iface: iface.into(), source })?;
    Ok((id, Attached::Fresh))
}

/// Deletes this agent's cls_bpf filter (priority and handle) from the
/// ingress of `iface`, if the interface and the filter are still there.
pub(super) fn remove_legacy_filter(iface: &str) {
    let handle = TcHandle::from(LEGACY_TC_HANDLE);
    let filter = SchedClassifierLink::attached(iface, TcAttachType::Ingress, LEGACY_TC_PRIORITY, handle, None);
    // Dropping a link made by `attached` deletes the filter; on an
    // interface that is gone there is nothing to delete.
    drop(filter);
}
