//! Loading the eBPF object: its programs into the kernel, its maps scratch or pinned.
use std::{collections::HashMap, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSockAddr, SchedClassifier, Xdp},
};
use lb_common::{GLOBAL_SOCK_SET_RETVAL, PROG_TC_INGRESS, PROG_XDP};
use tracing::warn;

use super::{Datapath, SOCK_PROGRAMS, host::ensure_bpffs, pins::LINKS_DIR, program_mut};
use crate::{
    EBPF_OBJECT,
    error::{Error, Result},
    features::{Feature, KernelFeatures},
    maps::{self, DatapathMaps, MapSettings, PinnedState, object_maps},
};

/// `AYA_LOG_LEVEL` below every level: the programs log nothing.
const EBPF_LOG_OFF: u8 = 0;

impl Datapath {
    /// Loads every program with maps of its own, pinned nowhere (a scratch
    /// copy, for tests, benchmarks and `lbctl explain`).
    /// Its eBPF logging is off.
    pub fn load() -> Result<Self> {
        let features = KernelFeatures::probe(&[]);
        let mut loader = loader(&features);
        // The agent's default sizes: the IPv6 tables at their idle size, so
        // that the many scratch copies of a test run fit a small machine.
        let settings = MapSettings::default();
        for name in object_maps() {
            if let Some(max_entries) = settings.max_entries(name) {
                loader.map_max_entries(name, max_entries);
            }
        }
        let ebpf = loader.override_global(aya_log::LEVEL, &EBPF_LOG_OFF, true).load(EBPF_OBJECT)?;
        let mut datapath = Self::load_with(ebpf, None, lb_common::MAX_SERVICES, features)?;
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
        let datapath = Self::load_with(loader.load(EBPF_OBJECT)?, Some(dir), settings.limits.service_ports, features)?;
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
    fn load_with(mut ebpf: Ebpf, pin_dir: Option<&Path>, service_ports: u32, mut features: KernelFeatures) -> Result<Self> {
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, PROG_TC_INGRESS)?;
        tc.load().map_err(|source| Error::Program { name: PROG_TC_INGRESS, source })?;
        let xdp: &mut Xdp = program_mut(&mut ebpf, PROG_XDP)?;
        xdp.load().map_err(|source| Error::Program { name: PROG_XDP, source })?;
        for name in SOCK_PROGRAMS {
            let sock: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            if let Err(e) = sock.load() {
                warn!(program = name, "{e}: the socket programs are off");
                features.without_socket_programs();
                break;
            }
        }
        let maps = DatapathMaps::take(&mut ebpf, pin_dir, service_ports)?;
        Ok(Self { ebpf, maps, links_dir: None, attached: HashMap::new(), sock_links: Vec::new(), features })
    }
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
