//! Test hosts in network namespaces: uniquely named namespaces joined by
//! veth pairs, servers and clients on threads that entered a namespace,
//! the real `lb-agent` running in the node namespace with its maps pinned
//! in a bpf filesystem of the test's own. Everything is removed on drop,
//! also when a test fails. Traffic only goes between these namespaces.
use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

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
/// UDP socket of a process the socket programs see.
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

/// Joins two namespaces with a veth pair; `a` gets `a_ip/24` on `a_if`,
/// `b` gets `b_ip/24` on `b_if`.
pub fn link(a: &Netns, a_if: &str, a_ip: Ipv4Addr, b: &Netns, b_if: &str, b_ip: Ipv4Addr) -> Result<()> {
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name])?;
    a.ip(&["addr", "add", &format!("{a_ip}/24"), "dev", a_if])?;
    b.ip(&["addr", "add", &format!("{b_ip}/24"), "dev", b_if])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])
}

/// A tiny HTTP/1.1 server (keep-alive) and a UDP server, both answering
/// "You've hit NAME\n", like the seeds' kubia pods; stops on drop.
pub struct EchoServer {
    pub name: String,
    /// Bytes received over TCP, all connections together.
    pub tcp_bytes: Arc<AtomicU64>,
    /// The address each TCP connection and UDP datagram came from, in order:
    /// the server's log of its clients.
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(50);

impl EchoServer {
    pub fn start(ns: &Netns, name: &str, tcp_port: u16, udp_port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_bytes = Arc::new(AtomicU64::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let answer = format!("You've hit {name}\n");
        let (listening_tx, listening_rx) = mpsc::channel::<Result<()>>();

        let (stop_t, bytes_t, answer_t, tx) = (stop.clone(), tcp_bytes.clone(), answer.clone(), listening_tx.clone());
        let (peers_t, peers_u) = (peers.clone(), peers.clone());
        let tcp = ns.spawn_thread(move || {
            let listener = match TcpListener::bind(("0.0.0.0", tcp_port)).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            while !stop_t.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, from)) => {
                        if let Ok(mut seen) = peers_t.lock() {
                            seen.push(from);
                        }
                        let (stop_c, bytes_c, answer_c) = (stop_t.clone(), bytes_t.clone(), answer_t.clone());
                        thread::spawn(move || serve_tcp(conn, &stop_c, &bytes_c, &answer_c));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(listener.as_raw_fd()),
                    Err(_) => return,
                }
            }
        })?;
        let (stop_u, tx) = (stop.clone(), listening_tx);
        let udp = ns.spawn_thread(move || {
            let socket = match UdpSocket::bind(("0.0.0.0", udp_port)).and_then(|s| s.set_read_timeout(Some(POLL)).map(|()| s)) {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            let mut buf = [0u8; 2048];
            while !stop_u.load(Ordering::Relaxed) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    if let Ok(mut seen) = peers_u.lock() {
                        seen.push(from);
                    }
                    let _ = socket.send_to(answer.as_bytes(), from);
                }
            }
        })?;
        for _ in 0..2 {
            listening_rx.recv().context("server thread ended")??;
        }
        Ok(Self { name: name.into(), tcp_bytes, peers, stop, threads: vec![tcp, udp] })
    }
}

fn wait_readable(fd: i32) {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd; a timeout bounds the wait.
    unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as i32) };
}

/// Serves HTTP requests on one connection: each request (headers up to
/// the blank line) gets a 200 with the pod's answer as its body.
fn serve_tcp(conn: TcpStream, stop: &AtomicBool, bytes: &AtomicU64, answer: &str) {
    if conn.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let Ok(mut writer) = conn.try_clone() else { return };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    let response = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{answer}", answer.len());
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
                let end_of_request = line == "\r\n" || line == "\n";
                line.clear();
                if end_of_request && writer.write_all(response.as_bytes()).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends one HTTP GET on a (keep-alive) connection and returns the body,
/// without its final newline.
pub fn ask(conn: &mut TcpStream) -> std::io::Result<String> {
    conn.write_all(b"GET / HTTP/1.1\r\nHost: kubia\r\n\r\n")?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .ok_or_else(|| std::io::Error::other(format!("no Content-Length in {head:?}")))?;
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).trim_end().to_owned())
}

/// The whole response (status line, headers, body) to a GET of `path`
/// from `addr`, from inside `ns`.
pub fn http_get(ns: &Netns, addr: &'static str, path: &'static str) -> Result<String> {
    ns.enter(move || -> std::io::Result<String> {
        let mut conn = TcpStream::connect(addr)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(conn, "GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        Ok(response)
    })?
    .with_context(|| format!("GET {addr}{path}"))
}

/// Asks `addr` once over a connected UDP socket; the answer, trimmed.
pub fn udp_ask(addr: SocketAddrV4) -> std::io::Result<String> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket.send(b"query")?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
}

/// GETs `path` from `addr` inside `ns` until the response starts with
/// `expected` (a status line) or `timeout` passes; the last response.
pub fn http_get_until(ns: &Netns, addr: &'static str, path: &'static str, expected: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let response = http_get(ns, addr, path).unwrap_or_default();
        if response.starts_with(expected) || Instant::now() > deadline {
            return response;
        }
        thread::yield_now();
    }
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

/// Connects to `addr` and asks once.
pub fn connect_and_ask(addr: SocketAddrV4) -> std::io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&SocketAddr::V4(addr), scaled(Duration::from_secs(3)))?;
    conn.set_read_timeout(Some(scaled(Duration::from_secs(3))))?;
    ask(&mut conn)
}

/// Sends one ICMP echo request to `to` from a raw socket and waits up to
/// two seconds for the matching echo reply; returns the address it came
/// from.
pub fn ping(to: Ipv4Addr) -> std::io::Result<Ipv4Addr> {
    const ID: [u8; 2] = [0x4c, 0x42];
    let mut request = [8u8, 0, 0, 0, ID[0], ID[1], 0, 1, b'p', b'i', b'n', b'g'];
    let sum = lb_common::checksum::finish(lb_common::checksum::sum_words(&request, 0));
    request[2..4].copy_from_slice(&sum.to_ne_bytes());
    // SAFETY: plain socket calls on a descriptor owned by `socket` below,
    // with buffers and addresses that outlive each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let socket = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let timeout = libc::timeval { tv_sec: 2, tv_usec: 0 };
        let timeout_ptr = (&raw const timeout).cast();
        if libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, timeout_ptr, size_of::<libc::timeval>() as u32) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let target = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(to).to_be() },
            sin_zero: [0; 8],
        };
        let target_ptr = (&raw const target).cast();
        let sent = libc::sendto(socket.as_raw_fd(), request.as_ptr().cast(), request.len(), 0, target_ptr, size_of::<libc::sockaddr_in>() as u32);
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = [0u8; 1500];
        loop {
            // A raw ICMP socket sees every ICMP message with its IPv4 header.
            let len = libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
            if len < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let packet = &buf[..len as usize];
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if let Some(icmp) = packet.get(ihl..ihl + 8)
                && icmp[0] == 0
                && icmp[4..6] == ID
            {
                return Ok(Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]));
            }
        }
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
