//! A client in a process of its own, for tests of the socket programs: UDP
//! sockets, and one held TCP connection.
//!
//! A test puts it in a cgroup where the node's socket programs apply (a test's
//! threads cannot join one). One UDP socket and one TCP connection at a time;
//! one command per line on stdin, one answer line on stdout:
//! - `send IP:PORT`: "query" there from the unconnected socket it started
//!   with; prints `FROM ANSWER` for the reply;
//! - `connect IP:PORT`: a new socket, connected there; prints `connected`;
//! - `ask`: "query" on the connected socket; prints `FROM ANSWER`;
//! - `tcp IP:PORT`: a new TCP connection there (the previous one closed),
//!   and an HTTP GET on it; prints `PEER ANSWER` (the peer as getpeername
//!   shows it);
//! - `tcp-ask`: an HTTP GET on that same connection; prints `PEER ANSWER`.
//!
//! A failure prints `error KIND` (a reset or aborted connection, or EOF
//! for one the server side closed: `UnexpectedEof`); replies are awaited
//! 3 s, scaled by LB_TEST_TIME_SCALE.
use std::{
    io::{BufRead, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
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
    let mut tcp: Option<TcpStream> = None;
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
            ("tcp", Ok(to)) => TcpStream::connect_timeout(&to, timeout).and_then(|conn| {
                conn.set_read_timeout(Some(timeout))?;
                conn.set_write_timeout(Some(timeout))?;
                http_ask(tcp.insert(conn))
            }),
            ("tcp-ask", _) => match tcp.as_mut() {
                Some(conn) => http_ask(conn),
                None => Ok("error no TCP connection".to_owned()),
            },
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

fn http_ask(conn: &mut TcpStream) -> std::io::Result<String> {
    let answer = lb_tests::netns::ask(conn)?;
    Ok(format!("{} {answer}", conn.peer_addr()?))
}
