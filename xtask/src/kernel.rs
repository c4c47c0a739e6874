//! Debian's own kernels in a throwaway QEMU VM, so the datapath is tested on
//! the oldest kernels the agent supports and not only on whatever the host
//! runs.
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
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};

use crate::{package_installed, run, step};

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

/// The guest's environment is not the host's: these variables, when set on
/// the host, are worth having inside too.
const FORWARDED_ENV: &[&str] = &[
    "RUST_BACKTRACE",
    "RUST_LOG",
    "RUST_TEST_THREADS",
    "RUST_MIN_STACK",
];

/// Drivers udev would load at boot for QEMU's emulated hardware and CPU
/// features, none of which a test uses. Loading them is most of the boot
/// time without KVM (the kvm modules alone take over ten seconds on 5.10).
/// Only udev's loads by alias are refused: an explicit `modprobe` still works.
const UNNEEDED_MODULES: &[&str] = &[
    "kvm",
    "kvm_amd",
    "kvm_intel",
    "ahci",
    "sr_mod",
    "sg",
    "iTCO_wdt",
    "lpc_ich",
    "i2c_i801",
    "intel_pmc_bxt",
    "pcspkr",
    "psmouse",
    "serio_raw",
    "evdev",
    "ccp",
    "powernow_k8",
    "aesni_intel",
    "ghash_clmulni_intel",
    "crc32_pclmul",
    "crct10dif_pclmul",
    "sha1_ssse3",
    "sha256_ssse3",
    "sha512_ssse3",
];

const ARCHIVE: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";

/// Where a kernel series' packages are published. Kernel updates reach a
/// stable release through its security suite first, so both are searched
/// and the newest version wins.
struct Series {
    version: &'static str,
    suites: &'static [(&'static str, &'static str)],
}

const SERIES: &[Series] = &[
    Series {
        version: "5.10",
        suites: &[(ARCHIVE, "bullseye"), (SECURITY, "bullseye-security")],
    },
    Series {
        version: "6.1",
        suites: &[(ARCHIVE, "bookworm"), (SECURITY, "bookworm-security")],
    },
];

/// One `linux-image-*` stanza of a Packages index.
struct Package {
    name: String,
    version: String,
    url: String,
    sha256: String,
}

/// Makes kernel `version` (one of [`KERNELS`]) bootable: installs QEMU and
/// virtme-ng where missing, downloads and unpacks the kernel package where
/// it is not cached yet. Returns the kernel image.
pub fn install(version: &str) -> Result<PathBuf> {
    let series = series(version)?;
    install_host_tools()?;
    let dir = Path::new(CACHE).join(series.version);
    if let Some(image) = cached_image(&dir) {
        let package = fs::read_to_string(dir.join("package")).unwrap_or_default();
        step(&format!("kernel {version}: {} (cached)", package.trim()));
        return Ok(image);
    }
    let package = newest_package(series)?;
    step(&format!(
        "kernel {version}: downloading {} {}",
        package.name, package.version
    ));
    let downloads = Path::new(CACHE).join("downloads");
    fs::create_dir_all(&downloads).with_context(|| format!("creating {}", downloads.display()))?;
    let deb = downloads.join(format!("{}_{}.deb", package.name, package.version));
    download(&package.url, &deb)?;
    check_sha256(&deb, &package.sha256)?;

    // Unpacked beside the final directory and renamed into place, so an
    // interrupted install never looks like a cached kernel.
    let partial = Path::new(CACHE).join(format!("{}.partial", series.version));
    remove_dir_if_present(&partial)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    let image =
        kernel_image(&partial).with_context(|| format!("no boot/vmlinuz-* in {}", package.name))?;
    let release = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("kernel image name")?
        .to_owned();
    // The package's postinst would run depmod; without modules.dep the
    // guest's modprobe finds nothing.
    run(Command::new("depmod")
        .arg("-a")
        .arg("-b")
        .arg(&partial)
        .arg(&release))?;
    fs::write(
        partial.join("package"),
        format!("{} {}\n", package.name, package.version),
    )?;
    remove_dir_if_present(&dir)?;
    fs::rename(&partial, &dir)
        .with_context(|| format!("moving the kernel into {}", dir.display()))?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    step(&format!(
        "kernel {version}: {} {} in {}",
        package.name,
        package.version,
        dir.display()
    ));
    cached_image(&dir).context("the kernel image vanished after unpacking")
}

/// Boots kernel `version` and runs `command` with `sh` inside, as root, in
/// `root` (shared read-write with the host, like everything under it), with
/// the guest's stdout and stderr both streamed to our stdout. Returns the
/// guest command's exit status; an error means the command's status could
/// not be had (the VM failed to boot, crashed or ran past `timeout`), and
/// then the end of the kernel console is printed.
pub fn run_in_vm(
    root: &Path,
    version: &str,
    command: &str,
    timeout: Duration,
) -> Result<ExitStatus> {
    let image = install(version)?;
    let root = root
        .canonicalize()
        .with_context(|| format!("resolving {}", root.display()))?;
    let kvm = kvm_usable();
    let work = RunDir::new()?;
    fs::write(work.path.join("command"), command)?;
    fs::write(work.path.join("run.sh"), guest_script(&root, &work.path))?;
    let status_file = work.path.join("status");
    let pid_file = work.path.join("qemu.pid");

    let mut vng = Command::new(Path::new(CACHE).join("virtme-ng/bin/vng"));
    vng.arg("--run")
        .arg(&image)
        // Over virtiofs, vng first waits for a virtiofsd that Debian's QEMU
        // ships in a version it cannot drive, then falls back to 9p anyway.
        .arg("--force-9p")
        .args(["--cpus", "2", "--memory", "4G"])
        .arg(format!("--rwdir={}", root.display()))
        .arg(format!("--rwdir={}", work.path.display()))
        // $HOME (/root) is otherwise read-only inside; writes there stay
        // in the guest.
        .arg("--overlay-rwdir=/root")
        // A VM thrown away after one command needs no Spectre/Meltdown
        // defences, and under TCG they cost about a tenth of the run time.
        .args(["--append", "mitigations=off"])
        .arg("--append")
        .arg(format!("modprobe.blacklist={}", UNNEEDED_MODULES.join(",")))
        // The kernel console (on stderr) is what explains a VM that died.
        .arg("--verbose")
        .arg(format!(
            "--qemu-opts=-pidfile {}",
            work.path.join("qemu.pid").display()
        ))
        .arg("--exec")
        .arg(format!("sh {}", work.path.join("run.sh").display()))
        .current_dir(&root)
        .env("PATH", host_path(&Path::new(CACHE).join("virtme-ng/bin")))
        .stdin(Stdio::null())
        // Pipes, not our own descriptors: QEMU reopens /proc/self/fd/1 and
        // /proc/self/fd/2, truncating them when they are files.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !kvm {
        vng.arg("--disable-kvm");
    }
    let accel = if kvm {
        "KVM"
    } else {
        "TCG (no usable KVM: slower, about 10x for BPF-heavy tests)"
    };
    step(&format!(
        "kernel {version}: booting {} with {accel}",
        image.display()
    ));

    let started = Instant::now();
    let mut child = vng.spawn().context("starting vng")?;
    let stdout = child.stdout.take().context("vng's stdout")?;
    let stderr = child.stderr.take().context("vng's stderr")?;
    let console_log = Path::new(CACHE).join(format!("console-{version}.log"));
    let console = fs::File::create(&console_log)
        .with_context(|| format!("creating {}", console_log.display()))?;
    let out_thread = thread::spawn(move || copy_to_stdout(stdout));
    let err_thread = thread::spawn(move || copy_to_file(stderr, console));

    let vng_status = wait_with_timeout(&mut child, &pid_file, timeout)?;
    // The pipes close when vng and QEMU are gone, so these end.
    let _ = out_thread.join();
    let _ = err_thread.join();
    let elapsed = started.elapsed().as_secs_f64();

    let Some(vng_status) = vng_status else {
        print_console_tail(&console_log);
        bail!(
            "kernel {version}: the command was still running after {}s; VM stopped",
            timeout.as_secs()
        );
    };
    // vng would give the guest's exit code too, but 255 also stands for a VM
    // that died; the status file is written only once the command has ended.
    match fs::read_to_string(&status_file) {
        Ok(text) => {
            let code: i32 = text
                .trim()
                .parse()
                .with_context(|| format!("guest exit code {text:?}"))?;
            step(&format!(
                "kernel {version}: command exited with {code}, VM ran for {elapsed:.1}s"
            ));
            Ok(ExitStatus::from_raw((code & 0xff) << 8))
        }
        Err(_) => {
            print_console_tail(&console_log);
            bail!(
                "kernel {version}: the VM stopped before the command ended (vng {vng_status}); \
                 full console in {}",
                console_log.display()
            )
        }
    }
}

/// The script the guest runs: the environment our tests expect of a host,
/// then the command, then its exit code where the host can read it.
fn guest_script(root: &Path, work: &Path) -> String {
    let mut script = String::from(
        "exec 2>&1\n\
         export HOME=/root\n",
    );
    // sbin first: ip, tc, bpftool; then the host's PATH for cargo and co.
    let path = std::env::var("PATH").unwrap_or_default();
    script += &format!(
        "export PATH={}\n",
        quote(&format!(
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{path}"
        ))
    );
    for name in FORWARDED_ENV {
        if let Ok(value) = std::env::var(name) {
            script += &format!("export {name}={}\n", quote(&value));
        }
    }
    script += "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n\
               [ \"$(stat -f -c %T /sys/fs/cgroup)\" = cgroup2fs ] || mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
               # Before 5.11 BPF maps are charged to RLIMIT_MEMLOCK (64 KiB in a 5.10 guest).\n\
               ulimit -l unlimited\n";
    script += &format!("cd {} || exit 1\n", quote(&root.display().to_string()));
    script += &format!(
        "sh {}\n",
        quote(&work.join("command").display().to_string())
    );
    script += &format!(
        "echo $? > {}\n",
        quote(&work.join("status").display().to_string())
    );
    script
}

/// Waits for vng; past `timeout`, stops QEMU (by the pid it wrote) so vng
/// returns, and gives `None`.
fn wait_with_timeout(
    child: &mut Child,
    pid_file: &Path,
    timeout: Duration,
) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for vng")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    if let Ok(pid) = fs::read_to_string(pid_file) {
        let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
    }
    let grace = Instant::now() + Duration::from_secs(10);
    while Instant::now() < grace {
        if child.try_wait().context("waiting for vng")?.is_some() {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(None)
}

/// `/dev/kvm` alone is not enough: a host that is itself a VM may offer it
/// through software nesting (PVM) that runs only kernels built for it, and
/// Debian's then hang before their first message. Hardware virtualisation
/// shows as the vmx or svm CPU flag. `LB_VM_ACCEL=tcg|kvm` overrides.
pub(crate) fn kvm_usable() -> bool {
    match std::env::var("LB_VM_ACCEL").as_deref() {
        Ok("kvm") => return true,
        Ok("tcg") => return false,
        _ => {}
    }
    let openable = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let hardware = fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|line| line.starts_with("flags"))
            .any(|line| {
                line.split_whitespace()
                    .any(|flag| flag == "vmx" || flag == "svm")
            })
    });
    openable && hardware
}

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

/// The newest `linux-image-<series>.0-N-amd64` across the series' suites.
fn newest_package(series: &Series) -> Result<Package> {
    let prefix = format!("linux-image-{}.0-", series.version);
    let mut newest: Option<Package> = None;
    for (mirror, suite) in series.suites {
        let index = packages_index(mirror, suite)?;
        for stanza in index.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
                    .map(str::to_owned)
            };
            let Some(name) = field("Package") else {
                continue;
            };
            let abi = name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix("-amd64"));
            if !abi.is_some_and(|abi| !abi.is_empty() && abi.bytes().all(|b| b.is_ascii_digit())) {
                continue;
            }
            let (Some(version), Some(filename), Some(sha256)) =
                (field("Version"), field("Filename"), field("SHA256"))
            else {
                bail!("{suite}: incomplete stanza for {name}");
            };
            if newest
                .as_ref()
                .is_none_or(|best| dpkg_newer(&version, &best.version))
            {
                newest = Some(Package {
                    name,
                    version,
                    url: format!("{mirror}/{filename}"),
                    sha256,
                });
            }
        }
    }
    newest.with_context(|| format!("no {prefix}N-amd64 package in {:?}", series.suites))
}

/// A suite's main/binary-amd64 Packages, checked as apt would: InRelease
/// signed by a key of debian-archive-keyring, the index by its hash there.
fn packages_index(mirror: &str, suite: &str) -> Result<String> {
    let dir = Path::new(CACHE).join("downloads");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let signed = dir.join(format!("{suite}.InRelease"));
    let release = dir.join(format!("{suite}.Release"));
    download(&format!("{mirror}/dists/{suite}/InRelease"), &signed)?;
    run_quiet(
        Command::new("gpgv")
            .args([
                "--keyring",
                "/usr/share/keyrings/debian-archive-keyring.gpg",
                "--output",
            ])
            .arg(&release)
            .arg(&signed),
    )
    .with_context(|| format!("checking the signature of {suite}'s InRelease"))?;
    let release_text = fs::read_to_string(&release)?;
    let wanted = "main/binary-amd64/Packages.xz";
    let sha256 = release_text
        .split("\nSHA256:")
        .nth(1)
        .and_then(|section| {
            section
                .lines()
                .skip(1)
                .take_while(|line| line.starts_with(' '))
                .find_map(
                    |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                        [hash, _, name] if name == wanted => Some(hash.to_owned()),
                        _ => None,
                    },
                )
        })
        .with_context(|| format!("{wanted} not listed in {suite}'s InRelease"))?;
    let xz = dir.join(format!("{suite}.Packages.xz"));
    download(&format!("{mirror}/dists/{suite}/{wanted}"), &xz)?;
    check_sha256(&xz, &sha256)?;
    let out = Command::new("xz")
        .arg("-dc")
        .arg(&xz)
        .output()
        .context("starting xz")?;
    if !out.status.success() {
        bail!("xz -dc {} failed ({})", xz.display(), out.status);
    }
    for file in [&signed, &release, &xz] {
        fs::remove_file(file).with_context(|| format!("removing {}", file.display()))?;
    }
    String::from_utf8(out.stdout).with_context(|| format!("{suite}'s Packages is not UTF-8"))
}

/// The kernel image of a finished install: the `package` file is written
/// last.
fn cached_image(dir: &Path) -> Option<PathBuf> {
    dir.join("package")
        .exists()
        .then(|| kernel_image(dir))
        .flatten()
}

fn kernel_image(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir.join("boot"))
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

fn series(version: &str) -> Result<&'static Series> {
    SERIES
        .iter()
        .find(|s| s.version == version)
        .with_context(|| format!("unknown kernel {version:?}; known: {}", KERNELS.join(", ")))
}

/// A directory for one run's script, exit code and QEMU pid, shared
/// read-write with the guest; removed when the run is over.
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn new() -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = Path::new(CACHE)
            .join("runs")
            .join(format!("{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn copy_to_stdout(mut from: impl Read) {
    let mut buf = [0u8; 8192];
    let stdout = std::io::stdout();
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        let mut out = stdout.lock();
        if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
            break;
        }
    }
}

fn copy_to_file(from: impl Read, mut to: fs::File) {
    let _ = std::io::copy(&mut BufReader::new(from), &mut to);
}

fn print_console_tail(log: &Path) {
    let Ok(file) = fs::File::open(log) else {
        return;
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    eprintln!("==> last lines of the VM console ({}):", log.display());
    for line in &lines[lines.len().saturating_sub(40)..] {
        eprintln!("{line}");
    }
}

/// PATH for vng: it runs virtme-run from its own bin directory by name, and
/// depmod from sbin, which a user's PATH may lack.
fn host_path(venv_bin: &Path) -> String {
    let current = std::env::var("PATH").unwrap_or_default();
    format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{current}",
        venv_bin.display()
    )
}

/// `value` as one single-quoted shell word.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn dpkg_newer(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

fn download(url: &str, to: &Path) -> Result<()> {
    run(Command::new("curl")
        .args(["-fsSL", "--retry", "3", "-o"])
        .arg(to)
        .arg(url))
    .with_context(|| format!("downloading {url}"))
}

fn check_sha256(file: &Path, expected: &str) -> Result<()> {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .context("starting sha256sum")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let actual = text.split_whitespace().next().unwrap_or_default();
    if !out.status.success() || !actual.eq_ignore_ascii_case(expected) {
        bail!("{}: SHA256 {actual}, expected {expected}", file.display());
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

/// For tools that report success at length: their output is shown only when
/// they fail.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
