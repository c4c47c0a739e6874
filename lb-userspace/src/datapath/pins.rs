//! Attachments pinned in bpffs across restarts: kept at exit, taken over or released, cleaned up.
use std::path::{Path, PathBuf};

use aya::programs::{
    CgroupSockAddr, SchedClassifier, Xdp,
    links::{FdLink, PinnedLink},
};
use lb_common::{PROG_TC_INGRESS, PROG_XDP};
use tracing::{info, warn};

use super::{
    Datapath, SOCK_PROGRAMS,
    attach::{Attachment, LinkKind, remove_legacy_filter},
    host::detach_pinned_link,
    pin_err, program_mut,
};
use crate::{
    error::{Error, Result},
    maps::object_maps,
};

/// Where attachment links are pinned across restarts, below the pin dir.
pub(super) const LINKS_DIR: &str = "links";

/// Pin name prefix of a socket program's cgroup link.
const CGROUP_LINK_PREFIX: &str = "cgroup-";

impl Datapath {
    /// The pinned link of a previous agent for `iface`, unpinned; `None`
    /// when there is none.
    pub(super) fn take_pinned_link(&self, iface: &str, kind: LinkKind) -> Option<Result<FdLink, String>> {
        let path = self.link_pin(iface, kind).filter(|path| path.exists())?;
        let pinned = match PinnedLink::from_pin(&path) {
            Ok(pinned) => pinned,
            Err(e) => return Some(Err(format!("opening {}: {e}", path.display()))),
        };
        Some(pinned.unpin().map_err(|e| format!("unpinning {}: {e}", path.display())))
    }

    fn link_pin(&self, iface: &str, kind: LinkKind) -> Option<PathBuf> {
        Some(self.links_dir.as_ref()?.join(format!("{}{}", kind.prefix(), encode_pin_name(iface))))
    }

    /// Leaves the marker that says `iface` has a cls_bpf filter of ours.
    pub(super) fn mark_legacy_filter(&self, iface: &str) {
        if let Some(marker) = self.link_pin(iface, LinkKind::TcIngressLegacy)
            && let Err(e) = std::fs::create_dir(&marker)
        {
            warn!(iface, "{}; the next agent may attach beside this filter", pin_err(&marker, e));
        }
    }

    /// Removes the marker of a cls_bpf filter on `iface`; says whether
    /// there was one.
    pub(super) fn take_legacy_marker(&self, iface: &str) -> Result<bool> {
        let Some(marker) = self.link_pin(iface, LinkKind::TcIngressLegacy).filter(|path| path.exists()) else {
            return Ok(false);
        };
        std::fs::remove_dir(&marker).map_err(|e| pin_err(&marker, e))?;
        Ok(true)
    }

    /// Unpins a previous agent's socket program links, which detaches them.
    pub(super) fn release_previous_sock_links(&self) -> Result<()> {
        let Some(links) = &self.links_dir else { return Ok(()) };
        for name in SOCK_PROGRAMS {
            let previous = links.join(format!("{CGROUP_LINK_PREFIX}{name}"));
            if previous.exists() {
                std::fs::remove_file(&previous).map_err(|e| pin_err(&previous, e))?;
            }
        }
        Ok(())
    }

    /// Removes the attachments a previous agent pinned that this one did
    /// not take over: interfaces no longer wanted (or gone). Returns them.
    pub fn release_stale_links(&self) -> Result<Vec<String>> {
        let Some(dir) = &self.links_dir else { return Ok(Vec::new()) };
        let entries = std::fs::read_dir(dir).map_err(|source| Error::Read { path: dir.clone(), source })?;
        let mut released = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::Read { path: dir.clone(), source })?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with(CGROUP_LINK_PREFIX) {
                continue;
            }
            let Some((kind, iface)) = LinkKind::ALL
                .into_iter()
                .find_map(|kind| Some((kind, decode_pin_name(file.strip_prefix(kind.prefix())?))))
            else {
                continue;
            };
            if !self.attached.contains_key(&iface) {
                release_pinned(&entry.path(), kind, &iface)?;
                released.push(iface);
            }
        }
        Ok(released)
    }

    /// Pins every attachment so that the programs stay attached, using the
    /// pinned maps, after the agent exits; the next agent takes them over.
    /// Returns how many were kept.
    pub fn keep_attached(&mut self) -> Result<usize> {
        let Some(dir) = self.links_dir.clone() else { return Ok(0) };
        let mut kept = 0;
        for (iface, attachment) in std::mem::take(&mut self.attached) {
            let path = dir.join(format!("{}{}", attachment.kind().prefix(), encode_pin_name(&iface)));
            let link = match attachment {
                Attachment::Tc(id, LinkKind::TcIngressLegacy) => {
                    let link = program_mut::<SchedClassifier>(&mut self.ebpf, PROG_TC_INGRESS)?
                        .take_link(id)
                        .map_err(|source| Error::Program { name: PROG_TC_INGRESS, source })?;
                    // Dropping the link would delete the filter: it stays
                    // for the next agent, which knows it by its priority and
                    // handle, and by the marker made when it was attached.
                    std::mem::forget(link);
                    kept += 1;
                    continue;
                }
                Attachment::Tc(id, _) => program_mut::<SchedClassifier>(&mut self.ebpf, PROG_TC_INGRESS)?
                    .take_link(id)
                    .map_err(|source| Error::Program { name: PROG_TC_INGRESS, source })
                    .and_then(|link| FdLink::try_from(link).map_err(|e| pin_err(&path, e))),
                Attachment::Xdp(id) => program_mut::<Xdp>(&mut self.ebpf, PROG_XDP)?
                    .take_link(id)
                    .map_err(|source| Error::Program { name: PROG_XDP, source })
                    .and_then(|link| FdLink::try_from(link).map_err(|e| pin_err(&path, e))),
            };
            match link.and_then(|link| link.pin(&path).map_err(|e| pin_err(&path, e))) {
                Ok(_pinned) => kept += 1,
                Err(e) => warn!(iface, "{e}; the program detaches when the agent exits"),
            }
        }
        for (name, id) in std::mem::take(&mut self.sock_links) {
            let path = dir.join(format!("{CGROUP_LINK_PREFIX}{name}"));
            let link = program_mut::<CgroupSockAddr>(&mut self.ebpf, name)?
                .take_link(id)
                .map_err(|source| Error::Program { name, source })
                .and_then(|link| FdLink::try_from(link).map_err(|e| pin_err(&path, e)));
            match link.and_then(|link| link.pin(&path).map_err(|e| pin_err(&path, e))) {
                Ok(_pinned) => kept += 1,
                Err(e) => warn!(program = name, "{e}; the program detaches when the agent exits"),
            }
        }
        info!(kept, dir = %dir.display(), "attachments pinned for the next agent");
        Ok(kept)
    }
}

/// Detaches every program an agent left attached under `dir` (its pinned
/// links) and removes its pinned maps; returns how many pins went.
pub fn remove_pinned(dir: &Path) -> Result<usize> {
    let links = dir.join(LINKS_DIR);
    let mut pins = Vec::new();
    if links.exists() {
        for entry in std::fs::read_dir(&links).map_err(|source| Error::Read { path: links.clone(), source })? {
            pins.push(entry.map_err(|source| Error::Read { path: links.clone(), source })?.path());
        }
    }
    pins.extend(object_maps().iter().map(String::as_str).chain([lb_common::MAP_SERVICE_NAMES]).map(|name| dir.join(name)));
    let mut removed = 0;
    for pin in pins.iter().filter(|pin| pin.exists()) {
        let legacy = pin.file_name().and_then(|f| f.to_str()).and_then(|f| f.strip_prefix(LinkKind::TcIngressLegacy.prefix()));
        if let Some(iface) = legacy {
            release_pinned(pin, LinkKind::TcIngressLegacy, &decode_pin_name(iface))?;
            removed += 1;
            continue;
        }
        if pin.starts_with(&links)
            && let Err(e) = detach_pinned_link(pin)
        {
            warn!(pin = %pin.display(), "detaching: {e}; removing the pin releases it later");
        }
        std::fs::remove_file(pin).map_err(|e| pin_err(pin, e))?;
        removed += 1;
    }
    if links.exists() {
        std::fs::remove_dir(&links).map_err(|e| pin_err(&links, e))?;
    }
    Ok(removed)
}

/// Lets go of a previous agent's attachment to `iface` kept at `pin`:
/// unpinning a link drops its last reference, so the program detaches; a
/// cls_bpf filter's marker goes with the filter (the qdisc stays).
fn release_pinned(pin: &Path, kind: LinkKind, iface: &str) -> Result<()> {
    if kind == LinkKind::TcIngressLegacy {
        remove_legacy_filter(iface);
        return std::fs::remove_dir(pin).map_err(|e| pin_err(pin, e));
    }
    std::fs::remove_file(pin).map_err(|e| pin_err(pin, e))
}

/// bpffs refuses names with a dot, which interface names may have
/// (`eth0.100`): dots and the escape character itself are percent-escaped.
fn encode_pin_name(iface: &str) -> String {
    iface.replace('%', "%25").replace('.', "%2E")
}

fn decode_pin_name(file: &str) -> String {
    file.replace("%2E", ".").replace("%25", "%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_have_no_dot_and_decode_back() {
        let cases = [("plain name", "veth1a2b"), ("vlan with a dot", "eth0.100"), ("a literal escape", "odd%2E.x")];
        for (rule, iface) in cases {
            let encoded = encode_pin_name(iface);
            assert!(!encoded.contains('.'), "{rule}: {encoded}");
            assert_eq!(decode_pin_name(&encoded), iface, "{rule}");
        }
    }
}
