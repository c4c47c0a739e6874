//! The test's own cgroup (v2) for the socket programs, its children (pods'), and a UDP client process inside one.
use std::{
    io::{BufRead, Write},
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::{Netns, run, unique_name, userspace_binary};

/// A cgroup (v2) of the test's own, for the agent's socket programs: only
/// processes the test puts in it are translated, never the machine's
/// others. The hierarchy is mounted again under /tmp, because `ip netns
/// exec` gives the agent a fresh /sys without /sys/fs/cgroup. Removed on
/// drop.
pub struct Cgroup {
    pub dir: PathBuf,
    mount: PathBuf,
}

impl Cgroup {
    pub fn new() -> Result<Self> {
        let mount = std::env::temp_dir().join(unique_name("cgroot"));
        std::fs::create_dir(&mount).with_context(|| format!("creating {}", mount.display()))?;
        if let Err(e) = run("mount", &["-t", "cgroup2", "none", &mount.to_string_lossy()]) {
            let _ = std::fs::remove_dir(&mount);
            return Err(e.context("mounting the cgroup v2 hierarchy (needs cgroup v2)"));
        }
        let dir = mount.join(unique_name("cg"));
        let cgroup = Self { dir, mount };
        std::fs::create_dir(&cgroup.dir).with_context(|| format!("creating cgroup {}", cgroup.dir.display()))?;
        Ok(cgroup)
    }

    /// Runs a bash `script` in namespace `ns` as a process of this cgroup;
    /// returns its standard output, or its error output when it fails.
    pub fn run_in(&self, ns: &Netns, script: &str) -> Result<String> {
        run_in_cgroup(&self.dir, ns, script)
    }

    /// A child cgroup (a pod's, on a real node): what is attached to this
    /// one applies to its processes too.
    pub fn child(&self, name: &str) -> Result<ChildCgroup> {
        let dir = self.dir.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(ChildCgroup { dir })
    }
}

/// A child of a test's cgroup, removed when dropped (after its processes,
/// which must be gone by then).
pub struct ChildCgroup {
    pub dir: PathBuf,
}

impl ChildCgroup {
    /// As `Cgroup::run_in`, in this child.
    pub fn run_in(&self, ns: &Netns, script: &str) -> Result<String> {
        run_in_cgroup(&self.dir, ns, script)
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn run_in_cgroup(dir: &Path, ns: &Netns, script: &str) -> Result<String> {
    {
        let procs = dir.join("cgroup.procs");
        let joined = format!("echo $$ > {} && {script}", procs.display());
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "bash", "-c", &joined])
            .output()
            .context("running bash in the namespace")?;
        if !out.status.success() {
            bail!("{script}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// `lb-test-udp-client` running in a cgroup and namespace: one unconnected
/// UDP socket of a process the socket programs see (and a connected one, and
/// a held TCP connection, on demand).
pub struct UdpClientProcess {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl UdpClientProcess {
    /// Starts the client as a process of the cgroup `cgroup_dir`, in `ns`.
    pub fn start(cgroup_dir: &Path, ns: &Netns) -> Result<Self> {
        let procs = cgroup_dir.join("cgroup.procs");
        let binary = userspace_binary("lb-test-udp-client")?;
        let script = format!("echo $$ > {} && exec {}", procs.display(), binary.display());
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "bash", "-c", &script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting lb-test-udp-client")?;
        let stdin = child.stdin.take().context("its stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("its stdout")?);
        Ok(Self { child, stdin, stdout })
    }

    /// One datagram to `to` from the process's unconnected socket: where
    /// the answer came from, and the answer.
    pub fn ask(&mut self, to: SocketAddrV4) -> Result<(SocketAddr, String)> {
        let line = self.command(&format!("send {to}"))?;
        answer(&line)
    }

    /// A new socket of the process, connected to `to`.
    pub fn connect(&mut self, to: SocketAddrV4) -> Result<()> {
        let line = self.command(&format!("connect {to}"))?;
        anyhow::ensure!(line == "connected", "connecting to {to}: {line}");
        Ok(())
    }

    /// One datagram on the connected socket: where the answer came from,
    /// and the answer.
    pub fn ask_connected(&mut self) -> Result<(SocketAddr, String)> {
        let line = self.command("ask")?;
        answer(&line)
    }

    /// A new TCP connection of the process to `to` (its previous one
    /// closed), held open, and an HTTP GET on it: the peer as the
    /// application sees it (getpeername), and the answer.
    pub fn tcp_connect(&mut self, to: SocketAddrV4) -> Result<(SocketAddr, String)> {
        let line = self.command(&format!("tcp {to}"))?;
        answer(&line)
    }

    /// One more HTTP GET on the held TCP connection: the peer and the
    /// answer, or the error the application saw (`error KIND`).
    pub fn tcp_ask(&mut self) -> Result<(SocketAddr, String)> {
        let line = self.command("tcp-ask")?;
        answer(&line)
    }

    fn command(&mut self, command: &str) -> Result<String> {
        writeln!(self.stdin, "{command}")?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line.trim_end().to_owned())
    }
}

/// `FROM ANSWER`, as the client prints a reply.
fn answer(line: &str) -> Result<(SocketAddr, String)> {
    let (from, answer) = line.split_once(' ').with_context(|| format!("no answer: {line:?}"))?;
    let from = from.parse::<SocketAddr>().with_context(|| format!("no answer: {line:?}"))?;
    Ok((from, answer.to_owned()))
}

impl Drop for UdpClientProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if self.dir.exists()
            && let Err(e) = std::fs::remove_dir(&self.dir)
        {
            eprintln!("cleanup: removing cgroup {}: {e}", self.dir.display());
        }
        if let Err(e) = run("umount", &[&self.mount.to_string_lossy()]) {
            eprintln!("cleanup: {e}");
        }
        let _ = std::fs::remove_dir(&self.mount);
    }
}
