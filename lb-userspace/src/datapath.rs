//! Loading the eBPF object, attaching its programs to interfaces, and
//! pinning its maps.
use std::{
    collections::HashMap,
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya_log::EbpfLogger;
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
        cgroup_sock_addr::CgroupSockAddrLinkId,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    GLOBAL_SOCK_SET_RETVAL, PROG_SOCK_CONNECT4, PROG_SOCK_GETPEERNAME4, PROG_SOCK_RECVMSG4, PROG_SOCK_SENDMSG4,
    PROG_TC_INGRESS, PROG_XDP, PROG_XDP_FLOOR,
};
use tracing::{info, warn};

use crate::{
    EBPF_OBJECT,
    error::{Error, Result},
    features::{Feature, KernelFeatures},
    maps::{self, DatapathMaps, MapSettings, PinnedState, object_maps},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `AYA_LOG_LEVEL` below every level: the programs log nothing.
const EBPF_LOG_OFF: u8 = 0;

/// Where attachment links are pinned across restarts, below the pin dir.
const LINKS_DIR: &str = "links";

/// The socket-level programs, attached to a cgroup for the node's own
/// processes.
const SOCK_PROGRAMS: [&str; 4] = [PROG_SOCK_CONNECT4, PROG_SOCK_SENDMSG4, PROG_SOCK_RECVMSG4, PROG_SOCK_GETPEERNAME4];

/// Pin name prefix of a socket program's cgroup link.
const CGROUP_LINK_PREFIX: &str = "cgroup-";

/// Where tc programs go without tcx: the cls_bpf filter at this priority
/// and handle on the clsact qdisc's ingress. Fixed, so that the next agent
/// replaces the filter in place (Cilium does the same), and with a handle
/// no other tool picks ("LB"), so that nobody else's filter is replaced.
const LEGACY_TC_PRIORITY: u16 = 1;
const LEGACY_TC_HANDLE: u32 = 0x4c42;

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

#[derive(Debug)]
enum Attachment {
    /// A tcx link, or without tcx a cls_bpf filter.
    Tc(SchedClassifierLinkId, LinkKind),
    Xdp(XdpLinkId),
}

impl Attachment {
    const fn kind(&self) -> LinkKind {
        match self {
            Attachment::Tc(_, kind) => *kind,
            Attachment::Xdp(_) => LinkKind::Xdp,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkKind {
    TcIngress,
    /// A cls_bpf filter (no tcx). It is not a bpf object and cannot be
    /// pinned: an empty directory of this name in the links directory, made
    /// when it is attached, says that the interface has one of ours.
    TcIngressLegacy,
    Xdp,
}

impl LinkKind {
    const ALL: [LinkKind; 3] = [LinkKind::TcIngress, LinkKind::TcIngressLegacy, LinkKind::Xdp];

    const fn prefix(self) -> &'static str {
        match self {
            LinkKind::TcIngress => "tc-ingress@",
            LinkKind::TcIngressLegacy => "tc-legacy@",
            LinkKind::Xdp => "xdp@",
        }
    }
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
    /// Loads every program with maps of its own, pinned nowhere (a scratch
    /// copy, for tests, benchmarks and `lbctl explain`).
    /// Its eBPF logging is off.
    pub fn load() -> Result<Self> {
        let features = KernelFeatures::probe(&[]);
        let mut loader = loader(&features);
        let ebpf = loader.override_global(aya_log::LEVEL, &EBPF_LOG_OFF, true).load(EBPF_OBJECT)?;
        let mut datapath = Self::load_with(ebpf, None, features)?;
        // The default settings (conntrack lifetimes among them), as a
        // freshly started agent writes before anything is attached.
        datapath.maps.set_config(lb_common::DatapathConfig::default())?;
        Ok(datapath)
    }

    /// Loads every program with its maps pinned under `dir` (on a bpf
    /// filesystem), taking over the maps a previous agent pinned there when
    /// their layout agrees, so flows, backend sets and counters survive a
    /// restart or an upgrade.
    /// The programs log (through `take_logger`) up to `log_level`, and use
    /// the kernel features of `features`.
    ///
    /// Conntrack tables of an earlier layout or another size are migrated:
    /// their flows are written into the new tables before any program is
    /// attached.
    pub fn load_pinned(
        dir: &Path,
        log_level: Option<aya_log::Level>,
        settings: &MapSettings,
        features: KernelFeatures,
    ) -> Result<(Self, PinnedState)> {
        ensure_bpffs(dir)?;
        let mut pinned = maps::check_pins(dir, settings)?;
        let mut loader = loader(&features);
        let level = log_level.map_or(EBPF_LOG_OFF, |l| l as u8);
        loader.override_global(aya_log::LEVEL, &level, true);
        for name in object_maps() {
            loader.map_pin_path(name, dir.join(name));
            if let Some(max_entries) = settings.max_entries(name) {
                loader.map_max_entries(name, max_entries);
            }
        }
        let links_dir = dir.join(LINKS_DIR);
        std::fs::create_dir_all(&links_dir).map_err(|e| Error::Pin { path: links_dir.clone(), reason: e.to_string() })?;
        let datapath = Self::load_with(loader.load(EBPF_OBJECT)?, Some(dir), features)?;
        for (name, entries) in &mut pinned.migrated {
            let table = datapath.maps.conntrack.named(name).ok_or(Error::Missing(name))?;
            let written = crate::conntrack::write_all_spread(maps::table_fd(table), entries)
                .map_err(|source| Error::Io { what: format!("migrating flows into {name}"), source })?;
            entries.truncate(written);
        }
        Ok((Self { links_dir: Some(links_dir), ..datapath }, pinned))
    }

    /// Loads the programs one by one: the packet programs must load, the
    /// socket programs may not (a kernel without one of their hooks), and
    /// then the socket-level balancing is off.
    fn load_with(mut ebpf: Ebpf, pin_dir: Option<&Path>, mut features: KernelFeatures) -> Result<Self> {
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, PROG_TC_INGRESS)?;
        tc.load().map_err(|source| Error::Program { name: PROG_TC_INGRESS, source })?;
        for name in [PROG_XDP, PROG_XDP_FLOOR] {
            let xdp: &mut Xdp = program_mut(&mut ebpf, name)?;
            xdp.load().map_err(|source| Error::Program { name, source })?;
        }
        for name in SOCK_PROGRAMS {
            let sock: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            if let Err(e) = sock.load() {
                warn!(program = name, "{e}: the socket programs are off");
                features.without_socket_programs();
                break;
            }
        }
        let maps = DatapathMaps::take(&mut ebpf, pin_dir)?;
        Ok(Self { ebpf, maps, links_dir: None, attached: HashMap::new(), sock_links: Vec::new(), features })
    }

    /// The kernel features in use, and the fallbacks.
    pub const fn features(&self) -> KernelFeatures {
        self.features
    }

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
        if let Some(marker) = self.link_pin(iface, LinkKind::TcIngressLegacy)
            && let Err(e) = std::fs::create_dir(&marker)
        {
            warn!(iface, "{}; the next agent may attach beside this filter", pin_err(&marker, e));
        }
        // A previous agent's tcx link (it had tcx, this one was told not to
        // use it) goes now that the filter is in place.
        match self.take_pinned_link(iface, LinkKind::TcIngress) {
            Some(Ok(previous)) => drop(previous),
            Some(Err(e)) => warn!(iface, "the previous agent's tcx link: {e}"),
            None => {}
        }
        Ok(how)
    }

    /// Removes the marker of a cls_bpf filter on `iface`; says whether
    /// there was one.
    fn take_legacy_marker(&self, iface: &str) -> Result<bool> {
        let Some(marker) = self.link_pin(iface, LinkKind::TcIngressLegacy).filter(|path| path.exists()) else {
            return Ok(false);
        };
        std::fs::remove_dir(&marker).map_err(|e| pin_err(&marker, e))?;
        Ok(true)
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
        let Some(links) = &self.links_dir else { return Ok(()) };
        for name in SOCK_PROGRAMS {
            let previous = links.join(format!("{CGROUP_LINK_PREFIX}{name}"));
            if previous.exists() {
                std::fs::remove_file(&previous).map_err(|e| pin_err(&previous, e))?;
            }
        }
        Ok(())
    }

    /// The pinned link of a previous agent for `iface`, unpinned; `None`
    /// when there is none.
    fn take_pinned_link(&self, iface: &str, kind: LinkKind) -> Option<Result<FdLink, String>> {
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

    /// The do-nothing XDP program the benchmarks measure against.
    pub fn xdp_floor_program(&self) -> Result<&Xdp> {
        program(&self.ebpf, PROG_XDP_FLOOR)
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

/// The cgroup v2 hierarchy's root: `/sys/fs/cgroup` on a unified system,
/// `/sys/fs/cgroup/unified` on a hybrid one; `None` without cgroup v2.
pub fn cgroup2_root() -> Option<PathBuf> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].into_iter().map(PathBuf::from).find(|path| {
        let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else { return false };
        // SAFETY: statfs writes into a zeroed struct we own; c_path is NUL-terminated.
        unsafe {
            let mut stat: libc::statfs = std::mem::zeroed();
            libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == CGROUP2_SUPER_MAGIC
        }
    })
}

/// Lets every interface receive packets whose source is one of the node's
/// own addresses (`net.ipv4.conf.all.accept_local`, which the kernel ORs
/// with each interface's setting): after source NAT to the node's address,
/// a translated packet is routed from the interface it arrived on, and the
/// kernel would otherwise drop it as a martian.
pub fn accept_local_sources() -> Result<()> {
    let path = Path::new("/proc/sys/net/ipv4/conf/all/accept_local");
    std::fs::write(path, "1").map_err(|source| Error::Io { what: format!("writing {}", path.display()), source })
}

/// Makes reverse-path filtering on `iface` loose where it is strict, and
/// says whether it changed anything. Replies are translated at ingress,
/// before routing, so their source is the service address, and a strict
/// filter drops them: no route to that address leaves through the
/// interface they came in on (kube-proxy translates them after routing).
/// The kernel applies the larger of `all` and the interface's value, so
/// loose (2) on the interface wins over a strict `all`; loose passes any
/// source the node has a route to (a default route covers services).
pub fn loosen_reverse_path_filter(iface: &str) -> Result<bool> {
    let read = |path: &Path| -> Result<u32> {
        let io_err = |source| Error::Io { what: format!("reading {}", path.display()), source };
        let text = std::fs::read_to_string(path).map_err(io_err)?;
        text.trim().parse().map_err(|_| io_err(std::io::Error::other(format!("{:?} is not a number", text.trim()))))
    };
    let all = read(Path::new("/proc/sys/net/ipv4/conf/all/rp_filter"))?;
    let path = PathBuf::from(format!("/proc/sys/net/ipv4/conf/{iface}/rp_filter"));
    if all.max(read(&path)?) != 1 {
        return Ok(false);
    }
    std::fs::write(&path, "2").map_err(|source| Error::Io { what: format!("writing {}", path.display()), source })?;
    Ok(true)
}

/// Creates `dir` and checks that it is on a bpf filesystem, mounting one at
/// /sys/fs/bpf when `dir` is below it and nothing is mounted there yet.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let pin_err = |reason: String| Error::Pin { path: dir.into(), reason };
    let default_root = Path::new("/sys/fs/bpf");
    if dir.starts_with(default_root) && !is_bpffs(default_root) {
        mount_bpffs(default_root).map_err(|e| pin_err(format!("mounting bpffs at /sys/fs/bpf: {e}")))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| pin_err(e.to_string()))?;
    if !is_bpffs(dir) {
        return Err(pin_err(format!(
            "not on a bpf filesystem; mount one with `mount -t bpf bpf {}` or choose a directory under /sys/fs/bpf",
            dir.display()
        )));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs writes into a zeroed struct we own; c_path is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Mounts a new bpf filesystem instance at `path`.
pub fn mount_bpffs(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: all strings are NUL-terminated and outlive the call.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), c_path.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
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

/// Deletes this agent's cls_bpf filter (priority and handle) from the
/// ingress of `iface`, if the interface and the filter are still there.
fn remove_legacy_filter(iface: &str) {
    let handle = TcHandle::from(LEGACY_TC_HANDLE);
    let filter = SchedClassifierLink::attached(iface, TcAttachType::Ingress, LEGACY_TC_PRIORITY, handle, None);
    // Dropping a link made by `attached` deletes the filter; on an
    // interface that is gone there is nothing to delete.
    drop(filter);
}

/// The loader of the eBPF object for a kernel with `features`. Kernels
/// before 5.11 charge BPF maps to the locked-memory limit, which is far
/// below the conntrack tables' size: it is lifted first.
fn loader(features: &KernelFeatures) -> EbpfLoader<'static> {
    raise_memlock_limit();
    static WITH: u8 = 1;
    static WITHOUT: u8 = 0;
    let mut loader = EbpfLoader::new();
    let set_retval = if features.uses(Feature::SetRetval) { &WITH } else { &WITHOUT };
    loader.override_global(GLOBAL_SOCK_SET_RETVAL, set_retval, true);
    loader
}

fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        warn!(
            "lifting the locked-memory limit: {}; on kernels before 5.11 maps may fail to be created",
            std::io::Error::last_os_error()
        );
    }
}

/// Detaches the link pinned at `pin` now (BPF_LINK_DETACH). Removing the
/// pin alone releases the link only when the kernel's deferred work gets to
/// it, which can be after `--cleanup` has returned.
fn detach_pinned_link(pin: &Path) -> std::io::Result<()> {
    use std::os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // union bpf_attr, zeroed: BPF_OBJ_GET's pathname and BPF_LINK_DETACH's
    // link_fd are both its first field.
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: the bpf syscall with an attribute block of the size given,
    // holding a pointer to a string that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), size_of_val(&attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned from here on.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u64;
    // SAFETY: as above, with the link's descriptor.
    if unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_mut_ptr(), size_of_val(&attr)) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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

fn pin_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Pin { path: path.into(), reason: e.to_string() }
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
