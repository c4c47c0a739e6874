//! Loading the eBPF object, attaching its programs to interfaces, and
//! pinning its maps.
use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId},
};
use lb_common::{PROG_TC_INGRESS, PROG_XDP, PROG_XDP_FLOOR};

use crate::{
    EBPF_OBJECT,
    error::{Error, Result},
    maps::DatapathMaps,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The loaded datapath: its programs (attached or not) and its maps.
/// Dropping it detaches every program it attached.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: DatapathMaps,
}

impl Datapath {
    /// Loads every program into the kernel. With `pin_dir`, the maps are
    /// pinned there (the directory must be on a bpf filesystem).
    pub fn load(pin_dir: Option<&Path>) -> Result<Self> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, PROG_TC_INGRESS)?;
        tc.load().map_err(|source| Error::Program { name: PROG_TC_INGRESS, source })?;
        for name in [PROG_XDP, PROG_XDP_FLOOR] {
            let xdp: &mut Xdp = program_mut(&mut ebpf, name)?;
            xdp.load().map_err(|source| Error::Program { name, source })?;
        }
        if let Some(dir) = pin_dir {
            ensure_bpffs(dir)?;
            DatapathMaps::pin_all(&ebpf, dir)?;
        }
        let maps = DatapathMaps::take(&mut ebpf, pin_dir)?;
        Ok(Self { ebpf, maps })
    }

    /// Attaches the tc program at the ingress of `iface` (tcx).
    pub fn attach_tc(&mut self, iface: &str) -> Result<SchedClassifierLinkId> {
        let tc: &mut SchedClassifier = program_mut(&mut self.ebpf, PROG_TC_INGRESS)?;
        tc.attach(iface, TcAttachType::Ingress).map_err(|source| Error::Attach { iface: iface.into(), source })
    }

    /// Lets go of an attachment (the interface may be gone already).
    pub fn detach_tc(&mut self, link: SchedClassifierLinkId) -> Result<()> {
        let tc: &mut SchedClassifier = program_mut(&mut self.ebpf, PROG_TC_INGRESS)?;
        tc.detach(link).map_err(|source| Error::Program { name: PROG_TC_INGRESS, source })
    }

    /// Attaches the XDP program to `iface` (native mode where the driver
    /// supports it).
    pub fn attach_xdp(&mut self, iface: &str) -> Result<()> {
        let xdp: &mut Xdp = program_mut(&mut self.ebpf, PROG_XDP)?;
        xdp.attach(iface, XdpMode::Default)
            .map(drop)
            .map_err(|source| Error::Attach { iface: iface.into(), source })
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
