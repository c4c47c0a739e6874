//! The real `lb-agent` running in a namespace, its bpf filesystem, and where the workspace's binaries are built.
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{Netns, run, unique_name};

/// A fresh bpf filesystem instance mounted under a temporary directory,
/// unmounted (dropping every pin) and removed on drop.
pub struct Bpffs {
    pub dir: PathBuf,
}

impl Bpffs {
    pub fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("bpffs"));
        lb_userspace::datapath::mount_bpffs(&dir).with_context(|| format!("mounting bpffs at {}", dir.display()))?;
        Ok(Self { dir })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Err(e) = run("umount", &[&self.dir.to_string_lossy()]) {
            eprintln!("cleanup: {e}");
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A binary of the workspace (`lb-agent`, `lbctl`, this crate's
/// `lb-test-udp-client`) built next to the running test or tool.
pub fn userspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{name} is not built next to {}: run `cargo build -p lb-userspace` (cargo xtask test does)", exe.display())
}

/// The real agent running in a namespace; its stderr lines are collected.
/// SIGTERM on drop, SIGKILL if it does not stop.
pub struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    line_rx: Mutex<mpsc::Receiver<String>>,
}

impl Agent {
    pub fn start(ns: &Netns, args: &[&str]) -> Result<Self> {
        let binary = userspace_binary("lb-agent")?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(&binary)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting lb-agent")?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let collected = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut all) = collected.lock() {
                    all.push(line.clone());
                }
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Self { child, lines, line_rx: Mutex::new(rx) })
    }

    /// The agent's process id (`ip netns exec` runs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line containing every one of `needles`; returns it.
    pub fn wait_for(&self, needles: &[&str], timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let rx = self.line_rx.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if needles.iter().all(|n| line.contains(n)) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!("agent logged no line with {needles:?} within {timeout:?}; its log:\n{}", self.log()),
            }
        }
    }

    /// Waits for the log line of a sync that changed the maps (added,
    /// updated or removed service ports), past those that found nothing to
    /// do; returns it. The agent logs it once the whole sync is done, the
    /// destruction of the sockets whose backend left included.
    pub fn wait_for_applied_sync(&self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.wait_for(&["synced"], deadline.saturating_duration_since(Instant::now()))?;
            let count = |field: &str| line.split_whitespace().find_map(|w| w.strip_prefix(field)?.parse::<u64>().ok()).unwrap_or(0);
            if count("added=") + count("updated=") + count("removed=") > 0 {
                return Ok(line);
            }
        }
    }

    pub fn log(&self) -> String {
        self.lines.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// The agent's resident memory (VmRSS), in kB.
    pub fn resident_kb(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).context("reading the agent's status")?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in the agent's status")
    }

    /// Stops the agent with SIGTERM, as the kubelet does, and checks that it
    /// exits cleanly within `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> Result<()> {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(status.success(), "the agent exited with {status}; its log:\n{}", self.log());
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "the agent did not exit within {timeout:?} of SIGTERM");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
