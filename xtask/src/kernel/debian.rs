//! Kernel packages from Debian's archive: found, checked, downloaded and unpacked.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::{CACHE, KERNELS, install_host_tools, remove_dir_if_present};
use crate::{run, step};

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
