//! Host plumbing around the datapath: sysctls, bpffs, the cgroup v2 root, raw bpf syscalls.
use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The cgroup v2 hierarchy's root: `/sys/fs/cgroup` on a unified system,
/// `/sys/fs/cgroup/unified` on a hybrid one; `None` without cgroup v2.
pub fn cgroup2_root() -> Option<PathBuf> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| is_filesystem(path, CGROUP2_SUPER_MAGIC))
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
    if dir.starts_with(default_root) && !is_filesystem(default_root, BPF_FS_MAGIC) {
        mount_bpffs(default_root).map_err(|e| pin_err(format!("mounting bpffs at /sys/fs/bpf: {e}")))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| pin_err(e.to_string()))?;
    if !is_filesystem(dir, BPF_FS_MAGIC) {
        return Err(pin_err(format!(
            "not on a bpf filesystem; mount one with `mount -t bpf bpf {}` or choose a directory under /sys/fs/bpf",
            dir.display()
        )));
    }
    Ok(())
}

/// Whether `path` is on a filesystem of type `magic` (statfs's `f_type`).
fn is_filesystem(path: &Path, magic: i64) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs writes into a zeroed struct we own; c_path is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == magic
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

/// Detaches the link pinned at `pin` now (BPF_LINK_DETACH). Removing the
/// pin alone releases the link only when the kernel's deferred work gets to
/// it, which can be after `--cleanup` has returned.
pub(super) fn detach_pinned_link(pin: &Path) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
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
