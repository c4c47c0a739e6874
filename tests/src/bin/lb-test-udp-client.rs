//! A UDP client in a process of its own, for tests of the socket programs.
//!
//! A test puts it in a cgroup where the node's socket programs apply (a test's
//! threads cannot join one). One socket at a time; one command per line on
//! stdin, one answer line on stdout:
//! - `send IP:PORT`: "query" there from the unconnected socket it started
//!   with; prints `FROM ANSWER` for the reply;
//! - `connect IP:PORT`: a new socket, connected there; prints `connected`;
//! - `ask`: "query" on the connected socket; prints `FROM ANSWER`.
//!
//! A failure prints `error KIND`; replies are awaited 3 s, scaled by
//! LB_TEST_TIME_SCALE.
use std::{
    io::{BufRead, Write},
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

fn main() -> std::io::Result<()> {
    let scale: u32 = std::env::var("LB_TEST_TIME_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let timeout = Duration::from_secs(3) * scale.max(1);
    let open = || -> std::io::Result<UdpSocket> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(timeout))?;
        Ok(socket)
    };
    let mut socket = open()?;
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let (command, argument) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let answer = match (command, argument.parse::<SocketAddr>()) {
            ("send", Ok(to)) => socket.send_to(b"query", to).and_then(|_| receive(&socket)),
            ("connect", Ok(to)) => open().and_then(|new| {
                new.connect(to)?;
                socket = new;
                Ok("connected".to_owned())
            }),
            ("ask", _) => socket.send(b"query").and_then(|_| receive(&socket)),
            _ => Ok(format!("error unknown command {line:?}")),
        };
        writeln!(out, "{}", answer.unwrap_or_else(|e| format!("error {:?}", e.kind())))?;
        out.flush()?;
    }
    Ok(())
}

fn receive(socket: &UdpSocket) -> std::io::Result<String> {
    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok(format!("{from} {}", String::from_utf8_lossy(&buf[..n]).trim_end()))
}
