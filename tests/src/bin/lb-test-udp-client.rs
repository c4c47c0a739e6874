//! A UDP client that runs as a process of its own, so that a test can put
//! it in a cgroup where the node's socket programs apply (a test's threads
//! cannot join one). One unconnected socket for its whole life; one command
//! per line on stdin, one answer line on stdout:
//! `send IP:PORT` sends "query" there and prints `FROM ANSWER` for the reply
//! (`error KIND` when none comes within 3 s, scaled by LB_TEST_TIME_SCALE).
use std::{
    io::{BufRead, Write},
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

fn main() -> std::io::Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let scale: u32 = std::env::var("LB_TEST_TIME_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    socket.set_read_timeout(Some(Duration::from_secs(3) * scale.max(1)))?;
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let answer = match line.strip_prefix("send ").map(str::parse::<SocketAddr>) {
            Some(Ok(to)) => ask(&socket, to).unwrap_or_else(|e| format!("error {:?}", e.kind())),
            _ => format!("error unknown command {line:?}"),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

fn ask(socket: &UdpSocket, to: SocketAddr) -> std::io::Result<String> {
    socket.send_to(b"query", to)?;
    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok(format!("{from} {}", String::from_utf8_lossy(&buf[..n]).trim_end()))
}
