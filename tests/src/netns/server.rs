//! The pods' server: HTTP (keep-alive) and UDP answering "You've hit NAME", with a log of its clients.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

use super::Netns;

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
            let listener = match dual_stack(|any| TcpListener::bind((any, tcp_port))).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
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
                            seen.push(canonical(from));
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
            let socket = match dual_stack(|any| UdpSocket::bind((any, udp_port))).and_then(|s| s.set_read_timeout(Some(POLL)).map(|()| s)) {
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
                        seen.push(canonical(from));
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

/// A socket bound to every address of both families (`::`, which takes
/// IPv4 too, as IPv4-mapped addresses), or of IPv4 only where the
/// namespace has no IPv6.
fn dual_stack<S>(bind: impl Fn(&str) -> std::io::Result<S>) -> std::io::Result<S> {
    bind("::").or_else(|_| bind("0.0.0.0"))
}

/// An IPv4 client as an IPv4 address, not an IPv4-mapped IPv6 one.
fn canonical(from: SocketAddr) -> SocketAddr {
    SocketAddr::new(from.ip().to_canonical(), from.port())
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
