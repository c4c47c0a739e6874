//! Test hosts in network namespaces, for end-to-end tests on one machine.
//!
//! Uniquely named namespaces joined by veth pairs, servers and clients on
//! threads that entered a namespace, the real `lb-agent` running in the node
//! namespace with its maps pinned in a bpf filesystem of the test's own.
//! Everything is removed on drop, also when a test fails. Traffic only goes
//! between these namespaces.
//!
//! `agent` runs the agent and its bpf filesystem, `cgroup` holds the test's
//! cgroup and a UDP client process in it, `server` the pods' echo server and
//! `client` the requests clients make; this module holds the namespaces
//! themselves.
mod agent;
mod cgroup;
mod client;
mod server;

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub use agent::{Agent, Bpffs, userspace_binary};
pub use cgroup::{Cgroup, ChildCgroup, UdpClientProcess};
pub use client::{ask, connect_and_ask, http_get, http_get_until, ping, udp_ask};
pub use server::EchoServer;

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A name no other test (in this or another process) uses.
pub fn unique_name(role: &str) -> String {
    format!("lbt{}x{}{role}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

/// Runs a command to completion, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Result<Self> {
        let name = unique_name(role);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let handle = self.spawn_thread(f)?;
        handle.join().map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))
    }

    /// Starts `f` on a thread inside this namespace; threads it starts
    /// inherit the namespace.
    pub fn spawn_thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<thread::JoinHandle<T>> {
        let file = File::open(Path::new("/run/netns").join(&self.name)).with_context(|| format!("opening netns {}", self.name))?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = thread::spawn(move || {
            // SAFETY: setns on a valid namespace fd changes only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            let entered = if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            assert!(ok, "setns failed");
            f()
        });
        ready_rx.recv().context("thread ended before entering the namespace")?.context("setns")?;
        Ok(handle)
    }

    /// Runs a command in this namespace (`ip netns exec`) to completion;
    /// its standard output, or an error with its stderr.
    pub fn output(&self, command: &[&str]) -> Result<String> {
        let out = Command::new("ip").args(["netns", "exec", &self.name]).args(command).output().context("running ip netns exec")?;
        if !out.status.success() {
            bail!("{} in {}: {}", command.join(" "), self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes a sysctl under /proc/sys/net of this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        self.enter(move || std::fs::write(&path, value).with_context(|| format!("writing {path}")))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Joins two namespaces with a veth pair; `a` gets `a_ip/24` on `a_if`,
/// `b` gets `b_ip/24` on `b_if`.
pub fn link(a: &Netns, a_if: &str, a_ip: Ipv4Addr, b: &Netns, b_if: &str, b_ip: Ipv4Addr) -> Result<()> {
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name])?;
    a.ip(&["addr", "add", &format!("{a_ip}/24"), "dev", a_if])?;
    b.ip(&["addr", "add", &format!("{b_ip}/24"), "dev", b_if])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])
}

/// A factor for the deadlines of waits and latency bounds, from this
/// variable (default 1). `cargo xtask test --kernel` sets it in a virtual
/// machine without hardware virtualisation, where everything runs several
/// times slower (verifying the programs alone takes most of the usual 20 s
/// start-up allowance).
pub const TIME_SCALE: &str = "LB_TEST_TIME_SCALE";

/// `duration` times the [`TIME_SCALE`].
pub fn scaled(duration: Duration) -> Duration {
    let scale = std::env::var(TIME_SCALE).ok().and_then(|v| v.parse::<f64>().ok()).filter(|f| *f >= 1.0).unwrap_or(1.0);
    duration.mul_f64(scale)
}
