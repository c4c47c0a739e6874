//! Debian's own kernels in a throwaway QEMU VM, for testing beyond the host's kernel.
//!
//! The datapath is tested on the oldest kernels the agent supports and not only
//! on whatever the host runs.
//!
//! The VM is started by virtme-ng (`vng`): it boots a kernel with the host's
//! root filesystem shared read-only over 9p, so the test binaries that cargo
//! built on the host run unchanged inside (same paths, same shared
//! libraries), and the workspace is shared read-write so they can write
//! their output next to them.
//!
//! Everything is kept under /var/lib/lb-kernels: the virtme-ng virtualenv and one
//! directory per kernel series holding the unpacked `linux-image` package
//! (`boot/vmlinuz-*` and `lib/modules/*`). Remove a series' directory to
//! fetch that series' newest package again.
//!
//! `debian` finds, downloads and unpacks the kernel packages, `vm` boots them
//! and runs a command inside; this module installs the host's tools for both.
mod debian;
mod vm;

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result};

use crate::{package_installed, run, step};

pub use debian::install;
pub(crate) use vm::kvm_usable;
pub use vm::run_in_vm;

/// The kernel series the datapath is tested on, each Debian's own build:
/// - `"5.10"`: Debian 11 bullseye's `linux-image-5.10.0-N-amd64` (the newest
///   of bullseye and bullseye-security), the oldest kernel supported, with
///   neither tcx nor `bpf_set_retval` and with BPF maps charged to
///   RLIMIT_MEMLOCK;
/// - `"6.1"`: Debian 12 bookworm's `linux-image-6.1.0-N-amd64` (the newest of
///   bookworm and bookworm-security).
pub const KERNELS: &[&str] = &["5.10", "6.1"];

/// Not /var/cache: virtme-ng's guest init mounts a tmpfs over /var/cache
/// (and /var/tmp, /var/log), which would hide the kernel modules from the
/// guest that needs them.
const CACHE: &str = "/var/lib/lb-kernels";

/// Pinned because the guest side (its init, the script I/O ports, the exit
/// code file) is what `run_in_vm` relies on, and it changes between releases.
const VIRTME_NG_VERSION: &str = "1.42";

/// Debian packages the VM needs on the host:
/// - qemu-system-x86: the VM itself;
/// - busybox-static: the shell of the initramfs virtme-ng builds;
/// - kmod: depmod for the unpacked modules, and modprobe, which the guest
///   kernel calls (from the shared root) to load veth, sch_ingress, cls_bpf…;
/// - udev: without udevd in the guest there is no /dev/virtio-ports, and
///   virtme-ng falls back to the serial console, losing the exit code;
/// - file: how virtme-ng reads a kernel image's version;
/// - python3-venv: virtme-ng comes from PyPI, into its own virtualenv;
/// - curl, xz-utils, gpgv, debian-archive-keyring: fetching and checking the
///   kernel packages straight from the archive.
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "udev",
    "file",
    "python3-venv",
    "curl",
    "xz-utils",
    "gpgv",
    "debian-archive-keyring",
];

fn install_host_tools() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if !missing.is_empty() {
        step(&format!(
            "installing Debian packages for the kernel VMs: {}",
            missing.join(" ")
        ));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let venv = Path::new(CACHE).join("virtme-ng");
    let vng = venv.join("bin/vng");
    let installed = Command::new(&vng)
        .arg("--version")
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .nth(1)
                == Some(VIRTME_NG_VERSION)
        });
    if !installed {
        step(&format!(
            "installing virtme-ng {VIRTME_NG_VERSION} from PyPI into {}",
            venv.display()
        ));
        remove_dir_if_present(&venv)?;
        // Debian's Python, whatever python3 comes first in PATH.
        run(Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv))?;
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")))?;
    }
    Ok(())
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}
