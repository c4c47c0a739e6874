//! `cargo xtask test --kernel VERSION`: testing on a kernel other than the host's.
//!
//! The kernel-facing tests (packet, end-to-end, the demo) run inside a virtual
//! machine booting that kernel (`kernel/`), on binaries built here. The host's
//! build is used unchanged: the guest sees this machine's files.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{count_before, kernel, step};

/// The integration test binaries of lb-tests that load programs or make
/// namespaces, in the order they run in the guest.
const KERNEL_TESTS: [&str; 8] = ["packet", "conntrack", "upgrade", "e2e", "two_nodes", "apiserver", "examples", "deploy"];

/// What `--quick` runs: every packet-level test, and the end-to-end tests
/// that cover each hook, the attach and restart path and socket-level
/// balancing, and do not measure time (a virtual machine without hardware
/// virtualisation is several times slower). The guest passes the names with
/// `--exact`, so each is a test's full path in its binary, module included
/// (`tests/tests/e2e/cluster_ip.rs` holds `cluster_ip::…`).
const QUICK: [(&str, &[&str]); 4] = [
    ("packet", &[]),
    ("conntrack", &[]),
    ("upgrade", &[]),
    (
        "e2e",
        &[
            "cluster_ip::new_tcp_connections_reach_all_three_backends",
            "cluster_ip::udp_request_and_response_through_the_vip",
            "refusals::service_without_endpoints_is_refused_at_once",
            "cluster_ip::xdp_on_the_client_interface_balances_tcp_and_udp",
            "node_port::node_ports_follow_the_external_traffic_policy",
            "restart::agent_restart_under_load_breaks_and_refuses_no_connection",
            "restart::cleanup_detaches_the_programs_a_stopped_agent_left",
        ],
    ),
];

/// The test suite's `LB_TEST_TIME_SCALE` in a guest without hardware
/// virtualisation (QEMU's TCG): the agent then takes about 20 s, not 1, to
/// load and verify its programs.
const EMULATED_TIME_SCALE: u32 = 6;
const TIME_SCALE: &str = "LB_TEST_TIME_SCALE";

/// How long one guest may run before it is stopped.
const GUEST_TIMEOUT: Duration = Duration::from_secs(75 * 60);

/// Builds the test binaries and the agent, boots `version` and runs the
/// kernel-facing tests in it (`quick`: the subset CI runs on every kernel
/// of the matrix), then the demo; prints one line per binary and the time.
pub fn test_on_kernel(root: &Path, version: &str, quick: bool) -> Result<()> {
    kernel::install(version)?;
    step("building the agent, the demo and the tests");
    crate::cargo(root, &["build", "-p", "lb-userspace", "-p", "lb-tests", "--bins"])?;
    let binaries = built_executables(root, &["test", "-p", "lb-tests", "--tests"], "test", &KERNEL_TESTS)?;
    let results_dir = root.join("target/kernel-tests");
    std::fs::create_dir_all(&results_dir).with_context(|| format!("creating {}", results_dir.display()))?;
    let log = results_dir.join(format!("{version}.log"));
    let script = guest_script(root, &binaries, quick, &log)?;
    step(&format!("booting Linux {version} and running the {} tests in it", if quick { "quick" } else { "kernel-facing" }));
    let started = Instant::now();
    let status = kernel::run_in_vm(root, version, &script, GUEST_TIMEOUT)?;
    let elapsed = started.elapsed();
    let text = std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let summary = summarize(&text);
    for (name, outcome) in &summary.binaries {
        println!("linux {version}: {name:<10} {outcome}");
    }
    println!(
        "linux {version}: {} passed, {} failed in {:.0} s (boot included); log: {}",
        summary.passed,
        summary.failed,
        elapsed.as_secs_f64(),
        log.display()
    );
    if !status.success() || !summary.all_ran_and_passed() {
        bail!("tests failed on Linux {version} ({status})");
    }
    Ok(())
}

/// Runs the datapath benchmark in a virtual machine booting `version`:
/// the established-flow ratio to the floor, both measured in that kernel.
pub fn bench_on_kernel(root: &Path, version: &str) -> Result<()> {
    kernel::install(version)?;
    step("building the datapath benchmark");
    let bench = built_executables(root, &["bench", "-p", "lb-tests", "--bench", "datapath"], "bench", &["datapath"])?;
    let script = format!("cd '{}' && '{}' --bench", root.display(), bench["datapath"].display());
    step(&format!("booting Linux {version} and running the datapath benchmark in it"));
    let status = kernel::run_in_vm(root, version, &script, GUEST_TIMEOUT)?;
    if !status.success() {
        bail!("the benchmark failed on Linux {version} ({status})");
    }
    Ok(())
}

/// Builds with `cargo CARGO_ARGS --no-run` and returns the executables of
/// the targets of `kind` named in `names`, by name.
fn built_executables(root: &Path, cargo_args: &[&str], kind: &str, names: &[&str]) -> Result<BTreeMap<String, PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(cargo_args)
        .args(["--no-run", "--message-format=json"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running cargo {}", cargo_args.join(" ")))?;
    if !out.status.success() {
        bail!("cargo {} failed", cargo_args.join(" "));
    }
    let kind = format!("\"kind\":[\"{kind}\"]");
    let mut executables = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (Some(name), Some(executable)) = (json_string(line, "\"name\":"), json_string(line, "\"executable\":")) else {
            continue;
        };
        if names.contains(&name.as_str()) && line.contains(&kind) {
            executables.insert(name, PathBuf::from(executable));
        }
    }
    if let Some(missing) = names.iter().find(|name| !executables.contains_key(**name)) {
        bail!("cargo built no executable named {missing}");
    }
    Ok(executables)
}

/// The first string value after `key` in one line of cargo's JSON messages
/// (target names and paths hold no escaped quotes).
fn json_string(line: &str, key: &str) -> Option<String> {
    let rest = &line[line.find(key)? + key.len()..];
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}

/// The test binaries whose tests share nothing but the CPU (one datapath
/// each, no agent, no timing): they run two at a time, one per guest CPU.
/// The end-to-end tests run one at a time.
const PARALLEL: [&str; 3] = ["packet", "conntrack", "upgrade"];

/// The shell script the guest runs: each test binary, then the demo, each
/// followed by a line `xtask-ran NAME STATUS`, everything appended to `log`.
fn guest_script(root: &Path, binaries: &BTreeMap<String, PathBuf>, quick: bool, log: &Path) -> Result<String> {
    let quote = |p: &Path| format!("'{}'", p.display());
    let mut script = format!("cd {} && : > {} && uname -r | sed 's/^/xtask-kernel /' >> {}\n", quote(root), quote(log), quote(log));
    if !kernel::kvm_usable() {
        // Emulated CPUs verify the programs many times slower.
        script.push_str(&format!("export {TIME_SCALE}={EMULATED_TIME_SCALE}\n"));
    }
    let runs: Vec<(&str, Vec<&str>)> = if quick {
        QUICK.iter().map(|(name, filters)| (*name, filters.to_vec())).collect()
    } else {
        KERNEL_TESTS.iter().map(|name| (*name, Vec::new())).collect()
    };
    for (name, filters) in runs {
        let binary = binaries.get(name).with_context(|| format!("no test binary {name}"))?;
        let exact = if filters.is_empty() { String::new() } else { format!(" --exact {}", filters.join(" ")) };
        let threads = if PARALLEL.contains(&name) { 2 } else { 1 };
        script.push_str(&format!(
            "{} --test-threads={threads}{exact} >> {log} 2>&1; echo \"xtask-ran {name} $?\" >> {log}\n",
            quote(binary),
            log = quote(log)
        ));
    }
    let demo = root.join("target/debug/lb-demo");
    script.push_str(&format!("{} >> {log} 2>&1; echo \"xtask-ran demo $?\" >> {log}\n", quote(&demo), log = quote(log)));
    script.push_str(&format!("tail -n 40 {}\n! grep -q 'xtask-ran .* [1-9][0-9]*$' {}\n", quote(log), quote(log)));
    Ok(script)
}

/// What a guest's log says.
#[derive(Debug, Default, PartialEq, Eq)]
struct Summary {
    /// Each binary run, with "ok" or its failure.
    binaries: BTreeMap<String, String>,
    passed: u64,
    failed: u64,
    /// Binaries the script started that never reported back (the guest
    /// died or timed out).
    unfinished: bool,
}

impl Summary {
    fn all_ran_and_passed(&self) -> bool {
        !self.unfinished && !self.binaries.is_empty() && self.failed == 0 && self.binaries.values().all(|o| o == "ok")
    }
}

fn summarize(log: &str) -> Summary {
    let mut summary = Summary::default();
    let (mut passed, mut failed) = (0, 0);
    for line in log.lines() {
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count_before(result, "passed");
            failed += count_before(result, "failed");
        } else if let Some(ran) = line.strip_prefix("xtask-ran ") {
            let (name, status) = ran.rsplit_once(' ').unwrap_or((ran, "?"));
            let outcome = if status == "0" { "ok".to_owned() } else { format!("FAILED (exit {status}; {passed} passed, {failed} failed)") };
            summary.binaries.insert(name.to_owned(), outcome);
            summary.passed += passed;
            summary.failed += failed;
            (passed, failed) = (0, 0);
        }
    }
    summary.unfinished = passed + failed > 0 || !summary.binaries.contains_key("demo");
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_is_summed_per_binary_and_an_unfinished_run_is_a_failure() {
        let ok = "test result: ok. 10 passed; 0 failed; 0 ignored\nxtask-ran packet 0\nxtask-ran demo 0\n";
        let summary = summarize(ok);
        assert_eq!((summary.passed, summary.failed, summary.all_ran_and_passed()), (10, 0, true));

        let failing = "test result: FAILED. 3 passed; 1 failed;\nxtask-ran e2e 101\nxtask-ran demo 0\n";
        let summary = summarize(failing);
        assert!(!summary.all_ran_and_passed());
        assert_eq!(summary.binaries["e2e"], "FAILED (exit 101; 3 passed, 1 failed)");

        let died = "test result: ok. 10 passed; 0 failed;\nxtask-ran packet 0\n";
        assert!(!summarize(died).all_ran_and_passed(), "the demo never reported");
        assert!(!summarize("").all_ran_and_passed(), "nothing ran");
    }

    #[test]
    fn quick_names_are_full_paths_of_existing_tests() {
        // `--exact` matches a test's whole path: a test moved to another
        // module, or a name without its module, would select nothing.
        let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tests");
        for (binary, names) in QUICK {
            for name in names {
                let (module, function) = name.rsplit_once("::").expect("a module path");
                let file = tests.join(binary).join(format!("{}.rs", module.replace("::", "/")));
                let source = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{name}: {}: {e}", file.display()));
                assert!(source.contains(&format!("#[test]\nfn {function}() {{")), "{name}: no such test in {}", file.display());
            }
        }
    }

    #[test]
    fn cargo_messages_give_names_and_executables() {
        let line = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"packet"},"executable":"/w/target/debug/deps/packet-1"}"#;
        assert_eq!(json_string(line, "\"name\":").as_deref(), Some("packet"));
        assert_eq!(json_string(line, "\"executable\":").as_deref(), Some("/w/target/debug/deps/packet-1"));
        assert_eq!(json_string(r#"{"executable":null}"#, "\"executable\":"), None);
    }
}
