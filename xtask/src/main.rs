//! `cargo xtask`: one command for each of the project's jobs.
//!
//! Each installs what it needs first (idempotently, and quickly when everything
//! is there).
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod kernel;
mod matrix;

/// Build helper for the eBPF service load balancer.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain and test tools (Debian's rustc with its
    /// BPF core, LLVM 22, bpf-linker, iproute2, bpftool, ethtool,
    /// iptables for the benchmark baseline, curl for the demo).
    Setup,
    /// Set up, then build everything in release mode.
    Build,
    /// Set up, build, then run the demo: the kubia service in namespaces.
    Demo,
    /// Set up, then run the whole test suite (unit, packet, end-to-end) and clippy.
    Test {
        /// Run the kernel-facing tests (packet, end-to-end, the demo) in a
        /// virtual machine booting this Debian kernel instead: 5.10 (Debian
        /// 11) or 6.1 (Debian 12).
        #[arg(long, value_name = "VERSION", value_parser = clap::builder::PossibleValuesParser::new(kernel::KERNELS))]
        kernel: Option<String>,
        /// With --kernel: only the packet tests and a short end-to-end
        /// subset (what CI runs on every kernel of the matrix).
        #[arg(long, requires = "kernel")]
        quick: bool,
    },
    /// Set up, then run the benchmarks: the datapath (ns per packet through
    /// BPF_PROG_TEST_RUN) and the control plane (10,000 services against
    /// iptables-restore).
    Bench {
        /// Run the datapath benchmark in a virtual machine booting this
        /// Debian kernel instead (its floor measured there too).
        #[arg(long, value_name = "VERSION", value_parser = clap::builder::PossibleValuesParser::new(kernel::KERNELS))]
        kernel: Option<String>,
    },
    /// Set up, then run the adversarial checks in full form
    /// (docs/reliability.md): packet and object fuzzing, endpoint churn
    /// under load for a minute, and a ten-minute soak with agent restarts.
    Fuzz {
        /// Fuzzed packets (the test suite runs 200,000).
        #[arg(long, default_value_t = 5_000_000)]
        packets: u64,
        /// Fuzzed object sets (the test suite runs 2,000).
        #[arg(long, default_value_t = 50_000)]
        objects: u64,
        /// Seconds of endpoint churn (the test suite runs 10).
        #[arg(long, default_value_t = 60)]
        churn_seconds: u64,
        /// Seconds of soak, with an agent restart every 30 (the test suite
        /// runs 30, restarting every 10).
        #[arg(long, default_value_t = 600)]
        soak_seconds: u64,
    },
}

/// Debian packages: the toolchain recipe of ../shared/toolchain.md and the
/// tools the tests and docs use.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "iproute2",
    "bpftool",
    "ethtool",
    "iptables",
    "curl",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> Result<()> {
    let args = Args::parse();
    let root = workspace_root()?;
    match args.command {
        Cmd::Setup => setup(),
        Cmd::Build => {
            setup()?;
            cargo(&root, &["build", "--release", "--workspace", "--all-targets"])
        }
        Cmd::Demo => {
            require_root("the demo creates network namespaces and loads eBPF programs")?;
            setup()?;
            step("building (release)");
            cargo(&root, &["build", "--release", "-p", "lb-userspace", "-p", "lb-tests", "--bins"])?;
            run(Command::new(root.join("target/release/lb-demo")).current_dir(&root))
        }
        Cmd::Test { kernel: Some(version), quick } => {
            require_root("the virtual machine's tests load eBPF programs and create network namespaces")?;
            setup()?;
            matrix::test_on_kernel(&root, &version, quick)
        }
        Cmd::Test { kernel: None, .. } => {
            require_root("the packet and end-to-end tests load eBPF programs and create network namespaces")?;
            setup()?;
            step("building the agent for the end-to-end tests");
            cargo(&root, &["build", "-p", "lb-userspace"])?;
            step("clippy");
            cargo(&root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
            step("clippy on the eBPF crate (for the host: no BPF core for clippy's compiler here)");
            clippy_ebpf(&root)?;
            step("running every test: unit, packet (BPF_PROG_TEST_RUN), end-to-end (veth namespaces)");
            cargo_test(&root)
        }
        Cmd::Bench { kernel: Some(version) } => {
            require_root("the benchmark loads eBPF programs")?;
            setup()?;
            matrix::bench_on_kernel(&root, &version)
        }
        Cmd::Fuzz { packets, objects, churn_seconds, soak_seconds } => {
            require_root("the fuzzers and the soak load eBPF programs and create network namespaces")?;
            setup()?;
            cargo(&root, &["build", "-p", "lb-userspace"])?;
            let mut fuzz = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            fuzz.args(["test", "-p", "lb-tests", "--test", "fuzz", "--", "--nocapture"])
                .env("LB_FUZZ_CASES", packets.to_string())
                .env("LB_FUZZ_OBJECTS", objects.to_string())
                .current_dir(&root);
            step(&format!("fuzzing: {packets} packets, {objects} object sets"));
            run(&mut fuzz)?;
            let mut long = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            long.args(["test", "-p", "lb-tests", "--test", "e2e", "--", "--nocapture", "--test-threads", "1", "endpoint_churn", "soak_with"])
                .env("LB_CHURN_SECONDS", churn_seconds.to_string())
                .env("LB_SOAK_SECONDS", soak_seconds.to_string())
                .env("LB_SOAK_RESTART_SECONDS", "30")
                .current_dir(&root);
            step(&format!("endpoint churn for {churn_seconds} s, then a soak of {soak_seconds} s"));
            run(&mut long)
        }
        Cmd::Bench { kernel: None } => {
            require_root("the benchmarks load eBPF programs")?;
            setup()?;
            step("datapath benchmark");
            cargo(&root, &["bench", "-p", "lb-tests", "--bench", "datapath"])?;
            step("control-plane benchmark");
            // The agent process it starts is the release build beside it.
            cargo(&root, &["build", "--release", "-p", "lb-userspace"])?;
            cargo(&root, &["bench", "-p", "lb-tests", "--bench", "control_plane"])
        }
    }
}

pub(crate) fn step(what: &str) {
    eprintln!("==> {what}");
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest.parent().context("xtask sits in the workspace")?.to_path_buf())
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !package_installed(p)).collect();
    if missing.is_empty() {
        step("Debian packages: all installed");
    } else {
        step(&format!("installing Debian packages: {}", missing.join(" ")));
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let linker = cargo_home()?.join("bin/bpf-linker");
    if bpf_linker_version(&linker).as_deref() == Some(BPF_LINKER_VERSION) {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: installed"));
    } else {
        step(&format!("building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 3 minutes)"));
        run(Command::new("/usr/bin/cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22", "--force"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env_remove("RUSTC")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN"))?;
    }
    Ok(())
}

pub(crate) fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn bpf_linker_version(linker: &Path) -> Option<String> {
    let out = Command::new(linker).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(home.into());
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// The user-space cargo (the one running xtask).
pub(crate) fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo).args(args).current_dir(root))
}

/// Lints the eBPF crate, which is its own workspace built for the BPF
/// target by Debian's rustc: clippy runs with the workspace's toolchain,
/// which has no core library for the BPF target, so the crate is checked
/// for the host (aya-ebpf compiles there), warnings as errors. Run from the
/// workspace root, the crate's own `.cargo/config.toml` (BPF target and
/// linker flags) does not apply.
fn clippy_ebpf(root: &Path) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = root.join("lb-ebpf/Cargo.toml");
    let target_dir = root.join("target/lb-ebpf-clippy");
    let mut clippy = Command::new(cargo);
    clippy.arg("clippy").arg("--manifest-path").arg(&manifest).arg("--target-dir").arg(&target_dir).args(["--", "-D", "warnings"]).current_dir(root);
    run(&mut clippy)
}

/// `cargo test --workspace --no-fail-fast` (a failing test binary does
/// not keep the others from running), echoing its output and closing with
/// each test binary's result and the totals.
fn cargo_test(root: &Path) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // One stream, so that each "Running" line (cargo's stderr) comes
    // before its binary's results (stdout).
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("\"$0\" test --workspace --no-fail-fast 2>&1")
        .arg(cargo)
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test's output")?;
    let mut summary = TestSummary::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        summary.read(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("{}", summary.report());
    if !status.success() {
        bail!("cargo test failed ({status}): {}", summary.failing().join(", "));
    }
    Ok(())
}

/// Each test binary's result, as `cargo test` prints them.
#[derive(Debug, Default)]
struct TestSummary {
    /// (binary, its passed and failed counts once it reported).
    binaries: Vec<(String, Option<(u64, u64)>)>,
}

impl TestSummary {
    fn read(&mut self, line: &str) {
        if let Some(running) = line.trim_start().strip_prefix("Running ") {
            // "unittests src/lib.rs (target/debug/deps/lb_common-…)" or
            // "tests/e2e/main.rs (target/debug/deps/e2e-…)": the path names it.
            let binary = running.split(" (").next().unwrap_or(running).trim_start_matches("unittests ").to_owned();
            let package = running.rsplit('/').next().and_then(|file| file.split('-').next()).unwrap_or_default();
            self.binaries.push((format!("{package} {binary}"), None));
        } else if let Some(result) = line.strip_prefix("test result: ")
            && let Some((_, counts)) = self.binaries.last_mut()
        {
            *counts = Some((count_before(result, "passed"), count_before(result, "failed")));
        }
    }

    /// The binaries that failed a test or did not report.
    fn failing(&self) -> Vec<String> {
        self.binaries.iter().filter(|(_, c)| c.is_none_or(|(_, failed)| failed > 0)).map(|(b, _)| b.clone()).collect()
    }

    fn report(&self) -> String {
        let mut text = String::from("test binaries:\n");
        let (mut passed, mut failed) = (0, 0);
        for (binary, counts) in &self.binaries {
            match counts {
                Some((p, f)) => {
                    passed += p;
                    failed += f;
                    text.push_str(&format!("  {binary}: {p} passed, {f} failed\n"));
                }
                None => text.push_str(&format!("  {binary}: did not finish\n")),
            }
        }
        text.push_str(&format!("tests: {passed} passed, {failed} failed"));
        text
    }
}

/// The number labelled `label` in a libtest summary such as
/// "ok. 4 passed; 0 failed; 0 ignored; ...".
pub(crate) fn count_before(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .filter_map(|part| {
            let mut words = part.split_whitespace().rev();
            let (name, count) = (words.next()?, words.next()?);
            if name == label { count.parse::<u64>().ok() } else { None }
        })
        .sum()
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{:?} failed ({status})", cmd.get_program());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_summary_names_each_binary_and_those_that_did_not_finish() {
        let output = "     Running unittests src/lib.rs (target/debug/deps/lb_common-0123abcd)\n\
                      test result: ok. 18 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.18s\n\
                      \x20    Running tests/e2e/main.rs (target/debug/deps/e2e-4567ef01)\n\
                      test result: FAILED. 40 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 80s\n\
                      \x20    Running tests/packet.rs (target/debug/deps/packet-89ab2345)\n";
        let mut summary = TestSummary::default();
        output.lines().for_each(|line| summary.read(line));
        assert_eq!(summary.failing(), ["e2e tests/e2e/main.rs", "packet tests/packet.rs"]);
        let report = summary.report();
        assert!(report.contains("lb_common src/lib.rs: 18 passed, 0 failed"), "{report}");
        assert!(report.contains("packet tests/packet.rs: did not finish"), "{report}");
        assert!(report.ends_with("tests: 58 passed, 2 failed"), "{report}");
    }
}
