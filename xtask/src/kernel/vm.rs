//! Booting a kernel in a throwaway QEMU VM (virtme-ng) and running a command inside it.
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

use super::{CACHE, install};
use crate::step;

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
